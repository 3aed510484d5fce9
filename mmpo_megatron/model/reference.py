"""Where reference log-probs come from, behind one small interface (``reference.mode``):

- ``precompute``: one forward pass over the training and held-out pairs before training, cached on
  disk (keyed by data, weights, model and numerics) and reused on restart. No reference model on
  the device while training; offline training repeats epochs, so it also saves a forward per step.
- ``resident``: a second, frozen copy of the model on the device, run on each step's pairs.
- ``cpu_swap``: the reference weights wait in (pinned) CPU memory and are copied into the
  policy's own parameters for the reference forward, then the policy's weights are copied back
  (NeMo-Aligner's cpu_weight_swap): an online reference with no second copy on the device.
- ``adapters_off`` (LoRA): the policy's own chunks with their adapters switched off, the base.

Each source fills ``ref_chosen``/``ref_rejected`` of a step's micro-batches on the last pipeline
stage (``fill``) and scores a whole data set (``score``, for evaluation).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from mmpo_megatron.model.builder import unwrap
from mmpo_megatron.model.checkpoint import checkpoint_parts, load_weights, resolve_checkpoint
from mmpo_megatron.model.lora import adapters_disabled, has_lora, reset_adapters
from mmpo_megatron.model.schedule import MicroBatch, score_microbatches
from mmpo_megatron.pair_logprobs import PairLogProbs

if TYPE_CHECKING:  # types only: model/preference_model.py imports this module at run time
    from mmpo_megatron.model.preference_model import MegatronPreferenceModel

log = logging.getLogger(__name__)

def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (data fingerprint, weights identity, model shape...)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


LOCK_POLL_S = 10.0  # how often a run waiting for another's scoring looks again (a collective each time)


@contextlib.contextmanager
def cache_entry_lock(path: Path, *, is_writer: bool, device) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for this run (taken by its writer rank, every rank
    waiting with it), so that runs sharing a cache score an entry once: the first scores, the
    others wait and then load. The ranks agree every LOCK_POLL_S, so no collective times out
    while another run scores. A filesystem without locks is used unlocked (with a warning)."""
    handle = None
    if is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    told = False
    while True:
        held = 1
        if handle is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = 0
            except OSError as exc:  # e.g. a Lustre mount without -o flock
                log.warning(
                    "reference cache: no file lock on %s (%s): runs sharing the cache may score it twice", path, exc
                )
        agreed = torch.tensor([held], dtype=torch.int32, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if agreed.item():
            break
        if handle is not None and not told:
            log.warning("reference cache: another run is scoring %s; waiting for it", path.with_suffix(".pt").name)
            told = True
        time.sleep(LOCK_POLL_S)
    try:
        yield
    finally:
        if handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def cached_scores(
    cache_dir: Path,
    key: str,
    compute: Callable[[], PairLogProbs | None],
    *,
    is_writer: bool,
    on_last_stage: bool,
    device,
) -> PairLogProbs | None:
    """Load ``ref_<key>.pt`` if present on every rank, else run ``compute()`` (all ranks) and save
    it; under the entry's lock, so that runs started together on one cache score it once."""
    path = cache_dir / f"ref_{key}.pt"
    with cache_entry_lock(cache_dir / f"ref_{key}.lock", is_writer=is_writer, device=device):
        present = torch.tensor([1 if path.exists() else 0], dtype=torch.int32, device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MIN)  # every rank takes the same branch
        if present.item():
            log.info("reference log-probs: cache hit %s", path)
            return PairLogProbs.load(path) if on_last_stage else None
        scores = compute()
        if is_writer:
            cache_dir.mkdir(parents=True, exist_ok=True)
            scores.save(path)
        dist.barrier()
        return scores


def _set(micro_batches: Sequence[MicroBatch], scored: Sequence[tuple]) -> None:
    for micro, (_, logps) in zip(micro_batches, scored):
        micro.set_reference(logps)


class ReferenceSource:
    """Reference log-probs for the model's micro-batches and data sets."""

    def fill(self, model: "MegatronPreferenceModel", micro_batches: Sequence[MicroBatch]) -> None:
        """Set each micro-batch's ``ref_chosen``/``ref_rejected`` (last pipeline stage)."""
        raise NotImplementedError

    def score(self, model: "MegatronPreferenceModel", pairs) -> PairLogProbs | None:
        """Reference scores of every pair of a data set (last pipeline stage; None elsewhere)."""
        raise NotImplementedError


class PrecomputedReference(ReferenceSource):
    """Scores computed once per data set with ``weights`` (a context giving chunks to score with), cached."""

    def __init__(
        self, cache_dir: Path, key_parts: tuple, weights: Callable[[], contextlib.AbstractContextManager]
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.key_parts = key_parts
        self.weights = weights
        self.train: PairLogProbs | None = None

    def score(self, model: "MegatronPreferenceModel", pairs) -> PairLogProbs | None:
        """Cached scores of ``pairs`` (computed on a cache miss, on every rank)."""
        def compute():
            with self.weights() as chunks:
                return model.score(pairs, chunks=chunks, progress=True)

        layout = model.layout
        writer = model.last_stage and layout.data_rank == 0 and layout.tensor_rank == 0
        return cached_scores(self.cache_dir, fingerprint(pairs._fingerprint, *self.key_parts), compute,
                             is_writer=writer, on_last_stage=model.last_stage, device=model.device)

    def prepare(self, model: "MegatronPreferenceModel", train_pairs) -> None:
        """Score (or load) the training pairs; ``fill`` then reads them by dataset position."""
        self.train = self.score(model, train_pairs)

    def fill(self, model: "MegatronPreferenceModel", micro_batches: Sequence[MicroBatch]) -> None:
        """Look the step's pairs up in the precomputed training scores."""
        if model.last_stage:
            for micro in micro_batches:
                micro.set_reference(self.train.take(micro.batch.index).to(model.device))


class ResidentReference(ReferenceSource):
    """A frozen second model (same layout as the policy) on the device."""

    def __init__(self, chunks: Sequence[torch.nn.Module]) -> None:
        self.chunks = list(chunks)

    def fill(self, model: "MegatronPreferenceModel", micro_batches: Sequence[MicroBatch]) -> None:
        """Run the frozen model on the step's micro-batches (every pipeline stage takes part)."""
        scored = score_microbatches(self.chunks, micro_batches, model.forward_plan)
        if model.last_stage:
            _set(micro_batches, scored)

    def score(self, model: "MegatronPreferenceModel", pairs) -> PairLogProbs | None:
        """Score a data set with the frozen model."""
        return model.score(pairs, chunks=self.chunks)


class AdaptersOffReference(ReferenceSource):
    """Under LoRA: the policy's own chunks with every adapter switched off are the base model, the
    reference (no copy, no swap, no cache; NeMo-Aligner and TRL do the same)."""

    def fill(self, model: "MegatronPreferenceModel", micro_batches: Sequence[MicroBatch]) -> None:
        """Run the policy's chunks on the step's micro-batches with the adapters off."""
        with model.updated_weights(), adapters_disabled(model.chunks):
            scored = score_microbatches(model.chunks, micro_batches, model.forward_plan)
        if model.last_stage:
            _set(micro_batches, scored)

    def score(self, model: "MegatronPreferenceModel", pairs) -> PairLogProbs | None:
        """Score a data set with the adapters off."""
        with adapters_disabled(model.chunks):
            return model.score(pairs)


class CpuSwapReference(ReferenceSource):
    """Reference weights in CPU memory (pinned where a GPU is used), swapped into the policy's
    parameters for each reference forward and back; the policy's weights wait in a CPU buffer."""

    def __init__(self, weights: Sequence[dict[str, torch.Tensor]]) -> None:
        self.weights = list(weights)
        self._policy: list[dict[str, torch.Tensor]] | None = None

    @classmethod
    def from_chunks(cls, chunks: Sequence[torch.nn.Module]) -> "CpuSwapReference":
        """Copy the given chunks' parameters (the reference weights) to CPU."""
        return cls([_cpu_copy(chunk) for chunk in chunks])

    @contextlib.contextmanager
    def swapped_in(self, chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
        """The policy's parameters hold the reference weights inside the block, their own after it."""
        if self._policy is None:
            self._policy = [_cpu_copy(chunk) for chunk in chunks]
        with torch.no_grad():
            for chunk, policy, reference in zip(chunks, self._policy, self.weights):
                for name, param in unwrap(chunk).named_parameters():
                    policy[name].copy_(param, non_blocking=True)
                    param.copy_(reference[name], non_blocking=True)
            try:
                yield
            finally:
                for chunk, policy in zip(chunks, self._policy):
                    for name, param in unwrap(chunk).named_parameters():
                        param.copy_(policy[name], non_blocking=True)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()

    @contextlib.contextmanager
    def _reference_in(self, model: "MegatronPreferenceModel") -> Iterator[None]:
        # The policy's last update is gathered before its weights are set aside (with
        # overlap_param_gather the gather would otherwise land on the reference weights).
        with model.updated_weights(), self.swapped_in(model.chunks):
            yield

    def fill(self, model: "MegatronPreferenceModel", micro_batches: Sequence[MicroBatch]) -> None:
        """Run the policy's own chunks with the reference weights swapped in."""
        with self._reference_in(model):
            scored = score_microbatches(model.chunks, micro_batches, model.forward_plan)
        if model.last_stage:
            _set(micro_batches, scored)

    def score(self, model: "MegatronPreferenceModel", pairs) -> PairLogProbs | None:
        """Score a data set with the reference weights swapped in."""
        with self._reference_in(model):
            return model.score(pairs)


@contextlib.contextmanager
def checkpoint_weights_in(model: "MegatronPreferenceModel", source) -> Iterator[list[torch.nn.Module]]:
    """The policy's chunks hold the weights of checkpoint ``source`` inside the block and their own,
    bit for bit, after it; meanwhile the policy's weights wait in CPU memory. Under LoRA, base
    weights come with the adapters' starting values (a LoRA checkpoint brings its own adapters). Another set of
    weights to read or score without a second model on the device (a 70B layout has no room for
    one). Only parameters are loaded: the optimizer, its fp32 masters and the modules' extra state
    (FP8 scaling history) stay the policy's."""
    with model.updated_weights():
        policy = [_cpu_copy(chunk) for chunk in model.chunks]
        try:
            load_weights(source, model.chunks, extra_state=False)
            if has_lora(model.chunks) and not checkpoint_parts(resolve_checkpoint(source), model.chunks).adapters:
                reset_adapters(model.chunks)  # base weights: with the run's starting adapters
            yield model.chunks
        finally:
            with torch.no_grad():
                for chunk, saved in zip(model.chunks, policy):
                    for name, param in unwrap(chunk).named_parameters():
                        param.copy_(saved[name])


def _cpu_copy(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    pin = torch.cuda.is_available()
    out = {}
    for name, param in unwrap(chunk).named_parameters():
        copy = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=pin)
        copy.copy_(param.detach())
        out[name] = copy
    return out
