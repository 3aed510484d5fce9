"""The package's one per-pair log-prob type: what a forward pass gives for each preference pair
(summed completion log-probs and completion token counts of both sides) and, where known, the
reference's sums. The same object is a micro-batch's loss input, a whole data set's scores
(indexed by data-set position) and the precomputed-reference cache on disk.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class PairLogProbs:
    """Per-pair summed completion log-probs (``chosen``, ``rejected``), token counts, and the
    reference's sums of the same pairs (``ref_chosen``, ``ref_rejected``; None when not known)."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    @classmethod
    def zeros(cls, count: int) -> "PairLogProbs":
        """``count`` pairs of zeros (fp32 sums, integer counts): the buffer a data set is scored into."""
        sums = [torch.zeros(count, dtype=torch.float32) for _ in range(2)]
        counts = [torch.zeros(count, dtype=torch.long) for _ in range(2)]
        return cls(*sums, *counts)

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    # ------------------------------------------------------------------------- reductions
    def per_token(self, value: Tensor | None, chosen_side: bool) -> Tensor | None:
        """``value`` (a sum over one side's completions) divided by that side's token counts."""
        if value is None:
            return None
        # A completion always has >= 1 token after the data pipeline; the clamp guards padding pairs.
        count = (self.chosen_tokens if chosen_side else self.rejected_tokens).clamp(min=1)
        return value / count.to(value.dtype)

    def reduced(self, how: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(policy chosen, policy rejected, ref chosen, ref rejected) as sums or per-token means.

        The single definition of the ``loss.logp_reduction`` options: the losses, MMPO's prior
        rewards and the evaluation all reduce through here."""
        if how == "sum":
            return self.chosen, self.rejected, self.ref_chosen, self.ref_rejected
        if how != "mean":
            raise ValueError(f"log-prob reduction must be 'sum' or 'mean', got {how!r}")
        return (
            self.per_token(self.chosen, True),
            self.per_token(self.rejected, False),
            self.per_token(self.ref_chosen, True),
            self.per_token(self.ref_rejected, False),
        )

    def chosen_nll_per_token(self) -> Tensor:
        """Per pair, the chosen completion's negative log-likelihood per token."""
        return -self.per_token(self.chosen, True)

    # ------------------------------------------------------------------------- selection
    def _map(self, fn) -> "PairLogProbs":
        return replace(self, **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})

    def detach(self) -> "PairLogProbs":
        """The same values without autograd history."""
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PairLogProbs":
        """On ``device``; with ``dtype``, the log-prob sums (not the counts) also cast to it."""
        moved = self._map(lambda t: t.to(device))
        if dtype is None:
            return moved
        return replace(moved, **{name: None if getattr(moved, name) is None else getattr(moved, name).to(dtype)
                                 for name in ("chosen", "rejected", "ref_chosen", "ref_rejected")})

    def take(self, positions: Sequence[int] | Tensor) -> "PairLogProbs":
        """The pairs at the given positions; a padding position (-1) reads pair 0 (masked later)."""
        index = torch.as_tensor(positions, dtype=torch.long).clamp(min=0)
        return self._map(lambda t: t[index.to(t.device)])

    def with_reference(self, reference: "PairLogProbs | None") -> "PairLogProbs":
        """These policy values with ``reference``'s sums of the same pairs as the reference."""
        if reference is None:
            return replace(self, ref_chosen=None, ref_rejected=None)
        return replace(self, ref_chosen=reference.chosen, ref_rejected=reference.rejected)

    def put(self, positions: Tensor, values: "PairLogProbs") -> None:
        """Write ``values`` (one per position) into these pairs; negative positions are padding, skipped."""
        keep = positions >= 0
        target = positions[keep]
        for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
            mine = getattr(self, name)
            mine[target] = getattr(values, name)[keep.to(getattr(values, name).device)].to(mine.device, mine.dtype)

    # ------------------------------------------------------------------------- storage
    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename)."""
        tmp = path.with_suffix(f".tmp-{socket.gethostname()}-{os.getpid()}")  # unique on a shared filesystem
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, tmp)
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> "PairLogProbs":
        """Read a saved file."""
        return cls(**torch.load(path, weights_only=True))
