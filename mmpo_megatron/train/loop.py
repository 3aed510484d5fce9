"""The MMPO training loop on megatron-core, read top to bottom.

set up parallel groups -> data -> policy (DDP + distributed optimizer + scheduler) -> resume or
load weights -> reference log-probs -> for each step: reference values and MMPO's normalisation
statistics for the whole global batch, megatron's forward/backward schedule, a skip of
non-finite steps, the optimizer step, metrics, periodic evaluation and checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmpo_megatron.config import TrainConfig
from mmpo_megatron.data.batching import PairSampler
from mmpo_megatron.data.pipeline import build_pairs, eval_sources, train_sources, write_report
from mmpo_megatron.data.tokenizer import load_tokenizer
from mmpo_megatron.losses import PairLogProbs, preference_loss, prior_rewards
from mmpo_megatron.model.builder import build_model_chunks, resolve_dtype
from mmpo_megatron.parallel import destroy_parallel, initialize_parallel
from mmpo_megatron.parallel.batch_stats import normalisation_stats, reduce_metric_sums
from mmpo_megatron.train import checkpoint as ckpt
from mmpo_megatron.train.logger import MetricsLogger
from mmpo_megatron.train.optimizer import wrap_for_training
from mmpo_megatron.train.preflight import preflight
from mmpo_megatron.train.reference import PairScores, cached_scores, fingerprint, microbatches_for, score_dataset
from mmpo_megatron.train.step import score_microbatches, train_microbatches

log = logging.getLogger("mmpo_megatron")


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def run_training(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train; returns the logged records (on global rank 0; other ranks return [])."""
    import os

    # Before any process group, data or run folder exists: a bad config fails fast, naming the key.
    cfg = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    layout = initialize_parallel(cfg.parallel)
    try:
        return _Trainer(cfg, layout).run()
    finally:
        destroy_parallel()


class _Trainer:
    def __init__(self, cfg: TrainConfig, layout) -> None:
        from megatron.core import parallel_state as ps

        self.cfg, self.layout, self.device = cfg, layout, layout.device
        self.out = Path(cfg.train.output_dir)
        self.is_rank0 = layout.rank == 0
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.dp_group = ps.get_data_parallel_group()
        self.records: list[dict[str, Any]] = []
        if self.is_rank0:
            if cfg.train.overwrite_output_dir:
                _clear_run_folder(self.out, cfg.reference.cache_dir)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(_as_yaml(cfg))
        self._setup_data()
        self._setup_model()

    # ------------------------------------------------------------------------------- set-up
    def _setup_data(self) -> None:
        import datasets

        cfg = self.cfg
        if not self.is_rank0:
            datasets.disable_progress_bars()
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        # Rank 0 tokenises first; the others then hit datasets' cache instead of racing it.
        for turn in (True, False):
            if self.is_rank0 == turn:
                self.train_pairs, report = build_pairs(train_sources(cfg.data), self.tokenizer, cfg.data)
                sources = eval_sources(cfg.data)
                self.eval_pairs = build_pairs(sources, self.tokenizer, cfg.data)[0] if sources else None
            dist.barrier()
        if cfg.train.eval_max_pairs and self.eval_pairs is not None:
            self.eval_pairs = self.eval_pairs.select(range(min(cfg.train.eval_max_pairs, len(self.eval_pairs))))
        if self.is_rank0:
            write_report(report, self.out / "data_report.json")
            print(f"data: {report.summary()}", flush=True)
        self.pad_id = self.tokenizer.pad_token_id
        self.pack_length = None
        if cfg.data.packing:
            from mmpo_megatron.model.builder import default_pack_length

            self.pack_length = cfg.data.pack_length or default_pack_length(
                cfg.model, cfg.data.max_length, cfg.train.micro_batch_size, self.device.type)

    def _setup_model(self) -> None:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        self.vocab_size = cfg.model.vocab_size or len(self.tokenizer)  # checked against the tokenizer by preflight
        chunks = self._build_chunks()
        self.chunks, self.optimizer = wrap_for_training(chunks, cfg.optim, resolve_dtype(cfg.precision, self.device.type))
        gbs = cfg.train.global_batch_size
        self.steps_per_epoch = len(self.train_pairs) // gbs
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_pairs)} training pairs cannot fill one global batch of {gbs}")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
            lr_warmup_steps=int(cfg.optim.warmup_ratio * self.total_steps), lr_decay_steps=self.total_steps,
            lr_decay_style=cfg.optim.decay_style, start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay,
            wd_incr_steps=self.total_steps, wd_incr_style="constant",
        )

    def _build_chunks(self) -> list[torch.nn.Module]:
        cfg = self.cfg
        return build_model_chunks(
            cfg.model, cfg.parallel, cfg.precision, vocab_size=self.vocab_size, device=self.device.type, seed=cfg.train.seed
        )

    def _reference_identity(self) -> str:
        """What the reference weights are: a checkpoint, the policy's loaded weights, or its seeded init."""
        cfg = self.cfg
        source = cfg.reference.checkpoint or cfg.checkpoint.load_weights
        if source:
            path = ckpt.resolve_checkpoint(source)
            return f"{path.resolve()}@{(path / 'metadata.json').stat().st_mtime_ns if (path / 'metadata.json').exists() else 0}"
        return f"init-seed-{cfg.train.seed}"

    def _reference_chunks(self) -> list[torch.nn.Module]:
        """A frozen model with the reference weights (same layout as the policy)."""
        chunks = self._build_chunks()
        source = self.cfg.reference.checkpoint or self.cfg.checkpoint.load_weights
        if source:
            ckpt.load_weights(source, chunks)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return chunks

    # ------------------------------------------------------------------------------- reference
    def _setup_reference(self, policy_is_initial: bool) -> None:
        cfg = self.cfg
        self.ref_chunks = None
        self.ref_train = self.ref_eval = None
        if not cfg.loss.needs_reference:
            return
        if cfg.reference.mode == "resident":
            self.ref_chunks = self._reference_chunks()
            if self.eval_pairs is not None:
                self.ref_eval = self._score(self.ref_chunks, self.eval_pairs)
            return
        cache_dir = Path(cfg.reference.cache_dir or self.out / "reference_cache")
        key_parts = reference_cache_key(cfg, self._reference_identity(), self.device.type, self.vocab_size, self.pack_length)
        use_policy = policy_is_initial and cfg.reference.checkpoint is None

        def scorer(pairs):
            def compute():
                chunks = self.chunks if use_policy else self._reference_chunks()
                return self._score(chunks, pairs, progress=True)
            return compute

        writer = self.last_stage and self.layout.data_rank == 0 and self.layout.tensor_rank == 0
        self.ref_train = cached_scores(
            cache_dir, fingerprint(self.train_pairs._fingerprint, *key_parts), scorer(self.train_pairs),
            is_writer=writer, on_last_stage=self.last_stage, device=self.device,
        )
        if self.eval_pairs is not None:
            self.ref_eval = cached_scores(
                cache_dir, fingerprint(self.eval_pairs._fingerprint, *key_parts), scorer(self.eval_pairs),
                is_writer=writer, on_last_stage=self.last_stage, device=self.device,
            )

    def _score(self, chunks, pairs, progress: bool = False) -> PairScores | None:
        return score_dataset(
            chunks, pairs, self.cfg.train.micro_batch_size, self.pad_id, self.cfg.data.pad_to_multiple, self.device,
            self.vocab_size, progress=progress, pack_length=self.pack_length,
        )

    # ------------------------------------------------------------------------------- one step
    def _prepare_step(self, positions: list[list[int]]):
        cfg = self.cfg
        micro = [
            microbatches_for(self.train_pairs, p, self.pad_id, cfg.data.pad_to_multiple, self.device, self.vocab_size,
                             self.pack_length)
            for p in positions
        ]
        if not cfg.loss.needs_reference:
            return micro
        if self.ref_chunks is not None:  # resident: every stage runs the reference pipeline
            scored = score_microbatches(self.ref_chunks, micro)
            if self.last_stage:
                for m, (_, chosen, rejected, _, _) in zip(micro, scored):
                    m.ref_chosen, m.ref_rejected = chosen, rejected
        elif self.last_stage:
            for m, p in zip(micro, positions):
                m.ref_chosen, m.ref_rejected = self.ref_train.take(p, self.device)
        if self.last_stage and cfg.loss.name == "mmpo" and cfg.loss.norm_scope != "none":
            # The whole global batch's statistics, before the policy forward (they use reference values only).
            rewards = [self._prior_rewards(m) for m in micro]
            stats = normalisation_stats(
                [r[0] for r in rewards], [r[1] for r in rewards], cfg.loss.norm_scope,
                valid=[m.batch.pair_valid for m in micro], group=self.dp_group,
            )
            for i, m in enumerate(micro):
                m.norm_min, m.norm_max = stats.for_microbatch(i)
        return micro

    def _prior_rewards(self, m):
        """MMPO prior rewards of a micro-batch, on the log-prob reduction the loss uses."""
        loss = self.cfg.loss
        counts = m.batch.loss_mask.sum(-1)
        pairs = m.batch.num_pairs
        # The reduction the loss applies (PairLogProbs), so statistics and loss see the same values.
        ref = PairLogProbs(m.ref_chosen, m.ref_rejected, counts[:pairs], counts[pairs:])
        chosen, rejected, _, _ = ref.reduced(loss.logp_reduction)
        return prior_rewards(chosen, rejected, beta=loss.beta, eps_chosen=loss.eps_chosen, eps_rejected=loss.eps_rejected)

    def _grads_finite(self, loss: float | None) -> bool:
        local = all(bool(torch.isfinite(b.grad_data).all()) for c in self.chunks for b in c.buffers + c.expert_parallel_buffers)
        if loss is not None and not math.isfinite(loss):
            local = False
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _from_last_stage(self, metrics: dict | None) -> dict:
        """Metrics computed on the last pipeline stage, made known to every stage (rank 0 logs)."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return metrics or {}
        box = [metrics]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return box[0] or {}

    # ------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Held-out loss, reward accuracy and margins, and the chosen responses' NLL per token."""
        if self.eval_pairs is None:
            return {}
        policy = self._score(self.chunks, self.eval_pairs)
        metrics = None
        if self.last_stage:
            ref = self.ref_eval
            logps = PairLogProbs(
                policy.chosen.double(), policy.rejected.double(), policy.chosen_tokens, policy.rejected_tokens,
                None if ref is None else ref.chosen.double(), None if ref is None else ref.rejected.double(),
            )
            # Normalisation over the whole held-out set: the global scope of evaluation.
            loss, per_pair = preference_loss(self.cfg.loss, logps)
            metrics = {"loss": loss.mean().item(), **{k: v.mean().item() for k, v in per_pair.items()}}
            metrics["nll/chosen_per_token"] = (-(logps.policy_chosen / logps.chosen_tokens)).mean().item()
            metrics["pairs"] = float(len(self.eval_pairs))
        return self._from_last_stage(metrics)

    # ------------------------------------------------------------------------------- the loop
    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        ckpt_root = self.out / "checkpoints"
        step, consumed, skipped = 0, 0, 0
        resume_from = ckpt.latest_intact_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, self.chunks, self.optimizer)
            step, consumed, skipped = state["step"], state["consumed_samples"], state.get("skipped_steps", 0)
            self.scheduler.load_state_dict(state["scheduler"])
            if self.is_rank0:
                print(f"resumed from {resume_from} (step {step})", flush=True)
                if step >= self.total_steps:
                    print(f"nothing to train: this run already reached its {self.total_steps} steps; set a new "
                          f"train.output_dir, raise train.max_steps, or pass checkpoint.resume=false", flush=True)
        elif cfg.checkpoint.load_weights:
            loaded = ckpt.load_weights(cfg.checkpoint.load_weights, self.chunks)
            if self.is_rank0:
                print(f"policy weights loaded from {loaded}", flush=True)
        self._setup_reference(policy_is_initial=resume_from is None)

        sampler = PairSampler(
            len(self.train_pairs), cfg.train.global_batch_size, cfg.train.micro_batch_size,
            self.layout.data_rank, self.layout.data_parallel, seed=cfg.data.seed, consumed_samples=consumed,
            lengths=[len(p) + max(len(c), len(r)) for p, c, r in zip(self.train_pairs["prompt_ids"], self.train_pairs["chosen_ids"], self.train_pairs["rejected_ids"])]
            if cfg.data.group_by_length else None,
        )
        logger = MetricsLogger(self.out, cfg.logging, self.total_steps, enabled=self.is_rank0, run_config=asdict(cfg))
        logger.start_at(step)
        interval = cfg.train.eval_interval
        if interval and step == 0:
            self._log(logger, 0, "eval", self.evaluate())
        consecutive_bad = 0
        try:
            while step < self.total_steps:
                started = time.perf_counter()
                micro = self._prepare_step(sampler.step_microbatches(consumed))
                for chunk in self.chunks:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                per_micro = train_microbatches(self.chunks, micro, cfg.loss)
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
                metrics = self._from_last_stage(reduce_metric_sums(per_micro, self.dp_group) if self.last_stage else None)
                consumed += cfg.train.global_batch_size
                step += 1
                if self._grads_finite(metrics.get("loss")):
                    _, grad_norm, _ = self.optimizer.step()
                    consecutive_bad = 0
                else:
                    skipped, consecutive_bad, grad_norm = skipped + 1, consecutive_bad + 1, float("nan")
                    logger.message(f"step {step}: non-finite loss or gradient, update skipped ({consecutive_bad} in a row)")
                    if consecutive_bad >= cfg.train.max_nonfinite_steps:
                        raise NonFiniteAbort(
                            f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                            f"lower optim.lr, check the data report, or raise train.max_nonfinite_steps"
                        )
                # The schedule follows `step` whether or not the update was applied, so a run with skipped
                # steps still ends its decay on its last step.
                self.scheduler.step(1)
                elapsed = time.perf_counter() - started
                metrics.update(
                    grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                    lr=lr, step_time_s=elapsed,
                    tokens_per_s=metrics.get("tokens", 0.0) / elapsed, skipped_steps=float(skipped), epoch=consumed / (self.steps_per_epoch * cfg.train.global_batch_size),
                    memory_gib=_memory_gib(self.device),
                )
                if step == 1 and "policy_ref_logp_diff" in metrics:
                    logger.message(f"step 1: max |policy - reference| sequence log-prob = {metrics['policy_ref_logp_diff']:.3g}"
                                   + (" (policy starts at the reference)" if resume_from is None and not cfg.reference.checkpoint else ""))
                if step % cfg.train.log_interval == 0 or step == self.total_steps:
                    self._log(logger, step, "train", metrics)
                if interval and (step % interval == 0 or step == self.total_steps):
                    self._log(logger, step, "eval", self.evaluate())
                if (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) or step == self.total_steps:
                    self._save(ckpt_root, step, consumed, skipped)
        finally:
            logger.close()
        return self.records

    def _log(self, logger: MetricsLogger, step: int, split: str, metrics: dict) -> None:
        if not metrics:
            return
        logger.log(step, split, metrics)
        if self.is_rank0:
            self.records.append({"step": step, "split": split, **metrics})

    def _save(self, root: Path, step: int, consumed: int, skipped: int) -> None:
        state = {
            "consumed_samples": consumed,
            "skipped_steps": skipped,
            "scheduler": self.scheduler.state_dict(),
            "layout": ckpt.layout_state(),
            "model": asdict(self.cfg.model),
            "vocab_size": self.vocab_size,
            "tokenizer": self.cfg.data.tokenizer,
            "train_config": asdict(self.cfg),
        }
        path = ckpt.save_checkpoint(root, step, self.chunks, self.optimizer, state, keep_last=self.cfg.checkpoint.keep_last)
        if self.is_rank0:
            print(f"\ncheckpoint saved: {path}", flush=True)


def reference_cache_key(cfg: TrainConfig, weights_identity: str, device: str, vocab_size: int,
                        pack_length: int | None) -> tuple:
    """Everything that changes reference log-probs besides the pairs: weights, model, numerics, packing."""
    precision = {**asdict(cfg.precision), "dtype": str(resolve_dtype(cfg.precision, device))}
    return (weights_identity, asdict(cfg.model), precision, vocab_size, pack_length)


def _clear_run_folder(out: Path, cache_dir: str | None) -> None:
    """Remove what an earlier run wrote into ``out`` (only the trainer's own files and folders)."""
    import shutil

    for name in ("checkpoints", "tensorboard", "metrics.jsonl", "data_report.json", "config.yaml"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    if cache_dir is None:  # a shared cache elsewhere belongs to other runs too
        shutil.rmtree(out / "reference_cache", ignore_errors=True)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _as_yaml(cfg: TrainConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
