"""The parallel runtime and CPU shim: layouts come up and down in one process, megatron's RNG
tracker and memory buffer work on CPU, and a real megatron GPTModel gives the same sequence
log-probs at TP=1 and TP=2 (ours on its vocab-parallel logits, and megatron's own CE)."""

import pytest
import torch

from mmpo_megatron.config import ConfigError, ParallelConfig
from mmpo_megatron.logprobs import sequence_logprobs
from mmpo_megatron.parallel import current_layout, destroy_parallel, initialize_parallel
from mmpo_megatron.parallel.local_ranks import run_on_ranks
from tiny_models import tiny_model

VOCAB, SEQ, BATCH = 64, 12, 3


def tiny_gpt(tp):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(7)  # use_cpu_initialization: full master weights from this seed, then split
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, tensor_model_parallel_size=tp,
                            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope")


def runtime_checks(seed):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    out = {}
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[:, :4] = False  # a 4-token prompt
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)

    for tp in (1, 2):
        layout = initialize_parallel(ParallelConfig(tensor_parallel=tp, device="cpu"))
        assert layout == current_layout("cpu")
        model = tiny_gpt(tp)
        logits = model(ids, positions, causal)  # [b, s, V/tp]
        ours = sequence_logprobs(logits, labels, mask)
        ours.sum().backward()
        megatron_ce = tiny_gpt(tp)(ids, positions, causal, labels=labels)  # per-token CE [b, s]
        out[tp] = {
            "layout": (layout.tensor_parallel, layout.data_parallel, layout.tensor_rank, layout.data_rank),
            "shard_vocab": logits.shape[-1],
            "ours": ours.detach(),
            "megatron": -(megatron_ce * mask).sum(-1).detach(),
        }
        # The word embedding is vocab-sharded: its squared grad norm summed over TP is the full one.
        grad_sq = model.embedding.word_embeddings.weight.grad.pow(2).sum()
        torch.distributed.all_reduce(grad_sq, group=ps.get_tensor_model_parallel_group())
        out[tp]["embedding_grad_norm_sq"] = grad_sq.item()
        with get_cuda_rng_tracker().fork():
            out[tp]["model_parallel_draw"] = torch.rand(4)
        with get_cuda_rng_tracker().fork("data-parallel-rng"):
            out[tp]["data_parallel_draw"] = torch.rand(4)
        buffer = ps.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "probe")
        out[tp]["buffer_device"] = str(buffer.device)
        destroy_parallel()

    with pytest.raises(ConfigError, match="not divisible by tensor_parallel x pipeline_parallel"):
        initialize_parallel(tensor_parallel=3, device="cpu")
    return out


def test_layouts_shim_and_megatron_model_logprobs():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    r0, r1 = run_on_ranks(runtime_checks, 2, seed)
    assert r0[1]["layout"] == (1, 2, 0, 0) and r1[1]["layout"] == (1, 2, 0, 1)
    assert r0[2]["layout"] == (2, 1, 0, 0) and r1[2]["layout"] == (2, 1, 1, 0)
    assert r0[2]["shard_vocab"] == VOCAB // 2 and r0[1]["shard_vocab"] == VOCAB
    for r in (r0, r1):
        for tp in (1, 2):
            # Our vocab-parallel log-probs equal megatron's own vocab-parallel CE.
            torch.testing.assert_close(r[tp]["ours"], r[tp]["megatron"], rtol=1e-5, atol=1e-4)
            assert r[tp]["buffer_device"] == "cpu"
        # TP=2 gives TP=1's numbers (same master weights, split).
        torch.testing.assert_close(r[2]["ours"], r[1]["ours"], rtol=1e-5, atol=1e-4)
        assert r[1]["embedding_grad_norm_sq"] > 0
        assert r[2]["embedding_grad_norm_sq"] == pytest.approx(r[1]["embedding_grad_norm_sq"], rel=1e-4)
    # Model-parallel RNG differs across TP ranks, data-parallel RNG does not.
    assert not torch.equal(r0[2]["model_parallel_draw"], r1[2]["model_parallel_draw"])
    assert torch.equal(r0[2]["data_parallel_draw"], r1[2]["data_parallel_draw"])


def test_parallel_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="parallel.tensor_parallel"):
        ParallelConfig(tensor_parallel=0)
    with pytest.raises(ConfigError, match="parallel.device"):
        ParallelConfig(device="tpu")


def test_a_world_of_one_leaves_no_torchrun_variables_behind(monkeypatch):
    """A plain-python run sets RANK/MASTER_PORT for itself; tearing down removes them again, so a
    child process (a benchmark, a converter) does not rendezvous on this process's stale port."""
    import os

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # the user's own setting stays
    initialize_parallel(device="cpu")
    try:
        assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"].isdigit()
    finally:
        destroy_parallel(destroy_process_group=True)
    assert [n for n in names if n in os.environ] == ["MASTER_ADDR"]


# The run_on_ranks checks below need ranks and a process group, not megatron: plain gloo keeps the
# pool they stop and replace from importing it (a few seconds a process on the CI machine). They
# run on a pool of their own: the shared one, with megatron imported, stays up for other tests.
def rank_one_waits_forever():
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        dist.barrier()  # rank 0 never joins: a deadlock like a collective only some ranks reach
    else:
        time.sleep(600)  # busy elsewhere (a rank that returned would close its sockets and free rank 1)
    return dist.get_rank()


def rank_one_raises():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a rank that is gone
    return 0


def test_run_on_ranks_stops_a_deadlock_and_names_the_stuck_rank(monkeypatch):
    from mmpo_megatron.parallel import local_ranks

    monkeypatch.setattr(local_ranks, "_POOL", None)  # the shared pool comes back at teardown
    try:
        _deadlock_and_failure_checks(monkeypatch, local_ranks)
    finally:
        if local_ranks._POOL is not None:
            local_ranks._POOL.close()


def _deadlock_and_failure_checks(monkeypatch, local_ranks):
    with pytest.raises(
        local_ranks.RanksTimedOut, match=r"rank_one_waits_forever: rank\(s\) \[0, 1\] still running after 4 s"
    ):
        run_on_ranks(rank_one_waits_forever, 2, timeout=4)
    # A rank that raises fails the call with its traceback; the rank left in the barrier is stopped.
    monkeypatch.setattr(local_ranks, "FAILURE_GRACE_S", 2.0)
    started = __import__("time").monotonic()
    failed = r"(?s)rank_one_raises failed on rank 1.*ValueError: boom on rank 1"
    with pytest.raises(local_ranks.RankFailed, match=failed):
        run_on_ranks(rank_one_raises, 2)
    assert __import__("time").monotonic() - started < 60
    # The pool is replaced and works again.
    assert run_on_ranks(rank_one_waits_forever_not, 2) == [0, 1]


def rank_one_waits_forever_not():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    return dist.get_rank()


def sp_and_recompute_in_effect(modes):
    """Our builder at TP=2 with the defaults: what megatron actually runs (not only what was asked)."""
    from mmpo_megatron.config import PrecisionConfig
    from mmpo_megatron.model.builder import build_model_chunks

    parallel = ParallelConfig(tensor_parallel=2, device="cpu")
    initialize_parallel(parallel)
    out = {}
    for recompute in modes:
        model = tiny_model(max_position_embeddings=4096, make_vocab_size_divisible_by=128, recompute=recompute,
                           recompute_num_layers=1, fused_logprob_chunk=4)
        gpt = build_model_chunks(model, parallel, PrecisionConfig(), vocab_size=VOCAB, device="cpu")[0]
        seen = {"layer_inputs": [], "core_attention_calls": 0}
        gpt.decoder.layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen["layer_inputs"].append(
            tuple((args[0] if args else kwargs["hidden_states"]).shape)), with_kwargs=True)
        gpt.decoder.layers[0].self_attention.core_attention.register_forward_pre_hook(
            lambda *unused: seen.__setitem__("core_attention_calls", seen["core_attention_calls"] + 1))
        ids = torch.randint(0, VOCAB, (BATCH, SEQ))
        hidden = gpt(ids, torch.arange(SEQ).expand(BATCH, -1), None)  # fused head: hidden states, gathered
        hidden.float().pow(2).sum().backward()
        norms = [p for n, p in gpt.named_parameters() if "layernorm" in n]
        out[recompute] = {"sequence_parallel": gpt.config.sequence_parallel,
                          "granularity": gpt.config.recompute_granularity,
                          "marked_norms": sum(getattr(p, "sequence_parallel", False) for p in norms),
                          "norms": len(norms), "output": tuple(hidden.shape), **seen}
    return out


def test_sequence_parallel_and_recompute_are_in_effect():
    """TP=2 turns sequence parallelism on by default: each rank's layers see half the sequence, the
    norms are marked for the TP gradient all-reduce, and the fused head gets whole sequences back.
    Full recompute runs each layer's forward again in the backward; selective only core attention."""
    expected = (("none", 1, 1), ("full", 2, 2), ("selective", 1, 2))
    ranks = run_on_ranks(sp_and_recompute_in_effect, 2, [mode for mode, _, _ in expected])
    for recompute, layer_calls, attention_calls in expected:
        for rank in (r[recompute] for r in ranks):
            assert rank["sequence_parallel"] is True and rank["granularity"] == (
                None if recompute == "none" else recompute
            )
            assert rank["marked_norms"] == rank["norms"] == 5  # 2 per layer and the final norm
            assert rank["layer_inputs"] == [(SEQ // 2, BATCH, 32)] * layer_calls, recompute
            assert rank["core_attention_calls"] == attention_calls, recompute
            assert rank["output"] == (BATCH, SEQ, 32)


def sdpa_thd_against_per_sequence_attention(seed):
    """Our SDPA core attention fed THD (as megatron's attention feeds TE under packing), with the
    dense mask (training on CPU) and the flex block mask (no grad), against float64 causal
    attention computed sequence by sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mmpo_megatron.model.sdpa_attention import SDPAttention

    initialize_parallel(device="cpu")
    heads, groups, dim = 4, 2, 8
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=groups, attention_dropout=0.0)
    attention = SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (6,), generator=g)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    tokens = int(cu_seqlens[-1])
    q = torch.randn(tokens, heads, dim, dtype=torch.float64, generator=g)
    k, v = (torch.randn(tokens, groups, dim, dtype=torch.float64, generator=g) for _ in range(2))
    expected = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = q[start:end], *(t[start:end].repeat_interleave(heads // groups, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / dim**0.5
        scores = scores.masked_fill(torch.ones(end - start, end - start, dtype=torch.bool).triu(1), float("-inf"))
        expected.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs).reshape(end - start, heads * dim))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
    dense = attention(q, k, v, None, packed_seq_params=params)
    with torch.no_grad():
        flex = attention(q, k, v, None, packed_seq_params=params)
    return torch.cat(expected), dense, flex


def test_sdpa_reads_thd_packed_sequences_like_per_sequence_attention():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    expected, dense, flex = run_on_ranks(sdpa_thd_against_per_sequence_attention, 1, seed)[0]
    assert dense.shape == flex.shape == (expected.shape[0], 1, expected.shape[1])
    torch.testing.assert_close(dense[:, 0], expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"dense, seed {seed}: {m}")
    torch.testing.assert_close(flex[:, 0], expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"flex, seed {seed}: {m}")


def packed_rows_under_megatron_checkpoint(seed):
    """Our SDPA core attention on packed rows inside megatron's activation checkpoint (what
    model.recompute does): the mask megatron carries is the segment ids, so checkpoint can save it;
    the checkpointed forward (no grad) builds the flex block mask from them, as on CUDA, and the
    recompute in backward the dense one. Output and gradients against the same attention given
    megatron's dense block-diagonal mask, without checkpointing."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mmpo_megatron.data.packing import packed_causal_mask
    from mmpo_megatron.model import sdpa_attention
    from mmpo_megatron.model.builder import packed_attention_mask

    initialize_parallel(device="cpu")
    heads, groups, dim, rows, length = 4, 2, 8, 2, 16
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=groups, attention_dropout=0.0)
    attention = sdpa_attention.SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                            attention_type="self")
    g = torch.Generator().manual_seed(seed)
    segment_ids = torch.full((rows, length), -1, dtype=torch.long)
    for row in range(rows):  # random sequence lengths, the row's tail left as padding
        start, seg = 0, 0
        while start < length - 2:
            end = min(length, start + int(torch.randint(2, 7, (), generator=g)))
            segment_ids[row, start:end] = seg
            start, seg = end, seg + 1
        segment_ids[row, start:] = -1
    q = torch.randn(length, rows, heads, dim, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(length, rows, groups, dim, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in range(2))
    weights = torch.randn(length, rows, heads * dim, dtype=torch.float64, generator=g)
    real = segment_ids.transpose(0, 1).unsqueeze(-1) >= 0  # padding queries attend to nothing: not compared

    built = []
    real_flex = sdpa_attention.packed_block_mask

    def counting(ids):
        built.append("flex")
        return real_flex(ids)

    sdpa_attention.packed_block_mask = counting
    try:
        mask = packed_attention_mask("flex", segment_ids)
        checkpointed = tensor_parallel.checkpoint(lambda *a: attention(*a), False, q, k, v, mask)
        (checkpointed * weights * real).sum().backward()
    finally:
        sdpa_attention.packed_block_mask = real_flex
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    plain = attention(q, k, v, packed_causal_mask(segment_ids))
    (plain * weights * real).sum().backward()
    return {
        "mask_is_tensor": torch.is_tensor(mask),
        "flex_built": len(built),
        "checkpointed": checkpointed.detach() * real,
        "plain": plain.detach() * real,
        "grads": grads,
        "plain_grads": [t.grad for t in (q, k, v)],
    }


def test_packed_rows_survive_activation_checkpointing_with_a_flex_mask():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    out = run_on_ranks(packed_rows_under_megatron_checkpoint, 1, seed)[0]
    assert out["mask_is_tensor"]  # a BlockMask here fails megatron's save_for_backward (the CUDA crash)
    assert out["flex_built"] == 1, out["flex_built"]  # the checkpointed forward ran flex, once for the call
    torch.testing.assert_close(
        out["checkpointed"], out["plain"], rtol=1e-10, atol=1e-12, msg=lambda m: f"seed {seed}: {m}"
    )
    for name, got, expected in zip("qkv", out["grads"], out["plain_grads"]):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{name}, seed {seed}: {m}")


def ddp_layouts_against_ddp_own(pipeline_parallel, virtual_pipeline, overlap, bucket_size):
    """The distributed optimizer's parameter layout we hand megatron's DDP (megatron >= 0.18) against
    the one DDP computes itself when given none: the same buckets and parameter ranges per chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mmpo_megatron.config import PrecisionConfig
    from mmpo_megatron.model.builder import build_model_chunks
    from mmpo_megatron.model.optimizer import _param_layout

    parallel = ParallelConfig(pipeline_parallel=pipeline_parallel, virtual_pipeline=virtual_pipeline, device="cpu")
    initialize_parallel(parallel)
    model = tiny_model(num_layers=4)
    chunks = build_model_chunks(model, parallel, PrecisionConfig(dtype="fp32"), vocab_size=263, device="cpu")
    out = []
    for i, chunk in enumerate(chunks):
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                                   overlap_grad_reduce=overlap, bucket_size=bucket_size)
        ours = _param_layout(chunk, ddp_config, disable_bucketing=i > 0).get("full_param_layout")
        ddp = DistributedDataParallel(chunk.config, ddp_config, module=chunk, disable_bucketing=i > 0)
        theirs = getattr(ddp, "full_param_layout", None)

        def summary(layout):
            if layout is None:
                return None
            return {str(key): (dict(value.param_index_map), value.bucket_indices, value.per_bucket_numel_unpadded)
                    for key, value in layout.layouts.items()}

        out.append({"ours": summary(ours), "theirs": summary(theirs),
                    "buckets": sum(len(v.bucket_indices) for v in theirs.layouts.values()) if theirs else None})
    destroy_parallel()
    return out


def _ddp_takes_a_layout() -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return hasattr(DistributedOptimizer, "compute_full_param_layout")  # megatron-core >= 0.18


# Several buckets at DP=2; a later pipeline stage and a second virtual chunk (no bucketing); no
# overlap (one bucket); DDP's default bucket size. Before 0.18 nothing is passed: one case says so.
DDP_LAYOUT_CASES = [(1, None, True, 4000), (2, 2, True, 4000), (1, None, False, None), (1, None, True, None)]


@pytest.mark.parametrize("pp,vpp,overlap,bucket", DDP_LAYOUT_CASES if _ddp_takes_a_layout() else DDP_LAYOUT_CASES[:1])
def test_our_ddp_parameter_layout_is_the_one_ddp_computes(pp, vpp, overlap, bucket):
    ranks = run_on_ranks(ddp_layouts_against_ddp_own, 2, pp, vpp, overlap, bucket)
    if not _ddp_takes_a_layout():
        assert all(chunk["ours"] is None and chunk["theirs"] is None for rank in ranks for chunk in rank)
        return
    for rank in ranks:
        for chunk in rank:
            assert chunk["ours"] is not None and chunk["ours"] == chunk["theirs"]
    if (pp, overlap, bucket) == (1, True, 4000):
        assert ranks[0][0]["buckets"] > 1  # several buckets: the sizes really are compared
