"""Metrics to the console (progress bar with ETA), metrics.jsonl, TensorBoard and W&B (opt-in).

Only one rank logs (the caller decides which); every sink gets the same dict.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mmpo_megatron.config import LoggingConfig
from mmpo_megatron.messages import say, write_through

# The names users and other tools read from metrics.jsonl (TRL's, where TRL has one).
CONSOLE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "tokens_per_s")


class MetricsLogger:
    """Fan-out of per-step metrics; a no-op object on ranks that do not log."""

    def __init__(self, output_dir: str | Path, config: LoggingConfig, total_steps: int, enabled: bool,
                 run_config: dict | None = None, resume_step: int | None = None) -> None:
        """``resume_step``: the step a run resumes after (-1: a start from scratch); what an earlier
        attempt logged past it (between its last checkpoint and a crash) is dropped, so every step
        is logged once."""
        self.enabled = enabled
        self.total_steps = total_steps
        self._bar = self._tb = self._wandb = None
        self._jsonl = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and (dropped := drop_rows_after(out / "metrics.jsonl", resume_step)):
            after = (f"past step {resume_step} (logged after the checkpoint resumed from)" if resume_step >= 0
                     else "of an earlier attempt that saved no checkpoint")
            say(f"metrics.jsonl: {dropped} rows {after} dropped")
        self._jsonl = (out / "metrics.jsonl").open("a", encoding="utf-8")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events of the earlier attempt from that step on.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)
        if config.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("logging.wandb=true needs `pip install wandb`") from exc
            self._wandb = wandb.init(project=config.wandb_project, dir=str(out), config=run_config or {})
        if config.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
        # Also without a bar: a run that failed before closing its logger leaves no writer behind.
        write_through(self._bar.write if self._bar is not None else None)
        self._start = time.time()

    def start_at(self, step: int) -> None:
        """Set the progress bar to a resumed step."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        """Write one record ``{step, split, **metrics}`` to every sink."""
        if not self.enabled:
            return
        record = {
            "step": step,
            "split": split,
            **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()},
        }
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()  # nothing lost on a crash
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)
        summary = "  ".join(f"{k.split('/')[-1]} {metrics[k]:.4g}" for k in CONSOLE_KEYS if k in metrics)
        if split == "train" and self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(summary, refresh=True)
        else:
            self.message(f"[{split} step {step}] {summary or json.dumps(record)}")

    def message(self, text: str) -> None:
        """A line of text that does not break the progress bar (mmpo_megatron.messages.say)."""
        if self.enabled:
            say(text)

    def close(self) -> None:
        """Flush and close every sink."""
        if not self.enabled:
            return
        if self._bar is not None:
            write_through(None)
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl without its rows past ``step`` (atomically); returns how many were dropped."""
    if not path.exists():
        return 0
    kept = []
    dropped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut short by a crash mid-write
            dropped += 1
            continue
        if row_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped
