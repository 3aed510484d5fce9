#!/usr/bin/env python
"""Inspect preference data before spending GPU hours: drop report, length percentiles, and rendered
examples with prompt / chosen / rejected tokens marked, exactly as the trainer will see them.

    python tools/inspect_data.py                                  # the embedded demo data
    python tools/inspect_data.py --data pairs.jsonl --format plain --tokenizer ./tok --max-length 1024
    python tools/inspect_data.py data.max_length=512 data.tokenizer=./tok --examples 3 --report r.json

Positional ``data.*=value`` overrides use the trainer's data config keys. Exit code 2 on a fatal
data error, with the message on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from mmpo_megatron.config import ConfigError, DataConfig, DataSourceConfig  # noqa: E402
from mmpo_megatron.data.collate import collate_pairs  # noqa: E402
from mmpo_megatron.data.formats import DataError  # noqa: E402
from mmpo_megatron.data.pipeline import build_pairs, train_sources, write_report  # noqa: E402
from mmpo_megatron.data.tokenizer import load_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; anything of the form key=value is a data config override."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append",
                        help="a data file, folder or hub name (default: the embedded demo data); given several "
                             "times, the sources are mixed as the trainer mixes them (each with --split and --format)")
    parser.add_argument("--split", default="train", help="split to read (default: train)")
    parser.add_argument("--format", default="auto",
                        help="auto, plain, orca, ultrafeedback, conversational, nemo, or columns (name the "
                             "columns with a data.train override); default auto")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub name (default: embedded byte-level)")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--max-prompt-length", type=int)
    parser.add_argument("--examples", type=int, default=2, help="how many pairs to render (default 2)")
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("overrides", nargs="*", help="data config overrides, e.g. data.max_length=512")
    return parser.parse_args(argv)


def data_config(args: argparse.Namespace) -> DataConfig:
    """The trainer's DataConfig from defaults, then dotted overrides, then flags."""
    base = OmegaConf.structured(DataConfig)
    dotlist = [o[len("data."):] if o.startswith("data.") else o for o in args.overrides]
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist))
    values = OmegaConf.to_container(merged, resolve=True)
    if args.data:
        values["train"] = [{"path": path, "split": args.split, "format": args.format} for path in args.data]
    if args.tokenizer:
        values["tokenizer"] = args.tokenizer
    if args.max_length is not None:
        values["max_length"] = args.max_length
    if args.max_prompt_length is not None:
        values["max_prompt_length"] = args.max_prompt_length
    if values.get("train"):
        values["train"] = [DataSourceConfig(**s) for s in values["train"]]
    return DataConfig(**values)


def percentiles(values: list[int]) -> str:
    """p50 / p90 / p99 / max of a list of lengths."""
    if not values:
        return "n/a"
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {pick(0.5)}  p90 {pick(0.9)}  p99 {pick(0.99)}  max {ordered[-1]}"


def render(pair: dict, tokenizer) -> str:
    """The pair as the model sees it: [prompt] and {completion} token spans, masks as 0/1."""
    batch = collate_pairs([pair], tokenizer.pad_token_id, pad_to_multiple=1)
    lines = [f"--- pair {pair['index']} from {pair['source']}"]
    for row, side in ((0, "chosen"), (1, "rejected")):
        length = int(batch.row_lengths[row])
        prompt_len = len(pair["prompt_ids"])
        seq = pair["prompt_ids"] + pair[f"{side}_ids"]
        prompt_text = tokenizer.decode(seq[:prompt_len])
        completion_text = tokenizer.decode(seq[prompt_len:])
        mask = "".join("1" if m else "0" for m in batch.loss_mask[row, :length].tolist())
        lines.append(f"{side:>8}: [{prompt_text}]{{{completion_text}}}")
        lines.append(f"{'':>8}  tokens {len(seq)} (prompt {prompt_len}); loss mask over labels: {mask}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the inspection; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        config = data_config(args)
        tokenizer = load_tokenizer(config.tokenizer)
        pairs, report = build_pairs(train_sources(config), tokenizer, config)
    except (DataError, ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.report:
            write_report_error(args.report, str(exc))
        return 2
    print(f"data report: {report.summary()}")
    for source in report.sources:
        print(f"  {source['source']}: {source['pairs_used']} pairs an epoch (weight {source['weight']:g} of "
              f"{source['pairs_kept']} kept)")
    print(f"  mixed: {report.pairs_used} pairs an epoch")
    for reason, count in sorted(report.dropped.items()):
        print(f"  dropped {reason}: {count}")
    for error in report.errors[:5]:
        print(f"  e.g. {error['source']} row {error['index']}: {error['error']}")
    prompt_lengths = [len(p) for p in pairs["prompt_ids"]]
    print(f"prompt tokens:   {percentiles(prompt_lengths)}")
    print(f"chosen tokens:   {percentiles([len(c) for c in pairs['chosen_ids']])}")
    print(f"rejected tokens: {percentiles([len(r) for r in pairs['rejected_ids']])}")
    for i in range(min(args.examples, len(pairs))):
        print(render(pairs[i], tokenizer))
    if args.report:
        write_report(report, args.report)
        print(f"report written to {args.report}")
    return 0


def write_report_error(path: str, message: str) -> None:
    """A report for a run that failed before counting."""
    Path(path).write_text(
        json.dumps({"pairs_in": 0, "pairs_kept": 0, "dropped": {}, "errors": [{"fatal": message}]}, indent=2)
    )


if __name__ == "__main__":
    sys.exit(main())
