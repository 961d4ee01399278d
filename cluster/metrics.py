"""Engine metrics in Prometheus form (control plane, pure Python).

Each ``EngineMetrics`` owns its own ``CollectorRegistry`` (never the process-global one), so
several engines — or tests — in one process keep separate numbers. The engine calls its methods
from the step loop; ``render()`` gives the Prometheus text exposition (for a ``/metrics``
endpoint, content type ``CONTENT_TYPE``) and ``snapshot()`` a plain dict for tests and the CLI.

Metrics (all prefixed ``outrider_``):

=============================================  =========  ==============================================
name                                           type       meaning
=============================================  =========  ==============================================
requests_total{status, finish_reason}          counter    finished requests; status finished|aborted|failed
requests_running, requests_waiting             gauge      scheduler queues
kv_cache_usage_ratio{role}                     gauge      used fraction of the KV cache, role target|draft
time_to_first_token_seconds                    histogram  TTFT per request
time_per_output_token_seconds                  histogram  TPOT per request (decode time / (tokens - 1))
prompt_tokens_total, generation_tokens_total   counter    tokens in and out
draft_tokens_proposed_total                    counter    draft tokens sent to verification
draft_tokens_accepted_total                    counter    of those, accepted
spec_position_tested_total{position}           counter    draft position reached by verification (1 = first)
spec_position_accepted_total{position}         counter    ... and accepted
spec_acceptance_rate{position}                 gauge      recent conditional acceptance rate by position
spec_mean_accepted_length                      gauge      recent tokens per verification, bonus included
spec_num_draft_tokens                          histogram  speculation length k chosen per step
spec_expected_goodput_tokens_per_second        gauge      the chosen k's predicted goodput
spec_predicted_step_seconds                    gauge      ... and predicted step time
spec_expected_tokens_per_step                  gauge      ... and expected tokens per step
spec_decision_info{k, reason_code, overlap}    info       the last decision (full reason: ``snapshot()``)
spec_steps_total{reason_code}                  counter    steps run with a decision of that reason (goodput|explore|...)
verify_step_seconds, draft_step_seconds        histogram  measured step times (draft: drafting + speculation)
engine_step_seconds                            histogram  wall time of an engine step at the control plane
overlap_speculations_total{outcome}            counter    overlap: pre-drafted chains used (hit) or dropped (miss)
draft_propose_wall_seconds_total               counter    draft proposals' wall time, catch-up prefills and captures included
graph_captures_total{role}                     counter    CUDA graphs captured by a worker (role target|draft) while serving
graph_capture_seconds_total{role}              counter    ... and the seconds they took (on the step's critical path)
target_run_ahead_total{outcome}                counter    target steps run ahead: used (answered at once) or discarded
step_phase_seconds_total{role, phase}          counter    where engine steps spend their time, by role engine|target|draft
                                                          and phase (``STEP_PHASES``): the step's profile
draft_ahead_used_total                         counter    draft chains drafted ahead that the next step used
draft_worker_up                                gauge      1 while the draft worker serves, else 0
engine_steps_total                             counter    engine steps
=============================================  =========  ==============================================

"Recent" gauges are exponentially weighted over steps (``window_decay`` per step, ≈ 50 steps by
default); the counters give exact long-run rates through PromQL ``rate()``. A draft position is
*tested* when every earlier position was accepted: after the first rejection nothing is counted,
as in ``cluster.speculation_policy.AcceptanceEstimator``. The decision's free-text reason is not
a label (its numbers would create a new series every step); the info metric carries its
``reason_code`` and ``snapshot()["last_decision"]`` the whole decision.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "KV_ROLES", "REQUEST_STATUSES", "STEP_PHASES", "EngineMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
REQUEST_STATUSES = ("finished", "aborted", "failed")
KV_ROLES = ("target", "draft")
RUN_AHEAD_OUTCOMES = ("used", "discarded")
# the phases of an engine step, by role (wall seconds; a target's "verify" holds the GPU time of its
# forward, which its launch does not wait for)
STEP_PHASES = {
    "engine": ("plan", "wait", "apply", "between"),  # choose k + send; until the target's reply; emit; loop
    "target": ("wait_proposals", "build", "launch", "verify", "commit", "emit"),
    "draft": ("recv_tokens", "propose", "send", "speculate", "ahead"),
}

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class EngineMetrics:
    """Metrics of one engine, in a registry of its own."""

    def __init__(self, *, max_draft_tokens: int = 16, window_decay: float = 0.98) -> None:
        if not 0.0 < window_decay < 1.0:
            raise ValueError(f"window_decay must be in (0, 1), got {window_decay}")
        self.registry = CollectorRegistry(auto_describe=True)
        self.window_decay = window_decay
        self.last_decision = None
        self._lock = threading.Lock()
        self._tested: list[float] = []  # decayed per-position counts for the "recent" gauges
        self._accepted: list[float] = []
        self._lengths = [0.0, 0.0]  # decayed sum of accepted lengths, decayed count
        r = self.registry

        self.requests = Counter("outrider_requests_total", "Finished requests by final status and finish reason.",
                                ["status", "finish_reason"], registry=r)
        self.running = Gauge("outrider_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("outrider_requests_waiting", "Requests waiting for admission.", registry=r)
        self.kv_usage = Gauge("outrider_kv_cache_usage_ratio", "Used fraction of the KV cache.", ["role"], registry=r)
        self.ttft = Histogram("outrider_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("outrider_time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("outrider_prompt_tokens_total", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("outrider_generation_tokens_total", "Generated tokens of finished requests.",
                                         registry=r)
        self.proposed = Counter("outrider_draft_tokens_proposed_total", "Draft tokens sent to verification.", registry=r)
        self.accepted = Counter("outrider_draft_tokens_accepted_total", "Draft tokens accepted.", registry=r)
        self.position_tested = Counter("outrider_spec_position_tested_total",
                                       "Verifications that reached draft position (1 = first draft token).",
                                       ["position"], registry=r)
        self.position_accepted = Counter("outrider_spec_position_accepted_total",
                                         "Verifications that accepted draft position (1 = first draft token).",
                                         ["position"], registry=r)
        self.acceptance_rate = Gauge("outrider_spec_acceptance_rate",
                                     "Recent conditional acceptance rate by draft position (1 = first).",
                                     ["position"], registry=r)
        self.mean_accepted_length = Gauge("outrider_spec_mean_accepted_length",
                                          "Recent tokens committed per verification, bonus token included.", registry=r)
        self.num_draft_tokens = Histogram("outrider_spec_num_draft_tokens", "Speculation length k chosen per step.",
                                          buckets=tuple(float(k) for k in range(max_draft_tokens + 1)), registry=r)
        self.expected_goodput = Gauge("outrider_spec_expected_goodput_tokens_per_second",
                                      "Predicted goodput of the chosen speculation length.", registry=r)
        self.predicted_step = Gauge("outrider_spec_predicted_step_seconds",
                                    "Predicted step time of the chosen speculation length.", registry=r)
        self.expected_tokens = Gauge("outrider_spec_expected_tokens_per_step",
                                     "Expected tokens per step of the chosen speculation length.", registry=r)
        self.decision_info = Info("outrider_spec_decision", "The last speculation decision.", registry=r)
        self.decision_steps = Counter("outrider_spec_steps_total",
                                      "Engine steps run with a speculation decision, by its reason code.",
                                      ["reason_code"], registry=r)
        self.verify_step = Histogram("outrider_verify_step_seconds", "Measured target verify step time.",
                                     buckets=_STEP_BUCKETS, registry=r)
        self.draft_step = Histogram("outrider_draft_step_seconds", "Measured draft step time (all levels).",
                                    buckets=_STEP_BUCKETS, registry=r)
        self.engine_step = Histogram("outrider_engine_step_seconds",
                                     "Wall time of one engine step at the control plane (issue to reply).",
                                     buckets=_STEP_BUCKETS, registry=r)
        self.overlap_speculations = Counter(
            "outrider_overlap_speculations_total",
            "Overlap: chains pre-drafted during verification that were used (hit) or dropped (miss).",
            ["outcome"], registry=self.registry)
        self.overlap_extended = Counter(
            "outrider_overlap_extended_total",
            "Overlap: hits whose pre-drafted chain was shorter than asked (bounded by the verify time) and "
            "was extended after the hit.", registry=r)
        self.draft_propose_wall = Counter(
            "outrider_draft_propose_wall_seconds_total",
            "Draft: wall time of its proposals, catch-up prefills and graph captures included (the draft step "
            "histogram keeps cost samples only).", registry=r)
        self.graph_captures = Counter("outrider_graph_captures_total",
                                      "CUDA graphs a worker captured while serving (a bucket met for the first time).",
                                      ["role"], registry=r)
        self.graph_capture_seconds = Counter("outrider_graph_capture_seconds_total",
                                             "Seconds of those captures, spent on the step's critical path.",
                                             ["role"], registry=r)
        self.run_ahead = Counter("outrider_target_run_ahead_total",
                                 "Target steps run ahead while the engine handled the previous reply: used (the "
                                 "engine's next step was that one) or discarded (undone; the step ran as usual).",
                                 ["outcome"], registry=r)
        self.draft_ahead_used = Counter("outrider_draft_ahead_used_total",
                                        "Draft chains drafted ahead (as the target's tokens arrived) that the next "
                                        "step sent as drafted.", registry=r)
        self.draft_up = Gauge("outrider_draft_worker_up", "1 while the draft worker serves, else 0.", registry=r)
        self.draft_link_rtt = Gauge("outrider_draft_link_round_trip_seconds",
                                    "Draft link: one proposal-sized message there and back, timed when it was formed.",
                                    registry=r)
        self.steps = Counter("outrider_engine_steps_total", "Engine steps.", registry=r)
        self.step_phase = Counter("outrider_step_phase_seconds_total",
                                  "Wall seconds of engine steps by role (engine|target|draft) and phase.",
                                  ["role", "phase"], registry=r)

        for status in REQUEST_STATUSES:  # expose zeros, so rates exist before the first event
            self.requests.labels(status=status, finish_reason="none")
        for role in KV_ROLES:
            self.kv_usage.labels(role=role).set(0.0)
            self.graph_captures.labels(role=role)
            self.graph_capture_seconds.labels(role=role)
        for outcome in RUN_AHEAD_OUTCOMES:
            self.run_ahead.labels(outcome=outcome)
        for role, phases in STEP_PHASES.items():
            for phase in phases:
                self.step_phase.labels(role=role, phase=phase)

    # ------------------------------------------------------------------ engine calls

    def on_request_finished(self, status: str, finish_reason: str | None, ttft_s: float | None,
                            tpot_s: float | None, prompt_tokens: int, generated_tokens: int) -> None:
        """A request left the engine. ``ttft_s`` / ``tpot_s`` are None when not measured (e.g. aborted early)."""
        if status not in REQUEST_STATUSES:
            raise ValueError(f"status must be one of {REQUEST_STATUSES}, got {status!r}")
        self.requests.labels(status=status, finish_reason=finish_reason or "none").inc()
        if ttft_s is not None:
            self.ttft.observe(max(0.0, ttft_s))
        if tpot_s is not None:
            self.tpot.observe(max(0.0, tpot_s))
        self.prompt_tokens.inc(max(0, prompt_tokens))
        self.generation_tokens.inc(max(0, generated_tokens))

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def set_kv_usage(self, role: str, fraction: float) -> None:
        if role not in KV_ROLES:
            raise ValueError(f"role must be one of {KV_ROLES}, got {role!r}")
        self.kv_usage.labels(role=role).set(min(1.0, max(0.0, fraction)))

    def set_draft_up(self, up: bool, link_rtt_s: float | None = None) -> None:
        self.draft_up.set(1.0 if up else 0.0)
        if up and link_rtt_s is not None:
            self.draft_link_rtt.set(link_rtt_s)

    def on_draft_step(self, stats: dict) -> None:
        """One draft worker step: its reply (``propose_s``, ``speculate_s``, ``hits``, ``misses``)."""
        self.draft_step.observe(max(0.0, stats.get("propose_s", 0.0) + stats.get("speculate_s", 0.0)))
        for key, outcome in (("hits", "hit"), ("misses", "miss")):
            if stats.get(key):
                self.overlap_speculations.labels(outcome=outcome).inc(stats[key])
        if stats.get("extended"):
            self.overlap_extended.inc(stats["extended"])
        if stats.get("ahead_used"):
            self.draft_ahead_used.inc(stats["ahead_used"])
        if stats.get("propose_wall_s"):
            self.draft_propose_wall.inc(max(0.0, stats["propose_wall_s"]))
        self.on_graph_captures("draft", stats.get("captures", 0), stats.get("capture_s", 0.0))
        self.on_phases("draft", stats.get("phases"))

    def on_graph_captures(self, role: str, count: int, seconds: float) -> None:
        """A worker (``role`` target|draft) captured ``count`` CUDA graphs in a step, taking ``seconds``."""
        if role not in KV_ROLES:
            raise ValueError(f"role must be one of {KV_ROLES}, got {role!r}")
        if count:
            self.graph_captures.labels(role=role).inc(count)
            self.graph_capture_seconds.labels(role=role).inc(max(0.0, seconds))

    def on_phases(self, role: str, phases: dict | None) -> None:
        """Seconds a step spent in each phase of ``role`` (``STEP_PHASES``); unknown phases are refused."""
        if role not in STEP_PHASES:
            raise ValueError(f"role must be one of {tuple(STEP_PHASES)}, got {role!r}")
        for phase, seconds in (phases or {}).items():
            if phase not in STEP_PHASES[role]:
                raise ValueError(f"{role} has no step phase {phase!r}; phases: {STEP_PHASES[role]}")
            if seconds:
                self.step_phase.labels(role=role, phase=phase).inc(max(0.0, float(seconds)))

    def on_run_ahead(self, used: int, discarded: int) -> None:
        """The target's reply said its step was run ahead (``used``) or a run-ahead was undone."""
        if used:
            self.run_ahead.labels(outcome="used").inc(used)
        if discarded:
            self.run_ahead.labels(outcome="discarded").inc(discarded)

    def on_step(self, decision=None, *, verify_s: float | None = None, draft_s: float | None = None,
                outcomes: Iterable[tuple[int, int]] = (), step_s: float | None = None) -> None:
        """One engine step.

        decision   the ``SpecDecision`` the step ran with (or None)
        verify_s   measured seconds of the target's verify call, draft_s of the draft's (None: not run)
        outcomes   per verified request, ``(num_proposed, num_accepted)``: the first ``num_accepted``
                   of ``num_proposed`` draft tokens were accepted ((0, 0) for a request without drafts)
        """
        self.steps.inc()
        if step_s is not None:
            self.engine_step.observe(max(0.0, step_s))
        if verify_s is not None:
            self.verify_step.observe(max(0.0, verify_s))
        if draft_s is not None:
            self.draft_step.observe(max(0.0, draft_s))
        if decision is not None:
            self.last_decision = decision
            self.num_draft_tokens.observe(decision.k)
            self.decision_steps.labels(reason_code=decision.reason_code).inc()
            if decision.chosen is not None:
                self.expected_goodput.set(decision.goodput)
                self.predicted_step.set(decision.step_s)
                self.expected_tokens.set(decision.expected_tokens)
            self.decision_info.info({"k": str(decision.k), "reason_code": decision.reason_code,
                                     "overlap": str(bool(decision.overlap)).lower()})
        self._record_outcomes(list(outcomes))

    def _record_outcomes(self, outcomes: list[tuple[int, int]]) -> None:
        proposed = accepted = 0
        tested_now: list[int] = []
        accepted_now: list[int] = []
        for num_proposed, num_accepted in outcomes:
            if not 0 <= num_accepted <= num_proposed:
                raise ValueError(f"need 0 <= num_accepted <= num_proposed, got {num_accepted}, {num_proposed}")
            proposed += num_proposed
            accepted += num_accepted
            tested = num_proposed if num_accepted == num_proposed else num_accepted + 1
            for counts, upto in ((tested_now, tested), (accepted_now, num_accepted)):
                counts.extend([0] * (upto - len(counts)))
                for j in range(upto):
                    counts[j] += 1
        if proposed:
            self.proposed.inc(proposed)
        if accepted:
            self.accepted.inc(accepted)
        for j, n in enumerate(tested_now):
            self.position_tested.labels(position=str(j + 1)).inc(n)
        for j, n in enumerate(accepted_now):
            self.position_accepted.labels(position=str(j + 1)).inc(n)
        with self._lock:
            d = self.window_decay
            depth = max(len(self._tested), len(tested_now))
            self._tested.extend([0.0] * (depth - len(self._tested)))
            self._accepted.extend([0.0] * (depth - len(self._accepted)))
            for j in range(depth):
                self._tested[j] = d * self._tested[j] + (tested_now[j] if j < len(tested_now) else 0)
                self._accepted[j] = d * self._accepted[j] + (accepted_now[j] if j < len(accepted_now) else 0)
                if self._tested[j] > 1e-9:
                    self.acceptance_rate.labels(position=str(j + 1)).set(self._accepted[j] / self._tested[j])
            self._lengths[0] = d * self._lengths[0] + sum(a + 1 for _, a in outcomes)
            self._lengths[1] = d * self._lengths[1] + len(outcomes)
            if self._lengths[1] > 1e-9:
                self.mean_accepted_length.set(self._lengths[0] / self._lengths[1])

    # ------------------------------------------------------------------ export

    def render(self) -> bytes:
        """Prometheus text exposition of this engine's registry."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """Every sample as ``{name: value}`` or, for labelled samples, ``{name: {"k=v,k2=v2": value}}``
        (labels sorted by name; ``*_created`` timestamps left out), plus ``"last_decision"``: the
        last ``SpecDecision.as_dict()`` or None."""
        out: dict = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name.endswith("_created"):
                    continue
                if sample.labels:
                    key = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    out.setdefault(sample.name, {})[key] = sample.value
                else:
                    out[sample.name] = sample.value
        out["last_decision"] = self.last_decision.as_dict() if self.last_decision is not None else None
        return out

    def get(self, name: str, **labels: str) -> float | None:
        """One sample's value (None when absent), e.g. ``get("outrider_requests_total", status="failed",
        finish_reason="none")``."""
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and sample.labels == {k: str(v) for k, v in labels.items()}:
                    return sample.value
        return None
