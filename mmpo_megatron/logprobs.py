"""Per-token and per-sequence log-probs of labels from vocab-parallel logits.

Each tensor-parallel rank holds a contiguous shard ``[..., V / tp]`` of the logits. The log-prob
of a label is ``logit[label] - logsumexp(logits)``: the shard maxima, the shard sums of
``exp`` and the label's logit (held by exactly one rank) are combined with three all-reduces of
``[...]``-sized tensors, so the full vocabulary is never gathered. Arithmetic is in fp32 (fp64 for
fp64 logits) whatever the logits' dtype, the caller's logits are never written to (megatron's own
``vocab_parallel_cross_entropy`` overwrites fp32 input in place), and the backward recomputes the
softmax from the saved logits instead of keeping an fp32 ``[..., V / tp]`` copy alive.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _tp_group_or_none() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _group_size_and_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _label_logprobs_and_lse(
    logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None, vocab_size: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """No-grad forward on a vocab shard: (log p(label), logsumexp, local labels, in-shard mask, valid columns)."""
    world_size, rank = _group_size_and_rank(group)
    shard_size = logits.size(-1)
    vocab_start = rank * shard_size
    # Columns past the true vocabulary (padding for TP / GEMM alignment) are not tokens.
    valid_columns = shard_size if vocab_size is None else max(0, min(shard_size, vocab_size - vocab_start))

    # At least fp32 whatever the logits' dtype (bf16 sums over a 128k vocab lose digits).
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    work = logits.detach().to(compute_dtype)
    # Our own copy (bf16 input, or padding to mask) may be overwritten; the caller's logits never are.
    owned = work.data_ptr() != logits.data_ptr()
    if valid_columns < shard_size:
        work = work if owned else work.clone()
        owned = True
        work[..., valid_columns:] = float("-inf")
    logits_max = work.amax(dim=-1)
    if world_size > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)

    local_labels = labels - vocab_start
    in_shard = (local_labels >= 0) & (local_labels < shard_size)
    local_labels = torch.where(in_shard, local_labels, torch.zeros_like(local_labels))
    label_logit = work.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1)
    label_logit = torch.where(in_shard, label_logit - logits_max, torch.zeros_like(label_logit))

    # In place where the buffer is ours: one [..., V / tp] fp32 temporary at most, not two.
    shifted = work.sub_(logits_max.unsqueeze(-1)) if owned else work - logits_max.unsqueeze(-1)
    del work
    sum_exp = shifted.exp_().sum(dim=-1)
    del shifted
    if world_size > 1:
        # One collective for both: stack, reduce, split.
        packed = torch.stack([sum_exp, label_logit])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        sum_exp, label_logit = packed[0], packed[1]
    return label_logit - torch.log(sum_exp), logits_max + torch.log(sum_exp), local_labels, in_shard, valid_columns


def _logits_grad(
    logits: Tensor,
    log_normaliser: Tensor,
    local_labels: Tensor,
    in_shard: Tensor,
    valid_columns: int,
    grad_output: Tensor,
) -> Tensor:
    """d sum(g * log p(label)) / d logits on a shard: g * (onehot - softmax); no communication."""
    # softmax = exp(logits - logsumexp), built in the one buffer that becomes the gradient.
    grad = logits.to(log_normaliser.dtype, copy=True).sub_(log_normaliser.unsqueeze(-1)).exp_()
    grad[..., valid_columns:] = 0.0
    grad.mul_(-grad_output.unsqueeze(-1))
    grad.scatter_add_(-1, local_labels.unsqueeze(-1), (grad_output * in_shard).unsqueeze(-1))
    return grad


class _VocabParallelLabelLogProbs(torch.autograd.Function):
    """log p(label) from a vocab shard; the backward needs no communication."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None, vocab_size: int | None) -> Tensor:  # type: ignore[override]
        logp, lse, local_labels, in_shard, valid_columns = _label_logprobs_and_lse(logits, labels, group, vocab_size)
        ctx.valid_columns = valid_columns
        ctx.save_for_backward(logits, local_labels, in_shard, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        logits, local_labels, in_shard, lse = ctx.saved_tensors
        grad = _logits_grad(logits, lse, local_labels, in_shard, ctx.valid_columns, grad_output)
        return grad.to(logits.dtype), None, None, None


class _ChunkedOutputLayerLogProbs(torch.autograd.Function):
    """log p(label) of ``hidden @ weight_shard.T`` without ever holding the [tokens, V / tp] logits.

    The forward walks ``chunk`` tokens at a time over the whole vocab shard (each token's
    logsumexp needs every column). The backward, given those saved logsumexps, walks blocks of
    vocabulary columns over all tokens instead, with the same [tokens x columns] budget: each
    block's softmax is recomputed, and its slice of the weight gradient comes from one GEMM over
    all tokens, rounded once, so no [V / tp, h] fp32 accumulator is needed; the [tokens, h] input
    gradient is the cheap one to accumulate in fp32.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, labels: Tensor, group, vocab_size: int | None, chunk: int
    ) -> Tensor:  # type: ignore[override]
        ctx.input_dtype = hidden.dtype
        hidden = hidden.to(weight.dtype)
        logp = torch.empty(labels.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=labels.device)
        lse = torch.empty_like(logp)
        valid = weight.size(0)
        for start in range(0, labels.numel(), chunk):
            part = slice(start, start + chunk)
            logits = hidden[part] @ weight.t()
            logp[part], lse[part], _, _, valid = _label_logprobs_and_lse(logits, labels[part], group, vocab_size)
            del logits  # before the next chunk's GEMM allocates
        ctx.group = group
        ctx.chunk = chunk
        ctx.valid_columns = valid
        ctx.save_for_backward(hidden, weight, labels, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        hidden, weight, labels, lse = ctx.saved_tensors
        _, rank = _group_size_and_rank(ctx.group)
        shard_size, tokens = weight.size(0), labels.numel()
        local_labels = labels - rank * shard_size
        block = max(1, min(shard_size, ctx.chunk * shard_size // max(tokens, 1)))
        grad_hidden = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device)
        grad_weight = torch.empty_like(weight)
        for first in range(0, shard_size, block):
            columns = slice(first, min(first + block, shard_size))
            in_block = (local_labels >= columns.start) & (local_labels < columns.stop)
            block_labels = torch.where(in_block, local_labels - first, torch.zeros_like(local_labels))
            logits = hidden @ weight[columns].t()
            grad_logits = _logits_grad(
                logits, lse, block_labels, in_block, max(0, ctx.valid_columns - first), grad_output
            )
            del logits
            grad_logits = grad_logits.to(weight.dtype)  # GEMMs in the weight's dtype, as megatron's linear backward
            grad_weight[columns] = grad_logits.t() @ hidden
            grad_hidden += grad_logits @ weight[columns]
            del grad_logits
        return grad_hidden.to(ctx.input_dtype), grad_weight, None, None, None, None


def output_layer_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk: int = 1024,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Label log-probs of the (vocab-parallel) output layer ``hidden @ weight.T`` without materialising
    the logits: ``hidden [..., h]`` (replicated over TP), ``weight [V / tp, h]``, ``labels [...]``.

    The input gradient is summed over the TP group (megatron's copy-to-TP-region backward).
    """
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    if group is None:
        group = _tp_group_or_none()
    if group is not None and dist.get_world_size(group) > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    flat = _ChunkedOutputLayerLogProbs.apply(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1).long(),
                                             group, vocab_size, chunk)
    return flat.reshape(labels.shape)


def token_logprobs(
    logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None = None, vocab_size: int | None = None
) -> Tensor:
    """Log-prob (fp32; fp64 for fp64 logits) of each label under vocab-parallel logits ``[..., V / tp]``, no gather.

    ``group`` defaults to megatron's tensor-parallel group when parallel_state is initialised.
    ``vocab_size`` (the unpadded vocabulary) excludes padding columns from the softmax, so the
    result does not depend on how far the vocabulary was padded.
    Labels outside ``[0, V)`` (e.g. -100 padding) must be masked by the caller: they get a
    log-prob as if they were token 0 on no rank, i.e. ``-logsumexp``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on leading dims")
    if group is None:
        group = _tp_group_or_none()
    return _VocabParallelLabelLogProbs.apply(logits, labels.long(), group, vocab_size)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Per sequence, the sum over the last label dim of ``log p(label)`` where ``loss_mask`` is set
    (fp32); the token count of each sum is ``loss_mask.sum(-1)``."""
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the labels' shape {tuple(labels.shape)}")
    mask = loss_mask.bool()
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    per_token = token_logprobs(logits, safe_labels, group, vocab_size)
    return (per_token * mask).sum(dim=-1)
