"""Test helpers for run folders."""

import shutil
from pathlib import Path


def seed_run_folder(source: Path, target: Path, step: int, *, reference_cache=True, half_written=False):
    """A new run folder holding ``source``'s checkpoint of ``step`` (and its reference cache), copied
    on one rank; optionally with a half-written save of the next step beside it (a crash mid-save)."""
    import torch.distributed as dist

    from mmpo_megatron.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(device="cpu")
    if dist.get_rank() == 0:
        (target / "checkpoints").mkdir(parents=True)
        shutil.copytree(source / "checkpoints" / f"step_{step:07d}", target / "checkpoints" / f"step_{step:07d}")
        if reference_cache:
            shutil.copytree(source / "reference_cache", target / "reference_cache")
        if half_written:
            partial = target / "checkpoints" / f"step_{step + 1:07d}.tmp"
            partial.mkdir()
            (partial / "metadata.json").write_text("{truncated")
    dist.barrier()
    destroy_parallel()
