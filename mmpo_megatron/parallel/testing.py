"""Run a function on N local gloo processes and collect what each rank returns (for tests).

Start-up (interpreter, torch and megatron imports: ~3-4 s a process) dominates a test, so a
test should group several checks, and several layouts, into one call.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from mmpo_megatron.parallel.runtime import destroy_parallel, free_port


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    # More ranks than cores: one thread each avoids oversubscription stalls.
    torch.set_num_threads(1)
    try:
        result = fn(*args, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_parallel(destroy_process_group=True)


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Spawn ``world_size`` processes that each run ``fn(*args, **kwargs)``; return results by rank.

    ``fn`` must be importable (module level) and calls ``initialize_parallel`` itself, so it can
    visit several layouts. A failure in any rank raises here with that rank's traceback.
    """
    # Children re-import megatron, which warns about missing TE/Apex once per process and module.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::DeprecationWarning,ignore::FutureWarning")
    with tempfile.TemporaryDirectory(prefix="mmpo-ranks-") as out_dir:
        mp.start_processes(
            _rank_main,
            args=(fn, world_size, free_port(), out_dir, args, kwargs),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
