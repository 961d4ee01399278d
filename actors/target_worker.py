"""Target (verifier) worker: owns the target model (or its tensor-parallel shard) and KV cache (data plane).

A plain class: the control plane wraps it with ``ray.remote(...).options(...)``; tests can use it
directly. It executes the plan of one step and decides nothing about scheduling.

One call per engine step, ``step(step_id, new, req_ids, draft_req_ids, free_ids)``:

1. receive the draft's proposals for ``draft_req_ids`` over the draft link (rank 0 only; the
   others of ``req_ids`` get none). If the draft is lost (``PeerLostError``: it died or stayed
   silent past the link's deadline) the link is dropped and the step runs target-only; the reply
   says ``draft_link: False`` so the control plane restarts the draft;
2. free ``free_ids`` (finished or aborted requests);
3. one ragged forward: the prompts of ``new`` requests (prefill) and ``[last token, *draft]`` of
   every request in ``req_ids`` (verification; a plain decode step when there is no draft);
4. ``verify`` each request, commit the accepted path in the KV cache, and send the emitted tokens
   to the draft (one *tokens* message per step, asynchronously — unless ``send_tokens`` is false:
   on a step the draft sits out, the engine hands it those tokens itself when it next calls it)
   and back to the control plane.

Tensor parallelism: ``tp_size`` workers run every step together. Rank 0 (the leader) talks to the
draft; it forwards the proposals to the other ranks before the forward and the accepted paths and
emitted tokens after verifying, over the tensor-parallel group that the model's all-reduces also
use. Logits are replicated on every rank, so the leader alone verifies.

Invariants (as the reference loop's): before a step each request's KV holds every token but the
last; the accepted path is committed and everything else of the step is dropped; a request's
sampling generator is seeded from its own ``SamplingParams.seed`` and used in the reference's
order. ``free`` and ``free_ids`` are idempotent.

Step channel: ``open_step_channel`` serves ``step`` and ``free`` over a socket
(``actors/step_channel.py``) so the engine's per-step call skips Ray's task path. Every method
that touches the cache or the links holds one lock, so a channel call and a Ray call on the same
worker never interleave.

Running ahead (async scheduling, one step deep): when the engine marks a step ``run_ahead`` (it
expects the next one to be a plain decode: no draft tokens, no arrivals), the worker, once that
step's reply is on the channel, runs the next step itself — every request it holds decodes its
last emitted token — while the engine handles the reply. If the engine's next call is that step
(no new requests, no proposals, no tokens to send to the draft, its requests those of the
run-ahead less ones it frees), the stored reply is returned at once; otherwise the run-ahead is
undone exactly (each request's token and KV entry dropped, its sampling generator's state
restored) and the call runs as usual. Outputs therefore never depend on whether a step ran ahead.
Only a single-rank target runs ahead, and only over the step channel.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from actors.spec.sampling import make_generator
from actors.spec.types import Proposal, SamplingParams
from actors.spec.verify import verify_batch
from actors.step_batch import SeqStep
from actors.step_channel import locked as _locked
from actors.transport import (
    PeerLostError,
    Transport,
    assigned_gpu_ids,
    free_port,
    node_address,
    node_id,
    pack_proposals,
    pack_tokens,
    pick_device,
    unpack_proposals,
    unpack_tokens,
)

TARGET_RANK, DRAFT_RANK = 0, 1
LEADER = 0
log = logging.getLogger("outrider.target_worker")

NewRequest = tuple[int, list[int], SamplingParams]


class TargetWorker:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: torch.dtype | None = None,
        kv_budget_tokens: int = 4096,
        block_size: int = 16,
        device: torch.device | str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        fused_kernels: bool = False,
    ) -> None:
        from actors.model.sources import resolve_model_path

        torch.set_num_threads(1)
        self._lock = threading.RLock()
        self._channel = None
        model_path = resolve_model_path(model_path)  # "demo": this node's cached copy
        self.model_path, self.dtype = model_path, dtype
        self.kv_budget_tokens, self.block_size = kv_budget_tokens, block_size
        self.device = torch.device(device) if device is not None else pick_device()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.fused_kernels = fused_kernels
        self.model = self.cache = None
        self.link: Transport | None = None  # to the draft (leader only)
        self.tp: Transport | None = None  # tensor-parallel group
        self._tokens: dict[int, list[int]] = {}
        self._params: dict[int, SamplingParams] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._ahead_wanted = False  # the engine expects the next step to be a plain decode
        self._ahead: dict | None = None  # the run-ahead step: its reply and how to undo it
        self._ahead_stats = {"used": 0, "discarded": 0}
        self._broken: str | None = None  # a run-ahead failed half-way: the next step says so
        if tp_size == 1:
            self._load(None)

    def _load(self, tp_group) -> None:
        from actors.model.loader import load_model

        kwargs = {} if self.tp_size == 1 else {"tp_rank": self.tp_rank, "tp_size": self.tp_size, "tp_group": tp_group}
        self.model = load_model(self.model_path, dtype=self.dtype, device=self.device, **kwargs)
        if self.fused_kernels:
            self.model.use_compiled(True)  # no effect under tensor parallelism (its layers stay eager)
        self.cache = self.model.make_kv_cache(self.kv_budget_tokens * self.model.kv_bytes_per_token,
                                              block_size=self.block_size)
        from actors.model.graph_runner import GraphRunner

        self.runner = GraphRunner(self.model, self.cache)  # CUDA graphs on a GPU, eager elsewhere

    # ----------------------------------------------------------------- set-up
    def info(self) -> dict:
        if self.model is None:
            return {"ready": False, "device": str(self.device), "tp_rank": self.tp_rank, "gpu_ids": assigned_gpu_ids(),
                    "node": node_id(), "pid": os.getpid()}
        cfg = self.model.config
        return {"ready": True, "vocab_size": cfg.vocab_size, "max_context": cfg.max_context,
                "device": str(self.device), "tp_rank": self.tp_rank, "gpu_ids": assigned_gpu_ids(),
                "node": node_id(), "pid": os.getpid(), "kv_capacity_tokens": self.cache.capacity_tokens}

    def transport_address(self) -> tuple[str, int]:
        """(node address, free port) for a process group's TCP store; this worker hosts it."""
        addr = node_address()
        return addr, free_port(addr)

    def init_tp(self, addr: str, port: int, backend: str | None = None, timeout_s: float = 120.0) -> dict:
        """Join the tensor-parallel group and load this rank's shard."""
        self.tp = Transport(addr, port, self.tp_rank, self.tp_size, self.device, backend=backend, timeout_s=timeout_s)
        self._load(self.tp.group)
        return self.info()

    def open_step_channel(self) -> tuple[str, int, str]:
        """(host, port, token) of this worker's step channel (opened on first call)."""
        from actors.step_channel import StepChannelServer

        if self._channel is None:
            self._channel = StepChannelServer(node_address(), {"step": self.step, "free": self.free}, self._lock,
                                              after={"step": self.run_ahead})
        return self._channel.address()

    @_locked
    def connect_draft(self, addr: str, port: int, backend: str | None = None,
                      timeout_s: float = 60.0) -> tuple[str, float | None]:
        """(Re)form the draft link as its rank 0; a previous link is dropped. Returns the backend
        and the link's timed round trip (seconds)."""
        self.disconnect_draft()
        self.link = Transport(addr, port, TARGET_RANK, 2, self.device, backend=backend, timeout_s=timeout_s,
                              time_round_trips=True)
        return self.link.backend, self.link.round_trip_s

    @_locked
    def disconnect_draft(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    # ----------------------------------------------------------------- the step
    @_locked
    @torch.inference_mode()
    def step(self, step_id: int, new: list[NewRequest], req_ids: list[int], draft_req_ids: list[int],
             free_ids: list[int], send_tokens: bool = True, run_ahead: bool = False) -> dict:
        """Run one engine step -> {"results": {req_id: {token_ids, num_accepted, num_proposed}}, "draft_link": bool}.

        ``run_ahead``: the engine expects the next step to be a plain decode of every running
        request; the worker may run it once this reply is sent (``run_ahead``, the method)."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        discarded = 0
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            if self._ahead_matches(ahead, new, req_ids, draft_req_ids, free_ids, send_tokens):
                self.free(free_ids)
                self._ahead_stats["used"] += 1
                self._ahead_wanted = run_ahead and self.tp_size == 1
                reply = dict(ahead["reply"])
                reply["results"] = {r: reply["results"][r] for r in req_ids}
                reply["ran_ahead"] = True
                return reply
            self._undo_ahead(ahead)
            self._ahead_stats["discarded"] += 1
            discarded = 1
        self._ahead_wanted = run_ahead and self.tp_size == 1
        reply = self._step(step_id, new, req_ids, draft_req_ids, free_ids, send_tokens)
        if discarded:
            reply["ahead_discarded"] = discarded
        return reply

    def _step(self, step_id: int, new: list[NewRequest], req_ids: list[int], draft_req_ids: list[int],
              free_ids: list[int], send_tokens: bool) -> dict:
        proposals = self._receive_proposals(step_id, draft_req_ids)
        self.free(free_ids)
        for req_id, prompt, params in new:
            self.cache.add_sequence(req_id)
            self._tokens[req_id] = list(prompt)
            self._params[req_id] = params
            self._generators[req_id] = make_generator(params, self.device)
        plan = [(r, proposals.get(r, Proposal.empty())) for r in req_ids]
        steps = [SeqStep(r, p, logits="last") for r, p, _ in new] + [
            SeqStep(r, [self._tokens[r][-1], *p.token_ids.tolist()], parents=[-1, *(q + 1 for q in p.parents)])
            for r, p in plan
        ]
        if not steps:
            return {"results": {}, "draft_link": self.link is not None}
        t0, captures, capture_s = time.perf_counter(), self.runner.stats["captures"], self.runner.stats["capture_s"]
        batch = self.runner.build(steps)
        logits = self.runner.forward(batch)
        if self.tp_rank != LEADER:
            return self._follow(new, plan)
        ids = [r for r, _, _ in new] + [r for r, _ in plan]
        verdicts = verify_batch([Proposal.empty()] * len(new) + [p for _, p in plan], logits, batch.logits_counts,
                                [self._params[r] for r in ids], [self._generators[r] for r in ids])
        emitted, paths, stats = {}, {}, {}
        for (req_id, _, _), verdict in zip(new, verdicts[: len(new)]):
            emitted[req_id] = verdict.token_ids
            paths[req_id] = None
        for (req_id, proposal), verdict in zip(plan, verdicts[len(new):]):
            emitted[req_id] = verdict.token_ids
            paths[req_id] = [0, *(a + 1 for a in verdict.accepted)]
            stats[req_id] = {"num_accepted": verdict.num_accepted,
                             "num_proposed": max(proposal.depths, default=-1) + 1}
        if self.tp_size > 1:
            wire_paths = {r: ([-1] if p is None else p) for r, p in paths.items()}
            for rank in range(1, self.tp_size):
                self.tp.isend(pack_tokens(wire_paths) + pack_tokens(emitted), rank)
        for req_id, path in paths.items():
            self.cache.commit(req_id, path)
        reply = self._emit(emitted, stats, send_tokens)
        # a step that captured a CUDA graph is not a cost sample (capture takes ~100x a replay)
        new_captures = self.runner.stats["captures"] - captures
        reply["forward_s"] = None if new_captures else time.perf_counter() - t0
        if new_captures:
            reply["captures"] = new_captures
            reply["capture_s"] = self.runner.stats["capture_s"] - capture_s
        return reply

    @_locked
    @torch.inference_mode()
    def run_ahead(self) -> None:
        """Run the next step now if the engine asked for it (the step channel calls this once a
        step's reply is sent): every request held decodes its last token; the reply waits for the
        engine's matching call. Skipped when a request is at the model's context or the cache
        cannot hold one more entry for every request. A failure half-way leaves the worker
        refusing steps (``_broken``), so the engine restarts it rather than trust its state."""
        if not self._ahead_wanted or self._ahead is not None or self.tp_size != 1:
            return
        self._ahead_wanted = False
        ids = list(self._tokens)
        if not ids or any(len(self._tokens[r]) >= self.model.config.max_context for r in ids):
            return
        if not self.cache.can_grow({r: 1 for r in ids}):
            return
        undo = {r: (None if (g := self._generators[r]) is None else g.get_state()) for r in ids}
        try:
            reply = self._step(-1, [], ids, [], [], send_tokens=False)
        except Exception as exc:
            self._broken = f"the run-ahead step failed ({type(exc).__name__}: {exc}); the worker's state is unknown"
            raise
        self._ahead = {"reply": reply, "ids": ids, "undo": undo}

    def run_ahead_stats(self) -> dict:
        """{"used": steps answered from a run-ahead, "discarded": run-aheads undone}."""
        return dict(self._ahead_stats)

    def _ahead_matches(self, ahead: dict, new: list, req_ids: list[int], draft_req_ids: list[int],
                       free_ids: list[int], send_tokens: bool) -> bool:
        if new or draft_req_ids or (send_tokens and self.link is not None):
            return False
        ran, wanted = set(ahead["ids"]), set(req_ids)
        return wanted <= ran and ran - wanted <= set(free_ids)

    def _undo_ahead(self, ahead: dict) -> None:
        """Drop the run-ahead's token and KV entry of every request still held; restore its sampler."""
        for req_id, state in ahead["undo"].items():
            if req_id not in self._tokens:
                continue  # freed since
            self._tokens[req_id].pop()
            self.cache.truncate(req_id, self.cache.seq_len(req_id) - 1)
            if state is not None:
                self._generators[req_id].set_state(state)

    @_locked
    def free(self, req_ids: list[int]) -> None:
        if self._ahead is not None and req_ids:  # a freed request is no longer part of the run-ahead
            gone = set(req_ids)
            self._ahead["ids"] = [r for r in self._ahead["ids"] if r not in gone]
            for req_id in gone:
                self._ahead["undo"].pop(req_id, None)
            if not self._ahead["ids"]:
                self._ahead = None
        for req_id in req_ids:
            if self.cache is not None and req_id in self.cache:
                self.cache.free(req_id)
            self._tokens.pop(req_id, None)
            self._params.pop(req_id, None)
            self._generators.pop(req_id, None)

    @_locked
    def kv_free_tokens(self) -> int:
        return self.cache.free_tokens

    @_locked
    def num_requests(self) -> int:
        return len(self._tokens)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self.disconnect_draft()
        if self.tp is not None:
            self.tp.close()
            self.tp = None

    # ----------------------------------------------------------------- helpers
    def _receive_proposals(self, step_id: int, draft_req_ids: list[int]) -> dict[int, Proposal]:
        proposals: dict[int, Proposal] = {}
        if self.tp_rank == LEADER:
            if draft_req_ids and self.link is not None:
                try:
                    proposals = unpack_proposals(self.link.recv(DRAFT_RANK))
                except PeerLostError:  # the draft is gone: this step runs target-only
                    self.disconnect_draft()
                if proposals and sorted(proposals) != sorted(draft_req_ids):
                    raise RuntimeError(f"step {step_id}: proposals for {sorted(proposals)}, "
                                       f"expected {sorted(draft_req_ids)}")
            if self.tp_size > 1:
                ids = list(proposals)
                bare = [Proposal(p.token_ids, p.parents, None) for p in proposals.values()]
                for rank in range(1, self.tp_size):
                    self.tp.isend(pack_proposals(ids, bare), rank)
        elif self.tp_size > 1:
            proposals = unpack_proposals(self.tp.recv(LEADER))
        return proposals

    def _follow(self, new: list[NewRequest], plan: list[tuple[int, Proposal]]) -> dict:
        """Non-leader TP rank: commit the leader's accepted paths, record its emitted tokens."""
        message = self.tp.recv(LEADER)
        paths, emitted = unpack_tokens(message[:2]), unpack_tokens(message[2:])
        for req_id, path in paths.items():
            self.cache.commit(req_id, None if path == [-1] else path)
            self._tokens[req_id].extend(emitted[req_id])
        return {"results": {}, "draft_link": False}

    def _emit(self, emitted: dict[int, list[int]], stats: dict[int, dict], send_tokens: bool = True) -> dict:
        """Record emitted tokens, tell the draft (async) unless the engine said it resyncs the draft
        itself, and build the control-plane reply."""
        for req_id, token_ids in emitted.items():
            self._tokens[req_id].extend(token_ids)
        sent = False
        if self.link is not None and send_tokens:
            try:
                self.link.isend(pack_tokens(emitted), DRAFT_RANK)
                sent = True
            except PeerLostError:
                self.disconnect_draft()
        results = {r: {"token_ids": list(t), **stats.get(r, {})} for r, t in emitted.items()}
        return {"results": results, "draft_link": self.link is not None, "tokens_sent": sent}
