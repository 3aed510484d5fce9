#!/usr/bin/env python
"""Time MMPO training steps of a model preset on one device and print a table.

    python tools/benchmark.py --model llama3_2_1b --layer-spec local_sdpa --pairs 8 --lengths 256+256
    python tools/benchmark.py --model llama3_2_1b --realistic --pairs 8 --json bench.json
    python tools/benchmark.py --model tiny --device cpu --steps 3        # a smoke run anywhere

Each configuration runs --warmup then --steps optimizer steps of the real training path (megatron
DDP + distributed optimizer, bf16 with fp32 masters on GPU, the MMPO loss on precomputed reference
values) on synthetic token ids. Reported: real (non-padding) tokens/s, seconds/step (median),
model TFLOP/s (6 x parameters x real tokens per step) and MFU against a bf16 matmul ceiling measured
in the same run, padding fraction, and peak memory. --realistic draws prompt and response lengths
like UltraFeedback's (lognormal: prompt median 160, sigma 0.8; responses median 280, sigma 0.6;
capped at --max-length), so padding effects show.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpo_megatron.config import DEVICES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a configs/model preset name")
    p.add_argument("--layer-spec", help="override the preset's layer spec")
    p.add_argument("--fused-chunk", type=int, help="override model.fused_logprob_chunk")
    p.add_argument("--pairs", default="8", help="comma-separated micro-batch sizes in pairs")
    p.add_argument("--lengths", default="256+256", help="comma-separated PROMPT+RESPONSE fixed lengths")
    p.add_argument("--realistic", action="store_true", help="lognormal lengths instead of --lengths")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--packing", action="store_true",
                   help="pack each step's pairs into rows (of --pack-length, else the trainer's default)")
    p.add_argument("--pack-length", type=int,
                   help="packed row length; default: all pairs in one row with flex_attention (local_sdpa on "
                        "GPU), else 2 x --max-length")
    p.add_argument("--vs-trl", action="store_true",
                   help="also run TRL's DPOTrainer on the same model shape, batch and data")
    p.add_argument("--trl-reference", default="online",
                   help="comma-separated TRL reference modes: online (a resident reference model) and/or "
                        "precompute (precompute_ref_log_probs, ref_model=None: TRL's fastest)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def matmul_ceiling_tflops(device, size: int = 8192, repeats: int = 10) -> float | None:
    """Median bf16 matmul TFLOP/s on this GPU (None on CPU)."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def sample_lengths(lengths: tuple[int, int] | None, max_length: int, rng) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token lengths: fixed, or UltraFeedback-like lognormal ones."""
    if lengths is not None:
        return lengths[0], lengths[1], lengths[1]
    prompt = min(max(1, int(rng.lognormvariate(math.log(160), 0.8))), max_length - 2)
    chosen, rejected = (max(1, int(rng.lognormvariate(math.log(280), 0.6))) for _ in range(2))
    return prompt, min(chosen, max_length - prompt), min(rejected, max_length - prompt)


def text_pairs(count: int, lengths: tuple[int, int] | None, max_length: int, rng) -> list[dict]:
    """Pairs of random alphanumeric text: one token per character under the embedded byte tokenizer,
    so our trainer and TRL see the same tokens. The prompt's BOS and the completions' EOS are
    counted in the lengths."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    text = lambda n: "".join(rng.choice(alphabet) for _ in range(max(1, n)))  # noqa: E731
    out = []
    for _ in range(count):
        prompt, chosen, rejected = sample_lengths(lengths, max_length, rng)
        out.append({"prompt": text(prompt - 1), "chosen": text(chosen - 1), "rejected": text(rejected - 1)})
    return out


def tokenised(pairs: list[dict], tokenizer) -> list[dict]:
    """Our data pipeline's view of text pairs (prompt with BOS, completions with EOS)."""
    eos = [tokenizer.eos_token_id]
    return [{"prompt_ids": tokenizer(p["prompt"])["input_ids"],
             "chosen_ids": tokenizer(p["chosen"], add_special_tokens=False)["input_ids"] + eos,
             "rejected_ids": tokenizer(p["rejected"], add_special_tokens=False)["input_ids"] + eos} for p in pairs]


def training_model(model_cfg, pairs_per_step: int, device, *, total_steps: int, pack_length: int | None = None):
    """The trainer's DDP, optimizer (fp32 masters, distributed optimizer) and MMPO step on a
    ``model_cfg`` shape, at the GPU baseline's lr and clipping, with random reference log-probs
    (the policy step is what is timed, as TRL's precompute mode does); and its parameter count."""
    import torch

    from mmpo_megatron.config import LossConfig, OptimConfig, ParallelConfig, PrecisionConfig
    from mmpo_megatron.model.builder import build_model_chunks, resolve_dtype, unwrap
    from mmpo_megatron.model.objective import objective_for
    from mmpo_megatron.model.optimizer import wrap_for_training
    from mmpo_megatron.model.preference_model import MegatronPreferenceModel, lr_schedule
    from mmpo_megatron.model.reference import ReferenceSource
    from mmpo_megatron.model.schedule import ForwardPlan

    class RandomReference(ReferenceSource):
        """Reference log-probs drawn at random."""

        def fill(self, model, micro_batches):
            for micro in micro_batches:
                micro.ref_chosen = -torch.rand(micro.batch.num_pairs, device=model.device) * 100
                micro.ref_rejected = -torch.rand(micro.batch.num_pairs, device=model.device) * 100

    precision = PrecisionConfig()
    vocab = model_cfg.vocab_size or 32000
    parallel = ParallelConfig(device=device.type)
    chunks = build_model_chunks(model_cfg, parallel, precision, vocab_size=vocab, device=device.type)
    optim = OptimConfig(lr=1e-6, clip_grad=1.0, warmup_ratio=0.0, decay_style="constant")
    ddp, optimizer = wrap_for_training(chunks, optim, parallel, resolve_dtype(precision, device.type))
    params = sum(p.numel() for p in unwrap(chunks[0]).parameters())
    model = MegatronPreferenceModel(
        ddp,
        objective_for(LossConfig()),
        vocab_size=vocab,
        pad_id=0,
        forward_plan=ForwardPlan.of(model_cfg),
        pad_to_multiple=16,
        pack_length=pack_length,
        micro_batch_size=pairs_per_step,
        optimizer=optimizer,
        scheduler=lr_schedule(optimizer, optim, total_steps),
    )
    model.set_reference(RandomReference())
    return model, params


def run_config(model_cfg, pairs_per_step: int, lengths, args, layout, ceiling) -> dict:
    """Warm up, time, and summarise one (model, batch, lengths) configuration."""
    import random

    import torch

    from mmpo_megatron.data.tokenizer import build_byte_tokenizer
    from mmpo_megatron.model.builder import default_pack_length

    device = layout.device
    pack_length = None
    if args.packing:
        pack_length = args.pack_length or default_pack_length(model_cfg, args.max_length, pairs_per_step, device.type)
    model, params = training_model(model_cfg, pairs_per_step, device, total_steps=args.warmup + args.steps,
                                   pack_length=pack_length)
    tokenizer = build_byte_tokenizer()
    rng = random.Random(args.seed)
    step_times, real_tokens, padded_tokens = [], 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        pairs = tokenised(text_pairs(pairs_per_step, lengths, args.max_length, rng), tokenizer)
        micro = model.micro_batches(pairs, [range(pairs_per_step)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.train_step(micro)  # the trainer's own step
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
            real_tokens += micro[0].batch.real_tokens()
            padded_tokens += (
                micro[0].packed.input_ids if micro[0].packed is not None else micro[0].batch.input_ids
            ).numel()
    total = sum(step_times)
    achieved = 6 * params * real_tokens / total / 1e12
    return {
        "model": model_cfg.name,
        "layer_spec": model_cfg.layer_spec,
        "fused_logprob_chunk": model_cfg.fused_logprob_chunk,
        "pairs": pairs_per_step,
        "lengths": "realistic" if lengths is None else f"{lengths[0]}+{lengths[1]}",
        "packing": bool(args.packing),
        "pack_length": pack_length,
        "params_m": params / 1e6,
        "s_per_step": statistics.median(step_times),
        "real_tokens_per_s": real_tokens / total,
        "padded_tokens_per_s": padded_tokens / total,
        "padding_fraction": 1 - real_tokens / padded_tokens,
        "model_tflops": achieved,
        "mfu_vs_measured": achieved / ceiling if ceiling else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def import_trl():
    """TRL's (DPOConfig, DPOTrainer), or a RuntimeError naming the module that is missing: TRL or one
    of its own dependencies (on a machine with no registry, the wheel to carry)."""
    try:
        from trl import DPOConfig, DPOTrainer
    except (ImportError, RuntimeError) as exc:
        # TRL's lazy module wraps a failed submodule import in a RuntimeError: the cause names it.
        cause = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__ or exc.__context__
        if not isinstance(cause, ModuleNotFoundError):
            raise
        missing = cause.name or str(cause)
        where = "TRL itself" if missing.split(".")[0] == "trl" else "a dependency of TRL"
        raise RuntimeError(f"--vs-trl: cannot import TRL: module {missing!r} ({where}) is missing: "
                           f"pip install trl, or carry its wheel (tools/gpu_kit.py wheels)") from exc
    return DPOConfig, DPOTrainer


def run_trl(model_cfg, pairs_per_step: int, lengths, args, device, ceiling, reference: str = "online") -> dict:
    """TRL's DPOTrainer (TRL defaults but the reference mode) on the same shape and data; the
    precompute pass, like ours, is outside the timed steps."""
    import copy
    import random
    import tempfile

    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    DPOConfig, DPOTrainer = import_trl()

    from mmpo_megatron.convert.llama import hf_config_from_model
    from mmpo_megatron.data.collate import pair_tokens
    from mmpo_megatron.data.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    hf = hf_config_from_model(model_cfg)
    hf["vocab_size"] = model_cfg.vocab_size or 32000
    config = AutoConfig.for_model(**hf)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).to(device)
    total_steps = args.warmup + args.steps
    rng = random.Random(args.seed)
    rows = text_pairs(pairs_per_step * total_steps, lengths, args.max_length, rng)
    # Counted exactly as our side counts them (PairBatch.real_tokens), so the ratio is like for like.
    real_per_step = sum(pair_tokens(p) for p in tokenised(rows, tokenizer)) / total_steps

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        if reference not in ("online", "precompute"):
            raise ValueError(f"--trl-reference: {reference!r} is neither online nor precompute")
        trainer = DPOTrainer(
            model=model, ref_model=copy.deepcopy(model) if reference == "online" else None,
            args=DPOConfig(output_dir=out, per_device_train_batch_size=pairs_per_step, max_steps=total_steps,
                           precompute_ref_log_probs=reference == "precompute",
                           learning_rate=1e-6, beta=0.1, bf16=dtype == torch.bfloat16, max_length=2 * args.max_length,
                           gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=10**6,
                           use_cpu=device.type != "cuda", dataloader_num_workers=0, seed=args.seed),
            train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer],
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    timed = timer.times[args.warmup:]
    params = sum(p.numel() for p in model.parameters())
    achieved = 6 * params * real_per_step * len(timed) / sum(timed) / 1e12
    return {
        "model": model_cfg.name,
        "layer_spec": f"trl-{reference[:7]}",
        "fused_logprob_chunk": None,
        "pairs": pairs_per_step,
        "lengths": "realistic" if lengths is None else f"{lengths[0]}+{lengths[1]}",
        "packing": False,
        "pack_length": None,
        "params_m": params / 1e6,
        "s_per_step": statistics.median(timed),
        "real_tokens_per_s": real_per_step * len(timed) / sum(timed),
        "padded_tokens_per_s": None,
        "padding_fraction": None,
        "model_tflops": achieved,
        "mfu_vs_measured": achieved / ceiling if ceiling else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def model_preset(name: str) -> dict | None:
    """The fields of configs/model/<name>.yaml; None, with the error printed, if there is no such preset."""
    from omegaconf import OmegaConf

    preset = Path(__file__).resolve().parents[1] / "configs" / "model" / f"{name}.yaml"
    if not preset.exists():
        print(f"error: no model preset configs/model/{name}.yaml", file=sys.stderr)
        return None
    return OmegaConf.to_container(OmegaConf.load(preset))


def main(argv=None) -> int:
    """Run every configuration; print a table; write JSON."""
    from mmpo_megatron.config import ModelConfig
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    args = parse_args(argv)
    values = model_preset(args.model)
    if values is None:
        return 2
    if args.layer_spec:
        values["layer_spec"] = args.layer_spec
    if args.fused_chunk is not None:
        values["fused_logprob_chunk"] = args.fused_chunk
    model_cfg = ModelConfig(**values)
    layout = initialize_parallel(device=args.device)
    try:
        ceiling = matmul_ceiling_tflops(layout.device)
        lengths = (
            [None] if args.realistic else [tuple(int(x) for x in item.split("+")) for item in args.lengths.split(",")]
        )
        results = []
        for p in args.pairs.split(","):
            for length in lengths:
                ours = run_config(model_cfg, int(p), length, args, layout, ceiling)
                results.append(ours)
                for reference in args.trl_reference.split(",") if args.vs_trl else []:
                    trl = run_trl(model_cfg, int(p), length, args, layout.device, ceiling, reference)
                    trl["ours_over_trl"] = ours["real_tokens_per_s"] / trl["real_tokens_per_s"]
                    results.append(trl)
    finally:
        destroy_parallel(destroy_process_group=True)
    header = (
        f"{'model':<18}{'spec':<12}{'pairs':>6}{'lengths':>10}{'packed':>8}{'s/step':>9}{'real tok/s':>12}"
        f"{'pad %':>7}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>9}"
    )
    print(f"device: {layout.device}; bf16 matmul ceiling: {f'{ceiling:.0f} TFLOP/s' if ceiling else 'n/a (CPU)'}")
    print(header)
    for r in results:
        mfu = f"{100 * r['mfu_vs_measured']:.1f}%" if r["mfu_vs_measured"] else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        pad = f"{100 * r['padding_fraction']:>6.1f}%" if r["padding_fraction"] is not None else f"{'n/a':>7}"
        packed = str(r["pack_length"]) if r["pack_length"] else "-"
        print(f"{r['model']:<18}{r['layer_spec']:<12}{r['pairs']:>6}{r['lengths']:>10}{packed:>8}{r['s_per_step']:>9.3f}"
              f"{r['real_tokens_per_s']:>12.0f}{pad}{r['model_tflops']:>9.2f}{mfu:>7}{mem:>9}"
              + (f"   ours / TRL = {r['ours_over_trl']:.2f}x" if "ours_over_trl" in r else ""))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": str(layout.device), "matmul_tflops": ceiling, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
