"""Checkpoints with megatron's dist_checkpointing: model, optimizer, scheduler, data position,
RNG states and the resolved config.

A checkpoint is written to ``step_NNNNNNN.tmp`` and renamed to ``step_NNNNNNN`` only after every
rank has finished, so a crash during a save leaves the previous checkpoint as the newest complete
one. Model weights reshard on load (any TP/PP); optimizer state resumes under the same TP/PP
(DP may change: ``dp_reshardable``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

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


def _model_state(chunks: Sequence[torch.nn.Module], parameters_only: bool = False) -> dict[str, Any]:
    # Names from the bare GPTModel: a checkpoint must not depend on DDP / Float16Module wrappers.
    from mmpo_megatron.model.builder import unwrap

    def state(chunk):
        full = unwrap(chunk).sharded_state_dict()
        return {k: v for k, v in full.items() if not k.endswith(EXTRA_STATE)} if parameters_only else full

    if len(chunks) == 1:
        return {"model": state(chunks[0])}
    return {f"model{i}": state(chunk) for i, chunk in enumerate(chunks)}


def _load_model_state(chunks: Sequence[torch.nn.Module], loaded: dict[str, Any], masters_of=None,
                      parameters_only: bool = False) -> None:
    """Every weight load goes through here. ``masters_of``: an optimizer whose fp32 master weights
    are then re-derived from the loaded parameters (under bf16 its next step would otherwise copy
    the masters' old values over them). Not for an optimizer whose own saved state is loaded: that
    state holds the fp32 masters (and dist_checkpointing may have loaded them in place already)."""
    from mmpo_megatron.model.builder import unwrap
    from mmpo_megatron.model.optimizer import refresh_masters

    for i, chunk in enumerate(chunks):
        state = loaded["model" if len(chunks) == 1 else f"model{i}"]
        if not parameters_only:
            unwrap(chunk).load_state_dict(state)
            continue
        missing, unexpected = unwrap(chunk).load_state_dict(state, strict=False)
        if unexpected or any(not name.endswith(EXTRA_STATE) for name in missing):
            raise RuntimeError(f"weights-only load: missing {missing}, unexpected {unexpected}")
    if masters_of is not None:
        refresh_masters(masters_of)


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
) -> Path:
    """Save atomically (temporary name, renamed when complete); prune to the newest ``keep_last``."""
    root = Path(root)
    final = save_to(step_dir(root, step), chunks, optimizer, {**trainer_state, "step": step})
    if dist.get_rank() == 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def save_to(final: Path, chunks: Sequence[torch.nn.Module], optimizer, trainer_state: dict[str, Any]) -> Path:
    """Write a checkpoint folder under a temporary name and rename it when every rank is done."""
    from megatron.core import dist_checkpointing

    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _model_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    dist_checkpointing.save(state, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / MANIFEST).write_text(json.dumps(_file_sizes(tmp), indent=1))
        (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "world_size": dist.get_world_size()}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier()
    return final


def load_weights(path: str | Path, chunks: Sequence[torch.nn.Module], optimizer=None, *,
                 parameters_only: bool = False) -> Path:
    """Load model weights only (any TP/PP layout of the saved checkpoint); the optimizer's master
    weights, if one is given, follow them. ``parameters_only``: leave the modules' extra state
    (FP8 scaling history) as it is."""
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(path)
    state = _model_state(chunks, parameters_only)
    _load_model_state(chunks, dist_checkpointing.load(state, str(path)), masters_of=optimizer,
                      parameters_only=parameters_only)
    return path


def load_checkpoint(path: str | Path, chunks: Sequence[torch.nn.Module], optimizer) -> dict[str, Any]:
    """Resume: weights, optimizer state and RNG states; returns the saved trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    same_layout = trainer_state.get("layout") == layout_state()
    state = _model_state(chunks)
    if optimizer is not None and same_layout:
        _prepare_optimizer_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIMIZER_METADATA)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:  # megatron raises several types; which folder failed is what matters
        raise DamagedCheckpointError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); move it "
                                     f"aside to resume from the one before it") from exc
    _load_model_state(chunks, loaded, masters_of=None if same_layout else optimizer)
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
