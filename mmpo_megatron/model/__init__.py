"""Model construction: the one builder of megatron-core models, and the SDPA attention module."""

from mmpo_megatron.model.builder import build_model_chunks, padded_vocab_size, transformer_config, unwrap, validate_layout

__all__ = ["build_model_chunks", "padded_vocab_size", "transformer_config", "unwrap", "validate_layout"]
