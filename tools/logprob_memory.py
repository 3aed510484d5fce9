#!/usr/bin/env python
"""Peak memory of the output layer + label log-probs (forward and backward), fused or not.

    python tools/logprob_memory.py                                  # hidden 2048, vocab 128256, 4096 tokens, bf16
    python tools/logprob_memory.py --tokens 4096,8192 --chunks 512,1024,2048 --json head.json

Each variant runs ``hidden [tokens, h] -> log p(label)`` and the backward to the hidden states and
the output weight, the way the trainer's last pipeline stage does under bf16:

  megatron-ce  bf16 logits, Float16Module's fp32 copy, megatron's vocab_parallel_cross_entropy
  full         bf16 logits, Float16Module's fp32 copy, our token_logprobs (model.fused_logprob_chunk=0)
  fused:N      our output_layer_logprobs, N tokens at a time (model.fused_logprob_chunk=N)

and prints the peak bytes of tensors allocated above the inputs (hidden states, weight, labels),
measured by ``mmpo_megatron.memory`` (the CUDA allocator's counters on GPU, a tensor-storage
tracker on CPU: the same quantity), plus seconds and the summed log-prob, which must agree
across variants. This is one tensor-parallel rank at TP=1; at TP=t the [tokens, vocab] terms
shrink t-fold. The rest of a training step (layers, activations, optimizer) is the same in every
variant, so the differences here are the differences of a whole step.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpo_megatron.config import DEVICES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", default="4096", help="comma-separated token counts (micro-batch rows x sequence length)")
    p.add_argument("--chunks", default="1024", help="comma-separated fused chunk sizes")
    p.add_argument("--variants", default="megatron-ce,full,fused", help="which of megatron-ce, full, fused to run")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def head_logprobs(variant: str, hidden, weight, labels, vocab: int):
    """Per-token log p(label) of ``hidden @ weight.T`` by the named variant (differentiable)."""
    from mmpo_megatron.logprobs import output_layer_logprobs, token_logprobs

    if variant.startswith("fused:"):
        return output_layer_logprobs(hidden, weight, labels, chunk=int(variant.split(":")[1]), vocab_size=vocab)
    logits = (hidden @ weight.t()).float()  # megatron's Float16Module hands the loss fp32 logits
    if variant == "full":
        return token_logprobs(logits, labels, vocab_size=vocab)
    if variant == "megatron-ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return -vocab_parallel_cross_entropy(logits, labels)
    raise ValueError(f"unknown variant {variant!r}: use megatron-ce, full or fused:N")


def measure(variant: str, tokens: int, args, device) -> dict:
    """Forward + backward of one variant on fresh inputs; peak memory, seconds, log-prob sum."""
    import torch

    from mmpo_megatron.memory import track_peak_memory

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (tokens,), generator=g).to(device)
    gc.collect()
    start = time.perf_counter()
    with track_peak_memory(device) as memory:
        logp = head_logprobs(variant, hidden, weight, labels, args.vocab)
        total = logp.sum()
        total.backward()
        del logp
    seconds = time.perf_counter() - start
    result = {
        "variant": variant, "tokens": tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
        "peak_gib": memory.peak_gib, "seconds": seconds, "logp_sum": total.item(),
        "grad_norms": [float(hidden.grad.float().norm()), float(weight.grad.float().norm())],
    }
    del hidden, weight, labels, total
    gc.collect()
    return result


def main(argv=None) -> int:
    """Run every (tokens, variant); print a table; write JSON."""
    import torch

    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    args = parse_args(argv)
    variants = []
    for name in args.variants.split(","):
        variants += [f"fused:{c}" for c in args.chunks.split(",")] if name == "fused" else [name]
    # megatron's cross entropy looks up the tensor-parallel group: a world of one.
    layout = initialize_parallel(device=args.device)
    runs = [(int(t), v) for t in args.tokens.split(",") for v in variants]
    results = []
    try:
        for number, (tokens, variant) in enumerate(runs, 1):
            results.append(measure(variant, tokens, args, layout.device))
            # Each run is a full-vocabulary forward and backward: seconds to a minute on a CPU.
            print(f"[{number}/{len(runs)}] {tokens} tokens, {variant}: {results[-1]['peak_gib']:.2f} GiB "
                  f"in {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    finally:
        destroy_parallel(destroy_process_group=True)
    print(
        f"device: {layout.device}"
        + (f" ({torch.cuda.get_device_name(layout.device)})" if layout.device.type == "cuda" else "")
        + f"; output head hidden {args.hidden} x vocab {args.vocab}, {args.dtype}, TP=1"
    )
    print(f"{'tokens':>7}  {'variant':<12}{'peak GiB':>9}{'vs full':>9}{'seconds':>9}{'sum log p':>16}")
    for r in results:
        full = next((f for f in results if f["tokens"] == r["tokens"] and f["variant"] == "full"), None)
        ratio = f"{r['peak_gib'] / full['peak_gib']:.2f}x" if full else "n/a"
        print(
            f"{r['tokens']:>7}  {r['variant']:<12}{r['peak_gib']:>9.2f}{ratio:>9}{r['seconds']:>9.2f}"
            f"{r['logp_sum']:>16.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(layout.device), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
