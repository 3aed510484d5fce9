"""The preference losses a run can train with, and their hyper-parameters.

``LOSSES`` is the one registry of loss names: the ``loss.name`` check, the objective the step runs
(``mmpo_megatron.model.objective``), the formulas (``mmpo_megatron.losses`` registers one per name
and refuses to import with one missing) and the docs' tables (tests/test_losses.py checks the
README and configs/loss/ against it) all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmpo_megatron.config.checks import choices, require


@dataclass(frozen=True)
class LossSpec:
    """What the rest of the code needs to know of a loss besides its formula."""

    summary: str
    """One line for the docs: the per-pair loss."""

    needs_reference: bool = True
    """Whether the loss reads reference log-probs; False builds no reference at all."""

    step_statistics: bool = False
    """Whether the loss needs statistics of the whole optimizer step (MMPO's min-max normalisation
    of the prior rewards), prepared before the policy forward."""

    fixed_reduction: str | None = None
    """The sequence log-prob the loss is defined on whatever ``loss.logp_reduction`` says (IPO and
    SimPO: the per-token mean); None follows ``loss.logp_reduction``."""


LOSSES: dict[str, LossSpec] = {
    "mmpo": LossSpec("-LSE(sc, sr) - aux_weight * log sigmoid(sc - sr), scores = log-probs + normalised prior rewards",
                     step_statistics=True),
    "dpo": LossSpec("-log sigmoid(beta * margin); label_smoothing > 0 gives cDPO"),
    "ipo": LossSpec("(margin - 1 / (2 beta))^2 on per-token-averaged log-probs", fixed_reduction="mean"),
    "simpo": LossSpec("-log sigmoid(beta * (lc - lr) - gamma) on per-token-averaged log-probs, no reference",
                      needs_reference=False, fixed_reduction="mean"),
}
LOSS_NAMES = tuple(LOSSES)
NORM_SCOPES = ("global", "dp_microbatch", "local", "none")
LOGP_REDUCTIONS = ("sum", "mean")
AUX_INPUTS = ("score_margin", "dpo_margin")


@dataclass
class LossConfig:
    """Which preference loss to train with and its hyper-parameters (docs/method.md)."""

    name: str = "mmpo"
    """The objective, one of LOSSES. MMPO is this project's reason to exist; the others are the
    paper's baselines."""

    beta: float = 0.1
    """Temperature. Paper grid 0.01, 0.05, 0.1, 0.5; 0.1 is the common DPO default. SimPO uses ~2.0."""

    eps_chosen: float = 0.9
    """MMPO prior-reward offset of the chosen response (paper runs: 0.9)."""

    eps_rejected: float = 0.1
    """MMPO prior-reward offset of the rejected response (paper runs: 0.1)."""

    aux_input: str = "score_margin"
    """MMPO auxiliary term input: ``sc - sr`` (paper-literal) or the DPO margin."""

    aux_weight: float = 1.0
    """MMPO auxiliary weight lambda: 1.0 in the paper; 0 gives pure marginal likelihood.
    With ``score_margin`` and 1.0 the loss equals ``-sc``: the rejected side gets no gradient."""

    norm_scope: str = "global"
    """Where MMPO's min-max statistics come from. ``global`` (the optimizer step's whole batch) is
    the only scope whose result does not depend on the DP x micro-batch split."""

    logp_reduction: str = "sum"
    """Sequence log-prob for MMPO and DPO: sum over completion tokens (paper) or per-token mean.
    IPO and SimPO always use the mean, as their papers define them."""

    label_smoothing: float = 0.0
    """DPO label smoothing (cDPO); 0 is plain DPO."""

    gamma: float = 2.5
    """SimPO target margin; the SimPO paper uses gamma/beta between 1.0 and 1.6 with beta ~2."""

    nll_weight: float = 0.0
    """Weight of an added per-token NLL on the chosen response (RPO style); 0 disables it."""

    def __post_init__(self) -> None:
        require(self.name in LOSS_NAMES, "loss.name", f"must be {choices(LOSS_NAMES)}, got {self.name!r}")
        require(
            self.norm_scope in NORM_SCOPES,
            "loss.norm_scope",
            f"must be {choices(NORM_SCOPES)}, got {self.norm_scope!r}",
        )
        require(
            self.aux_input in AUX_INPUTS, "loss.aux_input", f"must be {choices(AUX_INPUTS)}, got {self.aux_input!r}"
        )
        require(
            self.logp_reduction in LOGP_REDUCTIONS,
            "loss.logp_reduction",
            f"must be {choices(LOGP_REDUCTIONS)}, got {self.logp_reduction!r}",
        )
        require(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        require(self.aux_weight >= 0, "loss.aux_weight", f"must be >= 0, got {self.aux_weight}")
        require(
            0.0 <= self.label_smoothing < 0.5,
            "loss.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        require(self.nll_weight >= 0, "loss.nll_weight", f"must be >= 0, got {self.nll_weight}")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (SimPO is reference-free)."""
        return LOSSES[self.name].needs_reference

    @property
    def reduction(self) -> str:
        """The sequence log-prob the loss runs on: its LossSpec's fixed one, else ``logp_reduction``."""
        return LOSSES[self.name].fixed_reduction or self.logp_reduction


