"""Parallel runtime: process groups, the CPU shim, and cross-rank batch statistics."""

from mmpo_megatron.parallel.runtime import (
    ParallelLayout,
    current_layout,
    destroy_parallel,
    initialize_parallel,
    resolve_device,
)

__all__ = ["ParallelLayout", "current_layout", "destroy_parallel", "initialize_parallel", "resolve_device"]
