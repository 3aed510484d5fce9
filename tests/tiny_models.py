"""The suite's named debug model, as torchtitan names its own: one shape that every multi-rank test
can split (4 heads in 2 query groups divide by TP 2; layers by PP 2), small enough to train on
CPU in seconds."""

from mmpo_megatron.config import ModelConfig

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
            max_position_embeddings=64, make_vocab_size_divisible_by=16)


def tiny_model(**changes) -> ModelConfig:
    """The debug model with ``changes`` on top (e.g. ``num_layers=4`` for PP x VPP)."""
    return ModelConfig(**{**TINY, **changes})
