"""The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2) between Hugging Face
and megatron-core: config translation and the parameter mapping, both ways.

Megatron names are those of the bare GPTModel on the local spec (``model.state_dict()``); its
``sharded_state_dict`` maps them to the Transformer-Engine names dist checkpoints use, so a
converted checkpoint loads under either layer spec and any TP/PP.

Layouts that differ from HF:
- QKV is one matrix, grouped per query group: ``[q (heads/groups * d), k (d), v (d)]`` for each
  group in turn.
- SwiGLU's gate and up projections are one ``linear_fc1`` matrix: ``[gate; up]``.
- The vocabulary (embedding and output rows) is padded; padding rows are zero and removed on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from mmpo_megatron.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope base, rope scaling dict or None) from a transformers 4.x or 5.x config."""
    params = hf.get("rope_parameters") or {}
    base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(base), scaling


def model_config_from_hf(hf: Mapping[str, Any], *, layer_spec: str = "local", name: str | None = None) -> ModelConfig:
    """Translate an HF ``config.json`` dict into our ModelConfig; unsupported features fail by name."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    base, scaling = _rope(hf)
    rope_scaling, factor = False, 8.0
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if kind != "llama3" or any(float(scaling.get(k, v)) != float(v) for k, v in expected.items()):
            raise ConfigError(
                f"rope_scaling {scaling} is not supported (llama3 with low 1, high 4, original 8192 only)"
            )
        rope_scaling, factor = True, float(scaling["factor"])
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))  # Qwen2 always biases QKV
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    return ModelConfig(
        name=name or hf.get("_name_or_path") or model_type,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] or model_type == "qwen3" else None,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        position_embedding="rope",
        rotary_base=int(base) if float(base).is_integer() else base,
        rope_scaling=rope_scaling,
        rope_scaling_factor=factor,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=model_type == "qwen3",
        swiglu=True,
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        layer_spec=layer_spec,
    )


def hf_config_from_model(
    model: ModelConfig, *, model_type: str = "llama", torch_dtype: str = "bfloat16"
) -> dict[str, Any]:
    """The inverse translation: an HF config.json dict for AutoModelForCausalLM."""
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}
    config = {
        "architectures": [architectures[model_type]],
        "model_type": model_type,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size or 4 * model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "vocab_size": model.vocab_size,
        "tie_word_embeddings": model.tie_embeddings,
        "rope_theta": float(model.rotary_base),
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if model.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": model.rope_scaling_factor, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if model_type in ("llama", "mistral"):
        config["attention_bias"] = model.qkv_bias
        config["mlp_bias"] = False
    if model_type == "mistral":
        config["sliding_window"] = None
    return config


# ------------------------------------------------------------------------------------------- weights
# One row per parameter: the megatron name, the HF name(s) it is made of, how the tensors are
# rearranged, and the model feature it exists under. ``{i}`` is the layer index. Both directions
# and the tensor count are read off this table.


class TensorLayout:
    """How a row's HF tensors make its megatron tensor. This base: one HF tensor is the megatron
    tensor. ``parts`` names the HF tensors a layout takes, in the row's HF-name order."""

    parts: tuple[str, ...] = ("tensor",)

    def to_megatron(self, hf: list[Tensor], model: ModelConfig, padded_vocab: int) -> Tensor:
        """The megatron tensor from its HF tensors."""
        return hf[0]

    def to_hf(self, tensor: Tensor, model: ModelConfig) -> list[Tensor]:
        """The HF tensors from the megatron tensor, in the row's HF-name order."""
        return [tensor]


class VocabRows(TensorLayout):
    """Embedding / output rows: zero rows pad the vocabulary to the padded size; export drops them."""

    def to_megatron(self, hf: list[Tensor], model: ModelConfig, padded_vocab: int) -> Tensor:
        """The HF rows followed by zero rows up to ``padded_vocab``."""
        weight = hf[0]
        if weight.shape[0] > padded_vocab:
            raise ValueError(f"vocab of {weight.shape[0]} does not fit the padded vocab {padded_vocab}")
        return torch.cat([weight, weight.new_zeros(padded_vocab - weight.shape[0], *weight.shape[1:])])

    def to_hf(self, tensor: Tensor, model: ModelConfig) -> list[Tensor]:
        """The real vocabulary's rows."""
        return [tensor[: model.vocab_size]]


class GroupedQKV(TensorLayout):
    """q, k, v as one matrix grouped per query group: ``[q (heads/groups * d), k (d), v (d)]`` per group."""

    parts = ("q", "k", "v")

    @staticmethod
    def _sizes(model: ModelConfig) -> tuple[int, int, int]:
        groups, d = model.query_groups, model.kv_channels or model.hidden_size // model.num_attention_heads
        return groups, model.num_attention_heads // groups, d

    def to_megatron(self, hf: list[Tensor], model: ModelConfig, padded_vocab: int) -> Tensor:
        """Interleave HF's separate q, k, v per query group."""
        groups, per_group, d = self._sizes(model)
        q, k, v = hf
        tail = q.shape[1:]
        grouped = [q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)]
        return torch.cat(grouped, dim=1).reshape(-1, *tail)

    def to_hf(self, tensor: Tensor, model: ModelConfig) -> list[Tensor]:
        """Split the grouped matrix back into q, k, v."""
        groups, per_group, d = self._sizes(model)
        tail = tensor.shape[1:]
        q, k, v = torch.split(tensor.reshape(groups, (per_group + 2) * d, *tail), [per_group * d, d, d], dim=1)
        return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]


class Stacked(TensorLayout):
    """HF matrices of equal shape stacked along the output rows, in ``parts`` order (SwiGLU's
    ``Stacked("gate", "up")``: megatron's linear_fc1 is ``[gate; up]``)."""

    def __init__(self, *parts: str) -> None:
        if len(parts) < 2:
            raise ValueError(f"Stacked needs two or more parts, got {parts}")
        self.parts = parts

    def to_megatron(self, hf: list[Tensor], model: ModelConfig, padded_vocab: int) -> Tensor:
        """The HF matrices one under another."""
        return torch.cat(hf)

    def to_hf(self, tensor: Tensor, model: ModelConfig) -> list[Tensor]:
        """Equal row blocks, one per part."""
        return list(torch.chunk(tensor, len(self.parts), dim=0))


@dataclass(frozen=True)
class Row:
    """One parameter of the mapping table."""

    megatron: str
    hf: tuple[str, ...]
    layout: TensorLayout = TensorLayout()
    only_if: str | None = None  # a ModelConfig feature (a key of FEATURES) the parameter exists under

    def __post_init__(self) -> None:
        if len(self.hf) != len(self.layout.parts):
            raise ValueError(f"{self.megatron}: {type(self.layout).__name__} takes {len(self.layout.parts)} HF "
                             f"tensors {self.layout.parts}, the row names {len(self.hf)}: {self.hf}")


FEATURES = {
    "qkv_bias": lambda model: model.qkv_bias,
    "qk_norm": lambda model: model.qk_norm,
    "untied_output": lambda model: not model.tie_embeddings,
}

_LAYER, _ATTN = "model.layers.{i}.", "model.layers.{i}.self_attn."
LLAMA_TABLE: tuple[Row, ...] = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VocabRows()),
    Row("decoder.layers.{i}.input_layernorm.weight", (_LAYER + "input_layernorm.weight",)),
    Row("decoder.layers.{i}.self_attention.linear_qkv.weight",
        tuple(_ATTN + f"{p}_proj.weight" for p in "qkv"), GroupedQKV()),
    Row("decoder.layers.{i}.self_attention.linear_qkv.bias",
        tuple(_ATTN + f"{p}_proj.bias" for p in "qkv"), GroupedQKV(), only_if="qkv_bias"),
    Row("decoder.layers.{i}.self_attention.q_layernorm.weight", (_ATTN + "q_norm.weight",), only_if="qk_norm"),
    Row("decoder.layers.{i}.self_attention.k_layernorm.weight", (_ATTN + "k_norm.weight",), only_if="qk_norm"),
    Row("decoder.layers.{i}.self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",)),
    Row("decoder.layers.{i}.pre_mlp_layernorm.weight", (_LAYER + "post_attention_layernorm.weight",)),
    Row("decoder.layers.{i}.mlp.linear_fc1.weight",
        (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"), Stacked("gate", "up")),
    Row("decoder.layers.{i}.mlp.linear_fc2.weight", (_LAYER + "mlp.down_proj.weight",)),
    Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Row("output_layer.weight", ("lm_head.weight",), VocabRows(), only_if="untied_output"),
)


def mapping(
    model: ModelConfig, table: tuple[Row, ...] = LLAMA_TABLE
) -> Iterator[tuple[str, tuple[str, ...], TensorLayout]]:
    """The table expanded for one model: (megatron name, HF names, layout) per parameter, in model order."""
    present = [row for row in table if row.only_if is None or FEATURES[row.only_if](model)]
    layer_rows = [row for row in present if "{i}" in row.megatron]
    for row in present:
        if "{i}" not in row.megatron:
            yield row.megatron, row.hf, row.layout
        elif row is layer_rows[0]:  # every layer, in order, where the table's per-layer rows stand
            for i in range(model.num_layers):
                for layer_row in layer_rows:
                    yield (layer_row.megatron.format(i=i), tuple(h.format(i=i) for h in layer_row.hf),
                           layer_row.layout)


def hf_to_megatron(get: Any, model: ModelConfig, padded_vocab: int) -> Iterator[tuple[str, Tensor]]:
    """Yield (megatron name, tensor), reading HF tensors one at a time through ``get(name)``.

    ``get`` raises KeyError for a missing tensor; the caller turns that into a clear message.
    """
    for megatron, hf, layout in mapping(model):
        yield megatron, layout.to_megatron([get(name) for name in hf], model, padded_vocab)


def megatron_to_hf(get: Any, model: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF name, tensor) from megatron tensors read through ``get(name)``; vocab unpadded."""
    for megatron, hf, layout in mapping(model):
        yield from zip(hf, layout.to_hf(get(megatron), model))


def tensor_count(model: ModelConfig) -> int:
    """How many megatron tensors the mapping yields (for progress bars)."""
    return sum(1 for _ in mapping(model))
