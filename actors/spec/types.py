"""Typed structures of speculative decoding: sampling parameters, proposals, verdicts (data plane).

A proposal is a token tree hanging off a sequence's last committed token. A chain is the tree
whose node i has parent i - 1. Invariants checked at construction:

* ``parents[i] < i`` (parents come first; -1 is the root, i.e. the last committed token);
* siblings are ordered: for stochastic verification, child j of a node was drawn from
  ``draft_probs[j]``, the draft distribution conditioned on the node's path *and* on the
  siblings drawn before it (sampling without replacement renormalises after each draw);
* ``draft_probs`` is None for model-free drafts (deterministic proposals: a point mass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for one sequence: a chain or a tree given by parent indices.

    token_ids   [n]      proposed tokens
    parents     [n]      parent index of each node, -1 for children of the last committed token
    draft_probs [n, V]   distribution node i was drawn from, or None (model-free, deterministic)
    """

    token_ids: torch.Tensor
    parents: tuple[int, ...]
    draft_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = int(self.token_ids.shape[0])
        if self.token_ids.dim() != 1:
            raise ValueError("token_ids must be 1-D")
        if len(self.parents) != n:
            raise ValueError(f"{len(self.parents)} parents for {n} tokens")
        for i, parent in enumerate(self.parents):
            if not -1 <= parent < i:
                raise ValueError(f"node {i} has parent {parent}; parents must come first")
        if self.draft_probs is not None and self.draft_probs.shape[0] != n:
            raise ValueError(f"draft_probs has {self.draft_probs.shape[0]} rows for {n} tokens")

    @classmethod
    def chain(cls, token_ids, draft_probs: torch.Tensor | None = None) -> Proposal:
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        return cls(ids, tuple(range(-1, ids.shape[0] - 1)), draft_probs)

    @classmethod
    def empty(cls) -> Proposal:
        return cls(torch.zeros(0, dtype=torch.long), ())

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def is_chain(self) -> bool:
        return all(parent == i - 1 for i, parent in enumerate(self.parents))

    @cached_property
    def children(self) -> dict[int, list[int]]:
        """Children of each node in sibling order; key -1 is the root."""
        out: dict[int, list[int]] = {-1: []}
        for i, parent in enumerate(self.parents):
            out.setdefault(parent, []).append(i)
            out.setdefault(i, [])
        return out

    @cached_property
    def depths(self) -> list[int]:
        depth: list[int] = []
        for parent in self.parents:
            depth.append(0 if parent < 0 else depth[parent] + 1)
        return depth


@dataclass
class Verdict:
    """Outcome of verifying one proposal.

    accepted  indices of accepted proposal nodes, root to leaf
    token_ids tokens to append: the accepted tokens then one token from the target (bonus or
              correction), so always ``len(accepted) + 1`` tokens
    """

    accepted: list[int]
    token_ids: list[int]
    extras: dict = field(default_factory=dict)

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)
