"""One ragged forward step over many sequences: inputs and attention metadata (data plane).

A step feeds each sequence any number of new tokens: a whole prompt (prefill), one token
(decode), a chain of k draft tokens (chain verification) or a token tree given by parent indices
(tree verification). ``StepBatch.build`` appends the new tokens to the KV cache as pending
entries and derives, once per step, everything every layer needs:

    input_ids    [T]                  new tokens of all sequences, concatenated
    positions    [T]                  rotary position ids (committed length + depth in the tree)
    slot_mapping [T]                  cache slot each new token's K/V is written to
    q_index      [B, Q]               index into T of each sequence's j-th new token (padded)
    q_valid      [B, Q]               False on padding
    kv_slots     [B, L]               cache slots of each sequence's entries, in order (padded)
    attn_mask    [B, 1, Q, L]         True where query j may attend to entry l
    logits_index [N]                  rows of T whose logits are wanted

Invariants: row order in T is the order of ``steps``; a query sees the committed prefix, and among
pending entries only its ancestors and itself (plain causal order for chains). Padding rows of
``attn_mask`` see entry 0 only so that attention never produces NaN.

**Padded (dense) layout.** ``build(..., padding=Padding(B, Q, L, N, scratch_slot))`` lays the step
out in a fixed bucket shape instead (what a captured CUDA graph needs): sequence b's j-th new token
is row ``b * Q + j`` of ``T = B * Q`` rows, ``q_index`` is ``arange(T).view(B, Q)`` and ``q_valid``
is all True (every row of the grid is a row of T, so attention writes every row). Padding rows —
beyond a sequence's tokens, or whole padding sequences — feed token 0 at position 0, write their
K/V to the cache's scratch slot (owned by no sequence) and attend to entry 0 only: their own
sequence's first entry, or the scratch slot for padding sequences. Padded KV entries point at the
scratch slot and are masked out. ``logits_index`` has N rows: the real ones first, then row 0.
Everything stays finite, so masked entries cannot leak NaN into real rows.

The metadata is built on the host (numpy, in one pinned byte buffer on CUDA) and reaches the device
in one asynchronous copy, so building a step never waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Literal

import numpy as np
import torch

from actors.kv_cache import PagedKVCache

LogitsWanted = Literal["all", "last", "none"]


@dataclass(frozen=True)
class SeqStep:
    """The new tokens one sequence feeds in one step."""

    req_id: Hashable
    token_ids: Sequence[int]
    parents: Sequence[int] | None = None  # see PagedKVCache.append; None = chain
    logits: LogitsWanted = "all"


@dataclass(frozen=True)
class Padding:
    """A bucket shape for the dense layout (see the module docstring)."""

    batch: int  # B: sequences, real + padding
    query: int  # Q: rows per sequence
    kv: int  # L: KV entries per sequence
    logits: int  # N: logit rows
    scratch_slot: int  # cache slot no sequence owns (PagedKVCache.reserve_scratch_slot)

    @property
    def num_tokens(self) -> int:
        return self.batch * self.query

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(T, B, Q, L, N) of the packed metadata."""
        return self.num_tokens, self.batch, self.query, self.kv, self.logits


def _packed_sizes(t: int, b: int, q: int, l: int, n: int) -> tuple[int, int]:  # noqa: E741
    return 3 * t + b * q + b * l + n, b * q + b * q * l


@dataclass
class StepBatch:
    req_ids: list[Hashable]
    query_lens: list[int]
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    q_index: torch.Tensor
    q_valid: torch.Tensor
    kv_slots: torch.Tensor
    attn_mask: torch.Tensor
    logits_index: torch.Tensor
    logits_counts: list[int]  # rows of logits_index per sequence, in order
    padding: Padding | None = None  # the bucket shape of a dense (padded) batch; None: ragged

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def dense(self) -> bool:
        """Row ``b * Q + j`` is sequence b's j-th query: attention may reshape instead of gather."""
        return self.padding is not None

    @property
    def num_logits(self) -> int:
        """Real logit rows (the first rows of ``logits_index``; a padded batch has more)."""
        return sum(self.logits_counts)

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        steps: Sequence[SeqStep],
        *,
        padding: Padding | None = None,
        out: torch.Tensor | None = None,
    ) -> StepBatch:
        """Append every step's tokens to ``cache`` (as pending entries) and build the metadata.

        ``padding``: lay the step out densely in that bucket shape (must fit, else ``ValueError``).
        ``out``: a device byte buffer of exactly ``packed_nbytes`` to copy the metadata into (the
        static inputs of a captured graph); the returned tensors are views of it.
        """
        device = cache.device
        host, shape, counts = build_host(cache, steps, padding, pin=device.type == "cuda")
        if out is None:
            packed = host if device.type == "cpu" else host.to(device, non_blocking=True)
        else:
            if out.numel() != host.numel() or out.dtype != torch.uint8:
                raise ValueError("out does not match the packed metadata size")
            out.copy_(host, non_blocking=True)
            packed = out
        return cls.from_packed(packed, shape, [s.req_id for s in steps], [len(s.token_ids) for s in steps],
                               counts, padding)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, shape: tuple[int, int, int, int, int], req_ids: list[Hashable],
                    query_lens: list[int], counts: list[int], padding: Padding | None) -> StepBatch:
        """Views of one packed byte buffer (``packed_nbytes(shape)``): int64 [ids T | positions T |
        slots T | q_index B*Q | kv_slots B*L | logits_index N], then bool [q_valid B*Q | attn_mask B*Q*L]."""
        t, b, q, l, n = shape  # noqa: E741
        n_int, _ = _packed_sizes(t, b, q, l, n)
        ints, bools = packed[: 8 * n_int].view(torch.int64), packed[8 * n_int:].view(torch.bool)
        ids, pos, slots, q_index, kv_slots, logits_index = torch.split(ints, (t, t, t, b * q, b * l, n))
        q_valid, mask = torch.split(bools, (b * q, b * q * l))
        return cls(
            req_ids=req_ids,
            query_lens=query_lens,
            input_ids=ids,
            positions=pos,
            slot_mapping=slots,
            q_index=q_index.view(b, q),
            q_valid=q_valid.view(b, q),
            kv_slots=kv_slots.view(b, l),
            attn_mask=mask.view(b, 1, q, l),
            logits_index=logits_index,
            logits_counts=counts,
            padding=padding,
        )

    def split_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Split [N, vocab] logits (rows of ``logits_index``) into one tensor per sequence."""
        return list(torch.split(logits[: self.num_logits], self.logits_counts))


def packed_nbytes(shape: tuple[int, int, int, int, int]) -> int:
    """Bytes of the packed metadata of a (T, B, Q, L, N) shape."""
    n_int, n_bool = _packed_sizes(*shape)
    return 8 * n_int + n_bool


_COUNTS = {"all": None, "last": 1, "none": 0}


def build_host(cache: PagedKVCache, steps: Sequence[SeqStep], padding: Padding | None, *, pin: bool):
    """Append to the cache and build the packed metadata in one host byte buffer (pinned when
    ``pin``): returns ``(buffer, (T, B, Q, L, N), logits_counts)``. Few numpy calls, whatever B."""
    if not steps and padding is None:
        raise ValueError("a step needs at least one sequence")
    for step in steps:
        if len(step.token_ids) == 0:
            raise ValueError(f"sequence {step.req_id!r} feeds no tokens")
        if step.logits not in _COUNTS:
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {step.logits!r}")
    n_seq = len(steps)
    lens = [len(s.token_ids) for s in steps]
    bs = cache.block_size
    firsts, tables, positions, trees = [], [], [], []
    for b, step in enumerate(steps):
        pending_before = cache.num_pending(step.req_id)
        start, pos = cache.append_host(step.req_id, lens[b], step.parents)
        firsts.append(start)
        tables.append(cache.block_table_view(step.req_id))
        positions.append(pos)
        if (step.parents is not None or pending_before) and not cache.pending_is_chain(step.req_id):
            visible = cache.pending_visibility(step.req_id)[pending_before:].numpy()
            trees.append((b, start - pending_before, visible))
    totals = [f + n for f, n in zip(firsts, lens)]
    max_q, max_kv = max(lens, default=1), max(totals, default=1)
    counts = [n if _COUNTS[s.logits] is None else _COUNTS[s.logits] for n, s in zip(lens, steps)]

    if padding is None:
        bp, qp, lp, fill = n_seq, max_q, max_kv, 0  # ragged: padded KV entries point at slot 0 (masked)
        offsets = list(accumulate(lens[:-1], initial=0))
        t, n_logits = sum(lens), sum(counts)
    else:
        bp, qp, lp, n_logits = padding.batch, padding.query, padding.kv, padding.logits
        if n_seq > bp or max_q > qp or max_kv > lp or sum(counts) > n_logits:
            raise ValueError(f"step (B={n_seq}, Q={max_q}, L={max_kv}, N={sum(counts)}) does not fit {padding}")
        fill = padding.scratch_slot
        offsets = list(range(0, n_seq * qp, qp))
        t = bp * qp
    shape = (t, bp, qp, lp, n_logits)
    n_int, n_bool = _packed_sizes(*shape)
    buffer = torch.empty(8 * n_int + n_bool, dtype=torch.uint8, pin_memory=pin)
    raw = buffer.numpy()
    ints, bools = raw[: 8 * n_int].view(np.int64), raw[8 * n_int:].view(np.bool_)
    ids, pos, slot_mapping = ints[:t], ints[t: 2 * t], ints[2 * t: 3 * t]
    o = 3 * t
    q_index = ints[o: o + bp * qp].reshape(bp, qp)
    kv_slots = ints[o + bp * qp: o + bp * qp + bp * lp].reshape(bp, lp)
    logits_index = ints[o + bp * qp + bp * lp:]
    q_valid, mask = bools[: bp * qp].reshape(bp, qp), bools[bp * qp:].reshape(bp, qp, lp)

    # token rows (python over T tokens; each sequence's new entries are [first, first + n))
    rows = [off + j for off, n in zip(offsets, lens) for j in range(n)]
    new_slots = [tb[e // bs] * bs + e % bs for tb, f, n in zip(tables, firsts, lens) for e in range(f, f + n)]
    token_ids = list(chain.from_iterable(s.token_ids for s in steps))
    token_pos = list(chain.from_iterable(positions))
    if padding is None:  # T rows are exactly the real tokens
        ids[:], pos[:], slot_mapping[:] = token_ids, token_pos, new_slots
    else:
        ids[:], pos[:], slot_mapping[:] = 0, 0, fill
        if rows:
            ids[rows], pos[rows], slot_mapping[rows] = token_ids, token_pos, new_slots

    # KV slots [B, L]: every slot of every owned block, cut at the sequence's length, then ``fill``
    if n_seq:
        width = -(-lp // bs)
        table = np.array([tb[:width] + [0] * (width - len(tb)) for tb in tables], dtype=np.int64)
        slots = (table[:, :, None] * bs + np.arange(bs)).reshape(n_seq, width * bs)[:, :lp]
        entry = np.arange(lp)
        np.copyto(kv_slots[:n_seq], np.where(entry < np.array(totals)[:, None], slots, fill))
        # chain mask: query j sees entries [0, first + j]; padding rows see entry 0 only (below)
        limit = np.array([[f + j if j < n else -1 for j in range(qp)] for f, n in zip(firsts, lens)])
        np.less_equal(entry, limit[:, :, None], out=mask[:n_seq])
    kv_slots[n_seq:] = fill
    mask[n_seq:] = False
    mask[:, :, 0] = True  # real chain rows always see entry 0; padding rows see it only
    for b, committed, visible in trees:
        n = lens[b]
        mask[b] = False
        mask[b, :n, :committed] = True
        mask[b, :n, committed: totals[b]] = visible
        mask[b, n:, 0] = True
    if padding is None:
        q_index[:] = [[off + j if j < n else 0 for j in range(qp)] for off, n in zip(offsets, lens)]
        q_valid[:] = [[j < n for j in range(qp)] for n in lens]
    else:
        q_index[:] = np.arange(t).reshape(bp, qp)
        q_valid[:] = True
    wanted = []
    for off, n, step in zip(offsets, lens, steps):
        if step.logits == "all":
            wanted.extend(range(off, off + n))
        elif step.logits == "last":
            wanted.append(off + n - 1)
    logits_index[: len(wanted)] = wanted
    logits_index[len(wanted):] = 0
    return buffer, shape, counts
