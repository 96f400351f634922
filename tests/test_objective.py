"""The pure objective on hand-computed cases: known tensors give known losses and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from ekipl.algo import objective as O


def T(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def test_grpo_mean_only_and_split_advantages():
    r = T([1.0, 0.0, 0.0, 1.0])
    pol = torch.tensor([True, True, True, True])
    assert torch.allclose(O.grpo_advantages(r, pol, eps=0.0), T([1.0, -1.0, -1.0, 1.0]))
    assert torch.allclose(O.mean_only_advantages(r, pol), T([0.5, -0.5, -0.5, 0.5]))
    r2 = T([2.0, 0.0, 1.0, 1.0])
    pol2 = torch.tensor([False, True, True, True])
    mu, sd = 2 / 3, math.sqrt(((0 - 2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)
    expect = (r2 - mu) / sd
    assert torch.allclose(O.split_advantages(r2, pol2, eps=0.0), expect)
    # fewer than two policy actions: statistics from the whole group
    one = torch.tensor([False, False, False, True])
    assert torch.allclose(O.split_advantages(r2, one, eps=0.0), O.grpo_advantages(r2, one, eps=0.0))


def test_all_tied_group_has_zero_advantage_and_groups_are_independent():
    r = T([1.0, 1.0, 1.0, 0.0, 2.0])
    gi = torch.tensor([0, 0, 0, 1, 1])
    a = O.group_advantages(r, gi, torch.ones(5, dtype=torch.bool), "grpo")
    assert torch.allclose(a[:3], torch.zeros(3, dtype=a.dtype))
    assert torch.allclose(a[3:], torch.tensor([-1.0, 1.0]), atol=1e-5)
    with pytest.raises(ValueError, match="unknown advantage mode 'nope'"):
        O.group_advantages(r, gi, torch.ones(5, dtype=torch.bool), "nope")


def _loss(cfg, logp, old, adv, aux, mask=None, ref=None):
    mask = torch.ones_like(logp) if mask is None else mask
    return O.policy_loss(cfg, logp, old, T(adv), mask, torch.tensor(aux), ref)


def test_first_epoch_ratio_is_one_and_loss_is_minus_advantage():
    old = T([[math.log(0.3), math.log(0.6)], [math.log(0.1), math.log(0.9)]])
    logp = old.clone().requires_grad_(True)
    loss, m = _loss(O.ObjectiveConfig(), logp, old, [2.0, -1.0], [False, False])
    assert loss.item() == pytest.approx(-(2 + 2 - 1 - 1) / 4)
    assert m["ratio_mean"].item() == pytest.approx(1.0) and m["clip_frac"].item() == 0.0
    loss.backward()
    # d/dlogp of -ρA/N at ρ = 1 is -A/N
    assert torch.allclose(logp.grad, T([[-0.5, -0.5], [0.25, 0.25]]))


def test_ppo_clip_hand_computed():
    cfg = O.ObjectiveConfig(clip_low=0.2, clip_high=0.2)
    old = T([[0.0], [0.0]])
    logp = T([[math.log(1.5)], [math.log(1.5)]], grad=True)  # ratio 1.5 for both
    loss, m = _loss(cfg, logp, old, [1.0, -1.0], [False, False])
    # A=+1: min(1.5, 1.2) = 1.2 -> -1.2 (clipped, no gradient); A=-1: min(-1.5, -1.2) = -1.5 -> 1.5
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    loss.backward()
    assert torch.allclose(logp.grad, T([[0.0], [1.5 / 2]]))
    assert m["clip_frac"].item() == pytest.approx(0.5)
    # asymmetric clip (clip-higher): ε_high = 0.6 lets the ratio of 1.5 through
    loss2, _ = _loss(O.ObjectiveConfig(clip_low=0.2, clip_high=0.6), logp, old, [1.0, -1.0], [False, False])
    assert loss2.item() == pytest.approx((-1.5 + 1.5) / 2)


def test_offpolicy_plain_uses_the_same_clip():
    old = T([[0.0]])
    logp = T([[math.log(1.5)]], grad=True)
    a, _ = _loss(O.ObjectiveConfig(offpolicy="plain"), logp, old, [1.0], [True])
    b, _ = _loss(O.ObjectiveConfig(offpolicy="plain"), logp, old, [1.0], [False])
    assert a.item() == b.item() == pytest.approx(-1.2)


def test_offpolicy_shaped_hand_computed():
    g = 0.1
    cfg = O.ObjectiveConfig(offpolicy="shaped", shaping_gamma=g)
    logp = T([[math.log(0.5)]], grad=True)
    loss, _ = _loss(cfg, logp, T([[math.log(0.9)]]), [2.0], [True])
    assert loss.item() == pytest.approx(-2.0 * 0.5 / 0.6)
    loss.backward()
    # d/dlogp [-A p/(p+γ)] = -A γ p / (p+γ)^2
    assert logp.grad.item() == pytest.approx(-2.0 * g * 0.5 / 0.36)


def test_offpolicy_shaping_is_bounded_for_low_probability_tokens():
    g = 0.1
    cfg = O.ObjectiveConfig(offpolicy="shaped", shaping_gamma=g)
    logp = torch.linspace(-50.0, 0.0, 201, dtype=torch.float64)[:, None].requires_grad_(True)
    adv = [1.0] * 201
    loss, _ = O.policy_loss(
        cfg,
        logp,
        logp.detach(),
        T(adv),
        torch.ones_like(logp),
        torch.ones(201, dtype=torch.bool),
        global_tokens=1.0,
    )
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad.abs().max().item() <= 0.25 + 1e-9  # max of γp/(p+γ)^2 over p is 1/4
    assert logp.grad[0].abs().item() < 1e-15  # vanishes as p -> 0
    # the plain ratio with a tiny π_old explodes; shaping does not
    plain, _ = O.policy_loss(
        O.ObjectiveConfig(clip_high=1e9),
        T([[math.log(0.5)]]),
        T([[-40.0]]),
        T([-1.0]),
        torch.ones(1, 1),
        torch.ones(1, dtype=torch.bool),
    )
    assert plain.item() > 1e10


def test_offpolicy_mis_hand_computed():
    cfg = O.ObjectiveConfig(offpolicy="mis")
    logp = T([[math.log(0.5)]], grad=True)
    loss, _ = _loss(cfg, logp, T([[math.log(0.5)]]), [3.0], [True])
    w = 0.5 / ((0.5 + 1) / 2)
    assert loss.item() == pytest.approx(-3.0 * w)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-3.0 * w)  # d/dlogp of p·c is p·c


def test_mixed_batch_routes_auxiliary_tokens_only():
    cfg = O.ObjectiveConfig(offpolicy="shaped", shaping_gamma=1.0)
    logp = T([[math.log(0.5)], [math.log(0.5)]])
    loss, _ = _loss(cfg, logp, logp, [1.0, 1.0], [False, True])
    assert loss.item() == pytest.approx((-1.0 + -0.5 / 1.5) / 2)


def test_kl_k3_hand_computed_and_coefficient():
    logp, ref = T([[math.log(0.5)]]), T([[math.log(0.25)]])
    d = math.log(0.5)
    assert O.kl_k3(logp, ref).item() == pytest.approx(math.exp(d) - d - 1)
    assert O.kl_k3(ref, ref).item() == 0.0
    cfg = O.ObjectiveConfig(kl_coef=0.04)
    loss, m = _loss(cfg, logp, logp, [0.0], [False], ref=ref)
    assert loss.item() == pytest.approx(0.04 * (math.exp(d) - d - 1))
    assert m["kl"].item() == pytest.approx(math.exp(d) - d - 1)
    with pytest.raises(ValueError, match="needs ref_logp"):
        _loss(cfg, logp, logp, [0.0], [False])


def test_aggregations_hand_computed():
    v = T([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    m = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert O.aggregate(v, m, "token_mean").item() == pytest.approx(10 / 4)
    assert O.aggregate(v, m, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert O.aggregate(v, m, "seq_mean_token_sum_norm").item() == pytest.approx(10 / 6)
    assert O.aggregate(v, m, "seq_mean_token_sum_norm", max_len=5).item() == pytest.approx(10 / 10)
    with pytest.raises(ValueError, match="unknown aggregation"):
        O.aggregate(v, m, "sum")


@pytest.mark.parametrize("agg", O.AGGREGATIONS)
def test_sharded_losses_sum_to_the_whole_batch(agg):
    """With global denominators, per-shard losses (ranks x micro-batches) add up to the full loss."""
    torch.manual_seed(0)
    logp = torch.randn(6, 5, dtype=torch.float64) * 0.1 - 1
    old = logp + torch.randn(6, 5, dtype=torch.float64) * 0.05
    ref = logp + torch.randn(6, 5, dtype=torch.float64) * 0.05
    mask = (torch.rand(6, 5) > 0.3).double()
    mask[:, 0] = 1
    adv, aux = torch.randn(6, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 0], dtype=torch.bool)
    cfg = O.ObjectiveConfig(aggregation=agg, kl_coef=0.1, offpolicy="shaped")
    whole, _ = O.policy_loss(cfg, logp, old, adv, mask, aux, ref, max_len=5)
    g = dict(global_tokens=mask.sum(), global_seqs=6, max_len=5)
    parts = sum(
        O.policy_loss(cfg, logp[s], old[s], adv[s], mask[s], aux[s], ref[s], **g)[0]
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_masked_tokens_get_no_gradient():
    logp = T([[-1.0, -2.0, -3.0]], grad=True)
    loss, _ = _loss(O.ObjectiveConfig(), logp, logp.detach(), [1.0], [False], mask=T([[1.0, 1.0, 0.0]]))
    loss.backward()
    assert logp.grad[0, 2].item() == 0.0 and logp.grad[0, 0].item() != 0.0


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"advantage": "x"}, "algorithm.advantage"),
        ({"offpolicy": "x"}, "algorithm.offpolicy"),
        ({"aggregation": "x"}, "algorithm.aggregation"),
        ({"clip_low": 1.5}, "algorithm.clip_low"),
        ({"kl_coef": -1}, "algorithm.kl_coef"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        O.ObjectiveConfig(**kwargs)


def test_entropy_and_per_source_means():
    logits = torch.zeros(1, 2, 4)
    assert torch.allclose(O.entropy_from_logits(logits), torch.full((1, 2), math.log(4)))
    got = O.per_source_means(T([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), ["policy", "aux_a", "dataset"])
    assert got == {"policy": 2.0, "dataset": 5.0}


def test_sft_loss_is_the_token_mean_nll_with_the_global_denominator():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, m = O.sft_loss(logp, mask)
    assert loss.item() == pytest.approx(2.0) and m["nll"].item() == pytest.approx(2.0)
    loss.backward()
    assert torch.allclose(logp.grad, -mask / 3)
    loss6, _ = O.sft_loss(logp, mask, global_tokens=6.0)  # this rank's share of a 6-token batch
    assert loss6.item() == pytest.approx(1.0)


def test_group_std_population_or_sample():
    """algorithm.std: population (the default) or sample (torch.std, TRL 0.15 / Reason-RFT)."""
    r = T([1.0, 0.0, 0.0, 0.0])
    gi = torch.zeros(4, dtype=torch.long)
    pol = torch.ones(4, dtype=torch.bool)
    pop = O.group_advantages(r, gi, pol, "grpo", eps=1e-4)
    samp = O.group_advantages(r, gi, pol, "grpo", eps=1e-4, std="sample")
    mu = 0.25
    pop_sd, samp_sd = math.sqrt(0.1875), math.sqrt(0.25)  # sum of squares 0.75 over 4 and over 3
    assert torch.allclose(pop, ((r - mu) / (pop_sd + 1e-4)).float())
    assert torch.allclose(samp, ((r - mu) / (samp_sd + 1e-4)).float())
    assert float(pop[0] / samp[0]) == pytest.approx(math.sqrt(4 / 3), rel=1e-3)  # ~15% larger at G=4
    one = O.group_advantages(T([1.0]), torch.zeros(1, dtype=torch.long), pol[:1], "grpo", std="sample")
    assert one.tolist() == [0.0]  # a lone action: std 0, not NaN
    with pytest.raises(ValueError, match="algorithm.std: unknown 'biased'"):
        O.ObjectiveConfig(std="biased")


def test_clip_fraction_and_ratio_reported_for_policy_and_aux_tokens_apart():
    """Policy tokens: one of two clipped, ratio 1.5 and 1.0; aux tokens: both clipped, ratio 2."""
    old = T([[0.0, 0.0], [0.0, 0.0]])
    logp = T([[math.log(1.5), 0.0], [math.log(2.0), math.log(2.0)]])
    _, m = _loss(O.ObjectiveConfig(), logp, old, [1.0, 1.0], [False, True])
    assert m["clip_frac"].item() == pytest.approx(0.5) and m["aux_clip_frac"].item() == pytest.approx(1.0)
    assert m["policy_ratio_mean"].item() == pytest.approx(1.25)
    assert m["aux_ratio_mean"].item() == pytest.approx(2.0)
    # shaped: aux tokens are never clipped, and their reported ratio is still π_θ/π_old
    _, m = _loss(O.ObjectiveConfig(offpolicy="shaped"), logp, old, [1.0, 1.0], [False, True])
    assert m["aux_clip_frac"].item() == 0.0 and m["aux_ratio_mean"].item() == pytest.approx(2.0)
    # a batch without aux tokens reports no aux metrics (a mean over nothing is not 0)
    _, m = _loss(O.ObjectiveConfig(), logp, old, [1.0, 1.0], [False, False])
    assert "aux_clip_frac" not in m and "aux_ratio_mean" not in m


def test_micro_batch_metrics_weighted_by_their_tokens_give_the_whole_batch_metrics():
    """Every metric of policy_loss and sft_loss is a token mean: weighted by metric_tokens, the
    micro-batches' metrics combine into the whole batch's exactly (unweighted means would not:
    the micro-batches below hold 9 and 2 tokens, with and without aux rows)."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(5, 4, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    mask = T([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
    aux = torch.tensor([False, True, False, False, True])
    cfg = O.ObjectiveConfig(kl_coef=0.1)

    def metrics(rows):
        _, m = O.policy_loss(cfg, logp[rows], old[rows], adv[rows], mask[rows], aux[rows], ref[rows])
        _, sft = O.sft_loss(logp[rows], mask[rows])
        return {**m, **sft}, O.metric_tokens(mask[rows], aux[rows])

    whole, _ = metrics([0, 1, 2, 3, 4])
    parts = [metrics([0, 1, 2]), metrics([3]), metrics([4])]
    for k, v in whole.items():
        got = [(m[k], w[k]) for m, w in parts if k in m]
        combined = sum(float(x) * w for x, w in got) / sum(w for _, w in got)
        assert combined == pytest.approx(float(v), abs=1e-6), k
    assert set(whole) <= set(O.metric_tokens(mask, aux)), "a metric without its token count"
    unweighted = sum(float(m["pg_loss"]) for m, _ in parts) / len(parts)
    assert unweighted != pytest.approx(float(whole["pg_loss"]), abs=1e-3)  # the fix is needed here


def _stale_batch():
    """Row 0: a policy action whose engine (μ) and learner (π_old) probabilities differ, ρ = 2, 0.5,
    1; row 1: an external action (no μ)."""
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]]))
    mu = torch.log(torch.tensor([[0.25, 0.4, 0.9], [0.0, 0.0, 0.0]]).clamp(min=1e-30))
    known = torch.tensor([[True, True, True], [False, False, False]])
    return old, mu, known


def test_rollout_correction_weights_and_masks_by_hand():
    from ekipl.algo.rollout_correction import correction_weights, mismatch_metrics

    old, mu, known = _stale_batch()
    ones = torch.ones(3)
    w = correction_weights("tis", old, mu, known, 1.5)  # min(ρ, 1.5)
    assert torch.allclose(w[0], torch.tensor([1.5, 0.5, 1.0])) and torch.equal(w[1], ones)
    w = correction_weights("icepop", old, mu, known, 1.5)  # ρ in [2/3, 1.5]
    assert torch.equal(w[0], torch.tensor([0.0, 0.0, 1.0])) and torch.equal(w[1], ones)
    w = correction_weights("mis", old, mu, known, 1.5)  # geometric mean of 2, 0.5, 1 is 1: kept
    assert torch.equal(w, torch.ones(2, 3))
    far = torch.log(torch.tensor([[0.125, 0.05, 0.45], [1.0, 1.0, 1.0]]))  # ρ = 4, 4, 2: mean 3.17
    w = correction_weights("mis", old, far, known, 1.5)
    assert torch.equal(w[0], torch.zeros(3)) and torch.equal(w[1], ones)
    assert torch.equal(correction_weights("none", old, mu, known, 1.5), torch.ones(2, 3))
    m = mismatch_metrics("tis", old, mu, known, correction_weights("tis", old, mu, known, 1.5), 1.5)
    ln2 = math.log(2.0)
    assert float(m["kl"]) == pytest.approx(((2 - 1 - ln2) + (0.5 - 1 + ln2) + 0) / 3, abs=1e-6)
    assert float(m["chi2"]) == pytest.approx((4 + 0.25 + 1) / 3 - 1, abs=1e-6)
    assert float(m["ess"]) == pytest.approx(3.5**2 / (3 * 5.25), abs=1e-6)
    assert float(m["clipped_frac"]) == pytest.approx(1 / 3) and float(m["masked_frac"]) == 0.0
    m = mismatch_metrics("icepop", old, mu, known, correction_weights("icepop", old, mu, known, 1.5), 1.5)
    assert float(m["masked_frac"]) == pytest.approx(2 / 3)
    assert mismatch_metrics("tis", old, mu, torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 3), 1.5) == {}


def test_a_stale_batch_is_corrected_as_the_formula_says():
    """policy_loss with tis: the policy tokens' PPO-clip terms weighted by min(ρ, C), the external
    action's untouched; the loss and its gradient by hand."""
    old, mu, known = _stale_batch()
    logp = old.clone().requires_grad_(True)  # the first inner epoch: π_θ = π_old, ratio 1
    adv = torch.tensor([1.0, -0.5])
    mask = torch.ones(2, 3)
    is_aux = torch.tensor([False, True])
    cfg = O.ObjectiveConfig(rollout_correction="tis", rollout_correction_c=1.2)
    loss, m = O.policy_loss(
        cfg, logp, old, adv, mask, is_aux, behaviour_logp=mu, behaviour_mask=known.float()
    )
    # ℓ = −A at ratio 1; weights 1.2, 0.5, 1 on row 0, 1 on the external row; token mean over 6
    assert float(loss.detach()) == pytest.approx(-(1.0 * (1.2 + 0.5 + 1.0) - 0.5 * 3) / 6, abs=1e-6)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.2 / 6, -0.5 / 6, -1.0 / 6], abs=1e-6)
    assert logp.grad[1].tolist() == pytest.approx([0.5 / 6] * 3, abs=1e-6)
    assert float(m["rollout_corr/clipped_frac"]) == pytest.approx(1 / 3)
    plain, _ = O.policy_loss(
        O.ObjectiveConfig(), old, old, adv, mask, is_aux, behaviour_logp=mu, behaviour_mask=known.float()
    )
    assert float(plain) == pytest.approx(-(3.0 - 1.5) / 6, abs=1e-6)  # none: every weight 1


def test_rollout_correction_keys_are_checked():
    with pytest.raises(ValueError, match="algorithm.rollout_correction: unknown 'is'"):
        O.ObjectiveConfig(rollout_correction="is")
    with pytest.raises(ValueError, match="algorithm.rollout_correction_c must be > 1"):
        O.ObjectiveConfig(rollout_correction="tis", rollout_correction_c=1.0)
