"""Pairs of token ids into padded micro-batch tensors: rows, labels, completion masks and positions.

A micro-batch of B pairs is 2B rows (chosen rows first, then rejected): a pair never straddles
micro-batches or ranks. Rows pad to the longest row rounded up to ``pad_to_multiple``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

Pair = Mapping[str, Sequence[int]]


def pair_tokens(pair: Pair) -> int:
    """Tokens a pair's two rows feed the model (each row is its sequence minus the last token)."""
    return len(pair["prompt_ids"]) * 2 + len(pair["chosen_ids"]) + len(pair["rejected_ids"]) - 2


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def shifted_row(prompt: Sequence[int], completion: Sequence[int]) -> tuple[list[int], list[int], list[bool]]:
    """(inputs, labels, completion mask) of ``prompt + completion`` shifted by one."""
    seq = list(prompt) + list(completion)
    inputs, labels = seq[:-1], seq[1:]
    # labels[t] = seq[t + 1] is a completion token iff t + 1 >= len(prompt)
    mask = [t + 1 >= len(prompt) for t in range(len(labels))]
    return inputs, labels, mask


@dataclass
class PairBatch:
    """One micro-batch: rows ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``."""

    input_ids: Tensor  # [2B, L] int64
    labels: Tensor  # [2B, L] int64 (0 where masked)
    loss_mask: Tensor  # [2B, L] bool
    position_ids: Tensor  # [2B, L] int64
    pair_valid: Tensor  # [B] bool: False for padding pairs (an incomplete last eval batch)
    index: Tensor  # [B] int64: the pair's row in its source, -1 for padding pairs
    row_lengths: Tensor  # [2B] int64: unpadded length of each row

    @property
    def num_pairs(self) -> int:
        """B, padding pairs included."""
        return self.pair_valid.numel()

    def real_tokens(self) -> int:
        """Non-padding tokens of the valid pairs (for throughput)."""
        valid_rows = torch.cat([self.pair_valid, self.pair_valid])
        return int(self.row_lengths[valid_rows].sum())

    def padded_to(self, length: int) -> "PairBatch":
        """The same batch right-padded (masked, label 0) to ``length`` columns."""
        extra = length - self.input_ids.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad a batch of length {self.input_ids.shape[1]} down to {length}")
        if extra == 0:
            return self
        pad = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
        positions = (
            torch.arange(length, device=self.position_ids.device).unsqueeze(0).expand(self.position_ids.shape[0], -1)
        )
        return PairBatch(
            input_ids=pad(self.input_ids, 0),
            labels=pad(self.labels, 0),
            loss_mask=pad(self.loss_mask, False),
            position_ids=positions.contiguous(),
            pair_valid=self.pair_valid,
            index=self.index,
            row_lengths=self.row_lengths,
        )

    def to(self, device: torch.device | str) -> "PairBatch":
        """A copy on ``device``."""
        return PairBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def collate_pairs(pairs: Sequence[Pair | None], pad_id: int, pad_to_multiple: int = 16) -> PairBatch:
    """Pad a micro-batch of pairs to its longest row rounded up to ``pad_to_multiple``.

    A ``None`` entry is a padding pair (a copy of the first real pair, marked invalid), so every
    rank can run the same number of equally sized micro-batches.
    """
    real = [p for p in pairs if p is not None]
    if not real:
        raise ValueError("a micro-batch needs at least one real pair")
    filled = [p if p is not None else real[0] for p in pairs]
    rows = [shifted_row(p["prompt_ids"], p["chosen_ids"]) for p in filled] + [
        shifted_row(p["prompt_ids"], p["rejected_ids"]) for p in filled
    ]
    length = round_up(max(len(r[0]) for r in rows), pad_to_multiple)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.zeros((n, length), dtype=torch.long)
    loss_mask = torch.zeros((n, length), dtype=torch.bool)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, (inputs, targets, mask) in enumerate(rows):
        input_ids[i, : len(inputs)] = torch.tensor(inputs)
        labels[i, : len(targets)] = torch.tensor(targets)
        loss_mask[i, : len(mask)] = torch.tensor(mask)
        lengths[i] = len(inputs)
    return PairBatch(
        input_ids=input_ids,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=torch.arange(length).unsqueeze(0).expand(n, -1).contiguous(),
        pair_valid=torch.tensor([p is not None for p in pairs]),
        index=torch.tensor([int(p["index"]) if p is not None and "index" in p else -1 for p in pairs]),
        row_lengths=lengths,
    )


# ---------------------------------------------------------------------------------------------
# Sampling
