"""Forward-only scoring of whole data sets: per-pair summed completion log-probs, gathered over
data-parallel ranks. Used for reference log-probs, evaluation and tools/score_pairs.py.

Only the last pipeline stage sees log-probs; a :class:`PairLogProbs` there holds every pair's values.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from mmpo_megatron.data.collate import collate_pairs
from mmpo_megatron.data.packing import pack_rows
from mmpo_megatron.data.sampling import eval_microbatches
from mmpo_megatron.model.schedule import ForwardPlan, MicroBatch, microbatch_multiple, score_microbatches
from mmpo_megatron.pair_logprobs import PairLogProbs


def microbatches_for(
    pairs, positions: Sequence[int | None], pad_id: int, pad_to_multiple: int, device, vocab_size: int,
    pack_length: int | None = None,
) -> MicroBatch:
    """A MicroBatch of dataset positions (None = padding pair, only at the end); ``batch.index``
    holds the positions. With ``pack_length`` the real pairs are also packed into rows."""
    if all(p is None for p in positions):
        # All padding (a data set's tail split over DP ranks, or an interleaved pipeline's group of
        # PP filled up): pair 0 stands in, marked invalid, so the shapes stay those of real pairs.
        micro = microbatches_for(pairs, [0, *positions[1:]], pad_id, pad_to_multiple, device, vocab_size, pack_length)
        micro.batch.pair_valid.fill_(False)
        micro.batch.index.fill_(-1)
        return micro
    rows = [None if p is None else {**pairs[int(p)], "index": int(p)} for p in positions]
    micro = MicroBatch(collate_pairs(rows, pad_id, pad_to_multiple).to(device), vocab_size=vocab_size)
    if pack_length:
        micro.packed = pack_rows([r for r in rows if r is not None], pack_length, pad_id, pad_to_multiple).to(device)
    return micro


def score_dataset(
    chunks: Sequence[torch.nn.Module], pairs, micro_batch_size: int, pad_id: int, pad_to_multiple: int, device,
    vocab_size: int, forward_plan: ForwardPlan, *, limit: int | None = None, progress: bool = False,
    pack_length: int | None = None,
) -> PairLogProbs | None:
    """Forward-only scores of every pair (or the first ``limit``); a PairLogProbs on last-stage ranks."""
    from megatron.core import parallel_state as ps

    count = len(pairs) if limit is None else min(limit, len(pairs))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    slots = eval_microbatches(count, micro_batch_size, dp_rank, dp_size)
    multiple = microbatch_multiple(chunks)
    slots += [[None] * micro_batch_size] * (-len(slots) % multiple)  # padding pairs, scored and dropped
    micro = [microbatches_for(pairs, s, pad_id, pad_to_multiple, device, vocab_size, pack_length) for s in slots]
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    results = []
    # Bounded memory per schedule call: score in rounds of up to 64 micro-batches (a multiple of
    # what the schedule needs).
    per_round = max(multiple, 64 - 64 % multiple)
    rounds = range(0, len(micro), per_round)
    if progress and dist.get_rank() == 0:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="scoring", unit="round")
    for start in rounds:
        results.extend(score_microbatches(chunks, micro[start : start + per_round], forward_plan))
    for chunk, training in zip(chunks, was_training):
        chunk.train(training)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = [(index.cpu(), logps.to("cpu")) for index, logps in results]
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group(with_context_parallel=False))
    scores = PairLogProbs.zeros(count)
    for rank_results in gathered:
        for index, logps in rank_results:
            scores.put(index, logps)
    return scores
