"""Proposers: where draft tokens come from (data plane).

Every speculative method is a proposer behind one interface: given the sequences of one step
(their full token lists, the last token not yet verified-into the target's KV) it returns one
``Proposal`` per sequence. This module holds the interface and the model-based proposers:

* ``DraftModelProposer`` — a draft model with its own paged KV cache; drafts a chain, a token
  tree (branching per level, siblings drawn without replacement) or several independent drafts
  (siblings drawn with replacement: multi-draft), batched over all sequences per draft level;
* self-speculation (SWIFT/Kangaroo/DEL) is the same proposer over ``target.truncated(n)``: the
  target's first n layers and its head, weights shared.

Invariants of ``DraftModelProposer``:

* the draft cache's committed entries are always a prefix of the sequence's real tokens; drafted
  (speculative) entries stay pending and are dropped after each proposal, so nothing the target
  rejects survives in the draft cache;
* ``draft_probs[j]`` is exactly the distribution node j was drawn from (processed by the request's
  own sampling parameters, renormalised after earlier siblings when drawn without replacement),
  which is what lossless verification needs. Greedy requests draft the top tokens with no probs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import torch

from actors.spec.sampling import make_generator, processed_probs
from actors.spec.types import Proposal, SamplingParams
from actors.step_batch import SeqStep


@dataclass(frozen=True)
class ProposeRequest:
    """One sequence asking for draft tokens: all its tokens so far (prompt + output)."""

    req_id: Hashable
    token_ids: Sequence[int]
    params: SamplingParams


@dataclass(frozen=True)
class TreeShape:
    """Branching factor per draft level; ``(1,) * k`` is a chain of k tokens.

    ``with_replacement`` draws siblings independently (multi-draft, SpecInfer/SpecTr style);
    otherwise siblings are drawn without replacement (recursive rejection sampling).
    """

    branching: tuple[int, ...]
    with_replacement: bool = False

    def __post_init__(self) -> None:
        if any(b < 1 for b in self.branching):
            raise ValueError(f"branching factors must be >= 1, got {self.branching}")

    @classmethod
    def chain(cls, num_tokens: int) -> TreeShape:
        return cls((1,) * num_tokens)

    @classmethod
    def multi_draft(cls, num_drafts: int, depth: int) -> TreeShape:
        return cls((num_drafts,) + (1,) * (depth - 1), with_replacement=True)

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def num_nodes(self) -> int:
        total, width = 0, 1
        for b in self.branching:
            width *= b
            total += width
        return total


class Proposer:
    """Interface of every draft source."""

    def propose(self, requests: Sequence[ProposeRequest], shape: TreeShape) -> list[Proposal]:
        raise NotImplementedError

    def finish(self, req_id: Hashable) -> None:
        """Forget a finished or aborted sequence (free its draft KV)."""


class DraftModelProposer(Proposer):
    """Drafts with a (smaller or truncated) model that shares the target's vocabulary."""

    def __init__(self, draft_model, *, target_vocab_size: int, kv_budget_bytes: int, block_size: int = 16):
        self.model = draft_model
        self.target_vocab_size = target_vocab_size
        self.cache = draft_model.make_kv_cache(kv_budget_bytes, block_size=block_size)
        from actors.model.graph_runner import GraphRunner

        self.runner = GraphRunner(draft_model, self.cache)  # CUDA graphs on a GPU, eager elsewhere
        self._cached_ids: dict[Hashable, list[int]] = {}
        self._generators: dict[Hashable, torch.Generator | None] = {}
        self.fast_greedy_chains = True  # greedy chains without a host round trip per level

    def catch_up_length(self, req_id: Hashable, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids`` the next proposal would feed before drafting (its prefill)."""
        return len(token_ids) - _reusable_prefix(self._cached_ids.get(req_id, []), token_ids)

    def finish(self, req_id: Hashable) -> None:
        if req_id in self.cache:
            self.cache.free(req_id)
        self._cached_ids.pop(req_id, None)
        self._generators.pop(req_id, None)

    @torch.inference_mode()
    def propose(self, requests: Sequence[ProposeRequest], shape: TreeShape) -> list[Proposal]:
        if not requests or shape.depth == 0:
            return [Proposal.empty() for _ in requests]
        if self.fast_greedy_chains and shape.num_nodes == shape.depth and all(r.params.greedy for r in requests):
            return self._greedy_chains(requests, shape.depth)
        # Level 0: catch the draft cache up with each sequence's real tokens; the logits at the
        # last real token give the distribution of the first draft level.
        steps = [self._catch_up_step(r) for r in requests]
        batch = self.runner.build(steps)
        first_logits = self.runner.forward(batch)  # [B, V]
        for step in steps:
            self.cache.commit(step.req_id)  # the catch-up tokens are real
        trees = [_TreeBuilder() for _ in requests]
        frontier_logits = {b: first_logits[b : b + 1] for b in range(len(requests))}
        frontier_nodes = {b: [-1] for b in range(len(requests))}
        for level, branching in enumerate(shape.branching):
            new_nodes = {}
            for b, logits in frontier_logits.items():
                request, tree = requests[b], trees[b]
                ids = []
                for row, parent in zip(logits, frontier_nodes[b]):
                    for token, q in self._draw(row, branching, request, shape.with_replacement):
                        ids.append(tree.add(token, parent, q))
                if ids:
                    new_nodes[b] = ids
            if level + 1 == shape.depth or not new_nodes:
                break
            # feed the new level (pending entries in the draft cache = tree nodes, in order)
            order = list(new_nodes)
            steps = [
                SeqStep(
                    requests[b].req_id,
                    [trees[b].tokens[i] for i in new_nodes[b]],
                    parents=[trees[b].parents[i] for i in new_nodes[b]],
                )
                for b in order
            ]
            batch = self.runner.build(steps)
            split = batch.split_logits(self.runner.forward(batch))
            frontier_logits = dict(zip(order, split))
            frontier_nodes = new_nodes
        proposals = []
        for request, tree in zip(requests, trees):
            self.cache.commit(request.req_id, [])  # drop drafted entries; keep the real prefix
            proposals.append(tree.build(greedy=request.params.greedy))
        return proposals

    def _greedy_chains(self, requests: Sequence[ProposeRequest], depth: int) -> list[Proposal]:
        """Greedy chains for a batch without a host round trip per level: each level's argmax stays
        on the device and is written into the next level's input ids (built with placeholder
        tokens: a chain level's metadata does not depend on the tokens), so the host queues level
        l + 1 while the device still runs level l, and reads every drafted token once at the end.
        Drafts, cache entries and proposals equal the level-by-level path's (same top-1 rule)."""
        steps = [self._catch_up_step(r) for r in requests]
        batch = self.runner.build(steps)
        logits = self.runner.forward(batch)  # [B, V] at each sequence's last real token
        for step in steps:
            self.cache.commit(step.req_id)  # the catch-up tokens are real
        levels = [_top1(logits, self.target_vocab_size)]
        for level in range(1, depth):
            # feed the previous level's token (tree node level - 1, whose parent is node level - 2)
            steps = [SeqStep(r.req_id, [0], parents=[level - 2]) for r in requests]
            batch = self.runner.build(steps)
            batch.input_ids[: len(steps)].copy_(levels[-1])  # one token per sequence: rows 0..B-1
            levels.append(_top1(self.runner.forward(batch), self.target_vocab_size))
        drafted = torch.stack(levels, dim=1).tolist()  # the one device->host read
        proposals = []
        for request, tokens in zip(requests, drafted):
            self.cache.commit(request.req_id, [])  # drop drafted entries; keep the real prefix
            proposals.append(Proposal.chain(tokens))
        return proposals

    # ----------------------------------------------------------------- helpers
    def _catch_up_step(self, request: ProposeRequest) -> SeqStep:
        req_id, ids = request.req_id, list(request.token_ids)
        if req_id not in self.cache:
            self.cache.add_sequence(req_id)
            self._cached_ids[req_id] = []
            draft_params = replace(request.params, seed=_draft_seed(request.params))
            self._generators[req_id] = make_generator(draft_params, self.cache.device)
        keep = _reusable_prefix(self._cached_ids[req_id], ids)
        self.cache.truncate(req_id, keep)
        self._cached_ids[req_id] = ids
        return SeqStep(req_id, ids[keep:], logits="last")

    def _draw(self, logits: torch.Tensor, count: int, request: ProposeRequest, with_replacement: bool):
        """Draw ``count`` children from one row of draft logits [V_draft].

        Yields ``(token, q)`` where q [V_target] is the distribution the token was drawn from
        (None for greedy requests, which draft the top tokens deterministically).
        """
        logits = _to_vocab(logits.float(), self.target_vocab_size)
        if request.params.greedy:
            for token in torch.topk(logits, k=min(count, logits.shape[0])).indices.tolist():
                yield token, None
            return
        generator = self._generators[request.req_id]
        current = processed_probs(logits[None], request.params)[0]
        for _ in range(count):
            total = float(current.sum())
            if total <= 0.0:
                return  # the support is exhausted (sampling without replacement)
            current = current / total
            token = int(torch.multinomial(current, 1, generator=generator))
            yield token, current
            if not with_replacement:
                current = current.clone()
                current[token] = 0.0


class _TreeBuilder:
    """Accumulates drafted nodes of one sequence, in the order they are appended to the cache."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.probs: list[torch.Tensor | None] = []

    def add(self, token: int, parent: int, q: torch.Tensor | None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.probs.append(q)
        return len(self.tokens) - 1

    def build(self, greedy: bool) -> Proposal:
        ids = torch.tensor(self.tokens, dtype=torch.long)
        if greedy or not self.probs or any(q is None for q in self.probs):
            return Proposal(ids, tuple(self.parents), None)
        return Proposal(ids, tuple(self.parents), torch.stack(self.probs))


def _reusable_prefix(cached: Sequence[int], ids: Sequence[int]) -> int:
    """Length of the common prefix of the cached and the real tokens, leaving at least the last real
    token to feed. The usual case — the cache is a prefix of the real tokens — is one C-level list
    comparison; only after a divergence (a rejected overlap speculation) is the prefix searched."""
    limit = min(len(cached), len(ids) - 1)
    if list(cached[:limit]) == list(ids[:limit]):
        return limit
    keep = 0
    while cached[keep] == ids[keep]:  # a mismatch exists before limit
        keep += 1
    return keep


def _draft_seed(params: SamplingParams) -> int | None:
    """The draft's own random stream, derived from the request seed (independent of the target's)."""
    return None if params.seed is None else (params.seed * 1_000_003 + 17) % (2**63)


def _top1(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Greedy draft token per row of draft logits [B, V_draft], on the device: [B] int64. The same
    rule as ``_draw`` for greedy requests (top-1 of the float logits in the target's vocabulary)."""
    return torch.topk(_to_vocab(logits.float(), vocab_size), k=1, dim=-1).indices[:, 0]


def _to_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cut or pad (with -inf) draft logits [..., V_draft] to the target's vocabulary size."""
    extra = logits.shape[-1] - vocab_size
    if extra > 0:
        return logits[..., :vocab_size]
    if extra < 0:
        pad = logits.new_full((*logits.shape[:-1], -extra), float("-inf"))
        return torch.cat([logits, pad], dim=-1)
    return logits


def build_proposer(
    spec: str,
    target_model,
    *,
    target_path=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    kv_budget_tokens: int = 8192,
    oracle_continuations=None,
) -> Proposer | None:
    """Proposer from a spec string: ``none``, ``self:N`` (target's first N layers + head),
    ``lookup`` (prompt lookup), ``oracle:ALPHA:DRAFT`` (emulated acceptance over DRAFT's real
    forward passes; needs ``oracle_continuations``), or a draft checkpoint (directory or .gguf)
    sharing the target's tokenizer (checked when ``target_path`` is given)."""
    from actors.model.loader import load_model
    from actors.model.tokenizer import ensure_same_tokenizer, load_tokenizer

    vocab = target_model.config.vocab_size
    kind, value = parse_draft_spec(spec)
    if kind == "oracle":
        from actors.spec.oracle import OracleProposer, load_continuations

        if oracle_continuations is None:
            raise ValueError(f"draft {spec!r} needs the target's recorded continuations (oracle_continuations)")
        inner = build_proposer(value[1], target_model, target_path=target_path, dtype=dtype, device=device,
                               kv_budget_tokens=kv_budget_tokens)
        return OracleProposer(inner, load_continuations(oracle_continuations), alpha=value[0], vocab_size=vocab)
    if kind == "none":
        return None
    if kind == "lookup":
        from actors.spec.model_free import PromptLookupProposer

        return PromptLookupProposer()
    if kind == "self":
        draft = target_model.truncated(value)
    else:
        draft = load_model(value, dtype=dtype or target_model.dtype, device=device)
        draft.kernels = getattr(target_model, "kernels", draft.kernels)  # eager or fused, as the target
        if target_path is not None:
            ensure_same_tokenizer(load_tokenizer(target_path), load_tokenizer(value))
    return DraftModelProposer(
        draft, target_vocab_size=vocab, kv_budget_bytes=kv_budget_tokens * draft.kv_bytes_per_token
    )


def parse_draft_spec(spec: str) -> tuple[str, int | str | tuple | None]:
    """``none`` | ``lookup`` | ``self:N`` | ``oracle:ALPHA:INNER`` | a checkpoint path
    -> (kind, N or path or (alpha, inner spec) or None)."""
    spec = spec.strip()
    if spec in ("none", "lookup"):
        return spec, None
    if spec.startswith("oracle:"):
        alpha, _, inner = spec.removeprefix("oracle:").partition(":")
        try:
            value = float(alpha)
        except ValueError:
            raise ValueError(f"draft spec {spec!r}: expected oracle:ALPHA:DRAFT with ALPHA a number") from None
        if not 0.0 <= value <= 1.0 or not inner or inner.startswith("oracle:") or inner in ("none", "lookup"):
            raise ValueError(f"draft spec {spec!r}: expected oracle:ALPHA:DRAFT, ALPHA in [0, 1], "
                             "DRAFT self:N or a checkpoint (the model whose cost is measured)")
        parse_draft_spec(inner)
        return "oracle", (value, inner)
    if spec.startswith("self:"):
        try:
            return "self", int(spec.removeprefix("self:"))
        except ValueError:
            raise ValueError(f"draft spec {spec!r}: expected self:N with an integer N") from None
    return "path", spec
