"""The engine's speculation controller: one policy, its acceptance estimates and cost model (control plane).

``SpeculationControl`` binds the pieces of ``cluster.speculation_policy`` to one engine:
``choose`` before a step (per-request caps: the tokens a request may still emit and its room in
the context; per-request tokens the draft would first have to catch up on), ``observe_verdict``
per request and ``observe_costs`` per step after it. Measured costs only: the target's own forward
time (not its wait for proposals), the draft's drafting time, each at the batch size it ran with,
and the draft's catch-up time for the missed tokens it fed (calls that began with a long one).

Invariants: with ``adaptive=False`` every request gets ``num_draft_tokens`` (capped); the
estimates keep learning either way, so the metrics show acceptance and predicted goodput even for
a fixed policy; a finished request is forgotten.

Cost of deciding: a full decision evaluates every k with numpy (about 1 ms on the 2-core CI
machine, a visible share of a small model's step), while acceptance rates and step costs move
slowly. So a decision is reused for the same set of running requests for up to ``REDECIDE_EVERY``
steps (the engine still caps each request's k by what it may emit); a new or finished request, or
the limit, triggers a fresh one; an explore probe is never reused (it is one step's experiment:
reused, each probe drafted for 8 steps, and on an H100 a repetition with one cost 20% of its
throughput). A decision that turned speculation off (k = 0 for every request)
is reused for any running set of at least ``REUSE_OFF_FROM`` requests in the same power-of-two
size class, for up to ``REDECIDE_OFF_EVERY`` steps: under load requests come and go nearly every
step, and re-deciding "off" each time cost the engine more than the decision is worth (a request
the decision does not name gets k = 0). ``expects_drafting`` remembers, per size class, whether
the latest fresh decision was "off", so arrivals at an idle engine skip the draft's prefill then.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from cluster.config import ClusterConfig
from cluster.speculation_policy import (
    AcceptanceEstimator,
    FixedPolicy,
    GoodputPolicy,
    SpecDecision,
    StepCostModel,
)


REDECIDE_EVERY = 8
REDECIDE_OFF_EVERY = 32
REUSE_OFF_FROM = 4  # smaller batches re-decide as usual: cheap, and exploration there is what finds k > 0


def _size_class(n: int) -> int:
    """Power-of-two class of a batch size (1, 2, 3-4, 5-8, ...)."""
    return max(0, n - 1).bit_length()


class SpeculationControl:
    def __init__(self, config: ClusterConfig) -> None:
        k = config.num_draft_tokens if config.has_draft else 0
        self.max_draft_tokens = k
        self.estimator = AcceptanceEstimator(max(k, 1))
        self.costs = StepCostModel.from_table(config.cost_table) if config.cost_table else StepCostModel()
        # colocated draft and target share one GPU: their work adds up even with overlap
        overlap = config.overlap and not config.colocate
        if config.adaptive and k > 0:
            self.policy = GoodputPolicy(self.estimator, self.costs, k, overlap=overlap)
        else:
            self.policy = FixedPolicy(k, self.estimator, self.costs, overlap=overlap)
        self._last: tuple[tuple, SpecDecision] | None = None
        self._reused = 0
        self._off_by_class: dict[int, bool] = {}  # size class -> its latest fresh decision was "off"

    def choose(self, req_ids: Sequence[Hashable], caps: Mapping[Hashable, int],
               resume: Mapping[Hashable, int] | None = None) -> SpecDecision:
        key = tuple(req_ids)
        if self._last is not None:
            last_key, last = self._last
            if last_key == key and self._reused < REDECIDE_EVERY - 1 and last.reason_code != "explore":
                self._reused += 1
                return last
            if (len(key) >= REUSE_OFF_FROM and not any(last.per_request.values())
                    and last.reason_code == "goodput" and _size_class(len(key)) == _size_class(len(last_key))
                    and self._reused < REDECIDE_OFF_EVERY - 1):
                self._reused += 1
                return last
        decision = self.policy.choose(req_ids, caps, resume)
        self._last, self._reused = (key, decision), 0
        if key:
            self._off_by_class[_size_class(len(key))] = (not any(decision.per_request.values())
                                                         and decision.reason_code == "goodput")
        return decision

    def expects_drafting(self, batch_size: int) -> bool:
        """Whether a batch of this size is likely to draft: False only when the latest fresh
        decision for its size class turned speculation off for goodput. The engine asks before
        sending arrivals to an otherwise idle draft: a colocated draft's prefill of a batch that
        will not draft costs the target's GPU for nothing (the prompts still reach the draft, whole,
        with the first step that drafts)."""
        return not self._off_by_class.get(_size_class(batch_size), False)

    def observe_verdict(self, req_id: Hashable, num_proposed: int, num_accepted: int) -> None:
        if num_proposed > 0:
            self.estimator.observe(req_id, num_proposed, num_accepted)

    def observe_costs(self, batch_size: int, tokens_per_seq: float, forward_s: float | None,
                      draft: dict | None) -> None:
        if forward_s is not None and batch_size > 0:
            self.costs.observe_verify(batch_size, tokens_per_seq, forward_s)
        if draft and draft.get("levels") and draft.get("batch"):
            if draft.get("hits", 0) == 0 and draft.get("propose_s", 0) > 0:
                self.costs.observe_draft(draft["batch"], draft["levels"], draft["propose_s"])
        if draft and draft.get("catch_up_s") and draft.get("catch_up_tokens"):
            self.costs.observe_catch_up(draft["catch_up_tokens"], draft["catch_up_s"])

    def forget(self, req_id: Hashable) -> None:
        self.estimator.forget(req_id)
        self._last = None


def build_policy(config: ClusterConfig) -> SpeculationControl:
    return SpeculationControl(config)
