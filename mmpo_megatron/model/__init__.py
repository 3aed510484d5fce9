"""Models: the one builder of megatron-core models, and the policy-and-reference preference model."""

from mmpo_megatron.config import padded_vocab_size, validate_layout
from mmpo_megatron.model.builder import build_model_chunks, transformer_config, unwrap
from mmpo_megatron.model.preference_model import MegatronPreferenceModel
from mmpo_megatron.model.reference import CpuSwapReference, PrecomputedReference, ReferenceSource, ResidentReference

__all__ = [
    "CpuSwapReference",
    "MegatronPreferenceModel",
    "PrecomputedReference",
    "ReferenceSource",
    "ResidentReference",
    "build_model_chunks",
    "padded_vocab_size",
    "transformer_config",
    "unwrap",
    "validate_layout",
]
