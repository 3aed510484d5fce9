"""The model's shape, its layer spec, activation recompute and LoRA adapters, and how the shape
splits over a parallel layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmpo_megatron.config.checks import ConfigError, choices, require

if TYPE_CHECKING:
    from mmpo_megatron.config.parallel import ParallelConfig

LAYER_SPECS = ("local", "local_sdpa", "transformer_engine")
CONVERT_DTYPES = ("auto", "bf16", "fp32")  # the converters' --dtype: auto keeps the source's
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
# LoRA targets by PEFT's (Hugging Face) projection names, and megatron's fused linears as
# shorthands for their groups: one adapter per HF projection, inside the fused linear.
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SHORTHANDS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                   "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}


def lora_projections(targets) -> tuple[str, ...]:
    """``targets`` (HF projection names or megatron shorthands) as HF projection names, in
    LORA_PROJECTIONS order; an unknown name raises, naming it."""
    wanted = set()
    for name in targets:
        if name in LORA_SHORTHANDS:
            wanted.update(LORA_SHORTHANDS[name])
        elif name in LORA_PROJECTIONS:
            wanted.add(name)
        else:
            known = ", ".join(LORA_PROJECTIONS + tuple(LORA_SHORTHANDS))
            raise ConfigError(f"model.lora.target_modules: unknown target {name!r} (known: {known})")
    return tuple(p for p in LORA_PROJECTIONS if p in wanted)


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT's semantics: y = W x + alpha / rank * B A dropout(x)); the base weights
    stay frozen and only the adapters train (and have optimizer state)."""

    rank: int = 0
    """Adapter rank r; 0 turns LoRA off (full fine-tuning). The paper: 64 (Llama-3.2-1B), 32 (8B).
    Under TP the rank need not divide by TP: A and B are split like the base weight."""

    alpha: float | None = None
    """Scale numerator (PEFT's lora_alpha); None means alpha = rank, a scale of 1 (the paper's choice)."""

    dropout: float = 0.0
    """Dropout on the adapter's input (PEFT's lora_dropout); the paper uses 0.01."""

    target_modules: list[str] = field(default_factory=lambda: list(LORA_PROJECTIONS))
    """PEFT projection names (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or megatron's
    linear_qkv / linear_proj / linear_fc1 / linear_fc2 for their groups. Default: every linear layer
    (the paper's 1B setup; its 8B setup uses [q_proj, k_proj, v_proj, o_proj])."""

    init_from: str | None = None
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to start from, e.g.
    an SFT adapter; None starts as PEFT does (A Kaiming-uniform, B zero: the policy starts at the base)."""

    def __post_init__(self) -> None:
        require(self.rank >= 0, "model.lora.rank", f"must be >= 0, got {self.rank}")
        require(self.alpha is None or self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.rank:
            require(len(lora_projections(self.target_modules)) > 0, "model.lora.target_modules",
                     "names no projection")

    @property
    def enabled(self) -> bool:
        """LoRA is on."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on B A x."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def projections(self) -> tuple[str, ...]:
        """The targeted HF projections."""
        return lora_projections(self.target_modules)


@dataclass
class ModelConfig:
    """A Llama-family decoder shape. Presets live in configs/model/; HF configs translate to this."""

    name: str = "tiny"
    """A label for logs and checkpoints."""

    from_hf: str | None = None
    """An HF model folder (or a converted checkpoint): its config.json gives the shape, and the
    fields below are ignored except layer_spec, make_vocab_size_divisible_by, fused_logprob_chunk
    and the recompute settings."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    """Grouped-query attention KV heads; None means multi-head (= num_attention_heads)."""

    ffn_hidden_size: int | None = None
    """MLP width; None means 4 x hidden (SwiGLU presets give theirs explicitly)."""

    kv_channels: int | None = None
    """Head dim; None means hidden / heads."""

    vocab_size: int | None = None
    """None takes the tokenizer's length; padded up to a multiple of make_vocab_size_divisible_by."""

    make_vocab_size_divisible_by: int = 128
    """Vocab padding unit. Unlike Megatron-LM it is not multiplied by TP, so a checkpoint has the same
    shape at every TP size; TP must divide the padded vocabulary (checked at start-up)."""

    max_position_embeddings: int = 4096
    position_embedding: str = "rope"
    """rope (Llama) or learned_absolute (GPT-2)."""

    rotary_base: int = 10000
    rope_scaling: bool = False
    """Llama-3.1-style RoPE frequency scaling."""

    rope_scaling_factor: float = 8.0
    tie_embeddings: bool = False
    """Share input embedding and output layer (SmolLM2, Llama-3.2-1B)."""

    qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""

    qk_norm: bool = False
    """RMSNorm on queries and keys (Qwen3)."""

    swiglu: bool = True
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    fused_logprob_chunk: int = 1024
    """When > 0, the output layer and the label log-probs are computed together, this many tokens at
    a time, on completion tokens only, with a recomputing backward: the [tokens, vocab] logits (and
    megatron's fp32 copy of them) never exist. It is the default because it is also the cheaper one:
    the recompute adds a third to the head's work, while skipping prompt and padding positions saves
    a third to a half of it on preference data. 0 runs megatron's output layer on every position."""

    layer_spec: str = "local"
    """local (megatron's own modules), local_sdpa (local with PyTorch SDPA attention: faster than
    local on a GPU without TE, see README.md "Layer specs"), or transformer_engine (needed for FP8)."""

    recompute: str = "none"
    """Activation recomputation (megatron's recompute_granularity): none; selective (recompute
    the core attention in the backward: its [heads, seq, seq] activations go for a few percent of
    compute); full (keep only each layer's input, recompute the whole layer: activations shrink to
    one tensor per layer for about a third more compute). Reach for selective first."""

    recompute_method: str = "uniform"
    """With recompute=full: uniform (checkpoint groups of recompute_num_layers layers) or block
    (recompute only the first recompute_num_layers layers of each pipeline stage)."""

    recompute_num_layers: int = 1
    """With recompute=full: layers per checkpointed group (uniform) or recomputed layers per stage (block)."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off unless lora.rank > 0)."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(
            self.fused_logprob_chunk >= 0, "model.fused_logprob_chunk", f"must be >= 0, got {self.fused_logprob_chunk}"
        )
        require(
            self.layer_spec in LAYER_SPECS,
            "model.layer_spec",
            f"must be {choices(LAYER_SPECS)}, got {self.layer_spec!r}",
        )
        require(self.recompute in RECOMPUTE_GRANULARITIES, "model.recompute",
                 f"must be {choices(RECOMPUTE_GRANULARITIES)}, got {self.recompute!r}")
        require(self.recompute_method in ("uniform", "block"), "model.recompute_method",
                 f"must be 'uniform' or 'block', got {self.recompute_method!r}")
        require(self.recompute_num_layers >= 1, "model.recompute_num_layers",
                 f"must be >= 1, got {self.recompute_num_layers}")
        require(
            self.position_embedding in ("rope", "learned_absolute"),
            "model.position_embedding",
            f"must be 'rope' or 'learned_absolute', got {self.position_embedding!r}",
        )
        require(
            self.normalization in ("RMSNorm", "LayerNorm"),
            "model.normalization",
            f"must be 'RMSNorm' or 'LayerNorm', got {self.normalization!r}",
        )
        groups = self.query_groups
        require(
            self.num_attention_heads % groups == 0,
            "model.num_query_groups",
            f"{groups} must divide num_attention_heads={self.num_attention_heads}",
        )
        require(
            self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
            "model.hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; set kv_channels",
        )
        if self.lora.enabled:
            missing = [p for p in self.lora.projections if p in ("gate_proj", "up_proj") and not self.swiglu]
            require(not missing, "model.lora.target_modules",
                     f"{missing} need a SwiGLU MLP (model.swiglu=true); this model's fc1 has no gate/up parts")
            require(self.layer_spec != "transformer_engine", "model.lora",
                     "LoRA runs on the local and local_sdpa layer specs; transformer_engine fuses the norm into "
                     "linear_qkv and linear_fc1, whose adapters need the normalised input (not wired yet): use "
                     "model.layer_spec=local_sdpa")

    @property
    def query_groups(self) -> int:
        """KV heads (num_query_groups, defaulting to the attention heads)."""
        return self.num_query_groups or self.num_attention_heads


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Check that the model shape splits over the parallel layout; errors name the field."""
    tp, pp, vpp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.virtual_pipeline or 1
    require(model.num_attention_heads % tp == 0, "parallel.tensor_parallel",
             f"{tp} must divide model.num_attention_heads={model.num_attention_heads}")
    require(model.query_groups % tp == 0, "parallel.tensor_parallel",
             f"{tp} must divide model.num_query_groups={model.query_groups}")
    require(model.num_layers % (pp * vpp) == 0, "parallel.pipeline_parallel",
             f"pipeline_parallel x virtual_pipeline = {pp} x {vpp} must divide model.num_layers={model.num_layers}")
    if model.recompute == "full":
        per_stage = model.num_layers // (pp * vpp)
        require(model.recompute_num_layers <= per_stage, "model.recompute_num_layers",
                 f"{model.recompute_num_layers} is more than the {per_stage} layers of a pipeline stage")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Vocab rounded up to a multiple of ``divisible_by``, which TP must divide.

    Megatron-LM pads to ``divisible_by x TP``, so its checkpoints change shape with TP. Padding
    independent of TP keeps every checkpoint loadable at every TP; padding columns never enter
    the log-probs (``logprobs`` masks them), so the padding amount changes no number.
    """
    padded = -(-vocab_size // divisible_by) * divisible_by
    require(padded % tensor_parallel == 0, "model.make_vocab_size_divisible_by",
             f"{divisible_by} gives a vocab of {padded}, which tensor_parallel={tensor_parallel} does not divide; "
             f"use a multiple of {tensor_parallel}")
    return padded
