"""Preference losses on per-pair sequence log-probs: MMPO and the baselines it is compared with.

Every loss is a pure tensor function. It takes per-pair tensors (policy chosen, policy rejected
and, except SimPO, reference chosen and reference rejected log-probs) and returns
``(per_pair_loss, metrics)``, where ``metrics`` maps docs/method.md's metric names to detached
per-pair tensors. Reducing over the global batch (sum over valid pairs, divided by the global
pair count) is the caller's job, so the result does not depend on how the batch is split.

The MMPO identity: ``log sigmoid(a - b) = a - LSE(a, b)``. With the literal auxiliary input
(``aux_input="score_margin"``) the per-pair loss is written as ``-(1 - w) * LSE(sc, sr) - w * sc``,
which is the paper's ``-LSE(sc, sr) - w * log sigmoid(sc - sr)`` exactly, but makes the ``w = 1``
case ``-sc`` to the last bit: the rejected side then gets a gradient of exactly zero.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo_megatron.config import AUX_INPUTS, LOSSES, LossConfig
from mmpo_megatron.pair_logprobs import PairLogProbs

Metrics = dict[str, Tensor]
ReducedLogProbs = tuple[Tensor, Tensor, "Tensor | None", "Tensor | None"]
"""Per-pair sequence log-probs: policy chosen, policy rejected, reference chosen, reference rejected."""

NORM_EPS = 1e-6
"""The additive constant of MMPO's min-max normalisation (docs/method.md step 2)."""

def _check_pairs(*tensors: Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or any(t.dim() != 1 for t in tensors):
        raise ValueError(
            f"per-pair log-prob tensors must be 1-D and of equal length, got shapes {sorted(shapes)}"
        )


def prior_rewards(
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    eps_chosen: float = 0.9,
    eps_rejected: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """MMPO's prior rewards ``(eps_c + beta * lc_ref, eps_r + beta * lr_ref)``; no gradient."""
    return (
        (eps_chosen + beta * ref_chosen_logps).detach(),
        (eps_rejected + beta * ref_rejected_logps).detach(),
    )


def minmax_over_pairs(reward_chosen: Tensor, reward_rejected: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum and maximum over the set {rc_i, rr_i} of the pairs given."""
    values = torch.cat([reward_chosen.reshape(-1), reward_rejected.reshape(-1)])
    return values.min(), values.max()


def normalise_rewards(reward: Tensor, norm_min: Tensor | float, norm_max: Tensor | float) -> Tensor:
    """Min-max normalisation ``(r - m + 1e-6) / (M - m + 1e-6)`` (finite when M == m)."""
    return (reward - norm_min + NORM_EPS) / (norm_max - norm_min + NORM_EPS)


def mmpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    eps_chosen: float = 0.9,
    eps_rejected: float = 0.1,
    aux_input: str = "score_margin",
    aux_weight: float = 1.0,
    normalize: bool = True,
    norm_min: Tensor | float | None = None,
    norm_max: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """MMPO per-pair loss ``-LSE(sc, sr) - aux_weight * log sigmoid(a)`` and its metrics.

    ``norm_min``/``norm_max`` are the statistics of the normalisation scope (see
    ``mmpo_megatron.parallel.batch_stats``); both None means "normalise over the pairs given".
    ``normalize=False`` is the scope ``none``: the prior rewards enter the scores unscaled.
    """
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if aux_input not in AUX_INPUTS:
        raise ValueError(f"aux_input must be one of {AUX_INPUTS}, got {aux_input!r}")
    if (norm_min is None) != (norm_max is None):
        raise ValueError("give both norm_min and norm_max, or neither")

    reward_chosen, reward_rejected = prior_rewards(
        ref_chosen_logps, ref_rejected_logps, beta=beta, eps_chosen=eps_chosen, eps_rejected=eps_rejected
    )
    if normalize:
        if norm_min is None:
            norm_min, norm_max = minmax_over_pairs(reward_chosen, reward_rejected)
        reward_chosen = normalise_rewards(reward_chosen, norm_min, norm_max)
        reward_rejected = normalise_rewards(reward_rejected, norm_min, norm_max)

    score_chosen = policy_chosen_logps + reward_chosen
    score_rejected = policy_rejected_logps + reward_rejected
    log_marginal = torch.logaddexp(score_chosen, score_rejected)

    dpo_margin = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    if aux_input == "score_margin":
        # -LSE - w * (sc - LSE): the identity keeps w = 1 exactly -sc (see module docstring).
        loss = -(1.0 - aux_weight) * log_marginal - aux_weight * score_chosen
    else:
        loss = -log_marginal - aux_weight * F.logsigmoid(dpo_margin)

    with torch.no_grad():
        metrics = _reward_metrics(score_chosen, score_rejected, policy_chosen_logps, policy_rejected_logps)
        metrics["mmpo/posterior_chosen"] = torch.sigmoid(score_chosen - score_rejected)
        metrics["mmpo/log_marginal"] = log_marginal.detach()
        metrics["implicit_rewards/chosen"] = beta * (policy_chosen_logps - ref_chosen_logps).detach()
        metrics["implicit_rewards/rejected"] = beta * (policy_rejected_logps - ref_rejected_logps).detach()
        metrics["implicit_rewards/accuracies"] = (
            metrics["implicit_rewards/chosen"] > metrics["implicit_rewards/rejected"]
        ).to(score_chosen.dtype)
        if normalize:
            metrics["mmpo/norm_min"] = torch.as_tensor(norm_min, dtype=score_chosen.dtype).expand_as(score_chosen)
            metrics["mmpo/norm_max"] = torch.as_tensor(norm_max, dtype=score_chosen.dtype).expand_as(score_chosen)
    return loss, metrics


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """DPO ``-log sigmoid(beta * margin)``; ``label_smoothing > 0`` gives conservative DPO (cDPO)."""
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, _implicit_reward_metrics(
        beta, chosen_ratio, rejected_ratio, policy_chosen_logps, policy_rejected_logps
    )


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, Metrics]:
    """IPO ``(margin - 1 / (2 beta))^2``; inputs are per-token-averaged log-probs."""
    _check_pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if beta <= 0:
        raise ValueError(f"IPO needs beta > 0, got {beta}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    loss = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return loss, _implicit_reward_metrics(
        beta, chosen_ratio, rejected_ratio, policy_chosen_logps, policy_rejected_logps
    )


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 2.5,
) -> tuple[Tensor, Metrics]:
    """SimPO ``-log sigmoid(beta * (lc - lr) - gamma)`` on per-token-averaged log-probs (no reference)."""
    _check_pairs(policy_chosen_logps, policy_rejected_logps)
    loss = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)
    with torch.no_grad():
        metrics = _reward_metrics(
            beta * policy_chosen_logps, beta * policy_rejected_logps, policy_chosen_logps, policy_rejected_logps
        )
    return loss, metrics


def _reward_metrics(
    reward_chosen: Tensor, reward_rejected: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> Metrics:
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    return {
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        # Ties count as wrong (docs/method.md).
        "rewards/accuracies": (reward_chosen > reward_rejected).to(reward_chosen.dtype),
        "rewards/margins": reward_chosen - reward_rejected,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def _implicit_reward_metrics(
    beta: float, chosen_ratio: Tensor, rejected_ratio: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> Metrics:
    with torch.no_grad():
        return _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)


Formula = Callable[
    [LossConfig, ReducedLogProbs, "Tensor | float | None", "Tensor | float | None"], tuple[Tensor, Metrics]
]
"""A registered loss: its config, the reduced log-probs, and MMPO's step statistics (norm_min, norm_max)."""
_FORMULAS: dict[str, Formula] = {}


def formula_of(name: str) -> Callable[[Formula], Formula]:
    """Register the formula of the loss ``name`` of config.LOSSES (its config fields to the loss's keywords)."""

    def register(function: Formula) -> Formula:
        if name not in LOSSES:
            raise ValueError(f"{name!r} is not in mmpo_megatron.config.LOSSES; add its LossSpec there first")
        if name in _FORMULAS:
            raise ValueError(f"loss {name!r} has a formula already: {_FORMULAS[name].__name__}")
        _FORMULAS[name] = function
        return function

    return register


@formula_of("mmpo")
def _mmpo(config: LossConfig, logps: ReducedLogProbs, norm_min, norm_max) -> tuple[Tensor, Metrics]:
    return mmpo_loss(
        *logps,
        beta=config.beta,
        eps_chosen=config.eps_chosen,
        eps_rejected=config.eps_rejected,
        aux_input=config.aux_input,
        aux_weight=config.aux_weight,
        normalize=config.norm_scope != "none",
        norm_min=norm_min,
        norm_max=norm_max,
    )


@formula_of("dpo")
def _dpo(config: LossConfig, logps: ReducedLogProbs, norm_min, norm_max) -> tuple[Tensor, Metrics]:
    return dpo_loss(*logps, beta=config.beta, label_smoothing=config.label_smoothing)


@formula_of("ipo")
def _ipo(config: LossConfig, logps: ReducedLogProbs, norm_min, norm_max) -> tuple[Tensor, Metrics]:
    return ipo_loss(*logps, beta=config.beta)


@formula_of("simpo")
def _simpo(config: LossConfig, logps: ReducedLogProbs, norm_min, norm_max) -> tuple[Tensor, Metrics]:
    policy_chosen, policy_rejected, _, _ = logps
    return simpo_loss(policy_chosen, policy_rejected, beta=config.beta, gamma=config.gamma)


_UNIMPLEMENTED = set(LOSSES) - set(_FORMULAS)
if _UNIMPLEMENTED:  # a LossSpec added to the registry without its formula: fail at import, not mid-run
    raise ImportError(f"mmpo_megatron.losses has no formula for {sorted(_UNIMPLEMENTED)} of config.LOSSES")


def preference_loss(
    config: LossConfig,
    logps: PairLogProbs,
    *,
    norm_min: Tensor | float | None = None,
    norm_max: Tensor | float | None = None,
) -> tuple[Tensor, Metrics]:
    """Per-pair loss and metrics of the configured objective, plus the optional chosen-NLL term."""
    spec = LOSSES.get(config.name)
    if spec is None:  # LossConfig validates the name; this guards direct construction.
        raise ValueError(f"unknown loss {config.name!r}")
    if spec.needs_reference and (logps.ref_chosen is None or logps.ref_rejected is None):
        raise ValueError(f"loss {config.name!r} needs reference log-probs, none were given")
    reduced = logps.reduced(config.reduction)
    loss, metrics = _FORMULAS[config.name](config, reduced, norm_min, norm_max)

    if config.nll_weight > 0:
        nll = logps.chosen_nll_per_token()  # the RPO-style auxiliary term
        loss = loss + config.nll_weight * nll
        metrics["nll/chosen"] = nll.detach()
    return loss, metrics
