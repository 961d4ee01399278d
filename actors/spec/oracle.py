"""Oracle drafting with emulated acceptance, for benchmarks on random weights (data plane).

Random-weight "shape" models accept nothing a real drafter proposes, so speed-ups can only be
measured with *emulated* acceptance: ``OracleProposer`` wraps a real proposer — the draft model
still runs every forward pass, so its cost is real — and replaces its token choices by the
target's own greedy continuation (recorded beforehand by a target-only run), each token wrong
with probability ``1 - alpha``. Every draft position is then accepted with probability ``alpha``
given the earlier ones were, exactly the emulated acceptance rate α the benchmark protocol labels.

Invariants:
* the decision "right or wrong" for a position is a pure function of (seed, the position in the
  sequence, the draft depth, the recent tokens), so re-proposing the same position (overlap
  speculation, retries) gives the same tokens and runs are reproducible;
* when the sequence is not on the recorded track (a prompt without a recorded continuation, or
  a sequence that left it), the wrapped proposer's own tokens are used; near the end of the
  recorded output the proposal is cut where the record ends;
* greedy only: proposals carry no draft probabilities (emulation is for greedy runs, where output
  equals target-only decoding whatever is proposed);
* ``retrack`` replaces the recorded continuation of the prompts it is given (the benchmark feeds
  each pass's real outputs to the next pass): bf16 logits of random weights have near-ties, so a
  batched target departs from a batch-1 record, and a stale record would emulate a lower α than
  the label says. One prompt may have several records (its copies in one batched pass can decode
  differently): a request follows whichever record its tokens so far match, switching when it
  leaves one for another, and is off the track while it matches none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

import torch

from actors.spec.proposers import Proposer, ProposeRequest, TreeShape
from actors.spec.types import Proposal


def load_continuations(source: str | Path | Iterable[dict]) -> list[tuple[list[int], list[int]]]:
    """``[{"prompt": [...ids], "output": [...ids]}, ...]`` (a JSON file or the list itself)."""
    items = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else list(source)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "prompt" not in item or "output" not in item:
            raise ValueError(f"continuation {i}: expected an object with 'prompt' and 'output' token id lists")
        out.append(([int(t) for t in item["prompt"]], [int(t) for t in item["output"]]))
    return out


class OracleProposer(Proposer):
    def __init__(self, inner: Proposer, continuations: Iterable[tuple[Sequence[int], Sequence[int]]], *,
                 alpha: float, vocab_size: int, seed: int = 0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.inner, self.alpha, self.vocab_size, self.seed = inner, alpha, vocab_size, seed
        # prompt -> its recorded full sequences (several: copies of one prompt in a batched pass can
        # decode differently); a request follows the one that matches its tokens so far
        self._full: dict[tuple[int, ...], list[list[int]]] = {}
        self._track: dict[Hashable, list[int]] = {}
        self._off: dict[Hashable, list[int]] = {}
        self.retrack(continuations)

    def retrack(self, continuations: Iterable[tuple[Sequence[int], Sequence[int]]]) -> int:
        """Record (or re-record) the target's continuations; returns how many were given. The
        prompts given replace their earlier records; several for one prompt are all kept."""
        fresh: dict[tuple[int, ...], list[list[int]]] = {}
        count = 0
        for prompt, output in continuations:
            full = list(prompt) + list(output)
            records = fresh.setdefault(tuple(prompt), [])
            if full not in records:
                records.append(full)
            count += 1
        self._full.update(fresh)
        self._prompt_lengths = sorted({len(p) for p in self._full}, reverse=True)
        self._track.clear()
        self._off.clear()
        return count

    def __getattr__(self, name: str):  # the wrapped proposer's cache, model, ... (worker introspection)
        return getattr(self.inner, name)

    def finish(self, req_id: Hashable) -> None:
        self._track.pop(req_id, None)
        self._off.pop(req_id, None)
        self.inner.finish(req_id)

    def propose(self, requests: Sequence[ProposeRequest], shape: TreeShape) -> list[Proposal]:
        proposals = self.inner.propose(requests, shape)  # the real drafting cost
        if shape.num_nodes != shape.depth:
            raise ValueError("the oracle proposes chains only")
        out = []
        for request, proposal in zip(requests, proposals):
            ids = list(request.token_ids)
            full = self._full_sequence(request.req_id, ids)
            n = len(proposal)
            if full is None:
                out.append(Proposal.chain(proposal.token_ids))  # off the recorded track
                continue
            n = min(n, len(full) - len(ids))  # nothing is known past the recorded output
            tokens = [self._emulate(full, len(ids) + j, j) for j in range(n)]
            out.append(Proposal.chain(torch.tensor(tokens, dtype=torch.long)))
        return out

    def _full_sequence(self, req_id: Hashable, ids: list[int]) -> list[int] | None:
        """The recorded sequence that ``ids`` follows (None: off every record). ``ids`` may be a
        speculated context (overlap drafting assumes its own proposal accepted), so an off-record
        call does not forget the request's track."""
        full = self._track.get(req_id)
        if full is not None and len(full) >= len(ids) and full[: len(ids)] == ids:
            return full
        off = self._off.get(req_id)  # a context that matched no record: so does every extension of it
        if off is not None and len(ids) >= len(off) and ids[: len(off)] == off:
            return None
        for length in self._prompt_lengths:
            records = self._full.get(tuple(ids[:length])) if length <= len(ids) else None
            if records:
                found = next((r for r in records if len(r) >= len(ids) and r[: len(ids)] == ids), None)
                if found is not None:
                    self._track[req_id] = found
                    return found
                break
        self._off[req_id] = list(ids)
        return None

    def _emulate(self, full: list[int], position: int, depth: int) -> int:
        true = full[position]
        key = f"{self.seed}:{position}:{depth}:{full[max(0, position - 4):position]}".encode()
        u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64
        return true if u < self.alpha else (true + 1) % self.vocab_size
