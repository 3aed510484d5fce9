"""TrainConfig: every concern's config in one object, and the checks that span concerns."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmpo_megatron.config.checks import choices, require
from mmpo_megatron.config.data import DataConfig
from mmpo_megatron.config.loss import LossConfig
from mmpo_megatron.config.model import ModelConfig, validate_layout
from mmpo_megatron.config.optim import OptimConfig
from mmpo_megatron.config.parallel import DEVICES, ParallelConfig
from mmpo_megatron.config.precision import PrecisionConfig, check_fp8_layer_spec
from mmpo_megatron.config.reference import ReferenceConfig
from mmpo_megatron.config.training import CheckpointConfig, EvalConfig, LoggingConfig, TrainerConfig


@dataclass
class TrainConfig:
    """Everything a run needs; Hydra composes it from configs/ and validates it before heavy work."""

    device: str = "auto"
    """The run's device: auto, cuda or cpu. ``parallel.device`` is copied from it (the parallel
    presets interpolate ``${device}`` as well), so one key sets it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        require(self.device in DEVICES, "device", f"must be {choices(DEVICES)}, got {self.device!r}")
        self.parallel.device = self.device
        mode = self.reference_mode
        require(mode != "adapters_off" or self.model.lora.enabled, "reference.mode",
                 "adapters_off needs LoRA (model.lora.rank > 0): without adapters there is no base to switch back to")
        require(mode != "adapters_off" or self.reference.checkpoint is None, "reference.checkpoint",
                 "with reference.mode=adapters_off the reference is the base model; for other reference weights "
                 "choose reference.mode=precompute, resident or cpu_swap")
        if self.precision.fp8 is not None:
            # TE's FP8 GEMMs need every token dimension a multiple of 16.
            require(
                self.data.pad_to_multiple % 16 == 0,
                "data.pad_to_multiple",
                f"must be a multiple of 16 with precision.fp8={self.precision.fp8}, got {self.data.pad_to_multiple}",
            )
            check_fp8_layer_spec(self.model, self.precision)
        require(not self.parallel.overlap_param_gather or self.optim.distributed_optimizer,
                 "parallel.overlap_param_gather", "needs optim.distributed_optimizer=true (it overlaps that "
                 "optimizer's parameter all-gather)")

    @property
    def reference_mode(self) -> str:
        """``reference.mode`` as the run uses it (reference_resolution)."""
        return self.reference_resolution()[0]

    def reference_resolution(self) -> tuple[str, str]:
        """``reference.mode`` as the run uses it, and why, for the run's log: ``auto`` resolved, and
        ``precompute`` for a loss that reads no reference (SimPO), the mode that keeps nothing of one
        on the device. The config is not rewritten here; preflight writes the mode back, so the run
        folder's config.yaml and its log state the mode the run used."""
        if not self.loss.needs_reference:
            return "precompute", f"loss {self.loss.name} reads no reference"
        if self.reference.mode != "auto":
            return self.reference.mode, "as configured"
        # LoRA from PEFT's B = 0 starts at the base: the adapters switched off are the reference.
        # From an init_from adapter (an SFT adapter) the starting policy is base + that adapter.
        if self.model.lora.enabled and not self.model.lora.init_from:
            return "adapters_off", "fresh LoRA adapters start at the base, which is the reference with the adapters off"
        if self.reference.checkpoint:
            return "precompute", "reference.checkpoint's log-probs, scored once before training"
        return "precompute", "the starting policy's log-probs, scored once before training"

    def validate_for_world(self, world_size: int) -> None:
        """Checks that need the world size; errors name the field."""
        mp = self.parallel.tensor_parallel * self.parallel.pipeline_parallel
        require(
            world_size % mp == 0,
            "parallel",
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = {mp}",
        )
        dp = world_size // mp
        unit = self.train.micro_batch_size * dp
        require(
            self.train.global_batch_size % unit == 0,
            "train.global_batch_size",
            f"{self.train.global_batch_size} is not divisible by micro_batch_size x data_parallel = "
            f"{self.train.micro_batch_size} x {dp}",
        )
        if self.parallel.virtual_pipeline:
            # megatron's interleaved schedule runs the micro-batches in groups of PP.
            micro_batches, pp = self.train.global_batch_size // unit, self.parallel.pipeline_parallel
            require(
                micro_batches % pp == 0,
                "train.global_batch_size",
                f"gives {micro_batches} micro-batches per step (global_batch_size / (micro_batch_size x "
                f"data_parallel) = {self.train.global_batch_size} / ({self.train.micro_batch_size} x {dp})); "
                f"an interleaved pipeline (parallel.virtual_pipeline) needs a multiple of pipeline_parallel={pp}",
            )
        validate_layout(self.model, self.parallel)
