"""Draft worker: owns the draft model and its KV cache, proposes draft tokens (data plane).

A plain class: the control plane wraps it with ``ray.remote(...).options(...)``; tests can use it
directly. The draft is a checkpoint path, or ``self:N`` — the first N layers + head of its *own*
loaded copy of the target checkpoint (weights are not shared across processes).

Step plan:

* ``add_requests``: remember each request's prompt and sampling parameters (no forward yet: the
  ``DraftModelProposer`` catches its cache up lazily at the first proposal);
* ``propose(step, draft_req_ids, num_token_msgs)``: first receive the target's *tokens*
  messages until ``num_token_msgs`` have arrived in total (the control plane counts what the
  target sent), extend each request's token list, then draft a chain of ``num_draft_tokens`` for
  ``draft_req_ids`` and send one *proposals* message to the target.

Invariants: a request's token list here equals the control plane's (prompt + every emitted
token) whenever it is drafted for; tokens for requests already freed are ignored; the draft's
random stream per request is the one the reference loop's proposer uses (derived from the
request seed), consumed in the same order, so seeded sampling reproduces the reference exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from actors.spec.proposers import DraftModelProposer, ProposeRequest, TreeShape, parse_draft_spec
from actors.spec.types import SamplingParams
from actors.target_worker import TARGET_RANK
from actors.transport import Transport, pack_proposals, pick_device, unpack_tokens


def load_draft_model(draft_spec: str, target_path: str, *, dtype: torch.dtype | None, device: torch.device):
    """``self:N`` -> truncated copy of the target checkpoint; otherwise a draft checkpoint path."""
    from actors.model.loader import load_model

    kind, value = parse_draft_spec(draft_spec)
    if kind == "self":
        return load_model(target_path, dtype=dtype, device=device).truncated(value)
    if kind != "path" or not Path(value).exists():
        raise ValueError(f"draft spec {draft_spec!r}: expected self:N or an existing checkpoint path")
    _check_tokenizers(target_path, value)
    return load_model(value, dtype=dtype, device=device)


def _check_tokenizers(target_path: str, draft_path: str) -> None:
    """Same vocabulary, when both checkpoints carry a tokenizer."""
    from actors.model.tokenizer import (
        TokenizerLoadError,
        ensure_same_tokenizer,
        load_tokenizer,
    )

    try:
        target_tok, draft_tok = load_tokenizer(target_path), load_tokenizer(draft_path)
    except TokenizerLoadError:
        return
    ensure_same_tokenizer(target_tok, draft_tok)


class DraftWorker:
    def __init__(
        self,
        draft_spec: str,
        target_path: str,
        *,
        num_draft_tokens: int,
        dtype: torch.dtype | None = None,
        kv_budget_tokens: int = 4096,
        block_size: int = 16,
        device: torch.device | str | None = None,
    ) -> None:
        from actors.model.loader import load_config

        torch.set_num_threads(1)
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.device = torch.device(device) if device is not None else pick_device()
        target_vocab = load_config(target_path).vocab_size
        model = load_draft_model(draft_spec, target_path, dtype=dtype, device=self.device)
        self.proposer = DraftModelProposer(
            model, target_vocab_size=target_vocab,
            kv_budget_bytes=kv_budget_tokens * model.kv_bytes_per_token, block_size=block_size,
        )
        self.shape = TreeShape.chain(num_draft_tokens)
        self.transport: Transport | None = None
        self._tokens: dict[int, list[int]] = {}
        self._params: dict[int, SamplingParams] = {}
        self._token_msgs = 0  # tokens messages received from the target so far

    def info(self) -> dict:
        return {"device": str(self.device), "kv_capacity_tokens": self.proposer.cache.capacity_tokens}

    def init_transport(self, addr: str, port: int, rank: int, world_size: int, backend: str | None = None) -> str:
        self.transport = Transport(addr, port, rank, world_size, self.device, backend=backend)
        return self.transport.backend

    # ----------------------------------------------------------------- step plan
    def add_requests(self, requests: list[tuple[int, list[int], SamplingParams]]) -> None:
        for req_id, prompt, params in requests:
            self._tokens[req_id] = list(prompt)
            self._params[req_id] = params

    def propose(self, step: int, draft_req_ids: list[int], num_token_msgs: int) -> dict:
        """Catch up with the target's emitted tokens, draft, send the proposals -> small stats."""
        while self._token_msgs < num_token_msgs:
            for req_id, token_ids in unpack_tokens(self.transport.recv(TARGET_RANK)).items():
                if req_id in self._tokens:
                    self._tokens[req_id].extend(token_ids)
            self._token_msgs += 1
        requests = [ProposeRequest(r, self._tokens[r], self._params[r]) for r in draft_req_ids]
        proposals = self.proposer.propose(requests, self.shape)
        self.transport.send(pack_proposals(draft_req_ids, proposals), TARGET_RANK)
        return {"step": step, "num_proposed": sum(len(p) for p in proposals)}

    def free(self, req_ids: list[int]) -> None:
        for req_id in req_ids:
            self.proposer.finish(req_id)
            self._tokens.pop(req_id, None)
            self._params.pop(req_id, None)

    def kv_free_tokens(self) -> int:
        return self.proposer.cache.free_tokens

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

