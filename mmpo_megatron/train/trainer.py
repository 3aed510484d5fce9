"""The training loop on MegatronPreferenceModel, read top to bottom.

set-up (parallel groups, run folder, data, model, resume or starting weights, reference) ->
for each step: the sampler's micro-batches, ``model.train_step``, log, evaluate, save.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Any

import torch

from mmpo_megatron.config import ConfigError, TrainConfig
from mmpo_megatron.data.lm import lm_documents
from mmpo_megatron.data.sampling import PairSampler
from mmpo_megatron.messages import say
from mmpo_megatron.model import checkpoint as ckpt
from mmpo_megatron.model.preference_model import MegatronPreferenceModel
from mmpo_megatron.parallel import destroy_parallel, initialize_parallel
from mmpo_megatron.train.evaluation import evaluate, lm_nll
from mmpo_megatron.train.logger import MetricsLogger
from mmpo_megatron.train.preflight import preflight
from mmpo_megatron.train.setup import build_reference, load_data, prepare_run_folder, source_metadata
from mmpo_megatron.train.stopping import BUDGET_REASON, STOP_SIGNALS, StopConditions, TrainingStopped, write_run_status

log = logging.getLogger("mmpo_megatron")


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def run_training(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train; returns the logged records (on global rank 0; other ranks return [])."""
    # Before any process group, data or run folder exists: a bad config fails fast, naming the key.
    cfg = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    layout = initialize_parallel(cfg.parallel)
    try:
        with StopConditions(cfg.train.max_wall_minutes, layout.device) as stops:
            return Trainer(cfg).train(stops)
    finally:
        destroy_parallel()


class Trainer:
    """A run: its folder, data, model, reference and logger; ``train()`` is the loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.is_rank0 = torch.distributed.get_rank() == 0
        self.out = prepare_run_folder(cfg, self.is_rank0)
        self.tokenizer, self.train_pairs, self.eval_pairs = load_data(cfg, self.out, self.is_rank0)
        self.lm_documents = None
        if cfg.eval.lm_data:
            self.lm_documents = lm_documents(
                cfg.eval.lm_data,
                self.tokenizer,
                cfg.eval.lm_max_length or cfg.data.max_length,
                cfg.eval.lm_max_documents,
            )
        self.lm_nll_ref: float | None = None  # the reference's NLL on lm_documents (scored once)
        gbs = cfg.train.global_batch_size
        self.steps_per_epoch = len(self.train_pairs) // gbs
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_pairs)} training pairs cannot fill one global batch of {gbs}")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.model = MegatronPreferenceModel.from_config(
            cfg,
            vocab_size=cfg.model.vocab_size or len(self.tokenizer),
            pad_id=self.tokenizer.pad_token_id,
            total_steps=self.total_steps,
        )
        self.records: list[dict[str, Any]] = []
        self._lora_base: dict[str, Any] | None = None  # what adapters-only checkpoints record of their base

    def train(self, stops: StopConditions | None = None) -> list[dict[str, Any]]:
        """Resume or load starting weights, then step until ``total_steps`` or until ``stops``
        says to stop (TrainingStopped, after a checkpoint); returns the records."""
        cfg = self.cfg
        model = self.model
        step, consumed, skipped, resumed, resumed_state = self.start()
        model.set_reference(build_reference(cfg, model, self.train_pairs, self.out, policy_is_initial=not resumed))
        evaluates = bool(cfg.train.eval_interval) and self.eval_pairs is not None
        eval_reference = model.reference.score(model, self.eval_pairs) if model.reference and evaluates else None
        if self.lm_documents is not None and cfg.train.eval_interval:
            self.lm_nll_ref = self.lm_reference(resumed_state)
        sampler = PairSampler(len(self.train_pairs), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                              model.layout.data_rank, model.layout.data_parallel, seed=cfg.data.seed,
                              lengths=self.pair_lengths() if cfg.data.group_by_length else None)
        logger = MetricsLogger(self.out, cfg.logging, self.total_steps, enabled=self.is_rank0, run_config=asdict(cfg),
                               resume_step=step if resumed else -1)  # -1: an attempt without a checkpoint
        logger.start_at(step)
        self.background = None  # an error before the first step aborts no earlier run's writer
        try:
            interval = cfg.train.eval_interval
            in_a_row = 0
            stops = stops or StopConditions(None, model.device)
            stops.expect_save_bytes(self.checkpoint_bytes())
            ckpt.keep_checkpoint_writes_through(STOP_SIGNALS)
            if interval and step == 0:
                evaluating = time.perf_counter()
                self.log(logger, 0, "eval", self.evaluation(eval_reference))
                stops.record_eval(time.perf_counter() - evaluating)
            self.background = ckpt.AsyncSaves() if cfg.checkpoint.async_save else None
            self.saved_step = step if resumed else None
            first_step = step
            reason = None
            while step < self.total_steps:
                reason = stops.reason(next_step_evaluates=self.evaluates_at(step + 1))
                if reason is not None:
                    break
                started = time.perf_counter()
                metrics = model.train_step(model.micro_batches(self.train_pairs, sampler.step_microbatches(consumed)))
                step = step + 1
                consumed = consumed + cfg.train.global_batch_size
                in_a_row = in_a_row + 1 if metrics["skipped"] else 0
                skipped += int(metrics["skipped"])
                if metrics["skipped"]:
                    self.nonfinite(logger, step, in_a_row)
                metrics.update(
                    step_time_s=time.perf_counter() - started,
                    skipped_steps=float(skipped),
                    epoch=consumed / (self.steps_per_epoch * cfg.train.global_batch_size),
                    memory_gib=_memory_gib(model.device),
                )
                metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / metrics["step_time_s"]
                if step == 1 and "policy_ref_logp_diff" in metrics:
                    logger.message(
                        f"step 1: max |policy - reference| sequence log-prob = {metrics['policy_ref_logp_diff']:.3g}"
                        + (" (policy starts at the reference)" if not resumed and not cfg.reference.checkpoint else "")
                    )
                if step % cfg.train.log_interval == 0 or step == self.total_steps:
                    self.log(logger, step, "train", metrics)
                stops.record_step(time.perf_counter() - started)
                if self.evaluates_at(step):
                    evaluating = time.perf_counter()
                    self.log(logger, step, "eval", self.evaluation(eval_reference))
                    stops.record_eval(time.perf_counter() - evaluating)
                self.checkpoint_after(step, consumed, skipped, stops)
            if self.background is not None and self.background.wait() is not None:
                stops.record_save(self.background.last_duration_s)
            if reason is not None:
                self.stop(logger, reason, step, consumed, skipped, stepped=step > first_step)
        except BaseException:
            if self.background is not None:
                self.background.abort()  # its folder stays unmarked: the previous checkpoint is the newest
            raise
        finally:
            logger.close()
        return self.records

    def evaluates_at(self, step: int) -> bool:
        """Whether the held-out evaluation runs after ``step``."""
        interval = self.cfg.train.eval_interval
        return bool(interval) and (step % interval == 0 or step == self.total_steps)

    def checkpoint_after(self, step: int, consumed: int, skipped: int, stops: StopConditions) -> None:
        """The periodic save (in the background with checkpoint.async_save) or the final one; and
        the completion of a background save that finished meanwhile."""
        save_interval = self.cfg.checkpoint.save_interval
        if step == self.total_steps:
            stops.record_save(self.save(step, consumed, skipped))
        elif save_interval and step % save_interval == 0:
            waited = self.save(step, consumed, skipped, in_background=True)
            if self.background is None:
                stops.record_save(waited)
            else:
                stops.record_background_save()
        if self.background is not None and self.background.poll() is not None:
            stops.record_save(self.background.last_duration_s)

    def stop(
        self, logger: MetricsLogger, reason: str, step: int, consumed: int, skipped: int, *, stepped: bool
    ) -> None:
        """Save the last completed step (unless it is saved already) and raise TrainingStopped.
        A wall-clock budget too short for a single step is a config error: a requeued job would
        stop again at the same step, forever."""
        if not stepped and reason.startswith(BUDGET_REASON):
            raise ConfigError(f"{reason}, before this attempt's first step: give the job more time")
        started = time.perf_counter()
        if step > 0 and self.saved_step != step:
            self.save(step, consumed, skipped)
        checkpoint = None if self.saved_step is None else str(ckpt.step_dir(self.out / "checkpoints", self.saved_step))
        logger.message(
            f"stopped after step {step} ({reason}): "
            + (
                f"checkpoint {checkpoint} ({time.perf_counter() - started:.1f} s)"
                if checkpoint
                else "nothing trained yet"
            )
            + "; run the same command to resume"
        )
        stopped = TrainingStopped(reason, step, checkpoint, self.records)
        write_run_status(stopped.status())
        # Every rank waits for the status: `srun --kill-on-bad-exit` ends the other nodes as soon
        # as one node's ranks exit with STOPPED_EXIT_CODE.
        torch.distributed.barrier()
        raise stopped

    def checkpoint_bytes(self) -> int:
        """About how many bytes this rank writes to a checkpoint: its weights, and fp32 masters and
        Adam moments of its trainable ones (sharded over DP by the distributed optimizer)."""
        params = [p for chunk in self.model.chunks for p in chunk.parameters()]
        weights = sum(p.numel() * p.element_size() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        shards = self.model.layout.data_parallel if self.cfg.optim.distributed_optimizer else 1
        return int(weights + 12 * trainable / shards)

    def evaluation(self, eval_reference) -> dict[str, float]:
        """The held-out preference metrics and, with eval.lm_data, the corpus NLL against the reference's."""
        metrics = evaluate(self.model, self.eval_pairs, eval_reference, self.cfg.loss)
        if self.lm_documents is not None:
            nll = lm_nll(self.model, self.lm_documents)
            metrics["lm/nll"] = nll
            if self.lm_nll_ref is not None:
                metrics.update({"lm/nll_ref": self.lm_nll_ref, "lm/nll_delta": nll - self.lm_nll_ref})
        return metrics

    def lm_reference(self, resumed_state: dict | None) -> float | None:
        """The reference's NLL on the lm corpus: from the reference source, or, for a reference-free
        loss, the starting policy's (measured before the first step, kept in the checkpoints)."""
        model = self.model
        if model.reference is not None:
            scores = model.reference.score(model, self.lm_documents)
            value = None
            if model.last_stage:
                value = {"nll": float(-scores.chosen.double().sum() / scores.chosen_tokens.sum().clamp(min=1))}
            return model.broadcast_from_last_stage(value)["nll"]
        if resumed_state is not None:
            if resumed_state.get("lm_documents") != self.lm_documents._fingerprint:
                log.warning(
                    "eval.lm_data: the run started on other lm documents (eval.lm_data or lm_max_length changed): "
                    "the starting policy's NLL on these is unknown, so lm/nll_ref and lm/nll_delta are not logged"
                )
                return None
            return resumed_state.get("lm_nll_ref")
        return lm_nll(model, self.lm_documents)

    def start(self) -> tuple[int, int, int, bool, dict | None]:
        """(step, consumed samples, skipped steps, resumed?, the checkpoint's trainer state) from
        the newest intact checkpoint, or a fresh start from ``checkpoint.load_weights`` / the seeded
        initialisation."""
        cfg = self.cfg
        resume_from = ckpt.latest_intact_checkpoint(self.out / "checkpoints") if cfg.checkpoint.resume else None
        if resume_from is None:
            if cfg.checkpoint.load_weights:
                loaded = self.model.load_weights(cfg.checkpoint.load_weights)
                say(f"policy weights loaded from {loaded}")
            return 0, 0, 0, False, None
        if cfg.model.lora.enabled:  # adapters-only checkpoints name the base they trained on
            ckpt.check_lora_settings(resume_from, cfg.model.lora)
            ckpt.check_lora_base(resume_from, cfg.checkpoint.load_weights)
        state = self.model.resume(resume_from, base=cfg.checkpoint.load_weights)
        step = state["step"]
        say(f"resumed from {resume_from} (step {step})")
        if step >= self.total_steps:
            say(f"nothing to train: this run already reached its {self.total_steps} steps; set a new "
                     f"train.output_dir, raise train.max_steps, or pass train.overwrite_output_dir=true")
        return step, state["consumed_samples"], state.get("skipped_steps", 0), True, state

    def nonfinite(self, logger: MetricsLogger, step: int, in_a_row: int) -> None:
        """Say that a step was skipped; abort after ``train.max_nonfinite_steps`` in a row."""
        logger.message(f"step {step}: non-finite loss or gradient, update skipped ({in_a_row} in a row)")
        if in_a_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteAbort(
                f"{in_a_row} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                f"lower optim.lr, check the data report, or raise train.max_nonfinite_steps"
            )

    def pair_lengths(self) -> list[int]:
        """Each training pair's longest row (for data.group_by_length)."""
        pairs = self.train_pairs
        return [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])
        ]

    def log(self, logger: MetricsLogger, step: int, split: str, metrics: dict) -> None:
        """One record to every sink (rank 0 keeps it for the caller too)."""
        if not metrics:
            return
        logger.log(step, split, metrics)
        if self.is_rank0:
            self.records.append({"step": step, "split": split, **metrics})

    def save(self, step: int, consumed: int, skipped: int, *, in_background: bool = False) -> float:
        """A checkpoint with what a resume, score_pairs and the HF export need; returns the seconds
        training waited for it. ``in_background`` with checkpoint.async_save: written while
        training goes on (a save still in flight is finished first)."""
        cfg = self.cfg
        started = time.perf_counter()
        background = self.background if in_background else None
        if self.background is not None and background is None:
            self.background.wait()
        state = {
            "consumed_samples": consumed,
            "skipped_steps": skipped,
            "model": asdict(cfg.model),
            "tokenizer": _absolute_if_local(cfg.data.tokenizer),
            "train_config": asdict(cfg),
            "lm_nll_ref": self.lm_nll_ref,
            "lm_documents": None if self.lm_documents is None else self.lm_documents._fingerprint,
        }
        parts = ckpt.EVERYTHING
        if cfg.model.lora.enabled and cfg.checkpoint.load_weights:
            # The frozen base is already on disk: save the adapters, and which base they go with.
            if self._lora_base is None:
                self._lora_base = ckpt.lora_base_record(cfg.checkpoint.load_weights)
            state[ckpt.LORA_BASE] = self._lora_base
            parts = ckpt.ADAPTERS_ONLY
        path = self.model.save(self.out / "checkpoints", step, state, keep_last=cfg.checkpoint.keep_last, parts=parts,
                               extra_files=source_metadata(cfg), background=background)
        self.saved_step = step
        say(f"checkpoint {'being written' if background else 'saved'}: {path}")
        return time.perf_counter() - started


def _absolute_if_local(name: str) -> str:
    """A local tokenizer folder as an absolute path (an export from another folder finds it); a hub name as is."""
    from pathlib import Path

    return str(Path(name).resolve()) if Path(name).exists() else name


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
