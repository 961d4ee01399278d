"""Engine metrics: a registry per engine, Prometheus text, snapshot (no Ray)."""

import pytest

from cluster.metrics import CONTENT_TYPE, EngineMetrics
from cluster.speculation_policy import (
    AcceptanceEstimator,
    FixedPolicy,
    GoodputPolicy,
    StepCostModel,
)

NAMES = [
    "outrider_requests_total", "outrider_requests_running", "outrider_requests_waiting",
    "outrider_kv_cache_usage_ratio", "outrider_time_to_first_token_seconds",
    "outrider_time_per_output_token_seconds", "outrider_prompt_tokens_total", "outrider_generation_tokens_total",
    "outrider_draft_tokens_proposed_total", "outrider_draft_tokens_accepted_total",
    "outrider_spec_position_tested_total", "outrider_spec_position_accepted_total",
    "outrider_spec_acceptance_rate", "outrider_spec_mean_accepted_length", "outrider_spec_num_draft_tokens",
    "outrider_spec_expected_goodput_tokens_per_second", "outrider_spec_predicted_step_seconds",
    "outrider_spec_expected_tokens_per_step", "outrider_spec_decision_info", "outrider_verify_step_seconds",
    "outrider_draft_step_seconds", "outrider_draft_worker_up", "outrider_engine_steps_total",
    "outrider_overlap_extended_total", "outrider_draft_link_round_trip_seconds",
    "outrider_draft_propose_wall_seconds_total", "outrider_graph_captures_total",
    "outrider_graph_capture_seconds_total", "outrider_target_run_ahead_total", "outrider_spec_steps_total",
]


def goodput_decision(batch=4):
    est = AcceptanceEstimator(4, prior=0.8)
    table = {"verify": [[1, n, 0.02] for n in range(1, 6)], "draft": [[1, 0.002]]}
    return GoodputPolicy(est, StepCostModel.from_table(table), max_draft_tokens=4).choose(range(batch))


def test_render_contains_every_metric():
    m = EngineMetrics(max_draft_tokens=4)
    m.on_step(goodput_decision(), verify_s=0.02, draft_s=0.008, outcomes=[(4, 2)])
    m.on_request_finished("finished", "stop", 0.1, 0.01, 12, 30)
    m.set_queue(3, 1)
    m.set_draft_up(True)
    text = m.render().decode()
    for name in NAMES:
        assert name in text, name
    assert "text/plain" in CONTENT_TYPE


def test_values_change():
    m = EngineMetrics(max_draft_tokens=4)
    assert m.get("outrider_engine_steps_total") == 0.0
    m.on_request_finished("finished", "length", ttft_s=0.2, tpot_s=0.02, prompt_tokens=10, generated_tokens=5)
    m.on_request_finished("aborted", None, ttft_s=None, tpot_s=None, prompt_tokens=7, generated_tokens=0)
    m.on_request_finished("failed", None, ttft_s=0.5, tpot_s=None, prompt_tokens=3, generated_tokens=1)
    assert m.get("outrider_requests_total", status="finished", finish_reason="length") == 1.0
    assert m.get("outrider_requests_total", status="aborted", finish_reason="none") == 1.0
    assert m.get("outrider_prompt_tokens_total") == 20.0
    assert m.get("outrider_generation_tokens_total") == 6.0
    assert m.get("outrider_time_to_first_token_seconds_count") == 2.0
    assert m.get("outrider_time_per_output_token_seconds_sum") == pytest.approx(0.02)

    m.set_queue(running=5, waiting=2)
    m.set_kv_usage("target", 0.25)
    m.set_kv_usage("draft", 1.7)  # clamped
    m.set_draft_up(False)
    snap = m.snapshot()
    assert snap["outrider_requests_running"] == 5.0 and snap["outrider_requests_waiting"] == 2.0
    assert snap["outrider_kv_cache_usage_ratio"] == {"role=draft": 1.0, "role=target": 0.25}
    assert snap["outrider_draft_worker_up"] == 0.0
    m.set_draft_up(True, link_rtt_s=0.0004)
    assert m.get("outrider_draft_worker_up") == 1.0
    assert m.get("outrider_draft_link_round_trip_seconds") == pytest.approx(0.0004)


def test_on_step_counts_tested_positions_only():
    m = EngineMetrics(max_draft_tokens=4)
    # (4, 1): positions 1, 2 tested (2 rejected), 3, 4 untested; (3, 3): all tested, all accepted;
    # (0, 0): a request without drafts still commits one token
    m.on_step(None, verify_s=0.03, outcomes=[(4, 1), (3, 3), (0, 0)])
    assert m.get("outrider_draft_tokens_proposed_total") == 7.0
    assert m.get("outrider_draft_tokens_accepted_total") == 4.0
    tested = m.snapshot()["outrider_spec_position_tested_total"]
    assert tested == {"position=1": 2.0, "position=2": 2.0, "position=3": 1.0}
    assert m.get("outrider_spec_position_accepted_total", position="2") == 1.0
    assert m.get("outrider_spec_acceptance_rate", position="1") == 1.0
    assert m.get("outrider_spec_acceptance_rate", position="2") == 0.5
    assert m.get("outrider_spec_acceptance_rate", position="4") is None
    assert m.get("outrider_spec_mean_accepted_length") == pytest.approx((2 + 4 + 1) / 3)
    assert m.get("outrider_verify_step_seconds_count") == 1.0
    assert m.get("outrider_draft_step_seconds_count") == 0.0
    with pytest.raises(ValueError):
        m.on_step(None, outcomes=[(2, 3)])


def test_recent_acceptance_follows_a_change():
    m = EngineMetrics(max_draft_tokens=2, window_decay=0.9)
    for _ in range(100):
        m.on_step(None, outcomes=[(2, 2)])
    for _ in range(100):
        m.on_step(None, outcomes=[(2, 0)])
    assert m.get("outrider_spec_acceptance_rate", position="1") < 0.01
    # the counters keep the whole history
    assert m.get("outrider_spec_position_accepted_total", position="1") == 100.0


def test_decision_metrics_and_snapshot():
    m = EngineMetrics(max_draft_tokens=4)
    decision = goodput_decision()
    m.on_step(decision, verify_s=0.021, draft_s=0.007, outcomes=[(decision.k, 1)] * 4)
    assert m.get("outrider_spec_expected_goodput_tokens_per_second") == pytest.approx(decision.goodput)
    assert m.get("outrider_spec_predicted_step_seconds") == pytest.approx(decision.step_s)
    assert m.get("outrider_spec_num_draft_tokens_count") == 1.0
    assert m.get("outrider_spec_num_draft_tokens_sum") == decision.k
    info = m.snapshot()["outrider_spec_decision_info"]
    assert info == {f"k={decision.k},overlap=false,reason_code=goodput": 1.0}
    snap = m.snapshot()
    assert snap["last_decision"]["reason"] == decision.reason and "tok/s" in decision.reason
    assert snap["outrider_engine_steps_total"] == 1.0
    assert not any(key.endswith("_created") for key in snap)

    fixed = FixedPolicy(2).choose([1, 2])
    m.on_step(fixed)
    assert m.snapshot()["outrider_spec_decision_info"] == {"k=2,overlap=false,reason_code=fixed": 1.0}
    # no prediction for a fixed policy without a cost model: the goodput gauge keeps its last value
    assert m.get("outrider_spec_expected_goodput_tokens_per_second") == pytest.approx(decision.goodput)


def test_engines_do_not_share_a_registry():
    a, b = EngineMetrics(), EngineMetrics()
    a.on_step(None)
    assert a.get("outrider_engine_steps_total") == 1.0
    assert b.get("outrider_engine_steps_total") == 0.0


def test_validation():
    m = EngineMetrics()
    with pytest.raises(ValueError):
        m.on_request_finished("done", "stop", None, None, 1, 1)
    with pytest.raises(ValueError):
        m.set_kv_usage("cpu", 0.5)


def test_graph_captures_and_the_drafts_real_time_are_counted_per_role():
    """A worker's reply names the CUDA graphs it captured during the step: counted per role, with
    their seconds; the draft's proposal wall time counts also when it is no cost sample."""
    m = EngineMetrics(max_draft_tokens=4)
    m.on_draft_step({"propose_s": 0.0, "speculate_s": 0.001, "propose_wall_s": 0.03, "captures": 2,
                     "capture_s": 0.025})
    m.on_draft_step({"propose_s": 0.002, "speculate_s": 0.0, "propose_wall_s": 0.002})
    m.on_graph_captures("target", 1, 0.09)
    m.on_graph_captures("target", 0, 0.0)
    snap = m.snapshot()
    assert snap["outrider_graph_captures_total"] == {"role=target": 1.0, "role=draft": 2.0}
    assert snap["outrider_graph_capture_seconds_total"]["role=draft"] == pytest.approx(0.025)
    assert snap["outrider_graph_capture_seconds_total"]["role=target"] == pytest.approx(0.09)
    assert snap["outrider_draft_propose_wall_seconds_total"] == pytest.approx(0.032)
    with pytest.raises(ValueError, match="role"):
        m.on_graph_captures("router", 1, 0.1)


def test_step_phases_add_up_per_role_and_refuse_unknown_names():
    """The step profile: seconds per (role, phase), from the engine's own phases and the workers'
    replies (a draft reply carries its phases); a misspelt phase or role is an error, not a new series."""
    m = EngineMetrics()
    m.on_phases("engine", {"plan": 0.001, "wait": 0.02})
    m.on_phases("engine", {"plan": 0.002, "wait": 0.0, "between": 0.0005})
    m.on_phases("target", None)  # a run-ahead reply carries none
    m.on_draft_step({"propose_s": 0.004, "phases": {"recv_tokens": 0.0001, "propose": 0.004, "send": 0.0002}})
    phases = m.snapshot()["outrider_step_phase_seconds_total"]
    assert phases["phase=plan,role=engine"] == pytest.approx(0.003)
    assert phases["phase=wait,role=engine"] == pytest.approx(0.02)
    assert phases["phase=propose,role=draft"] == pytest.approx(0.004)
    assert phases["phase=verify,role=target"] == 0.0  # every phase is exposed from the start
    with pytest.raises(ValueError, match="no step phase 'forward'"):
        m.on_phases("target", {"forward": 0.01})
    with pytest.raises(ValueError, match="role"):
        m.on_phases("router", {"plan": 0.01})
