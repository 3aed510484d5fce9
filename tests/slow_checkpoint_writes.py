#!/usr/bin/env python
"""examples/train_mmpo.py with slow background checkpoint writes, for tests/test_cluster.py: once
the folder $SLOW_WRITES_AFTER exists (an earlier checkpoint is complete), every forked writer of
dist_checkpointing's asynchronous save sleeps ten minutes before writing, so that a test can kill
the run while a write is in flight."""

import os
import runpy
import time
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

REPO = Path(__file__).resolve().parents[1]
_write = FileSystemWriterAsync.write_preloaded_data_multiproc


def _slow_write(*args, **kwargs):
    if Path(os.environ["SLOW_WRITES_AFTER"]).exists():
        time.sleep(600)
    return _write(*args, **kwargs)


if __name__ == "__main__":  # dist_checkpointing's Manager re-imports the main module
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_slow_write)
    runpy.run_path(str(REPO / "examples" / "train_mmpo.py"), run_name="__main__")
