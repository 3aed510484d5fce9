"""megatron's local core attention with PyTorch's fused scaled_dot_product_attention inside.

The local spec's DotProductAttention runs baddbmm + an fp32 softmax + bmm and expands GQA with
repeat_interleave, which is slow on a GPU without Transformer Engine (README.md, "Layer specs",
has the measurement). This subclass keeps its constructor (and so its config checks) and replaces
only the arithmetic.

Packed rows reach it in one of two forms, and it builds their mask itself, once per forward:
as a tensor of segment ids in megatron's ``attention_mask`` slot (not a flex_attention BlockMask:
under activation recompute megatron saves the mask for backward, which only a tensor can be), or
in THD form (``PackedSeqParams`` with ``cu_seqlens``, the form Transformer Engine's attention
takes), so that path of megatron's attention (squeezed batch, per-sequence RoPE, pipeline
shapes) runs, and is tested, without TE.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mmpo_megatron.data.packing import packed_causal_mask

_compiled_flex = None
# (key of the segment ids, the segment ids, mask): every layer of a forward, and its recompute,
# shares one mask. Holding the tensor keeps its memory from being reused, so equal keys mean the
# same storage, unmodified (the version counter), without a device sync to compare contents.
_mask_cache: tuple = ()


def _flex(device_type: str):
    # flex_attention is only fast compiled (GPU); eager is a correct reference (CPU tests).
    global _compiled_flex
    if device_type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def packed_block_mask(segment_ids: torch.Tensor) -> BlockMask:
    """flex_attention block mask for packed rows: causal within a sequence, nothing across or on padding."""
    rows, length = segment_ids.shape

    def same_sequence_causal(b, h, q, k):
        return (segment_ids[b, q] == segment_ids[b, k]) & (q >= k) & (segment_ids[b, q] >= 0)

    return create_block_mask(
        same_sequence_causal, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=segment_ids.device
    )


def flex_or_dense_mask(segment_ids: torch.Tensor):
    """The packed rows' mask: a flex block mask where flex can run (GPU, or no backward needed:
    FlexAttention has no CPU backward), else the dense one."""
    if segment_ids.is_cuda or not torch.is_grad_enabled():
        return packed_block_mask(segment_ids)
    return packed_causal_mask(segment_ids)


def _cached_mask(source: torch.Tensor, form, build):
    global _mask_cache
    key = (
        source.data_ptr(),
        source.shape,
        source.stride(),
        source.device,
        source._version,
        form,
        torch.is_grad_enabled(),
    )
    if not (_mask_cache and _mask_cache[0] == key):
        _mask_cache = (key, source, build())
    return _mask_cache[2]


def segment_mask(segment_ids: torch.Tensor):
    """The packed mask (flex_or_dense_mask) of ``segment_ids`` [rows, length], built once for all
    the layers of a forward and for the recompute in its backward, not per layer."""
    return _cached_mask(segment_ids, "segments", lambda: flex_or_dense_mask(segment_ids))


def thd_attention_mask(cu_seqlens: torch.Tensor, tokens: int):
    """The packed mask of THD sequences bounded by ``cu_seqlens``, as segment_mask."""
    def build():
        positions = torch.arange(tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        return flex_or_dense_mask(torch.searchsorted(cu_seqlens[1:], positions, right=True).unsqueeze(0))  # [1, T]

    return _cached_mask(cu_seqlens, ("thd", tokens), build)


class SDPAttention(DotProductAttention):
    """DotProductAttention's interface; the math is ``F.scaled_dot_product_attention``."""

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        """[s, b, heads, d] query, [s, b, groups, d] key/value -> [s, b, heads * d]; THD packed
        sequences come as [t, heads, d] and leave as [t, 1, heads * d]."""
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support an attention bias; use TE")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise NotImplementedError(
                    f"SDPAttention reads packed sequences as thd, got {packed_seq_params.qkv_format!r}"
                )
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            attention_mask = thd_attention_mask(packed_seq_params.cu_seqlens_q, query.size(0))
        elif attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = segment_mask(attention_mask)  # packed rows' segment ids (builder.packed_attention_mask)
        seq, batch = query.size(0), query.size(1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        if isinstance(attention_mask, BlockMask):  # packed rows: only the blocks that attend are computed
            if not torch.is_grad_enabled():  # no graph is built (a recompute's first pass): CPU flex refuses
                q, k, v = q.detach(), k.detach(), v.detach()  # inputs that require grad all the same
            context = _flex(q.device.type)(q, k, v, block_mask=attention_mask, scale=self.softmax_scale, enable_gqa=gqa)
            return context.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # megatron masks are True where attention is *not* allowed; SDPA's are True where it is.
        mask = None if attention_mask is None else ~attention_mask
        is_causal = mask is None and mask_type == AttnMaskType.causal and seq > 1
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=gqa,
            )
        return context.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)
