"""One pass of megatron's pipeline schedules over a step's micro-batches: the policy training
step (loss on the last stage) and forward-only log-prob scoring (reference, evaluation).

Loss normalisation: megatron runs with ``calculate_per_token_loss``, our loss function returns
the *sum* of per-pair losses and the number of valid pairs, and megatron's
``finalize_model_grads`` divides the gradients by the global pair count (summed over micro-batches
and DP ranks). So the update is the exact mean over the global batch whatever the DP x micro-batch
layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mmpo_megatron.config import ModelConfig
from mmpo_megatron.data.collate import PairBatch
from mmpo_megatron.data.packing import PackedBatch, packed_sequence_sums
from mmpo_megatron.logprobs import output_layer_logprobs, token_logprobs
from mmpo_megatron.model.builder import (
    output_weight,
    packed_attention_kind,
    packed_attention_mask,
    thd_packed_seq_params,
    unwrap,
)
from mmpo_megatron.model.objective import Objective
from mmpo_megatron.pair_logprobs import PairLogProbs
from mmpo_megatron.parallel.batch_stats import MAX_PREFIX


@dataclass(frozen=True)
class ForwardPlan:
    """What the schedule's forward must know of a model beyond its modules, both read off its
    ModelConfig (``of``): where the output layer runs, and the form packed rows take in attention."""

    fused_chunk: int = 0
    """> 0: the output layer is applied inside the log-probs, that many tokens at a time (the
    chunks' output layer passes hidden states through); 0: the chunks output logits."""

    packed_attention: str = "dense"
    """``thd`` (rows laid end to end with cu_seqlens, transformer_engine), ``flex`` (a
    flex_attention block mask, local_sdpa) or ``dense``: what the layer spec's attention takes."""

    @classmethod
    def of(cls, model: "ModelConfig") -> "ForwardPlan":
        """What a model config asks for: ``model.fused_logprob_chunk`` and its layer spec's mask."""
        return cls(fused_chunk=model.fused_logprob_chunk, packed_attention=packed_attention_kind(model))


@dataclass
class MicroBatch:
    """A micro-batch of pairs and what the loss needs besides the tokens."""

    batch: PairBatch
    vocab_size: int | None = None  # the unpadded vocabulary: padding columns are not tokens
    packed: PackedBatch | None = None  # the same pairs packed into rows; the forward uses it when set
    ref_chosen: Tensor | None = None  # [B] summed reference log-probs
    ref_rejected: Tensor | None = None
    norm_min: Tensor | None = None  # MMPO normalisation statistics of this micro-batch
    norm_max: Tensor | None = None

    def set_reference(self, reference: PairLogProbs) -> None:
        """Take ``reference``'s summed log-probs (of these pairs, in order) as the reference values."""
        self.ref_chosen, self.ref_rejected = reference.chosen, reference.rejected


def _forward(model: torch.nn.Module, micro: MicroBatch, packed_attention: str) -> Tensor:
    if micro.packed is None:
        # attention_mask=None: causal attention; right padding never leaks into real tokens.
        return model(micro.batch.input_ids, micro.batch.position_ids, None)
    packed = micro.packed
    if packed_attention != "thd":
        return model(packed.input_ids, packed.position_ids, packed_attention_mask(packed_attention, packed.segment_ids))
    rows, length = packed.input_ids.shape
    output = model(packed.input_ids.reshape(1, -1), packed.position_ids.reshape(1, -1), None,
                   packed_seq_params=thd_packed_seq_params(packed))
    # The last stage's [1, rows * length, ...] is per token: back to rows for the log-probs. Other
    # stages return the activation the pipeline sends on, in its own shape.
    return output.reshape(rows, length, -1) if unwrap(model).post_process else output


def pair_logps(output: Tensor, micro: MicroBatch, head: tuple[Tensor, int] | None = None) -> PairLogProbs:
    """Each pair's summed completion log-probs and token counts, with the micro-batch's reference sums.

    ``output`` is vocab-parallel logits, or hidden states when ``head`` (output weight, chunk)
    says the output layer is applied here, fused with the log-probs. Rows are the padded pairs,
    or the packed rows when the micro-batch is packed.
    """
    rows = micro.packed if micro.packed is not None else micro.batch
    mask = rows.loss_mask
    labels = torch.where(mask, rows.labels, torch.zeros_like(rows.labels))
    if head is None:
        per_token = token_logprobs(output, labels, vocab_size=micro.vocab_size)
    else:
        # The output layer runs on completion tokens only: prompt and padding positions (a third or
        # more of the tokens on preference data, README.md "Memory-lean log-probs") never reach it.
        weight, chunk = head
        scored = output_layer_logprobs(output[mask], weight, labels[mask], chunk=chunk, vocab_size=micro.vocab_size)
        per_token = torch.zeros(mask.shape, dtype=scored.dtype, device=scored.device).masked_scatter(mask, scored)
    pairs = micro.batch.num_pairs
    if micro.packed is None:
        sums, tokens = (per_token * mask).sum(-1), mask.sum(-1)
        return PairLogProbs(
            sums[:pairs], sums[pairs:], tokens[:pairs], tokens[pairs:], micro.ref_chosen, micro.ref_rejected
        )
    packed = micro.packed
    sums = packed_sequence_sums(per_token, packed)
    tokens = packed_sequence_sums(mask.long(), packed)

    def by_pair(values: Tensor, chosen: bool) -> Tensor:
        side = packed.sequence_is_chosen if chosen else ~packed.sequence_is_chosen
        return values.new_zeros(pairs).index_add(0, packed.sequence_pair[side], values[side])

    return PairLogProbs(by_pair(sums, True), by_pair(sums, False), by_pair(tokens, True), by_pair(tokens, False),
                        micro.ref_chosen, micro.ref_rejected)


def _loss_func(objective: Objective, micro: MicroBatch, head, logits: Tensor):
    logps = pair_logps(logits, micro, head)
    valid = micro.batch.pair_valid
    loss, metrics = objective.per_pair_loss(logps, micro)
    loss_sum = (loss * valid).sum()
    with torch.no_grad():
        sums = {name: (value.double() * valid).sum() for name, value in metrics.items()}
        sums["loss"] = (loss.detach().double() * valid).sum()
        sums["nll/chosen_per_token"] = (logps.detach().chosen_nll_per_token().double() * valid).sum()
        sums["pairs"] = valid.sum().double()
        sums["tokens"] = torch.tensor(float(micro.batch.real_tokens()), dtype=torch.float64)
        rows = micro.packed.input_ids if micro.packed is not None else micro.batch.input_ids
        sums["row_tokens"] = torch.tensor(float(rows.numel()), dtype=torch.float64)
        if micro.ref_chosen is not None:
            diff = torch.cat([(logps.chosen.detach() - micro.ref_chosen).abs()[valid],
                              (logps.rejected.detach() - micro.ref_rejected).abs()[valid]])
            sums[MAX_PREFIX + "policy_ref_logp_diff"] = (
                diff.max().double() if diff.numel() else torch.zeros((), dtype=torch.float64)
            )
    return loss_sum, valid.sum().to(torch.int), sums


def _score_func(store: list, micro: MicroBatch, head, logits: Tensor):
    store.append((micro.batch.index.clone(), pair_logps(logits, micro, head).detach().with_reference(None)))
    return logits.new_zeros(()), torch.zeros((), dtype=torch.int), {}


def _run_schedule(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    make_loss: Callable[[MicroBatch, Any], Callable],
    forward_plan: ForwardPlan,
    *,
    forward_only: bool,
) -> list:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    packed = micro_batches[0].packed is not None
    longest = max(int((m.packed.input_ids if packed else m.batch.input_ids).shape[1]) for m in micro_batches)
    num_rows = max(int((m.packed.input_ids if packed else m.batch.input_ids).shape[0]) for m in micro_batches)
    if ps.get_pipeline_model_parallel_world_size() > 1 and not unwrap(model_chunks[0]).config.variable_seq_lengths:
        # The interleaved schedule's p2p buffers have one shape per call (builder: variable_seq_lengths).
        if packed:
            micro_batches = [replace(m, packed=m.packed.padded_to(num_rows, longest)) for m in micro_batches]
        else:
            micro_batches = [replace(m, batch=m.batch.padded_to(longest)) for m in micro_batches]

    thd = packed and forward_plan.packed_attention == "thd"  # one [1, rows * length] sequence per micro-batch

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        # Only a last-stage chunk holds the output layer (and, fused, applies it in the log-probs).
        fused = forward_plan.fused_chunk and unwrap(model).post_process
        head = (output_weight(model), forward_plan.fused_chunk) if fused else None
        return _forward(model, micro, forward_plan.packed_attention), make_loss(micro, head)

    # Interleaved schedules want one iterator per virtual stage; each walks the same micro-batches.
    iterators = [iter(micro_batches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=list(model_chunks) if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=num_rows * longest if thd else longest,
        micro_batch_size=1 if thd else num_rows,
        forward_only=forward_only,
    )


def microbatch_multiple(model_chunks: Sequence[torch.nn.Module]) -> int:
    """How many micro-batches one schedule call must be a multiple of: megatron's interleaved
    schedule (several chunks per rank) runs them in groups of PP; the others take any number."""
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if len(model_chunks) > 1 else 1


def train_microbatches(
    model_chunks: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch], objective: Objective,
    forward_plan: ForwardPlan, *, forward_only: bool = False,
) -> list[dict[str, Tensor]]:
    """Forward (and, unless ``forward_only``, backward) of one step's micro-batches under the
    objective; returns each micro-batch's metric sums (last stage)."""
    return _run_schedule(model_chunks, micro_batches, lambda m, h: partial(_loss_func, objective, m, h), forward_plan,
                         forward_only=forward_only)


def score_microbatches(
    model_chunks: Sequence[torch.nn.Module], micro_batches: Sequence[MicroBatch], forward_plan: ForwardPlan
) -> list[tuple[Tensor, PairLogProbs]]:
    """Forward-only per-pair log-probs: (data-set positions, PairLogProbs) per micro-batch on the
    last pipeline stage, nothing elsewhere."""
    store: list = []
    training = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()  # scoring is deterministic: no dropout (LoRA's), whoever calls it
    try:
        with torch.no_grad():
            _run_schedule(model_chunks, micro_batches, lambda m, h: partial(_score_func, store, m, h), forward_plan,
                          forward_only=True)
    finally:
        for chunk, mode in zip(model_chunks, training):
            chunk.train(mode)
    return store
