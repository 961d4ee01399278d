"""The target worker's run-ahead: plain decode steps run before the engine asks for them (data plane).

When the engine marks a step ``run_ahead`` it expects the next one to be a plain decode of every
running request (nothing drafts, nobody waits for admission). Once that step's reply is on the step
channel, ``RunAhead.after_reply`` runs the next step — every request the worker holds decodes its
last token — while the engine emits, detokenizes and schedules; the result waits as ``ahead``.
When every request is greedy it also *pipelines*: before reading the run-ahead step's tokens back
it launches the step after it, fed on the device from the run-ahead step's argmax (``inflight``),
so the GPU always has the next forward queued while the host reads tokens, replies and builds.

``take`` (at the start of every step) answers the engine's call from ``ahead`` when the call is
that step: no new requests, no draft tokens, no tokens for the draft link, its requests those of
the run-ahead less ones it frees. Any other call first undoes ``inflight`` and ``ahead`` exactly —
each request's KV entries (bookkeeping only: the slots are rewritten in stream order by the real
step), its run-ahead token and its sampler's state — and then runs as usual. Outputs therefore
never depend on running ahead.

Invariants: ``inflight`` exists only after ``ahead`` (it is the step after it) and only for greedy
requests; its KV entry is committed in the cache's bookkeeping at launch and its token is not in
the worker's token lists until ``after_reply`` reads it back; a request freed meanwhile is skipped
(dropped from ``ahead`` at once, from ``inflight`` when it is next read). A run-ahead that raises
half-way leaves ``broken`` set: the worker refuses further steps, so the engine restarts it rather
than trust its state. Single-rank targets only (the worker does not ask otherwise).
"""

from __future__ import annotations

import time

import torch

from actors.step_batch import SeqStep


class RunAhead:
    def __init__(self, worker) -> None:
        self.w = worker
        self.ahead: dict | None = None  # {"reply", "ids", "undo": {req_id: sampler state or None}}
        # {"ids", "tokens" (device), "host" (their copy, pinned on CUDA), "ready" (its event), "launched", ...}
        self.inflight: dict | None = None
        self.stats = {"used": 0, "discarded": 0, "pipelined": 0}
        self.broken: str | None = None
        self._last_read: float | None = None

    # ----------------------------------------------------------------- at a step's start
    def take(self, new: list, req_ids: list[int], draft_req_ids: list[int], free_ids: list[int],
             send_tokens: bool) -> tuple[dict | None, int]:
        """(the stored reply for ``req_ids`` if this call is the run-ahead step, else None; how
        many run-aheads were undone). On a miss everything run ahead is undone first."""
        if self.ahead is None:
            return None, 0
        ahead, self.ahead = self.ahead, None
        if self._matches(ahead, new, req_ids, draft_req_ids, free_ids, send_tokens):
            self.stats["used"] += 1
            reply = dict(ahead["reply"])
            reply["results"] = {r: reply["results"][r] for r in req_ids}
            reply["ran_ahead"] = True
            return reply, 0
        self._undo_inflight()
        self._undo(ahead)
        self.stats["discarded"] += 1
        return None, 1

    def forget(self, req_ids: list[int]) -> None:
        """Freed requests leave the stored step (the in-flight one skips them when it is read)."""
        if self.ahead is None or not req_ids:
            return
        gone = set(req_ids)
        self.ahead["ids"] = [r for r in self.ahead["ids"] if r not in gone]
        for req_id in gone:
            self.ahead["undo"].pop(req_id, None)
        if not self.ahead["ids"]:
            self.ahead = None
            self._undo_inflight()

    # ----------------------------------------------------------------- after a reply
    @torch.inference_mode()
    def after_reply(self, wanted: bool) -> None:
        """Called once a step's reply is sent. ``wanted``: the engine expects a plain decode next."""
        try:
            self._after_reply(wanted)
        except Exception as exc:
            self.broken = f"the run-ahead step failed ({type(exc).__name__}: {exc}); the worker's state is unknown"
            raise

    def _after_reply(self, wanted: bool) -> None:
        w = self.w
        if self.inflight is not None:  # launched last time: it is the next step; queue the one after
            current = self.inflight
            self.inflight = self._launch_after(current) if wanted else None
            self.ahead = self._read(current)
            return
        if not wanted or self.ahead is not None:
            return
        ids = list(w._tokens)
        if not ids or not self._room(ids, unread=0):
            return
        if all(w._params[r].greedy for r in ids):  # greedy: pipelined
            first = self._launch(ids, feed=None)
            self.inflight = self._launch_after(first)
            self.ahead = self._read(first)
            return
        # unseeded sampling draws from the global RNG: not restored, and nothing promises its stream
        undo = {r: (None if (g := w._generators[r]) is None else g.get_state()) for r in ids}
        reply = w._step(-1, [], ids, [], [], send_tokens=False)
        self.ahead = {"reply": reply, "ids": ids, "undo": undo}

    # ----------------------------------------------------------------- launch and read back
    def _room(self, ids: list[int], unread: int) -> bool:
        """Whether each request can feed one more token: within the model's context (``unread``
        tokens of it are still on the device) and with a free KV entry."""
        w = self.w
        if any(len(w._tokens[r]) + unread >= w.model.config.max_context for r in ids):
            return False
        return w.cache.can_grow({r: 1 for r in ids})

    def _launch(self, ids: list[int], feed: torch.Tensor | None) -> dict:
        """Build and launch a plain decode of ``ids`` without waiting for it: each feeds its last
        token, or row i of ``feed`` (a device tensor the previous launch produced). Its KV entry is
        committed in the bookkeeping now."""
        w = self.w
        runner, cache = w.runner, w.cache
        captures, capture_s, launched = runner.stats["captures"], runner.stats["capture_s"], time.perf_counter()
        steps = [SeqStep(r, [0 if feed is not None else w._tokens[r][-1]], parents=[-1]) for r in ids]
        batch = runner.build(steps)
        if feed is not None:
            batch.input_ids[batch.q_index[: len(ids), 0]] = feed
        tokens = runner.forward(batch)[: len(ids)].argmax(dim=-1)
        host, ready = tokens, None
        if tokens.device.type == "cuda":  # queued now, so reading them back never waits for a later launch
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        for r in ids:
            cache.commit(r, [0])  # the bookkeeping only: a prefix keeps its slots, no copy
        return {"ids": ids, "tokens": tokens, "host": host, "ready": ready, "launched": launched,
                "captures": runner.stats["captures"] - captures, "capture_s": runner.stats["capture_s"] - capture_s}

    def _launch_after(self, current: dict) -> dict | None:
        """Launch the step after ``current`` (not read back yet), fed from its tokens on the device."""
        w = self.w
        keep = [i for i, r in enumerate(current["ids"]) if r in w._tokens]
        ids = [current["ids"][i] for i in keep]
        if not ids or not all(w._params[r].greedy for r in ids) or not self._room(ids, unread=1):
            return None
        feed = current["tokens"]
        if len(keep) != len(current["ids"]):
            feed = feed[torch.tensor(keep, device=feed.device)]
        self.stats["pipelined"] += 1
        return self._launch(ids, feed)

    def _read(self, launched: dict) -> dict:
        """Wait for a launched step's tokens, record them and build its reply (the stored step)."""
        w = self.w
        if launched["ready"] is not None:
            launched["ready"].synchronize()  # this step's tokens only, not the step launched after it
        tokens = launched["host"].tolist()
        now = time.perf_counter()
        ids = [r for r in launched["ids"] if r in w._tokens]
        emitted = {r: [t] for r, t in zip(launched["ids"], tokens) if r in w._tokens}
        reply = w._emit(emitted, {r: {"num_accepted": 0, "num_proposed": 0} for r in ids}, send_tokens=False)
        # queued behind the previous step, its own time is from that one's read (or its launch) to now
        start = launched["launched"] if self._last_read is None else max(launched["launched"], self._last_read)
        self._last_read = now
        reply["forward_s"] = None if launched["captures"] else now - start
        if launched["captures"]:
            reply["captures"], reply["capture_s"] = launched["captures"], launched["capture_s"]
        return {"reply": reply, "ids": ids, "undo": dict.fromkeys(ids)}

    # ----------------------------------------------------------------- undo
    def _matches(self, ahead: dict, new: list, req_ids: list[int], draft_req_ids: list[int],
                 free_ids: list[int], send_tokens: bool) -> bool:
        if new or draft_req_ids or (send_tokens and self.w.link is not None):
            return False
        ran, wanted = set(ahead["ids"]), set(req_ids)
        return wanted <= ran and ran - wanted <= set(free_ids)

    def _undo(self, ahead: dict) -> None:
        """Drop the stored step's token and KV entry of every request still held; restore its sampler."""
        w = self.w
        for req_id, state in ahead["undo"].items():
            if req_id not in w._tokens:
                continue  # freed since
            w._tokens[req_id].pop()
            w.cache.truncate(req_id, w.cache.seq_len(req_id) - 1)
            if state is not None:
                w._generators[req_id].set_state(state)

    def _undo_inflight(self) -> None:
        """Drop the in-flight step's KV entry (its forward still runs; the real step's writes to the
        same slots come after it on the stream). Its tokens never reached the token lists."""
        inflight, self.inflight = self.inflight, None
        if inflight is None:
            return
        self._last_read = None
        for req_id in inflight["ids"]:
            if req_id in self.w._tokens:
                self.w.cache.truncate(req_id, self.w.cache.seq_len(req_id) - 1)
