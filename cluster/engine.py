"""The engine loop: continuous batching of speculative steps over the worker actors (control plane).

``Engine`` runs on its own thread. Callers ``submit`` requests and ``abort`` them from any thread;
each request reports through its ``sink`` (``("tokens", token_ids, text)``, then ``("finished",
result)`` or ``("error", exception)``). Per iteration the loop

1. applies aborts and admits waiting requests by KV capacity (``cluster.scheduler``);
2. asks the speculation policy how many draft tokens each decoding request gets (goodput-adaptive
   or fixed; zero while the draft is down);
3. issues one ``step`` to every target rank — prefill of the admitted requests and verification
   of the decoding ones in one ragged forward — and, concurrently, one ``step`` to the draft
   (new requests, its proposals, the overlap speculation, frees);
4. waits for the target only (the draft may still be speculating for the next step), then emits
   tokens: stop tokens, ``max_tokens``, the context limit and stop strings end a request; its KV
   is freed on every worker in the next step.

Faults (``cluster.workers.WorkerFailure``):
* draft lost (its call failed, or the target reports the link gone): running requests continue
  target-only; the draft actor is restarted by Ray and, once it answers, the link is re-formed and
  every running request handed to it with its tokens so far — no request is lost, and greedy
  output is unchanged;
* target lost (died, raised, or silent past ``step_timeout_s``): its running requests fail with a
  ``WorkerFailure``; every worker restarts, the groups are re-formed, waiting requests then run.
  If the target does not come back within ``start_timeout_s`` the engine is dead and says so.

Invariants: every request ends with exactly one ``finished`` or ``error`` event; the scheduler's
reservations are released exactly once per admitted request; the draft's token stream is counted
per link (``_token_msgs``) so the draft never waits for a message that will not come. On a step
without a draft call (every k = 0) the target sends the draft nothing; the requests of that step
are then *stale* for the draft, and its next call carries their whole token lists, which replace
its own (no per-step traffic to an idle draft, no catch-up backlog on the link).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from actors.spec.sequence import SequenceState
from actors.spec.types import SamplingParams
from actors.step_channel import StepCallError
from actors.transport import PeerLostError
from cluster.config import ClusterConfig
from cluster.scheduler import Scheduler
from cluster.workers import WorkerFailure, WorkerSet, check
from placement.spec import DRAFT, TARGET

log = logging.getLogger("outrider.engine")
VERIFY_DECAY = 0.8  # EMA of the target's verify time, the draft's speculation budget

Sink = Callable[[tuple], None]


class EngineDeadError(RuntimeError):
    """The engine stopped (shut down, or a worker could not be recovered)."""


@dataclass
class GenerationOutput:
    """The final state of one request."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # stop | length | abort
    stats: dict
    ttft_s: float | None = None
    latency_s: float | None = None

    @property
    def usage(self) -> dict:
        n_prompt, n_out = len(self.prompt_token_ids), len(self.token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


@dataclass
class _Request:
    state: SequenceState
    sink: Sink
    detok: object | None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prefilled: bool = False
    text: str = ""

    @property
    def req_id(self) -> int:
        return self.state.req_id


class Engine:
    def __init__(self, config: ClusterConfig, workers: WorkerSet, *, tokenizer=None, policy, metrics) -> None:
        self.config, self.workers, self.tokenizer = config, workers, tokenizer
        self.policy, self.metrics = policy, metrics
        info = workers.info
        self.vocab_size, self.max_context = info.vocab_size, info.max_context
        capacity = {TARGET: info.target_kv_tokens}
        if info.draft_kv_tokens is not None:
            capacity[DRAFT] = info.draft_kv_tokens
        k = config.num_draft_tokens if config.has_draft else 0
        self.scheduler = Scheduler(
            capacity, block_size=config.block_size, max_context=self.max_context,
            draft_slack_tokens=(2 * k + 2) if config.overlap else (k + 1),
            max_running=config.max_running, max_waiting=config.max_waiting,
            max_prefill_tokens=config.max_prefill_tokens)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}  # admitted or waiting, not finished
        self._aborts: set[int] = set()
        self._frees: list[int] = []  # finished requests whose KV the workers still hold
        self._step_id = 0
        self._last_step_end: float | None = None  # perf_counter at the last step's end (None after idling)
        self._draft_up = workers.draft is not None
        self._draft_next_check = 0.0
        self._draft_backlog: list = []  # (req_id, tokens, params) to hand to a re-connected draft
        self._verify_s: float | None = None  # EMA of the target's verify time on drafting steps
        self._draft_pending: list[ray.ObjectRef] = []  # draft step calls made through Ray
        self._draft_inflight = 0  # draft step replies not yet read from its step channel
        self._token_msgs = 0
        # requests whose latest tokens the draft has not been sent -> how many of their tokens it has
        self._draft_stale: dict[int, int] = {}
        self._draft_frees: list[int] = []  # freed requests the draft has not been told about
        self._dead: str | None = None
        self._recovering: str | None = None
        self._last_progress = time.monotonic()
        self._decision = None
        self._stopping = False
        self.idle = threading.Event()  # set while nothing runs or waits (tests, graceful drain)
        self.idle.set()
        self._thread = threading.Thread(target=self._run, name="outrider-engine", daemon=True)
        self.metrics.set_draft_up(self._draft_up, self.workers.link_rtt_s)

    # ----------------------------------------------------------------- public, any thread
    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, *, stop: tuple[str, ...] = ()) -> int:
        """Validate and queue a request; raises ``ValueError``, ``EngineOverloadedError`` or ``EngineDeadError``."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine is not running: {self._dead}")
        self._validate(prompt_ids, params, stop)
        detok = None
        if self.tokenizer is not None:
            from cluster.detokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, list(prompt_ids), stop_strings=tuple(stop))
        with self._lock:
            if self._dead is not None:  # checked again under the lock: _die collects under it
                raise EngineDeadError(f"the engine is not running: {self._dead}")
            req_id = next(self._ids)
            self.scheduler.add(req_id, len(prompt_ids), params.max_tokens)
            self._requests[req_id] = _Request(SequenceState(req_id, list(prompt_ids), params, len(prompt_ids)),
                                              sink, detok)
            self.idle.clear()
        self._wake.set()
        return req_id

    def abort(self, req_id: int) -> None:
        with self._lock:
            if req_id in self._requests:
                self._aborts.add(req_id)
        self._wake.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.config.step_timeout_s)

    def health(self) -> tuple[bool, str]:
        """(serving, why): False when the engine is dead, recovering, or has made no progress with
        work in hand for longer than a step may take."""
        if self._dead is not None:
            return False, f"dead: {self._dead}"
        if not self._thread.is_alive():
            return False, "the engine loop is not running"
        if self._recovering is not None:
            return False, f"recovering: {self._recovering}"
        stalled = time.monotonic() - self._last_progress
        if not self.idle.is_set() and stalled > 2 * self.config.step_timeout_s:
            return False, f"stuck: no engine step completed for {stalled:.0f} s"
        return True, "serving" + ("" if self._draft_up or self.workers.draft is None else " (draft down: target-only)")

    @property
    def draft_up(self) -> bool:
        return self._draft_up

    @property
    def dead(self) -> str | None:
        return self._dead

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._lock:
            return len(self.scheduler.running), len(self.scheduler.waiting)

    # ----------------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._last_progress = time.monotonic()
                self._apply_aborts()
                try:
                    self._maybe_reconnect_draft()
                except WorkerFailure as failure:  # the target failed while re-forming the link
                    self._on_target_failure(failure, [])
                    continue
                with self._lock:  # submit() adds to _requests from other threads
                    admitted = [self._requests[r] for r in self.scheduler.admit()]
                    running = [r for r in self._requests.values() if r.prefilled]
                if not admitted and not running:
                    self._last_step_end = None  # an idle wait is no step phase
                    self._flush_frees()
                    self._publish_queue()
                    with self._lock:
                        if not self._requests:
                            self.idle.set()
                    self._wake.wait(timeout=self.config.draft_restart_s if not self._draft_up else 1.0)
                    self._wake.clear()
                    continue
                try:
                    self._step(admitted, running)
                except WorkerFailure as failure:
                    self._on_target_failure(failure, admitted + running)
        except BaseException as exc:
            log.exception("engine loop crashed")
            self._die(f"engine loop crashed: {type(exc).__name__}: {exc}")
        else:
            self._die("the engine was shut down")

    def _step(self, admitted: list[_Request], running: list[_Request]) -> None:
        self._step_id += 1
        step_id = self._step_id
        t_start = time.perf_counter()
        draft_ks = self._choose_draft_lengths(running) if self._draft_up else {}
        draft_ids = [r for r, k in draft_ks.items() if k > 0]
        new = [(r.req_id, list(r.state.tokens), r.state.params) for r in admitted]
        frees, self._frees = self._frees, []
        t0 = time.perf_counter()
        draft_args = None
        if self.workers.draft is not None:
            self._draft_frees += frees
        if self._draft_up and (draft_ids or self._draft_backlog
                               or (new and not running and self.policy.expects_drafting(len(new)))):
            # with nothing to draft (k = 0 for all) the draft sits the step out. New prompts go to the
            # draft with the step's proposals, or when nothing else runs (a first request: its draft
            # prefill overlaps the target's) unless the policy's latest decision for a batch of their
            # size was "off"; while speculation is off for a running batch they wait
            # (marked stale below, handed over whole at the next draft call), so a colocated draft
            # does not prefill every arrival on the target's GPU for nothing.
            backlog, self._draft_backlog = self._draft_backlog, []
            draft_frees, self._draft_frees = self._draft_frees, []
            draft_args = (step_id, backlog + self._resync_stale() + new, {r: draft_ks[r] for r in draft_ids},
                          self._token_msgs, draft_frees, self._speculation_budget(), self._expect_drafting(draft_ids))
        channels = self.workers.channels
        # the target sends this step's tokens to the draft only if the draft runs this step; it runs
        # the next step ahead when that is likely a plain decode (no drafting now, nobody waiting)
        args = (step_id, new, [r.req_id for r in running], draft_ids, frees, draft_args is not None,
                self._expect_plain_decode(draft_ids) if channels else False)
        draft_ref = None
        if channels:  # the draft first: the target waits for its proposals
            target_refs = None
            if draft_args is not None:
                draft_ref = self._send_draft(draft_args)
            self._send_step(channels, args)
        else:
            target_refs = [t.step.remote(*args) for t in self.workers.targets]
            if draft_args is not None:
                draft_ref = self._send_draft(draft_args)
        t_sent = time.perf_counter()
        out = self._wait_channels(channels) if target_refs is None else self._wait_target(target_refs, draft_ref)
        t_replied = time.perf_counter()
        elapsed = t_replied - t0
        if draft_ids and out.get("forward_s"):  # the window an overlapping draft's speculation hides in
            v = float(out["forward_s"])
            self._verify_s = v if self._verify_s is None else VERIFY_DECAY * self._verify_s + (1 - VERIFY_DECAY) * v
        if self._draft_up:
            if out["draft_link"]:
                if out.get("tokens_sent", True):
                    self._token_msgs += 1
                else:
                    for r in admitted:  # the draft never saw these prompts
                        self._draft_stale.setdefault(r.req_id, 0)
                    for r in running:  # nor this step's tokens (emitted below) and what follows
                        self._draft_stale.setdefault(r.req_id, len(r.state.tokens))
            else:
                self._draft_lost(WorkerFailure(DRAFT, "lost", "the target lost the draft link"))
        results = out["results"]
        now = time.monotonic()
        for r in admitted:
            r.prefilled = True
            self._emit(r, results[r.req_id]["token_ids"], now)
        for r in running:
            res = results[r.req_id]
            r.state.stats.record(res["num_proposed"], res["num_accepted"])
            self.policy.observe_verdict(r.req_id, res["num_proposed"], res["num_accepted"])
            self._emit(r, res["token_ids"], now)
        self._observe_step(admitted, running, results, out, elapsed)
        self._publish_queue()
        t_end = time.perf_counter()
        # "between": from the previous step's end to this one's start (the loop: aborts, admission)
        between = 0.0 if self._last_step_end is None else t_start - self._last_step_end
        self._last_step_end = t_end
        self.metrics.on_phases("engine", {"plan": t_sent - t_start, "wait": t_replied - t_sent,
                                          "apply": t_end - t_replied, "between": between})
        self.metrics.on_phases("target", out.get("phases"))

    def _expect_plain_decode(self, draft_ids: list[int]) -> bool:
        """Whether the step after this one is likely a plain decode of the running batch: run-ahead
        is on, nothing drafts in this step (the policy keeps k = 0 for a while once it chose it) and
        no request waits for admission. A wrong guess costs the target one undone step."""
        if not self.config.run_ahead or draft_ids:
            return False
        with self._lock:
            return not self.scheduler.waiting

    def _expect_drafting(self, draft_ids: list[int]) -> bool:
        """Whether the draft should draft the next chain of ``draft_ids`` as soon as this step's tokens
        reach it (``DraftWorker.draft_ahead``): run-ahead is on and this step's decision is one the
        policy keeps (an explore probe is followed by its own decision). A wrong guess costs the
        draft's device one chain, never a wrong token."""
        decision = self._decision
        return bool(self.config.run_ahead and draft_ids
                    and (decision is None or decision.reason_code != "explore"))

    def _wait_target(self, target_refs: list, draft_ref) -> dict:
        """Wait for every target rank; a draft failure seen meanwhile restarts the draft at once."""
        deadline = time.monotonic() + self.config.step_timeout_s
        pending = list(target_refs) + self._draft_pending
        while any(ref in pending for ref in target_refs):
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise WorkerFailure(TARGET, "did not answer", f"step {self._step_id}: no reply within "
                                    f"{self.config.step_timeout_s:.0f} s")
            ref = ready[0]
            if ref in target_refs:
                check(ref, TARGET, f"step {self._step_id}")
            else:
                self._draft_done(ref)
        return ray.get(target_refs[0])

    def _speculation_budget(self) -> float | None:
        """Seconds an overlapping draft may speculate while the target verifies (None: unknown)."""
        return self._verify_s

    def _resync_stale(self) -> list[tuple[int, list[int], SamplingParams]]:
        """Whole token lists of the running requests the draft missed tokens of (and forget the rest)."""
        if not self._draft_stale:
            return []
        stale, self._draft_stale = self._draft_stale, {}
        with self._lock:
            live = [self._requests.get(req_id) for req_id in stale]
        return [(r.req_id, list(r.state.tokens), r.state.params) for r in live if r is not None and r.prefilled]

    def _send_draft(self, draft_args: tuple):
        """Start the draft's step: over its step channel when it has one (the reply is read later,
        ``_collect_draft_replies``), else as a Ray call (its ref joins ``_draft_pending``)."""
        channel = self.workers.draft_channel
        if channel is None:
            ref = self.workers.draft.step.remote(*draft_args)
            self._draft_pending.append(ref)
            return ref
        try:
            channel.send("step", *draft_args)
        except PeerLostError as exc:
            self._draft_lost(WorkerFailure(DRAFT, "died", f"step {self._step_id}: {exc}"))
            return None
        self._draft_inflight += 1
        return None

    def _collect_draft_replies(self) -> None:
        """Read the draft replies that have arrived (never waits for one that has not)."""
        channel = self.workers.draft_channel
        while self._draft_up and self._draft_inflight and channel is not None and channel.poll():
            try:
                stats = channel.recv(self.config.step_timeout_s)
            except (PeerLostError, TimeoutError) as exc:
                self._draft_lost(WorkerFailure(DRAFT, "died", f"step {self._step_id}: {exc or type(exc).__name__}"))
                return
            except StepCallError as exc:
                self._draft_lost(WorkerFailure(DRAFT, "failed", f"step {self._step_id}: {exc}"))
                return
            self._draft_inflight -= 1
            self.policy.observe_costs(0, 0, None, stats)
            self.metrics.on_draft_step(stats)

    def _send_step(self, channels: list, args: tuple) -> None:
        try:
            for channel in channels:
                channel.send("step", *args)
        except PeerLostError as exc:
            raise WorkerFailure(TARGET, "died", f"step {self._step_id}: {exc}") from None

    def _wait_channels(self, channels: list) -> dict:
        """Every target rank's reply over its step channel (one deadline), then the draft's finished
        calls (a draft failure seen here restarts the draft at once, as in ``_wait_target``)."""
        deadline = time.monotonic() + self.config.step_timeout_s
        replies = []
        for channel in channels:
            try:
                replies.append(channel.recv(max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                raise WorkerFailure(TARGET, "did not answer", f"step {self._step_id}: no reply within "
                                    f"{self.config.step_timeout_s:.0f} s") from None
            except PeerLostError as exc:
                raise WorkerFailure(TARGET, "died", f"step {self._step_id}: {exc}") from None
            except StepCallError as exc:
                raise WorkerFailure(TARGET, "failed", f"step {self._step_id}: {exc}") from None
        if self._draft_pending:
            ready, _ = ray.wait(self._draft_pending, num_returns=len(self._draft_pending), timeout=0)
            for ref in ready:
                self._draft_done(ref)
        self._collect_draft_replies()
        return replies[0]

    def _draft_done(self, ref) -> None:
        if ref not in self._draft_pending:
            return  # from before the draft was declared lost
        self._draft_pending.remove(ref)
        try:
            check(ref, DRAFT, f"step {self._step_id}")
        except WorkerFailure as failure:
            self._draft_lost(failure)
        else:
            stats = ray.get(ref)
            self.policy.observe_costs(0, 0, None, stats)
            self.metrics.on_draft_step(stats)

    # ----------------------------------------------------------------- emission
    def _emit(self, r: _Request, token_ids: list[int], now: float) -> None:
        state = r.state
        if r.first_token_at is None:
            r.first_token_at = now
        kept = state.emit(token_ids)
        text = ""
        if r.detok is not None and kept:
            delta = r.detok.push(kept)
            text = delta.text
            if delta.stopped:
                drop = len(kept) - delta.num_tokens_kept
                if drop:
                    del state.tokens[len(state.tokens) - drop:]
                    kept = kept[: len(kept) - drop]
                state.finish_reason = "stop"
        if state.finish_reason is None and len(state.tokens) >= self.max_context:
            state.finish_reason = "length"
        if state.finish_reason is not None and r.detok is not None:
            text += r.detok.finish()
        r.text += text
        if kept or text:
            r.sink(("tokens", kept, text))
        if state.finish_reason is not None:
            self._finish(r, state.finish_reason)

    def _finish(self, r: _Request, reason: str, error: BaseException | None = None) -> None:
        self.policy.forget(r.req_id)
        with self._lock:
            self._requests.pop(r.req_id, None)
            self._aborts.discard(r.req_id)
            if r.req_id in self.scheduler.running:
                self.scheduler.release(r.req_id)
                self._frees.append(r.req_id)
            else:
                self.scheduler.remove_waiting(r.req_id)
        now = time.monotonic()
        ttft = None if r.first_token_at is None else r.first_token_at - r.arrival
        n_out = len(r.state.output)
        tpot = (now - r.first_token_at) / (n_out - 1) if r.first_token_at is not None and n_out > 1 else None
        status = "failed" if error is not None else ("aborted" if reason == "abort" else "finished")
        self.metrics.on_request_finished(status, reason, ttft, tpot, r.state.num_prompt, n_out)
        if error is not None:
            r.sink(("error", error))
            return
        r.state.finish_reason = reason
        r.sink(("finished", GenerationOutput(
            r.req_id, r.state.tokens[: r.state.num_prompt], list(r.state.output),
            r.text if r.detok is not None else None, reason, r.state.stats.as_dict(), ttft, now - r.arrival)))

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
        for req_id in aborts:
            r = self._requests.get(req_id)
            if r is not None:
                self._finish(r, "abort")

    def _flush_frees(self) -> None:
        frees, self._frees = self._frees, []
        draft_frees, self._draft_frees = self._draft_frees + frees, []
        if not frees and not draft_frees:
            return
        calls = [(TARGET, t.free.remote(frees)) for t in self.workers.targets] if frees else []
        if self._draft_up and draft_frees:
            calls.append((DRAFT, self.workers.draft.free.remote(draft_frees)))
        try:
            self.workers.call(calls, "free")
        except WorkerFailure as failure:
            if failure.role == DRAFT:
                self._draft_lost(failure)
            else:
                self._on_target_failure(failure, [])

    # ----------------------------------------------------------------- speculation
    def _choose_draft_lengths(self, running: list[_Request]) -> dict[int, int]:
        caps = {}
        for r in running:
            left = r.state.params.max_tokens - len(r.state.output) - 1  # the bonus token is free
            room = self.max_context - len(r.state.tokens) - 1
            caps[r.req_id] = max(0, min(left, room))
        # what the draft would first have to catch up on for a request it sat steps out of
        resume = {r.req_id: len(r.state.tokens) - self._draft_stale[r.req_id]
                  for r in running if r.req_id in self._draft_stale}
        self._decision = self.policy.choose([r.req_id for r in running], caps, resume)
        return {r.req_id: min(self._decision.k_for(r.req_id), caps[r.req_id]) for r in running}

    def _observe_step(self, admitted: list[_Request], running: list[_Request], results: dict, out: dict,
                      elapsed: float) -> None:
        decision = self._decision if running and self._draft_up else None
        self._decision = None
        proposed = [results[r.req_id]["num_proposed"] for r in running]
        accepted = [results[r.req_id]["num_accepted"] for r in running]
        if running and not admitted:
            tokens = sum(1 + p for p in proposed) / len(running)
            self.policy.observe_costs(len(running), tokens, out.get("forward_s"), None)
        self.metrics.on_step(decision, verify_s=out.get("forward_s"), outcomes=list(zip(proposed, accepted)),
                             step_s=elapsed)
        self.metrics.on_graph_captures("target", out.get("captures", 0), out.get("capture_s", 0.0))
        self.metrics.on_run_ahead(int(bool(out.get("ran_ahead"))), out.get("ahead_discarded", 0))

    # ----------------------------------------------------------------- faults
    def _draft_lost(self, failure: WorkerFailure) -> None:
        if not self._draft_up:
            return
        log.warning("draft lost (%s); continuing target-only until it is back", failure)
        self._draft_up = False
        self._draft_pending = []
        self._draft_inflight = 0
        self.workers.close_draft_channel()
        self._draft_backlog = []
        self.metrics.set_draft_up(False)
        self.workers.restart(DRAFT)
        for t in self.workers.targets[:1]:
            t.disconnect_draft.remote()
        self._draft_next_check = time.monotonic() + self.config.draft_restart_s

    def _maybe_reconnect_draft(self) -> None:
        if self._draft_up or self.workers.draft is None or time.monotonic() < self._draft_next_check:
            return
        self._draft_next_check = time.monotonic() + self.config.draft_restart_s
        if not self.workers.poll_ready(DRAFT, 0.05):
            return
        try:
            self.workers.connect_draft(self.config.start_timeout_s)
        except WorkerFailure as failure:
            if failure.role == TARGET:
                raise
            log.warning("draft back but the link failed (%s); retrying", failure)
            self.workers.restart(DRAFT)
            return
        self._token_msgs = 0
        self._draft_stale = {}
        self._draft_frees = []
        with self._lock:
            self._draft_backlog = [(r.req_id, list(r.state.tokens), r.state.params)
                                   for r in self._requests.values() if r.prefilled]
        self._draft_up = True
        self.metrics.set_draft_up(True, self.workers.link_rtt_s)
        log.warning("draft back; speculation resumed for %d running requests", len(self._draft_backlog))

    def _on_target_failure(self, failure: WorkerFailure, affected: list[_Request]) -> None:
        log.error("target failed (%s); failing its running requests and restarting the workers", failure)
        with self._lock:
            current = list(self._requests.values())
        for r in current:
            if r.prefilled or r in affected:
                self._finish(r, "error", error=failure)
        self._frees = []
        if failure.kind != "died":
            self.workers.restart(TARGET)
        if self.workers.draft is not None:
            self.workers.restart(DRAFT)
        self._draft_up = False
        self._draft_pending, self._draft_backlog = [], []
        self._draft_inflight = 0
        self.workers.close_draft_channel()
        self.metrics.set_draft_up(False)
        self._recovering = str(failure)
        try:
            self._recover_target(failure)
        finally:
            self._recovering = None

    def _recover_target(self, failure: WorkerFailure) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while not self._stopping and not self.workers.poll_ready(TARGET, 1.0):
            if time.monotonic() > deadline:
                self._die(f"the target worker did not come back within {self.config.start_timeout_s:.0f} s "
                          f"after: {failure}")
                return
        try:
            self.workers.form_target_group(self.config.start_timeout_s)
            self.workers.open_channels(self.config.start_timeout_s)
        except WorkerFailure as again:
            self._die(f"the target worker group could not be re-formed: {again}")
            return
        self._token_msgs = 0
        self._draft_stale = {}
        self._draft_frees = []
        self._draft_next_check = 0.0

    def _die(self, reason: str) -> None:
        error = EngineDeadError(reason)
        with self._lock:
            self._dead = self._dead or reason
            current = list(self._requests.values())
        for r in current:
            self._finish(r, "error", error=error)
        self.idle.set()

    # ----------------------------------------------------------------- checks
    def _validate(self, prompt_ids: list[int], params: SamplingParams, stop: tuple[str, ...]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.max_context} tokens")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and the target checkpoint has none")

    def _publish_queue(self) -> None:
        with self._lock:
            running, waiting = len(self.scheduler.running), len(self.scheduler.waiting)
            usage = self.scheduler.usage()
        self.metrics.set_queue(running, waiting)
        for role, fraction in usage.items():
            self.metrics.set_kv_usage(role, fraction)
