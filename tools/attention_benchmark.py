#!/usr/bin/env python
"""Packed attention (flex_attention + per-sequence block mask) against padded SDPA, on the same pairs.

    python tools/attention_benchmark.py                       # 1.5B shape: 32 heads / 8 KV, head dim 64
    python tools/attention_benchmark.py --pairs 32 --pack-length 16384 --json attn.json

Pairs are drawn with the benchmark's UltraFeedback-like lengths, then laid out two ways:
  packed   our pack_pairs / collate_packed rows of --pack-length, attention through the trainer's
           own path (packed_block_mask + flex_attention, compiled on GPU)
  padded   every sequence padded to the longest of the draw (TRL pads each batch so), SDPA causal
and each is timed forward + backward (forward only on CPU, where flex_attention has no backward).
Reported: median ms, real tokens, real tokens per ms and the share of padded positions.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpo_megatron.config import DEVICES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024, help="prompt + completion cap, as data.max_length")
    p.add_argument("--pack-length", type=int,
                   help="packed row length (default 8192 on GPU; 2 x --max-length on CPU, where eager "
                        "flex_attention materialises rows x heads x length^2 scores)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic_pairs(count: int, max_length: int, rng: random.Random) -> list[dict]:
    """Token-id pairs with UltraFeedback-like lengths (the ids do not matter to attention)."""
    from benchmark import sample_lengths

    pairs = []
    for _ in range(count):
        prompt, chosen, rejected = sample_lengths(None, max_length, rng)
        pairs.append({"prompt_ids": [1] * prompt, "chosen_ids": [1] * chosen, "rejected_ids": [1] * rejected})
    return pairs


def median_ms(fn, device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, synchronised on GPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    """Lay the same pairs out packed and padded; time both; print a table; write JSON."""
    import torch
    import torch.nn.functional as F

    from mmpo_megatron.data.collate import pair_tokens
    from mmpo_megatron.data.packing import pack_rows
    from mmpo_megatron.model.sdpa_attention import _flex, packed_block_mask
    from mmpo_megatron.parallel.runtime import resolve_device

    args = parse_args(argv)
    device = torch.device(resolve_device(args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backward = device.type == "cuda"
    pack_length = args.pack_length or (8192 if device.type == "cuda" else 2 * args.max_length)
    pairs = synthetic_pairs(args.pairs, args.max_length, random.Random(args.seed))
    real = sum(pair_tokens(p) for p in pairs)
    generator = torch.Generator().manual_seed(args.seed)

    def qkv(batch: int, length: int):
        shapes = [(batch, args.heads, length, args.head_dim)] + [(batch, args.kv_heads, length, args.head_dim)] * 2
        return [torch.randn(s, generator=generator).to(device, dtype).requires_grad_(backward) for s in shapes]

    def step(attend, tensors):
        out = attend(*tensors)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    packed = pack_rows(pairs, pack_length, pad_id=0, pad_to_multiple=16).to(device)  # as the trainer lays rows out
    mask = packed_block_mask(packed.segment_ids)
    flex = _flex(device.type)
    packed_qkv = qkv(*packed.segment_ids.shape)
    packed_ms = median_ms(lambda: step(lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=True), packed_qkv),
                          device, args.warmup, args.repeats)
    mask_ms = median_ms(lambda: packed_block_mask(packed.segment_ids), device, args.warmup, args.repeats)

    sequences = [len(p["prompt_ids"]) + len(p[side]) - 1 for p in pairs for side in ("chosen_ids", "rejected_ids")]
    longest = max(sequences)
    padded_qkv = qkv(len(sequences), longest)
    padded_ms = median_ms(lambda: step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                      enable_gqa=True), padded_qkv),
                          device, args.warmup, args.repeats)

    results = [
        {
            "layout": "packed (flex_attention)",
            "rows": int(packed.segment_ids.shape[0]),
            "length": int(packed.segment_ids.shape[1]),
            "ms": packed_ms,
            "block_mask_ms": mask_ms,
            "padding_fraction": 1 - real / packed.segment_ids.numel(),
        },
        {
            "layout": "padded (SDPA causal)",
            "rows": len(sequences),
            "length": longest,
            "ms": padded_ms,
            "block_mask_ms": None,
            "padding_fraction": 1 - real / (len(sequences) * longest),
        },
    ]
    for r in results:
        r.update(real_tokens=real, real_tokens_per_ms=real / r["ms"], backward=backward)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; {args.pairs} pairs, {real} real tokens; {args.heads} heads / {args.kv_heads} KV, "
          f"head dim {args.head_dim}, {dtype}; {'forward + backward' if backward else 'forward only (CPU)'}")
    print(f"{'layout':<26}{'rows x length':>15}{'pad %':>8}{'ms':>9}{'real tok/ms':>13}{'mask ms':>9}")
    for r in results:
        mask_col = f"{r['block_mask_ms']:.2f}" if r["block_mask_ms"] is not None else "-"
        print(f"{r['layout']:<26}{r['rows']:>7} x {r['length']:<5}{100 * r['padding_fraction']:>8.1f}{r['ms']:>9.2f}"
              f"{r['real_tokens_per_ms']:>13.0f}{mask_col:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
