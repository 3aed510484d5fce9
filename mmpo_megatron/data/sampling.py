"""Which pairs each rank trains on at each step (PairSampler), and evaluation's even split."""

from __future__ import annotations

from typing import Sequence

import torch


class PairSampler:
    """Deterministic, resumable order of training pairs, sharded over data-parallel ranks.

    Each step's global batch is the same whatever the DP size; each epoch is a fresh permutation
    seeded by ``seed + epoch``; the trailing incomplete global batch of an epoch is dropped.
    ``step_microbatches(consumed_samples)`` (a multiple of the global batch, checkpointed by the
    trainer) resumes exactly where a run stopped, also under a different DP size.
    """

    def __init__(
        self,
        num_pairs: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        *,
        seed: int = 1234,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by micro batch {micro_batch_size} x DP {dp_size}"
            )
        if num_pairs < global_batch_size:
            raise ValueError(f"{num_pairs} pairs cannot fill one global batch of {global_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.num_pairs = num_pairs
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths
        self.steps_per_epoch = num_pairs // global_batch_size

    def _global_batch(self, epoch: int, step_in_epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_pairs)
        start = step_in_epoch * self.global_batch_size
        return order[start : start + self.global_batch_size].tolist()

    def step_microbatches(self, consumed_samples: int) -> list[list[int]]:
        """This rank's micro-batches (lists of pair indices) for the step after ``consumed_samples``."""
        if consumed_samples % self.global_batch_size != 0:
            raise ValueError(
                f"consumed_samples {consumed_samples} is not a multiple of the global batch {self.global_batch_size}"
            )
        per_epoch = self.steps_per_epoch * self.global_batch_size
        epoch, step = consumed_samples // per_epoch, (consumed_samples % per_epoch) // self.global_batch_size
        batch = self._global_batch(epoch, step)
        mbs = self.micro_batch_size
        if self.lengths is not None:
            # Length-grouped: similar lengths share a micro-batch; micro-batches dealt round-robin.
            batch = sorted(batch, key=lambda i: -self.lengths[i])
            micro = [batch[i : i + mbs] for i in range(0, len(batch), mbs)]
            return micro[self.dp_rank :: self.dp_size]
        share = self.global_batch_size // self.dp_size
        mine = batch[self.dp_rank * share : (self.dp_rank + 1) * share]
        return [mine[i : i + mbs] for i in range(0, share, mbs)]


def eval_microbatches(num_pairs: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[list[int | None]]:
    """Every pair once, in order, split over DP ranks; ``None`` pads so all ranks get as many micro-batches."""
    per_round = micro_batch_size * dp_size
    rounds = -(-num_pairs // per_round)
    out = []
    for r in range(rounds):
        start = r * per_round + dp_rank * micro_batch_size
        out.append([i if i < num_pairs else None for i in range(start, start + micro_batch_size)])
    return out


# ---------------------------------------------------------------------------------------------
# Packing
