"""Model-free proposers: drafts computed from token history, not from a model (data plane).

Their proposals carry no probabilities: verification treats each drafted token as a point mass,
which keeps sampling lossless (accept with the target's probability of the token, otherwise draw
from the target with that token removed). Only chains are proposed here; tree fusion of several
sources comes with the router.

Invariant: a proposer never returns more tokens than asked for, and only token ids it was given or
that its function returned (validated against the vocabulary by the reference loop).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from actors.spec.proposers import ProposeRequest, Proposer, TreeShape
from actors.spec.types import Proposal


class FunctionProposer(Proposer):
    """Wraps ``fn(token_ids, num_tokens) -> draft token ids`` as a chain proposer."""

    def __init__(self, fn: Callable[[Sequence[int], int], Sequence[int]]):
        self.fn = fn

    def propose(self, requests: Sequence[ProposeRequest], shape: TreeShape) -> list[Proposal]:
        out = []
        for request in requests:
            draft = list(self.fn(list(request.token_ids), shape.depth))[: shape.depth]
            out.append(Proposal.chain(draft))
        return out


class PromptLookupProposer(FunctionProposer):
    """Prompt lookup decoding: find the latest earlier occurrence of the last n tokens (n from
    ``max_ngram`` down to ``min_ngram``) and propose the tokens that followed it."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        super().__init__(self._lookup)

    def _lookup(self, ids: Sequence[int], num_tokens: int) -> list[int]:
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = list(ids[-n:])
            for start in range(len(ids) - n - 1, -1, -1):
                if list(ids[start : start + n]) == tail:
                    return list(ids[start + n : start + n + num_tokens])
        return []

    def finish(self, req_id: Hashable) -> None:
        return None
