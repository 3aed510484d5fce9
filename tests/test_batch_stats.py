"""MMPO's normalisation statistics and exact global mean across data-parallel ranks.

The same 8-pair global batch is laid out as DP=1 x 4 micro-batches, DP=2 x 2 and DP=4 x 1 on
4 gloo processes (DP=1 and DP=2 come from TP=4 and TP=2: a TP group shares its batch), through
megatron's parallel_state. Micro-batches hold 2 pairs.
"""

import pytest
import torch

from mmpo_megatron.losses import mmpo_loss, prior_rewards
from mmpo_megatron.parallel import destroy_parallel, initialize_parallel
from mmpo_megatron.parallel.batch_stats import global_metric_means, global_valid_pairs, normalisation_stats
from mmpo_megatron.parallel.local_ranks import run_on_ranks

PAIRS, MICRO = 8, 2
BETA = 0.1


def f64(value):
    return torch.tensor(value, dtype=torch.float64)


def global_batch(seed):
    g = torch.Generator().manual_seed(seed)
    # Four per-pair log-prob vectors, float64; spread wide so the min/max differ per micro-batch.
    return [-(torch.rand(PAIRS, dtype=torch.float64, generator=g) * 80.0 + 1.0) for _ in range(4)]


def rank_pairs(dp_rank, dp_size):
    """Pair indices of each micro-batch on a DP rank: the global batch is split over DP ranks
    first, then each rank's share into micro-batches (megatron's data order)."""
    per_rank = PAIRS // dp_size
    mine = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    return [mine[i : i + MICRO] for i in range(0, per_rank, MICRO)]


def one_step(seed, scope):
    """A full MMPO loss over this rank's micro-batches, normalised by the global pair count."""
    from megatron.core import parallel_state as ps

    lc, lr, lc_ref, lr_ref = global_batch(seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    micro = rank_pairs(dp_rank, dp_size)
    rewards = [prior_rewards(lc_ref[idx], lr_ref[idx], beta=BETA) for idx in micro]
    stats = normalisation_stats([r[0] for r in rewards], [r[1] for r in rewards], scope)
    valid_pairs = global_valid_pairs([torch.ones(len(idx), dtype=torch.bool) for idx in micro])

    pc, pr = lc.clone().requires_grad_(), lr.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    normalised, metrics, valid = {}, [], []
    for i, idx in enumerate(micro):
        norm_min, norm_max = stats.for_microbatch(i)
        loss, m = mmpo_loss(pc[idx], pr[idx], lc_ref[idx], lr_ref[idx], beta=BETA, aux_weight=0.3,
                            normalize=scope != "none", norm_min=norm_min, norm_max=norm_max)
        total = total + loss.sum() / valid_pairs
        for j, pair in enumerate(idx):
            normalised[pair] = (m["rewards/chosen"][j].item() - lc[pair].item(),
                                m["rewards/rejected"][j].item() - lr[pair].item())
        metrics.append(m)
        valid.append(torch.ones(len(idx), dtype=torch.bool))
    total.backward()
    local_total = total.detach().clone()
    torch.distributed.all_reduce(local_total, group=ps.get_data_parallel_group())
    return {
        "dp_size": dp_size,
        "micro": micro,
        "valid_pairs": valid_pairs,
        "normalised": normalised,
        "loss": local_total.item(),
        "grad_chosen": pc.grad,
        "grad_rejected": pr.grad,
        "means": global_metric_means(metrics, valid),
    }


def layouts(seed):
    out = {}
    for tp in (4, 2, 1):  # DP = 1, 2, 4
        initialize_parallel(tensor_parallel=tp, device="cpu")
        for scope in ("global", "dp_microbatch", "local", "none"):
            out[(4 // tp, scope)] = one_step(seed, scope)
        destroy_parallel()
    return out


def reference_normalised(seed, groups):
    """Single-process: min-max over the pairs of each group, then each pair's shift."""
    _, _, lc_ref, lr_ref = global_batch(seed)
    rc, rr = prior_rewards(lc_ref, lr_ref, beta=BETA)
    shifts = {}
    for idx in groups:
        values = torch.cat([rc[idx], rr[idx]])
        m, M = values.min(), values.max()
        for p in idx:
            shifts[p] = (((rc[p] - m + 1e-6) / (M - m + 1e-6)).item(), ((rr[p] - m + 1e-6) / (M - m + 1e-6)).item())
    return shifts


@pytest.mark.xdist_group("many_ranks")  # one pytest worker: see Makefile
def test_global_scope_is_independent_of_layout_and_dp_microbatch_matches_reference():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    per_rank = run_on_ranks(layouts, 4, seed)

    def combined(dp, scope):
        """Merge ranks' per-pair results; gradients summed over DP ranks (each rank owns its pairs)."""
        results = [r[(dp, scope)] for r in per_rank]
        normalised, grad_c, grad_r = (
            {},
            torch.zeros(PAIRS, dtype=torch.float64),
            torch.zeros(PAIRS, dtype=torch.float64),
        )
        seen_dp_ranks = set()
        for rank, res in enumerate(results):
            dp_rank = rank if dp == 4 else (rank // (4 // dp))  # consecutive TP ranks share a DP rank
            normalised.update(res["normalised"])
            if dp_rank not in seen_dp_ranks:
                seen_dp_ranks.add(dp_rank)
                grad_c += res["grad_chosen"]
                grad_r += res["grad_rejected"]
            assert res["valid_pairs"] == PAIRS
            assert res["loss"] == results[0]["loss"], "every rank must see the same global loss"
            assert res["means"] == results[0]["means"], "every rank must see the same global metrics"
        return normalised, results[0]["loss"], grad_c, grad_r, results[0]["means"]

    base_norm, base_loss, base_gc, base_gr, base_means = combined(1, "global")
    ref = reference_normalised(seed, [list(range(PAIRS))])
    for p in range(PAIRS):
        torch.testing.assert_close(f64(base_norm[p]), f64(ref[p]), rtol=1e-12, atol=1e-12)
    # The metric means are means: a float64 mean of the per-pair values of the whole batch at once.
    lc, lr, lc_ref, lr_ref = global_batch(seed)
    ref_loss, ref_metrics = mmpo_loss(lc, lr, lc_ref, lr_ref, beta=BETA, aux_weight=0.3)
    assert set(base_means) == set(ref_metrics) and len(base_means) >= 6
    for name, values in ref_metrics.items():
        assert base_means[name] == pytest.approx(values.double().mean().item(), rel=1e-12, abs=1e-12), name
    assert base_loss == pytest.approx(ref_loss.double().mean().item(), rel=1e-12)
    for dp in (2, 4):
        norm, loss, gc, gr, means = combined(dp, "global")
        for p in range(PAIRS):
            assert norm[p] == base_norm[p], f"DP={dp}: pair {p} normalised differently (seed {seed})"
        torch.testing.assert_close(f64(loss), f64(base_loss), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(gc, base_gc, rtol=1e-14, atol=1e-16)
        torch.testing.assert_close(gr, base_gr, rtol=1e-14, atol=1e-16)
        for name in base_means:
            torch.testing.assert_close(f64(means[name]), f64(base_means[name]), rtol=1e-12, atol=1e-12)
    # aux_weight=0.3: the rejected side really gets gradient, so the comparison above is not vacuous.
    assert base_gr.abs().min() > 0

    # dp_microbatch: micro-batch j's statistics span micro-batch j of every DP rank.
    for dp in (1, 2, 4):
        micro_per_rank = PAIRS // dp // MICRO
        groups = [sum((rank_pairs(r, dp)[j] for r in range(dp)), []) for j in range(micro_per_rank)]
        norm, *_ = combined(dp, "dp_microbatch")
        ref = reference_normalised(seed, groups)
        for p in range(PAIRS):
            torch.testing.assert_close(f64(norm[p]), f64(ref[p]), rtol=1e-12, atol=1e-12)
        # local: each rank's micro-batch alone.
        norm, *_ = combined(dp, "local")
        ref = reference_normalised(seed, [m for r in range(dp) for m in rank_pairs(r, dp)])
        for p in range(PAIRS):
            torch.testing.assert_close(f64(norm[p]), f64(ref[p]), rtol=1e-12, atol=1e-12)

    # With DP=4 x 1 micro-batch, dp_microbatch and global coincide; with DP=1 they do not.
    assert combined(4, "dp_microbatch")[0] == combined(4, "global")[0]
    assert combined(1, "dp_microbatch")[0] != combined(1, "global")[0]
    # none: prior rewards enter unscaled.
    _, _, lc_ref, lr_ref = global_batch(seed)
    norm, *_ = combined(2, "none")
    rc, rr = prior_rewards(lc_ref, lr_ref, beta=BETA)
    for p in range(PAIRS):
        torch.testing.assert_close(f64(norm[p]), torch.stack([rc[p], rr[p]]), rtol=1e-12, atol=1e-12)


def test_invalid_pairs_are_excluded_single_process():
    rc = [torch.tensor([1.0, 50.0]), torch.tensor([3.0, -40.0])]
    rr = [torch.tensor([2.0, 60.0]), torch.tensor([0.5, -45.0])]
    valid = [torch.tensor([True, False]), torch.tensor([True, False])]
    stats = normalisation_stats(rc, rr, "global", valid=valid, group=None)
    assert global_valid_pairs(valid, group=None) == 2
    assert stats.norm_min[0].item() == 0.5 and stats.norm_max[1].item() == 3.0
    # A micro-batch with no valid pair keeps finite statistics.
    stats = normalisation_stats(rc, rr, "local", valid=[valid[0], torch.tensor([False, False])], group=None)
    assert torch.isfinite(stats.norm_min[1]) and torch.isfinite(stats.norm_max[1])
    assert global_valid_pairs([valid[0], torch.tensor([False, False])], group=None) == 1
