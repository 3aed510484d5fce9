"""The one place that constructs megatron-core models.

megatron-core 0.19 deprecates GPTModel in favour of HybridModel: that change belongs here and
nowhere else. Everything else receives the list of model chunks this module returns (one chunk,
or one per virtual pipeline stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmpo_megatron.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    check_fp8_layer_spec,
    padded_vocab_size,
    validate_layout,
)
from mmpo_megatron.data.packing import PackedBatch, packed_causal_mask
from mmpo_megatron.model.lora import add_lora, read_peft_adapter


def resolve_dtype(precision: PrecisionConfig, device: str) -> torch.dtype:
    """The model dtype: ``auto`` is bf16 on GPU and fp32 on CPU."""
    if precision.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision.dtype]


def _require_transformer_engine() -> None:
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:
        raise ConfigError(
            "model.layer_spec: transformer_engine needs Transformer Engine (pip install mmpo-megatron[te], "
            f"or an NGC PyTorch image): {exc}"
        ) from exc


def check_runtime_support(model: ModelConfig, precision: PrecisionConfig, device: str) -> None:
    """What this machine must provide for the config (TE for its layer spec, an FP8-capable GPU)."""
    check_fp8_layer_spec(model, precision)
    if model.layer_spec == "transformer_engine":
        _require_transformer_engine()
    if precision.fp8 is not None and (device != "cuda" or torch.cuda.get_device_capability() < (8, 9)):
        found = "no GPU" if device != "cuda" else f"a GPU of compute capability {torch.cuda.get_device_capability()}"
        raise ConfigError(
            f"precision.fp8: FP8 GEMMs need an Ada/Hopper/Blackwell GPU (capability >= 8.9); found {found}"
        )


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, device: str, initialize: bool = True
):
    """megatron's TransformerConfig for this model, layout and precision."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = resolve_dtype(precision, device)
    check_runtime_support(model, precision, device)
    fp8_kwargs = {}
    if precision.fp8 is not None:
        fp8_kwargs = {"fp8": precision.fp8, "fp8_recipe": precision.fp8_recipe}
    return TransformerConfig(
        **_version_kwargs(TransformerConfig),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_norm,
        init_method_std=model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_parallel,
        sequence_parallel=parallel.uses_sequence_parallel,
        **_recompute_kwargs(model),
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Same master weights at every TP size (initialised whole, then split): layouts compare exactly.
        use_cpu_initialization=True,
        perform_initialization=initialize,
        # Pairs are the loss "tokens": megatron then divides gradients by the global pair count.
        calculate_per_token_loss=True,
        # Under plain 1F1B each micro-batch crosses the stages in its own shape (a 3-integer shape
        # message before each activation), so it pads only to its own longest row, not the step's.
        # The interleaved schedule keeps one shape per step (model/schedule.py pads to it): at PP=2
        # its stage neighbours are one rank, and megatron's shape exchange is always a batched
        # isend/irecv, whose sends and receives cross between the two ranks as described below.
        variable_seq_lengths=parallel.pipeline_parallel > 1 and not parallel.virtual_pipeline,
        moe_token_dispatcher_type="alltoall",  # no MoE here; megatron refuses its allgather default with the above
        # Interleaved 1F1B at PP=2: the previous and the next stage are the same rank, and in the
        # steady state an activation and a gradient cross between the two ranks in one batched
        # isend/irecv; matched in posting order they swap (measured on gloo: 0.06 nats off at step
        # 1). megatron's unbatched path orders sends and receives by rank parity instead.
        batch_p2p_comm=not (parallel.virtual_pipeline and parallel.pipeline_parallel == 2),
        **fp8_kwargs,
    )


def _version_kwargs(config_class) -> dict:
    """Arguments only some megatron-core versions take. megatron-core >= 0.18 replaces
    cuda_graph_scope by cuda_graph_modules, whose default ("full", no CUDA graphs are built here
    either way) it then calls deprecated: the empty list is the same and warns of nothing."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(config_class)}
    return {"cuda_graph_modules": []} if "cuda_graph_modules" in names else {}


def _recompute_kwargs(model: ModelConfig) -> dict:
    """``model.recompute`` as megatron's recompute_granularity / method / num_layers."""
    if model.recompute == "none":
        return {}
    if model.recompute == "selective":
        return {"recompute_granularity": "selective"}  # megatron's default module list: core attention
    return {"recompute_granularity": "full", "recompute_method": model.recompute_method,
            "recompute_num_layers": model.recompute_num_layers}


class LocalNorm:
    """The local specs' RMSNorm / LayerNorm (torch's modules, as megatron's WrappedTorchNorm builds),
    usable under sequence parallelism.

    megatron's WrappedTorchNorm refuses sequence parallelism only because it does not mark its
    weights: under SP each TP rank normalises its own slice of the sequence, so a norm weight's
    gradient is a partial sum, and ``finalize_model_grads`` all-reduces it over TP exactly for
    parameters marked ``sequence_parallel`` (as TE's and Apex's norms are marked).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused) -> torch.nn.Module:
        norm_class = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_class(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def layer_spec(model: ModelConfig):
    """The transformer layer spec named by ``model.layer_spec``."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if model.layer_spec == "transformer_engine":
        _require_transformer_engine()
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_norm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_norm, normalization=model.normalization)
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    for holder, name in ((layer, "input_layernorm"), (layer, "pre_mlp_layernorm"), (attention, "q_layernorm"),
                         (attention, "k_layernorm")):
        if getattr(holder, name, None) is WrappedTorchNorm:
            setattr(holder, name, LocalNorm)
    if model.layer_spec == "local_sdpa":
        from mmpo_megatron.model.sdpa_attention import SDPAttention

        attention.core_attention = SDPAttention
    return spec


def block_spec(model: ModelConfig, config, vp_stage: int | None):
    """This stage's decoder block: the layer spec per layer, and the final norm to match it."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = layer_spec(model)
    if model.layer_spec == "transformer_engine":
        return spec  # megatron pairs TE layers with TE's own final norm
    # Left to megatron, the final norm of a local spec is TE's when TE is installed and otherwise
    # WrappedTorchNorm (no sequence parallelism): say which.
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=LocalNorm)


def build_model_chunks(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    vocab_size: int,
    device: str,
    seed: int = 1234,
    initialize: bool = True,
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage), on ``device``, bf16-wrapped when asked."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.module import Float16Module

    validate_layout(model, parallel)
    config = transformer_config(model, parallel, precision, device, initialize)
    initial_adapters = (
        read_peft_adapter(model.lora.init_from)[1] if model.lora.enabled and model.lora.init_from else None
    )
    chunks = []
    vpp = parallel.virtual_pipeline
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        # The same seed on every rank: CPU initialisation builds whole master weights, then splits them.
        torch.manual_seed(seed + 7919 * stage)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(model, config, vp_stage),
            vocab_size=padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by, parallel.tensor_parallel),
            max_sequence_length=model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type=model.position_embedding,
            rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=vp_stage,
        )
        if gpt.post_process and model.fused_logprob_chunk > 0:
            _defer_output_layer(gpt)
        if model.lora.enabled:
            add_lora(gpt, model.lora, seed=seed, initial=initial_adapters)
        gpt.to(device)
        chunks.append(Float16Module(config, gpt) if config.bf16 else gpt)
    return chunks


def _defer_output_layer(gpt: torch.nn.Module) -> None:
    """Make the output layer pass hidden states through; the log-probs apply it fused (logprobs).

    The layer keeps its weight (same checkpoint names), only its forward changes.
    """
    import types

    def passthrough(self, hidden_states, weight=None, runtime_gather_output=None, **kwargs):
        if self.sequence_parallel:
            # Under sequence parallelism the hidden states arrive split along the sequence. The
            # vocab-parallel log-probs need every position on every TP rank: gather them, as the
            # layer's own forward would. The fused log-probs already sum their input gradient over
            # TP (on completion tokens only), so the gather's backward only keeps this rank's part.
            from megatron.core import parallel_state as ps
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                                 group=ps.get_tensor_model_parallel_group())
        return hidden_states, None

    gpt.output_layer.forward = types.MethodType(passthrough, gpt.output_layer)


def output_weight(chunk: torch.nn.Module) -> torch.Tensor:
    """This last-stage chunk's output weight shard (the embedding when tied)."""
    gpt = unwrap(chunk)
    return (
        gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight
    )


def packed_attention_kind(model: ModelConfig) -> str:
    """How packed rows are masked on this layer spec: THD (the rows laid end to end, bounded by
    ``cu_seqlens``) for Transformer Engine, whose causal attention ignores a mask; a flex_attention
    block mask where our SDPA module runs (local_sdpa); else a dense block-diagonal mask."""
    if model.layer_spec == "transformer_engine":
        return "thd"
    return "flex" if model.layer_spec == "local_sdpa" else "dense"


def default_pack_length(model: ModelConfig, max_length: int, micro_batch_size: int, device: str) -> int:
    """Packed row length when ``data.pack_length`` is unset.

    Where packed attention costs follow the real tokens (compiled flex_attention on local_sdpa,
    TE's THD kernels; both GPU) a whole micro-batch goes in one row and almost nothing is padding
    (docs/data.md, "Batching and packing", has the figures), up to 16k tokens a row: building the
    block mask evaluates length^2 booleans. A dense mask costs rows x length^2 in attention too, so
    elsewhere a row holds one longest pair (2 x max_length).
    """
    one_pair = 2 * max_length
    if packed_attention_kind(model) in ("flex", "thd") and device == "cuda":
        return max(one_pair, min(micro_batch_size * one_pair, 16384))
    return one_pair


def packed_attention_mask(kind: str, segment_ids: torch.Tensor) -> torch.Tensor:
    """What megatron carries as packed rows' attention mask. ``flex``: the segment ids themselves,
    from which our SDPA module builds the flex block mask (or, where flex cannot run, the dense
    one) once per forward; megatron's activation recompute saves the mask for backward, which a
    BlockMask cannot be. Otherwise the dense block-diagonal mask."""
    if kind == "flex":
        return segment_ids
    return packed_causal_mask(segment_ids)


def thd_packed_seq_params(packed: PackedBatch):
    """megatron's PackedSeqParams for ``packed``'s rows laid end to end as one THD sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens, longest = packed.thd_cu_seqlens()
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
