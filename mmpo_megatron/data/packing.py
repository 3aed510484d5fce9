"""Packing pairs into rows of up to ``pack_length`` tokens (chosen and rejected of a pair in one
row): first-fit-decreasing bins, per-sequence positions and segment ids, ``cu_seqlens`` of the
rows laid end to end for THD attention, the block-diagonal causal mask, and per-sequence sums of
token values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mmpo_megatron.data.collate import Pair, pair_tokens, round_up, shifted_row


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
    sequences: list[tuple[int, int, str]]  # per sequence in row order: (row, pair position, "chosen"/"rejected")

    def padded_to(self, rows: int, length: int) -> "PackedBatch":
        """The same packing with empty rows / columns appended (pipeline p2p needs one shape)."""
        extra_rows, extra_cols = rows - self.input_ids.shape[0], length - self.input_ids.shape[1]
        if extra_rows < 0 or extra_cols < 0:
            raise ValueError(f"cannot shrink a packed batch of {tuple(self.input_ids.shape)} to {(rows, length)}")
        pad = lambda t, v: torch.nn.functional.pad(t, (0, extra_cols, 0, extra_rows), value=v)  # noqa: E731
        return PackedBatch(pad(self.input_ids, 0), pad(self.labels, 0), pad(self.loss_mask, False),
                           pad(self.position_ids, 0), pad(self.segment_ids, -1), pad(self.sequence_ids, -1),
                           self.sequence_pair, self.sequence_is_chosen, self.sequences)

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy on ``device`` (the sequence list stays as it is)."""
        tensors = [
            t.to(device)
            for t in (
                self.input_ids,
                self.labels,
                self.loss_mask,
                self.position_ids,
                self.segment_ids,
                self.sequence_ids,
                self.sequence_pair,
                self.sequence_is_chosen,
            )
        ]
        return PackedBatch(*tensors, self.sequences)

    def thd_cu_seqlens(self) -> tuple[Tensor, int]:
        """int32 boundaries of every sequence with the rows laid end to end ([1, R * L] tokens, THD
        attention), and the longest sequence. A row's padding tail, or an empty row, is a sequence
        of its own: THD attention then covers every token and no real token attends to padding."""
        segments = self.segment_ids
        starts = torch.ones_like(segments, dtype=torch.bool)  # column 0: every row starts a sequence
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        bounds = torch.nonzero(starts.reshape(-1)).reshape(-1)
        cu_seqlens = torch.cat([bounds, bounds.new_tensor([segments.numel()])]).to(torch.int32)
        return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


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
    """Rows of packed sequences with per-sequence positions and segment ids."""
    n = len(bins)
    input_ids = torch.full((n, row_length), pad_id, dtype=torch.long)
    labels = torch.zeros((n, row_length), dtype=torch.long)
    loss_mask = torch.zeros((n, row_length), dtype=torch.bool)
    position_ids = torch.zeros((n, row_length), dtype=torch.long)
    segment_ids = torch.full((n, row_length), -1, dtype=torch.long)
    sequence_ids = torch.full((n, row_length), -1, dtype=torch.long)
    sequences = []
    for r, members in enumerate(bins):
        offset = 0
        seg = 0
        for pos in members:
            for side in ("chosen", "rejected"):
                inputs, targets, mask = shifted_row(pairs[pos]["prompt_ids"], pairs[pos][f"{side}_ids"])
                end = offset + len(inputs)
                input_ids[r, offset:end] = torch.tensor(inputs)
                labels[r, offset:end] = torch.tensor(targets)
                loss_mask[r, offset:end] = torch.tensor(mask)
                position_ids[r, offset:end] = torch.arange(len(inputs))
                segment_ids[r, offset:end] = seg
                sequence_ids[r, offset:end] = len(sequences)
                sequences.append((r, pos, side))
                offset = end
                seg = seg + 1
    return PackedBatch(
        input_ids, labels, loss_mask, position_ids, segment_ids, sequence_ids,
        torch.tensor([pos for _, pos, _ in sequences], dtype=torch.long),
        torch.tensor([side == "chosen" for _, _, side in sequences]),
        sequences,
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
