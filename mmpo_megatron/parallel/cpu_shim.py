"""Lets megatron-core run on CPU processes with gloo (``device=cpu``).

megatron-core hard-codes CUDA in a handful of places (RNG tracker, global memory buffer,
``device="cuda"`` literals in schedules and optimizers, ``torch.cuda.synchronize`` in p2p and
checkpointing). Every such touch-point is handled here and nowhere else, so development and CI
can run real TP/PP/DP on CPU; each function below answers one family of call sites.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.utils import GlobalMemoryBuffer
from torch.overrides import TorchFunctionMode


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's RNG-states tracker API, forking the CPU default generator instead of CUDA's."""

    def __init__(self) -> None:
        super().__init__(use_cudagraphable_rng=False)

    def add(self, name: str, seed: int) -> None:
        """Register a named RNG stream seeded with ``seed``."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name!r} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the body with the named stream as the CPU generator state, then restore."""
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


class CpuGlobalMemoryBuffer(GlobalMemoryBuffer):
    """megatron's scratch buffer (used by DotProductAttention), allocated in host memory."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):  # noqa: D401
        required = 1
        for dim in tensor_shape:
            required *= dim
        buffer = self.buffer.get((name, dtype))
        if buffer is None or buffer.numel() < required:
            buffer = torch.empty(required, dtype=dtype, device="cpu", requires_grad=False)
            self.buffer[(name, dtype)] = buffer
        return buffer[:required].view(*tensor_shape)


def _cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _recompute_under_the_mode() -> None:
    """Run megatron's recomputing backward (activation recomputation) under the CUDA -> CPU mode.

    A torch function mode is off while its own handler runs, so a ``backward()`` called through
    the mode runs without it; a backward that re-runs forward code (``CheckpointFunction``) would
    then meet megatron's ``device="cuda"`` allocations. Idempotent.
    """
    checkpoint = mcore_random.CheckpointFunction
    if getattr(checkpoint.backward, "_under_cpu_mode", False):
        return
    original = checkpoint.backward

    def backward(ctx, *grads):
        with CudaToCpuMode():
            return original(ctx, *grads)

    backward._under_cpu_mode = True
    checkpoint.backward = staticmethod(backward)


def cpu_model_parallel_seed(seed: int) -> None:
    """CPU twin of ``tensor_parallel.model_parallel_cuda_manual_seed`` with the same seed offsets."""
    # Activation recomputation saves and restores the "CUDA" generator around each recomputed
    # block (megatron's CheckpointFunction); on CPU that generator is the CPU one.
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    _recompute_under_the_mode()
    tracker = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(
        mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
        seed + 2718 + parallel_state.get_tensor_model_parallel_rank(),
    )
    tracker.add(
        mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
        seed
        + 1024
        + 100 * parallel_state.get_expert_model_parallel_rank()
        + parallel_state.get_expert_tensor_parallel_rank(),
    )


def install_cpu_memory_buffer() -> None:
    """Swap megatron's global memory buffer (created by initialize_model_parallel) for a CPU one."""
    parallel_state._GLOBAL_MEMORY_BUFFER = CpuGlobalMemoryBuffer()


class _NoopStream:
    """Stands in for a CUDA stream: CPU kernels are synchronous, so every wait is already done."""

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_NoopStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _names_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


_SPECIAL = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to})


class CudaToCpuMode(TorchFunctionMode):
    """Maps ``device="cuda"``/int to CPU, makes ``Tensor.cuda()`` a no-op, and makes
    ``Tensor.type()`` report ``torch.cuda.*`` so megatron's dtype assertions accept CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of a CPU run passes here: the common case (no device argument) returns first.
        if func in _SPECIAL:
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                name = func(*args)
                return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            if func is torch.Tensor.to:
                args = tuple("cpu" if i > 0 and _names_cuda(a) else a for i, a in enumerate(args))
        if not kwargs:
            return func(*args)
        device = kwargs.get("device")
        if device is not None and _names_cuda(device):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


_MODE: CudaToCpuMode | None = None


def install_cuda_to_cpu_shims() -> None:
    """Install the process-wide CUDA -> CPU mapping (main thread). Idempotent."""
    global _MODE
    # Routing property reads through the mode makes megatron's harmless reads of non-leaf .grad warn.
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NoopStream()
    if _MODE is None:
        _MODE = CudaToCpuMode()
        _MODE.__enter__()


def cpu_shims_installed() -> bool:
    """Whether this process runs megatron-core under the CPU shim."""
    return _MODE is not None
