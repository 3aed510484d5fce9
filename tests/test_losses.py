"""Preference losses against closed forms in float64 on fresh random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmpo_megatron.config import ConfigError, LossConfig
from mmpo_megatron.losses import (
    PairLogProbs,
    dpo_loss,
    ipo_loss,
    mmpo_loss,
    preference_loss,
    simpo_loss,
)

F64 = torch.float64


def random_logps(n, generator, scale=50.0):
    """Four per-pair sequence log-prob tensors (negative, like real sums)."""
    return [-(torch.rand(n, dtype=F64, generator=generator) * scale + 1.0) for _ in range(4)]


@pytest.fixture
def gen():
    # Fresh inputs per run: the seed is drawn, then printed on failure through the param repr.
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


def mmpo_closed_form(lc, lr, lc_ref, lr_ref, beta, eps_c, eps_r, aux_input, w):
    """docs/method.md steps 1-4, written with scalar python math, pair by pair."""
    rc = [eps_c + beta * x for x in lc_ref.tolist()]
    rr = [eps_r + beta * x for x in lr_ref.tolist()]
    m, M = min(rc + rr), max(rc + rr)
    out = []
    for i in range(len(rc)):
        sc = lc[i].item() + (rc[i] - m + 1e-6) / (M - m + 1e-6)
        sr = lr[i].item() + (rr[i] - m + 1e-6) / (M - m + 1e-6)
        lse = max(sc, sr) + math.log(math.exp(sc - max(sc, sr)) + math.exp(sr - max(sc, sr)))
        if aux_input == "score_margin":
            a = sc - sr
        else:
            a = beta * ((lc[i].item() - lc_ref[i].item()) - (lr[i].item() - lr_ref[i].item()))
        log_sig = -math.log1p(math.exp(-a)) if a > 0 else a - math.log1p(math.exp(a))
        out.append(-lse - w * log_sig)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("aux_input", ["score_margin", "dpo_margin"])
@pytest.mark.parametrize("aux_weight", [0.0, 0.5, 1.0])
def test_mmpo_value_matches_closed_form(gen, aux_input, aux_weight):
    lc, lr, lc_ref, lr_ref = random_logps(7, gen)
    beta = float(torch.rand((), generator=gen)) * 0.5 + 0.01
    loss, metrics = mmpo_loss(
        lc, lr, lc_ref, lr_ref, beta=beta, eps_chosen=0.9, eps_rejected=0.1, aux_input=aux_input, aux_weight=aux_weight
    )
    expected = mmpo_closed_form(lc, lr, lc_ref, lr_ref, beta, 0.9, 0.1, aux_input, aux_weight)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-10)
    # Normalised rewards lie in (0, 1]: the scores are the log-probs shifted by them.
    shift_c = metrics["rewards/chosen"] - lc
    shift_r = metrics["rewards/rejected"] - lr
    assert torch.all((shift_c > 0) & (shift_c <= 1 + 1e-12)) and torch.all((shift_r > 0) & (shift_r <= 1 + 1e-12))
    assert metrics["mmpo/norm_min"].shape == lc.shape


def test_mmpo_gradient_matches_autograd_of_literal_formula(gen):
    """Our formulation (via the identity) has the same gradient as the paper's literal one."""
    lc, lr, lc_ref, lr_ref = random_logps(6, gen)
    for w in (0.0, 0.3, 1.0, 2.0):
        for aux in ("score_margin", "dpo_margin"):
            a = lc.clone().requires_grad_()
            b = lr.clone().requires_grad_()
            mmpo_loss(a, b, lc_ref, lr_ref, beta=0.1, aux_input=aux, aux_weight=w)[0].sum().backward()

            a2 = lc.clone().requires_grad_()
            b2 = lr.clone().requires_grad_()
            rc, rr = 0.9 + 0.1 * lc_ref, 0.1 + 0.1 * lr_ref
            allr = torch.cat([rc, rr])
            m, M = allr.min(), allr.max()
            sc = a2 + (rc - m + 1e-6) / (M - m + 1e-6)
            sr = b2 + (rr - m + 1e-6) / (M - m + 1e-6)
            arg = sc - sr if aux == "score_margin" else 0.1 * ((a2 - lc_ref) - (b2 - lr_ref))
            (-torch.logsumexp(torch.stack([sc, sr]), 0) - w * F.logsigmoid(arg)).sum().backward()
            torch.testing.assert_close(a.grad, a2.grad, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b.grad, b2.grad, rtol=1e-12, atol=1e-12)


def test_mmpo_identity_literal_weight_one_is_minus_chosen_score(gen):
    lc, lr, lc_ref, lr_ref = random_logps(9, gen)
    lc.requires_grad_()
    lr.requires_grad_()
    loss, metrics = mmpo_loss(lc, lr, lc_ref, lr_ref, beta=0.05, aux_input="score_margin", aux_weight=1.0)
    assert torch.equal(loss, -metrics["rewards/chosen"])
    loss.sum().backward()
    assert torch.equal(lr.grad, torch.zeros_like(lr)), "rejected side must get exactly zero gradient"
    assert torch.equal(lc.grad, -torch.ones_like(lc)), "chosen side gradient is the chosen NLL's: -1 per pair"


def test_pure_marginal_likelihood_gradient_weights_are_posteriors(gen):
    lc, lr, lc_ref, lr_ref = random_logps(8, gen, scale=5.0)
    lc.requires_grad_()
    lr.requires_grad_()
    loss, metrics = mmpo_loss(lc, lr, lc_ref, lr_ref, beta=0.1, aux_weight=0.0)
    loss.sum().backward()
    sc, sr = metrics["rewards/chosen"], metrics["rewards/rejected"]
    # Theorem 3.2: -grad L = sigmoid(sc - sr) grad lc + sigmoid(sr - sc) grad lr
    torch.testing.assert_close(-lc.grad, torch.sigmoid(sc - sr), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(-lr.grad, torch.sigmoid(sr - sc), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(metrics["mmpo/posterior_chosen"], torch.sigmoid(sc - sr))


def test_mmpo_given_statistics_are_used(gen):
    lc, lr, lc_ref, lr_ref = random_logps(4, gen)
    _, metrics = mmpo_loss(lc, lr, lc_ref, lr_ref, beta=0.1, norm_min=-100.0, norm_max=10.0)
    expected = lc + (0.9 + 0.1 * lc_ref + 100.0 + 1e-6) / (110.0 + 1e-6)
    torch.testing.assert_close(metrics["rewards/chosen"], expected, rtol=1e-12, atol=1e-12)
    _, unnormalised = mmpo_loss(lc, lr, lc_ref, lr_ref, beta=0.1, normalize=False)
    torch.testing.assert_close(unnormalised["rewards/chosen"], lc + 0.9 + 0.1 * lc_ref)
    with pytest.raises(ValueError, match="both norm_min and norm_max"):
        mmpo_loss(lc, lr, lc_ref, lr_ref, norm_min=0.0)


@pytest.mark.parametrize(
    "case",
    ["huge_negative", "all_rewards_equal", "single_pair", "huge_gap"],
)
def test_mmpo_extreme_inputs_stay_finite(case):
    n = 1 if case == "single_pair" else 5
    lc = torch.full((n,), -1e4, dtype=F64, requires_grad=True)
    lr = torch.full((n,), -3.0, dtype=F64, requires_grad=True)
    lc_ref = torch.full((n,), -1e4, dtype=F64)
    lr_ref = torch.full((n,), -1e4, dtype=F64)
    if case == "all_rewards_equal":
        lc_ref = lr_ref = torch.full((n,), -7.0, dtype=F64)
        kwargs = dict(eps_chosen=0.5, eps_rejected=0.5)
    elif case == "huge_gap":
        lr = torch.full((n,), 1e-3, dtype=F64, requires_grad=True)
        kwargs = {}
    else:
        kwargs = {}
    for aux in ("score_margin", "dpo_margin"):
        for w in (0.0, 1.0):
            loss, metrics = mmpo_loss(lc, lr, lc_ref, lr_ref, beta=0.5, aux_input=aux, aux_weight=w, **kwargs)
            (grad_c, grad_r) = torch.autograd.grad(loss.sum(), [lc, lr])
            for t in (loss, grad_c, grad_r, *metrics.values()):
                assert torch.isfinite(t).all(), (case, aux, w)
    if case == "all_rewards_equal":
        # max == min: every normalised reward is exactly 1.
        torch.testing.assert_close(metrics["rewards/chosen"] - lc.detach(), torch.ones(n, dtype=F64))


def test_dpo_matches_trl_formula_and_ln2_at_start(gen):
    lc, lr, lc_ref, lr_ref = random_logps(10, gen)
    for ls in (0.0, 0.1):
        loss, metrics = dpo_loss(lc, lr, lc_ref, lr_ref, beta=0.2, label_smoothing=ls)
        z = 0.2 * ((lc - lc_ref) - (lr - lr_ref))
        # TRL's sigmoid loss: -logsigmoid(z) * (1 - ls) - logsigmoid(-z) * ls, written with log1p.
        expected = (1 - ls) * torch.log1p(torch.exp(-z)) + ls * torch.log1p(torch.exp(z))
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["rewards/chosen"], 0.2 * (lc - lc_ref))
    torch.testing.assert_close(metrics["rewards/accuracies"], (z > 0).to(F64))
    same, _ = dpo_loss(lc, lr, lc, lr, beta=0.1)
    torch.testing.assert_close(same, torch.full_like(same, math.log(2.0)), rtol=0, atol=1e-15)


def test_dpo_gradient_closed_form(gen):
    lc, lr, lc_ref, lr_ref = random_logps(5, gen, scale=3.0)
    lc.requires_grad_()
    loss, _ = dpo_loss(lc, lr, lc_ref, lr_ref, beta=0.3)
    loss.sum().backward()
    z = 0.3 * ((lc - lc_ref) - (lr - lr_ref))
    torch.testing.assert_close(lc.grad, -0.3 * torch.sigmoid(-z.detach()), rtol=1e-12, atol=1e-14)


def test_ipo_and_simpo_closed_forms(gen):
    lc, lr, lc_ref, lr_ref = [x / 40.0 for x in random_logps(6, gen)]  # per-token means
    loss, _ = ipo_loss(lc, lr, lc_ref, lr_ref, beta=0.1)
    torch.testing.assert_close(loss, ((lc - lc_ref) - (lr - lr_ref) - 5.0) ** 2, rtol=1e-12, atol=1e-12)
    loss, metrics = simpo_loss(lc, lr, beta=2.0, gamma=1.6)
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-(2.0 * (lc - lr) - 1.6))), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["rewards/margins"], 2.0 * (lc - lr))


def test_preference_loss_dispatch_reductions_and_nll(gen):
    sums = random_logps(4, gen)
    chosen_tokens = torch.randint(1, 30, (4,), generator=gen)
    rejected_tokens = torch.randint(1, 30, (4,), generator=gen)
    logps = PairLogProbs(sums[0], sums[1], chosen_tokens, rejected_tokens, sums[2], sums[3])
    means = [sums[0] / chosen_tokens, sums[1] / rejected_tokens, sums[2] / chosen_tokens, sums[3] / rejected_tokens]

    loss, _ = preference_loss(LossConfig(name="ipo", beta=0.2), logps)
    torch.testing.assert_close(loss, ipo_loss(*means, beta=0.2)[0])
    loss, _ = preference_loss(LossConfig(name="simpo", beta=2.0, gamma=3.0), logps)
    torch.testing.assert_close(loss, simpo_loss(means[0], means[1], beta=2.0, gamma=3.0)[0])
    loss, _ = preference_loss(LossConfig(name="dpo", logp_reduction="mean"), logps)
    torch.testing.assert_close(loss, dpo_loss(*means, beta=0.1)[0])
    loss, metrics = preference_loss(LossConfig(name="mmpo", nll_weight=0.5), logps)
    base, _ = mmpo_loss(*sums, beta=0.1)
    torch.testing.assert_close(loss, base + 0.5 * (-means[0]))
    torch.testing.assert_close(metrics["nll/chosen"], -means[0])
    loss, _ = preference_loss(LossConfig(name="mmpo", norm_scope="none"), logps)
    torch.testing.assert_close(loss, mmpo_loss(*sums, beta=0.1, normalize=False)[0])

    no_ref = PairLogProbs(sums[0], sums[1], chosen_tokens, rejected_tokens)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(LossConfig(name="dpo"), no_ref)
    preference_loss(LossConfig(name="simpo"), no_ref)  # reference-free


def test_pair_logprobs_select_gather_and_store(gen, tmp_path):
    count = 7
    values = PairLogProbs(*random_logps(count, gen)[:2], torch.randint(1, 30, (count,), generator=gen),
                          torch.randint(1, 30, (count,), generator=gen))
    # Scattered out of order over two "ranks" with padding slots (-1), gathered back by position.
    gathered = PairLogProbs.zeros(count)
    for positions in (torch.tensor([5, 0, 3, -1]), torch.tensor([6, 2, 1, 4, -1, -1])):
        part = values.take(positions)
        assert torch.equal(part.chosen[positions < 0], values.chosen[[0] * int((positions < 0).sum())])
        gathered.put(positions, part)
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        assert torch.equal(getattr(gathered, name), getattr(values, name).to(getattr(gathered, name).dtype)), name
    path = tmp_path / "scores.pt"
    gathered.save(path)
    loaded = PairLogProbs.load(path)
    assert torch.equal(loaded.chosen, gathered.chosen) and loaded.ref_chosen is None and len(loaded) == count
    # A reference joins the policy values; the per-token reduction uses each side's own counts.
    both = gathered.with_reference(values).to("cpu", torch.float64)
    _, _, ref_chosen_mean, ref_rejected_mean = both.reduced("mean")
    torch.testing.assert_close(ref_chosen_mean, values.chosen.double() / values.chosen_tokens)
    torch.testing.assert_close(ref_rejected_mean, values.rejected.double() / values.rejected_tokens)
    assert both.chosen_tokens.dtype == torch.long
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        both.reduced("max")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="loss.name"):
        LossConfig(name="kto")
    with pytest.raises(ConfigError, match="loss.norm_scope"):
        LossConfig(norm_scope="batch")
    with pytest.raises(ConfigError, match="loss.beta"):
        LossConfig(beta=0.0)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="1-D and of equal length"):
        dpo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3))


def test_the_loss_registry_is_the_one_list_of_losses():
    """config.LOSSES names every loss once: each has a formula, a config group that composes to it,
    a row in the README's loss table, and the objective its LossSpec asks for; a formula for a name
    outside the registry is refused."""
    from pathlib import Path

    from mmpo_megatron.config import LOSS_NAMES, LOSSES
    from mmpo_megatron.losses import formula_of
    from mmpo_megatron.model.objective import MMPOObjective, objective_for

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    assert LOSS_NAMES == tuple(LOSSES) == ("mmpo", "dpo", "ipo", "simpo")
    assert sorted(p.stem for p in (repo / "configs" / "loss").glob("*.yaml")) == sorted(LOSSES)
    for name, spec in LOSSES.items():
        assert f"name: {name}" in (repo / "configs" / "loss" / f"{name}.yaml").read_text()
        assert f"| `{name}_loss` |" in readme
        assert isinstance(objective_for(LossConfig(name=name)), MMPOObjective) == spec.step_statistics
        assert LossConfig(name=name).needs_reference == spec.needs_reference
    with pytest.raises(ConfigError, match="loss.name: must be mmpo, dpo, ipo or simpo, got 'kto'"):
        LossConfig(name="kto")
    with pytest.raises(ValueError, match="'kto' is not in mmpo_megatron.config.LOSSES"):
        formula_of("kto")(lambda *args: None)
    with pytest.raises(ValueError, match="loss 'dpo' has a formula already"):
        formula_of("dpo")(lambda *args: None)
