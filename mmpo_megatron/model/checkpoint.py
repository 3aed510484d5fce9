"""Checkpoints with megatron's dist_checkpointing: model, optimizer, scheduler, data position,
RNG states and the resolved config.

A checkpoint is written to ``step_NNNNNNN.tmp`` and renamed to ``step_NNNNNNN`` only after every
rank has finished, so a crash during a save leaves the previous checkpoint as the newest complete
one. Model weights reshard on load (any TP/PP); optimizer state resumes under the same TP/PP
(DP may change: ``dp_reshardable``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from mmpo_megatron.config import ConfigError

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{7})$")
TRAINER_STATE = "trainer_state.json"
# Every file of a complete checkpoint with its size, written just before TRAINER_STATE marks the
# folder complete: a truncated or missing file is found before megatron's loader meets it.
MANIFEST = "manifest.json"
# The DistributedOptimizer's default sharding (fully_sharded_model_space) fails on this path
# ("flattened_range is not supported"); fully_reshardable fails with KeyError 'step'.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def step_dir(root: Path, step: int) -> Path:
    """Folder of the checkpoint of ``step``."""
    return root / f"step_{step:07d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.tmp`` leftovers are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / TRAINER_STATE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


class DamagedCheckpointError(RuntimeError):
    """A checkpoint's files do not match what was recorded when it was saved."""


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def checkpoint_damage(path: str | Path) -> str | None:
    """What is wrong with a checkpoint's files against its manifest (None: intact, or no manifest to check)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.exists():
        return None  # saved before manifests existed: nothing to compare with
    try:
        expected = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return f"{MANIFEST} is unreadable"
    found = _file_sizes(path)
    for name, size in expected.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, {size} were saved"
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or None (damage is not checked: see latest_intact_checkpoint)."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def latest_intact_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match its manifest, warning about each newer damaged one.

    None when there is no complete checkpoint; DamagedCheckpointError, naming every one, when all are damaged.
    """
    found = complete_checkpoints(root)
    damaged = []
    for path in reversed(found):
        problem = checkpoint_damage(path)
        if problem is None:
            for bad in damaged:
                log.warning("checkpoint %s is damaged (%s); using the newest intact one, %s", bad[0], bad[1], path.name)
            return path
        damaged.append((path, problem))
    if damaged:
        listing = "; ".join(f"{p} ({problem})" for p, problem in damaged)
        raise DamagedCheckpointError(f"every checkpoint under {root} is damaged: {listing}. Move them aside to start "
                                     f"afresh, or pass checkpoint.resume=false")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run/checkpoints folder (its newest intact checkpoint)."""
    path = Path(path)
    if (path / TRAINER_STATE).exists() or (path / "metadata.json").exists():
        problem = checkpoint_damage(path)
        if problem is not None:
            raise DamagedCheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    for candidate in (path, path / "checkpoints"):
        newest = latest_intact_checkpoint(candidate)
        if newest is not None:
            return newest
    raise FileNotFoundError(f"no complete checkpoint at {path} (expected step_NNNNNNN folders with {TRAINER_STATE})")


EXTRA_STATE = "_extra_state"  # modules' non-tensor state: Transformer Engine's FP8 scaling history
LORA_BASE = "lora_base"  # trainer_state.json: the base weights an adapters-only checkpoint trained on


@dataclass(frozen=True)
class Parts:
    """Which parts of the model a checkpoint save or load covers: the base weights, the LoRA
    adapters (model/lora.py), the modules' extra state."""

    base: bool = True
    adapters: bool = True
    extra_state: bool = True

    def keeps(self, key: str) -> bool:
        """Whether a model state-dict key is covered."""
        from mmpo_megatron.model.lora import ADAPTER

        if key.endswith(EXTRA_STATE) and not self.extra_state:
            return False
        return self.adapters if f".{ADAPTER}." in key else self.base


EVERYTHING = Parts()
ADAPTERS_ONLY = Parts(base=False, extra_state=False)


def _model_state(chunks: Sequence[torch.nn.Module], parts: Parts = EVERYTHING) -> dict[str, Any]:
    # Names from the bare GPTModel: a checkpoint must not depend on DDP / Float16Module wrappers.
    from mmpo_megatron.model.builder import unwrap

    def state(chunk):
        return {k: v for k, v in unwrap(chunk).sharded_state_dict().items() if parts.keeps(k)}

    if len(chunks) == 1:
        return {"model": state(chunks[0])}
    return {f"model{i}": state(chunk) for i, chunk in enumerate(chunks)}


def _load_model_state(chunks: Sequence[torch.nn.Module], loaded: dict[str, Any], masters_of=None,
                      parts: Parts = EVERYTHING) -> None:
    """Every weight load goes through here. ``masters_of``: an optimizer whose fp32 master weights
    are then re-derived from the loaded parameters (under bf16 its next step would otherwise copy
    the masters' old values over them). Not for an optimizer whose own saved state is loaded: that
    state holds the fp32 masters (and dist_checkpointing may have loaded them in place already).
    A load of some ``parts`` leaves the others as they are."""
    from mmpo_megatron.model.builder import unwrap
    from mmpo_megatron.model.optimizer import refresh_masters

    for i, chunk in enumerate(chunks):
        state = loaded["model" if len(chunks) == 1 else f"model{i}"]
        if parts == EVERYTHING:
            unwrap(chunk).load_state_dict(state)
            continue
        missing, unexpected = unwrap(chunk).load_state_dict(state, strict=False)
        if unexpected or any(parts.keeps(name) for name in missing):
            raise RuntimeError(
                f"loading {parts}: missing {[n for n in missing if parts.keeps(n)]}, unexpected {unexpected}"
            )
    if masters_of is not None:
        refresh_masters(masters_of)


def checkpoint_parts(path: str | Path, chunks: Sequence[torch.nn.Module]) -> Parts:
    """What of this model the checkpoint at ``path`` holds: base weights, adapters, or both."""
    from megatron.core import dist_checkpointing

    from mmpo_megatron.model.lora import ADAPTER, has_lora

    keys = [k for k in dist_checkpointing.load_tensors_metadata(str(path)) if not k.startswith("optimizer.")]
    with_adapters = any(f".{ADAPTER}." in k for k in keys)
    with_base = any(f".{ADAPTER}." not in k for k in keys)
    if with_adapters and not has_lora(chunks):
        raise ConfigError(f"checkpoint {path} holds LoRA adapters, and this model has none: build it with the "
                          f"run's model.lora settings (trainer_state.json, 'model')")
    if not with_base and not with_adapters:
        raise DamagedCheckpointError(f"checkpoint {path} holds no weights")
    return Parts(base=with_base, adapters=with_adapters and has_lora(chunks))


def saved_model_config(trainer_state: dict[str, Any]):
    """The ModelConfig a checkpoint was trained with (trainer_state.json's ``model``). Its LoRA
    adapters are in the checkpoint: ``lora.init_from`` (where they started) is not read again."""
    from dataclasses import replace

    from mmpo_megatron.config import ModelConfig

    model = ModelConfig(**trainer_state["model"])
    return replace(model, lora=replace(model.lora, init_from=None))


def checkpoint_fingerprint(path: str | Path) -> str:
    """A content fingerprint of a dist checkpoint's weight files (``*.distcp``: names, sizes, first
    and last 64 KiB). The same after a copy or a move; different for other weights of the same
    shape. (``.metadata`` is left out: it records where and when it was saved.)"""
    path = resolve_checkpoint(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".distcp"):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(65536))
            handle.seek(max(0, size - 65536))
            digest.update(handle.read(65536))
    return digest.hexdigest()[:16]


def lora_base_record(base: str | Path | None) -> dict[str, Any]:
    """What an adapters-only checkpoint records of its base weights (trainer_state.json)."""
    if base is None:
        return {"weights": None, "fingerprint": None}
    resolved = resolve_checkpoint(base)
    return {"weights": str(resolved.resolve()), "fingerprint": checkpoint_fingerprint(resolved)}


def check_lora_base(checkpoint: Path, base: str | Path | None) -> None:
    """Stop unless ``base`` holds the weights the adapters of ``checkpoint`` trained on."""
    recorded = json.loads((Path(checkpoint) / TRAINER_STATE).read_text()).get(LORA_BASE)
    if recorded is None:
        return
    if base is None or checkpoint_fingerprint(base) != recorded["fingerprint"]:
        found = "none" if base is None else f"{base} (fingerprint {checkpoint_fingerprint(base)})"
        raise ConfigError(f"checkpoint.load_weights: the LoRA adapters in {checkpoint} trained on the base weights "
                          f"{recorded['weights']} (fingerprint {recorded['fingerprint']}); this run's base is {found}. "
                          f"Resume with the same base, or start a new train.output_dir")


def check_lora_settings(checkpoint: Path, lora) -> None:
    """Stop unless a resumed run's LoRA shape (rank, targets) is the checkpoint's."""
    from mmpo_megatron.config import LoraConfig

    saved = json.loads((Path(checkpoint) / TRAINER_STATE).read_text()).get("model", {}).get("lora")
    if saved is None:
        return
    saved = LoraConfig(**saved)
    if (saved.rank, saved.projections) != (lora.rank, lora.projections):
        raise ConfigError(
            f"model.lora: the checkpoints in {Path(checkpoint).parent} were trained with rank {saved.rank} "
            f"on {list(saved.projections)}; this run has rank {lora.rank} on {list(lora.projections)}. "
            f"Resume with the same settings, or start a new train.output_dir"
        )


def _load_recorded_base(
    path: Path, chunks: Sequence[torch.nn.Module], optimizer, base: str | Path | None = None
) -> None:
    """Before an adapters-only checkpoint: its base weights, from ``base`` (a run's
    checkpoint.load_weights) or where the checkpoint recorded them; the fingerprint checked."""
    recorded = json.loads((path / TRAINER_STATE).read_text()).get(LORA_BASE) or {}
    base = base or recorded.get("weights")
    if base is None:
        raise ConfigError(f"checkpoint {path} holds LoRA adapters only and records no base weights to load under them")
    if not Path(base).exists():
        raise ConfigError(f"checkpoint {path} holds LoRA adapters only; their base weights were at {base}, which "
                          f"does not exist now (moved? a run finds them at its checkpoint.load_weights)")
    check_lora_base(path, base)
    load_weights(base, chunks, optimizer)


def _check_adapter_keys(path: Path, state: dict[str, Any]) -> None:
    """Refuse a checkpoint holding adapters this model lacks (other targets): they would be dropped."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    from mmpo_megatron.model.lora import ADAPTER

    marker = f".{ADAPTER}."
    saved = {
        k for k in dist_checkpointing.load_tensors_metadata(str(path)) if marker in k and not k.startswith("optimizer.")
    }
    wanted = {v.key for chunk in state.values() if isinstance(chunk, dict) for v in chunk.values()
              if isinstance(v, ShardedBase) and marker in v.key}
    extra = sorted(saved - wanted)
    if extra:
        raise ConfigError(f"model.lora: checkpoint {path} holds adapters this model has none of ({extra[:3]}...): "
                          f"build it with the LoRA targets it was trained with")


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def save_checkpoint(
    root: str | Path,
    step: int,
    chunks: Sequence[torch.nn.Module],
    optimizer,
    trainer_state: dict[str, Any],
    *,
    keep_last: int,
    parts: Parts = EVERYTHING,
    extra_files: dict[str, Path] | None = None,
    background: "AsyncSaves | None" = None,
) -> Path:
    """Save atomically (temporary name, renamed when complete); prune to the newest ``keep_last``.
    ``extra_files``: name -> file copied into the checkpoint (the source model's metadata).
    ``background``: write asynchronously; the folder is complete once ``background`` finalises it."""
    root = Path(root)

    def prune() -> None:
        if dist.get_rank() == 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    return save_to(step_dir(root, step), chunks, optimizer, {**trainer_state, "step": step}, parts, extra_files,
                   background=background, then=prune)


def staging_folder(final: Path) -> Path:
    """Where save_to writes ``final`` before renaming it: ``<final>.tmp`` beside it."""
    return final.with_name(final.name + ".tmp")


def save_to(final: Path, chunks: Sequence[torch.nn.Module], optimizer, trainer_state: dict[str, Any],
            parts: Parts = EVERYTHING, extra_files: dict[str, Path] | None = None, *,
            background: "AsyncSaves | None" = None, then=None) -> Path:
    """Write a checkpoint folder under a temporary name and rename it when every rank is done
    (``then`` runs after the rename). With ``background`` the tensors are written by a forked
    process per rank, and the manifest, trainer state and rename wait for all of them."""
    from megatron.core import dist_checkpointing

    final = Path(final)
    tmp = staging_folder(final)
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _model_state(chunks, parts)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    with writers_shielded():  # a foreground save forks its writers in here (megatron-core 0.16)
        request = dist_checkpointing.save(state, str(tmp), **_save_mode(background is not None))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")

    def mark_complete() -> None:
        dist.barrier()
        if rank == 0:
            for name, source in (extra_files or {}).items():
                shutil.copy2(source, tmp / name)
            (tmp / MANIFEST).write_text(json.dumps(_file_sizes(tmp), indent=1))
            (tmp / TRAINER_STATE).write_text(
                json.dumps({**trainer_state, "world_size": dist.get_world_size()}, indent=2)
            )
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        dist.barrier()
        if then is not None:
            then()

    if background is None:
        mark_complete()
    else:
        request.add_finalize_fn(mark_complete)
        background.schedule(request, final)
    return final


def _save_mode(in_background: bool) -> dict[str, Any]:
    """dist_checkpointing.save's arguments for a foreground or background save. From megatron-core
    0.19 a background save defaults to nvidia-resiliency-ext's writer (not a dependency): ask for
    megatron's own, the one whose results queue keep_checkpoint_writes_through shields."""
    import inspect

    from megatron.core import dist_checkpointing

    if not in_background:
        return {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_sharded_save": True, "async_strategy": "mcore"}
    return {"async_sharded_save": True}


class AsyncSaves:
    """Checkpoints being written in the background (megatron's AsyncCallsQueue, one forked writer
    per rank and save), at most one at a time. Every method is called by all ranks together."""

    def __init__(self) -> None:
        self._queue = None
        self.pending: Path | None = None
        self._started = 0.0
        self.last_duration_s: float | None = None  # from the schedule to the rename, of the last save

    def schedule(self, request, final: Path) -> None:
        """Start writing ``request``; a save still in flight is finished first."""
        import time

        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.wait()
        if self._queue is None:
            self._queue = AsyncCallsQueue(persistent=False)
        self._started = time.perf_counter()
        with writers_shielded():  # the writer is forked here
            self._queue.schedule_async_request(request)
        self.pending = final

    def poll(self) -> Path | None:
        """Finalise the save in flight if every rank's writer is done; returns its folder then (one
        small all-reduce while a save is pending, none otherwise)."""
        return self._finalize(blocking=False)

    def wait(self) -> Path | None:
        """Block until the save in flight is written and marked complete; returns its folder."""
        return self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> Path | None:
        import time

        if self.pending is None:
            return None
        self._queue.maybe_finalize_async_calls(blocking=blocking)
        if self._queue.get_num_unfinalized_calls():
            return None
        done = self.pending
        self.pending = None
        self.last_duration_s = time.perf_counter() - self._started
        return done

    def abort(self) -> None:
        """Kill this rank's writer (after an error): the folder stays unmarked, the previous checkpoint newest."""
        if self._queue is not None:
            # The queue's own close(abort=True) only stops a persistent writer; ours are one per
            # save, and on megatron-core 0.16 each forks writers of its own.
            while self._queue.async_calls:
                caller = self._queue.async_calls.popleft().async_caller
                _kill_descendants(getattr(caller, "process", None))
                caller.close(abort=True)
            self._queue.close(abort=True)
            _drain_results_queue()  # a killed writer's result must not answer the next save
        self.pending = None


def _kill_descendants(process) -> None:
    """SIGKILL every process below ``process`` (a multiprocessing.Process, or None)."""
    import psutil

    if process is None or process.pid is None:
        return
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for descendant in descendants:
        try:
            descendant.kill()
        except psutil.NoSuchProcess:
            pass


def _drain_results_queue() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results = filesystem_async._results_queue
    while results is not None:
        try:
            results.get_nowait()
        except (queue.Empty, OSError, EOFError):
            return


def keep_checkpoint_writes_through(signals: Sequence[int]) -> None:
    """Let checkpoint writes outlive ``signals`` (the ones that stop a run): a preemption signals
    every process of the job, and a writer, or megatron's results queue (a spawned Manager with
    default handlers), dying of it would fail the stop's checkpoint. From now on the writers are
    forked with ``signals`` blocked (writers_shielded), and the results queue blocks them too.
    Call before the first save."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from mmpo_megatron.signal_shield import shield_from

    global _SHIELDED_SIGNALS
    _SHIELDED_SIGNALS = tuple(signals)
    if _QUEUE_MANAGERS:  # a run earlier in this process started it
        return
    if filesystem_async._results_queue is not None:
        log.warning("dist_checkpointing's results queue was started before the trainer's: a job-wide "
                    "SIGTERM during a save may fail it")
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=shield_from, initargs=(tuple(signals),))
    filesystem_async._results_queue = manager.Queue()
    _QUEUE_MANAGERS.append(manager)  # alive until exit (it shuts down at exit, as megatron's does)


_QUEUE_MANAGERS: list = []
_SHIELDED_SIGNALS: tuple[int, ...] = ()


@contextlib.contextmanager
def writers_shielded() -> Iterator[None]:
    """Block the shielded signals in this thread while writers are forked (they inherit the mask;
    a signal meanwhile reaches this process's handler when the block ends)."""
    if not _SHIELDED_SIGNALS:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(_SHIELDED_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def load_weights(path: str | Path, chunks: Sequence[torch.nn.Module], optimizer=None, *,
                 extra_state: bool = True) -> Path:
    """Load model weights only (any TP/PP layout of the saved checkpoint); the optimizer's master
    weights, if one is given, follow them. A base checkpoint under a LoRA model loads the base and
    leaves the adapters as they are; an adapters-only checkpoint loads its recorded base first.
    ``extra_state=False`` leaves the modules' extra state (FP8 scaling history) as it is."""
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(path)
    found = checkpoint_parts(path, chunks)
    if not found.base:
        _load_recorded_base(path, chunks, optimizer)
    parts = Parts(base=found.base, adapters=found.adapters, extra_state=extra_state)
    state = _model_state(chunks, parts)
    if found.adapters:
        _check_adapter_keys(path, state)
    _load_model_state(chunks, dist_checkpointing.load(state, str(path)), masters_of=optimizer, parts=parts)
    return path


def load_checkpoint(path: str | Path, chunks: Sequence[torch.nn.Module], optimizer, *,
                    base: str | Path | None = None) -> dict[str, Any]:
    """Resume: weights, optimizer state and RNG states; returns the saved trainer state. An
    adapters-only checkpoint loads its base first: ``base`` (the run's checkpoint.load_weights),
    else where it recorded it."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    same_layout = trainer_state.get("layout") == layout_state()
    parts = checkpoint_parts(path, chunks)
    if not parts.base:
        _load_recorded_base(path, chunks, None, base)
    state = _model_state(chunks, parts)
    if parts.adapters:
        _check_adapter_keys(path, state)
    if optimizer is not None and same_layout:
        _prepare_optimizer_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:  # megatron raises several types; which folder failed is what matters
        raise DamagedCheckpointError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); move it "
                                     f"aside to resume from the one before it") from exc
    _load_model_state(chunks, loaded, masters_of=None if same_layout else optimizer, parts=parts)
    if optimizer is not None:
        if same_layout:
            _schedule_peaks_from(optimizer, loaded["optimizer"])
            with torch.no_grad():  # in-place copies into leaf parameters' fp32 masters
                optimizer.load_state_dict(loaded["optimizer"])
            _fix_shared_adam_step(optimizer)
        else:
            log.warning(
                "checkpoint %s was saved with layout %s, this run is %s: weights resharded, optimizer state restarts",
                path, trainer_state.get("layout"), layout_state(),
            )
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if same_layout and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def layout_state() -> dict[str, int]:
    """The parallel layout as stored in trainer_state.json."""
    from megatron.core import parallel_state as ps

    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(),
        "virtual_pipeline": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    }


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _schedule_peaks_from(optimizer, saved: Any) -> None:
    """Give the saved param groups this optimizer's peak and minimum lr. megatron's scheduler reads
    them from the groups (not from itself), and megatron >= 0.19 matches saved groups to the
    optimizer's by them, so a resume with another ``optim.lr`` would keep the old rates or fail."""
    current = optimizer.param_groups[0]
    if isinstance(saved, dict):
        for key, value in saved.items():
            if key == "param_groups" and isinstance(value, list):
                for group in value:
                    for name in ("max_lr", "min_lr"):
                        if name in group:
                            group[name] = current[name]
            else:
                _schedule_peaks_from(optimizer, value)
    elif isinstance(saved, (list, tuple)):
        for value in saved:
            _schedule_peaks_from(optimizer, value)


def _prepare_optimizer_for_load(optimizer) -> None:
    # A fresh DistributedOptimizer has no Adam state yet, and its state_dict asserts one 'step'.
    for opt in _inner_optimizers(optimizer):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def _fix_shared_adam_step(optimizer) -> None:
    # After load, torch Adam's per-parameter 'step' tensors are one shared, stale object on the
    # DistributedOptimizer path: a resumed run would drift from its second step. Re-create them
    # from the param group's step, on the device and in the dtype torch's load chose (the fused
    # kernel keeps them beside the parameters, on the GPU).
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and "step" in state:
                    old = state["step"]
                    state["step"] = torch.tensor(float(group["step"]), dtype=old.dtype, device=old.device)


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
