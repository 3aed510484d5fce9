"""Configuration dataclasses, one module per concern. Each field documents its default and why.

Hydra builds these from ``configs/`` (``hydra_schema``); every check runs in ``__post_init__``, next
to the fields it checks, so a bad value fails before any heavy work with an error that names the
field. Allowed values are tuples (``LOSS_NAMES``, ``DEVICES``, ...) that the checks and the tools'
``choices=`` read: OmegaConf 2.3 refuses ``typing.Literal`` fields on a structured config.
"""

from mmpo_megatron.config.checks import ConfigError, choices, require
from mmpo_megatron.config.data import DataConfig, DataSourceConfig
from mmpo_megatron.config.hydra_schema import (
    CONFIG_DIR,
    HYDRA_SCHEMA,
    compose_config,
    register_hydra_schema,
    resolve_config,
)
from mmpo_megatron.config.loss import (
    AUX_INPUTS,
    LOGP_REDUCTIONS,
    LOSS_NAMES,
    LOSSES,
    NORM_SCOPES,
    LossConfig,
    LossSpec,
)
from mmpo_megatron.config.model import (
    CONVERT_DTYPES,
    LAYER_SPECS,
    LORA_PROJECTIONS,
    LORA_SHORTHANDS,
    RECOMPUTE_GRANULARITIES,
    LoraConfig,
    ModelConfig,
    lora_projections,
    padded_vocab_size,
    validate_layout,
)
from mmpo_megatron.config.optim import OptimConfig
from mmpo_megatron.config.parallel import DEVICES, ParallelConfig
from mmpo_megatron.config.precision import (
    FP8_FORMATS,
    FP8_RECIPES,
    PRECISION_DTYPES,
    PrecisionConfig,
    check_fp8_layer_spec,
)
from mmpo_megatron.config.reference import REFERENCE_MODES, ReferenceConfig
from mmpo_megatron.config.run import TrainConfig
from mmpo_megatron.config.training import CheckpointConfig, EvalConfig, LoggingConfig, TrainerConfig

__all__ = [
    "AUX_INPUTS", "CONFIG_DIR", "CONVERT_DTYPES", "DEVICES", "FP8_FORMATS", "FP8_RECIPES", "HYDRA_SCHEMA",
    "LAYER_SPECS", "LOGP_REDUCTIONS", "LORA_PROJECTIONS", "LORA_SHORTHANDS", "LOSSES", "LOSS_NAMES", "NORM_SCOPES",
    "PRECISION_DTYPES", "RECOMPUTE_GRANULARITIES", "REFERENCE_MODES", "CheckpointConfig", "ConfigError", "DataConfig",
    "DataSourceConfig", "EvalConfig", "LoggingConfig", "LoraConfig", "LossConfig", "LossSpec", "ModelConfig",
    "OptimConfig", "ParallelConfig", "PrecisionConfig", "ReferenceConfig", "TrainConfig", "TrainerConfig",
    "check_fp8_layer_spec", "choices", "compose_config", "lora_projections", "padded_vocab_size",
    "register_hydra_schema", "require", "resolve_config", "validate_layout",
]
