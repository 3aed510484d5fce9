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

from dataclasses import dataclass

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
    if valid_columns < shard_size:
        work = work.clone() if work.data_ptr() == logits.data_ptr() else work
        work[..., valid_columns:] = float("-inf")
    logits_max = work.amax(dim=-1)
    if world_size > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)

    local_labels = labels - vocab_start
    in_shard = (local_labels >= 0) & (local_labels < shard_size)
    local_labels = torch.where(in_shard, local_labels, torch.zeros_like(local_labels))
    label_logit = work.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1)
    label_logit = torch.where(in_shard, label_logit - logits_max, torch.zeros_like(label_logit))

    sum_exp = torch.exp(work - logits_max.unsqueeze(-1)).sum(dim=-1)
    del work
    if world_size > 1:
        # One collective for both: stack, reduce, split.
        packed = torch.stack([sum_exp, label_logit])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        sum_exp, label_logit = packed[0], packed[1]
    return label_logit - torch.log(sum_exp), logits_max + torch.log(sum_exp), local_labels, in_shard, valid_columns


def _logits_grad(
    logits: Tensor, log_normaliser: Tensor, local_labels: Tensor, in_shard: Tensor, valid_columns: int, grad_output: Tensor
) -> Tensor:
    """d sum(g * log p(label)) / d logits on a shard: g * (onehot - softmax); no communication."""
    grad = torch.exp(logits.to(log_normaliser.dtype) - log_normaliser.unsqueeze(-1))
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
    """log p(label) of ``hidden @ weight_shard.T`` computed ``chunk`` tokens at a time.

    Neither the forward nor the backward ever holds more than ``[chunk, V / tp]`` logits: the
    backward recomputes each chunk's logits from the saved hidden states and weight.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, group, vocab_size: int | None, chunk: int) -> Tensor:  # type: ignore[override]
        ctx.input_dtype = hidden.dtype
        hidden = hidden.to(weight.dtype)
        logp = torch.empty(labels.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=labels.device)
        lse = torch.empty_like(logp)
        for start in range(0, labels.numel(), chunk):
            part = slice(start, start + chunk)
            logits = hidden[part] @ weight.t()
            logp[part], lse[part], _, _, valid = _label_logprobs_and_lse(logits, labels[part], group, vocab_size)
        ctx.group, ctx.vocab_size, ctx.chunk, ctx.valid_columns = group, vocab_size, chunk, valid
        ctx.save_for_backward(hidden, weight, labels, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        hidden, weight, labels, lse = ctx.saved_tensors
        world_size, rank = _group_size_and_rank(ctx.group)
        shard_size = weight.size(0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        for start in range(0, labels.numel(), ctx.chunk):
            part = slice(start, start + ctx.chunk)
            logits = hidden[part] @ weight.t()
            local = labels[part] - rank * shard_size
            in_shard = (local >= 0) & (local < shard_size)
            local = torch.where(in_shard, local, torch.zeros_like(local))
            grad_logits = _logits_grad(logits, lse[part], local, in_shard, ctx.valid_columns, grad_output[part])
            grad_hidden[part] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_weight += grad_logits.t().to(grad_weight.dtype) @ hidden[part].to(grad_weight.dtype)
        return grad_hidden.to(ctx.input_dtype), grad_weight.to(weight.dtype), None, None, None, None


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
    """Log-prob (fp32, or fp64 for fp64 logits) of each label under vocab-parallel logits ``[..., V / tp]`` (no vocab gather).

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


@dataclass
class SequenceLogProbs:
    """Masked per-sequence log-prob sums and the number of tokens each sum covers."""

    sum: Tensor
    tokens: Tensor

    @property
    def mean(self) -> Tensor:
        """Per-token average; 0 for a sequence with no unmasked token."""
        return self.sum / self.tokens.clamp(min=1).to(self.sum.dtype)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> SequenceLogProbs:
    """Sum over the last label dim of ``log p(label)`` where ``loss_mask`` is set (fp32)."""
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the labels' shape {tuple(labels.shape)}")
    mask = loss_mask.bool()
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    per_token = token_logprobs(logits, safe_labels, group, vocab_size)
    return SequenceLogProbs(
        sum=(per_token * mask).sum(dim=-1),
        tokens=mask.sum(dim=-1),
    )
