"""Stopping a run before its last step, with a checkpoint: on SIGTERM / SIGUSR1 (a preemption, a
job's time limit, torchrun forwarding either), or when the wall-clock budget
``train.max_wall_minutes`` would run out during the next step and its save.

Every rank installs the handlers; a handler only sets a flag. At each step boundary the ranks agree
with one two-element all-reduce (signal seen anywhere, budget short anywhere), so all of them stop
after the same completed step, save it, and exit with STOPPED_EXIT_CODE.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

STOPPED_EXIT_CODE = 75
"""Exit code of a run that stopped early with a checkpoint (sysexits' EX_TEMPFAIL: run the same
command again to resume). A finished run exits 0, a config error 2."""

# Until a save has been measured, one is estimated from the bytes this rank writes at this rate
# plus a fixed cost (barriers, metadata, the rename): both low, so the first estimate errs long.
ASSUMED_WRITE_BYTES_PER_S = 200e6
ASSUMED_SAVE_OVERHEAD_S = 5.0
RECENT_STEPS = 8  # the next step is estimated as the longest of the last few (evaluations included)


class TrainingStopped(Exception):
    """The run stopped before its last step, after saving the checkpoint of ``step``."""

    def __init__(self, reason: str, step: int, checkpoint: str | None, records: list[dict[str, Any]]) -> None:
        super().__init__(f"stopped at step {step} ({reason}); checkpoint {checkpoint}; run the same command to resume")
        self.reason = reason
        self.step = step
        self.checkpoint = checkpoint
        self.records = records

    def status(self) -> dict[str, Any]:
        """The run-status record of this stop (write_run_status)."""
        return {"status": "stopped", "step": self.step, "reason": self.reason, "checkpoint": self.checkpoint}


def process_started_at() -> float:
    """This process's start (seconds since the epoch): the wall-clock budget counts from it."""
    import psutil

    return psutil.Process().create_time()


class StopConditions:
    """The stop flags of one run; a context manager that installs and restores the signal handlers
    (from before the data and model are built: a signal during tokenisation or a reference
    precompute stops the run at its first step boundary too)."""

    def __init__(self, max_wall_minutes: float | None, device: torch.device, started_at: float | None = None) -> None:
        self.budget_s = None if max_wall_minutes is None else max_wall_minutes * 60.0
        self.device = device
        self.started_at = process_started_at() if started_at is None else started_at
        self.signal_number = 0  # the stop signal received, 0 for none
        self.step_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.save_seconds: list[float] = []
        self.first_save_estimate_s = ASSUMED_SAVE_OVERHEAD_S
        self.background_save_since: float | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopConditions":
        global _HANDLERS_ACTIVE
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the caller's handlers stay
                pass
        _HANDLERS_ACTIVE = bool(self._previous)
        _reset_stop_signals_in_forks()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _HANDLERS_ACTIVE
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is all we can restore.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        _HANDLERS_ACTIVE = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_number = signum

    def expect_save_bytes(self, save_bytes: int) -> None:
        """Estimate a save (until one is measured) from the bytes this rank writes."""
        self.first_save_estimate_s = ASSUMED_SAVE_OVERHEAD_S + save_bytes / ASSUMED_WRITE_BYTES_PER_S

    def record_step(self, seconds: float) -> None:
        """One training step's duration (with its logging), for the budget's estimate."""
        self.step_seconds.append(seconds)

    def record_eval(self, seconds: float) -> None:
        """One evaluation's duration: added to the estimate of a step that evaluates."""
        self.eval_seconds.append(seconds)

    def record_background_save(self) -> None:
        """A checkpoint started writing in the background: a stop first waits for it."""
        self.background_save_since = time.time()

    def record_save(self, seconds: float) -> None:
        """One save's whole duration (until its checkpoint was complete, in the background or not)."""
        self.save_seconds.append(seconds)
        self.background_save_since = None

    def save_estimate_s(self) -> float:
        """How long the stop's save will take: the longest measured, else the first estimate."""
        return max(self.save_seconds) if self.save_seconds else self.first_save_estimate_s

    def budget_short(self, next_step_evaluates: bool = False) -> bool:
        """Whether the next step (and its evaluation), the rest of a background write and a save
        would overrun the wall-clock budget."""
        if self.budget_s is None:
            return False
        now = time.time()
        needed = max(self.step_seconds[-RECENT_STEPS:], default=0.0) + self.save_estimate_s()
        if next_step_evaluates:
            needed += max(self.eval_seconds, default=0.0)
        if self.background_save_since is not None:
            needed += max(0.0, self.save_estimate_s() - (now - self.background_save_since))
        return now - self.started_at + needed > self.budget_s

    def reason(self, next_step_evaluates: bool = False) -> str | None:
        """Why to stop now, agreed by every rank (None: go on). Called by all ranks at a step boundary."""
        # The signal's number travels, so every rank (rank 0 writes the run status) names it.
        flags = torch.tensor(
            [float(self.signal_number), float(self.budget_short(next_step_evaluates))], device=self.device
        )
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return f"signal {signal.Signals(int(flags[0].item())).name}"
        if flags[1] > 0:
            return f"{BUDGET_REASON}={self.budget_s / 60:g} would run out during the next step and its save"
        return None


BUDGET_REASON = "train.max_wall_minutes"

_HANDLERS_ACTIVE = False
_FORK_HOOK_REGISTERED = False


def _reset_stop_signals_in_forks() -> None:
    """A forked child (a datasets worker) gets the default handlers back: with the parent's, which
    only set a flag nobody reads there, a pool's terminate() could not end it. Checkpoint writers
    are forked with the signals blocked instead (model/checkpoint.py's writers_shielded)."""
    global _FORK_HOOK_REGISTERED
    if not _FORK_HOOK_REGISTERED:
        os.register_at_fork(after_in_child=_default_stop_signals)
        _FORK_HOOK_REGISTERED = True


def _default_stop_signals() -> None:
    global _HANDLERS_ACTIVE
    if not _HANDLERS_ACTIVE:
        return
    _HANDLERS_ACTIVE = False
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_DFL)
        except ValueError:  # forked from a thread other than the main one
            pass


RUN_STATUS_ENV = "MMPO_RUN_STATUS"


def write_run_status(status: dict[str, Any]) -> None:
    """On global rank 0, write ``status`` (finished / stopped / an error) to the JSON file named by
    $MMPO_RUN_STATUS, if set: a launcher that only sees torchrun's exit code reads the outcome there."""
    target = os.environ.get(RUN_STATUS_ENV)
    if not target or os.environ.get("RANK", "0") != "0":
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    tmp.replace(path)
