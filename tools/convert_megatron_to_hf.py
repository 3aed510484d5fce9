#!/usr/bin/env python
"""Export a trainer (or converted) megatron checkpoint, saved at any TP/PP, to a Hugging Face folder:
safetensors shards + config.json + tokenizer, loadable by transformers.AutoModelForCausalLM (and
so by lm-evaluation-harness, AlpacaEval or vLLM). Optimizer state is dropped.

    python tools/convert_megatron_to_hf.py --checkpoint outputs/llama1b_mmpo/checkpoints --output hf/llama1b_mmpo
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
    p.add_argument("--checkpoint", required=True, help="a step folder, a checkpoints folder or a run folder")
    p.add_argument("--output", required=True, help="new folder for the HF model")
    p.add_argument("--dtype", default="auto", choices=CONVERT_DTYPES,
                   help="auto (default): the dtype the trained parameters were saved in; bf16 on fp32 weights "
                        "warns with the log-prob change")
    p.add_argument("--model-type", choices=["llama", "mistral", "qwen2", "qwen3"],
                   help="default: the source HF config's, else inferred from the model shape")
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA checkpoints: write a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) "
        "instead of the merged model",
    )
    args = p.parse_args(argv)

    from mmpo_megatron.convert import convert_megatron_to_hf, run_cli

    return run_cli(lambda: convert_megatron_to_hf(args.checkpoint, args.output, dtype=args.dtype,
                                                  model_type=args.model_type, adapter_only=args.adapter_only))


if __name__ == "__main__":
    sys.exit(main())
