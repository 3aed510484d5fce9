#!/usr/bin/env python
"""How long a checkpoint save stops training, written in the foreground or in the background
(checkpoint.async_save); prints a table.

    python tools/benchmark_checkpoint.py                                   # Llama-3.2-1B's layers, 0.67B
    python tools/benchmark_checkpoint.py --model smollm2_360m --steps-during-write 3 --json save.json

The model is a configs/model preset with the trainer's DDP, optimizer and MMPO step (as in
tools/benchmark.py); one warm-up step fills Adam's moments, then each mode saves the trainer's
checkpoint (weights, optimizer, scheduler; MegatronPreferenceModel.save) once:

  sync   dist_checkpointing.save, then the manifest, trainer state and rename: training waits for all
  async  dist_checkpointing's asynchronous save: the state is handed to a forked writer (on GPU
         after a copy to host memory), training goes on, and the folder is marked complete once
         the writer is done

Reported per mode: the seconds training is blocked (the save call), the seconds until the folder
is complete, the checkpoint's size,
and with --steps-during-write N the median step time of N steps run while the writer works against
N steps run before. --vocab and --num-layers replace the preset's: the defaults (32000, 10) keep
Llama-3.2-1B's layer shape at 0.67B parameters, whose fp32 weights, gradients, Adam moments and
the optimizer's state-dict copies taken by a save (24 bytes a parameter, 16 GB) fit a 24 GB CPU
machine; on a GPU pass --vocab 0 --num-layers 0 for the whole 1.24B. On CPU the forked writer
shares the trainer's memory copy-on-write, so steps during the write copy every page they touch:
run them on a smaller shape (--model smollm2_360m) there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tool_main in tests/test_deploy.py)

from benchmark import model_preset, text_pairs, tokenised, training_model  # noqa: E402  (tools/benchmark.py)

from mmpo_megatron.config import DEVICES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3_2_1b", help="a configs/model preset name")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (0: the preset's)")
    p.add_argument("--num-layers", type=int, default=10, help="transformer layers (0: the preset's)")
    p.add_argument("--modes", default="sync,async", help="comma-separated: sync, async")
    p.add_argument("--pairs", type=int, default=1, help="pairs per training step")
    p.add_argument("--lengths", default="32+32", help="PROMPT+RESPONSE token lengths of the training pairs")
    p.add_argument("--steps-during-write", type=int, default=0,
                   help="steps to time before and while the background writer works (0: wait for it idle)")
    p.add_argument(
        "--root", default="outputs/benchmark_checkpoint", help="where the checkpoints are written (removed after)"
    )
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_once(model, mode: str, root: Path, step: int, train_step) -> dict:
    """Save the trainer's checkpoint of ``step`` in ``mode``; time what training waits for."""
    from mmpo_megatron.model.checkpoint import AsyncSaves

    background = AsyncSaves() if mode == "async" else None
    started = time.perf_counter()
    path = model.save(root, step, {"consumed_samples": 0}, keep_last=1, background=background)
    blocked = time.perf_counter() - started
    step_times = []
    if background is not None:
        while background.pending is not None and len(step_times) < train_step.during:
            step_times.append(train_step())
            background.poll()
        background.wait()  # the benchmark waits here, not training: it would go on stepping
        complete = time.perf_counter() - started  # with steps meanwhile: seen at the step boundary after it
    else:
        complete = blocked
    return {
        "mode": mode,
        "blocked_s": blocked,
        "complete_s": complete,
        "checkpoint_gb": folder_bytes(path) / 1e9,
        "steps_during_write": len(step_times),
        "step_s_during_write": statistics.median(step_times) if step_times else None,
    }


class TrainStep:
    """One trainer step on fresh synthetic pairs; returns its seconds."""

    def __init__(self, model, pairs: int, lengths: tuple[int, int], device, during: int, seed: int) -> None:
        import random

        from mmpo_megatron.data.tokenizer import build_byte_tokenizer

        self.model, self.pairs, self.lengths, self.device, self.during = model, pairs, lengths, device, during
        self.tokenizer = build_byte_tokenizer()
        self.rng = random.Random(seed)

    def __call__(self) -> float:
        import torch

        rows = tokenised(text_pairs(self.pairs, self.lengths, sum(self.lengths), self.rng), self.tokenizer)
        micro = self.model.micro_batches(rows, [range(self.pairs)])
        started = time.perf_counter()
        self.model.train_step(micro)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def print_table(rows: list[dict], params: int, step_s: float | None) -> None:
    """One line per mode."""
    print(f"\n{params / 1e9:.2f}B parameters; a step before the save: {step_s:.2f} s" if step_s else
          f"\n{params / 1e9:.2f}B parameters")
    print(
        f"{'mode':6} {'checkpoint GB':>13} {'training blocked s':>18} {'complete after s':>16} "
        f"{'step s during write':>19}"
    )
    for r in rows:
        during = f"{r['step_s_during_write']:.2f} ({r['steps_during_write']})" if r["step_s_during_write"] else "-"
        print(f"{r['mode']:6} {r['checkpoint_gb']:13.2f} {r['blocked_s']:18.2f} {r['complete_s']:16.2f} {during:>19}")


def main(argv=None) -> int:
    """Build the model, save it once per mode, print the table, write JSON."""
    from mmpo_megatron.config import ModelConfig
    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    args = parse_args(argv)
    values = model_preset(args.model)
    if values is None:
        return 2
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - {"sync", "async"})
    if unknown:
        print(f"error: unknown mode(s) {unknown}: use sync, async", file=sys.stderr)
        return 2
    if args.vocab:
        values["vocab_size"] = args.vocab
    if args.num_layers:
        values["num_layers"] = args.num_layers
    lengths = tuple(int(x) for x in args.lengths.split("+"))
    layout = initialize_parallel(device=args.device)
    root = Path(args.root)
    try:
        print(f"building {args.model} (vocab {values.get('vocab_size')}) on {layout.device.type} ...", flush=True)
        model, params = training_model(ModelConfig(**values), args.pairs, layout.device, total_steps=100)
        train_step = TrainStep(model, args.pairs, lengths, layout.device, args.steps_during_write, args.seed)
        print("warm-up step (fills Adam's moments) ...", flush=True)
        train_step()
        before = [train_step() for _ in range(args.steps_during_write)]
        rows = []
        for step, mode in enumerate(modes, start=1):
            print(f"saving ({mode}) ...", flush=True)
            rows.append(save_once(model, mode, root / mode, step, train_step))
            shutil.rmtree(root / mode, ignore_errors=True)
    finally:
        destroy_parallel()
    step_s = statistics.median(before) if before else None
    print_table(rows, params, step_s)
    if args.json:
        meta = {"model": args.model, "vocab": values.get("vocab_size"), "params": params, "device": layout.device.type,
                "step_s_before": step_s}
        Path(args.json).write_text(json.dumps([{**meta, **r} for r in rows], indent=1))
    return 0


if __name__ == "__main__":  # dist_checkpointing's async writer forks; its Manager re-imports this file
    sys.exit(main())
