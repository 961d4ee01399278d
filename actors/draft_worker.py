"""Draft worker: owns the draft model and its KV cache, proposes draft tokens (data plane).

A plain class: the control plane wraps it with ``ray.remote(...).options(...)``; tests can use it
directly. The draft is a checkpoint path, or ``self:N`` — the first N layers + head of its *own*
loaded copy of the target checkpoint (weights are not shared across processes) — or
``oracle:ALPHA:DRAFT`` for emulated acceptance (``actors.spec.oracle``).

One call per engine step, ``step(step_id, new, drafts, num_token_msgs, free_ids)``:

1. free ``free_ids``; remember ``new`` requests (their token lists so far: a prompt, or after the
   draft came back from a failure, prompt + output); the ``DraftModelProposer`` catches its cache
   up lazily at the first proposal;
2. receive the target's *tokens* messages until ``num_token_msgs`` have arrived on this link in
   total (the control plane counts what the target sent), extending each request's tokens;
3. propose ``drafts[req_id]`` tokens (a chain) for each request in ``drafts`` and send one
   *proposals* message to the target (none when ``drafts`` is empty);
4. with ``overlap``: speculate the *next* step's proposal while the target verifies this one
   (PEARL post-verify). Assume this proposal is accepted whole, draft the target's bonus token
   ``e1`` and then the next chain ``e2..``. At the next step, if the target really emitted
   ``proposal + [e1]`` (a *hit*), ``e2..`` is sent at once with no drafting on the critical path;
   otherwise (a *miss*) the speculation is dropped, the draft KV rolls back to the real tokens by
   the proposer's common-prefix catch-up, and a fresh proposal is drafted — of one token when
   ``pre_verify`` is set (the target checks it while the rest is speculated), else of the full
   length. A miss costs the speculation's time before the fresh draft can start, so a request
   is speculated for only while its recent hit rate is at least ``MIN_HIT_RATE`` (probing every
   ``PROBE_EVERY`` steps otherwise). The speculation is bounded by the time it can hide in: with
   the engine's estimate of the target's verify time ``verify_s`` and this worker's measured time
   per draft level, it drafts at most ``speculation_depth(...)`` levels (the bonus guess and the
   first tokens of the next chain), so a miss never waits for it; a hit then extends the chain to
   the k asked for (one catch-up forward, then the remaining levels). With a draft fast enough to
   draft k + 1 levels in one verify this is PEARL unchanged; with a slow one, a hit still saves
   the pre-drafted levels and a miss costs what taking turns costs.

5. with ``ahead`` (the engine expects the same requests to be drafted for at the next step; not
   with ``pre_verify``): once the reply is sent, wait for the target's tokens of this step and draft
   the next chain at once for each request whose overlap speculation did not hit (all of them when
   taking turns) — step channel only: its ``after`` work — so the next step finds it ready and
   sends it without drafting. The engine's handling of the reply and its next call
   no longer sit between the target's tokens and the draft's first level. A next step that asks
   for fewer tokens uses a prefix, one that asks for more extends it; a request the next step
   does not draft for (or re-sends whole) drops it, and the proposer's common-prefix catch-up
   rolls the draft KV back. Greedy requests only: a dropped sampled chain would have consumed
   the request's random stream.

Invariants: a request's token list here equals the control plane's (prompt + every emitted
token) whenever it is drafted for; tokens for requests already freed are ignored; every
proposal's ``draft_probs`` are the distributions its tokens were drawn from, given the real
context they will be verified in (a hit means that context is exactly what was assumed), so
verification stays lossless with or without overlap. Without overlap the draft's random stream
per request is the reference loop's, so seeded sampling reproduces the reference exactly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from actors.spec.proposers import (
    DraftModelProposer,
    ProposeRequest,
    TreeShape,
    parse_draft_spec,
)
from actors.spec.types import Proposal, SamplingParams
from actors.step_channel import locked as _locked
from actors.target_worker import DRAFT_RANK, TARGET_RANK
from actors.transport import (
    PeerLostError,
    Transport,
    assigned_gpu_ids,
    node_address,
    node_id,
    pack_proposals,
    pick_device,
    unpack_tokens,
)


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


log = logging.getLogger("outrider.draft_worker")

HIT_PRIOR, HIT_DECAY = 0.5, 0.7  # overlap hit-rate estimate per request (EMA)
MIN_HIT_RATE, PROBE_EVERY = 0.25, 8  # below the rate, speculate only every PROBE_EVERY-th step
LEVEL_DECAY = 0.8  # EMA of the measured seconds per speculated draft level


def speculation_depth(wanted: int, verify_s: float | None, level_s: float | None) -> int:
    """Levels to speculate (bonus guess + next chain) while the target verifies: all ``wanted``
    when either time is unknown or they fit, else as many as fit in ``verify_s`` (at least 2:
    the bonus and one token, less would pre-draft nothing)."""
    if not verify_s or not level_s or level_s <= 0:
        return wanted
    return max(2, min(wanted, int(verify_s / level_s)))


def chain_concat(first: Proposal, rest: Proposal) -> Proposal:
    """One chain: ``first``'s tokens, then ``rest``'s (drafted after them); draft probabilities
    stay with their tokens (None when either part is greedy)."""
    ids = torch.cat([first.token_ids.reshape(-1), rest.token_ids.reshape(-1)])
    probs = None
    if first.draft_probs is not None and rest.draft_probs is not None:
        probs = torch.cat([first.draft_probs, rest.draft_probs])
    return Proposal.chain(ids, probs)


def chain_slice(proposal: Proposal, start: int, count: int) -> Proposal:
    """Tokens ``[start, start + count)`` of a chain proposal, as a chain of their own."""
    ids = proposal.token_ids[start : start + count]
    probs = None if proposal.draft_probs is None else proposal.draft_probs[start : start + count]
    return Proposal.chain(ids, probs)


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
        overlap: bool = False,
        pre_verify: bool = False,
        oracle_continuations: list | None = None,
        fused_kernels: bool = False,
    ) -> None:
        from actors.model.loader import load_config
        from actors.model.sources import resolve_model_path

        torch.set_num_threads(1)
        self._lock = threading.RLock()  # Ray's thread and the step channel's (actors/step_channel.py)
        self._channel = None
        target_path = resolve_model_path(target_path)  # "demo": this node's cached copy
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.device = torch.device(device) if device is not None else pick_device()
        target_vocab = load_config(target_path).vocab_size
        kind, value = parse_draft_spec(draft_spec)
        model = load_draft_model(value[1] if kind == "oracle" else draft_spec, target_path, dtype=dtype,
                                 device=self.device)
        if fused_kernels:
            model.use_compiled(True)
        self.proposer = DraftModelProposer(
            model, target_vocab_size=target_vocab,
            kv_budget_bytes=kv_budget_tokens * model.kv_bytes_per_token, block_size=block_size,
        )
        if kind == "oracle":  # emulated acceptance (benchmarks): real draft cost, oracle tokens
            from actors.spec.oracle import OracleProposer, load_continuations

            if oracle_continuations is None:
                raise ValueError(f"draft {draft_spec!r} needs the target's recorded continuations")
            self.proposer = OracleProposer(self.proposer, load_continuations(oracle_continuations),
                                           alpha=value[0], vocab_size=target_vocab)
        self.max_draft_tokens = num_draft_tokens
        self.overlap, self.pre_verify = overlap, pre_verify
        self.link: Transport | None = None
        self._tokens: dict[int, list[int]] = {}
        self._params: dict[int, SamplingParams] = {}
        # req -> ((base length, assumed tokens after it), next chain)
        self._speculation: dict[int, tuple[tuple[int, list[int]], Proposal]] = {}
        self._level_s: float | None = None  # measured seconds per speculated draft level (EMA)
        self._verify_s: float | None = None  # the engine's estimate of the target's verify time
        self._hit_rate: dict[int, float] = {}  # per request, recent share of speculations used
        self._since_probe: dict[int, int] = {}
        self._to_speculate: set[int] = set()
        self._token_msgs = 0  # tokens messages received on the current link
        self._ahead_plan: dict[int, int] | None = None  # req -> k to draft ahead once the reply is sent
        self._ahead: dict[int, tuple[int, Proposal]] = {}  # req -> (token count it was drafted at, chain)
        self._ahead_s = 0.0  # drafting seconds of the last ahead run (reported with the next step)
        self._ahead_error: BaseException | None = None  # the link failed while waiting ahead

    def info(self) -> dict:
        return {"ready": True, "device": str(self.device), "gpu_ids": assigned_gpu_ids(), "node": node_id(),
                "pid": os.getpid(),
                "kv_capacity_tokens": self.proposer.cache.capacity_tokens}

    @_locked
    def capture_buckets(self, max_batch: int, queries: list[int], max_kv: int) -> dict:
        """Capture the drafting buckets now (``GraphRunner.capture_decode_buckets``); a no-op
        without CUDA graphs or for a proposer without a model."""
        runner = getattr(self.proposer, "runner", None)
        if runner is None:
            return {"shapes": 0, "captured": 0, "seconds": 0.0}
        return runner.capture_decode_buckets(max_batch, queries, max_kv, all_logits=False)  # catch-ups: last rows

    def open_step_channel(self) -> tuple[str, int, str]:
        """(host, port, token) of this worker's step channel (opened on first call)."""
        from actors.step_channel import StepChannelServer

        if self._channel is None:
            self._channel = StepChannelServer(node_address(), {"step": self.step, "free": self.free}, self._lock,
                                              after={"step": self.draft_ahead})
        return self._channel.address()

    @_locked
    def init_transport(self, addr: str, port: int, backend: str | None = None, timeout_s: float = 60.0) -> str:
        """Join a new draft link as rank 1; requests of an earlier link are forgotten."""
        if self.link is not None:
            self.link.close()
        for req_id in list(self._tokens):
            self._forget(req_id)
        self.link = Transport(addr, port, DRAFT_RANK, 2, self.device, backend=backend, timeout_s=timeout_s,
                              time_round_trips=True)
        self._token_msgs = 0
        self._ahead_plan, self._ahead_error = None, None
        return self.link.backend

    # ----------------------------------------------------------------- the step
    @_locked
    def step(self, step_id: int, new: list[tuple[int, list[int], SamplingParams]], drafts: dict[int, int],
             num_token_msgs: int, free_ids: list[int], verify_s: float | None = None, ahead: bool = False) -> dict:
        """Run one engine step -> timings and overlap hit counts. ``verify_s``: the engine's estimate
        of the target's verify time, which bounds the speculation (None: unbounded). ``ahead``: draft
        the next chain of these requests as soon as the target's tokens of this step arrive
        (``draft_ahead``; greedy requests, not with pre_verify, over the step channel)."""
        if self._ahead_error is not None:
            error, self._ahead_error = self._ahead_error, None
            raise PeerLostError(f"the draft link failed while drafting ahead: {error}")
        self._verify_s = verify_s
        self._ahead_plan = None
        ahead_s, self._ahead_s = self._ahead_s, 0.0
        t_in = time.perf_counter()
        for req_id in free_ids:
            self._forget(req_id)
        # the target's tokens messages first, then the engine's entries: a new request, or the
        # whole token list of one whose tokens the target did not send (steps the draft sat out),
        # which replaces what the messages gave
        while self._token_msgs < num_token_msgs:
            for req_id, token_ids in unpack_tokens(self.link.recv(TARGET_RANK)).items():
                if req_id in self._tokens:
                    self._tokens[req_id].extend(token_ids)
            self._token_msgs += 1
        for req_id, tokens, params in new:
            self._tokens[req_id] = list(tokens)
            self._params[req_id] = params
            self._ahead.pop(req_id, None)  # its tokens were replaced: what was drafted ahead may not fit
        ids = list(drafts)
        for req_id in [r for r in self._ahead if r not in drafts]:
            del self._ahead[req_id]  # not drafted for this step: rolled back by the next catch-up
        # a proposal that first prefills a long catch-up (a new request's prompt, the tokens of steps
        # the draft sat out) is no drafting cost sample; it is one of the catch-up's cost
        catch_ups = [self.proposer.catch_up_length(r, self._tokens[r]) for r in ids]
        long_catch_up = any(n > 2 * self.max_draft_tokens + 2 for n in catch_ups)
        t0, (captures, capture_s) = time.perf_counter(), self._capture_stats()
        proposals, hits, extended, used_ahead = self._proposals(ids, drafts)
        t_proposed = time.perf_counter()
        if ids:
            self.link.send(pack_proposals(ids, [proposals[r] for r in ids]), TARGET_RANK)
        t1 = time.perf_counter()
        captured = self._capture_stats()[0] != captures or long_catch_up  # not a cost sample
        if self.overlap and ids:
            self._speculate(ids, proposals, drafts)
        t2 = time.perf_counter()
        if ahead and ids and not self.pre_verify and self._channel is not None and self.link is not None \
                and all(self._params[r].greedy for r in ids):
            self._ahead_plan = {r: min(drafts[r], self.max_draft_tokens) for r in ids}
        # a chain drafted ahead still cost its levels on the draft's device: the cost sample keeps them
        drafted_s = (t1 - t0) + (ahead_s if used_ahead else 0.0)
        reply = {"step": step_id, "num_proposed": sum(len(p) for p in proposals.values()), "batch": len(ids),
                 "levels": max((len(p) for p in proposals.values()), default=0),
                 "hits": hits, "misses": (len(ids) - hits) if self.overlap else 0, "extended": extended,
                 "ahead_used": used_ahead,
                 "propose_s": 0.0 if captured else drafted_s, "speculate_s": t2 - t1,
                 "propose_wall_s": t1 - t0,  # the real time, also when it is no cost sample
                 "phases": {"recv_tokens": t0 - t_in, "propose": t_proposed - t0, "send": t1 - t_proposed,
                            "speculate": t2 - t1, "ahead": ahead_s}}
        now_captures, now_capture_s = self._capture_stats()
        if long_catch_up and now_captures == captures:  # the drafting levels' share is small; it stays in
            reply["catch_up_tokens"], reply["catch_up_s"] = sum(catch_ups), t1 - t0
        if now_captures != captures:
            reply["captures"], reply["capture_s"] = now_captures - captures, now_capture_s - capture_s
        return reply

    @_locked
    def draft_ahead(self) -> None:
        """The step channel's work once a step's reply is sent: when that step asked for it, wait for
        the target's tokens of the step (the engine counts them as delivered, so the next step does
        not wait again) and draft each request's next chain now (``self._ahead``). A failed link is
        raised by the next step."""
        plan, self._ahead_plan = self._ahead_plan, None
        if not plan or self.link is None:
            return
        try:
            message = unpack_tokens(self.link.recv(TARGET_RANK))
        except PeerLostError as exc:
            self._ahead_error = exc
            return
        self._token_msgs += 1
        for req_id, token_ids in message.items():
            if req_id in self._tokens:
                self._tokens[req_id].extend(token_ids)
        t0 = time.perf_counter()
        wanted = {r: k for r, k in plan.items()  # with overlap: only where the speculation missed
                  if r in self._tokens and not self._speculation_hit(r, *self._speculation.get(r, (None, None)))}
        try:
            chains = self._draft_chains(wanted)
        except Exception:  # noqa: BLE001 - e.g. no KV room: the next step drafts as usual (and reports it)
            log.warning("drafting ahead failed; the next step drafts these %d requests itself", len(wanted),
                        exc_info=True)
            chains = {}
        for req_id, chain in chains.items():
            self._ahead[req_id] = (len(self._tokens[req_id]), chain)
        self._ahead_s = time.perf_counter() - t0

    @_locked
    def free(self, req_ids: list[int]) -> None:
        for req_id in req_ids:
            self._forget(req_id)

    def _capture_stats(self) -> tuple[int, float]:
        """(CUDA graphs captured so far, their seconds) by the proposer's graph runner."""
        runner = getattr(self.proposer, "runner", None)
        return (runner.stats["captures"], runner.stats["capture_s"]) if runner is not None else (0, 0.0)

    @_locked
    def retrack_oracle(self, continuations: list[dict]) -> int:
        """Re-record an oracle draft's continuations (``[{"prompt": ids, "output": ids}, ...]``, see
        ``OracleProposer.retrack``); returns how many prompts were re-recorded (0: no oracle here)."""
        from actors.spec.oracle import OracleProposer, load_continuations

        if not isinstance(self.proposer, OracleProposer):
            return 0
        return self.proposer.retrack(load_continuations(continuations))

    @_locked
    def kv_free_tokens(self) -> int:
        return self.proposer.cache.free_tokens

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.link is not None:
            self.link.close()
            self.link = None

    # ----------------------------------------------------------------- helpers
    def _forget(self, req_id: int) -> None:
        self.proposer.finish(req_id)
        self._tokens.pop(req_id, None)
        self._params.pop(req_id, None)
        self._speculation.pop(req_id, None)
        self._ahead.pop(req_id, None)
        self._hit_rate.pop(req_id, None)
        self._since_probe.pop(req_id, None)

    def _proposals(self, ids: list[int], drafts: dict[int, int]) -> tuple[dict[int, Proposal], int, int, int]:
        """Reuse chains drafted ahead and speculations that hit (extended to the k asked for when
        shorter); draft the rest fresh (batched by length). Decides which requests are speculated for
        after this proposal (``self._to_speculate``). Returns (proposals, hits, hits extended, chains
        drafted ahead used)."""
        out, fresh, extend = {}, {}, {}
        used_ahead = extended_ahead = 0
        self._to_speculate = set()
        for req_id in ids:
            k = min(drafts[req_id], self.max_draft_tokens)
            assumed, chain = self._speculation.pop(req_id, (None, None))
            hit = self._speculation_hit(req_id, assumed, chain)
            if chain is not None:
                rate = self._hit_rate.get(req_id, HIT_PRIOR)
                self._hit_rate[req_id] = HIT_DECAY * rate + (1 - HIT_DECAY) * float(hit)
            speculate = self.overlap and self._worth_speculating(req_id)
            if speculate:
                self._to_speculate.add(req_id)
            drafted = self._ahead.pop(req_id, None)
            if not hit and drafted is not None and drafted[0] == len(self._tokens[req_id]) and len(drafted[1]) > 0:
                used_ahead += 1  # drafted as the tokens arrived (taking turns, or after an overlap miss)
                out[req_id] = chain_slice(drafted[1], 0, k)
                if len(out[req_id]) < k:
                    extend[req_id] = k - len(out[req_id])
                    extended_ahead += 1
                continue
            if hit:
                out[req_id] = chain_slice(chain, 0, k)
                if len(out[req_id]) < k:
                    extend[req_id] = k - len(out[req_id])
            else:
                fresh[req_id] = 1 if (speculate and self.pre_verify) else k
        out.update(self._draft_chains(fresh))
        # extensions draft after the pre-drafted tokens, in their context
        more = self._draft_chains(extend, {r: self._tokens[r] + out[r].token_ids.tolist() for r in extend})
        for req_id, chain in more.items():
            out[req_id] = chain_concat(out[req_id], chain)
        return out, len(ids) - len(fresh) - used_ahead, len(extend) - extended_ahead, used_ahead

    def _draft_chains(self, lengths: dict[int, int], contexts: dict[int, list[int]] | None = None
                      ) -> dict[int, Proposal]:
        """A chain of ``lengths[r]`` tokens for each request, after its tokens (or ``contexts[r]``),
        drafted in one batch per length."""
        by_length: dict[int, list[int]] = {}
        for req_id, k in lengths.items():
            by_length.setdefault(k, []).append(req_id)
        out = {}
        for k, group in by_length.items():
            requests = [ProposeRequest(r, (contexts or self._tokens)[r], self._params[r]) for r in group]
            out.update(zip(group, self.proposer.propose(requests, TreeShape.chain(k))))
        return out

    def _speculation_hit(self, req_id: int, assumed, chain) -> bool:
        """Whether a speculation (``assumed`` = (base length, tokens assumed after it), ``chain``)
        matches the request's real tokens: tokens only grow, so the base is a prefix and the tail
        alone is compared."""
        tokens = self._tokens[req_id]
        return (chain is not None and len(chain) > 0 and len(tokens) == assumed[0] + len(assumed[1])
                and tokens[assumed[0]:] == assumed[1])

    def _worth_speculating(self, req_id: int) -> bool:
        """Speculate while this request's pre-drafted chains tend to be used; otherwise only probe
        now and then. A miss costs the speculation's time before the fresh draft can start."""
        if self._hit_rate.get(req_id, HIT_PRIOR) >= MIN_HIT_RATE:
            return True
        self._since_probe[req_id] = self._since_probe.get(req_id, 0) + 1
        if self._since_probe[req_id] >= PROBE_EVERY:
            self._since_probe[req_id] = 0
            return True
        return False

    def _speculate(self, ids: list[int], proposals: dict[int, Proposal], drafts: dict[int, int]) -> None:
        """Draft the bonus token and the next chain, assuming each proposal is accepted whole: as
        many levels as hide in the target's verify (``speculation_depth``)."""
        by_length: dict[int, list[int]] = {}
        for req_id in ids:
            if len(proposals[req_id]) > 0 and req_id in self._to_speculate:
                wanted = min(drafts[req_id], self.max_draft_tokens) + 1
                depth = speculation_depth(wanted, self._verify_s, self._level_s)
                by_length.setdefault(depth, []).append(req_id)
        for depth, group in by_length.items():
            assumed = {r: self._tokens[r] + proposals[r].token_ids.tolist() for r in group}
            requests = [ProposeRequest(r, assumed[r], self._params[r]) for r in group]
            t0, captures = time.perf_counter(), self._capture_stats()[0]
            chains = self.proposer.propose(requests, TreeShape.chain(depth))
            if self._capture_stats()[0] == captures:  # a graph capture is not a level time
                level_s = (time.perf_counter() - t0) / depth
                self._level_s = level_s if self._level_s is None else (
                    LEVEL_DECAY * self._level_s + (1 - LEVEL_DECAY) * level_s)
            for req_id, chain in zip(group, chains):
                if len(chain) >= 2:
                    bonus = int(chain.token_ids[0])
                    base = len(self._tokens[req_id])
                    tail = assumed[req_id][base:] + [bonus]  # the proposal, then the guessed bonus
                    self._speculation[req_id] = ((base, tail), chain_slice(chain, 1, depth - 1))
