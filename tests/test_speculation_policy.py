"""Goodput-adaptive speculation: acceptance estimator, step-cost model, policy (pure Python, no Ray)."""

import itertools
import json
import math

import numpy as np
import pytest

from cluster.speculation_policy import (
    AcceptanceEstimator,
    FixedPolicy,
    GoodputPolicy,
    SpecDecision,
    StepCostModel,
    expected_tokens,
)


def simulate_chain(rng, rates, k) -> int:
    """Accepted count of a chain of k drafts under conditional per-position rates."""
    for j in range(k):
        if rng.random() >= rates[j]:
            return j
    return k


def flat_verify_table(max_tokens=4096, seconds=0.02):
    """Verify time flat in B * n (memory-bound); drafting cheap."""
    verify = [[b, n, seconds] for b in (1, 2, 4, 8, 16, 32, 64) for n in range(1, 10) if b * n <= max_tokens]
    return {"verify": verify, "draft": [[b, seconds / 20] for b in (1, 8, 64)]}


def linear_verify_table(per_token=0.001, fixed=0.001):
    """Verify time linear in B * n (compute-bound): t = fixed + per_token * B * n."""
    verify = [[b, n, fixed + per_token * b * n] for b in (1, 4, 16, 64, 256) for n in (1, 2, 4, 8, 9)]
    return {"verify": verify, "draft": [[b, 0.0005] for b in (1, 16, 256)]}


# --------------------------------------------------------------------------- estimator


def test_estimator_converges_to_known_per_position_rates():
    true = [0.9, 0.7, 0.5, 0.3, 0.8]
    est = AcceptanceEstimator(5, prior=0.5, decay=0.99, global_decay=1.0)
    rng = np.random.default_rng(0)
    for step in range(20000):
        req = step % 4
        est.observe(req, 5, simulate_chain(rng, true, 5))
    assert est.global_rates() == pytest.approx(true, abs=0.03)
    # per-request window is short (decay 0.99 ≈ 100 trials) but unbiased on average
    per_req = np.mean([est.rates(r) for r in range(4)], axis=0)
    assert per_req == pytest.approx(true, abs=0.08)


def test_untested_positions_are_not_counted():
    # positions after the first rejection were never tested: (4 proposed, 0 accepted) carries the
    # same information as (1, 0), and (4, 2) the same as (3, 2)
    a, b = AcceptanceEstimator(4, prior=0.6), AcceptanceEstimator(4, prior=0.6)
    for _ in range(50):
        a.observe("r", 4, 0)
        b.observe("r", 1, 0)
        a.observe("s", 4, 2)
        b.observe("s", 3, 2)
    assert a.global_rates() == pytest.approx(b.global_rates())
    assert a.rates("r") == pytest.approx(b.rates("r")) and a.rates("s") == pytest.approx(b.rates("s"))
    assert a.trials("r")[1:] == [0.0, 0.0, 0.0] and a.trials("s")[3] == 0.0
    # a fully accepted chain tests every position it proposed, and only those
    c = AcceptanceEstimator(4, prior=0.6, global_decay=1.0)
    for _ in range(500):
        c.observe("t", 2, 2)
    assert c.trials("t")[2:] == [0.0, 0.0]
    assert c.global_rates()[:2] == pytest.approx([1.0, 1.0], abs=0.02)


def test_untested_deep_positions_follow_shallower_estimates():
    est = AcceptanceEstimator(6, prior=0.5, global_decay=1.0)
    for _ in range(2000):
        est.observe(0, 2, 2)  # only positions 0 and 1 are ever tested, always accepted
    g = est.global_rates()
    assert g[0] > 0.99 and g[5] > 0.99  # not stuck at the prior 0.5
    shaped = AcceptanceEstimator(3, prior=[0.8, 0.4, 0.4], global_decay=1.0)
    assert shaped.global_rates() == pytest.approx([0.8, 0.4, 0.4])


def test_new_request_starts_at_global_and_shrinks_toward_it():
    est = AcceptanceEstimator(3, prior=0.5, decay=1.0, global_decay=1.0, request_strength=4.0)
    for i in range(400):
        est.observe(f"warm{i % 8}", 3, 3)
    g = est.global_rates()
    assert est.rates("new") == pytest.approx(g)
    est.observe("bad", 3, 0)
    one = est.rates("bad")[0]
    assert 0.5 < one < g[0]  # one rejection moves it only part-way
    for _ in range(200):
        est.observe("bad", 3, 0)
    assert est.rates("bad")[0] < 0.05
    est.forget("bad")
    assert "bad" not in est and est.rates("bad") == pytest.approx(est.global_rates())


def test_estimator_tracks_a_change_with_decay():
    est = AcceptanceEstimator(2, prior=0.5, decay=0.9, global_decay=0.99)
    rng = np.random.default_rng(1)
    for _ in range(300):
        est.observe(0, 2, simulate_chain(rng, [0.9, 0.9], 2))
    for _ in range(300):
        est.observe(0, 2, simulate_chain(rng, [0.2, 0.9], 2))
    assert est.global_rates()[0] == pytest.approx(0.2, abs=0.1)


def test_estimator_validates():
    with pytest.raises(ValueError):
        AcceptanceEstimator(0)
    with pytest.raises(ValueError):
        AcceptanceEstimator(3, prior=1.5)
    est = AcceptanceEstimator(3)
    with pytest.raises(ValueError):
        est.observe(0, 2, 3)
    est.observe(0, 0, 0)  # nothing proposed: nothing tested
    assert 0 not in est
    est.observe(0, 10, 10)  # deeper than max_depth: clipped
    assert est.trials(0) == [1.0, 1.0, 1.0]


def test_expected_tokens():
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)


# --------------------------------------------------------------------------- cost model


def test_cost_model_interpolates_a_table_in_log_space():
    table = {"verify": [[1, 1, 0.010], [1, 4, 0.012], [16, 4, 0.040], [64, 4, 0.160]], "draft": [[1, 0.002], [64, 0.004]]}
    costs = StepCostModel.from_table(table)
    assert costs.verify_time(1, 1) == pytest.approx(0.010)
    assert costs.verify_time(16, 4) == pytest.approx(0.040)
    assert costs.verify_time(4, 1) == pytest.approx(0.012)  # same T = 4 as (1, 4)
    mid = costs.verify_time(32, 4)  # T = 128, halfway between 64 and 256 in log2
    assert mid == pytest.approx(math.sqrt(0.040 * 0.160), rel=1e-6)
    assert costs.draft_time(8, 3) == pytest.approx(3 * 0.002 * 2 ** 0.5, rel=1e-6)
    assert costs.draft_time(8, 0) == 0.0
    # beyond the table: positive, non-decreasing
    values = [costs.verify_time(b, n) for b in (1, 64, 512, 4096, 2 ** 20) for n in (1, 9)]
    assert all(v > 0 for v in values)
    assert costs.verify_time(4096, 9) >= costs.verify_time(64, 4)


def test_cost_model_from_json_file_and_validation(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"verify": [[8, 2, 0.03]]}))
    costs = StepCostModel.from_table(path)
    assert costs.verify_time(8, 2) == pytest.approx(0.03)  # one point: the prior's shape through it
    assert costs.verify_time(1, 1) > 0 and costs.verify_time(1, 1) <= 0.03
    for bad in ({"verify": [[0, 1, 0.1]]}, {"verify": [[1, 1, -1.0]]}, {"verify": [[1, 1]]}, {"other": []}):
        with pytest.raises(ValueError):
            StepCostModel.from_table(bad)


def test_cost_model_never_predicts_nonpositive_and_stays_monotone():
    costs = StepCostModel()
    rng = np.random.default_rng(2)
    for _ in range(300):
        b, n = int(rng.integers(1, 300)), int(rng.integers(1, 10))
        costs.observe_verify(b, n, float(rng.uniform(1e-4, 0.2)))
        costs.observe_draft(b, n, float(rng.uniform(1e-4, 0.05)))
    costs.observe_verify(4, 2, 0.0)  # ignored
    costs.observe_verify(4, 2, float("nan"))  # ignored
    grid = [costs.verify_time_for_tokens(t) for t in np.geomspace(1, 2 ** 22, 80)]
    assert all(v > 0 for v in grid)
    assert all(b >= a * (1 - 1e-12) for a, b in itertools.pairwise(grid))
    assert all(costs.draft_time(b, 1) > 0 for b in (1, 7, 1000))


def test_cost_model_learns_online_from_a_wrong_prior():
    true = lambda b, n: 0.005 + 0.0002 * b * n
    costs = StepCostModel(fixed_s=0.1, knee_tokens=10_000)
    rng = np.random.default_rng(3)
    for _ in range(400):
        b, n = int(rng.choice([1, 4, 16, 64, 128])), int(rng.integers(1, 6))
        costs.observe_verify(b, n, true(b, n) * float(rng.uniform(0.95, 1.05)))
        costs.observe_draft(b, n, n * 0.001)
    for b, n in ((1, 1), (16, 3), (128, 5)):
        assert costs.verify_time(b, n) == pytest.approx(true(b, n), rel=0.15)
    assert costs.draft_time(16, 4) == pytest.approx(0.004, rel=0.05)
    assert costs.num_observations["verify"] == 400


# --------------------------------------------------------------------------- policy


def trained_estimator(rates, depth=8, n=2000):
    est = AcceptanceEstimator(depth, prior=0.5, global_decay=1.0)
    rng = np.random.default_rng(4)
    for i in range(n):
        est.observe(i % 16, depth, simulate_chain(rng, rates, depth))
    return est


def test_policy_picks_large_k_when_verify_is_flat_and_acceptance_high():
    est = trained_estimator([0.95] * 8)
    policy = GoodputPolicy(est, StepCostModel.from_table(flat_verify_table()), max_draft_tokens=8)
    decision = policy.choose(range(4))
    assert decision.k >= 6
    assert all(v == decision.k for v in decision.per_request.values())
    assert decision.reason_code == "goodput" and f"k={decision.k}" in decision.reason


def test_policy_picks_zero_when_verify_is_linear_in_tokens_at_large_batch():
    est = trained_estimator([0.7] * 8)
    costs = StepCostModel.from_table(linear_verify_table())
    policy = GoodputPolicy(est, costs, max_draft_tokens=8)
    big = policy.choose(range(256))
    assert big.k == 0 and big.draft_levels == 0
    assert "k=0" in big.reason
    # ... while at batch 1 the fixed cost dominates and speculation pays
    small = GoodputPolicy(est, costs, max_draft_tokens=8).choose([0])
    assert small.k > 0


def test_policy_picks_zero_when_acceptance_is_near_zero():
    est = trained_estimator([0.01] * 8)
    policy = GoodputPolicy(est, StepCostModel.from_table(flat_verify_table()), max_draft_tokens=8)
    assert policy.choose(range(4)).k == 0


def test_decision_exposes_its_inputs():
    est = trained_estimator([0.8] * 8)
    costs = StepCostModel.from_table(flat_verify_table())
    decision = GoodputPolicy(est, costs, max_draft_tokens=5, min_draft_tokens=1).choose(["a", "b", "c"])
    assert isinstance(decision, SpecDecision)
    assert decision.batch_size == 3
    assert [c.k for c in decision.candidates] == [1, 2, 3, 4, 5]
    for c in decision.candidates:
        assert c.goodput == pytest.approx(c.expected_tokens / c.step_s)
        assert c.step_s == pytest.approx(c.draft_s + c.verify_s)
        rates = est.rates("a")
        assert c.expected_tokens == pytest.approx(3 * expected_tokens(rates, c.k), rel=0.05)
    assert decision.chosen.goodput == max(c.goodput for c in decision.candidates)
    d = decision.as_dict()
    assert d["goodput"] == decision.goodput and len(d["candidates"]) == 5 and "reason" in d
    json.dumps(d)


def test_per_request_refinement_gives_fewer_tokens_to_poor_requests():
    est = AcceptanceEstimator(6, prior=0.9, decay=1.0, global_decay=1.0, request_strength=1.0)
    for _ in range(200):
        est.observe("good", 6, 6)
        est.observe("poor", 6, 0)
    # moderately sloped verify cost: extra tokens are cheap, not free
    costs = StepCostModel.from_table({"verify": [[1, 1, 0.02], [64, 1, 0.03], [1024, 1, 0.25]],
                                      "draft": [[1, 0.001]]})
    decision = GoodputPolicy(est, costs, max_draft_tokens=6).choose(["good", "poor"] + [f"g{i}" for i in range(30)])
    assert decision.k_for("good") == decision.k > 0
    assert decision.k_for("poor") < decision.k
    off = GoodputPolicy(est, costs, max_draft_tokens=6, refine=False).choose(["good", "poor"])
    assert off.k_for("poor") == off.k


def test_caps_limit_requests_and_zero_caps_mean_no_drafting():
    est = trained_estimator([0.95] * 8)
    policy = GoodputPolicy(est, StepCostModel.from_table(flat_verify_table()), max_draft_tokens=8)
    decision = policy.choose([1, 2, 3], caps={2: 1, 3: 0})
    assert decision.k_for(2) <= 1 and decision.k_for(3) == 0 and decision.k_for(1) == decision.k
    none = policy.choose([1, 2], caps={1: 0, 2: 0})
    assert none.k == 0 and none.reason_code == "capped"
    empty = policy.choose([])
    assert empty.k == 0 and empty.batch_size == 0 and empty.reason_code == "empty"


def test_overlap_model_hides_draft_time_but_charges_misses():
    est = trained_estimator([0.99] * 8)
    table = {"verify": [[1, n, 0.02] for n in range(1, 10)], "draft": [[1, 0.004]]}
    costs = StepCostModel.from_table(table)
    turns = GoodputPolicy(est, costs, 4, overlap=False, refine=False).choose([0])
    over = GoodputPolicy(est, costs, 4, overlap=True, refine=False).choose([0])
    c_turns = next(c for c in turns.candidates if c.k == 4)
    c_over = next(c for c in over.candidates if c.k == 4)
    assert c_turns.step_s == pytest.approx(0.02 + 4 * 0.004)
    assert 0.02 <= c_over.step_s < c_turns.step_s  # max(draft, verify) + a small miss penalty
    assert over.overlap and over.goodput > turns.goodput
    bad = trained_estimator([0.2] * 8)
    c_bad = next(c for c in GoodputPolicy(bad, costs, 4, overlap=True, refine=False).choose([0]).candidates if c.k == 4)
    assert c_bad.step_s > 0.02 + 0.9 * 4 * 0.004  # almost always a miss: the redraft is paid


def test_resuming_a_stale_draft_must_pay_for_its_catch_up():
    """k > 0 for requests the draft sat out first costs the draft's catch-up on the tokens it missed,
    amortised over RESUME_HORIZON steps (fewer when the requests are nearly done): a modest gain
    does not pay for re-prefilling whole prompts, while a few missed tokens change nothing."""
    from cluster.speculation_policy import RESUME_HORIZON

    est = trained_estimator([0.35] * 8)
    costs = StepCostModel.from_table(flat_verify_table())
    ids = list(range(4))
    fresh = GoodputPolicy(est, costs, 4, explore_every=0).choose(ids, {r: 100 for r in ids})
    assert fresh.k > 0 and fresh.chosen.resume_s == 0.0
    few = GoodputPolicy(est, costs, 4, explore_every=0).choose(ids, {r: 100 for r in ids}, dict.fromkeys(ids, 3))
    assert few.k == fresh.k and 0.0 < few.chosen.resume_s < 0.05 * few.chosen.step_s
    for _ in range(4):  # the draft's measured catch-up: 0.2 s for 4 prompts of 500 tokens
        costs.observe_catch_up(2000, 0.2)
    assert costs.catch_up_time(2000) == pytest.approx(0.2, rel=0.1) and costs.catch_up_time(0) == 0.0
    stale = GoodputPolicy(est, costs, 4, explore_every=0).choose(ids, {r: 100 for r in ids}, dict.fromkeys(ids, 500))
    assert stale.k == 0, stale.reason
    on = next(c for c in stale.candidates if c.k == fresh.k)
    assert on.resume_s == pytest.approx(costs.catch_up_time(2000) / RESUME_HORIZON, rel=0.05)
    # two tokens left each: the catch-up is amortised over a step or two, not RESUME_HORIZON
    end = GoodputPolicy(est, costs, 4, explore_every=0).choose(ids, dict.fromkeys(ids, 2), dict.fromkeys(ids, 500))
    assert next(c for c in end.candidates if c.k == 1).resume_s > 3 * on.resume_s


def test_explore_probes_skip_requests_with_long_catch_ups():
    """A probe (every explore_every decisions) drafts only for requests the draft is nearly current
    on, or for the single cheapest one: learning never costs a batch of prompt prefills."""
    from cluster.speculation_policy import PROBE_BUDGET, PROBE_RESUME_TOKENS

    est = trained_estimator([0.01] * 8)
    costs = StepCostModel.from_table(flat_verify_table())
    ids = list(range(4))
    resume = {0: 400, 1: 3, 2: PROBE_RESUME_TOKENS + 1, 3: 0}
    probe = GoodputPolicy(est, costs, 4, explore_every=1).choose(ids, None, resume)
    assert probe.reason_code == "explore" and probe.k == 1
    assert probe.per_request == {0: 0, 1: 1, 2: 0, 3: 1}
    # every request needs a long catch-up: the cheapest one probes, once its catch-up is at most
    # PROBE_BUDGET of the (predicted) time since the last probe
    policy = GoodputPolicy(est, costs, 4, explore_every=1)
    costly = {0: 900, 1: 700, 2: 800, 3: 650}
    decisions = [policy.choose(ids, None, costly) for _ in range(400)]
    first = next(i for i, d in enumerate(decisions) if d.reason_code == "explore")
    waited = sum(d.step_s for d in decisions[: first + 1])
    assert costs.catch_up_time(650) <= PROBE_BUDGET * waited < costs.catch_up_time(650) + PROBE_BUDGET * 0.03
    assert first > 1 and decisions[first].per_request == {0: 0, 1: 0, 2: 0, 3: 1}


def test_hysteresis_keeps_previous_k_when_nearly_as_good():
    est = trained_estimator([0.9] * 8)
    policy = GoodputPolicy(est, StepCostModel.from_table(flat_verify_table()), 8, hysteresis=0.5)
    first = policy.choose(range(4))
    policy._last_k = first.k - 1
    second = policy.choose(range(4))
    assert second.k == first.k - 1 and "kept" in second.reason


def test_fixed_policy_same_interface():
    est = trained_estimator([0.8] * 8)
    costs = StepCostModel.from_table(flat_verify_table())
    plain = FixedPolicy(4).choose(["x", "y"], caps={"y": 2})
    assert plain.k == 4 and plain.per_request == {"x": 4, "y": 2} and plain.reason_code == "fixed"
    assert plain.chosen is None and plain.goodput == 0.0
    predicted = FixedPolicy(4, est, costs).choose(["x"])
    assert predicted.goodput > 0 and "predicted goodput" in predicted.reason
    assert FixedPolicy(0).choose([1]).per_request == {1: 0}


def test_policy_validates():
    est = AcceptanceEstimator(4)
    with pytest.raises(ValueError):
        GoodputPolicy(est, StepCostModel(), max_draft_tokens=5)
    with pytest.raises(ValueError):
        GoodputPolicy(est, StepCostModel(), max_draft_tokens=2, min_draft_tokens=3)


def true_goodput(batch, k, alpha, verify, draft_per_token):
    return batch * expected_tokens([alpha] * k, k) / (k * draft_per_token + verify(batch * (k + 1)))


def run_closed_loop(policy, est, costs, batch, alpha, verify, draft_per_token, steps, seed=5):
    """The engine's loop against a simulated system; returns the k chosen in the last 20 steps."""
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(steps):
        decision = policy.choose(range(batch))
        for r, k in decision.per_request.items():
            est.observe(r, k, simulate_chain(rng, [alpha] * k, k))
        n = 1 + sum(decision.per_request.values()) / batch
        costs.observe_verify(batch, n, verify(batch * n) * float(rng.uniform(0.97, 1.03)))
        if decision.draft_levels:
            costs.observe_draft(batch, decision.draft_levels, decision.draft_levels * draft_per_token)
        if decision.reason_code != "explore":
            chosen.append(decision.k)
    return chosen[-20:]


@pytest.mark.parametrize("case", ["compute_bound_large_batch", "memory_bound_small_batch"])
def test_closed_loop_recovers_from_a_wrong_prior(case):
    alpha, draft_per_token = 0.8, 0.001
    if case == "compute_bound_large_batch":  # prior says verification is free; it is not
        batch, verify = 64, lambda t: 0.002 + 0.0004 * t
        costs = StepCostModel(fixed_s=0.02, knee_tokens=1e6)
    else:  # prior says every token costs; in truth verification is flat
        batch, verify = 4, lambda t: 0.02 + 1e-6 * t
        costs = StepCostModel(fixed_s=0.02, knee_tokens=1.0)
    est = AcceptanceEstimator(8, prior=0.5)
    policy = GoodputPolicy(est, costs, max_draft_tokens=8, explore_every=10)
    last = run_closed_loop(policy, est, costs, batch, alpha, verify, draft_per_token, steps=250)
    best = max(true_goodput(batch, k, alpha, verify, draft_per_token) for k in range(9))
    achieved = np.mean([true_goodput(batch, k, alpha, verify, draft_per_token) for k in last])
    assert achieved >= 0.9 * best, (case, last)
    if case == "compute_bound_large_batch":
        assert max(last) <= 1
    else:
        assert min(last) >= 3


class _CountingPolicy:
    """Gives every request k and counts how often the engine's control really decided."""

    def __init__(self, k: int) -> None:
        self.k, self.calls, self.resume = k, 0, None

    def choose(self, req_ids, caps=None, resume=None):
        self.calls += 1
        self.resume = resume
        ids = list(req_ids)
        return SpecDecision(self.k, dict.fromkeys(ids, self.k), len(ids), (), "test", "goodput")


def _control(k: int):
    from cluster.config import ClusterConfig
    from cluster.speculation import SpeculationControl

    control = SpeculationControl(ClusterConfig(target="unused", draft="self:1", num_draft_tokens=4))
    control.policy = _CountingPolicy(k)
    return control


def test_control_reuses_a_decision_for_the_same_running_set_only_while_speculating():
    from cluster.speculation import REDECIDE_EVERY

    control = _control(3)
    ids = list(range(8))
    for _ in range(REDECIDE_EVERY):
        assert control.choose(ids, {}).k_for(0) == 3
    assert control.policy.calls == 1
    control.choose(ids, {})
    assert control.policy.calls == 2  # the reuse limit
    control.choose(ids[1:] + [99], {})  # a finished and a new request: decide afresh
    assert control.policy.calls == 3


def test_control_keeps_speculation_off_across_arrivals_in_the_same_size_class():
    """Under load requests come and go nearly every step; an "off" decision holds for any running
    set of the same power-of-two size (a request it does not name gets k = 0) up to its limit."""
    from cluster.speculation import REDECIDE_OFF_EVERY, REUSE_OFF_FROM

    control = _control(0)
    for step in range(REDECIDE_OFF_EVERY):
        ids = list(range(step, step + 30))  # 30 running, one leaves and one arrives each step
        assert control.choose(ids, {}).k_for(step + 29) == 0
    assert control.policy.calls == 1
    control.choose(list(range(100, 130)), {})
    assert control.policy.calls == 2  # the reuse limit
    control.choose(list(range(100, 110)), {})
    assert control.policy.calls == 3  # another size class (9-16)
    small = list(range(REUSE_OFF_FROM - 1))
    control.choose(small, {})
    control.choose([s + 1000 for s in small], {})
    assert control.policy.calls == 5  # small batches re-decide on every change


def test_control_says_which_batch_sizes_are_expected_to_draft():
    """Arrivals at an idle engine skip the draft's prefill only where the latest fresh decision for
    their size class turned speculation off for goodput; unknown sizes and fixed k expect drafting."""
    control = _control(0)
    assert control.expects_drafting(8)  # nothing decided yet
    control.choose(list(range(8)), {})
    assert not control.expects_drafting(8) and not control.expects_drafting(5)  # class 5-8
    assert control.expects_drafting(9) and control.expects_drafting(1)
    control.policy = _CountingPolicy(2)
    control.forget(0)  # a finished request: the next decision is fresh (an "off" one is reused otherwise)
    control.choose(list(range(100, 106)), {})
    assert control.expects_drafting(8)  # the class's latest decision drafts again
    fixed = _control(0)
    fixed.policy.choose = lambda ids, caps, resume=None: SpecDecision(0, dict.fromkeys(ids, 0), len(ids), (), "k = 0", "fixed")
    fixed.choose([1, 2], {})
    assert fixed.expects_drafting(2)  # only a goodput decision turns the prefill off


def test_control_forwards_catch_ups_and_learns_their_cost():
    """The engine's missed-token counts reach the policy; a draft reply that began with a long
    catch-up is a sample of the catch-up curve (and not of the drafting curve)."""
    control = _control(2)
    control.choose([1, 2], {1: 9, 2: 9}, {2: 40})
    assert control.policy.resume == {2: 40}
    control.observe_costs(0, 0, None, {"batch": 2, "levels": 2, "hits": 0, "propose_s": 0.0,
                                       "catch_up_tokens": 300, "catch_up_s": 0.05})
    assert control.costs.num_observations == {"verify": 0, "draft": 0, "catch_up": 1}
    assert control.costs.catch_up_time(300) == pytest.approx(0.05, rel=0.35)


def test_control_never_reuses_an_explore_probe():
    """A probe is one step's experiment: the next step of the same running set decides afresh."""
    control = _control(1)
    probe = SpecDecision(1, {0: 1, 1: 1}, 2, (), "explore k=1", "explore")
    control.policy.choose = lambda ids, caps=None, resume=None: probe
    assert control.choose([0, 1], {}) is probe
    control.policy = _CountingPolicy(0)
    control.choose([0, 1], {})
    assert control.policy.calls == 1
