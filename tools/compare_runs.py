#!/usr/bin/env python
"""The paper's Figure 1 from a sweep's run folders: held-out reward accuracy and the language-model
NLL change against beta, per loss, as a table and a PNG.

    python tools/compare_runs.py outputs/sweep/* --png sweep.png --table sweep.md

Each run folder (examples/slurm/sweep.sh makes one per loss x beta) has the resolved config.yaml
(the loss and its beta) and metrics.jsonl; a run's figures are its last evaluation's:
``rewards/accuracies`` (held-out pairs whose chosen reward beats the rejected one, by each loss's
own reward: MMPO's scores sc > sr, which hold the normalised prior; DPO's and IPO's implicit
reward; SimPO's beta x mean log-prob. So compare it across betas within a loss),
``implicit_rewards/accuracies`` (the same policy-vs-reference reward for every loss that has a
reference: the column to compare MMPO with DPO) and ``lm/nll_delta`` (with eval.lm_data: how far the
model's NLL on that corpus moved from the reference's; the paper's second claim). Folders given
that are not run folders (a sweep's reference_cache) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("rewards/accuracies", "implicit_rewards/accuracies", "lm/nll_delta")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (train.output_dir of each run)")
    p.add_argument("--png", help="write the plot here")
    p.add_argument("--table", help="write the markdown table here too")
    return p.parse_args(argv)


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a run's config.yaml and metrics.jsonl."""
    return (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").is_file()


def read_run(folder: Path) -> dict:
    """A run's loss, beta, steps and last evaluation's metrics."""
    import yaml

    config = yaml.safe_load((folder / "config.yaml").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("split") == "eval"]
    if not evals:
        raise ValueError(f"{folder}: metrics.jsonl has no evaluation (set train.eval_interval)")
    last = evals[-1]
    return {
        "run": folder.name,
        "loss": config["loss"]["name"],
        "beta": float(config["loss"]["beta"]),
        "step": last["step"],
        **{m: last.get(m) for m in METRICS},
    }


def table(rows: list[dict]) -> str:
    """Markdown, sorted by loss then beta."""
    lines = ["| loss | beta | step | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
    for r in sorted(rows, key=lambda r: (r["loss"], r["beta"])):
        values = " | ".join("-" if r[m] is None else f"{r[m]:.4f}" for m in METRICS)
        lines.append(f"| {r['loss']} | {r['beta']:g} | {r['step']} | {values} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """One panel per metric that some run has, a line per loss, beta on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in METRICS if any(r[m] is not None for r in rows)]
    figure, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], shown):
        for loss in sorted({r["loss"] for r in rows}):
            points = sorted((r["beta"], r[metric]) for r in rows if r["loss"] == loss and r[metric] is not None)
            if points:
                axis.plot(*zip(*points), marker="o", label=loss)
        axis.set_xscale("log")
        axis.set_xlabel("beta")
        axis.set_title(metric)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    args = parse_args(argv)
    try:
        runs = [Path(r) for r in args.runs]
        for skipped in [r for r in runs if not is_run_folder(r)]:
            print(f"skipped {skipped}: no config.yaml and metrics.jsonl (not a run folder)", file=sys.stderr)
        rows = [read_run(r) for r in runs if is_run_folder(r)]
        if not rows:
            raise ValueError("none of the folders given is a run folder")
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = table(rows)
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")
    if args.png:
        plot(rows, args.png)
        print(f"plot written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
