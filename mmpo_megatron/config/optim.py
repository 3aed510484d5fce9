"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from mmpo_megatron.config.checks import require


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (megatron's optimizer and OptimizerParamScheduler)."""

    lr: float = 5e-7
    """Peak learning rate. DPO-family runs on 1B-8B models use 1e-7 to 1e-6; the paper used 5e-4
    for full fine-tunes of SmolLM2 (configs/recipes say so where they differ)."""

    min_lr: float = 0.0
    """Floor of the cosine decay."""

    warmup_ratio: float = 0.1
    """Fraction of the total steps spent in linear warmup (paper: 10%)."""

    decay_style: str = "cosine"
    """cosine (paper), linear or constant."""

    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping; 0 disables it."""

    distributed_optimizer: bool = True
    """Shard optimizer state (and fp32 master weights) over data-parallel ranks."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(
            self.decay_style in ("cosine", "linear", "constant"),
            "optim.decay_style",
            f"must be cosine, linear or constant, got {self.decay_style!r}",
        )
        require(self.clip_grad >= 0, "optim.clip_grad", f"must be >= 0, got {self.clip_grad}")
