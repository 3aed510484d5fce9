#!/usr/bin/env python
"""Generations for AlpacaEval 2 (and any chat evaluation) from a trained checkpoint or an exported
HF folder, with the paper's settings.

    python tools/generate.py --model outputs/llama1b_mmpo --prompts alpaca_eval.json --output outputs.json
    python tools/generate.py --model hf/llama1b_mmpo --prompts alpaca_eval.json --output outputs.json \\
        --generator mmpo-1b

``--prompts``: a JSON list or JSONL of objects with an ``instruction`` (AlpacaEval's own file), or
plain text, one prompt a line. Each prompt goes through the tokenizer's chat template as one user
turn. Writes ``[{"instruction", "output", "generator"}]`` (AlpacaEval's model-outputs format).
Defaults are the paper's: max_new_tokens 512, temperature 0.01, top-p 0.95; bf16 on a GPU, fp32 on
CPU. A megatron checkpoint (a run folder, checkpoints folder or step folder) is exported to a
temporary HF folder first (tools/convert_megatron_to_hf.py: merged LoRA, the source's generation
config), so generation stops where the source chat model's does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpo_megatron.config import DEVICES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported HF folder, or a megatron checkpoint / run folder")
    p.add_argument("--prompts", required=True, help="JSON list / JSONL with 'instruction', or a text file (one a line)")
    p.add_argument("--output", required=True, help="where the generations go (JSON)")
    p.add_argument("--generator", help="the name AlpacaEval reports (default: the model folder's name)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.01, help="0 samples greedily")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="the first N prompts only")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_prompts(path: str, limit: int | None) -> list[str]:
    """Instructions from AlpacaEval's JSON, a JSONL file, or a text file."""
    text = Path(path).read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
    elif stripped.startswith("{"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = [{"instruction": line} for line in text.splitlines() if line.strip()]
    prompts = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise ValueError(f"--prompts: entry {number} of {path} has no 'instruction' string")
        prompts.append(row["instruction"])
    return prompts[:limit] if limit else prompts


def hf_folder(model: str, scratch: Path) -> Path:
    """``model`` if it is an HF folder, else its export (a megatron checkpoint) into ``scratch``."""
    folder = Path(model)
    if (folder / "config.json").is_file():
        return folder
    from mmpo_megatron.convert import convert_megatron_to_hf
    from mmpo_megatron.parallel import destroy_parallel

    try:
        return convert_megatron_to_hf(folder, scratch / "hf")
    finally:
        destroy_parallel(destroy_process_group=True)


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """Where generation stops: the generation config's end tokens (a chat model's end-of-turn) and
    the tokenizer's end-of-sequence token; a warning when the generation config names none."""
    configured = generation_config.eos_token_id
    ids = (
        list(configured) if isinstance(configured, (list, tuple)) else ([configured] if configured is not None else [])
    )
    if not ids:
        print("warning: the model's generation_config.json names no eos_token_id; stopping at the tokenizer's "
              f"end-of-sequence token {tokenizer.eos_token!r} only (a chat model's end-of-turn token may differ)",
              file=sys.stderr)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate(args: argparse.Namespace) -> list[dict]:
    """The generations, one per prompt, in order."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = read_prompts(args.prompts, args.limit)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with tempfile.TemporaryDirectory() as scratch:
        folder = hf_folder(args.model, Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.padding_side = "left"  # generation continues every row from its end
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            folder, torch_dtype=torch.bfloat16 if device == "cuda" else torch.float32
        )
        model = model.to(device).eval()
    generator = args.generator or Path(args.model).resolve().name
    sampling = {"do_sample": args.temperature > 0, "max_new_tokens": args.max_new_tokens,
                "eos_token_id": stop_token_ids(model.generation_config, tokenizer)}
    if args.temperature > 0:
        sampling.update(temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    out = []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="generating", unit="batch"):
        batch = prompts[start:start + args.batch_size]
        chats = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in batch
        ]
        encoded = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            tokens = model.generate(**encoded, pad_token_id=tokenizer.pad_token_id, **sampling)
        for prompt, row in zip(batch, tokens[:, encoded["input_ids"].shape[1]:]):
            out.append({"instruction": prompt, "output": tokenizer.decode(row, skip_special_tokens=True).strip(),
                        "generator": generator})
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    from mmpo_megatron.convert.checkpoints import ConversionError
    from mmpo_megatron.model.checkpoint import DamagedCheckpointError

    args = parse_args(argv)
    try:
        rows = generate(args)
    except (ValueError, FileNotFoundError, ConversionError, DamagedCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.output).write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    print(f"wrote {len(rows)} generations to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
