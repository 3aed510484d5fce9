"""How a run is laid out over processes, and the device it runs on."""

from __future__ import annotations

from dataclasses import dataclass

from mmpo_megatron.config.checks import choices, require

DEVICES = ("auto", "cuda", "cpu")


@dataclass
class ParallelConfig:
    """How the job is laid out over processes and which device runs it."""

    tensor_parallel: int = 1
    """Tensor-parallel size (megatron TP). Must divide attention heads and query groups."""

    pipeline_parallel: int = 1
    """Pipeline-parallel size. Must divide the number of layers."""

    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (interleaved 1F1B); None disables interleaving."""

    device: str = "auto"
    """``auto`` picks CUDA (nccl) when a GPU is visible, else CPU (gloo, through the CPU shim)."""

    seed: int = 1234
    """Seed of megatron's model-parallel RNG streams (same offsets as megatron's own)."""

    timeout_minutes: int = 30
    """Collective timeout. Long enough for a reference precompute pass on rank 0's checkpoint I/O."""

    sequence_parallel: bool | None = None
    """Megatron sequence parallelism: under TP, the norms' and residual stream's activations are
    split along the sequence over the TP ranks instead of held whole on each (TP's all-reduces
    become reduce-scatter + all-gather pairs of the same volume). null: on whenever
    tensor_parallel > 1, as Megatron-LM recommends; it has no meaning at TP=1."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass (megatron's DDP buckets).
    Off by default: on a single node NVLink makes the reduce short, and on CPU gloo gains nothing;
    turn it on for multi-node DP (the recipes do)."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass.
    Pairs with overlap_grad_reduce; same default and reason."""

    ddp_bucket_size: int | None = None
    """Elements per gradient-reduce bucket; null: megatron's default (max(40M, 1M x DP) elements)."""

    @property
    def uses_sequence_parallel(self) -> bool:
        """Whether sequence parallelism is on: the setting resolved for this TP size."""
        return self.tensor_parallel > 1 and (self.sequence_parallel is None or self.sequence_parallel)

    def __post_init__(self) -> None:
        require(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1, "parallel.ddp_bucket_size",
                 f"must be null or >= 1, got {self.ddp_bucket_size}")
        require(self.tensor_parallel >= 1, "parallel.tensor_parallel", f"must be >= 1, got {self.tensor_parallel}")
        require(
            self.pipeline_parallel >= 1, "parallel.pipeline_parallel", f"must be >= 1, got {self.pipeline_parallel}"
        )
        require(
            self.virtual_pipeline is None or self.virtual_pipeline >= 1,
            "parallel.virtual_pipeline",
            f"must be None or >= 1, got {self.virtual_pipeline}",
        )
        require(
            self.device in DEVICES,
            "parallel.device",
            f"must be {choices(DEVICES)}, got {self.device!r}",
        )


