"""Set-up of a run: the run folder, the data, and the reference source of ``reference.mode``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from mmpo_megatron.config import TrainConfig
from mmpo_megatron.data.pipeline import build_pairs, eval_sources, train_sources, write_report
from mmpo_megatron.data.tokenizer import load_tokenizer
from mmpo_megatron.messages import say
from mmpo_megatron.model import checkpoint as ckpt
from mmpo_megatron.model.builder import build_model_chunks, resolve_dtype
from mmpo_megatron.model.preference_model import MegatronPreferenceModel
from mmpo_megatron.model.reference import (
    AdaptersOffReference,
    CpuSwapReference,
    PrecomputedReference,
    ReferenceSource,
    ResidentReference,
    checkpoint_weights_in,
)


def prepare_run_folder(cfg: TrainConfig, is_rank0: bool) -> Path:
    """The run folder with the resolved config in it (emptied first with train.overwrite_output_dir)."""
    from omegaconf import OmegaConf

    out = Path(cfg.train.output_dir)
    if is_rank0:
        if cfg.train.overwrite_output_dir:
            _clear_run_folder(out, cfg.reference.cache_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return out


def _clear_run_folder(out: Path, cache_dir: str | None) -> None:
    """Remove what an earlier run wrote into ``out`` (only the trainer's own files and folders)."""
    for name in ("checkpoints", "tensorboard", "metrics.jsonl", "data_report.json", "config.yaml"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    if cache_dir is None:  # a shared cache elsewhere belongs to other runs too
        shutil.rmtree(out / "reference_cache", ignore_errors=True)


def load_data(cfg: TrainConfig, out: Path, is_rank0: bool):
    """(tokenizer, training pairs, held-out pairs or None); the data report goes to the run folder."""
    import datasets

    if not is_rank0:
        datasets.disable_progress_bars()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    # Tokenisation fills datasets' cache. Global rank 0 goes first; then the first rank of each
    # other node, which finds rank 0's result where the cache is shared storage and tokenises
    # once for its node where each node has its own; then the rest, who all find a cache.
    for turn in range(3):
        if tokenisation_turn(dist.get_rank(), node_local_rank()) == turn:
            train_pairs, report = build_pairs(train_sources(cfg.data), tokenizer, cfg.data)
            sources = eval_sources(cfg.data)
            eval_pairs = build_pairs(sources, tokenizer, cfg.data, held_out=True)[0] if sources else None
        dist.barrier()
    if cfg.train.eval_max_pairs and eval_pairs is not None and len(eval_pairs) > cfg.train.eval_max_pairs:
        eval_pairs = eval_pairs.select(held_out_sample(len(eval_pairs), cfg.train.eval_max_pairs, cfg.data.seed))
    if is_rank0:
        write_report(report, out / "data_report.json")
        say(f"data: {report.summary()}")
    return tokenizer, train_pairs, eval_pairs


def node_local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; the global rank on one node without it)."""
    return int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def tokenisation_turn(rank: int, local_rank: int) -> int:
    """When a rank tokenises: 0 global rank 0, 1 the first rank of every other node, 2 the rest."""
    if rank == 0:
        return 0
    return 1 if local_rank == 0 else 2


def held_out_sample(count: int, size: int, seed: int) -> list[int]:
    """A seeded sample of ``size`` of ``count`` held-out positions, in order: it draws from every
    held-out source, where the first ``size`` would be the first source's alone."""
    import numpy as np

    return sorted(int(i) for i in np.random.default_rng(seed).choice(count, size=size, replace=False))


def reference_cache_key(cfg: TrainConfig, weights_identity: str, device: str, vocab_size: int,
                        pack_length: int | None) -> tuple:
    """Everything that changes reference log-probs besides the pairs: weights, model, numerics, packing."""
    precision = {**asdict(cfg.precision), "dtype": str(resolve_dtype(cfg.precision, device))}
    return (weights_identity, asdict(cfg.model), precision, vocab_size, pack_length)


def _reference_identity(cfg: TrainConfig) -> str:
    """What the reference weights are: a checkpoint, the policy's loaded weights, or its seeded init
    (and, under LoRA, the adapters' starting values: an init_from folder's content)."""
    source = cfg.reference.checkpoint or cfg.checkpoint.load_weights
    if source:
        path = ckpt.resolve_checkpoint(source)
        stamp = (path / "metadata.json").stat().st_mtime_ns if (path / "metadata.json").exists() else 0
        identity = f"{path.resolve()}@{stamp}"
    else:
        identity = f"init-seed-{cfg.train.seed}"
    lora = cfg.model.lora
    if lora.enabled and lora.init_from and not cfg.reference.checkpoint:
        from mmpo_megatron.model.lora import PEFT_WEIGHTS

        digest = hashlib.sha256((Path(lora.init_from) / PEFT_WEIGHTS).read_bytes()).hexdigest()[:16]
        identity += f"+adapter@{digest}"
    return identity


def _reference_chunks(cfg: TrainConfig, model: MegatronPreferenceModel) -> list[torch.nn.Module]:
    """A frozen model with the reference weights (same layout as the policy)."""
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, vocab_size=model.vocab_size,
                                device=model.device.type, seed=cfg.train.seed)
    source = cfg.reference.checkpoint or cfg.checkpoint.load_weights
    if source:
        ckpt.load_weights(source, chunks)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks


def build_reference(cfg: TrainConfig, model: MegatronPreferenceModel, train_pairs, out: Path,
                    policy_is_initial: bool) -> ReferenceSource | None:
    """The reference source of ``reference.mode`` (None when the loss needs none).

    The reference weights are ``reference.checkpoint``, else the policy's starting weights: its
    current ones when it has not trained yet, else ``checkpoint.load_weights`` (or, for a run
    started from the seeded initialisation, that initialisation again). Only ``resident`` keeps a
    second model on the device; ``precompute`` and ``cpu_swap`` read other weights through the
    policy's own chunks (checkpoint_weights_in), except a seeded initialisation, which is built
    again for the moment it is read.
    """
    if not cfg.loss.needs_reference:
        return None
    use_policy = policy_is_initial and cfg.reference.checkpoint is None
    source = cfg.reference.checkpoint or cfg.checkpoint.load_weights
    mode = cfg.reference_mode
    if mode == "adapters_off":
        return AdaptersOffReference()
    if mode == "resident":
        return ResidentReference(_reference_chunks(cfg, model))

    @contextlib.contextmanager
    def weights():
        if use_policy:
            yield model.chunks
        elif source:
            with checkpoint_weights_in(model, source) as chunks:
                yield chunks
        else:
            yield _reference_chunks(cfg, model)

    if mode == "cpu_swap":
        with weights() as chunks:
            return CpuSwapReference.from_chunks(chunks)
    key = reference_cache_key(cfg, _reference_identity(cfg), model.device.type, model.vocab_size, model.pack_length)
    reference = PrecomputedReference(Path(cfg.reference.cache_dir or out / "reference_cache"), key, weights)
    reference.prepare(model, train_pairs)
    return reference


def source_metadata(cfg: TrainConfig) -> dict[str, Path]:
    """The run's source model's hf_config.json and generation_config.json (from the converted
    checkpoint of checkpoint.load_weights or model.from_hf, or an HF folder's config.json), which
    every checkpoint carries so that an export generates as the source did."""
    from mmpo_megatron.convert.checkpoints import GENERATION_CONFIG, HF_CONFIG

    found: dict[str, Path] = {}
    for given in (cfg.checkpoint.load_weights, cfg.model.from_hf):
        if not given:
            continue
        folders = [Path(given)]
        try:
            folders.append(ckpt.resolve_checkpoint(given))
        except (FileNotFoundError, ckpt.DamagedCheckpointError):
            pass
        for folder in folders:
            for name, candidates in (
                (HF_CONFIG, (HF_CONFIG, "config.json")),
                (GENERATION_CONFIG, (GENERATION_CONFIG,)),
            ):
                for candidate in candidates:
                    if name not in found and (folder / candidate).is_file():
                        found[name] = folder / candidate
    return found
