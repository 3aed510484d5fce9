"""Numerics of the model and the optimizer: dtype, FP8."""

from __future__ import annotations

from dataclasses import dataclass

from mmpo_megatron.config.checks import choices, require
from mmpo_megatron.config.model import ModelConfig

PRECISION_DTYPES = ("auto", "bf16", "fp32")
FP8_FORMATS = (None, "hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


@dataclass
class PrecisionConfig:
    """Numerics of the model and of the optimizer."""

    dtype: str = "auto"
    """Parameter/activation dtype: auto (bf16 on GPU, fp32 on CPU, where bf16 matmuls are slow), bf16, fp32.
    With bf16 the optimizer keeps fp32 master weights (megatron's mixed-precision optimizer)."""

    fp8: str | None = None
    """None, hybrid or e4m3: FP8 GEMMs through Transformer Engine (layer_spec=transformer_engine, H100)."""

    fp8_recipe: str = "delayed"
    """delayed, tensorwise (current scaling) or blockwise."""

    def __post_init__(self) -> None:
        require(self.dtype in PRECISION_DTYPES, "precision.dtype",
                f"must be {choices(PRECISION_DTYPES)}, got {self.dtype!r}")
        require(self.fp8 in FP8_FORMATS, "precision.fp8", f"must be {choices(FP8_FORMATS)}, got {self.fp8!r}")
        require(self.fp8_recipe in FP8_RECIPES, "precision.fp8_recipe",
                f"must be {choices(FP8_RECIPES)}, got {self.fp8_recipe!r}")


def check_fp8_layer_spec(model: ModelConfig, precision: PrecisionConfig) -> None:
    """FP8 GEMMs come from Transformer Engine's layers: ``precision.fp8`` needs their layer spec."""
    if precision.fp8 is not None:
        require(
            model.layer_spec == "transformer_engine",
            "model.layer_spec",
            f"precision.fp8 needs transformer_engine, got {model.layer_spec!r}",
        )
