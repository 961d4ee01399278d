"""Paged KV cache for the layers one worker holds (data plane).

One preallocated tensor holds every K and V entry of the worker:

    storage: [num_layers, 2, num_slots, num_kv_heads, head_dim]
    num_slots = num_blocks * block_size

A sequence owns a list of blocks (its ``block_table``); its i-th cache entry lives in slot
``block_table[i // block_size] * block_size + i % block_size``.

Each sequence has two regions:

* ``committed`` entries ``[0, seq_len)``: the KV of tokens that are part of the output;
* ``pending`` entries ``[seq_len, seq_len + num_pending)``: speculative tokens (a chain or a
  token tree, possibly written over several forward passes) whose fate is not decided yet.
  Each pending entry records its parent inside the pending region (-1: the committed prefix),
  so attention over a tree can see ancestors only.

Invariants:

* storage is allocated once; entries are never reallocated. ``commit`` keeps an accepted path by
  copying its entries down over rejected ones (no copy when the path is already a prefix).
* a block belongs to at most one sequence; ``free`` returns all of a sequence's blocks.
* running out of blocks raises ``KVCacheFullError`` before anything is changed.

Block-level access (``block_table``, ``read_blocks``, ``write_blocks``) is the interface that
paging and KV transfer between workers build on.

``reserve_scratch_slot`` takes one block out of circulation (no sequence ever owns it): padded
rows of a bucketed step (``actors.model.graph_runner``) write their K/V there and padded KV
entries point there, so padding never touches a sequence's entries.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch


class KVCacheFullError(RuntimeError):
    """Raised when a sequence needs more KV blocks than the cache has free."""


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without blocking the host: through pinned memory on CUDA
    (a pageable copy would wait for the stream to drain), as is on CPU."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class _SeqState:
    block_table: list[int] = field(default_factory=list)
    seq_len: int = 0
    pending_parents: list[int] = field(default_factory=list)  # -1 = committed prefix
    pending_depths: list[int] = field(default_factory=list)  # depth 0 = child of the prefix


class PagedKVCache:
    """Preallocated block-paged KV cache sized from a memory budget."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        budget_bytes: int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_layers <= 0 or num_kv_heads <= 0 or head_dim <= 0 or block_size <= 0:
            raise ValueError("num_layers, num_kv_heads, head_dim and block_size must be positive")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.bytes_per_token = (
            2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        )
        if (budget_bytes is None) == (num_blocks is None):
            raise ValueError("give exactly one of budget_bytes and num_blocks")
        if num_blocks is None:
            num_blocks = int(budget_bytes) // (self.bytes_per_token * block_size)
            if num_blocks < 1:
                raise ValueError(
                    f"KV budget of {budget_bytes} bytes is smaller than one block "
                    f"({self.bytes_per_token * block_size} bytes: {block_size} tokens × "
                    f"{self.bytes_per_token} bytes per token)"
                )
        self.num_blocks = int(num_blocks)
        self.num_slots = self.num_blocks * block_size
        # [num_layers, 2, num_slots, num_kv_heads, head_dim]
        self.storage = torch.zeros(
            num_layers, 2, self.num_slots, num_kv_heads, head_dim, dtype=dtype, device=self.device
        )
        self._free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._seqs: dict[Hashable, _SeqState] = {}
        self._scratch_block: int | None = None

    # ----------------------------------------------------------------- capacity
    @property
    def capacity_tokens(self) -> int:
        """Entries sequences can hold (every slot but the scratch block's, once one is reserved)."""
        return self.num_slots - (self.block_size if self._scratch_block is not None else 0)

    def reserve_scratch_slot(self) -> int:
        """Take one free block out of circulation (once; idempotent) and return its first slot.

        No sequence ever owns it: padding rows of bucketed (CUDA graph) steps write there and padded
        KV entries read there. Raises ``KVCacheFullError`` when no block is free."""
        if self._scratch_block is None:
            if not self._free_blocks:
                raise KVCacheFullError("no free KV block left for the scratch block of padded steps")
            self._scratch_block = self._free_blocks.pop()
        return self._scratch_block * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def free_tokens(self) -> int:
        """Tokens that fit in blocks no sequence owns."""
        return self.num_free_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_fit(self, num_tokens: int, req_id: Hashable | None = None) -> bool:
        """Whether ``num_tokens`` more entries fit (for ``req_id``'s sequence, or a new one)."""
        state = self._seqs.get(req_id) if req_id is not None else None
        used = self._total_len(state) if state else 0
        owned = len(state.block_table) if state else 0
        return self.blocks_needed(used + num_tokens) - owned <= self.num_free_blocks

    def can_grow(self, num_tokens: dict[Hashable, int]) -> bool:
        """Whether every listed sequence can take its ``num_tokens`` more entries at once."""
        needed = 0
        for req_id, n in num_tokens.items():
            state = self._seqs[req_id]
            needed += max(0, self.blocks_needed(self._total_len(state) + n) - len(state.block_table))
        return needed <= self.num_free_blocks

    # ----------------------------------------------------------------- sequences
    def __contains__(self, req_id: Hashable) -> bool:
        return req_id in self._seqs

    @property
    def req_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def add_sequence(self, req_id: Hashable, reserve_tokens: int = 0) -> None:
        """Register a sequence, optionally reserving blocks for ``reserve_tokens`` entries."""
        if req_id in self._seqs:
            raise ValueError(f"sequence {req_id!r} is already in the KV cache")
        if reserve_tokens > self.capacity_tokens:
            raise KVCacheFullError(
                f"sequence {req_id!r} needs {reserve_tokens} KV entries but the whole cache "
                f"holds {self.capacity_tokens}"
            )
        self._seqs[req_id] = _SeqState()
        try:
            self._ensure(req_id, reserve_tokens)
        except KVCacheFullError:
            del self._seqs[req_id]
            raise

    def free(self, req_id: Hashable) -> None:
        state = self._seqs.pop(req_id)
        self._free_blocks.extend(reversed(state.block_table))

    def seq_len(self, req_id: Hashable) -> int:
        """Number of committed entries."""
        return self._seqs[req_id].seq_len

    def num_pending(self, req_id: Hashable) -> int:
        return len(self._seqs[req_id].pending_parents)

    def block_table(self, req_id: Hashable) -> list[int]:
        return list(self._seqs[req_id].block_table)

    # ----------------------------------------------------------------- speculation
    def append(
        self, req_id: Hashable, num_tokens: int, parents: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``num_tokens`` pending entries; return their slots and position ids.

        ``parents`` gives, per new entry, its parent as an index into the pending region *after*
        the append (so it may point at an earlier new entry), or -1 for the committed prefix.
        ``None`` continues a chain from the last pending entry.

        Returns ``(slots, positions)``, both [num_tokens] int64 on the cache's device: the flat
        cache slot of each new entry and its position id (committed length + depth in the tree).
        """
        start, positions = self.append_host(req_id, num_tokens, parents)
        return self.slots(req_id, start, start + num_tokens), torch.tensor(list(positions), dtype=torch.long).to(self.device)

    def append_host(
        self, req_id: Hashable, num_tokens: int, parents: Sequence[int] | None = None
    ) -> tuple[int, Sequence[int]]:
        """``append`` without device tensors: returns ``(start, positions)`` where the new entries
        are ``[start, start + num_tokens)`` of the sequence and ``positions`` a sequence of ints."""
        state = self._seqs[req_id]
        num_pending = len(state.pending_parents)
        depths = state.pending_depths
        if parents is None:  # a chain continuing from the last pending entry (or the prefix)
            self._ensure(req_id, self._total_len(state) + num_tokens)
            start = self._total_len(state)
            first_depth = depths[-1] + 1 if num_pending else 0
            depths.extend(range(first_depth, first_depth + num_tokens))
            state.pending_parents.extend(range(num_pending - 1, num_pending + num_tokens - 1))
            return start, range(state.seq_len + first_depth, state.seq_len + first_depth + num_tokens)
        if len(parents) != num_tokens:
            raise ValueError(f"got {len(parents)} parents for {num_tokens} tokens")
        parents = list(parents)
        for i, parent in enumerate(parents):
            if not -1 <= parent < num_pending + i:
                raise ValueError(
                    f"parent {parent} of new entry {i} must be -1 or an earlier entry "
                    f"(< {num_pending + i})"
                )
        self._ensure(req_id, self._total_len(state) + num_tokens)
        start = self._total_len(state)
        for parent in parents:
            depths.append(0 if parent < 0 else depths[parent] + 1)
        state.pending_parents.extend(parents)
        return start, [d + state.seq_len for d in depths[num_pending:]]

    def pending_is_chain(self, req_id: Hashable) -> bool:
        parents = self._seqs[req_id].pending_parents
        return all(parent == i - 1 for i, parent in enumerate(parents))

    def pending_visibility(self, req_id: Hashable) -> torch.Tensor:
        """[num_pending, num_pending] bool: entry i may attend to pending entry j (ancestor or self)."""
        parents = self._seqs[req_id].pending_parents
        visible = torch.eye(len(parents), dtype=torch.bool)
        for i, parent in enumerate(parents):
            if parent >= 0:
                visible[i] |= visible[parent]
        return visible

    def commit(self, req_id: Hashable, keep: Sequence[int] | None = None) -> None:
        """Make pending entries ``keep`` (a root-to-leaf path, as pending indices) committed.

        ``None`` keeps every pending entry (they must form a chain); ``[]`` drops them all.
        Kept entries are copied down over dropped ones when they are not already a prefix.
        """
        state = self._seqs[req_id]
        num_pending = len(state.pending_parents)
        keep = list(range(num_pending)) if keep is None else list(keep)
        for i, idx in enumerate(keep):
            if not 0 <= idx < num_pending:
                raise ValueError(f"pending index {idx} out of range [0, {num_pending})")
            expected_parent = keep[i - 1] if i else -1
            if state.pending_parents[idx] != expected_parent:
                raise ValueError(f"kept pending entries {keep} are not a root-to-leaf path")
        if keep != list(range(len(keep))):
            all_slots = self.host_slots(req_id, state.seq_len, self._total_len(state))
            src_dst = torch.stack((all_slots[torch.tensor(keep, dtype=torch.long)], all_slots[: len(keep)]))
            src, dst = to_device(src_dst, self.device)  # one copy (pinned, asynchronous on CUDA)
            self.storage[:, :, dst] = self.storage[:, :, src]
        state.seq_len += len(keep)
        state.pending_parents.clear()
        state.pending_depths.clear()

    def truncate(self, req_id: Hashable, seq_len: int) -> None:
        """Drop pending entries and committed entries past ``seq_len`` (blocks stay owned)."""
        state = self._seqs[req_id]
        if not 0 <= seq_len <= state.seq_len:
            raise ValueError(f"cannot truncate {req_id!r} to {seq_len} (committed {state.seq_len})")
        state.seq_len = seq_len
        state.pending_parents.clear()
        state.pending_depths.clear()

    # ----------------------------------------------------------------- access
    def slots(self, req_id: Hashable, start: int, end: int) -> torch.Tensor:
        """Flat slots of entries ``[start, end)`` (committed and pending alike): [end - start] int64."""
        return self.host_slots(req_id, start, end).to(self.device)

    def host_slots(self, req_id: Hashable, start: int, end: int) -> torch.Tensor:
        """``slots`` as a CPU tensor (no device copy)."""
        table = torch.tensor(self._seqs[req_id].block_table, dtype=torch.long)
        index = torch.arange(start, end, dtype=torch.long)
        return table[index // self.block_size] * self.block_size + index % self.block_size

    def block_table_view(self, req_id: Hashable) -> list[int]:
        """The sequence's block table itself (not a copy): read it, never modify it."""
        return self._seqs[req_id].block_table

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(k, v)`` of one (local) layer, each [num_slots, num_kv_heads, head_dim]."""
        return self.storage[layer, 0], self.storage[layer, 1]

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy of whole blocks: [num_layers, 2, len(block_ids), block_size, heads, head_dim]."""
        blocks = self.storage.view(
            self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        )
        return blocks[:, :, torch.as_tensor(list(block_ids), device=self.device)].clone()

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Overwrite whole blocks with ``data`` as returned by ``read_blocks``."""
        blocks = self.storage.view(
            self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        )
        blocks[:, :, torch.as_tensor(list(block_ids), device=self.device)] = data.to(
            device=self.device, dtype=self.dtype
        )

    # ----------------------------------------------------------------- internals
    @staticmethod
    def _total_len(state: _SeqState) -> int:
        return state.seq_len + len(state.pending_parents)

    def _ensure(self, req_id: Hashable, total_tokens: int) -> None:
        """Own enough blocks for ``total_tokens`` entries, or raise without changing anything."""
        state = self._seqs[req_id]
        missing = self.blocks_needed(total_tokens) - len(state.block_table)
        if missing > len(self._free_blocks):
            raise KVCacheFullError(
                f"sequence {req_id!r} needs {missing} more KV blocks "
                f"({missing * self.block_size} tokens) but only {len(self._free_blocks)} are free "
                f"(cache holds {self.capacity_tokens} tokens in {self.num_blocks} blocks)"
            )
        for _ in range(max(0, missing)):
            state.block_table.append(self._free_blocks.pop())
