"""One call to bring up torch.distributed and megatron-core's TP x PP x DP groups, and its undo.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), and
as a plain ``python`` call, which becomes a one-process world. ``device="cpu"`` runs gloo through
the CPU shim; ``device="cuda"`` runs nccl with one GPU per local rank.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mmpo_megatron.config import DEVICES, ConfigError, ParallelConfig, choices


@dataclass(frozen=True)
class ParallelLayout:
    """This process's place in the job, read back from megatron's parallel_state."""

    device: torch.device
    world_size: int
    rank: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    tensor_rank: int
    pipeline_rank: int
    data_rank: int
    virtual_pipeline: int | None

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank holds the embedding (first pipeline stage)."""
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the output layer and computes the loss."""
        return self.pipeline_rank == self.pipeline_parallel - 1


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; checks that ``cuda`` is usable."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device: 'cuda' was asked for but torch sees no GPU; use device=cpu")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"parallel.device: must be {choices(DEVICES)}, got {device!r}")
    return device


def free_port() -> int:
    """A TCP port below the kernel's ephemeral range that was free a moment ago (single-host rendezvous)."""
    # bind(0) would hand out an ephemeral port, which the kernel also gives to outgoing connections
    # (gloo opens many): one can take it between this check and the store's listen (EADDRINUSE).
    # Below the range only listeners compete; SystemRandom keeps seeded processes from agreeing.
    ephemeral_low = _ephemeral_port_range()[0]
    chooser = random.SystemRandom()
    for _ in range(200):
        port = chooser.randrange(max(1024, ephemeral_low - 10000), ephemeral_low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# The torchrun variables this process set for itself (removed again by destroy_parallel, so a
# later world of one, or a child process, does not inherit a stale rendezvous port).
_SELF_SET_ENV: list[str] = []


def _ensure_single_process_env() -> None:
    # A plain `python train.py` has no torchrun variables: make it a world of one.
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port())}
        for key, value in defaults.items():
            if key not in os.environ:
                os.environ[key] = value
                _SELF_SET_ENV.append(key)


def initialize_parallel(config: ParallelConfig | None = None, **overrides) -> ParallelLayout:
    """Initialise torch.distributed (if needed) and megatron's groups for ``config``.

    May be called again after :func:`destroy_parallel` with another layout in the same process.
    """
    from megatron.core import parallel_state, tensor_parallel

    if config is not None and overrides:
        raise TypeError("pass a ParallelConfig or keyword overrides, not both")
    config = config or ParallelConfig(**overrides)
    device = resolve_device(config.device)
    if device == "cuda":
        from mmpo_megatron.parallel.cpu_shim import cpu_shims_installed

        if cpu_shims_installed():  # it maps every "cuda" tensor to the CPU: the run would silently be a CPU run
            raise RuntimeError("this process already ran megatron on CPU (the CPU shim is installed); "
                               "a CUDA run needs a fresh process")

    if not dist.is_initialized():
        _ensure_single_process_env()
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            timeout=timedelta(minutes=config.timeout_minutes),
        )

    world_size = dist.get_world_size()
    model_parallel = config.tensor_parallel * config.pipeline_parallel
    if world_size % model_parallel != 0:
        raise ConfigError(
            f"parallel: world size {world_size} is not divisible by tensor_parallel x pipeline_parallel "
            f"= {config.tensor_parallel} x {config.pipeline_parallel}"
        )
    if config.virtual_pipeline is not None and config.pipeline_parallel < 2:
        raise ConfigError("parallel.virtual_pipeline: interleaving needs pipeline_parallel >= 2")

    if device == "cpu":
        from mmpo_megatron.parallel import cpu_shim

        cpu_shim.install_cuda_to_cpu_shims()

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is already initialised; call destroy_parallel() first")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_parallel,
        pipeline_model_parallel_size=config.pipeline_parallel,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline,
        distributed_timeout_minutes=config.timeout_minutes,
    )

    if device == "cpu":
        cpu_shim.install_cpu_memory_buffer()
        cpu_shim.cpu_model_parallel_seed(config.seed)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(config.seed)

    return current_layout(device)


def current_layout(device: str | None = None) -> ParallelLayout:
    """The layout of the initialised parallel state."""
    from megatron.core import parallel_state as ps

    if device is None:
        from mmpo_megatron.parallel.cpu_shim import cpu_shims_installed

        device = "cpu" if cpu_shims_installed() else "cuda"
    return ParallelLayout(
        device=torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu"),
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        data_parallel=ps.get_data_parallel_world_size(),
        tensor_rank=ps.get_tensor_model_parallel_rank(),
        pipeline_rank=ps.get_pipeline_model_parallel_rank(),
        data_rank=ps.get_data_parallel_rank(),
        virtual_pipeline=ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def _megatron_groups(parallel_state) -> list:
    """Every process group megatron's parallel_state holds (module globals, alone or in lists), but the default one."""
    world = dist.group.WORLD
    found: dict[int, object] = {}
    for value in vars(parallel_state).values():
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for group in candidates:
            if isinstance(group, dist.ProcessGroup) and group is not world:
                found[id(group)] = group
    return list(found.values())


def destroy_parallel(destroy_process_group: bool = False) -> None:
    """Tear down megatron's groups (and optionally torch.distributed) so another layout can follow."""
    import gc
    import sys

    # A finished run's DDP buckets and optimizer hold its groups in reference cycles: free them now,
    # or each gloo group keeps its threads (~50 a TP=2 run) until some later collection.
    gc.collect()

    # Only if megatron was imported at all: a process that never used it need not pay its import.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        # megatron's destroy only forgets its groups; torch keeps them registered, each gloo group
        # with its threads, until they are destroyed. A process that visits many layouts (tests, a
        # tool scoring at several TP sizes) would pile them up, so destroy each one here.
        if dist.is_initialized():
            for group in _megatron_groups(parallel_state):
                dist.destroy_process_group(group)
        parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
    if destroy_process_group:
        while _SELF_SET_ENV:
            os.environ.pop(_SELF_SET_ENV.pop(), None)
