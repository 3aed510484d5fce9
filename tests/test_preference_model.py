"""MegatronPreferenceModel as a library object: the README's custom loop runs as written, a CPU
weight swap leaves the policy bit-identical."""

import io
import math
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from mmpo_megatron.parallel.local_ranks import run_on_ranks
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmpo_megatron"


def readme_loop() -> str:
    """The README's custom-loop snippet (the python block after its marker)."""
    text = (REPO / "README.md").read_text()
    marker = text.index("<!-- custom-loop -->")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def run_snippet(code):
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    return printed.getvalue()


def test_the_readme_custom_loop_runs_as_written():
    code = readme_loop()
    assert "MegatronPreferenceModel" in code and "train_step" in code
    printed = run_on_ranks(run_snippet, 2, code)[0]
    lines = [line.split() for line in printed.strip().splitlines()]
    assert [int(line[0]) for line in lines] == [0, 1, 2, 3], printed
    losses = [float(line[1]) for line in lines]
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == 4, printed


def state_of(model):
    """Parameters, gradient buffers and optimizer state (fp32 masters and Adam moments), cloned."""
    out = [p.detach().clone() for chunk in model.chunks for p in chunk.parameters()]
    out += [b.grad_data.clone() for chunk in model.chunks for b in chunk.buffers]
    for inner in getattr(model.optimizer, "chained_optimizers", [model.optimizer]):
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                out.append(param.detach().clone())
                out += [
                    v.clone() for _, v in sorted(inner.optimizer.state.get(param, {}).items()) if torch.is_tensor(v)
                ]
    return out


def swap_round_trip(root, tp, pp, dtype="fp32", overlap=False):
    """Train one step, then run a cpu_swap reference forward: the policy state before and after, and
    the swapped-in scores against the same weights run as a resident model. On two ranks: DP=2
    unless TP or PP is 2; ``overlap``: overlapped gradient reduce and parameter all-gather (an
    update's all-gather then waits for the next forward; the state is compared once it is done)."""
    from mmpo_megatron.config import (
        CheckpointConfig,
        DataConfig,
        DataSourceConfig,
        LoggingConfig,
        OptimConfig,
        ParallelConfig,
        PrecisionConfig,
        TrainConfig,
        TrainerConfig,
    )
    from mmpo_megatron.data.pipeline import build_pairs
    from mmpo_megatron.data.tokenizer import load_tokenizer
    from mmpo_megatron.model.builder import build_model_chunks
    from mmpo_megatron.model.preference_model import MegatronPreferenceModel
    from mmpo_megatron.model.reference import CpuSwapReference, ResidentReference
    from mmpo_megatron.parallel import initialize_parallel

    cfg = TrainConfig(
        device="cpu",
        model=tiny_model(),
        data=DataConfig(max_length=32, pad_to_multiple=8),
        parallel=ParallelConfig(
            tensor_parallel=tp, pipeline_parallel=pp, overlap_grad_reduce=overlap, overlap_param_gather=overlap
        ),
        precision=PrecisionConfig(dtype=dtype),
        optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
        train=TrainerConfig(global_batch_size=4, micro_batch_size=2),
        checkpoint=CheckpointConfig(),
        logging=LoggingConfig(tensorboard=False, progress_bar=False),
    )
    initialize_parallel(cfg.parallel)
    tokenizer = load_tokenizer("embedded")
    pairs, _ = build_pairs([DataSourceConfig(split="train[:8]")], tokenizer, cfg.data)
    model = MegatronPreferenceModel.from_config(
        cfg, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, total_steps=3
    )
    reference_chunks = build_model_chunks(
        cfg.model, cfg.parallel, cfg.precision, vocab_size=len(tokenizer), device="cpu", seed=777
    )  # other weights than the policy's
    swap = CpuSwapReference.from_chunks(reference_chunks)
    model.set_reference(swap)
    dp, rank = model.layout.data_parallel, model.layout.data_rank  # the global batch's 2 micro-batches over DP
    model.train_step(model.micro_batches(pairs, [[0, 1], [2, 3]][rank::dp]))
    with model.updated_weights():  # under overlap: the update's deferred all-gather, done first
        before = state_of(model)
    micro = model.micro_batches(pairs, [[4, 5]])
    swap.fill(model, micro)
    after = state_of(model)
    resident = model.micro_batches(pairs, [[4, 5]])
    ResidentReference(reference_chunks).fill(model, resident)
    policy = model.micro_batches(pairs, [[4, 5]])
    from mmpo_megatron.model.schedule import score_microbatches

    scored = score_microbatches(model.chunks, policy, model.forward_plan)
    out = {
        "same": len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)),
        "tensors": len(before),
    }
    if model.last_stage:
        out["swap"] = (micro[0].ref_chosen, micro[0].ref_rejected)
        out["resident"] = (resident[0].ref_chosen, resident[0].ref_rejected)
        out["policy"] = (scored[0][1].chosen, scored[0][1].rejected)
    return out


@pytest.mark.parametrize("tp,pp,dtype,overlap", [(2, 1, "fp32", False), (1, 2, "fp32", False), (1, 1, "bf16", True)])
def test_cpu_swap_leaves_the_policy_bit_identical_and_scores_the_reference_weights(tmp_path, tp, pp, dtype, overlap):
    """Parameters, gradient buffers, fp32 master weights and Adam moments bit-identical after a swap,
    at TP=2 and PP=2 (fp32), and in bf16 at DP=2 with the distributed optimizer (each rank's master
    shard) and overlapped parameter gather; the swapped-in forward is the reference's, bit for bit."""
    ranks = run_on_ranks(swap_round_trip, 2, str(tmp_path), tp, pp, dtype, overlap)
    for rank in ranks:
        assert rank["same"] and rank["tensors"] > 10
    last = [r for r in ranks if "swap" in r]
    assert last
    for r in last:
        for swapped, resident, policy in zip(r["swap"], r["resident"], r["policy"]):
            assert torch.equal(swapped, resident)  # the reference weights, bit for bit
            assert not torch.allclose(swapped, policy)  # and not the policy's


def masters_after_loads(root, distributed):
    """bf16 on one rank, with or without the distributed optimizer: weights written behind the
    optimizer's back are refused at the first step; model.load_weights keeps the masters in step,
    and the step then moves each weight by at most one Adam step from the loaded value."""
    from mmpo_megatron.config import (
        DataConfig,
        DataSourceConfig,
        OptimConfig,
        PrecisionConfig,
        TrainConfig,
        TrainerConfig,
    )
    from mmpo_megatron.data.pipeline import build_pairs
    from mmpo_megatron.data.tokenizer import load_tokenizer
    from mmpo_megatron.model import checkpoint as ckpt
    from mmpo_megatron.model.builder import build_model_chunks, unwrap
    from mmpo_megatron.model.optimizer import masters_out_of_step
    from mmpo_megatron.model.preference_model import MegatronPreferenceModel
    from mmpo_megatron.model.reference import CpuSwapReference
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    cfg = TrainConfig(
        device="cpu",
        precision=PrecisionConfig(dtype="bf16"),
        model=tiny_model(),
        data=DataConfig(max_length=32, pad_to_multiple=8),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, decay_style="constant", distributed_optimizer=distributed),
        train=TrainerConfig(global_batch_size=4, micro_batch_size=2),
    )
    initialize_parallel(cfg.parallel)
    try:
        tokenizer = load_tokenizer("embedded")
        pairs, _ = build_pairs([DataSourceConfig(split="train[:4]")], tokenizer, cfg.data)
        other = build_model_chunks(
            cfg.model, cfg.parallel, cfg.precision, vocab_size=len(tokenizer), device="cpu", seed=5
        )
        saved = ckpt.save_checkpoint(Path(root) / f"other_{distributed}", 0, other, None, {}, keep_last=1)
        model = MegatronPreferenceModel.from_config(cfg, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                                                    total_steps=2)
        model.set_reference(CpuSwapReference.from_chunks(other))
        batch = model.micro_batches(pairs, [[0, 1], [2, 3]])
        ckpt.load_weights(saved, model.chunks)  # no optimizer given: the masters stay the random init's
        out = {"optimizer": type(model.optimizer.chained_optimizers[0]).__name__,
               "stale_after_raw_load": len(masters_out_of_step(model.optimizer))}
        try:
            model.train_step(batch)
        except RuntimeError as exc:
            out["refused"] = str(exc)
        model._masters_checked = False  # the check runs again at the next first step
        model.load_weights(saved)
        out["stale_after_load_weights"] = len(masters_out_of_step(model.optimizer))
        loaded = {n: p.detach().float().clone() for n, p in unwrap(model.chunks[0]).named_parameters()}
        metrics = model.train_step(batch)
        after = {n: p.detach().float() for n, p in unwrap(model.chunks[0]).named_parameters()}
        out["moved"] = max(float((after[n] - loaded[n]).abs().max()) for n in loaded)
        out["lr"] = metrics["lr"]
        return out
    finally:
        destroy_parallel()


def test_weights_written_behind_the_optimizer_are_refused_and_load_weights_keeps_masters_in_step(tmp_path):
    for distributed, name in ((True, "DistributedOptimizer"), (False, "Float16OptimizerWithFloat16Params")):
        out = run_on_ranks(masters_after_loads, 1, str(tmp_path), distributed)[0]
        assert out["optimizer"] == name
        assert out["stale_after_raw_load"] >= 10, out  # every matrix; the norms' 1.0 starts agree
        assert out.get("refused", "").startswith(f"{out['stale_after_raw_load']} parameter shard(s) (first: "), out
        assert "differ from the optimizer's fp32 master weights" in out["refused"], out
        assert out["stale_after_load_weights"] == 0, out
        # One Adam step moves a weight by at most lr, plus bf16 rounding of ~0.4% of a weight <= 1.0;
        # stale masters (the random init) move weights by ~0.1 and more.
        assert 0 < out["moved"] <= out["lr"] + 2 ** -8, out
