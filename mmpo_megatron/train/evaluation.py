"""Held-out evaluation: the objective over the whole held-out set (its ``global`` scope), reward
accuracy and margins, and the chosen responses' NLL per token."""

from __future__ import annotations

import torch

from mmpo_megatron.config import LossConfig
from mmpo_megatron.losses import preference_loss
from mmpo_megatron.model.preference_model import MegatronPreferenceModel
from mmpo_megatron.pair_logprobs import PairLogProbs


def evaluate(
    model: MegatronPreferenceModel, pairs, reference: PairLogProbs | None, loss: LossConfig
) -> dict[str, float]:
    """Held-out metrics (every rank gets them); {} without held-out pairs."""
    if pairs is None:
        return {}
    policy = model.score(pairs)
    metrics = None
    if model.last_stage:
        logps = policy.with_reference(reference).to("cpu", torch.float64)
        # Normalisation over the whole held-out set: the global scope of evaluation.
        per_pair_loss, per_pair = preference_loss(loss, logps)
        metrics = {"loss": per_pair_loss.mean().item(), **{k: v.mean().item() for k, v in per_pair.items()}}
        metrics["nll/chosen_per_token"] = logps.chosen_nll_per_token().mean().item()
        metrics["pairs"] = float(len(pairs))
    return model.broadcast_from_last_stage(metrics)


def lm_nll(model: MegatronPreferenceModel, documents) -> float:
    """The mean per-token NLL of a corpus laid out by data/lm.py (every rank gets it)."""
    scores = model.score(documents)
    value = None
    if model.last_stage:
        value = {"nll": float(-scores.chosen.double().sum() / scores.chosen_tokens.sum().clamp(min=1))}
    return model.broadcast_from_last_stage(value)["nll"]
