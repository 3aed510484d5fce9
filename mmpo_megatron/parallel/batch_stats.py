"""Statistics of an optimizer step's global batch, computed with collectives over data-parallel ranks.

MMPO's min-max normalisation needs the min and max of the prior rewards over a scope, and an exact
mean needs the number of valid pairs in the whole global batch. The prior rewards depend only on
reference log-probs, so all of this is known before the policy forward: each rank passes the
rewards of every micro-batch of the step, and two collectives (a MAX over ``[-min, max]`` and a
SUM of counts) give every rank the same numbers.

Scopes (docs/method.md): ``global`` (all pairs of the step, all DP ranks and micro-batches: independent
of the split), ``dp_microbatch`` (per micro-batch index, across DP ranks), ``local`` (per
micro-batch, this rank only), ``none`` (no normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mmpo_megatron.config import NORM_SCOPES


@dataclass
class NormalisationStats:
    """Per micro-batch (min, max) of the prior rewards."""

    norm_min: list[Tensor] | None
    norm_max: list[Tensor] | None

    def for_microbatch(self, index: int) -> tuple[Tensor | None, Tensor | None]:
        """``(norm_min, norm_max)`` to pass to ``mmpo_loss`` for micro-batch ``index``."""
        if self.norm_min is None or self.norm_max is None:
            return None, None
        return self.norm_min[index], self.norm_max[index]


def data_parallel_group() -> dist.ProcessGroup | None:
    """megatron's data-parallel group, or None outside an initialised parallel state."""
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    return parallel_state.get_data_parallel_group()


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _valid_or_all(rewards: Sequence[Tensor], valid: Sequence[Tensor] | None) -> list[Tensor]:
    if valid is None:
        return [torch.ones_like(r, dtype=torch.bool) for r in rewards]
    if len(valid) != len(rewards):
        raise ValueError(f"got {len(valid)} validity masks for {len(rewards)} micro-batches")
    return [v.bool() for v in valid]


def global_valid_pairs(valid: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> int:
    """Number of valid pairs over all micro-batches of this step on all DP ranks."""
    group = group if group is not None else data_parallel_group()
    device = valid[0].device if valid else torch.device("cpu")
    count = torch.tensor([sum(int(v.sum()) for v in valid)], dtype=torch.int64, device=device)
    return int(_all_reduce(count, dist.ReduceOp.SUM, group).item())


def normalisation_stats(
    reward_chosen: Sequence[Tensor],
    reward_rejected: Sequence[Tensor],
    scope: str,
    *,
    valid: Sequence[Tensor] | None = None,
    group: dist.ProcessGroup | None = None,
) -> NormalisationStats:
    """Normalisation statistics of ``scope`` for this rank's micro-batches of one optimizer step.

    ``reward_chosen[i]`` / ``reward_rejected[i]`` are the prior rewards of micro-batch ``i``
    (``losses.prior_rewards``); ``valid[i]`` masks out padding pairs. Every DP rank must call this
    with the same number of micro-batches (megatron's schedules guarantee it).
    """
    if scope not in NORM_SCOPES:
        raise ValueError(f"normalisation scope must be one of {NORM_SCOPES}, got {scope!r}")
    if len(reward_chosen) != len(reward_rejected) or not reward_chosen:
        raise ValueError(
            f"need one chosen and one rejected reward tensor per micro-batch, got "
            f"{len(reward_chosen)} and {len(reward_rejected)}"
        )
    group = group if group is not None else data_parallel_group()
    valid = _valid_or_all(reward_chosen, valid)
    if scope == "none":
        return NormalisationStats(None, None)

    # Per micro-batch [-min, max] over valid pairs; an empty micro-batch gives [-inf, -inf],
    # the identity of MAX, so it never wins the reduction.
    rows = []
    for chosen, rejected, mask in zip(reward_chosen, reward_rejected, valid):
        values = torch.cat([chosen.detach()[mask], rejected.detach()[mask]])
        if values.numel() == 0:
            rows.append(torch.full((2,), float("-inf"), dtype=chosen.dtype, device=chosen.device))
        else:
            rows.append(torch.stack([-values.min(), values.max()]))
    neg_min_max = torch.stack(rows)  # [num_microbatches, 2]

    if scope in ("global", "dp_microbatch"):
        if scope == "global":
            neg_min_max = neg_min_max.amax(dim=0, keepdim=True).expand(len(rows), 2).clone()
        _all_reduce(neg_min_max, dist.ReduceOp.MAX, group)

    # A micro-batch with no valid pair anywhere: its statistics are never used; keep them finite.
    neg_min_max = torch.where(torch.isfinite(neg_min_max), neg_min_max, torch.zeros_like(neg_min_max))
    return NormalisationStats(
        norm_min=list((-neg_min_max[:, 0]).unbind()),
        norm_max=list(neg_min_max[:, 1].unbind()),
    )


MAX_PREFIX = "max/"
"""Metrics whose name starts with this are reduced by MAX over the global batch (else mean)."""


def global_metric_means(
    metrics: Sequence[Mapping[str, Tensor]],
    valid: Sequence[Tensor],
    group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Mean over all valid pairs of the global batch of each per-pair metric."""
    if not metrics:
        return {}
    group = group if group is not None else data_parallel_group()
    sums = []
    for per_pair, mask in zip(metrics, valid):
        mask = mask.bool()
        micro = {name: value.detach().to(torch.float64)[mask].sum() for name, value in per_pair.items()}
        micro["pairs"] = mask.sum().to(torch.float64)
        sums.append(micro)
    out = reduce_metric_sums(sums, group)
    out.pop("pairs")
    return out


def reduce_metric_sums(
    per_micro: Sequence[Mapping[str, Tensor]], group: dist.ProcessGroup | None
) -> dict[str, float]:
    """Global-batch metrics from per-micro-batch sums (with a ``pairs`` count): means over valid
    pairs, maxima for ``max/`` keys; one SUM and one MAX all-reduce over the DP group."""
    if not per_micro:
        return {}
    names = sorted(per_micro[0])
    sum_names = [n for n in names if not n.startswith(MAX_PREFIX)]
    max_names = [n for n in names if n.startswith(MAX_PREFIX)]
    device = per_micro[0]["pairs"].device
    sums = torch.stack([sum(m[n].to(device) for m in per_micro) for n in sum_names]).double()
    maxes = torch.stack([max(m[n].to(device) for m in per_micro) for n in max_names]).double() if max_names else None
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
        if maxes is not None:
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    totals = dict(zip(sum_names, sums.tolist()))
    pairs = max(totals["pairs"], 1.0)
    counts = ("pairs", "tokens", "row_tokens")
    out = {n: v / pairs for n, v in totals.items() if n not in counts}
    out.update({n: totals[n] for n in ("pairs", "tokens") if n in totals})
    if totals.get("row_tokens"):
        # Share of the computed token slots that were padding (packing drives this towards 0).
        out["padding_fraction"] = 1.0 - totals["tokens"] / totals["row_tokens"]
    if maxes is not None:
        out.update({n[len(MAX_PREFIX):]: v for n, v in zip(max_names, maxes.tolist())})
    return out
