"""Configuration dataclasses, one per concern. Each field documents its default and why.

Hydra builds these from ``configs/``; every check runs in ``__post_init__`` so a bad value fails
before any heavy work, with an error that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOSS_NAMES = ("mmpo", "dpo", "ipo", "simpo")
NORM_SCOPES = ("global", "dp_microbatch", "local", "none")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass
class LossConfig:
    """Which preference loss to train with and its hyper-parameters (docs/method.md)."""

    name: str = "mmpo"
    """The objective. MMPO is this project's reason to exist; the others are the paper's baselines."""

    beta: float = 0.1
    """Temperature. Paper grid 0.01, 0.05, 0.1, 0.5; 0.1 is the common DPO default. SimPO uses ~2.0."""

    eps_chosen: float = 0.9
    """MMPO prior-reward offset of the chosen response (paper runs: 0.9)."""

    eps_rejected: float = 0.1
    """MMPO prior-reward offset of the rejected response (paper runs: 0.1)."""

    aux_input: str = "score_margin"
    """MMPO auxiliary term input: ``sc - sr`` (paper-literal) or the DPO margin."""

    aux_weight: float = 1.0
    """MMPO auxiliary weight lambda: 1.0 in the paper; 0 gives pure marginal likelihood.
    With ``score_margin`` and 1.0 the loss equals ``-sc``: the rejected side gets no gradient."""

    norm_scope: str = "global"
    """Where MMPO's min-max statistics come from. ``global`` (the optimizer step's whole batch) is
    the only scope whose result does not depend on the DP x micro-batch split."""

    logp_reduction: str = "sum"
    """Sequence log-prob for MMPO and DPO: sum over completion tokens (paper) or per-token mean.
    IPO and SimPO always use the mean, as their papers define them."""

    label_smoothing: float = 0.0
    """DPO label smoothing (cDPO); 0 is plain DPO."""

    gamma: float = 2.5
    """SimPO target margin; the SimPO paper uses gamma/beta between 1.0 and 1.6 with beta ~2."""

    nll_weight: float = 0.0
    """Weight of an added per-token NLL on the chosen response (RPO style); 0 disables it."""

    def __post_init__(self) -> None:
        _require(self.name in LOSS_NAMES, "loss.name", f"must be one of {LOSS_NAMES}, got {self.name!r}")
        _require(
            self.norm_scope in NORM_SCOPES, "loss.norm_scope", f"must be one of {NORM_SCOPES}, got {self.norm_scope!r}"
        )
        _require(
            self.aux_input in ("score_margin", "dpo_margin"),
            "loss.aux_input",
            f"must be 'score_margin' or 'dpo_margin', got {self.aux_input!r}",
        )
        _require(
            self.logp_reduction in ("sum", "mean"),
            "loss.logp_reduction",
            f"must be 'sum' or 'mean', got {self.logp_reduction!r}",
        )
        _require(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        _require(self.aux_weight >= 0, "loss.aux_weight", f"must be >= 0, got {self.aux_weight}")
        _require(
            0.0 <= self.label_smoothing < 0.5,
            "loss.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        _require(self.nll_weight >= 0, "loss.nll_weight", f"must be >= 0, got {self.nll_weight}")

    @property
    def needs_reference(self) -> bool:
        """SimPO is reference-free; every other loss needs reference log-probs."""
        return self.name != "simpo"


@dataclass
class ParallelConfig:
    """How the job is laid out over processes and which device runs it."""

    tensor_parallel: int = 1
    """Tensor-parallel size (megatron TP). Must divide attention heads and query groups."""

    pipeline_parallel: int = 1
    """Pipeline-parallel size. Must divide the number of layers."""

    virtual_pipeline: int | None = None
    """Virtual stages per pipeline rank (interleaved 1F1B); None disables interleaving."""

    device: str = "auto"
    """``auto`` picks CUDA (nccl) when a GPU is visible, else CPU (gloo, through the CPU shim)."""

    seed: int = 1234
    """Seed of megatron's model-parallel RNG streams (same offsets as megatron's own)."""

    timeout_minutes: int = 30
    """Collective timeout. Long enough for a reference precompute pass on rank 0's checkpoint I/O."""

    sequence_parallel: bool | None = None
    """Megatron sequence parallelism: under TP, the norms' and residual stream's activations are
    split along the sequence over the TP ranks instead of held whole on each (TP's all-reduces
    become reduce-scatter + all-gather pairs of the same volume). null: on whenever
    tensor_parallel > 1, as Megatron-LM recommends; it has no meaning at TP=1."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass (megatron's DDP buckets).
    Off by default: on a single node NVLink makes the reduce short, and on CPU gloo gains nothing;
    turn it on for multi-node DP (the recipes do)."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass.
    Pairs with overlap_grad_reduce; same default and reason."""

    ddp_bucket_size: int | None = None
    """Elements per gradient-reduce bucket; null: megatron's default (max(40M, 1M x DP) elements)."""

    @property
    def uses_sequence_parallel(self) -> bool:
        """Whether sequence parallelism is on: the setting resolved for this TP size."""
        return self.tensor_parallel > 1 and (self.sequence_parallel is None or self.sequence_parallel)

    def __post_init__(self) -> None:
        _require(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1, "parallel.ddp_bucket_size",
                 f"must be null or >= 1, got {self.ddp_bucket_size}")
        _require(self.tensor_parallel >= 1, "parallel.tensor_parallel", f"must be >= 1, got {self.tensor_parallel}")
        _require(
            self.pipeline_parallel >= 1, "parallel.pipeline_parallel", f"must be >= 1, got {self.pipeline_parallel}"
        )
        _require(
            self.virtual_pipeline is None or self.virtual_pipeline >= 1,
            "parallel.virtual_pipeline",
            f"must be None or >= 1, got {self.virtual_pipeline}",
        )
        _require(
            self.device in DEVICES,
            "parallel.device",
            f"must be 'auto', 'cuda' or 'cpu', got {self.device!r}",
        )


@dataclass
class DataSourceConfig:
    """One preference data source."""

    path: str = "embedded"
    """``embedded`` (the bundled arithmetic pairs), a local .jsonl/.json/.parquet file, a folder
    (``save_to_disk`` output, or a folder of such files), or a hub name (machines with internet)."""

    split: str = "train"
    """Split to read; slicing works (``train[:1000]``). A local file is the ``train`` split."""

    format: str = "auto"
    """auto, plain, orca, ultrafeedback, conversational, nemo, or columns (with ``columns``)."""

    weight: float = 1.0
    """The fraction of this source an epoch uses (like alignment-handbook's dataset_mixer
    fractions, but sampled with data.seed and repeating above 1): 1.0 is every
    pair once, 0.5 a seeded half, 2.0 every pair twice. The paper concatenates its two sets (1.0
    each). Held-out sources never repeat a pair (a weight above 1 counts as 1)."""

    columns: dict[str, str] | None = None
    """For format ``columns``: ``{prompt: ..., chosen: ..., rejected: ...}`` column names."""

    def __post_init__(self) -> None:
        _require(self.weight > 0, "data source weight", f"must be > 0, got {self.weight} for {self.path!r}")


@dataclass
class DataConfig:
    """Where the pairs come from and how they become token batches."""

    train: list[DataSourceConfig] | None = None
    """Training sources; None means the embedded demo data's train split."""

    eval: list[DataSourceConfig] | None = None
    """Held-out sources; None means the embedded demo data's test split when training on it."""

    tokenizer: str = "embedded"
    """A local tokenizer folder, a hub name, or ``embedded`` (byte-level, built in code)."""

    max_length: int = 2312
    """Prompt + completion token limit (paper: 2312)."""

    max_prompt_length: int | None = None
    """A cap on prompt tokens (prompts keep their last tokens). None (the default) follows
    ``max_length``: ``max_length - min(longer completion, max_length // 2)``, i.e. a prompt is cut
    only as far as the pair needs to fit, and a long completion claims at most half the budget
    (docs/data.md). The paper's recipes set 1800 of 2312 explicitly."""

    pad_to_multiple: int = 16
    """Micro-batches pad to a multiple of this (FP8 GEMMs need 16)."""

    on_bad_row: str = "skip"
    """A row with a null/non-string/empty field or no assistant reply: counted skip or fatal error."""

    packing: bool = False
    """Pack each micro-batch's pairs into rows of up to ``pack_length`` tokens (chosen and rejected
    of a pair in one row) with block-diagonal causal attention: no compute on padding. local_sdpa
    uses a flex_attention block mask (a dense one where it trains on CPU), local a dense
    [rows, 1, L, L] mask, transformer_engine THD (cu_seqlens; TE's causal attention ignores a mask).
    The first packed step checks packed against padded log-probs and stops the run if they differ."""

    pack_length: int | None = None
    """Packed row length. None: a whole micro-batch (up to 16k tokens) in one row where flex_attention
    trains (local_sdpa on GPU: almost no padding), else 2 x max_length (a dense mask grows with length^2)."""

    group_by_length: bool = False
    """Order each global batch's pairs by length before splitting it, so micro-batches pad less."""

    num_proc: int = 1
    """Processes for tokenisation (datasets.map); results are cached, so a restart re-uses them."""

    seed: int = 1234
    """Seed of the mixing and of the per-epoch shuffle."""

    report_errors: int = 20
    """How many bad rows the data report lists in full (all are counted)."""

    def __post_init__(self) -> None:
        _require(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        _require(
            self.max_prompt_length is None or 1 <= self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            f"must be in [1, max_length={self.max_length}), got {self.max_prompt_length} "
            "(null lets it follow max_length)",
        )
        _require(self.pad_to_multiple >= 1, "data.pad_to_multiple", f"must be >= 1, got {self.pad_to_multiple}")
        _require(
            self.on_bad_row in ("skip", "error"),
            "data.on_bad_row",
            f"must be 'skip' or 'error', got {self.on_bad_row!r}",
        )
        _require(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
        self.train = [_as_source(s) for s in self.train] if self.train else None
        self.eval = [_as_source(s) for s in self.eval] if self.eval else None


def _as_source(source) -> DataSourceConfig:
    if isinstance(source, DataSourceConfig):
        return source
    if isinstance(source, str):
        return DataSourceConfig(path=source)
    return DataSourceConfig(**dict(source))


LAYER_SPECS = ("local", "local_sdpa", "transformer_engine")
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
        _require(self.rank >= 0, "model.lora.rank", f"must be >= 0, got {self.rank}")
        _require(self.alpha is None or self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.rank:
            _require(len(lora_projections(self.target_modules)) > 0, "model.lora.target_modules",
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
            _require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(
            self.fused_logprob_chunk >= 0, "model.fused_logprob_chunk", f"must be >= 0, got {self.fused_logprob_chunk}"
        )
        _require(
            self.layer_spec in LAYER_SPECS, "model.layer_spec", f"must be one of {LAYER_SPECS}, got {self.layer_spec!r}"
        )
        _require(self.recompute in RECOMPUTE_GRANULARITIES, "model.recompute",
                 f"must be one of {RECOMPUTE_GRANULARITIES}, got {self.recompute!r}")
        _require(self.recompute_method in ("uniform", "block"), "model.recompute_method",
                 f"must be 'uniform' or 'block', got {self.recompute_method!r}")
        _require(self.recompute_num_layers >= 1, "model.recompute_num_layers",
                 f"must be >= 1, got {self.recompute_num_layers}")
        _require(
            self.position_embedding in ("rope", "learned_absolute"),
            "model.position_embedding",
            f"must be 'rope' or 'learned_absolute', got {self.position_embedding!r}",
        )
        _require(
            self.normalization in ("RMSNorm", "LayerNorm"),
            "model.normalization",
            f"must be 'RMSNorm' or 'LayerNorm', got {self.normalization!r}",
        )
        groups = self.query_groups
        _require(
            self.num_attention_heads % groups == 0,
            "model.num_query_groups",
            f"{groups} must divide num_attention_heads={self.num_attention_heads}",
        )
        _require(
            self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
            "model.hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; set kv_channels",
        )
        if self.lora.enabled:
            missing = [p for p in self.lora.projections if p in ("gate_proj", "up_proj") and not self.swiglu]
            _require(not missing, "model.lora.target_modules",
                     f"{missing} need a SwiGLU MLP (model.swiglu=true); this model's fc1 has no gate/up parts")
            _require(self.layer_spec != "transformer_engine", "model.lora",
                     "LoRA runs on the local and local_sdpa layer specs; transformer_engine fuses the norm into "
                     "linear_qkv and linear_fc1, whose adapters need the normalised input (not wired yet): use "
                     "model.layer_spec=local_sdpa")

    @property
    def query_groups(self) -> int:
        """KV heads (num_query_groups, defaulting to the attention heads)."""
        return self.num_query_groups or self.num_attention_heads


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
        _require(
            self.dtype in ("auto", "bf16", "fp32"), "precision.dtype", f"must be auto, bf16 or fp32, got {self.dtype!r}"
        )
        _require(
            self.fp8 in (None, "hybrid", "e4m3"), "precision.fp8", f"must be null, hybrid or e4m3, got {self.fp8!r}"
        )
        _require(
            self.fp8_recipe in ("delayed", "tensorwise", "blockwise"),
            "precision.fp8_recipe",
            f"must be delayed, tensorwise or blockwise, got {self.fp8_recipe!r}",
        )


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Check that the model shape splits over the parallel layout; errors name the field."""
    tp, pp, vpp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.virtual_pipeline or 1
    _require(model.num_attention_heads % tp == 0, "parallel.tensor_parallel",
             f"{tp} must divide model.num_attention_heads={model.num_attention_heads}")
    _require(model.query_groups % tp == 0, "parallel.tensor_parallel",
             f"{tp} must divide model.num_query_groups={model.query_groups}")
    _require(model.num_layers % (pp * vpp) == 0, "parallel.pipeline_parallel",
             f"pipeline_parallel x virtual_pipeline = {pp} x {vpp} must divide model.num_layers={model.num_layers}")
    if model.recompute == "full":
        per_stage = model.num_layers // (pp * vpp)
        _require(model.recompute_num_layers <= per_stage, "model.recompute_num_layers",
                 f"{model.recompute_num_layers} is more than the {per_stage} layers of a pipeline stage")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Vocab rounded up to a multiple of ``divisible_by``, which TP must divide.

    Megatron-LM pads to ``divisible_by x TP``, so its checkpoints change shape with TP. Padding
    independent of TP keeps every checkpoint loadable at every TP; padding columns never enter
    the log-probs (``logprobs`` masks them), so the padding amount changes no number.
    """
    padded = -(-vocab_size // divisible_by) * divisible_by
    _require(padded % tensor_parallel == 0, "model.make_vocab_size_divisible_by",
             f"{divisible_by} gives a vocab of {padded}, which tensor_parallel={tensor_parallel} does not divide; "
             f"use a multiple of {tensor_parallel}")
    return padded


def check_fp8_layer_spec(model: ModelConfig, precision: PrecisionConfig) -> None:
    """FP8 GEMMs come from Transformer Engine's layers: ``precision.fp8`` needs their layer spec."""
    if precision.fp8 is not None:
        _require(
            model.layer_spec == "transformer_engine",
            "model.layer_spec",
            f"precision.fp8 needs transformer_engine, got {model.layer_spec!r}",
        )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (megatron's optimizer and OptimizerParamScheduler)."""

    lr: float = 5e-7
    """Peak learning rate. DPO-family runs on 1B-8B models use 1e-7 to 1e-6; the paper used 5e-4
    for full fine-tunes of SmolLM2 (configs/recipes say so where they differ)."""

    min_lr: float = 0.0
    """Floor of the cosine decay."""

    warmup_ratio: float = 0.1
    """Fraction of the total steps spent in linear warmup (paper: 10%)."""

    decay_style: str = "cosine"
    """cosine (paper), linear or constant."""

    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping; 0 disables it."""

    distributed_optimizer: bool = True
    """Shard optimizer state (and fp32 master weights) over data-parallel ranks."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(
            self.decay_style in ("cosine", "linear", "constant"),
            "optim.decay_style",
            f"must be cosine, linear or constant, got {self.decay_style!r}",
        )
        _require(self.clip_grad >= 0, "optim.clip_grad", f"must be >= 0, got {self.clip_grad}")


@dataclass
class TrainerConfig:
    """Batch sizes, length of the run, evaluation cadence, and where the run folder goes."""

    global_batch_size: int = 128
    """Pairs per optimizer step over all DP ranks and micro-batches (paper: 128)."""

    micro_batch_size: int = 1
    """Pairs per micro-batch per rank (each pair is two rows)."""

    epochs: int = 5
    """Passes over the training pairs (paper: 5); max_steps overrides it."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (None: epochs decide)."""

    eval_interval: int = 100
    """Evaluate on held-out pairs every N steps (and at step 0 and the end); 0 disables."""

    eval_max_pairs: int | None = None
    """Cap on held-out pairs per evaluation: a seeded sample (data.seed) across the held-out
    sources, the same at every evaluation (None: all)."""

    log_interval: int = 1
    """Write metrics every N steps."""

    output_dir: str = "outputs/mmpo"
    """Run folder: resolved config, data report, checkpoints, TensorBoard events, metrics.jsonl."""

    overwrite_output_dir: bool = False
    """Start afresh: delete what an earlier run wrote to output_dir (checkpoints, metrics, events,
    its reference cache) instead of resuming from it. False, so a real run resumes after a crash;
    the demo sets it, so every ``make demo`` shows the whole run."""

    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""

    seed: int = 1234
    """Seed of data order and model initialisation."""

    max_wall_minutes: float | None = None
    """Wall-clock budget of this process, counted from its start: the run saves and stops (exit
    code 75, resumable) when the next step plus a save would not fit, estimated from the steps and
    saves measured so far. A Slurm job sets it from its remaining time
    (examples/slurm/train_mmpo.sbatch). None: no budget. SIGTERM and SIGUSR1 stop the same way."""

    def __post_init__(self) -> None:
        _require(self.global_batch_size >= 1, "train.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not divisible by train.micro_batch_size={self.micro_batch_size}",
        )
        _require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _require(
            self.max_steps is None or self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}"
        )
        _require(self.eval_interval >= 0, "train.eval_interval", f"must be >= 0, got {self.eval_interval}")
        _require(self.log_interval >= 1, "train.log_interval", f"must be >= 1, got {self.log_interval}")
        _require(self.max_wall_minutes is None or self.max_wall_minutes > 0, "train.max_wall_minutes",
                 f"must be > 0, got {self.max_wall_minutes}")


REFERENCE_MODES = ("auto", "precompute", "resident", "cpu_swap", "adapters_off")
DEVICES = ("auto", "cuda", "cpu")
CONVERT_DTYPES = ("auto", "bf16", "fp32")  # the converters' --dtype: auto keeps the source's


@dataclass
class ReferenceConfig:
    """Where reference log-probs come from."""

    mode: str = "auto"
    """auto: adapters_off when LoRA starts fresh (model.lora.rank > 0 without init_from), else
    precompute (with init_from the starting policy, base + that adapter, is the reference, as in TRL).
    adapters_off (LoRA only): the policy's own chunks with the adapters switched off are the
    reference, the base model: no copy, no swap, no cache.
    precompute: one forward pass over train and eval pairs before training, cached on disk (keyed
    by data, weights, model and numerics) and reused on restart: offline training repeats epochs,
    so this saves a reference forward per step, and no reference weights stay on the device.
    resident: a second frozen model on the device, run on each step's pairs (one more copy of the
    weights). cpu_swap: the reference weights wait in pinned CPU memory and are copied into the
    policy's parameters for each reference forward and back (two weight copies over PCIe a step,
    no second copy on the device)."""

    checkpoint: str | None = None
    """Reference weights; None means the policy's starting weights (the SFT model)."""

    cache_dir: str | None = None
    """Where precomputed log-probs live; None means <output_dir>/reference_cache."""

    def __post_init__(self) -> None:
        _require(self.mode in REFERENCE_MODES, "reference.mode",
                 f"must be one of {', '.join(REFERENCE_MODES)}, got {self.mode!r}")


@dataclass
class CheckpointConfig:
    """megatron dist_checkpointing: saving, resuming, and starting from other weights."""

    save_interval: int = 0
    """Save every N steps; 0 saves only at the end."""

    keep_last: int = 2
    """How many step checkpoints to keep (older ones are deleted after a newer one is complete)."""

    resume: bool = True
    """Resume from the newest complete checkpoint in <output_dir>/checkpoints when there is one."""

    load_weights: str | None = None
    """Start the policy from these weights only (an SFT or converted HF checkpoint); any TP/PP."""

    async_save: bool = False
    """Write the periodic checkpoints in the background (dist_checkpointing's asynchronous save: a
    forked writer per rank) while training goes on; the folder is marked complete only once every
    rank's write has finished. The last save of a run, or of a stop, is waited for before exit.
    False: each save blocks training until written (docs/benchmarks/checkpoint_save.md measures both)."""

    def __post_init__(self) -> None:
        _require(self.save_interval >= 0, "checkpoint.save_interval", f"must be >= 0, got {self.save_interval}")
        _require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class EvalConfig:
    """What every evaluation (train.eval_interval) watches besides the held-out preference metrics."""

    lm_data: str | None = None
    """A local corpus (.txt: one document a line; .jsonl: a ``text`` field), e.g. the SFT data or
    any general text. At every evaluation the policy's mean per-token NLL on it is logged as
    ``lm/nll``, the reference's (scored once) as ``lm/nll_ref`` and the difference as
    ``lm/nll_delta``: how far preference training moves the model's language modelling (the
    paper's second claim, watched during the run). None: not measured."""

    lm_max_documents: int = 512
    """The first this many documents are scored (a forward pass over them per evaluation)."""

    lm_max_length: int | None = None
    """Tokens kept of a document; None means data.max_length."""

    def __post_init__(self) -> None:
        _require(self.lm_max_documents >= 1, "eval.lm_max_documents", f"must be >= 1, got {self.lm_max_documents}")
        _require(self.lm_max_length is None or self.lm_max_length >= 2, "eval.lm_max_length",
                 f"must be >= 2, got {self.lm_max_length}")


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl (always written)."""

    tensorboard: bool = True
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login)."""

    wandb_project: str = "mmpo-megatron"
    progress_bar: bool = True


@dataclass
class TrainConfig:
    """Everything a run needs; Hydra composes it from configs/ and validates it before heavy work."""

    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(self.device in DEVICES, "device", f"must be auto, cuda or cpu, got {self.device!r}")
        self.parallel.device = self.device
        if not self.loss.needs_reference and self.reference.mode != "precompute":
            # SimPO needs no reference: never build one.
            self.reference.mode = "precompute"
        if self.reference.mode == "auto":
            # LoRA from PEFT's B = 0 starts at the base: the adapters switched off are the reference.
            # From an init_from adapter (an SFT adapter) the starting policy is base + that adapter.
            fresh_adapters = self.model.lora.enabled and not self.model.lora.init_from
            self.reference.mode = "adapters_off" if fresh_adapters else "precompute"
        _require(self.reference.mode != "adapters_off" or self.model.lora.enabled, "reference.mode",
                 "adapters_off needs LoRA (model.lora.rank > 0): without adapters there is no base to switch back to")
        _require(self.reference.mode != "adapters_off" or self.reference.checkpoint is None, "reference.checkpoint",
                 "with reference.mode=adapters_off the reference is the base model; for other reference weights "
                 "choose reference.mode=precompute, resident or cpu_swap")
        if self.precision.fp8 is not None:
            # TE's FP8 GEMMs need every token dimension a multiple of 16.
            _require(
                self.data.pad_to_multiple % 16 == 0,
                "data.pad_to_multiple",
                f"must be a multiple of 16 with precision.fp8={self.precision.fp8}, got {self.data.pad_to_multiple}",
            )
            check_fp8_layer_spec(self.model, self.precision)
        _require(not self.parallel.overlap_param_gather or self.optim.distributed_optimizer,
                 "parallel.overlap_param_gather", "needs optim.distributed_optimizer=true (it overlaps that "
                 "optimizer's parameter all-gather)")

    def validate_for_world(self, world_size: int) -> None:
        """Checks that need the world size; errors name the field."""
        mp = self.parallel.tensor_parallel * self.parallel.pipeline_parallel
        _require(
            world_size % mp == 0,
            "parallel",
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = {mp}",
        )
        dp = world_size // mp
        unit = self.train.micro_batch_size * dp
        _require(
            self.train.global_batch_size % unit == 0,
            "train.global_batch_size",
            f"{self.train.global_batch_size} is not divisible by micro_batch_size x data_parallel = "
            f"{self.train.micro_batch_size} x {dp}",
        )
        if self.parallel.virtual_pipeline:
            # megatron's interleaved schedule runs the micro-batches in groups of PP.
            micro_batches, pp = self.train.global_batch_size // unit, self.parallel.pipeline_parallel
            _require(
                micro_batches % pp == 0,
                "train.global_batch_size",
                f"gives {micro_batches} micro-batches per step (global_batch_size / (micro_batch_size x "
                f"data_parallel) = {self.train.global_batch_size} / ({self.train.micro_batch_size} x {dp})); "
                f"an interleaved pipeline (parallel.virtual_pipeline) needs a multiple of pipeline_parallel={pp}",
            )
        validate_layout(self.model, self.parallel)


HYDRA_SCHEMA = "train_schema"
"""The name configs/train_mmpo.yaml lists first in its defaults: TrainConfig as the schema."""


def _required(key: str):
    raise ConfigError(f"{key}: required by the chosen preset and not given; pass {key}=...")


def register_hydra_schema() -> None:
    """Register TrainConfig with Hydra's ConfigStore as the schema the YAML files extend.

    Every field then exists on the command line with its default and type (``data.packing=true``
    works on any preset; ``train.global_batch_size=abc`` fails at composition). A preset marks a key
    the user must give as ``${required:KEY}``: a bare ``???`` merged onto a schema default would
    silently keep the default.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required)
    ConfigStore.instance().store(name=HYDRA_SCHEMA, node=TrainConfig)
