"""Pairs to tensors: padded micro-batches, the resumable data-parallel sampler, and packing.

A micro-batch of B pairs has 2B rows: chosen completions first (rows 0..B-1), then the rejected
ones (rows B..2B-1), so a pair never straddles micro-batches or ranks. Each row is
``prompt + completion`` shifted by one: ``input_ids = seq[:-1]``, ``labels = seq[1:]``, and
``loss_mask`` is set exactly where the label is a completion token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

Pair = Mapping[str, Sequence[int]]


def pair_tokens(pair: Pair) -> int:
    """Tokens a pair's two rows feed the model (each row is its sequence minus the last token)."""
    return len(pair["prompt_ids"]) * 2 + len(pair["chosen_ids"]) + len(pair["rejected_ids"]) - 2


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def _row(prompt: Sequence[int], completion: Sequence[int]) -> tuple[list[int], list[int], list[bool]]:
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
        positions = torch.arange(length, device=self.position_ids.device).unsqueeze(0).expand(self.position_ids.shape[0], -1)
        return PairBatch(
            input_ids=pad(self.input_ids, 0), labels=pad(self.labels, 0), loss_mask=pad(self.loss_mask, False),
            position_ids=positions.contiguous(), pair_valid=self.pair_valid, index=self.index, row_lengths=self.row_lengths,
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
    rows = [_row(p["prompt_ids"], p["chosen_ids"]) for p in filled] + [
        _row(p["prompt_ids"], p["rejected_ids"]) for p in filled
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


class PairSampler:
    """Deterministic, resumable order of training pairs, sharded over data-parallel ranks.

    Each step's global batch is the same whatever the DP size; each epoch is a fresh permutation
    seeded by ``seed + epoch``; the trailing incomplete global batch of an epoch is dropped.
    ``consumed_samples`` (a multiple of the global batch, checkpointed by the trainer) resumes
    exactly where a run stopped, also under a different DP size.
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
        consumed_samples: int = 0,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by micro batch {micro_batch_size} x DP {dp_size}"
            )
        if num_pairs < global_batch_size:
            raise ValueError(f"{num_pairs} pairs cannot fill one global batch of {global_batch_size}")
        if consumed_samples % global_batch_size != 0:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of the global batch {global_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.num_pairs, self.global_batch_size, self.micro_batch_size = num_pairs, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.consumed_samples = consumed_samples
        self.lengths = lengths
        self.steps_per_epoch = num_pairs // global_batch_size

    @property
    def microbatches_per_step(self) -> int:
        """Micro-batches each rank runs per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.consumed_samples // (self.steps_per_epoch * self.global_batch_size)

    def _global_batch(self, epoch: int, step_in_epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.num_pairs, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_pairs)
        start = step_in_epoch * self.global_batch_size
        return order[start : start + self.global_batch_size].tolist()

    def step_microbatches(self, consumed_samples: int) -> list[list[int]]:
        """This rank's micro-batches (lists of pair indices) for the step after ``consumed_samples``."""
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

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            micro = self.step_microbatches(self.consumed_samples)
            self.consumed_samples += self.global_batch_size
            yield micro


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


@dataclass
class PackedBatch:
    """Pairs packed into fixed-length rows; each pair's chosen and rejected share a row."""

    input_ids: Tensor  # [R, row_length]
    labels: Tensor  # [R, row_length]
    loss_mask: Tensor  # [R, row_length] bool
    position_ids: Tensor  # [R, row_length], restarting at 0 for every sequence
    segment_ids: Tensor  # [R, row_length]: sequence number within the row, -1 for padding
    sequence_ids: Tensor  # [R, row_length]: index into ``sequences``, -1 for padding
    sequence_pair: Tensor  # [S]: the pair position of each sequence
    sequence_is_chosen: Tensor  # [S] bool
    cu_seqlens: list[Tensor]  # per row, [num_sequences + 1] boundaries (THD attention)
    sequences: list[tuple[int, int, str]]  # per sequence in row order: (row, pair position, "chosen"/"rejected")

    def padded_to(self, rows: int, length: int) -> "PackedBatch":
        """The same packing with empty rows / columns appended (pipeline p2p needs one shape)."""
        extra_rows, extra_cols = rows - self.input_ids.shape[0], length - self.input_ids.shape[1]
        if extra_rows < 0 or extra_cols < 0:
            raise ValueError(f"cannot shrink a packed batch of {tuple(self.input_ids.shape)} to {(rows, length)}")
        pad = lambda t, v: torch.nn.functional.pad(t, (0, extra_cols, 0, extra_rows), value=v)  # noqa: E731
        return PackedBatch(pad(self.input_ids, 0), pad(self.labels, 0), pad(self.loss_mask, False),
                           pad(self.position_ids, 0), pad(self.segment_ids, -1), pad(self.sequence_ids, -1),
                           self.sequence_pair, self.sequence_is_chosen, self.cu_seqlens, self.sequences)

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy on ``device`` (cu_seqlens and the sequence list stay where they are)."""
        tensors = [t.to(device) for t in (self.input_ids, self.labels, self.loss_mask, self.position_ids,
                                          self.segment_ids, self.sequence_ids, self.sequence_pair, self.sequence_is_chosen)]
        return PackedBatch(*tensors, self.cu_seqlens, self.sequences)


def pack_pairs(pairs: Sequence[Pair], row_length: int) -> list[list[int]]:
    """First-fit-decreasing bins of pair positions whose chosen+rejected rows fit ``row_length``."""
    sizes = []
    for i, p in enumerate(pairs):
        size = pair_tokens(p)
        if size > row_length:
            raise ValueError(f"pair {i} needs {size} tokens, more than the packed row length {row_length}")
        sizes.append(size)
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(pairs)), key=lambda k: -sizes[k]):
        for b, room in enumerate(free):
            if sizes[i] <= room:
                bins[b].append(i)
                free[b] -= sizes[i]
                break
        else:
            bins.append([i])
            free.append(row_length - sizes[i])
    return bins


def collate_packed(pairs: Sequence[Pair], bins: Sequence[Sequence[int]], row_length: int, pad_id: int) -> PackedBatch:
    """Rows of packed sequences with per-sequence positions, segment ids and cu_seqlens."""
    n = len(bins)
    input_ids = torch.full((n, row_length), pad_id, dtype=torch.long)
    labels = torch.zeros((n, row_length), dtype=torch.long)
    loss_mask = torch.zeros((n, row_length), dtype=torch.bool)
    position_ids = torch.zeros((n, row_length), dtype=torch.long)
    segment_ids = torch.full((n, row_length), -1, dtype=torch.long)
    sequence_ids = torch.full((n, row_length), -1, dtype=torch.long)
    cu_seqlens, sequences = [], []
    for r, members in enumerate(bins):
        offset, bounds, seg = 0, [0], 0
        for pos in members:
            for side in ("chosen", "rejected"):
                inputs, targets, mask = _row(pairs[pos]["prompt_ids"], pairs[pos][f"{side}_ids"])
                end = offset + len(inputs)
                input_ids[r, offset:end] = torch.tensor(inputs)
                labels[r, offset:end] = torch.tensor(targets)
                loss_mask[r, offset:end] = torch.tensor(mask)
                position_ids[r, offset:end] = torch.arange(len(inputs))
                segment_ids[r, offset:end] = seg
                sequence_ids[r, offset:end] = len(sequences)
                sequences.append((r, pos, side))
                offset, seg = end, seg + 1
                bounds.append(offset)
        cu_seqlens.append(torch.tensor(bounds, dtype=torch.int32))
    return PackedBatch(
        input_ids, labels, loss_mask, position_ids, segment_ids, sequence_ids,
        torch.tensor([pos for _, pos, _ in sequences], dtype=torch.long),
        torch.tensor([side == "chosen" for _, _, side in sequences]),
        cu_seqlens, sequences,
    )


def pack_rows(pairs: Sequence[Pair], pack_length: int, pad_id: int, pad_to_multiple: int) -> PackedBatch:
    """``pairs`` packed into rows of up to ``pack_length`` tokens, each only as wide as the fullest
    row needs (rounded up to ``pad_to_multiple`` for GEMM alignment)."""
    bins = pack_pairs(pairs, pack_length)
    used = max(sum(pair_tokens(pairs[i]) for i in members) for members in bins)
    return collate_packed(pairs, bins, round_up(used, pad_to_multiple), pad_id)


def packed_causal_mask(segment_ids: Tensor) -> Tensor:
    """[R, 1, L, L] boolean mask, True = masked: causal within each sequence, nothing across."""
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    length = segment_ids.size(-1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return ~(same & causal & (segment_ids.unsqueeze(-1) >= 0)).unsqueeze(1)


def packed_sequence_sums(token_values: Tensor, packed: PackedBatch) -> Tensor:
    """Per-sequence sums of masked per-token values, in ``packed.sequences`` order (differentiable)."""
    ids = packed.sequence_ids.reshape(-1)
    keep = (ids >= 0) & packed.loss_mask.reshape(-1)
    sums = token_values.new_zeros(len(packed.sequences))
    return sums.index_add(0, ids[keep], token_values.reshape(-1)[keep])


def packing_report(pairs: Sequence[Pair], bins: Sequence[Sequence[int]], row_length: int) -> dict[str, float]:
    """Rows, sequences and fill ratio (real tokens / row capacity) of a packing."""
    tokens = sum(pair_tokens(p) for p in pairs)
    return {
        "rows": len(bins),
        "pairs": len(pairs),
        "sequences": 2 * len(pairs),
        "real_tokens": tokens,
        "fill_ratio": tokens / (len(bins) * row_length) if bins else 0.0,
    }
