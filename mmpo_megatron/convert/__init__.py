"""Hugging Face <-> megatron checkpoint conversion for the Llama family."""

from mmpo_megatron.convert.checkpoints import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf, run_cli
from mmpo_megatron.convert.llama import hf_config_from_model, model_config_from_hf

__all__ = [
    "ConversionError",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "hf_config_from_model",
    "model_config_from_hf",
    "run_cli",
]
