#!/usr/bin/env python
"""Which TP x PP x DP layout (with sequence parallelism and activation recompute) fits a model on
N GPUs, and with how much memory per GPU: before a job is queued.

    python tools/plan_layout.py --model llama3_70b --gpus 32 --gpu-memory 80 --max-length 2312
    python tools/plan_layout.py --model /models/Llama-3.1-8B --gpus 16 --gpu-memory 80 --reference resident
    python tools/plan_layout.py --check          # predicted vs measured peaks of small shapes on CPU

``--model`` is a preset of configs/model/ or an HF folder (its config.json). Each row is a layout
with the cheapest recompute setting that fits (none, then selective, then full), best first:
fitting layouts, then no recompute, then the least model parallelism (more data parallelism is
faster), then less memory. The columns are the predicted per-GPU memory of the most loaded
pipeline stage (mmpo_megatron/model/memory_plan.py says what each holds).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmpo_megatron.config import LORA_PROJECTIONS, REFERENCE_MODES, lora_projections  # noqa: E402
from mmpo_megatron.model.memory_plan import Layout, Workload, estimate, gib, plan  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_8b", help="a configs/model preset name or an HF folder")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (H100: 80)")
    p.add_argument("--max-length", type=int, default=Workload.max_length,
                   help=f"tokens a sequence is padded to (default {Workload.max_length}: data.max_length's)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    p.add_argument("--global-batch-size", type=int, default=128, help="pairs per optimizer step")
    p.add_argument("--reference", default="precompute", choices=[m for m in REFERENCE_MODES if m != "auto"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--lora-rank", type=int, default=0, help="model.lora.rank (0: full fine-tuning)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="model.lora.dropout (above 0: more activations)")
    p.add_argument("--lora-targets", nargs="+", default=list(LORA_PROJECTIONS),
                   help="model.lora.target_modules (PEFT names or linear_qkv/linear_proj/linear_fc1/linear_fc2)")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--json", help="write the table here")
    p.add_argument("--check", action="store_true", help="measure small shapes on CPU against the prediction")
    return p.parse_args(argv)


def load_model(name: str):
    """A ModelConfig from a preset name or an HF folder."""
    from omegaconf import OmegaConf

    from mmpo_megatron.config import ConfigError, ModelConfig

    preset = REPO / "configs" / "model" / f"{name}.yaml"
    if preset.exists():
        values = OmegaConf.to_container(OmegaConf.load(preset), resolve=False)
        return ModelConfig(**{k: v for k, v in values.items() if not (isinstance(v, str) and v.startswith("${"))})
    from mmpo_megatron.train.preflight import model_from_hf

    if not (Path(name) / "config.json").exists():
        raise ConfigError(f"--model: {name!r} is neither a configs/model preset nor a folder with a config.json")
    return model_from_hf(ModelConfig(from_hf=name))


def table(model, args) -> list[dict]:
    """The planner's rows for the command line's model and workload."""
    work = Workload(micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                    global_batch_size=args.global_batch_size, dtype=args.dtype, reference=args.reference,
                    fused_logprob_chunk=model.fused_logprob_chunk, lora_rank=args.lora_rank,
                    lora_projections=lora_projections(args.lora_targets), lora_dropout=args.lora_dropout)
    rows = []
    for row in plan(model, args.gpus, args.gpu_memory, work):
        e = row.estimate
        rows.append({"layout": row.layout.describe(), "recompute": row.layout.recompute, "fits": row.fits,
                     "total_gib": e.gib(), "weights_gib": e.gib("weights"), "gradients_gib": e.gib("gradients"),
                     "optimizer_gib": e.gib("optimizer"), "activations_gib": e.gib("activations"),
                     "head_gib": e.gib("head"), "reference_gib": e.gib("reference")})
    return rows


def print_table(rows: list[dict], title: str) -> None:
    """Markdown table of planner rows."""
    print(title)
    print(
        "| TP x PP x DP | recompute | fits | per GPU | weights | grads | optimizer | activations | head | reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['recompute']} | {'yes' if r['fits'] else 'no'} | {r['total_gib']:.1f} GiB | "
              f"{r['weights_gib']:.1f} | {r['gradients_gib']:.1f} | {r['optimizer_gib']:.1f} | "
              f"{r['activations_gib']:.1f} | {r['head_gib']:.2f} | {r['reference_gib']:.1f} |")


# ------------------------------------------------------------------------------------------ checking on CPU

CHECK_MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=688,
                   max_position_embeddings=512, make_vocab_size_divisible_by=16, fused_logprob_chunk=256)
CHECK_VOCAB = 263  # the embedded tokenizer's size
CHECK_WORK = Workload(micro_batch_size=2, max_length=256, global_batch_size=8, dtype="fp32", fused_logprob_chunk=256)
CHECK_LAYOUTS = [  # (world, layout, layer spec[, workload])
    (1, Layout(1, 1, 1), "local"),
    (1, Layout(1, 1, 1, recompute="selective"), "local"),
    (1, Layout(1, 1, 1), "local_sdpa"),
    (1, Layout(1, 1, 1, recompute="selective"), "local_sdpa"),  # a flash-style kernel: selective saves ~nothing
    (1, Layout(1, 1, 1, recompute="full"), "local"),
    (1, Layout(1, 1, 1, recompute="full", recompute_num_layers=2), "local"),
    (1, Layout(1, 1, 1, recompute="full", recompute_method="block", recompute_num_layers=2), "local"),
    (2, Layout(2, 1, 1), "local"),
    (2, Layout(2, 1, 1, sequence_parallel=False), "local"),
    (2, Layout(1, 2, 1), "local"),
    (2, Layout(1, 1, 2), "local"),
    (2, Layout(2, 1, 1), "local", dataclasses.replace(CHECK_WORK, lora_rank=16)),  # LoRA on every projection, SP
    (1, Layout(1, 1, 1), "local", dataclasses.replace(CHECK_WORK, lora_rank=16, lora_dropout=0.1)),
    (2, Layout(2, 1, 1), "local", dataclasses.replace(CHECK_WORK, lora_rank=16, lora_dropout=0.1)),
]


def live_tensor_bytes() -> int:
    """Bytes of every live CPU tensor storage in this process (each storage once)."""
    import torch

    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, ReferenceError):  # tensors without storage (meta, sparse)
                continue
    seen.pop(0, None)
    return sum(seen.values())


def measure(layout: Layout, layer_spec: str, model_fields: dict, work: Workload, vocab_size: int) -> dict:
    """Build the trainer's model for ``layout`` on this rank, train a step, then measure the second:
    tensors alive before it (weights, gradient buffers, optimizer state) plus its peak above them."""
    import torch

    from mmpo_megatron.config import (
        DataConfig,
        LoraConfig,
        ModelConfig,
        OptimConfig,
        ParallelConfig,
        PrecisionConfig,
        ReferenceConfig,
        TrainConfig,
        TrainerConfig,
    )
    from mmpo_megatron.memory import track_peak_memory
    from mmpo_megatron.model.preference_model import MegatronPreferenceModel
    from mmpo_megatron.model.reference import ReferenceSource
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    class ZeroReference(ReferenceSource):
        def fill(self, model, micro_batches):
            for micro in micro_batches:
                micro.ref_chosen = torch.zeros(micro.batch.num_pairs)
                micro.ref_rejected = torch.zeros(micro.batch.num_pairs)

    lora = LoraConfig(rank=work.lora_rank, target_modules=list(work.lora_projections), dropout=work.lora_dropout)
    cfg = TrainConfig(
        device="cpu",
        model=ModelConfig(**model_fields, layer_spec=layer_spec, recompute=layout.recompute,
                          recompute_method=layout.recompute_method, recompute_num_layers=layout.recompute_num_layers,
                          lora=lora),
        parallel=ParallelConfig(tensor_parallel=layout.tensor_parallel, pipeline_parallel=layout.pipeline_parallel,
                                virtual_pipeline=layout.virtual_pipeline, sequence_parallel=layout.sequence_parallel),
        precision=PrecisionConfig(dtype=work.dtype),
        data=DataConfig(max_length=work.max_length, pad_to_multiple=8),
        optim=OptimConfig(lr=1e-4, warmup_ratio=0.0),
        train=TrainerConfig(global_batch_size=work.global_batch_size, micro_batch_size=work.micro_batch_size),
        reference=ReferenceConfig(mode="precompute"),  # ZeroReference below stands for any
    )
    ranks = initialize_parallel(cfg.parallel)
    try:
        model = MegatronPreferenceModel.from_config(cfg, vocab_size=vocab_size, pad_id=0, total_steps=4)
        model.set_reference(ZeroReference())
        half = work.max_length // 2
        gen = torch.Generator().manual_seed(0)
        pairs = [{"prompt_ids": torch.randint(3, vocab_size, (half,), generator=gen).tolist(),
                  "chosen_ids": torch.randint(3, vocab_size, (half + 1,), generator=gen).tolist(),
                  "rejected_ids": torch.randint(3, vocab_size, (half + 1,), generator=gen).tolist()}
                 for _ in range(work.global_batch_size)]
        per_rank = work.global_batch_size // ranks.data_parallel
        mine = list(range(ranks.data_rank * per_rank, (ranks.data_rank + 1) * per_rank))
        positions = [mine[i:i + work.micro_batch_size] for i in range(0, per_rank, work.micro_batch_size)]
        model.train_step(model.micro_batches(pairs, positions))  # the optimizer state exists after it
        gc.collect()
        static = live_tensor_bytes()
        with track_peak_memory("cpu") as peak:
            model.train_step(model.micro_batches(pairs, positions))
        parameters = sum(p.numel() for chunk in model.chunks for p in chunk.parameters())
        trained = sum(p.numel() for g in model.optimizer.param_groups for p in g["params"])
        return {"static": static, "peak": peak.peak_bytes, "measured": static + peak.peak_bytes,
                "parameters": parameters, "pipeline_rank": ranks.pipeline_rank, "optimizer_parameters": trained}
    finally:
        destroy_parallel()


def check(layouts=CHECK_LAYOUTS, model_fields=CHECK_MODEL, work=CHECK_WORK, vocab_size=CHECK_VOCAB) -> list[dict]:
    """Predicted vs measured per-rank memory (the most loaded rank) at each layout, on CPU. A layout
    entry may carry its own Workload as a fourth item (a LoRA row)."""
    from mmpo_megatron.config import ModelConfig
    from mmpo_megatron.parallel.local_ranks import run_on_ranks

    rows = []
    for world, layout, spec, *own in layouts:
        work_here = own[0] if own else work
        per_rank = run_on_ranks(measure, world, layout, spec, model_fields, work_here, vocab_size)
        worst = max(per_rank, key=lambda r: r["measured"])
        predicted = estimate(ModelConfig(**model_fields, layer_spec=spec), layout, work_here, vocab_size=vocab_size)
        lora = f", LoRA r={work_here.lora_rank}" if work_here.lora_rank else ""
        lora += f" dropout {work_here.lora_dropout:g}" if work_here.lora_dropout else ""
        rows.append({"layout": layout.describe(), "recompute": layout.describe_recompute() + lora, "layer_spec": spec,
                     "predicted": predicted.total, "measured": worst["measured"],
                     "error": predicted.total / worst["measured"] - 1,
                     "parameters_predicted": predicted.parameters,
                     "parameters_measured": max(r["parameters"] for r in per_rank),
                     "optimizer_parameters": max(r["optimizer_parameters"] for r in per_rank)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the plan (or, with --check, the CPU comparison)."""
    args = parse_args(argv)
    if args.check:
        rows = check()
        print("| layout (TP x PP x DP) | recompute | layer spec | predicted | measured | error |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['layout']} | {r['recompute']} | {r['layer_spec']} | {gib(r['predicted'])} "
                f"| {gib(r['measured'])} | {r['error']:+.1%} |"
            )
        worst = max(abs(r["error"]) for r in rows)
        print(f"largest error: {worst:.1%}")
    else:
        from mmpo_megatron.config import ConfigError

        try:
            model = load_model(args.model)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        rows = table(model, args)
        print_table(rows[: args.top], f"{model.name} on {args.gpus} GPUs of {args.gpu_memory:g} GiB, "
                    f"{args.micro_batch_size} pair(s) x 2 x {args.max_length} tokens per micro-batch, "
                    f"{args.dtype}, reference {args.reference}:")
        if not any(r["fits"] for r in rows):
            print("no layout fits: more GPUs, a shorter --max-length, or --reference precompute")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
