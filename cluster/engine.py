"""Distributed engine, first slice: draft and target as two Ray actors taking turns (control plane).

``DistributedEngine.start`` creates a ``TargetWorker`` (rank 0) and, unless the draft spec is
``none``, a ``DraftWorker`` (rank 1) as Ray actors, and has them form a ``torch.distributed``
group (``actors.transport``): the target reports its node address and a free port, both actors
``init_transport`` concurrently. ``generate`` then runs, for one batch of prompts:

    prefill   target.add_requests (ragged prefill, first token) | draft.add_requests (prompts)
    per step  draft.propose(step, draft_req_ids, num_token_msgs)  | target.verify(step, req_ids, draft_req_ids)
              both calls in flight at once; the proposals go draft -> target over the transport,
              the emitted tokens target -> draft over the transport (one message per target call)
    emit      the target's reply (emitted ids + per-request counts) is applied here: stop tokens,
              max_tokens, the context limit; finished requests are freed on both actors

What travels where: Ray actor calls carry control only — request ids, step numbers, sampling
parameters, prompts of new requests and the emitted ids the user receives; draft tokens, parent
indices, draft probabilities and the token stream the draft catches up from go over
``torch.distributed`` (gloo on CPU or a shared GPU, NCCL between GPUs).

Invariants: greedy output equals ``actors.spec.reference.generate`` token for token, and seeded
sampling reproduces it exactly (same batches, same per-request generators, same order); every
``ray`` wait has a timeout, and a worker that dies or stops answering raises ``EngineError`` —
after which the engine refuses work until it is shut down and started again.

Not yet here (issue 3): a scheduler with admission by KV capacity and queueing (a batch that does
not fit raises), continuous batching (one ``generate`` batch at a time), streaming and abort,
stop strings, overlap (PEARL pre/post-verify), goodput-adaptive speculation length, token trees,
target tensor parallelism, placement through ``placement/``, draft-failure fallback and actor
restarts.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import ray
import torch

from actors.spec.sequence import GenerationResult, SequenceState
from actors.spec.types import SamplingParams


class EngineError(RuntimeError):
    """A worker died, failed or stopped answering; the engine must be restarted."""


class DistributedEngine:
    """Control plane of one target worker and one draft worker, taking turns."""

    def __init__(self, target, draft, *, info: dict, num_draft_tokens: int, block_size: int,
                 step_timeout_s: float, placement_group=None) -> None:
        self._target, self._draft = target, draft
        self._vocab, self._max_context = info["vocab_size"], info["max_context"]
        self.num_draft_tokens = num_draft_tokens if draft is not None else 0
        self.block_size = block_size
        self.step_timeout_s = step_timeout_s
        self._placement_group = placement_group
        self._req_ids = itertools.count()
        self._token_msgs = 0  # tokens messages the target has sent to the draft
        self._failed: str | None = None

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def start(
        cls,
        target_path: str,
        draft_spec: str,
        num_draft_tokens: int,
        *,
        target_gpus: float = 1,
        draft_gpus: float = 1,
        colocate: bool = False,
        dtype: torch.dtype | None = None,
        kv_budget_tokens: int = 4096,
        block_size: int = 16,
        step_timeout_s: float = 60.0,
        start_timeout_s: float = 180.0,
    ) -> DistributedEngine:
        """Start the workers (``draft_spec``: ``none``, ``self:N`` or a checkpoint path).

        ``colocate`` puts both on one GPU (fractions summing to at most 1) through a one-bundle
        placement group; the transport then uses gloo, as NCCL refuses two ranks on one GPU.
        """
        from actors.draft_worker import DraftWorker
        from actors.target_worker import TargetWorker

        use_draft = draft_spec.strip() != "none" and num_draft_tokens > 0
        if target_gpus < 0 or draft_gpus < 0:
            raise ValueError("target_gpus and draft_gpus must be >= 0")
        target_opts, draft_opts, group = {"num_gpus": target_gpus}, {"num_gpus": draft_gpus}, None
        if colocate and use_draft:
            if target_gpus + draft_gpus > 1:
                raise ValueError(f"colocate needs target_gpus + draft_gpus <= 1, got {target_gpus} + {draft_gpus}")
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = placement_group([{"GPU": 1}])
            if not group.wait(timeout_seconds=start_timeout_s):
                ray.util.remove_placement_group(group)
                raise EngineError("colocate: no GPU free for the shared placement bundle")
            pin = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
            target_opts["scheduling_strategy"] = draft_opts["scheduling_strategy"] = pin
        common = {"dtype": dtype, "kv_budget_tokens": kv_budget_tokens, "block_size": block_size}
        target = ray.remote(TargetWorker).options(num_cpus=0, max_restarts=0, **target_opts).remote(
            str(target_path), **common)
        draft = None
        if use_draft:
            draft = ray.remote(DraftWorker).options(num_cpus=0, max_restarts=0, **draft_opts).remote(
                draft_spec, str(target_path), num_draft_tokens=num_draft_tokens, **common)
        engine = cls(target, draft, info={"vocab_size": 0, "max_context": 0}, num_draft_tokens=num_draft_tokens,
                     block_size=block_size, step_timeout_s=start_timeout_s, placement_group=group)
        try:
            info = engine._call([("target", target.info.remote())], "start")[0]
            engine._vocab, engine._max_context = info["vocab_size"], info["max_context"]
            if draft is not None:
                engine._call([("draft", draft.info.remote())], "start")
                addr, port = engine._call([("target", target.transport_address.remote())], "start")[0]
                backend = "gloo" if colocate else None
                engine._call([("target", target.init_transport.remote(addr, port, 0, 2, backend)),
                              ("draft", draft.init_transport.remote(addr, port, 1, 2, backend))], "transport setup")
        except BaseException:
            engine.shutdown()
            raise
        engine.step_timeout_s = step_timeout_s
        return engine

    @property
    def workers(self) -> dict:
        """Ray actor handles by role (``target``, and ``draft`` when there is one)."""
        return {role: a for role, a in (("target", self._target), ("draft", self._draft)) if a is not None}

    def shutdown(self) -> None:
        """Kill the workers (no graceful transport teardown: a peer may be stuck in a receive)."""
        for actor in (self._draft, self._target):
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self._draft = self._target = None
        if self._placement_group is not None:
            ray.util.remove_placement_group(self._placement_group)
            self._placement_group = None
        self._failed = self._failed or "the engine was shut down"

    # ----------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[GenerationResult]:
        """Generate for every prompt in one batch; same results as the reference loop."""
        if self._failed is not None:
            raise EngineError(f"engine unusable ({self._failed}); shut it down and start a new one")
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling parameters")
        self._validate(prompts)
        reqs = [SequenceState(next(self._req_ids), list(p), sp, len(p)) for p, sp in zip(prompts, params_list)]
        if not reqs:
            return []
        self._admit(reqs)
        try:
            self._run(reqs)
        except EngineError as exc:
            self._failed = str(exc)
            raise
        return [r.result() for r in reqs]

    def kv_free_tokens(self) -> dict[str, int]:
        """Free KV tokens per role (``target``, and ``draft`` when there is one)."""
        calls = [("target", self._target.kv_free_tokens.remote())]
        if self._draft is not None:
            calls.append(("draft", self._draft.kv_free_tokens.remote()))
        return dict(zip((role for role, _ in calls), self._call(calls, "kv_free_tokens")))

    # ----------------------------------------------------------------- step loop
    def _run(self, reqs: list[SequenceState]) -> None:
        new = [(r.req_id, list(r.tokens), r.params) for r in reqs]
        calls = [("target", self._target.add_requests.remote(new))]
        if self._draft is not None:
            calls.append(("draft", self._draft.add_requests.remote(new)))
        first = self._call(calls, "prefill")[0]
        self._count_token_msg()
        for r in reqs:
            r.stats.target_forward_passes += 1
            r.emit(first[r.req_id]["token_ids"])
        active = self._retire(reqs)
        step = 0
        while active:
            step += 1
            ids = [r.req_id for r in active]
            draft_ids = [r.req_id for r in active if len(r.tokens) + self.num_draft_tokens < self._max_context]
            if self._draft is None:
                draft_ids = []
            calls = [("target", self._target.verify.remote(step, ids, draft_ids))]
            if draft_ids:
                calls.append(("draft", self._draft.propose.remote(step, draft_ids, self._token_msgs)))
            out = self._call(calls, f"step {step}")[0]
            self._count_token_msg()
            for r in active:
                result = out[r.req_id]
                r.stats.record(result["num_proposed"], result["num_accepted"])
                r.emit(result["token_ids"])
                if r.finish_reason is None and len(r.tokens) >= self._max_context:
                    r.finish_reason = "length"
            active = self._retire(active)

    def _retire(self, reqs: list[SequenceState]) -> list[SequenceState]:
        """Free finished requests on every worker; return the ones still running."""
        done = [r.req_id for r in reqs if r.finish_reason is not None]
        if done:
            calls = [("target", self._target.free.remote(done))]
            if self._draft is not None:
                calls.append(("draft", self._draft.free.remote(done)))
            self._call(calls, "free")
        return [r for r in reqs if r.finish_reason is None]

    def _count_token_msg(self) -> None:
        if self._draft is not None:
            self._token_msgs += 1

    # ----------------------------------------------------------------- checks
    def _validate(self, prompts: Sequence[Sequence[int]]) -> None:
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if min(prompt) < 0 or max(prompt) >= self._vocab:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {self._vocab})")
            if len(prompt) >= self._max_context:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; the model's context is {self._max_context}")

    def _admit(self, reqs: list[SequenceState]) -> None:
        """The whole batch must fit in every worker's KV cache (no queueing yet)."""
        extra = self.num_draft_tokens + 1
        need = sum(
            -(-(min(r.num_prompt + r.params.max_tokens, self._max_context) + extra) // self.block_size) * self.block_size
            for r in reqs
        )
        for role, free in self.kv_free_tokens().items():
            if need > free:
                raise ValueError(f"batch needs up to {need} KV tokens but the {role} worker has {free} free")

    def _call(self, calls: list[tuple[str, ray.ObjectRef]], phase: str) -> list:
        """Wait for every call with one deadline; a failure or silence raises ``EngineError``."""
        deadline = time.monotonic() + self.step_timeout_s
        role_of = {ref: role for role, ref in calls}
        pending = [ref for _, ref in calls]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                silent = ", ".join(role_of[ref] for ref in pending)
                raise EngineError(f"{phase}: no reply from the {silent} worker within {self.step_timeout_s:.0f} s")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                raise EngineError(f"{phase}: the {role_of[ready[0]]} worker failed: {type(exc).__name__}: {exc}") from exc
        return ray.get([ref for _, ref in calls])
