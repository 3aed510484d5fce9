"""The policy and its reference as one object: micro-batches of pairs in, sequence log-probs, a
loss and global-batch metrics out, on megatron-core at any TP x PP x DP layout.

    model = MegatronPreferenceModel.from_config(cfg, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                                                total_steps=100)
    model.set_reference(...)                   # precompute / resident / cpu_swap (model/reference.py)
    for positions in sampler:                  # each rank's micro-batches of one optimizer step
        metrics = model.train_step(model.micro_batches(pairs, positions))

A step: reference log-probs for the step's pairs (the reference source), the objective's
statistics over the whole global batch (MMPO's min/max; model/objective.py), megatron's
forward/backward schedule (model/schedule.py: the loss is normalised by the global pair count,
so the update does not depend on the DP x micro-batch split), a finite check over all ranks, the
optimizer step and the learning-rate schedule (which follows the step count, skipped steps too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from mmpo_megatron.config import ConfigError, OptimConfig, TrainConfig
from mmpo_megatron.messages import say
from mmpo_megatron.model import checkpoint as ckpt
from mmpo_megatron.model.builder import build_model_chunks, default_pack_length, resolve_dtype, unwrap
from mmpo_megatron.model.objective import Objective, objective_for
from mmpo_megatron.model.optimizer import masters_out_of_step, wrap_for_training
from mmpo_megatron.model.reference import ReferenceSource
from mmpo_megatron.model.schedule import (
    ForwardPlan,
    MicroBatch,
    microbatch_multiple,
    score_microbatches,
    train_microbatches,
)
from mmpo_megatron.model.scoring import microbatches_for, score_dataset
from mmpo_megatron.pair_logprobs import PairLogProbs
from mmpo_megatron.parallel.batch_stats import reduce_metric_sums
from mmpo_megatron.parallel.runtime import current_layout

PACKING_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
"""Largest per-pair, per-token log-prob gap allowed between a packed and a padded forward of the same
pairs (check_packing). A correct mask leaves reduction-order noise only (fp32: ~1e-6; bf16: 2^-8
relative rounding, averaged over the completion). A mask the attention ignores moved the tiny
random test model by 0.004-0.017 per token (its attention is near uniform); trained models, whose
attention is sharp, move by more."""


class MegatronPreferenceModel:
    """Policy chunks (DDP-wrapped with optimizer and scheduler when training), a reference source,
    and the objective. How packed rows are masked and whether the output layer is fused into the
    log-probs are this object's ``forward_plan``."""

    def __init__(self, chunks: Sequence[torch.nn.Module], objective: Objective, *, vocab_size: int, pad_id: int,
                 forward_plan: ForwardPlan, pad_to_multiple: int = 16, pack_length: int | None = None,
                 micro_batch_size: int = 1, optimizer=None, scheduler=None) -> None:
        from megatron.core import parallel_state as ps

        self.chunks = list(chunks)
        self.objective = objective
        config = unwrap(self.chunks[0]).config
        if config.sequence_parallel:  # the sequence is split over the TP ranks: its length must divide
            pad_to_multiple = math.lcm(pad_to_multiple, config.tensor_model_parallel_size)
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.pad_to_multiple = pad_to_multiple
        self.forward_plan = forward_plan
        self.pack_length = pack_length
        self.micro_batch_size = micro_batch_size
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.reference: ReferenceSource | None = None
        self._holding_weights = False  # inside updated_weights()
        self._packing_checked = False
        self._masters_checked = False
        self.layout = current_layout()
        self.device = self.layout.device
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.dp_group = ps.get_data_parallel_group()

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, vocab_size: int, pad_id: int, total_steps: int | None = None,
                    seed: int | None = None) -> "MegatronPreferenceModel":
        """Build the policy for ``cfg`` on the initialised layout: with optimizer and cosine/linear
        schedule when ``total_steps`` is given, bare (for scoring) otherwise."""
        layout = current_layout()
        device = layout.device.type
        chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, vocab_size=vocab_size, device=device,
                                    seed=cfg.train.seed if seed is None else seed)
        optimizer = scheduler = None
        if total_steps is not None:
            chunks, optimizer = wrap_for_training(chunks, cfg.optim, cfg.parallel, resolve_dtype(cfg.precision, device))
            scheduler = lr_schedule(optimizer, cfg.optim, total_steps)
        pack_length = None
        if cfg.data.packing:
            pack_length = cfg.data.pack_length or default_pack_length(cfg.model, cfg.data.max_length,
                                                                      cfg.train.micro_batch_size, device)
        return cls(chunks, objective_for(cfg.loss), vocab_size=vocab_size, pad_id=pad_id,
                   forward_plan=ForwardPlan.of(cfg.model), pad_to_multiple=cfg.data.pad_to_multiple,
                   pack_length=pack_length, micro_batch_size=cfg.train.micro_batch_size, optimizer=optimizer,
                   scheduler=scheduler)

    # ------------------------------------------------------------------------------- batches and scores
    def micro_batches(self, pairs, positions: Sequence[Sequence[int | None]]) -> list[MicroBatch]:
        """Micro-batches of the given dataset positions (None: a padding pair), packed if configured."""
        return [microbatches_for(pairs, p, self.pad_id, self.pad_to_multiple, self.device, self.vocab_size,
                                 self.pack_length) for p in positions]

    def score(
        self, pairs, *, chunks: Sequence[torch.nn.Module] | None = None, progress: bool = False
    ) -> PairLogProbs | None:
        """Forward-only per-pair summed log-probs of a whole data set, any TP/PP/DP (last stage; None
        elsewhere). ``chunks`` scores other weights of the same layout (a resident reference)."""
        with self.updated_weights():
            return score_dataset(chunks or self.chunks, pairs, self.micro_batch_size, self.pad_id,
                                 self.pad_to_multiple, self.device, self.vocab_size, self.forward_plan,
                                 progress=progress, pack_length=self.pack_length)

    @contextlib.contextmanager
    def updated_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the last update. With ``parallel.overlap_param_gather``
        the distributed optimizer's all-gather of an update waits for the next training forward (its
        pre-hooks); scoring, saving and a weight swap must not see, save or overwrite half-gathered
        parameters, so the gather is finished first (Megatron-LM does the same around evaluation)."""
        outermost = not self._holding_weights
        hooked = [chunk for chunk in self.chunks if outermost and getattr(chunk, "use_forward_hook", False)]
        for chunk in hooked:
            chunk.disable_forward_pre_hook(param_sync=True)
        self._holding_weights = True
        try:
            yield
        finally:
            self._holding_weights = not outermost
            for chunk in hooked:
                chunk.enable_forward_pre_hook()

    def set_reference(self, reference: ReferenceSource | None) -> None:
        """Where reference log-probs come from (None: the objective needs none)."""
        self.reference = reference

    def fill_reference_logps(self, micro_batches: Sequence[MicroBatch]) -> None:
        """Fill in the reference log-probs of the micro-batches (last stage), if the objective needs them."""
        if self.objective.needs_reference:
            if self.reference is None:
                raise RuntimeError(f"loss {self.objective.config.name!r} needs a reference source: call set_reference")
            self.reference.fill(self, micro_batches)

    # ------------------------------------------------------------------------------- the step
    def loss_and_metrics(self, micro_batches: Sequence[MicroBatch], forward_only: bool = False) -> dict[str, float]:
        """The objective over one step's micro-batches through megatron's schedule (forward and
        backward unless ``forward_only``); metrics reduced over the global batch, on every rank.
        Reference log-probs must be filled in (fill_reference_logps)."""
        if self.last_stage:
            self.objective.prepare_step(micro_batches, self.dp_group)
        per_micro = train_microbatches(self.chunks, micro_batches, self.objective, self.forward_plan,
                                       forward_only=forward_only)
        return self.broadcast_from_last_stage(reduce_metric_sums(per_micro, self.dp_group) if self.last_stage else None)

    def check_packing(self, micro_batches: Sequence[MicroBatch]) -> float:
        """Score packed micro-batches packed and again padded (one extra forward of each); raise a
        ConfigError naming ``data.packing`` when the per-pair, per-token log-probs differ by more than
        PACKING_TOLERANCE: the layer spec's attention did not honour the packed rows' block mask, so
        the sequences of a row attended to each other. Returns the largest difference."""
        padded = [dataclasses.replace(micro, packed=None) for micro in micro_batches]
        with self.updated_weights():
            packed_scores = score_microbatches(self.chunks, micro_batches, self.forward_plan)
            padded_scores = score_microbatches(self.chunks, padded, self.forward_plan)
        last_stage_gap = None  # the metrics dict broadcast_from_last_stage sends to every stage
        if self.last_stage:
            gaps = []
            for micro, (_, packed), (_, unpacked) in zip(micro_batches, packed_scores, padded_scores):
                valid = micro.batch.pair_valid
                gaps += [(a - b).abs()[valid] for a, b in zip(packed.reduced("mean")[:2], unpacked.reduced("mean")[:2])]
            gaps = torch.cat(gaps)
            last_stage_gap = {"gap": float(gaps.max()) if gaps.numel() else 0.0}
        worst = self.broadcast_from_last_stage(last_stage_gap)["gap"]
        dtype = next(unwrap(self.chunks[0]).parameters()).dtype
        tolerance = PACKING_TOLERANCE.get(dtype, PACKING_TOLERANCE[torch.bfloat16])
        if not worst <= tolerance:
            raise ConfigError(
                f"data.packing: packed rows give log-probs {worst:.3g} per token away from the same pairs padded "
                f"(tolerance {tolerance:g} in {dtype}): this layer spec's attention ignored the packed rows' "
                "block mask, so sequences packed together attended to each other. Set data.packing=false, or "
                "use model.layer_spec=local_sdpa.")
        return worst

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> dict[str, float]:
        """One optimizer step: zero gradients, reference log-probs, forward/backward, a finite check
        on every rank, then the update (skipped when any loss or gradient is not finite: ``skipped``
        is 1) and the learning-rate schedule. Returns the step's global metrics."""
        if self.optimizer is None:
            raise RuntimeError("this model was built without an optimizer (from_config without total_steps)")
        if not self._masters_checked:
            self.check_masters()
            self._masters_checked = True
        if micro_batches[0].packed is not None and not self._packing_checked:
            # Once per model, the first packed step; an interleaved pipeline runs PP micro-batches at least.
            self.check_packing(micro_batches[: microbatch_multiple(self.chunks)])
            self._packing_checked = True
        self.fill_reference_logps(micro_batches)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        metrics = self.loss_and_metrics(micro_batches)
        grad_norm = float("nan")
        skipped = 1.0
        if self._grads_finite(metrics.get("loss")):
            _, norm, _ = self.optimizer.step()
            grad_norm = float(norm) if norm is not None else float("nan")
            skipped = 0.0
        # The schedule follows the step count whether or not the update was applied, so a run with
        # skipped steps still ends its decay on its last step.
        self.scheduler.step(1)
        return {**metrics, "grad_norm": grad_norm, "lr": lr, "skipped": skipped}

    def check_masters(self) -> None:
        """Raise unless every fp32 master weight, rounded to its parameter's dtype, is that parameter
        (every rank checks its shard; all agree). A parameter written after the optimizer was built,
        other than through ``load_weights`` / ``resume``, would otherwise be overwritten by its stale
        master at the next step: under bf16 a run would silently train from other weights."""
        stale = masters_out_of_step(self.optimizer)
        count = torch.tensor([len(stale)], dtype=torch.int64, device=self.device)
        dist.all_reduce(count)
        if count.item():
            names = {id(p): n for chunk in self.chunks for n, p in unwrap(chunk).named_parameters()}
            first = names.get(id(stale[0]), "?") if stale else "on another rank"
            raise RuntimeError(
                f"{count.item()} parameter shard(s) (first: {first}) differ from the optimizer's fp32 master "
                "weights: they were written after the optimizer was built. Load weights with "
                "model.load_weights(...), or call model.optimizer.reload_model_params() after writing parameters "
                "yourself."
            )

    def _grads_finite(self, loss: float | None) -> bool:
        local = all(
            bool(torch.isfinite(b.grad_data).all()) for c in self.chunks for b in c.buffers + c.expert_parallel_buffers
        )
        if loss is not None and not math.isfinite(loss):
            local = False
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def broadcast_from_last_stage(self, metrics: dict | None) -> dict:
        """Metrics computed on the last pipeline stage, made known to every stage."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return metrics or {}
        box = [metrics]
        dist.broadcast_object_list(
            box, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
        return box[0] or {}

    # ------------------------------------------------------------------------------- checkpoints
    def save(self, root, step: int, trainer_state: dict[str, Any], *, keep_last: int, parts=ckpt.EVERYTHING,
             extra_files=None, background: ckpt.AsyncSaves | None = None):
        """Weights (``parts`` of them: LoRA runs over loaded base weights save the adapters only),
        optimizer, scheduler and ``trainer_state`` as ``root/step_NNNNNNN`` (atomic; written in the
        background, and complete once ``background`` finalises it, when one is given)."""
        state = {**trainer_state, "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "layout": ckpt.layout_state(), "vocab_size": self.vocab_size}
        with self.updated_weights():
            return ckpt.save_checkpoint(root, step, self.chunks, self.optimizer, state, keep_last=keep_last,
                                        parts=parts, extra_files=extra_files, background=background)

    def resume(self, path, *, base=None) -> dict[str, Any]:
        """Weights, optimizer state (under the same layout; otherwise fp32 masters from the loaded
        weights), RNG and the step count of the schedule from a checkpoint; returns its trainer state.
        The schedule's shape (peak and minimum lr, warmup, decay steps and style) is this run's
        config, not the checkpoint's, so a finished run resumed with a larger ``train.max_steps``
        decays over the new length; a difference is logged once. ``base``: where the base weights
        of an adapters-only (LoRA) checkpoint are now (default: where it recorded them)."""
        with self.updated_weights():
            state = ckpt.load_checkpoint(path, self.chunks, self.optimizer, base=base)
        saved = state.get("scheduler")
        if self.scheduler is not None and saved:
            changed = schedule_changes(saved, self.scheduler.state_dict())
            if changed:
                say(f"learning-rate schedule: this run's config, not the checkpoint's ({changed})")
            self.scheduler.load_state_dict(saved)
        return state

    def load_weights(self, path):
        """Weights only, from a checkpoint of any TP/PP layout (the fp32 master weights follow them);
        returns the folder read."""
        with self.updated_weights():
            return ckpt.load_weights(path, self.chunks, self.optimizer)


def lr_schedule(optimizer, optim: OptimConfig, total_steps: int):
    """megatron's OptimizerParamScheduler: linear warmup over ``warmup_ratio`` of the steps, then decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    # override: a resume keeps only the checkpoint's step count (resume() says what changed), as a
    # Hugging Face Trainer user expects; megatron's default would take the saved schedule whole.
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=int(optim.warmup_ratio * total_steps), lr_decay_steps=total_steps,
        lr_decay_style=optim.decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=total_steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )


SCHEDULE_FIELDS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


def schedule_changes(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The schedule fields that differ between a checkpoint's scheduler state and this run's, as
    ``name checkpoint -> run`` (empty when none)."""
    return ", ".join(f"{name} {saved.get(name)} -> {current.get(name)}" for name in SCHEDULE_FIELDS
                     if saved.get(name) != current.get(name))
