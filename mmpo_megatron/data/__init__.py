"""Preference data: formats, tokenisation, truncation, batching, sampling, packing, demo data."""

from mmpo_megatron.data.collate import PairBatch, collate_pairs
from mmpo_megatron.data.formats import DataError
from mmpo_megatron.data.pipeline import DataReport, build_pairs, eval_sources, train_sources
from mmpo_megatron.data.sampling import PairSampler, eval_microbatches
from mmpo_megatron.data.tokenizer import load_tokenizer

__all__ = [
    "DataError",
    "DataReport",
    "PairBatch",
    "PairSampler",
    "build_pairs",
    "collate_pairs",
    "eval_microbatches",
    "eval_sources",
    "load_tokenizer",
    "train_sources",
]
