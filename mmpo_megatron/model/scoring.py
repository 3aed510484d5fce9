"""Forward-only scoring of whole data sets: per-pair summed completion log-probs, gathered over
data-parallel ranks. Used for reference log-probs, evaluation and tools/score_pairs.py.

Only the last pipeline stage sees log-probs; :class:`PairScores` there holds every pair's values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mmpo_megatron.data.collate import collate_pairs
from mmpo_megatron.data.packing import pack_rows
from mmpo_megatron.data.sampling import eval_microbatches
from mmpo_megatron.model.schedule import HeadAndMask, MicroBatch, score_microbatches


@dataclass
class PairScores:
    """Per-pair summed completion log-probs and token counts, indexed by dataset position."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def take(self, positions: Sequence[int], device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) of the given positions (padding positions, -1, get 0)."""
        index = torch.tensor([max(p, 0) for p in positions])
        return self.chosen[index].to(device), self.rejected[index].to(device)

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename)."""
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(self.__dict__, tmp)
        tmp.rename(path)

    @classmethod
    def load(cls, path: Path) -> "PairScores":
        """Read a saved file."""
        return cls(**torch.load(path, weights_only=True))


def microbatches_for(
    pairs, positions: Sequence[int | None], pad_id: int, pad_to_multiple: int, device, vocab_size: int,
    pack_length: int | None = None,
) -> MicroBatch:
    """A MicroBatch of dataset positions (None = padding pair, only at the end); ``batch.index``
    holds the positions. With ``pack_length`` the real pairs are also packed into rows."""
    rows = [None if p is None else {**pairs[int(p)], "index": int(p)} for p in positions]
    micro = MicroBatch(collate_pairs(rows, pad_id, pad_to_multiple).to(device), vocab_size=vocab_size)
    if pack_length:
        micro.packed = pack_rows([r for r in rows if r is not None], pack_length, pad_id, pad_to_multiple).to(device)
    return micro


def score_dataset(
    chunks: Sequence[torch.nn.Module], pairs, micro_batch_size: int, pad_id: int, pad_to_multiple: int, device,
    vocab_size: int, head_and_mask: HeadAndMask, *, limit: int | None = None, progress: bool = False,
    pack_length: int | None = None,
) -> PairScores | None:
    """Forward-only scores of every pair (or the first ``limit``); a PairScores on last-stage ranks."""
    from megatron.core import parallel_state as ps

    count = len(pairs) if limit is None else min(limit, len(pairs))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    slots = eval_microbatches(count, micro_batch_size, dp_rank, dp_size)
    micro = [microbatches_for(pairs, s, pad_id, pad_to_multiple, device, vocab_size, pack_length) for s in slots]
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    results = []
    # Bounded memory per schedule call: score in rounds of up to 64 micro-batches.
    rounds = range(0, len(micro), 64)
    if progress and dist.get_rank() == 0:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="scoring", unit="round")
    for start in rounds:
        results.extend(score_microbatches(chunks, micro[start : start + 64], head_and_mask))
    for chunk, training in zip(chunks, was_training):
        chunk.train(training)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = [(idx.cpu(), c.cpu(), r.cpu(), ct.cpu(), rt.cpu()) for idx, c, r, ct, rt in results]
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group(with_context_parallel=False))
    scores = PairScores(*(torch.zeros(count, dtype=dt) for dt in (torch.float32, torch.float32, torch.long, torch.long)))
    for rank_results in gathered:
        for idx, c, r, ct, rt in rank_results:
            keep = idx >= 0
            scores.chosen[idx[keep]] = c[keep].float()
            scores.rejected[idx[keep]] = r[keep].float()
            scores.chosen_tokens[idx[keep]] = ct[keep]
            scores.rejected_tokens[idx[keep]] = rt[keep]
    return scores
