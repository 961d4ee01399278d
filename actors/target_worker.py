"""Target (verifier) worker: owns the target model and its KV cache, prefills and verifies (data plane).

A plain class: the control plane wraps it with ``ray.remote(...).options(...)``; tests can use it
directly. It executes the plan of one step and decides nothing about scheduling.

Step plan, as the reference loop (``actors.spec.reference.generate``) does it:

* ``add_requests``: one ragged prefill of the new prompts; the first token of each comes from
  the target alone (``verify`` of an empty proposal);
* ``verify(step, req_ids, draft_req_ids)``: receive the draft's proposals for ``draft_req_ids``
  over the transport (the others get none), feed ``[last token, *draft]`` per request in one
  forward, ``verify``, commit the accepted path in the KV cache.

After either, the emitted tokens go to the draft over the transport (``isend``, one *tokens*
message per call) and back to the control plane as plain ids with per-request stats.

Invariants (as the reference's): before a step each request's KV holds every token but the last;
the accepted path is committed and everything else of the step is dropped; a request's sampling
generator is seeded from its own ``SamplingParams.seed`` and consumed in the reference's order,
so seeded sampling reproduces the reference loop exactly.
"""

from __future__ import annotations

import torch

from actors.spec.sampling import make_generator
from actors.spec.types import Proposal, SamplingParams
from actors.spec.verify import verify
from actors.step_batch import SeqStep, StepBatch
from actors.transport import (
    Transport,
    free_port,
    node_address,
    pack_tokens,
    pick_device,
    unpack_proposals,
)

TARGET_RANK, DRAFT_RANK = 0, 1


class TargetWorker:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: torch.dtype | None = None,
        kv_budget_tokens: int = 4096,
        block_size: int = 16,
        device: torch.device | str | None = None,
    ) -> None:
        from actors.model.loader import load_model

        torch.set_num_threads(1)
        self.device = torch.device(device) if device is not None else pick_device()
        self.model = load_model(model_path, dtype=dtype, device=self.device)
        self.cache = self.model.make_kv_cache(kv_budget_tokens * self.model.kv_bytes_per_token, block_size=block_size)
        self.transport: Transport | None = None
        self._tokens: dict[int, list[int]] = {}
        self._params: dict[int, SamplingParams] = {}
        self._generators: dict[int, torch.Generator | None] = {}

    def info(self) -> dict:
        cfg = self.model.config
        return {"vocab_size": cfg.vocab_size, "max_context": cfg.max_context, "device": str(self.device),
                "kv_capacity_tokens": self.cache.capacity_tokens}

    def transport_address(self) -> tuple[str, int]:
        """(node address, free port) for the process group's TCP store; rank 0 hosts it."""
        addr = node_address()
        return addr, free_port(addr)

    def init_transport(self, addr: str, port: int, rank: int, world_size: int, backend: str | None = None) -> str:
        self.transport = Transport(addr, port, rank, world_size, self.device, backend=backend)
        return self.transport.backend

    # ----------------------------------------------------------------- step plan
    @torch.inference_mode()
    def add_requests(self, requests: list[tuple[int, list[int], SamplingParams]]) -> dict[int, dict]:
        """Prefill new requests in one ragged step -> {req_id: {"token_ids": [first token]}}."""
        for req_id, prompt, params in requests:
            self.cache.add_sequence(req_id)
            self._tokens[req_id] = list(prompt)
            self._params[req_id] = params
            self._generators[req_id] = make_generator(params, self.device)
        batch = StepBatch.build(self.cache, [SeqStep(r, p, logits="last") for r, p, _ in requests])
        rows = batch.split_logits(self.model.forward(batch, self.cache))
        emitted = {}
        for (req_id, _, params), row in zip(requests, rows):
            self.cache.commit(req_id)
            emitted[req_id] = verify(Proposal.empty(), row, params, self._generators[req_id]).token_ids
        return self._emit(emitted, {})

    @torch.inference_mode()
    def verify(self, step: int, req_ids: list[int], draft_req_ids: list[int]) -> dict[int, dict]:
        """Verify one step -> {req_id: {"token_ids", "num_accepted", "num_proposed"}}.

        Receives exactly one proposals message from the draft when ``draft_req_ids`` is non-empty.
        """
        proposals: dict[int, Proposal] = {}
        if draft_req_ids:
            proposals = unpack_proposals(self.transport.recv(DRAFT_RANK))
            if sorted(proposals) != sorted(draft_req_ids):
                raise RuntimeError(f"step {step}: proposals for {sorted(proposals)}, expected {sorted(draft_req_ids)}")
        plan = [(r, proposals.get(r, Proposal.empty())) for r in req_ids]
        steps = [
            SeqStep(r, [self._tokens[r][-1], *p.token_ids.tolist()], parents=[-1, *(q + 1 for q in p.parents)])
            for r, p in plan
        ]
        batch = StepBatch.build(self.cache, steps)
        rows = batch.split_logits(self.model.forward(batch, self.cache))
        emitted, stats = {}, {}
        for (req_id, proposal), row in zip(plan, rows):
            verdict = verify(proposal, row, self._params[req_id], self._generators[req_id])
            self.cache.commit(req_id, [0, *(a + 1 for a in verdict.accepted)])
            emitted[req_id] = verdict.token_ids
            stats[req_id] = {"num_accepted": verdict.num_accepted,
                             "num_proposed": max(proposal.depths, default=-1) + 1}
        return self._emit(emitted, stats)

    def free(self, req_ids: list[int]) -> None:
        for req_id in req_ids:
            if req_id in self.cache:
                self.cache.free(req_id)
            self._tokens.pop(req_id, None)
            self._params.pop(req_id, None)
            self._generators.pop(req_id, None)

    def kv_free_tokens(self) -> int:
        return self.cache.free_tokens

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # ----------------------------------------------------------------- helpers
    def _emit(self, emitted: dict[int, list[int]], stats: dict[int, dict]) -> dict[int, dict]:
        """Record emitted tokens, tell the draft (async), and build the control-plane reply."""
        for req_id, token_ids in emitted.items():
            self._tokens[req_id].extend(token_ids)
        if self.transport is not None and self.transport.world_size > DRAFT_RANK:
            self.transport.isend(pack_tokens(emitted), DRAFT_RANK)
        return {r: {"token_ids": list(t), **stats.get(r, {})} for r, t in emitted.items()}

