"""Per-GPU memory of a training layout, predicted before any job is queued (tools/plan_layout.py).

For a model shape, a TP x PP x DP layout (with sequence parallelism and activation recompute) and
a workload (pairs per micro-batch, sequence length, dtype, reference mode), the most loaded
pipeline stage holds:

- weights: its parameters (vocabulary rows split over TP; norms whole on every TP rank);
- gradients: megatron's fp32 gradient buffer (``grad_reduce_in_fp32``), one per parameter;
- optimizer: Adam's two fp32 moments and, under bf16, the fp32 master copy, sharded over DP by
  the distributed optimizer;
- activations: what autograd keeps per layer and micro-batch, times the micro-batches a 1F1B
  pipeline keeps in flight on its first stage (PP; a bit more when interleaved);
- head: the log-prob head's working set on the last stage (fused: a few [chunk, vocab / TP] fp32
  blocks; unfused: the [tokens, vocab / TP] logits, megatron's fp32 copy and the softmax);
- reference: a resident reference's weights (``reference.mode=resident``; none for precompute
  and cpu_swap, whose reference waits in CPU memory).

The per-layer activation count follows the local layer spec's own saved tensors (input of each
norm and linear layer, q/k/v, the attention probabilities unless the attention kernel is a
flash-style one, the SwiGLU intermediates); sequence parallelism divides what sits outside the
TP region by TP. Checked against measured peaks on CPU (tests/test_memory_plan.py; README).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmpo_megatron.config import (
    LORA_PROJECTIONS,
    RECOMPUTE_GRANULARITIES,
    DataConfig,
    ModelConfig,
    TrainConfig,
    padded_vocab_size,
)

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    """A parallel layout and the memory-saving choices that go with it."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = True  # only meaningful when tensor_parallel > 1
    recompute: str = "none"
    recompute_method: str = "uniform"  # with recompute=full, as model.recompute_method
    recompute_num_layers: int = 1  # with recompute=full, as model.recompute_num_layers

    @classmethod
    def of(cls, cfg: TrainConfig, world_size: int) -> "Layout":
        """The layout a training config runs on ``world_size`` GPUs."""
        tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
        return cls(tp, pp, world_size // (tp * pp), cfg.parallel.virtual_pipeline, cfg.parallel.uses_sequence_parallel,
                   cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers)

    @property
    def gpus(self) -> int:
        """GPUs the layout uses."""
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def uses_sequence_parallel(self) -> bool:
        """Sequence parallelism in effect (TP > 1 and asked for)."""
        return self.sequence_parallel and self.tensor_parallel > 1

    def describe_recompute(self) -> str:
        """``model.recompute`` with, under full, its method and layer count."""
        if self.recompute != "full":
            return self.recompute
        return f"full, {self.recompute_method} {self.recompute_num_layers}"

    def describe(self) -> str:
        """``TP x PP x DP`` with its choices, for tables."""
        vpp = f" (vpp {self.virtual_pipeline})" if self.virtual_pipeline else ""
        sp = " SP" if self.uses_sequence_parallel else ""
        return f"{self.tensor_parallel} x {self.pipeline_parallel}{vpp} x {self.data_parallel}{sp}"


@dataclass(frozen=True)
class Workload:
    """What one optimizer step feeds the model."""

    micro_batch_size: int = 1  # pairs: two sequences each
    max_length: int = DataConfig.max_length  # tokens a sequence is padded to (the training default)
    global_batch_size: int = 128  # pairs a step
    dtype: str = "bf16"  # bf16 | fp32 (weights and activations)
    reference: str = "precompute"
    fused_logprob_chunk: int = 1024
    distributed_optimizer: bool = True
    lora_rank: int = 0  # model.lora.rank: 0 is full fine-tuning
    lora_projections: tuple[str, ...] = LORA_PROJECTIONS  # model.lora's targets, as HF projection names
    lora_dropout: float = 0.0  # model.lora.dropout: above 0 each adapted linear keeps its dropped input

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Workload":
        """What a training config feeds the model (bf16 unless it asks for fp32)."""
        return cls(cfg.train.micro_batch_size, cfg.data.max_length, cfg.train.global_batch_size,
                   "fp32" if cfg.precision.dtype == "fp32" else "bf16", cfg.reference_mode,
                   cfg.model.fused_logprob_chunk, cfg.optim.distributed_optimizer, cfg.model.lora.rank,
                   cfg.model.lora.projections if cfg.model.lora.enabled else LORA_PROJECTIONS, cfg.model.lora.dropout)

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one weight or activation value."""
        return 2 if self.dtype == "bf16" else 4


@dataclass
class MemoryEstimate:
    """Predicted bytes per GPU on the most loaded pipeline stage, by kind."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    head: float = 0.0
    reference: float = 0.0
    parameters: int = 0  # on that stage, this TP rank
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        """All of it."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.head + self.reference

    def gib(self, name: str = "total") -> float:
        """One component (or the total) in GiB."""
        return getattr(self, name) / GIB


def _head_dim(model: ModelConfig) -> int:
    return model.kv_channels or model.hidden_size // model.num_attention_heads


def layer_parameters(model: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank."""
    h, d, f = model.hidden_size, _head_dim(model), model.ffn_hidden_size or 4 * model.hidden_size
    q, kv = model.num_attention_heads * d, model.query_groups * d
    qkv = h * (q + 2 * kv) + ((q + 2 * kv) if model.qkv_bias else 0)
    mlp = h * f * (2 if model.swiglu else 1) + f * h
    norms = 2 * h * (2 if model.normalization == "LayerNorm" else 1) + (2 * d if model.qk_norm else 0)
    return (qkv + q * h + mlp) // tp + norms


def _projection_shapes(model: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """HF projection -> (input, output, column-parallel base) of one layer, whole."""
    h, d, f = model.hidden_size, _head_dim(model), model.ffn_hidden_size or 4 * model.hidden_size
    q, kv = model.num_attention_heads * d, model.query_groups * d
    return {"q_proj": (h, q, True), "k_proj": (h, kv, True), "v_proj": (h, kv, True), "o_proj": (q, h, False),
            "gate_proj": (h, f, True), "up_proj": (h, f, True), "down_proj": (f, h, False)}


def layer_adapter_parameters(model: ModelConfig, tp: int, rank: int, projections: tuple[str, ...]) -> int:
    """LoRA parameters of one layer on one TP rank (model/lora.py: a column base splits B by rows
    and keeps A whole, a row base splits A by columns and keeps B whole)."""
    total = 0
    for name in projections:
        inputs, outputs, column = _projection_shapes(model)[name]
        total += rank * inputs + outputs * rank // tp if column else rank * inputs // tp + outputs * rank
    return total


def stage_parameters(model: ModelConfig, tp: int, pp: int, vocab_size: int) -> list[int]:
    """Parameters on one TP rank of each pipeline stage (embedding on the first, head on the last)."""
    vocab = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by, tp) // tp
    per_stage = model.num_layers // pp * layer_parameters(model, tp)
    stages = [per_stage] * pp
    stages[0] += vocab * model.hidden_size
    if model.position_embedding == "learned_absolute":
        stages[0] += model.max_position_embeddings * model.hidden_size
    final_norm = model.hidden_size * (2 if model.normalization == "LayerNorm" else 1)
    # A tied output layer on its own last stage keeps a copy of the embedding (megatron syncs them).
    head = vocab * model.hidden_size if (not model.tie_embeddings or pp > 1) else 0
    stages[-1] += final_norm + head
    return stages


def layer_input_bytes(model: ModelConfig, layout: Layout, work: Workload) -> float:
    """One layer's input for one micro-batch: all a fully recomputed layer keeps (split under SP)."""
    sp = layout.tensor_parallel if layout.uses_sequence_parallel else 1
    return 2 * work.micro_batch_size * work.max_length * model.hidden_size * work.bytes_per_value / sp


def layer_activation_bytes(model: ModelConfig, layout: Layout, work: Workload, layer_spec: str) -> dict[str, float]:
    """Bytes autograd keeps for one layer and one micro-batch, by tensor group, with no recompute or
    selective recompute (a fully recomputed layer keeps its input: layer_input_bytes)."""
    t = layout.tensor_parallel
    sp = t if layout.uses_sequence_parallel else 1
    e = work.bytes_per_value
    rows, s = 2 * work.micro_batch_size, work.max_length
    tokens = rows * s
    h, d, f = model.hidden_size, _head_dim(model), model.ffn_hidden_size or 4 * model.hidden_size
    heads, groups = model.num_attention_heads // t, model.query_groups // t
    parts = {
        # Norm inputs and the normalised inputs of QKV and fc1 (split over TP under SP).
        "norms and linear inputs": 4 * tokens * h * e / sp,
        "q, k, v": tokens * (heads + 2 * groups) * d * e,
        "attention output": tokens * heads * d * e,
        "mlp": tokens * (4 * f // t if model.swiglu else 2 * f // t) * e,
    }
    if layer_spec == "local":
        # GQA expands k and v to every head; the core attention keeps the [rows, heads, s, s] probabilities.
        parts["q, k, v"] += 2 * tokens * (heads - groups) * d * e
        if layout.recompute != "selective":
            parts["attention probabilities"] = rows * heads * s * s * e
    elif layout.recompute != "selective":
        # A flash-style kernel (SDPA, TE) keeps its own output (and a per-row log-sum-exp) for its backward.
        parts["attention kernel output"] = tokens * heads * d * e
    # Selective recompute re-runs the core attention from its saved q, k, v: it drops only what the
    # core attention keeps inside (the local spec's probabilities; a flash-style kernel keeps
    # nothing of that size). Its output stays: linear_proj saves it as its input.
    if work.lora_rank:
        # LoRA: each adapter keeps its r-wide hidden; under SP the column adapters' gathered input
        # (qkv, fc1) is a copy of its own (the base keeps the split one and gathers again).
        chosen = work.lora_projections
        gathered = {"linear_qkv": any(p in chosen for p in ("q_proj", "k_proj", "v_proj")),
                    "linear_fc1": any(p in chosen for p in ("gate_proj", "up_proj"))}
        parts["lora adapters"] = tokens * work.lora_rank * e * len(chosen) + (
            sum(gathered.values()) * tokens * h * e if sp > 1 and not work.lora_dropout else 0)
        if work.lora_dropout > 0:
            # Dropout makes each adapted linear's input a new tensor (and a boolean mask), which the
            # adapter keeps instead of the gathered input: the column ones see the whole hidden
            # state, the row ones this rank's attention or MLP features.
            rows_in = {"linear_proj": heads * d if "o_proj" in chosen else 0,
                       "linear_fc2": f // t if "down_proj" in chosen else 0}
            parts["lora dropout"] = (e + 1) * tokens * (sum(gathered.values()) * h + sum(rows_in.values()))
    return parts


def kept_activation_bytes(model: ModelConfig, layout: Layout, work: Workload, layer_spec: str,
                          layers: int) -> dict[str, float]:
    """What a stage of ``layers`` layers keeps for one micro-batch until its backward, by group."""
    if layout.recompute != "full":
        return {name: value * layers for name, value in layer_activation_bytes(model, layout, work, layer_spec).items()}
    every = sum(layer_activation_bytes(model, layout, work, layer_spec).values())
    count = min(layout.recompute_num_layers, layers)
    if layout.recompute_method == "block":  # the first `count` layers keep their input, the rest everything
        return {"recomputed layers' inputs": count * layer_input_bytes(model, layout, work),
                "other layers": (layers - count) * every}
    # uniform: groups of `count` layers, each keeping the input of its first layer
    return {"recomputed groups' inputs": -(-layers // count) * layer_input_bytes(model, layout, work)}


def in_flight_microbatches(layout: Layout, microbatches: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at the peak (1F1B)."""
    pp = layout.pipeline_parallel
    if pp == 1:
        return 1.0
    if layout.virtual_pipeline:
        return min(microbatches, pp) * (1 + (pp - 1) / (pp * layout.virtual_pipeline))
    return float(min(microbatches, pp))


def head_bytes(model: ModelConfig, layout: Layout, work: Workload, vocab_size: int) -> float:
    """The log-prob head's working set on the last stage (one micro-batch)."""
    vocab = (
        padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by, layout.tensor_parallel)
        / layout.tensor_parallel
    )
    tokens = 2 * work.micro_batch_size * work.max_length
    if work.fused_logprob_chunk > 0:
        # fp32 logits of one chunk, their exp and the chunk's gradient block.
        return 3 * min(work.fused_logprob_chunk, tokens) * vocab * 4
    # bf16 logits, megatron's fp32 copy, the fp32 softmax kept for the backward.
    return tokens * vocab * (work.bytes_per_value + 4 + 4)


def estimate(model: ModelConfig, layout: Layout, work: Workload, *, vocab_size: int | None = None,
             layer_spec: str | None = None) -> MemoryEstimate:
    """Predicted per-GPU bytes of the most loaded stage for ``layout`` and ``work``."""
    vocab_size = vocab_size or model.vocab_size or 32000
    layer_spec = layer_spec or model.layer_spec
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    stages = stage_parameters(model, tp, pp, vocab_size)
    e = work.bytes_per_value
    microbatches = max(1, work.global_batch_size // (work.micro_batch_size * dp))
    layers = model.num_layers // pp
    # megatron applies recompute_num_layers to each model chunk (virtual stage) of a rank.
    chunks = layout.virtual_pipeline or 1
    per_chunk = kept_activation_bytes(model, layout, work, layer_spec, layers // chunks)
    kept_per_microbatch = {name: value * chunks for name, value in per_chunk.items()}
    moments = 8 + (4 if work.dtype == "bf16" else 0)  # Adam m, v (+ fp32 master under bf16)
    whole_layer = sum(
        layer_activation_bytes(
            model, Layout(tp, pp, dp, layout.virtual_pipeline, layout.sequence_parallel, "none"), work, layer_spec
        ).values()
    )
    # The backward of a layer holds gradients of about its own activations while it runs. Under
    # full recompute a checkpointed group's forward is redone first (all of its layers' sets) and
    # its backward frees as it goes: half a layer's set on top (measured on CPU). Under the block
    # method the peak is the larger of the backward's start (the layers not recomputed, plus that
    # half) and a recomputed layer's backward.
    working = whole_layer
    if work.lora_rank:
        # Frozen base weights get no gradients: the backward's working set is smaller (fitted on
        # CPU at TP=1 and TP=2 without SP: 0.7 of a layer's set; the SP row checks it).
        working *= 0.7
    if layout.recompute == "full":
        count = min(layout.recompute_num_layers, layers // chunks)
        if layout.recompute_method == "uniform":
            working = whole_layer * (count + 0.5)
        else:
            working = whole_layer * max(0.5, 1.5 - (layers // chunks - count))
    # [rows x heads, s, s] of one layer: megatron's local attention computes scores in a persistent
    # buffer of that size, and selective recompute rebuilds one layer's probabilities.
    scores = 2 * work.micro_batch_size * model.num_attention_heads // tp * work.max_length ** 2 * e
    if layout.recompute == "selective" and layer_spec == "local":
        working += scores
    scratch = scores if layer_spec == "local" else 0.0
    adapters = (
        layer_adapter_parameters(model, tp, work.lora_rank, work.lora_projections) * layers if work.lora_rank else 0
    )
    best = None
    for index, params in enumerate(stages):
        # Under LoRA only the adapters have gradients and optimizer state; the base weights are frozen.
        trainable = adapters if work.lora_rank else params
        optimizer = trainable * moments / (dp if work.distributed_optimizer else 1)
        in_flight = in_flight_microbatches(layout, microbatches) if index == 0 else 1.0
        kept = sum(kept_per_microbatch.values()) * in_flight
        activations = kept + working + scratch
        last = index == len(stages) - 1
        candidate = MemoryEstimate(
            weights=(params + adapters) * e, gradients=trainable * 4, optimizer=optimizer, activations=activations,
            head=head_bytes(model, layout, work, vocab_size) if last else 0.0,
            reference=params * e if work.reference == "resident" else 0.0, parameters=params + adapters,
            parts={**{name: value * in_flight for name, value in kept_per_microbatch.items()},
                   "backward working set": working, "attention scratch buffer": scratch},
        )
        if best is None or candidate.total > best.total:
            best = candidate
    return best


def candidate_layouts(model: ModelConfig, gpus: int, *, max_tensor_parallel: int = 8) -> list[Layout]:
    """Every TP x PP x DP that uses all ``gpus`` and splits the model (TP within a node, <= 8)."""
    out = []
    for tp in range(1, min(gpus, max_tensor_parallel) + 1):
        if gpus % tp or model.num_attention_heads % tp or model.query_groups % tp:
            continue
        for pp in range(1, gpus // tp + 1):
            if (gpus // tp) % pp or model.num_layers % pp:
                continue
            out.append(Layout(tp, pp, gpus // (tp * pp)))
    return out


@dataclass
class PlanRow:
    """One layout with the cheapest recompute that fits, its estimate, and whether it fits."""

    layout: Layout
    estimate: MemoryEstimate
    fits: bool


def plan(model: ModelConfig, gpus: int, gpu_memory_gib: float, work: Workload, *, vocab_size: int | None = None,
         headroom: float = 0.9) -> list[PlanRow]:
    """Layouts for ``gpus`` GPUs of ``gpu_memory_gib``, best first: those that fit within ``headroom``
    of the memory (allocator fragmentation, NCCL and CUDA context take the rest), preferring no
    recompute, then the least model parallelism (TP x PP: more DP is faster), then less memory."""
    rows = []
    budget = gpu_memory_gib * GIB * headroom
    for layout in candidate_layouts(model, gpus):
        chosen = None
        for recompute in RECOMPUTE_GRANULARITIES:  # cheapest first
            trial = Layout(layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel,
                           sequence_parallel=True, recompute=recompute)
            chosen = PlanRow(trial, estimate(model, trial, work, vocab_size=vocab_size), False)
            chosen.fits = chosen.estimate.total <= budget
            if chosen.fits:
                break
        rows.append(chosen)

    def rank(row: PlanRow):
        layout = row.layout
        return (
            not row.fits,
            RECOMPUTE_GRANULARITIES.index(layout.recompute),
            layout.tensor_parallel * layout.pipeline_parallel,
            row.estimate.total,
        )

    return sorted(rows, key=rank)


def gib(value: float) -> str:
    """A byte count as ``12.3 GiB``."""
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.0f} MiB"


__all__ = ["Layout", "Workload", "MemoryEstimate", "PlanRow", "estimate", "plan", "candidate_layouts",
           "stage_parameters", "layer_parameters"]
