"""The oracle drafter: emulated acceptance for shape runs (random weights), clearly labelled.

``OracleProposer`` knows each request's target-only greedy output (from the same run) and
proposes the target's own next tokens, each replaced by a wrong token with probability
``1 - alpha`` (seeded per request, position and draft slot, so every repetition and every
configuration sees the same errors). With an ``inner`` proposer (a draft model), the draft still
runs its real forward passes each step, so drafting costs what it would; only its token choices
are replaced. Output stays exactly the target's (verification is unchanged), so the greedy match
check still applies.

Draft spec: ``oracle:ALPHA`` (no draft model: free drafts) or ``oracle:ALPHA:DRAFT`` with DRAFT a
spec ``build_proposer`` understands (``self:N``, a checkpoint directory).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

from actors.spec.proposers import Proposer, ProposeRequest, TreeShape
from actors.spec.types import Proposal

PREFIX = "oracle:"


def parse_oracle_spec(spec: str) -> tuple[float, str]:
    """``oracle:ALPHA[:DRAFT]`` -> (alpha, inner draft spec or "none")."""
    body = spec.removeprefix(PREFIX)
    alpha_text, _, inner = body.partition(":")
    try:
        alpha = float(alpha_text)
    except ValueError:
        raise ValueError(f"draft {spec!r}: expected oracle:ALPHA[:DRAFT] with ALPHA in [0, 1]") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"draft {spec!r}: ALPHA must be in [0, 1]")
    return alpha, inner or "none"


class OracleProposer(Proposer):
    def __init__(self, alpha: float, vocab_size: int, *, inner: Proposer | None = None, seed: int = 0) -> None:
        self.alpha, self.vocab_size, self.inner, self.seed = alpha, vocab_size, inner, seed
        self._futures: dict[Hashable, tuple[str, int, list[int]]] = {}

    def bind(self, req_id: Hashable, key: str, prompt_len: int, reference_output: Sequence[int]) -> None:
        """Tell the oracle the target-only output of request ``req_id`` (``key`` seeds its errors)."""
        self._futures[req_id] = (key, prompt_len, list(reference_output))

    def propose(self, requests: Sequence[ProposeRequest], shape: TreeShape) -> list[Proposal]:
        if not all(b == 1 for b in shape.branching):
            raise ValueError("the oracle drafter proposes chains only")
        if self.inner is not None:
            self.inner.propose(requests, shape)  # the real draft cost; its tokens are replaced below
        out = []
        for request in requests:
            key, prompt_len, future = self._futures[request.req_id]
            pos = len(request.token_ids) - prompt_len
            chain = list(future[pos: pos + shape.depth])
            for j in range(len(chain)):
                rng = random.Random(f"{self.seed}:{key}:{pos + j}")
                if rng.random() >= self.alpha:
                    chain[j] = (chain[j] + 1 + rng.randrange(self.vocab_size - 1)) % self.vocab_size
            out.append(Proposal.chain(chain))
        return out

    def finish(self, req_id: Hashable) -> None:
        self._futures.pop(req_id, None)
        if self.inner is not None:
            self.inner.finish(req_id)
