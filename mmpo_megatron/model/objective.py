"""The training objective as the step sees it: a per-step preparation from reference values, then
the per-pair loss of each micro-batch.

MMPO's preparation is its normalisation statistics: the min/max of the prior rewards over the
scope ``loss.norm_scope`` (``global``: every pair of the optimizer step, on every DP rank). The
rewards depend on reference log-probs only, so they are known before the policy forward. DPO,
IPO and SimPO need no preparation. The step code never looks at the loss's name: it calls
``prepare_step`` and ``per_pair_loss``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import Tensor

from mmpo_megatron.config import LOSSES, LossConfig
from mmpo_megatron.losses import Metrics, preference_loss, prior_rewards
from mmpo_megatron.pair_logprobs import PairLogProbs

if TYPE_CHECKING:  # types only: model/schedule.py imports this module at run time
    import torch.distributed as dist

    from mmpo_megatron.model.schedule import MicroBatch


class Objective:
    """A preference loss without per-step statistics (DPO, IPO, SimPO)."""

    def __init__(self, config: LossConfig) -> None:
        self.config = config

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs must be filled in before the step (all but SimPO)."""
        return self.config.needs_reference

    def prepare_step(self, micro_batches: Sequence["MicroBatch"], group: "dist.ProcessGroup | None") -> None:
        """Statistics the loss needs from the whole step (last pipeline stage); none here."""

    def per_pair_loss(self, logps: PairLogProbs, micro: "MicroBatch") -> tuple[Tensor, Metrics]:
        """Per-pair loss and metrics of one micro-batch."""
        return preference_loss(self.config, logps)


class MMPOObjective(Objective):
    """MMPO: the prior rewards' min/max over the normalisation scope, before the policy forward."""

    def prior_rewards(self, micro: "MicroBatch") -> tuple[Tensor, Tensor]:
        """The micro-batch's prior rewards, on the log-prob reduction the loss itself uses (PairLogProbs)."""
        counts = micro.batch.loss_mask.sum(-1)
        pairs = micro.batch.num_pairs
        ref = PairLogProbs(micro.ref_chosen, micro.ref_rejected, counts[:pairs], counts[pairs:])
        chosen, rejected, _, _ = ref.reduced(self.config.reduction)
        loss = self.config
        return prior_rewards(
            chosen, rejected, beta=loss.beta, eps_chosen=loss.eps_chosen, eps_rejected=loss.eps_rejected
        )

    def prepare_step(self, micro_batches: Sequence["MicroBatch"], group: "dist.ProcessGroup | None") -> None:
        """Set each micro-batch's ``norm_min``/``norm_max`` for the configured scope."""
        from mmpo_megatron.parallel.batch_stats import normalisation_stats

        if self.config.norm_scope == "none":
            return
        rewards = [self.prior_rewards(m) for m in micro_batches]
        stats = normalisation_stats([r[0] for r in rewards], [r[1] for r in rewards], self.config.norm_scope,
                                    valid=[m.batch.pair_valid for m in micro_batches], group=group)
        for i, micro in enumerate(micro_batches):
            micro.norm_min, micro.norm_max = stats.for_microbatch(i)

    def per_pair_loss(self, logps: PairLogProbs, micro: "MicroBatch") -> tuple[Tensor, Metrics]:
        """MMPO's loss with the step's statistics (normalised over the pairs given when there are none)."""
        return preference_loss(self.config, logps, norm_min=micro.norm_min, norm_max=micro.norm_max)


def objective_for(config: LossConfig) -> Objective:
    """The objective of a loss config: with the step's statistics where its LossSpec needs them."""
    needs_statistics = LOSSES[config.name].step_statistics
    return MMPOObjective(config) if needs_statistics else Objective(config)
