"""Peak tensor memory of a block of work, measured the same way on GPU and CPU.

On CUDA this is the caching allocator's own statistics (``max_memory_allocated``). The CPU has no
such counter, so there a dispatch mode sees every tensor an op returns (autograd's saved tensors
and the backward's temporaries included, since the backward runs through the dispatcher too),
adds its storage's bytes once and subtracts them when the storage is freed. Both report bytes of
live tensors, not allocator reserves, so a CPU figure predicts the GPU's ``allocated`` figure for
the same ops and dtypes.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class PeakMemory:
    """Bytes of tensors allocated inside the block: the most alive at once, and what is left at its end."""

    peak_bytes: int = 0
    end_bytes: int = 0

    @property
    def peak_gib(self) -> float:
        """The peak in GiB."""
        return self.peak_bytes / 2**30


class _StorageTracker(TorchDispatchMode):
    """Counts live bytes of the storages created by ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # In-place and out= results, and views, live in an input's storage: that memory existed
        # before the op (possibly before the block: a gradient buffer written in place).
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            # A storage already counted, or an input's; empty storages cost nothing.
            if key == 0 or key in self._sizes or key in inputs:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            # torch keeps one Python object per storage, so this fires when the memory is released.
            weakref.finalize(storage, self._freed, key)
        return out


@contextmanager
def track_peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Measure the peak bytes of tensors allocated inside the ``with`` block on ``device``."""
    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.peak_bytes = torch.cuda.max_memory_allocated(device) - start
            result.end_bytes = torch.cuda.memory_allocated(device) - start
        return
    tracker = _StorageTracker()
    try:
        with tracker:
            yield result
    finally:
        result.peak_bytes = tracker.peak
        result.end_bytes = tracker.live
