#!/usr/bin/env python
"""Convert a Hugging Face Llama-family checkpoint (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3,
SmolLM2) into a megatron dist checkpoint the trainer loads at any TP/PP.

    python tools/convert_hf_to_megatron.py --hf-model /models/Llama-3.2-1B-Instruct --output ckpt/llama1b
    torchrun ... examples/train_mmpo.py model=from_hf model.from_hf=ckpt/llama1b \\
        checkpoint.load_weights=ckpt/llama1b data.tokenizer=ckpt/llama1b/tokenizer

Reads safetensors one tensor at a time (an 8B bf16 model converts in well under twice its size in
RAM). --dtype auto (the default) keeps the dtype the HF config states. The output holds the
weights, hf_config.json, trainer_state.json (the model config) and tokenizer/. --tp/--pp only
check the model splits that way: the checkpoint reshards on load. Exit code 2 with a message on
unsupported or broken input; no output folder is left.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpo_megatron.config import CONVERT_DTYPES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-model", required=True, help="local HF model folder (config.json + safetensors)")
    p.add_argument("--output", required=True, help="new folder for the megatron checkpoint")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=CONVERT_DTYPES,
                   help="auto (default): the dtype the HF config states (fp16 or none stated: fp32, exact)")
    p.add_argument("--layer-spec", default="local", choices=["local", "local_sdpa", "transformer_engine"])
    args = p.parse_args(argv)

    from mmpo_megatron.convert import convert_hf_to_megatron, run_cli

    return run_cli(lambda: convert_hf_to_megatron(args.hf_model, args.output, dtype=args.dtype,
                                                  layer_spec=args.layer_spec, tp=args.tp, pp=args.pp))


if __name__ == "__main__":
    sys.exit(main())
