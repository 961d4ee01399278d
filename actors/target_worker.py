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

Running ahead (async scheduling): when the engine marks a step ``run_ahead`` (it expects the
next one to be a plain decode), the worker runs that next step once the reply is on the step
channel, pipelined on the device when every request is greedy; a matching call is answered at
once, any other undoes it exactly (``actors/run_ahead.py``). Single-rank targets, step channel only.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from actors.run_ahead import RunAhead
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
        self.ahead = RunAhead(self)
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
        if self.ahead.broken is not None:
            raise RuntimeError(self.ahead.broken)
        self._ahead_wanted = run_ahead  # acted on by run_ahead() (single-rank targets only)
        reply, discarded = self.ahead.take(new, req_ids, draft_req_ids, free_ids, send_tokens)
        if reply is not None:
            self.free(free_ids)
            return reply
        reply = self._step(step_id, new, req_ids, draft_req_ids, free_ids, send_tokens)
        if discarded:
            reply["ahead_discarded"] = discarded
        return reply

    def _step(self, step_id: int, new: list[NewRequest], req_ids: list[int], draft_req_ids: list[int],
              free_ids: list[int], send_tokens: bool) -> dict:
        tw = time.perf_counter()
        proposals = self._receive_proposals(step_id, draft_req_ids)
        wait_s = time.perf_counter() - tw
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
        t_built = time.perf_counter()
        logits = self.runner.forward(batch)
        t_launched = time.perf_counter()
        if self.tp_rank != LEADER:
            return self._follow(new, plan)
        ids = [r for r, _, _ in new] + [r for r, _ in plan]
        verdicts = verify_batch([Proposal.empty()] * len(new) + [p for _, p in plan], logits, batch.logits_counts,
                                [self._params[r] for r in ids], [self._generators[r] for r in ids])
        t_verified = time.perf_counter()
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
        t_committed = time.perf_counter()
        reply = self._emit(emitted, stats, send_tokens)
        t_end = time.perf_counter()
        # a step that captured a CUDA graph is not a cost sample (capture takes ~100x a replay)
        new_captures = self.runner.stats["captures"] - captures
        reply["forward_s"] = None if new_captures else t_end - t0
        reply["phases"] = {"wait_proposals": wait_s, "build": t_built - t0, "launch": t_launched - t_built,
                           "verify": t_verified - t_launched, "commit": t_committed - t_verified,
                           "emit": t_end - t_committed}
        if new_captures:
            reply["captures"] = new_captures
            reply["capture_s"] = self.runner.stats["capture_s"] - capture_s
        return reply

    @_locked
    def capture_buckets(self, max_batch: int, queries: list[int], max_kv: int) -> dict:
        """Capture the decode and verify buckets now (``GraphRunner.capture_decode_buckets``), so
        serving meets no capture for them; a no-op without CUDA graphs (CPU, tensor parallelism)."""
        return self.runner.capture_decode_buckets(max_batch, queries, max_kv, all_logits=True)

    @_locked
    def run_ahead(self) -> None:
        """The step channel's work once a step's reply is sent: run the next step ahead if the
        engine asked for it (``actors/run_ahead.py``)."""
        if self.tp_size == 1:
            wanted, self._ahead_wanted = self._ahead_wanted, False
            self.ahead.after_reply(wanted)

    def run_ahead_stats(self) -> dict:
        """{"used": steps answered from a run-ahead, "discarded": run-aheads undone, "pipelined":
        steps launched from the previous one's tokens on the device}."""
        return dict(self.ahead.stats)

    @_locked
    def free(self, req_ids: list[int]) -> None:
        self.ahead.forget(req_ids)
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
