"""Every check that can be made before a run starts work, in one place.

A run first resolves what the config leaves to files (the HF model shape of ``model.from_hf``,
the tokenizer's vocabulary), then checks the whole config against the world size and this
machine (GPU, Transformer Engine, FP8 capability, the vocabulary split over TP). Only then are
process groups created, data tokenised or the run folder written, so a bad config costs seconds
and fails with one ``config error:`` line that names the key.
"""

from __future__ import annotations

from dataclasses import replace

from mmpo_megatron.config import ConfigError, ModelConfig, TrainConfig, padded_vocab_size
from mmpo_megatron.messages import say


def model_from_hf(model: ModelConfig) -> ModelConfig:
    """The shape of ``model.from_hf`` (an HF folder or converted checkpoint), keeping our own knobs."""
    from mmpo_megatron.convert.checkpoints import ConversionError, read_hf_config
    from mmpo_megatron.convert.llama import model_config_from_hf

    try:
        hf = read_hf_config(model.from_hf)
    except ConversionError as exc:
        raise ConfigError(f"model.from_hf: {exc}") from None
    translated = model_config_from_hf(hf, layer_spec=model.layer_spec)
    return replace(translated, from_hf=model.from_hf, make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
                   fused_logprob_chunk=model.fused_logprob_chunk, recompute=model.recompute,
                   recompute_method=model.recompute_method, recompute_num_layers=model.recompute_num_layers,
                   lora=model.lora)


def tokenizer_length(name: str) -> int:
    """How many tokens the configured tokenizer has (its load errors name ``data.tokenizer``)."""
    from mmpo_megatron.data.tokenizer import load_tokenizer

    try:
        return len(load_tokenizer(name))
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None


def holds_adapters(checkpoint: str) -> bool:
    """Whether a checkpoint (or run folder) holds LoRA adapters (its tensor names say)."""
    from megatron.core import dist_checkpointing

    from mmpo_megatron.model.checkpoint import resolve_checkpoint
    from mmpo_megatron.model.lora import ADAPTER

    try:
        path = resolve_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        raise ConfigError(f"checkpoint.load_weights: {exc}") from None
    return any(f".{ADAPTER}." in key for key in dist_checkpointing.load_tensors_metadata(str(path)))


def preflight(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` with the HF shape resolved, checked against the world size and this machine."""
    from mmpo_megatron.model.builder import check_runtime_support
    from mmpo_megatron.parallel.runtime import resolve_device

    if cfg.model.from_hf:
        cfg.model = model_from_hf(cfg.model)
    mode, why = cfg.reference_resolution()
    if cfg.reference.mode != mode:
        say(f"reference.mode: {mode} (from {cfg.reference.mode}: {why})")
        cfg.reference.mode = mode
    if cfg.model.lora.enabled and cfg.model.lora.init_from:
        from mmpo_megatron.model.lora import check_peft_adapter, read_peft_adapter

        check_peft_adapter(cfg.model.lora, read_peft_adapter(cfg.model.lora.init_from)[0])
    if (
        cfg.reference_mode == "adapters_off"
        and cfg.checkpoint.load_weights
        and holds_adapters(cfg.checkpoint.load_weights)
    ):
        raise ConfigError(f"reference.mode: adapters_off makes the base the reference, but checkpoint.load_weights="
                          f"{cfg.checkpoint.load_weights} holds LoRA adapters, so the policy starts elsewhere: set "
                          f"reference.mode=precompute (the starting policy as the reference)")
    cfg.validate_for_world(world_size)
    device = resolve_device(cfg.parallel.device)
    check_runtime_support(cfg.model, cfg.precision, device)
    tokens = tokenizer_length(cfg.data.tokenizer)
    vocab = cfg.model.vocab_size or tokens
    if vocab < tokens:
        raise ConfigError(f"model.vocab_size: {vocab} is smaller than the tokenizer's {tokens} tokens")
    padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_parallel)
    check_lm_documents_fit(cfg, device)
    return cfg


def check_lm_documents_fit(cfg: TrainConfig, device: str) -> None:
    """Under packing, an eval.lm_data document (scored as a pair: its tokens plus two) must fit a packed row."""
    from mmpo_megatron.model.builder import default_pack_length

    if not (cfg.eval.lm_data and cfg.data.packing):
        return
    length = cfg.eval.lm_max_length or cfg.data.max_length
    pack_length = cfg.data.pack_length or default_pack_length(
        cfg.model, cfg.data.max_length, cfg.train.micro_batch_size, device
    )
    if length + 2 > pack_length:
        raise ConfigError(
            f"eval.lm_max_length: a document of {length} tokens is scored in a packed row of {length + 2}, "
            f"longer than the packed row length {pack_length} (data.pack_length); lower "
            f"eval.lm_max_length to {pack_length - 2} or raise data.pack_length"
        )
