"""The one channel for the lines a user reads: ``say`` prints a message once, on global rank 0, and
through the progress bar while one is showing (train/logger.py hands it the bar), so the bar stays
whole. Per-step numbers go through the MetricsLogger instead; a run's warnings through ``logging``
(README.md, "Code layout and house rules")."""

from __future__ import annotations

import os
from typing import Callable

_writer: Callable[[str], None] | None = None


def say(text: str) -> None:
    """Print ``text`` on global rank 0 (every other rank stays quiet)."""
    if _global_rank() != 0:
        return
    if _writer is not None:
        _writer(text)
    else:
        print(text, flush=True)


def write_through(writer: Callable[[str], None] | None) -> None:
    """Send the messages through ``writer`` (a progress bar's ``write``); None: plain print again."""
    global _writer
    _writer = writer


def _global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
