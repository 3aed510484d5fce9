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
            raise ConfigError(f"rope_scaling {scaling} is not supported (llama3 with low 1, high 4, original 8192 only)")
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


def hf_config_from_model(model: ModelConfig, *, model_type: str = "llama", torch_dtype: str = "bfloat16") -> dict[str, Any]:
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


def _qkv_from_hf(q: Tensor, k: Tensor, v: Tensor, model: ModelConfig) -> Tensor:
    groups, d = model.query_groups, model.kv_channels or model.hidden_size // model.num_attention_heads
    per_group = model.num_attention_heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv_to_hf(qkv: Tensor, model: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    groups, d = model.query_groups, model.kv_channels or model.hidden_size // model.num_attention_heads
    per_group = model.num_attention_heads // groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _pad_rows(weight: Tensor, rows: int) -> Tensor:
    if weight.shape[0] > rows:
        raise ValueError(f"vocab of {weight.shape[0]} does not fit the padded vocab {rows}")
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])]) if weight.shape[0] < rows else weight


def hf_to_megatron(get: Any, model: ModelConfig, padded_vocab: int) -> Iterator[tuple[str, Tensor]]:
    """Yield (megatron name, tensor), reading HF tensors one at a time through ``get(name)``.

    ``get`` raises KeyError for a missing tensor; the caller turns that into a clear message.
    """
    yield "embedding.word_embeddings.weight", _pad_rows(get("model.embed_tokens.weight"), padded_vocab)
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield mg + "input_layernorm.weight", get(hf + "input_layernorm.weight")
        attn = hf + "self_attn."
        yield mg + "self_attention.linear_qkv.weight", _qkv_from_hf(
            get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"), model
        )
        if model.qkv_bias:
            yield mg + "self_attention.linear_qkv.bias", _qkv_from_hf(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"), model
            )
        if model.qk_norm:
            yield mg + "self_attention.q_layernorm.weight", get(attn + "q_norm.weight")
            yield mg + "self_attention.k_layernorm.weight", get(attn + "k_norm.weight")
        yield mg + "self_attention.linear_proj.weight", get(attn + "o_proj.weight")
        yield mg + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight")
        mlp = hf + "mlp."
        yield mg + "mlp.linear_fc1.weight", torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")])
        yield mg + "mlp.linear_fc2.weight", get(mlp + "down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not model.tie_embeddings:
        yield "output_layer.weight", _pad_rows(get("lm_head.weight"), padded_vocab)


def megatron_to_hf(get: Any, model: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF name, tensor) from megatron tensors read through ``get(name)``; vocab unpadded."""
    vocab = model.vocab_size
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")[:vocab]
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield hf + "input_layernorm.weight", get(mg + "input_layernorm.weight")
        attn = hf + "self_attn."
        q, k, v = _qkv_to_hf(get(mg + "self_attention.linear_qkv.weight"), model)
        yield attn + "q_proj.weight", q
        yield attn + "k_proj.weight", k
        yield attn + "v_proj.weight", v
        if model.qkv_bias:
            qb, kb, vb = _qkv_to_hf(get(mg + "self_attention.linear_qkv.bias"), model)
            yield attn + "q_proj.bias", qb
            yield attn + "k_proj.bias", kb
            yield attn + "v_proj.bias", vb
        if model.qk_norm:
            yield attn + "q_norm.weight", get(mg + "self_attention.q_layernorm.weight")
            yield attn + "k_norm.weight", get(mg + "self_attention.k_layernorm.weight")
        yield attn + "o_proj.weight", get(mg + "self_attention.linear_proj.weight")
        yield hf + "post_attention_layernorm.weight", get(mg + "pre_mlp_layernorm.weight")
        gate, up = torch.chunk(get(mg + "mlp.linear_fc1.weight"), 2, dim=0)
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        yield hf + "mlp.down_proj.weight", get(mg + "mlp.linear_fc2.weight")
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not model.tie_embeddings:
        yield "lm_head.weight", get("output_layer.weight")[:vocab]


def tensor_count(model: ModelConfig) -> int:
    """How many megatron tensors the mapping yields (for progress bars)."""
    per_layer = 5 + (1 if model.qkv_bias else 0) + (2 if model.qk_norm else 0) + 1
    return 2 + model.num_layers * per_layer + (0 if model.tie_embeddings else 1)


