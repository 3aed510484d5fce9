"""The trainer on CPU gloo processes: layouts agree with TP=PP=DP=1 after an optimizer step,
interleaving equals plain pipelining, resume is exact, checkpoints reshard, reference modes agree,
non-finite steps are skipped, and the demo learns."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mmpo_megatron.config import (
    REFERENCE_MODES,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DataSourceConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    ReferenceConfig,
    TrainConfig,
    TrainerConfig,
    validate_layout,
)
from mmpo_megatron.parallel.local_ranks import run_on_ranks
from run_folders import seed_run_folder
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "grad_norm", "pairs")


def make_config(out, *, loss="mmpo", tp=1, pp=1, vpp=None, steps=1, **sections):
    if isinstance(loss, LossConfig):
        loss_cfg = loss
    else:
        loss_cfg = LossConfig(name=loss, aux_weight=0.5) if loss == "mmpo" else LossConfig(name=loss)
    cfg = TrainConfig(
        device="cpu",
        model=tiny_model(num_layers=4),
        loss=loss_cfg,
        data=DataConfig(train=[DataSourceConfig(split="train[:16]")], eval=[DataSourceConfig(split="test[:8]")],
                        max_length=32, max_prompt_length=16, pad_to_multiple=8),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp),
        # adam_eps 1e-4: Adam divides by sqrt(v); for near-zero gradients a larger eps keeps fp32
        # reduction-order noise (1e-9) from being amplified to a full lr-sized update.
        optim=sections.pop("optim", OptimConfig(lr=1e-2, warmup_ratio=0.0, decay_style="constant", adam_eps=1e-4)),
        train=sections.pop("train", TrainerConfig(global_batch_size=8, micro_batch_size=2, max_steps=steps,
                                                  eval_interval=0, output_dir=str(out))),
        reference=sections.pop("reference", ReferenceConfig()),
        checkpoint=sections.pop("checkpoint", CheckpointConfig()),
        logging=LoggingConfig(tensorboard=False, progress_bar=False),
    )
    assert not sections, sections
    return cfg


def train_records(cfg):
    from mmpo_megatron.train.trainer import run_training

    return run_training(cfg)


# ------------------------------------------------------------------------------------------ layouts

# name: (world size, tp, pp, vpp, settings, losses); DP = world / (tp * pp). Sequence parallelism
# is on wherever TP > 1 unless a layout turns it off; settings are (section, field) -> value. DPO's
# step differs from MMPO's only in the per-pair loss: two layouts check it, MMPO runs the rest.
OVERLAP = {("parallel", "overlap_grad_reduce"): True, ("parallel", "overlap_param_gather"): True,
           ("parallel", "ddp_bucket_size"): 4000}  # 4000 elements: several buckets
LAYOUTS = {
    "tp2": (2, 2, 1, None, {}, ("mmpo", "dpo")),
    # Interleaved at DP=1: 4 micro-batches per rank, more than the 2 stages (1F1B's steady state).
    "pp2_vpp2": (2, 1, 2, 2, {}, ("dpo",)),
    "tp2_no_sp": (2, 2, 1, None, {("parallel", "sequence_parallel"): False}, ("mmpo",)),
    "tp2_recompute_full": (2, 2, 1, None, {("model", "recompute"): "full", ("model", "recompute_num_layers"): 2},
                           ("mmpo",)),
    "pp2_recompute_selective": (2, 1, 2, None, {("model", "recompute"): "selective"}, ("mmpo",)),
    "dp2_overlap": (2, 1, 1, None, OVERLAP, ("mmpo",)),
    "tp2_pp2": (4, 2, 2, None, {}, ("mmpo",)),
    "pp2_vpp2_dp2_overlap": (4, 1, 2, 2, OVERLAP, ("mmpo",)),
}


def layout_losses(name):
    return LAYOUTS[name][5]


# Adam with eps far above every |gradient| is SGD with step lr / eps: each update is proportional
# to the gradient's value. (With a small eps, step 1 moves every weight by about +-lr whatever the
# gradient's size, so equal weights would only show equal gradient signs.) No clipping: it would
# rescale a wrong gradient back to the right norm.
LAYOUT_OPTIM = OptimConfig(lr=1.0, warmup_ratio=0.0, decay_style="constant", adam_eps=10.0, clip_grad=0.0)
LAYOUT_STEPS = 2

# bf16 (the GPU numerics: bf16 parameters, fp32 master weights and gradient reduction) on the
# layouts that shard differently: TP x SP, interleaved PP, and the distributed optimizer's DP
# shards with overlapped reduce and gather; each against the fp32 TP=PP=DP=1 run. Updates 10x
# LAYOUT_OPTIM's (median 2.5e-3, the weights' median 1.3e-2), so that a matrix update stands
# well clear of bf16's spacing; norm weights near 1.0 move by less than it and are bounded by it.
BF16_LAYOUTS = ("tp2", "pp2_vpp2", "dp2_overlap", "pp2_vpp2_dp2_overlap")
BF16_LAYOUT_OPTIM = dataclasses.replace(LAYOUT_OPTIM, lr=10.0)
# Measured (these runs, bf16 vs fp32): loss, log-probs and margins within 2.1e-3 relative, the
# step-2 gradient norm within 2.0e-2; every weight's update within 2.5e-2 of the fp32 update's
# norm beyond one bf16 spacing per element. Tolerances: about twice and a half that.
BF16_METRIC_REL = {"loss": 5e-3, "rewards/chosen": 5e-3, "rewards/rejected": 5e-3, "rewards/margins": 1e-2,
                   "logps/chosen": 5e-3, "logps/rejected": 5e-3, "grad_norm": 5e-2, "pairs": 0.0}
BF16_UPDATE_REL = 6e-2


def bf16_spacing(weights: torch.Tensor) -> torch.Tensor:
    """bf16's distance between neighbours at each value (8 significant bits)."""
    exponent = torch.floor(torch.log2(weights.abs().clamp_min(torch.finfo(torch.float32).tiny)))
    return torch.where(weights == 0, torch.zeros_like(weights), 2.0 ** (exponent - 7))


# Every other objective and MMPO option through the trainer, at TP=1 and TP=2 (two steps each).
LOSS_VARIANTS = {
    "simpo": LossConfig(name="simpo"),  # no reference model at all
    "ipo": LossConfig(name="ipo"),
    "mmpo_mean_nll": LossConfig(name="mmpo", logp_reduction="mean", aux_weight=0.5, nll_weight=0.3),
    "mmpo_aux0": LossConfig(name="mmpo", aux_weight=0.0),  # pure marginal likelihood: the rejected side trains
}


def loss_variant_runs(root, tp):
    out = {}
    for name, loss in LOSS_VARIANTS.items():
        cfg = make_config(Path(root) / f"{name}_tp{tp}", loss=loss, tp=tp, steps=LAYOUT_STEPS, optim=LAYOUT_OPTIM,
                          checkpoint=CheckpointConfig(load_weights=str(Path(root) / "init")))
        out[name] = train_records(cfg)
    return out


# Scoring that does not divide evenly: 6 held-out pairs in micro-batches of 2, so 3 micro-batches
# at DP=1 (an interleaved PP=2 runs groups of 2: one padding micro-batch is added) and, at DP=2,
# a rank whose second micro-batch is all padding. Packed, so the first step's packing check runs
# (at interleaved PP=2 on two micro-batches). name: (tp, pp, vpp) on two ranks.
UNEVEN_SCORING = {"pp2": (1, 2, None), "pp2_vpp2": (1, 2, 2), "dp2": (1, 1, None)}


def uneven_scoring_run(root, name, tp=1, pp=1, vpp=None):
    cfg = make_config(Path(root) / f"uneven_{name}", tp=tp, pp=pp, vpp=vpp, steps=1,
                      checkpoint=CheckpointConfig(load_weights=str(Path(root) / "init")))
    cfg.data.packing = True
    cfg.data.eval = [DataSourceConfig(split="test[:6]")]
    cfg.train.eval_interval = 1
    return train_records(cfg)


def init_and_base(root):
    """Initial weights at TP=PP=1 (the common start of every layout), then the baseline runs."""
    from mmpo_megatron.model.builder import build_model_chunks
    from mmpo_megatron.model.checkpoint import save_checkpoint
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    cfg = make_config(Path(root) / "unused")
    initialize_parallel(device="cpu")
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, vocab_size=263, device="cpu", seed=99)
    save_checkpoint(Path(root) / "init", 0, chunks, None, {"note": "initial weights"}, keep_last=1)
    destroy_parallel()
    out = {}
    for loss in ("mmpo", "dpo"):
        cfg = make_config(Path(root) / f"base_{loss}", loss=loss, steps=LAYOUT_STEPS, optim=LAYOUT_OPTIM,
                          checkpoint=CheckpointConfig(load_weights=str(Path(root) / "init")))
        out[loss] = train_records(cfg)
    cfg = make_config(Path(root) / "base_bf16_lr", steps=LAYOUT_STEPS, optim=BF16_LAYOUT_OPTIM,
                      checkpoint=CheckpointConfig(load_weights=str(Path(root) / "init")))
    out["bf16_lr"] = train_records(cfg)  # fp32, at the bf16 runs' learning rate
    out["variants"] = loss_variant_runs(root, 1)
    out["uneven"] = uneven_scoring_run(root, "base")
    return out


def layout_runs(root, world):
    out = {}
    if world == 2:
        out["variants"] = loss_variant_runs(root, 2)
        out["uneven"] = {name: uneven_scoring_run(root, name, *layout) for name, layout in UNEVEN_SCORING.items()}
    for name, (size, tp, pp, vpp, settings, losses) in LAYOUTS.items():
        if size != world:
            continue
        runs = [(loss, "fp32") for loss in losses] + ([("mmpo", "bf16")] if name in BF16_LAYOUTS else [])
        for loss, dtype in runs:
            run = f"{name}_{loss}" if dtype == "fp32" else f"{name}_bf16"
            cfg = make_config(Path(root) / run, loss=loss, tp=tp, pp=pp, vpp=vpp, steps=LAYOUT_STEPS,
                              optim=LAYOUT_OPTIM if dtype == "fp32" else BF16_LAYOUT_OPTIM,
                              checkpoint=CheckpointConfig(load_weights=str(Path(root) / "init")))
            cfg.precision = PrecisionConfig(dtype=dtype)
            for (section, field), value in settings.items():
                setattr(getattr(cfg, section), field, value)
            out[(name, loss) if dtype == "fp32" else (name, "bf16")] = train_records(cfg)
    return out


def final_weights(root, names):
    """Every run's final checkpoint loaded at TP=PP=1 (resharding), as plain tensors."""
    from mmpo_megatron.model.builder import build_model_chunks
    from mmpo_megatron.model.checkpoint import load_weights
    from mmpo_megatron.parallel import initialize_parallel

    cfg = make_config(Path(root) / "unused")
    initialize_parallel(device="cpu")
    weights = {}
    for name in names:
        chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, vocab_size=263, device="cpu", seed=5)
        load_weights(Path(root) / name, chunks)  # a run folder, or the init checkpoint folder
        weights[name] = {k: v.clone() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
    return weights


def saved_dtypes(root, names):
    """The dtype each run saved its trained weights in."""
    from mmpo_megatron.convert.checkpoints import saved_weight_dtype
    from mmpo_megatron.model.checkpoint import latest_checkpoint

    return {name: saved_weight_dtype(latest_checkpoint(Path(root) / name / "checkpoints")) for name in names}


@pytest.mark.start_early(2)
@pytest.mark.xdist_group("many_ranks")  # one pytest worker: see Makefile
def test_two_steps_match_single_process_at_every_layout(tmp_path):
    """Loss and metrics of both steps, and every weight after step 2 (resharded to TP=1), equal the
    TP=PP=DP=1 run's: with updates proportional to gradients (LAYOUT_OPTIM), equal weights mean
    equal gradient values, and step 2's loss sees step 1's update sizes."""
    base = run_on_ranks(init_and_base, 1, str(tmp_path))[0]
    runs = run_on_ranks(layout_runs, 2, str(tmp_path), 2)[0]  # rank 0 holds the records
    runs.update({k: v for k, v in run_on_ranks(layout_runs, 4, str(tmp_path), 4)[0].items()})
    names = ["init", "base_bf16_lr"] + [f"base_{loss}" for loss in ("mmpo", "dpo")]
    names += [f"{n}_{loss}" for n in LAYOUTS for loss in layout_losses(n)]
    names += [f"{n}_bf16" for n in BF16_LAYOUTS]
    weights = run_on_ranks(final_weights, 1, str(tmp_path), names)[0]
    # bf16: every layout tracks the fp32 single-process run (a stale fp32 master, or a layout's
    # bf16 path gone wrong, moves a weight by far more than the update itself).
    bf16_runs = [f"{n}_bf16" for n in BF16_LAYOUTS]
    assert run_on_ranks(saved_dtypes, 1, str(tmp_path), bf16_runs + ["base_bf16_lr"])[0] == {
        **{name: "bf16" for name in bf16_runs}, "base_bf16_lr": "fp32"}
    ref = [r for r in base["bf16_lr"] if r["split"] == "train"]
    for name in BF16_LAYOUTS:
        got = [r for r in runs[(name, "bf16")] if r["split"] == "train"]
        for a, b in zip(got, ref, strict=True):
            for key, rel in BF16_METRIC_REL.items():
                assert a[key] == pytest.approx(b[key], rel=rel), (name, "bf16", a["step"], key)
        for param, value in weights["base_bf16_lr"].items():
            start = weights["init"][param]
            fp32_update, bf16_update = value - start, weights[f"{name}_bf16"][param] - start
            error, bound = (
                (bf16_update - fp32_update).norm(),
                BF16_UPDATE_REL * fp32_update.norm() + bf16_spacing(start).norm(),
            )
            assert error <= bound, f"{name} bf16 {param}: update off by {error:.3g}, bound {bound:.3g}"
    for loss in ("mmpo", "dpo"):
        ref = [r for r in base[loss] if r["split"] == "train"]
        assert [r["step"] for r in ref] == list(range(1, LAYOUT_STEPS + 1)) and ref[0]["pairs"] == 8
        assert ref[1]["loss"] != ref[0]["loss"]  # step 1 moved the model
        for name in (n for n in LAYOUTS if loss in layout_losses(n)):
            got = [r for r in runs[(name, loss)] if r["split"] == "train"]
            for a, b in zip(got, ref, strict=True):
                for key in COMPARED:
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, loss, a["step"], key)
            for param, value in weights[f"base_{loss}"].items():
                # Compared as the change from the start: the update itself, not the weight it is added to.
                start = weights["init"][param]
                torch.testing.assert_close(
                    weights[f"{name}_{loss}"][param] - start,
                    value - start,
                    rtol=1e-4,
                    atol=1e-7,
                    msg=lambda m: f"{name} {loss} {param}: {m}",
                )
    for name in LOSS_VARIANTS:
        ref = [r for r in base["variants"][name] if r["split"] == "train"]
        got = [r for r in runs["variants"][name] if r["split"] == "train"]
        assert len(ref) == LAYOUT_STEPS and all(math.isfinite(r["loss"]) for r in ref), name
        for a, b in zip(got, ref, strict=True):
            for key in COMPARED:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, a["step"], key)
    assert [(r["step"], r["split"]) for r in base["uneven"]] == [(0, "eval"), (1, "train"), (1, "eval")]
    for name in UNEVEN_SCORING:
        for a, b in zip(runs["uneven"][name], base["uneven"], strict=True):
            keys = (
                COMPARED if a["split"] == "train" else ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected")
            )
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, a["split"], a["step"], key)
    # Plain 1F1B pipelines pad each micro-batch only to its own rows, as no pipeline does (megatron's
    # variable_seq_lengths); the interleaved schedule pads a step's micro-batches to its longest row.
    padding = {name: [r["padding_fraction"] for r in runs[(name, "mmpo")] if r["split"] == "train"]
               for name in ("pp2_recompute_selective", "tp2_pp2", "pp2_vpp2_dp2_overlap")}
    unpiped = [r["padding_fraction"] for r in base["mmpo"] if r["split"] == "train"]
    assert padding["pp2_recompute_selective"] == padding["tp2_pp2"] == unpiped
    interleaved = padding["pp2_vpp2_dp2_overlap"]
    assert all(a >= b for a, b in zip(interleaved, unpiped)) and sum(interleaved) > sum(unpiped), (padding, unpiped)
    # The variants are different objectives (so agreeing with TP=1 is agreeing on different numbers).
    first_losses = {name: base["variants"][name][0]["loss"] for name in LOSS_VARIANTS}
    assert len({round(v, 6) for v in first_losses.values()}) == len(LOSS_VARIANTS), first_losses
    # The updates are gradient-sized and distinct, so equal updates above are not vacuous.
    update = (
        weights["base_mmpo"]["decoder.layers.0.mlp.linear_fc1.weight"]
        - weights["init"]["decoder.layers.0.mlp.linear_fc1.weight"]
    )
    assert update.abs().max() > 1e-4 and update.abs().unique().numel() > update.numel() // 2
    assert not torch.equal(weights["base_mmpo"]["decoder.layers.0.mlp.linear_fc1.weight"],
                           weights["base_dpo"]["decoder.layers.0.mlp.linear_fc1.weight"])
    # DPO starts at ln 2: policy == reference.
    assert [r for r in base["dpo"] if r["split"] == "train"][0]["loss"] == pytest.approx(0.6931472, abs=1e-6)


# ------------------------------------------------------------------------------------------ resume


def resume_runs(root):
    """Per dtype: 6 steps straight; then a fresh run folder seeded with the step-3 checkpoint resumes
    to 6 (DP=2, as saved). In bf16 also a resume under another layout (TP=2), for one step."""
    def config(out, dtype, steps=6, tp=1):
        cfg = make_config(out, tp=tp, steps=steps, optim=OptimConfig(lr=5e-3, warmup_ratio=0.34, decay_style="cosine"),
                          checkpoint=CheckpointConfig(save_interval=3, keep_last=5))
        cfg.precision = PrecisionConfig(dtype=dtype.split("_")[0])
        cfg.optim.distributed_optimizer = not dtype.endswith("_replicated")
        return cfg

    root = Path(root)
    out = {}
    for dtype in RESUME_DTYPES:
        full = train_records(config(root / f"full_{dtype}", dtype))
        seed_run_folder(root / f"full_{dtype}", root / f"resumed_{dtype}", 3, half_written=True)
        out[dtype] = {"full": full, "resumed": train_records(config(root / f"resumed_{dtype}", dtype))}
    seed_run_folder(root / "full_bf16", root / "resharded_bf16", 3)
    out["bf16"]["resharded"] = train_records(config(root / "resharded_bf16", "bf16", steps=4, tp=2))
    return out


# bf16_replicated: megatron's non-distributed mixed-precision optimizer (whole fp32 masters per rank).
RESUME_DTYPES = ("fp32", "bf16", "bf16_replicated")


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    """DP=2 with the distributed optimizer (its resume workarounds: the shared Adam step), in fp32 and
    in bf16 (fp32 master weights from the checkpoint), and bf16 with the replicated optimizer: steps
    4-6 resumed from step 3 equal the uninterrupted run's bit for bit. A bf16 resume under TP=2
    (optimizer state restarts) continues from the loaded weights: step 4 sees them, and moves no
    weight by more than one fresh Adam step."""
    result = run_on_ranks(resume_runs, 2, str(tmp_path))[0]
    for dtype in RESUME_DTYPES:
        full = {r["step"]: r for r in result[dtype]["full"] if r["split"] == "train"}
        resumed = {r["step"]: r for r in result[dtype]["resumed"] if r["split"] == "train"}
        assert sorted(resumed) == [4, 5, 6], dtype
        for step in (4, 5, 6):
            for key in ("loss", "grad_norm", "lr", "rewards/margins", "logps/chosen"):
                assert resumed[step][key] == full[step][key], (dtype, step, key)
        assert full[4]["lr"] != full[6]["lr"]  # the schedule really moves, so equal lrs are not vacuous
        from mmpo_megatron.model.checkpoint import latest_checkpoint

        assert latest_checkpoint(tmp_path / f"resumed_{dtype}" / "checkpoints").name == "step_0000006"
        assert (tmp_path / f"full_{dtype}" / "metrics.jsonl").exists()
    (step_4,) = [r for r in result["bf16"]["resharded"] if r["split"] == "train"]
    full_step_4 = [r for r in result["bf16"]["full"] if r["step"] == 4][0]
    # Step 4's forward runs on the resharded weights: measured 2.9e-5 relative (TP=2's bf16
    # reduction order). Stale masters show only after the update, in the weights below (on the
    # code before the fix: 7.4e-3 beyond the bound).
    assert step_4["loss"] == pytest.approx(full_step_4["loss"], rel=5e-3)
    weights = run_on_ranks(final_weights, 1, str(tmp_path), ["full_bf16/checkpoints/step_0000003", "resharded_bf16"])[0]
    loaded, after = weights["full_bf16/checkpoints/step_0000003"], weights["resharded_bf16"]
    moved = 0.0
    for name, start in loaded.items():
        # A fresh Adam's first update is at most lr per weight; bf16 rounds the result by half a
        # spacing where it lands.
        excess = (
            (after[name] - start).abs() - step_4["lr"] - bf16_spacing(torch.maximum(start.abs(), after[name].abs())) / 2
        )
        moved = max(moved, float((after[name] - start).abs().max()))
        assert float(excess.max()) <= 0, (name, float(excess.max()))
    assert moved > 0.5 * step_4["lr"]  # the step did move weights


def test_interrupted_save_leaves_previous_checkpoint_newest(tmp_path):
    from mmpo_megatron.model.checkpoint import TRAINER_STATE, latest_checkpoint, resolve_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step_0000002").mkdir(parents=True)
    (root / "step_0000002" / TRAINER_STATE).write_text("{}")
    (root / "step_0000003.tmp").mkdir()
    (root / "step_0000004").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(root).name == "step_0000002"
    assert resolve_checkpoint(tmp_path).name == "step_0000002"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------ reference modes, resharding


def reference_modes_and_scores(root):
    import argparse

    from score_pairs import score_pairs

    root = Path(root)
    out = {}
    for tp, pp in ((2, 1), (1, 2)):
        for mode in WEIGHT_REFERENCE_MODES:
            name = mode if (tp, pp) == (2, 1) else f"{mode}_pp2"
            out[name] = train_records(
                make_config(
                    root / name,
                    tp=tp,
                    pp=pp,
                    steps=2,
                    reference=ReferenceConfig(mode=mode),
                    train=TrainerConfig(
                        global_batch_size=8,
                        micro_batch_size=2,
                        max_steps=2,
                        eval_interval=2,
                        output_dir=str(root / name),
                    ),
                )
            )
    # A reference that differs from the policy: one step at another learning rate.
    train_records(make_config(root / "other_ref", tp=2, steps=1, optim=OptimConfig(lr=3e-2, warmup_ratio=0.0)))
    # Runs started from those weights (checkpoint.load_weights), then resumed at step 1 without the
    # reference cache: precompute and cpu_swap read the starting weights through the policy's own
    # chunks, and a second model on the device is refused.
    from mmpo_megatron.train import setup

    for mode in ("precompute", "cpu_swap"):
        def config(name):
            return make_config(
                root / name,
                tp=2,
                steps=2,
                reference=ReferenceConfig(mode=mode),
                checkpoint=CheckpointConfig(load_weights=str(root / "other_ref"), save_interval=1, keep_last=3),
                train=TrainerConfig(
                    global_batch_size=8, micro_batch_size=2, max_steps=2, eval_interval=2, output_dir=str(root / name)
                ),
            )

        out[f"{mode}_loaded"] = train_records(config(f"{mode}_loaded"))
        seed_run_folder(root / f"{mode}_loaded", root / f"{mode}_resumed", 1, reference_cache=False)
        second_model = setup._reference_chunks

        def refused(*args, **kwargs):
            raise AssertionError("a second model was built on the device for the reference")

        setup._reference_chunks = refused
        try:
            out[f"{mode}_resumed"] = train_records(config(f"{mode}_resumed"))
        finally:
            setup._reference_chunks = second_model
    for checkpoint, output in (("precompute", "scores_tp2.jsonl"), ("other_ref", "other_ref_tp2.jsonl")):
        args = argparse.Namespace(checkpoint=str(root / checkpoint), reference=None, data="embedded", split="test[:12]",
                                  format="auto", tokenizer=None, max_length=None, max_prompt_length=None,
                                  output=str(root / output), tp=2, pp=1, micro_batch_size=3, device="cpu")
        score_pairs(args)
    return out


def score_tp1(root):
    import argparse

    from score_pairs import score_pairs

    args = argparse.Namespace(checkpoint=str(Path(root) / "precompute"), reference=str(Path(root) / "other_ref"),
                              data="embedded", split="test[:12]", format="auto", tokenizer=None, max_length=None,
                              max_prompt_length=None, output=str(Path(root) / "scores_tp1.jsonl"), tp=1, pp=1,
                              micro_batch_size=5, device="cpu")
    return score_pairs(args)


# The modes that hold reference weights of their own (auto resolves to one; adapters_off needs LoRA).
WEIGHT_REFERENCE_MODES = tuple(m for m in REFERENCE_MODES if m not in ("auto", "adapters_off"))


@pytest.mark.start_early(6)
def test_reference_modes_agree_and_tp2_checkpoint_scores_equally_at_tp1(tmp_path):
    """precompute, resident and cpu_swap give the same reference log-probs (the implicit rewards
    beta * (policy - reference) once the policy has moved) and training metrics, at TP=2 and PP=2."""
    runs = run_on_ranks(reference_modes_and_scores, 2, str(tmp_path))[0]
    for suffix in ("", "_pp2"):
        for split in ("train", "eval"):
            base = [r for r in runs["precompute" + suffix] if r["split"] == split]
            assert len(base) > 0
            if split == "train":  # the policy moved: implicit rewards are reference-dependent, non-zero
                assert abs(base[-1]["implicit_rewards/chosen"]) > 1e-4
            for mode in WEIGHT_REFERENCE_MODES[1:]:
                other = [r for r in runs[mode + suffix] if r["split"] == split]
                assert len(other) == len(base), (mode, suffix, split)
                for a, b in zip(base, other):
                    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                                "implicit_rewards/chosen", "implicit_rewards/rejected"):
                        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (
                            mode + suffix,
                            split,
                            a["step"],
                            key,
                        )
    for mode in ("precompute", "cpu_swap"):
        loaded = {(r["step"], r["split"]): r for r in runs[f"{mode}_loaded"]}
        resumed = [r for r in runs[f"{mode}_resumed"]]
        assert [(r["step"], r["split"]) for r in resumed] == [(2, "train"), (2, "eval")], mode
        for r in resumed:
            # The reference is the starting weights, not the resumed policy: implicit rewards stay non-zero.
            assert abs(r["implicit_rewards/chosen"]) > 1e-4, (mode, r["split"])
            for key in ("loss", "implicit_rewards/chosen", "implicit_rewards/rejected", "rewards/margins"):
                assert r[key] == pytest.approx(loaded[(r["step"], r["split"])][key], rel=1e-6, abs=1e-7), (
                    mode,
                    r["split"],
                    key,
                )
    summary = run_on_ranks(score_tp1, 1, str(tmp_path))[0]
    tp2 = [json.loads(line) for line in (tmp_path / "scores_tp2.jsonl").read_text().splitlines()]
    tp1 = [json.loads(line) for line in (tmp_path / "scores_tp1.jsonl").read_text().splitlines()]
    assert [r["index"] for r in tp1] == list(range(12)) == [r["index"] for r in tp2]
    other = [json.loads(line) for line in (tmp_path / "other_ref_tp2.jsonl").read_text().splitlines()]
    correct = 0
    for a, b, ref in zip(tp1, tp2, other, strict=True):
        assert a["chosen_logps"] == pytest.approx(b["chosen_logps"], abs=1e-4)
        assert a["rejected_logps"] == pytest.approx(b["rejected_logps"], abs=1e-4)
        # --reference scores the reference checkpoint: as that checkpoint scored on its own (at TP=2).
        assert a["ref_chosen_logps"] == pytest.approx(ref["chosen_logps"], abs=1e-4)
        assert a["ref_rejected_logps"] == pytest.approx(ref["rejected_logps"], abs=1e-4)
        margin = (a["chosen_logps"] - ref["chosen_logps"]) - (a["rejected_logps"] - ref["rejected_logps"])
        assert abs(a["chosen_logps"] - ref["chosen_logps"]) > 1e-3  # the reference really differs
        assert a["implicit_reward_correct"] == (margin > 0)
        correct += margin > 0
    assert summary["implicit_reward_accuracy"] == pytest.approx(correct / 12)


# ------------------------------------------------------------------------------------------ non-finite steps


def training_state(model):
    """Every number a skipped step must leave alone: parameters, and per parameter shard the
    optimizer's fp32 master copy and Adam state."""
    params = {n: p.detach().clone() for chunk in model.chunks for n, p in chunk.named_parameters()}
    optimizer = []
    for inner in getattr(model.optimizer, "chained_optimizers", [model.optimizer]):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            for param in group["params"]:
                optimizer.append(param.detach().clone())
                optimizer.extend(
                    v.clone() for _, v in sorted(torch_opt.state.get(param, {}).items()) if torch.is_tensor(v)
                )
    return {"params": params, "optimizer": optimizer}


def nonfinite_runs(root, bad_steps, poisoned_dp_rank=None, steps=3):
    """A run whose loss is NaN at ``bad_steps`` (on every DP rank, or one); the state after each step."""
    from megatron.core import parallel_state as ps

    from mmpo_megatron.model import objective
    from mmpo_megatron.train import trainer

    original_loss, original_log = objective.preference_loss, trainer.Trainer.log
    calls = {"n": 0}
    snapshots = {}

    def poisoned(config, logps, **kw):
        loss, metrics = original_loss(config, logps, **kw)
        calls["n"] += 1
        per_step = 8 // (2 * ps.get_data_parallel_world_size())  # global batch 8, micro-batch 2
        bad_rank = poisoned_dp_rank is None or ps.get_data_parallel_rank() == poisoned_dp_rank
        if (calls["n"] - 1) // per_step + 1 in bad_steps and bad_rank:
            loss = loss * float("nan")
        return loss, metrics

    def log_and_snapshot(self, logger, at_step, split, metrics):
        if split == "train":
            snapshots[at_step] = training_state(self.model)
        original_log(self, logger, at_step, split, metrics)

    objective.preference_loss, trainer.Trainer.log = poisoned, log_and_snapshot
    cfg = make_config(
        Path(root),
        steps=steps,
        optim=OptimConfig(lr=1e-2, warmup_ratio=0.34, decay_style="cosine", adam_eps=1e-4),
        train=TrainerConfig(
            global_batch_size=8,
            micro_batch_size=2,
            max_steps=steps,
            eval_interval=0,
            output_dir=str(root),
            max_nonfinite_steps=2,
        ),
    )
    try:
        return {"records": train_records(cfg), "snapshots": snapshots}
    except trainer.NonFiniteAbort as exc:
        return {"abort": str(exc)}
    finally:
        objective.preference_loss, trainer.Trainer.log = original_loss, original_log


def nonfinite_cases(root):
    root = Path(root)
    return {"clean": nonfinite_runs(root / "clean", set()), "all_ranks": nonfinite_runs(root / "all", {2}),
            "one_rank": nonfinite_runs(root / "one", {2}, poisoned_dp_rank=1),
            "abort": nonfinite_runs(root / "abort", {2, 3}, steps=4)}


def assert_same_state(a, b, what):
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), (what, name)
    assert len(a["optimizer"]) == len(b["optimizer"]) > 0
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"], b["optimizer"])), what


def test_nonfinite_step_is_skipped_exactly_then_abort(tmp_path):
    """At DP=2 with the distributed optimizer, a NaN loss on every rank or on one DP rank only: the
    update is skipped on all ranks, weights and optimizer state stay bitwise as before the step, the
    learning-rate schedule stays aligned with the step count, and two in a row abort."""
    ranks = run_on_ranks(nonfinite_cases, 2, str(tmp_path))
    clean_records = {r["step"]: r for r in ranks[0]["clean"]["records"]}
    for case in ("all_ranks", "one_rank"):
        train = {r["step"]: r for r in ranks[0][case]["records"]}
        assert math.isnan(train[2]["grad_norm"]) and train[2]["skipped_steps"] == 1, case
        assert not math.isnan(train[3]["loss"]) and not math.isnan(train[3]["grad_norm"]), case
        assert [train[s]["lr"] for s in (1, 2, 3)] == [clean_records[s]["lr"] for s in (1, 2, 3)], case
        for rank in ranks:  # each rank's parameters and its shard of the optimizer state
            snaps, clean = rank[case]["snapshots"], rank["clean"]["snapshots"]
            assert_same_state(snaps[1], clean[1], (case, "step 1 as in the clean run"))
            assert_same_state(snaps[2], snaps[1], (case, "skipped step 2 changed nothing"))
    assert len({clean_records[s]["lr"] for s in (1, 2, 3)}) == 3  # the schedule moves, so equal lrs mean something
    assert "2 consecutive steps had a non-finite loss or gradient (last at step 3)" in ranks[0]["abort"]["abort"]


# ------------------------------------------------------------------------------------------ config checks, demo, GPU


def test_config_errors_name_the_field_before_heavy_work():
    cfg = make_config("unused", tp=3)
    with pytest.raises(ConfigError, match="parallel.tensor_parallel: 3 must divide model.num_attention_heads=4"):
        cfg.validate_for_world(3)
    with pytest.raises(
        ConfigError, match="train.global_batch_size: 8 is not divisible by micro_batch_size x data_parallel = 2 x 3"
    ):
        make_config("unused").validate_for_world(3)
    with pytest.raises(
        ConfigError, match="pipeline_parallel x virtual_pipeline = 2 x 4 must divide model.num_layers=4"
    ):
        make_config("unused", pp=2, vpp=4).validate_for_world(2)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        make_config("unused", tp=2).validate_for_world(3)
    cfg = make_config("unused", pp=2, vpp=2)
    cfg.train.global_batch_size = 6
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size: gives 3 micro-batches per step .* an interleaved "
        r"pipeline \(parallel.virtual_pipeline\) needs a multiple of pipeline_parallel=2",
    ):
        cfg.validate_for_world(2)
    from omegaconf import OmegaConf

    from mmpo_megatron.config import resolve_config

    with pytest.raises(ConfigError, match="lossy"):
        resolve_config(OmegaConf.create({"lossy": 1}))
    with pytest.raises(ConfigError, match="loss.beta"):
        resolve_config(OmegaConf.create({"loss": {"beta": -1.0}}))
    fp8 = {"precision": {"fp8": "hybrid"}, "model": {"layer_spec": "transformer_engine"}}
    with pytest.raises(
        ConfigError, match="data.pad_to_multiple: must be a multiple of 16 with precision.fp8=hybrid, got 8"
    ):
        resolve_config(OmegaConf.create({**fp8, "data": {"pad_to_multiple": 8}}))
    with pytest.raises(ConfigError, match="model.layer_spec: precision.fp8 needs transformer_engine, got 'local_sdpa'"):
        resolve_config(OmegaConf.create({**fp8, "model": {"layer_spec": "local_sdpa"}}))
    with pytest.raises(ConfigError, match="precision.fp8_recipe: must be delayed, tensorwise or blockwise"):
        resolve_config(OmegaConf.create({**fp8, "precision": {"fp8": "e4m3", "fp8_recipe": "mxfp4"}}))
    with pytest.raises(ConfigError, match="parallel.overlap_param_gather: needs optim.distributed_optimizer=true"):
        resolve_config(OmegaConf.create({"parallel": {"overlap_param_gather": True},
                                         "optim": {"distributed_optimizer": False}}))
    with pytest.raises(ConfigError, match="model.recompute: must be none, selective or full"):
        resolve_config(OmegaConf.create({"model": {"recompute": "some"}}))
    with pytest.raises(
        ConfigError, match="model.recompute_num_layers: 3 is more than the 2 layers of a pipeline stage"
    ):
        validate_layout(
            ModelConfig(num_layers=4, recompute="full", recompute_num_layers=3), ParallelConfig(pipeline_parallel=2)
        )
    assert ParallelConfig(tensor_parallel=2).uses_sequence_parallel and not ParallelConfig().uses_sequence_parallel
    assert not ParallelConfig(tensor_parallel=2, sequence_parallel=False).uses_sequence_parallel
    with pytest.raises(ConfigError, match="train.max_wall_minutes: must be > 0, got 0"):
        resolve_config(OmegaConf.create({"train": {"max_wall_minutes": 0}}))
    from mmpo_megatron.train.preflight import check_lm_documents_fit

    packed = make_config("unused")
    packed.data = dataclasses.replace(packed.data, packing=True)
    packed.eval = dataclasses.replace(packed.eval, lm_data="corpus.txt", lm_max_length=63)
    with pytest.raises(
        ConfigError,
        match="eval.lm_max_length: a document of 63 tokens is scored in a packed row of 65, "
        "longer than the packed row length 64",
    ):
        check_lm_documents_fit(packed, "cpu")
    packed.eval.lm_max_length = 62
    check_lm_documents_fit(packed, "cpu")


def test_a_capped_evaluation_samples_every_held_out_source():
    """train.eval_max_pairs over concatenated sources: a seeded sample drawn from all of them (the
    first N would be the first source's alone), the same every time."""
    from mmpo_megatron.train.setup import held_out_sample

    sample = held_out_sample(1000, 100, seed=3)
    assert sample == sorted(set(sample)) and len(sample) == 100 and sample == held_out_sample(1000, 100, seed=3)
    second_half = [sum(i >= 500 for i in held_out_sample(1000, 100, seed)) for seed in range(20)]
    assert 40 <= sum(second_half) / 20 <= 60 and min(second_half) > 0


def cache_waits_for_another_run(cache_dir):
    """A lock on the cache entry held by 'another run', which writes the entry and lets go after a
    moment: cached_scores waits, then loads it, never computing."""
    import threading
    import time

    from mmpo_megatron.model import reference
    from mmpo_megatron.pair_logprobs import PairLogProbs
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(device="cpu")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir()
    reference.LOCK_POLL_S = 0.05
    other = (cache_dir / "ref_k.lock").open("a")
    import fcntl

    fcntl.flock(other, fcntl.LOCK_EX)
    scores = PairLogProbs(chosen=torch.tensor([-1.5]), rejected=torch.tensor([-2.5]), chosen_tokens=torch.tensor([3]),
                          rejected_tokens=torch.tensor([4]))

    def the_other_run():
        time.sleep(0.5)
        scores.save(cache_dir / "ref_k.pt")
        fcntl.flock(other, fcntl.LOCK_UN)

    def compute():
        raise AssertionError("scored again while another run held the entry")

    thread = threading.Thread(target=the_other_run)
    started = time.perf_counter()
    thread.start()
    loaded = reference.cached_scores(cache_dir, "k", compute, is_writer=True, on_last_stage=True, device="cpu")
    waited = time.perf_counter() - started
    thread.join()
    destroy_parallel()
    return waited, loaded.chosen.tolist()


def test_runs_sharing_a_reference_cache_score_an_entry_once(tmp_path):
    """The sweep's jobs start together on one cache: the second waits on the entry's lock while the
    first scores, then loads the first's file."""
    waited, chosen = run_on_ranks(cache_waits_for_another_run, 1, str(tmp_path / "cache"))[0]
    assert waited >= 0.5 and chosen == [-1.5]


def run_demo(out):
    """The README demo's config (configs/train_demo.yaml, composed as the entry script does) on one
    pooled rank at TP=1: the same data, steps and figures as `make demo` (its TP=2 computes the same
    numbers, which the layout tests check), at a third of the CPU time. The entry script under
    torchrun is exercised by test_defaults' TP=3 run."""
    from mmpo_megatron.config import compose_config

    # Its assertions need the first and the last evaluation only.
    cfg = compose_config("train_demo", [
        "parallel=single", "logging.progress_bar=false", "train.eval_interval=125", f"train.output_dir={out}"],
        REPO / "configs")
    return train_records(cfg)


@pytest.mark.start_early(3)
def test_demo_held_out_reward_accuracy_rises(tmp_path):
    """The README's demo: held-out reward accuracy ends clearly above its start."""
    run_on_ranks(run_demo, 1, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 125]
    assert evals[-1]["rewards/accuracies"] > evals[0]["rewards/accuracies"] + 0.1, evals
    # The policy itself moved towards right answers: implicit (policy vs reference) rewards agree.
    assert evals[0]["implicit_rewards/accuracies"] == 0.0  # policy == reference: all ties
    assert evals[-1]["implicit_rewards/accuracies"] > 0.55, evals[-1]
    assert evals[-1]["nll/chosen_per_token"] < evals[0]["nll/chosen_per_token"] - 1.0
    train = [r for r in records if r["split"] == "train"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "mmpo/posterior_chosen", "grad_norm", "lr", "tokens_per_s"):
        assert key in train[0], key
    assert (tmp_path / "data_report.json").exists() and (tmp_path / "config.yaml").exists()
    assert any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "checkpoints" / "step_0000125" / "trainer_state.json").exists()


def _transformer_engine_missing() -> str | None:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or TE's own RuntimeError for a broken install
        return f"Transformer Engine is not importable here ({type(exc).__name__}: {exc})"
    return None


NO_CUDA = "needs CUDA (tools/gpu_report.sh smoke runs it on the lent GPU)"
# bf16 on both devices: different kernels and reduction orders, each rounding to 2^-8 relative.
BF16_REL = 2e-2


def smoke_config(out, device, spec, packing=False, steps=3):
    cfg = make_config(out, steps=steps)
    cfg.device = cfg.parallel.device = device
    cfg.model.layer_spec, cfg.model.fused_logprob_chunk = spec, 1024
    cfg.data.packing = packing
    cfg.precision.dtype = "bf16"
    return cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_smoke_125m(tmp_path):
    """A few bf16 steps of a ~125M model on one GPU with local_sdpa, padded and packed (compiled
    flex_attention with a block mask, a whole micro-batch per row), and packed under selective and
    full recompute (megatron's checkpoint saves the mask: the segment ids; compiled flex forward
    and backward inside it): finite, and every packed run's first step equals the plain packed one's."""
    runs = {}
    for packing, recompute in ((False, "none"), (True, "none"), (True, "selective"), (True, "full")):
        cfg = smoke_config(tmp_path / f"sdpa_{packing}_{recompute}", "cuda", "local_sdpa", packing=packing, steps=4)
        cfg.model = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=2048,
                                max_position_embeddings=512, layer_spec="local_sdpa", fused_logprob_chunk=1024,
                                recompute=recompute)
        train = [r for r in run_on_ranks(train_records, 1, cfg, fresh=True)[0] if r["split"] == "train"]
        assert len(train) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
        if packing:
            assert all(r["padding_fraction"] < 0.1 for r in train)
        runs[(packing, recompute)] = train
    for recompute in ("selective", "full"):  # recompute changes what is kept, not what is computed
        for key in ("loss", "grad_norm"):
            assert runs[(True, recompute)][0][key] == pytest.approx(runs[(True, "none")][0][key], rel=BF16_REL), (
                recompute,
                key,
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_first_step_matches_the_cpu_run(tmp_path):
    """The same tiny model, weights (seeded CPU initialisation) and data on CUDA and on CPU: the
    first step's loss, log-probs and gradient norm agree within bf16 tolerance."""
    records = {}
    for device in ("cpu", "cuda"):
        cfg = smoke_config(tmp_path / device, device, "local_sdpa", steps=1)
        records[device] = [r for r in run_on_ranks(train_records, 1, cfg, fresh=True)[0] if r["split"] == "train"][0]
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
        assert records["cuda"][key] == pytest.approx(records["cpu"][key], rel=BF16_REL, abs=1e-3), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.skipif(_transformer_engine_missing() is not None, reason=str(_transformer_engine_missing()))
def test_gpu_transformer_engine_spec_and_fp8(tmp_path):
    """TE layers in bf16 give local_sdpa's first step within bf16 tolerance; FP8 (hybrid, on a GPU
    of capability >= 8.9) trains finite steps."""
    first = {}
    for spec in ("local_sdpa", "transformer_engine"):
        cfg = smoke_config(tmp_path / spec, "cuda", spec, steps=1)
        first[spec] = [r for r in run_on_ranks(train_records, 1, cfg, fresh=True)[0] if r["split"] == "train"][0]
    for key in ("loss", "logps/chosen", "grad_norm"):
        assert first["transformer_engine"][key] == pytest.approx(first["local_sdpa"][key], rel=BF16_REL, abs=1e-3), key
    if torch.cuda.get_device_capability() >= (8, 9):
        cfg = smoke_config(tmp_path / "fp8", "cuda", "transformer_engine", steps=3)
        cfg.precision.fp8 = "hybrid"
        train = [r for r in run_on_ranks(train_records, 1, cfg, fresh=True)[0] if r["split"] == "train"]
        assert len(train) == 3 and all(math.isfinite(r["loss"]) for r in train)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.skipif(_transformer_engine_missing() is not None, reason=str(_transformer_engine_missing()))
def test_gpu_transformer_engine_packs_as_thd(tmp_path):
    """Packed rows on TE go in as THD (cu_seqlens): two steps equal the padded run within bf16
    tolerance, and the first packed step's packed-vs-padded guard passes."""
    runs = {}
    for packing in (False, True):
        cfg = smoke_config(tmp_path / f"te_{packing}", "cuda", "transformer_engine", packing=packing, steps=2)
        # Head dim 64: inside every fused THD backend of TE (flash, cuDNN), not a fallback's corner.
        cfg.model = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                                ffn_hidden_size=512, max_position_embeddings=64, make_vocab_size_divisible_by=16,
                                layer_spec="transformer_engine", fused_logprob_chunk=1024)
        runs[packing] = [r for r in run_on_ranks(train_records, 1, cfg, fresh=True)[0] if r["split"] == "train"]
    assert runs[True][0]["padding_fraction"] < runs[False][0]["padding_fraction"]
    for padded, packed in zip(runs[False], runs[True]):
        for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            assert packed[key] == pytest.approx(padded[key], rel=BF16_REL, abs=1e-3), (padded["step"], key)


# ------------------------------------------------------------------------------------------ optimizer


def optimizer_groups(root):
    from mmpo_megatron.model.builder import build_model_chunks
    from mmpo_megatron.model.optimizer import wrap_for_training
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    cfg = make_config(Path(root))
    initialize_parallel(device="cpu")
    try:
        chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, vocab_size=263, device="cpu")
        _, optimizer = wrap_for_training(chunks, cfg.optim, cfg.parallel, torch.float32)
        inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        return [(type(o).__name__, g["fused"], g["foreach"]) for o in inner for g in o.param_groups]
    finally:
        destroy_parallel()


def test_torch_adam_fallback_runs_fused(tmp_path):
    """Without TE or Apex, megatron steps torch's Adam: every group is switched to the fused kernel
    (the layout and exact-resume tests above run through it)."""
    groups = run_on_ranks(optimizer_groups, 1, str(tmp_path))[0]
    assert groups and all(name in ("Adam", "AdamW") and fused and not foreach for name, fused, foreach in groups), (
        groups
    )


# ------------------------------------------------------------------------------------------ fused output layer


def fused_or_not(root, chunk, dtype="fp32"):
    from mmpo_megatron.config import PrecisionConfig

    cfg = make_config(Path(root) / f"chunk{chunk}_{dtype}", tp=2, steps=2)
    cfg.precision = PrecisionConfig(dtype=dtype)
    cfg.model.fused_logprob_chunk = chunk
    cfg.model.tie_embeddings = True  # the output weight is the embedding: its gradient takes both paths
    return train_records(cfg)


@pytest.mark.start_early(10)
def test_fused_chunked_output_layer_and_bf16_train_like_full_fp32_logits(tmp_path):
    full = run_on_ranks(fused_or_not, 2, str(tmp_path), 0)[0]
    fused = run_on_ranks(fused_or_not, 2, str(tmp_path), 5)[0]  # 5-token chunks: many chunks, a remainder
    assert len(full) == len(fused) == 2
    for a, b in zip(full, fused):
        for key in ("loss", "grad_norm", "logps/chosen", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    # The GPU path on CPU: bf16 parameters (Float16Module) with fp32 master weights in the optimizer.
    bf16 = run_on_ranks(fused_or_not, 2, str(tmp_path), 5, "bf16")[0]
    for a, b in zip(full, bf16):
        for key in ("loss", "grad_norm", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=2e-2), (a["step"], key)


# ------------------------------------------------------------------------------------------ packing


def packed_and_padded(root, tp, pp, spec, chunk, recompute="none"):
    """Records of the same run padded and packed; spec ``thd`` is local_sdpa fed packed rows as
    THD (cu_seqlens), the form transformer_engine gets: megatron's THD path without TE. Under
    ``recompute``, megatron's checkpointing saves the packed rows' mask for backward: on local_sdpa
    that is the segment ids, from which the checkpointed (no-grad) forward builds a flex block mask,
    as on CUDA, and the recompute the dense mask (flex has no CPU backward)."""
    from mmpo_megatron.model import schedule

    real = schedule.packed_attention_kind
    if spec == "thd":
        schedule.packed_attention_kind = lambda model: "thd"
    out = {}
    try:
        for packing in (False, True):
            cfg = make_config(Path(root) / f"pack{int(packing)}_tp{tp}_pp{pp}_{spec}", tp=tp, pp=pp, steps=2)
            cfg.data.packing = packing
            cfg.model.layer_spec = "local_sdpa" if spec == "thd" else spec
            cfg.model.fused_logprob_chunk = chunk
            cfg.model.recompute = recompute
            cfg.train.eval_interval = 2
            out[packing] = train_records(cfg)
    finally:
        schedule.packed_attention_kind = real  # the rank process is pooled: later tasks get the real one
    return out


def leaking_packed_run(root, leak):
    """A packed run whose attention ignores the packed rows' block mask (as TE's causal attention
    ignores an attention mask): plain causal attention over the whole row."""
    from mmpo_megatron.model import schedule

    cfg = make_config(Path(root) / f"leak{int(leak)}", steps=1)
    cfg.data.packing = True
    real = schedule.packed_attention_mask
    if leak:
        schedule.packed_attention_mask = lambda kind, segment_ids: None
    try:
        return train_records(cfg), None
    except ConfigError as exc:
        return None, str(exc)
    finally:
        schedule.packed_attention_mask = real


def test_the_first_packed_step_stops_a_mask_the_attention_ignores(tmp_path):
    """Every packed run scores its first micro-batch packed and padded: a leaking mask stops the run
    naming data.packing before any update; an honoured one trains on."""
    records, error = run_on_ranks(leaking_packed_run, 1, str(tmp_path), True)[0]
    assert records is None and error.startswith("data.packing: packed rows give log-probs"), error
    gap = float(error.split("log-probs ")[1].split(" per token")[0])
    assert gap > 10 * 1e-4, error  # far outside the fp32 tolerance (PACKING_TOLERANCE), not a borderline call
    assert not (tmp_path / "leak1" / "checkpoints").exists()
    records, error = run_on_ranks(leaking_packed_run, 1, str(tmp_path), False)[0]
    assert error is None and [r["split"] for r in records].count("train") == 1


def test_default_pack_length_puts_a_micro_batch_in_one_row_only_where_packed_attention_skips_padding():
    from mmpo_megatron.model.builder import default_pack_length

    assert default_pack_length(ModelConfig(layer_spec="local_sdpa"), 1024, 4, "cuda") == 4 * 2048
    assert default_pack_length(ModelConfig(layer_spec="local_sdpa"), 1024, 32, "cuda") == 16384  # mask-building cap
    assert default_pack_length(ModelConfig(layer_spec="local_sdpa"), 9000, 4, "cuda") == 18000  # any pair fits
    # Dense masks cost length^2: rows of one longest pair (CPU training has no flex backward).
    assert default_pack_length(ModelConfig(layer_spec="local_sdpa"), 1024, 8, "cpu") == 2048
    assert default_pack_length(ModelConfig(layer_spec="local"), 1024, 8, "cuda") == 2048
    # TE reads the rows as THD: its attention too follows the real tokens.
    assert default_pack_length(ModelConfig(layer_spec="transformer_engine"), 1024, 4, "cuda") == 4 * 2048


# The PP=2 case runs the fused head (completion tokens gathered out of packed rows) under full
# recompute; TP=2 x PP=2 packs as THD under both (sequence-parallel pipeline shapes of
# [1, rows x length]); DP=2 packs each rank's own micro-batches under selective recompute.
@pytest.mark.start_early(9)
@pytest.mark.parametrize("world,tp,pp,spec,chunk,recompute", [
    (2, 2, 1, "local", 0, "none"), (2, 1, 2, "local_sdpa", 5, "full"),
    pytest.param(4, 2, 2, "thd", 5, "none", marks=pytest.mark.xdist_group("many_ranks")),
    (2, 1, 1, "local_sdpa", 0, "selective")])
def test_packed_training_equals_padded_training(tmp_path, world, tp, pp, spec, chunk, recompute):
    runs = run_on_ranks(packed_and_padded, world, str(tmp_path), tp, pp, spec, chunk, recompute)[0]
    padded, packed = runs[False], runs[True]
    assert [r["split"] for r in packed] == ["eval", "train", "train", "eval"]
    assert packed[1]["padding_fraction"] < padded[1]["padding_fraction"]
    for a, b in zip(padded, packed):
        for key in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected") + (
            ("grad_norm",) if a["split"] == "train" else ()
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["split"], a["step"], key)
