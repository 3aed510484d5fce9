"""Run a function on N local gloo processes and collect what each rank returns: the test suite's
ranks, and tools/plan_layout.py's measurements.

A process's start-up (interpreter, torch and megatron imports) costs seconds, so the processes are
pooled: one pool per calling process, grown to the largest world size asked for and kept until
it exits; a task on N ranks runs on the pool's first N processes (the rest wait). After each task
every process group is destroyed; the next task creates its own on a fresh port, at any layout and
world size.

A task that deadlocks would otherwise wait for gloo's own timeout (30 minutes): after ``timeout``
seconds the ranks still running print their Python stacks, are stopped and named
(RanksTimedOut), and the pool is replaced. A rank that raises fails the call with its traceback;
ranks left waiting for it in a collective are stopped too.
"""

from __future__ import annotations

import atexit
import faulthandler
import gc
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from mmpo_megatron.parallel.runtime import destroy_parallel, free_port

DEFAULT_TIMEOUT_S = 420.0
"""Well above any multi-rank task of the test suite on a 2-core machine."""

FAILURE_GRACE_S = 15.0
"""After one rank fails, how long the others get to finish before they count as stuck in a collective."""


class RanksTimedOut(TimeoutError):
    """Ranks were still running when run_on_ranks' time limit passed (a deadlock, most likely)."""


class RankFailed(RuntimeError):
    """A rank raised; the message holds its traceback."""


def _set_rank_env(rank: int, world_size: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))


def _prepare_rank_process() -> None:
    # Children re-import megatron, which warns about missing TE/Apex once per process and module.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::DeprecationWarning,ignore::FutureWarning")
    # On a time-out the parent sends SIGUSR2: every thread's stack goes to stderr, to show where it
    # hangs (SIGUSR1 and SIGTERM stop a training run: train/stopping.py).
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    # More ranks than cores: one thread each avoids oversubscription stalls.
    torch.set_num_threads(1)


def _run_task(rank: int, fn: Callable[..., Any], args: tuple, kwargs: dict, port: int,
              out_dir: str) -> tuple[bool, str, float]:
    """(ok, result file or traceback, when it raised): the first rank to raise is the cause; the
    ranks its exit left in a collective raise later, though their reports may arrive first."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(port)
    try:
        result = fn(*args, **kwargs)
        path = Path(out_dir) / f"rank{rank}.pt"
        torch.save(result, path)
        return True, str(path), 0.0
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises it)
        return False, traceback.format_exc(), time.time()
    finally:
        # Every group goes, the default one too: megatron drops its groups without destroying them,
        # and gloo groups left alive keep polling threads (17 per TP=2 task) that add up to a core.
        destroy_parallel(destroy_process_group=True)
        # What survives the task (imports, caches) is kept for good: later full collections, one
        # per finished run in destroy_parallel, then walk only what later tasks allocate (~0.4 s
        # each otherwise, over megatron's, transformers' and datasets' module objects). Collect
        # first, so no garbage of this task (its result, a traceback's frames) is frozen with it.
        gc.collect()
        gc.freeze()


def _pool_worker(rank: int, tasks, results, parent: int) -> None:
    _prepare_rank_process()
    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test session is gone
                return
            continue
        if task is None:
            return
        fn, args, kwargs, port, out_dir, world_size = task
        _set_rank_env(rank, world_size)
        results.put((rank, *_run_task(rank, fn, args, kwargs, port, out_dir)))


class RankPool:
    """Spawned processes that run tasks together, on as many of them as a task asks for (see the
    module docstring)."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._first_failure_at = 0.0
        self.tasks: list = []
        self.results = self._ctx.Queue()
        self.processes: list = []

    def grow(self, world_size: int) -> None:
        """Start processes until there are ``world_size``."""
        for rank in range(len(self.processes), world_size):
            self.tasks.append(self._ctx.Queue())
            # Not daemonic: megatron's checkpoint writer starts processes of its own.
            process = self._ctx.Process(target=_pool_worker, args=(rank, self.tasks[rank], self.results, os.getpid()),
                                        name=f"mmpo-rank{rank}")
            process.start()
            self.processes.append(process)

    def run(self, fn: Callable[..., Any], world_size: int, args: tuple, kwargs: dict, timeout: float) -> list[Any]:
        """Ranks 0..world_size-1 run ``fn(*args, **kwargs)``; results by rank."""
        self.grow(world_size)
        with tempfile.TemporaryDirectory(prefix="mmpo-ranks-") as out_dir:
            port = free_port()
            for task_queue in self.tasks[:world_size]:
                task_queue.put((fn, args, kwargs, port, out_dir, world_size))
            done: dict[int, tuple[bool, str, float]] = {}  # rank -> _run_task's report
            deadline = time.monotonic() + timeout
            while len(done) < world_size:
                failed = [r for r, (ok, _, _) in done.items() if not ok]
                wait_until = min(deadline, self._first_failure_at + FAILURE_GRACE_S) if failed else deadline
                try:
                    rank, ok, payload, raised_at = self.results.get(
                        timeout=max(0.05, min(1.0, wait_until - time.monotonic()))
                    )
                except queue.Empty:
                    if any(not p.is_alive() for p in self.processes):
                        self._raise_stopped(fn, world_size, done, "a rank process died")
                    if time.monotonic() >= wait_until:
                        self._raise_stopped(
                            fn, world_size, done, None if failed else f"still running after {timeout:.0f} s"
                        )
                    continue
                if not ok and not failed:
                    self._first_failure_at = time.monotonic()
                done[rank] = (ok, payload, raised_at)
            if any(not ok for ok, _, _ in done.values()):
                raise _first_failure(fn, done, stuck=[])
            return [torch.load(done[r][1], weights_only=False) for r in range(world_size)]

    def _raise_stopped(self, fn: Callable[..., Any], world_size: int, done: dict, why: str | None) -> None:
        stuck = [r for r in range(world_size) if r not in done]
        _print_stacks_then_kill(self.processes, stuck)
        self.close(force=True)
        if any(not ok for ok, _, _ in done.values()):
            raise _first_failure(fn, done, stuck)
        raise _timed_out(fn, stuck, why)

    def alive(self) -> bool:
        """Whether every rank process is still running."""
        return all(p.is_alive() for p in self.processes)

    def close(self, force: bool = False) -> None:
        """Stop the processes (politely unless ``force``)."""
        if not force:
            for task_queue in self.tasks:
                task_queue.put(None)
            for process in self.processes:
                process.join(timeout=10)
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        global _POOL
        if _POOL is self:
            _POOL = None


_POOL: RankPool | None = None


@atexit.register
def close_pool() -> None:
    """Stop the pool (at interpreter exit)."""
    if _POOL is not None:
        _POOL.close()


def _print_stacks_then_kill(processes, stuck: list[int]) -> None:
    """SIGUSR2 to the stuck ranks (faulthandler prints their stacks), then kill every live process."""
    for rank in stuck:
        if processes[rank].is_alive():
            os.kill(processes[rank].pid, signal.SIGUSR2)
    time.sleep(1.0)  # let faulthandler write the stacks
    for process in processes:
        if process.is_alive():
            process.kill()


def _timed_out(fn: Callable[..., Any], stuck: list[int], why: str | None) -> RanksTimedOut:
    return RanksTimedOut(f"{_name(fn)}: rank(s) {stuck} {why} (a collective that not every rank reached?); "
                         f"their stacks are printed above")


def _first_failure(fn: Callable[..., Any], done: dict[int, tuple[bool, str, float]], stuck: list[int]) -> RankFailed:
    """The first rank that raised, with its traceback (the others often fail only because it left)."""
    failed = sorted((rank for rank, (ok, _, _) in done.items() if not ok), key=lambda r: done[r][2])
    rank = failed[0]
    others = [r for r in failed[1:]]
    note = "".join([f"; then rank(s) {others} failed too" if others else "",
                    f"; rank(s) {stuck} were left waiting and were stopped" if stuck else ""])
    return RankFailed(f"{_name(fn)} failed on rank {rank}{note}:\n{done[rank][1]}")


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", repr(fn))


def _spawned_rank_main(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple,
                       kwargs: dict) -> None:
    _prepare_rank_process()
    _set_rank_env(rank, world_size)
    ok, payload, _ = _run_task(rank, fn, args, kwargs, port, out_dir)
    if not ok:
        raise RankFailed(payload)


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
                 fresh: bool = False, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return each rank's result, by rank.

    ``fn`` must be importable (module level) and calls ``initialize_parallel`` itself, so it can
    visit several layouts. ``fresh=True`` spawns new processes instead of the pooled ones (CUDA
    runs need them: a pooled process may hold the CPU shim). A rank that raises fails the call
    with its traceback; ranks still running after ``timeout`` seconds are stopped and named.
    """
    global _POOL
    if fresh:
        return _run_fresh(fn, world_size, args, kwargs, timeout)
    if _POOL is not None and not _POOL.alive():
        _POOL.close(force=True)
    if _POOL is None:
        _POOL = RankPool()
    return _POOL.run(fn, world_size, args, kwargs, timeout)


def _run_fresh(fn: Callable[..., Any], world_size: int, args: tuple, kwargs: dict, timeout: float) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="mmpo-ranks-") as out_dir:
        context = mp.start_processes(_spawned_rank_main, args=(fn, world_size, free_port(), out_dir, args, kwargs),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                stuck = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                _print_stacks_then_kill(context.processes, stuck)
                raise _timed_out(fn, stuck, f"still running after {timeout:.0f} s")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
