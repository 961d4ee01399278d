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

The metadata is built on the host (numpy) and reaches the device in two copies (one int64, one
bool buffer; pinned and asynchronous on CUDA), so building a step never waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import torch

from actors.kv_cache import PagedKVCache, to_device

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

    def sizes(self) -> tuple[int, int]:
        """(int64 elements, bool elements) of the packed metadata of this shape."""
        return _packed_sizes(self.num_tokens, self.batch, self.query, self.kv, self.logits)


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
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> StepBatch:
        """Append every step's tokens to ``cache`` (as pending entries) and build the metadata.

        ``padding``: lay the step out densely in that bucket shape (must fit, else ``ValueError``).
        ``out``: flat (int64, bool) device buffers of exactly the packed sizes to copy into (the
        static inputs of a captured graph); the returned tensors are views of them.
        """
        ints, bools, shape, counts = _build_host(cache, steps, padding)
        device = cache.device
        if out is None:
            ints_d, bools_d = to_device(torch.from_numpy(ints), device), to_device(torch.from_numpy(bools), device)
        else:
            ints_d, bools_d = out
            if ints_d.numel() != ints.size or bools_d.numel() != bools.size:
                raise ValueError("out buffers do not match the packed metadata sizes")
            _copy_in(ints_d, ints)
            _copy_in(bools_d, bools)
        return cls.from_packed(ints_d, bools_d, shape, [s.req_id for s in steps],
                               [len(s.token_ids) for s in steps], counts, padding)

    @classmethod
    def from_packed(cls, ints: torch.Tensor, bools: torch.Tensor, shape: tuple[int, int, int, int, int],
                    req_ids: list[Hashable], query_lens: list[int], counts: list[int],
                    padding: Padding | None) -> StepBatch:
        """Views of flat packed buffers: ints = [ids T | positions T | slots T | q_index B*Q |
        kv_slots B*L | logits_index N], bools = [q_valid B*Q | attn_mask B*Q*L]."""
        t, b, q, l, n = shape  # noqa: E741
        sizes = (t, t, t, b * q, b * l, n)
        ids, pos, slots, q_index, kv_slots, logits_index = torch.split(ints, sizes)
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


def _copy_in(dst: torch.Tensor, host: np.ndarray) -> None:
    src = torch.from_numpy(host)
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


_COUNTS = {"all": None, "last": 1, "none": 0}


def _build_host(cache: PagedKVCache, steps: Sequence[SeqStep], padding: Padding | None):
    """Append to the cache and build the packed metadata on the host (numpy)."""
    if not steps and padding is None:
        raise ValueError("a step needs at least one sequence")
    for step in steps:
        if len(step.token_ids) == 0:
            raise ValueError(f"sequence {step.req_id!r} feeds no tokens")
        if step.logits not in _COUNTS:
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {step.logits!r}")
    n_seq = len(steps)
    lens = [len(s.token_ids) for s in steps]
    max_q = max(lens, default=1)
    bs = cache.block_size
    firsts, totals, tables, positions, trees = [], [], [], [], []
    for b, step in enumerate(steps):
        pending_before = cache.num_pending(step.req_id)
        start, pos = cache.append_host(step.req_id, lens[b], step.parents)
        firsts.append(start)
        totals.append(start + lens[b])
        tables.append(cache.block_table_view(step.req_id))
        positions.append(pos)
        if not cache.pending_is_chain(step.req_id):
            visible = cache.pending_visibility(step.req_id)[pending_before:].numpy()
            trees.append((b, start - pending_before, visible))
    max_kv = max(totals, default=1)
    counts = [lens[b] if _COUNTS[s.logits] is None else _COUNTS[s.logits] for b, s in enumerate(steps)]

    if padding is None:
        bp, qp, lp = n_seq, max_q, max_kv
        fill = 0  # ragged: padded KV entries point at slot 0 (masked)
        offsets = np.cumsum([0, *lens[:-1]]) if steps else np.zeros(0, dtype=np.int64)
        t = sum(lens)
    else:
        bp, qp, lp = padding.batch, padding.query, padding.kv
        if n_seq > bp or max_q > qp or max_kv > lp or sum(counts) > padding.logits:
            raise ValueError(f"step (B={n_seq}, Q={max_q}, L={max_kv}, N={sum(counts)}) does not fit {padding}")
        fill = padding.scratch_slot
        offsets = np.arange(n_seq, dtype=np.int64) * qp
        t = bp * qp
    n_logits = sum(counts) if padding is None else padding.logits
    ints = np.empty(_packed_sizes(t, bp, qp, lp, n_logits)[0], dtype=np.int64)
    bools = np.zeros(_packed_sizes(t, bp, qp, lp, n_logits)[1], dtype=np.bool_)
    ids, pos, slot_mapping, q_index, kv_slots, logits_index = np.split(
        ints, np.cumsum([t, t, t, bp * qp, bp * lp]))
    q_valid, mask = bools[: bp * qp].reshape(bp, qp), bools[bp * qp:].reshape(bp, qp, lp)
    q_index, kv_slots = q_index.reshape(bp, qp), kv_slots.reshape(bp, lp)

    # KV slots of every sequence's entries, padded with ``fill``.
    j = np.arange(qp)
    valid = np.zeros((bp, qp), dtype=np.bool_)
    if n_seq:
        # block tables [n_seq, blocks], padded; then every slot of every block, cut to L
        num_blocks = [len(tb) for tb in tables]
        width = max(max(num_blocks), -(-lp // bs))
        flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=sum(num_blocks))
        table = np.zeros((n_seq, width), dtype=np.int64)
        starts = np.cumsum(num_blocks) - num_blocks
        table[np.repeat(np.arange(n_seq), num_blocks), np.arange(flat.size) - np.repeat(starts, num_blocks)] = flat
        slots = (table[:, :, None] * bs + np.arange(bs)).reshape(n_seq, width * bs)[:, :lp]  # [n_seq, L]
        entry = np.arange(lp)
        total = np.asarray(totals, dtype=np.int64)
        kv_slots[:n_seq] = np.where(entry < total[:, None], slots, fill)
        kv_slots[n_seq:] = fill
        valid[:n_seq] = j < np.asarray(lens)[:, None]
        first = np.asarray(firsts, dtype=np.int64)
        # chain mask: query j sees entries [0, first + j]; padding rows (limit -1) see nothing yet
        limit = np.where(valid[:n_seq], first[:, None] + j, -1)
        np.less_equal(entry, limit[:, :, None], out=mask[:n_seq])
        for b, committed, visible in trees:
            mask[b] = False
            mask[b, : lens[b], :committed] = True
            mask[b, : lens[b], committed: totals[b]] = visible
        rows = (offsets[:, None] + j)[valid[:n_seq]]  # real rows of T, in step order
        new_slots = np.take_along_axis(slots, np.minimum(first[:, None] + j, lp - 1), 1)[valid[:n_seq]]
    else:
        kv_slots[:] = fill
        rows = new_slots = np.zeros(0, dtype=np.int64)
    mask[:, :, 0] |= ~valid  # padding rows attend to entry 0 only (real rows always see it)

    ids[:] = 0
    pos[:] = 0
    slot_mapping[:] = fill
    ids[rows] = np.fromiter(chain.from_iterable(s.token_ids for s in steps), dtype=np.int64, count=len(rows))
    pos[rows] = np.fromiter(chain.from_iterable(positions), dtype=np.int64, count=len(rows))
    slot_mapping[rows] = new_slots
    if padding is None:
        q_index[:] = np.where(valid, offsets[:, None] + j[None, :], 0)
        q_valid[:] = valid
    else:
        q_index[:] = np.arange(t).reshape(bp, qp)
        q_valid[:] = True
    wanted = []
    for b, step in enumerate(steps):
        base = int(offsets[b])
        if step.logits == "all":
            wanted.extend(range(base, base + lens[b]))
        elif step.logits == "last":
            wanted.append(base + lens[b] - 1)
    logits_index[:] = 0
    logits_index[: len(wanted)] = wanted
    return ints, bools, (t, bp, qp, lp, n_logits), counts
