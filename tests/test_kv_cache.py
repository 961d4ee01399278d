"""Paged KV cache and step metadata: allocation, speculative append/commit, capacity, errors."""

import pytest
import torch

from actors.kv_cache import KVCacheFullError, PagedKVCache
from actors.step_batch import SeqStep, StepBatch


def make_cache(num_blocks=8, block_size=4, layers=2):
    return PagedKVCache(layers, 2, 4, num_blocks=num_blocks, block_size=block_size)


def fill(cache, req_id, start, values):
    """Write recognisable values into the entries [start, start + len(values)) of a sequence."""
    slots = cache.slots(req_id, start, start + len(values))
    cache.storage[:, :, slots] = torch.tensor(values, dtype=cache.dtype)[None, None, :, None, None]


def read(cache, req_id, start, end):
    return cache.storage[0, 0, cache.slots(req_id, start, end), 0, 0].tolist()


def test_sized_from_budget():
    # 2 layers * 2 (k,v) * 2 heads * 4 dims * 4 bytes = 128 bytes per token; 16-token blocks
    cache = PagedKVCache(2, 2, 4, budget_bytes=128 * 16 * 5 + 100, block_size=16)
    assert cache.bytes_per_token == 128
    assert cache.num_blocks == 5 and cache.capacity_tokens == 80
    assert cache.storage.shape == (2, 2, 80, 2, 4)
    with pytest.raises(ValueError, match="smaller than one block"):
        PagedKVCache(2, 2, 4, budget_bytes=100, block_size=16)
    with pytest.raises(ValueError, match="exactly one"):
        PagedKVCache(2, 2, 4, budget_bytes=100, num_blocks=3)


def test_chain_accept_prefix_needs_no_copy():
    cache = make_cache()
    cache.add_sequence("a")
    cache.append("a", 5)
    cache.commit("a")
    assert cache.seq_len("a") == 5
    slots, positions = cache.append("a", 4)  # last token + 3 draft tokens
    assert positions.tolist() == [5, 6, 7, 8]
    fill(cache, "a", 5, [50, 51, 52, 53])
    before = cache.storage.clone()
    cache.commit("a", [0, 1])  # accepted: last token and the first draft token
    assert torch.equal(before, cache.storage)  # nothing moved
    assert cache.seq_len("a") == 7 and cache.num_pending("a") == 0
    assert read(cache, "a", 5, 7) == [50, 51]
    # rejected entries are overwritten by the next append, not reallocated
    table = cache.block_table("a")
    new_slots, positions = cache.append("a", 2)
    assert new_slots.tolist() == slots[2:].tolist() and positions.tolist() == [7, 8]
    assert cache.block_table("a") == table


def test_tree_commit_compacts_accepted_path():
    cache = make_cache()
    cache.add_sequence("t")
    cache.append("t", 3)
    cache.commit("t")
    # tree: 0 = last token; 1, 2 children of 0; 3 child of 1; 4 child of 2
    _, positions = cache.append("t", 5, parents=[-1, 0, 0, 1, 2])
    assert positions.tolist() == [3, 4, 4, 5, 5]
    fill(cache, "t", 3, [30, 31, 32, 33, 34])
    visible = cache.pending_visibility("t")
    assert visible[4].tolist() == [True, False, True, False, True]
    assert not cache.pending_is_chain("t")
    cache.commit("t", [0, 2, 4])
    assert cache.seq_len("t") == 6
    assert read(cache, "t", 3, 6) == [30, 32, 34]
    # every layer and both k and v were moved
    slots = cache.slots("t", 3, 6)
    moved = cache.storage[:, :, slots]  # [layers, 2, 3, heads, dim]
    assert torch.equal(moved, torch.tensor([30.0, 32.0, 34.0])[None, None, :, None, None].expand_as(moved))


def test_commit_rejects_non_path():
    cache = make_cache()
    cache.add_sequence("t")
    cache.append("t", 3, parents=[-1, 0, 0])
    with pytest.raises(ValueError, match="root-to-leaf"):
        cache.commit("t", [0, 2, 1])
    with pytest.raises(ValueError, match="root-to-leaf"):
        cache.commit("t", [1])
    with pytest.raises(ValueError, match="out of range"):
        cache.commit("t", [0, 7])
    with pytest.raises(ValueError, match="parent"):
        cache.append("t", 1, parents=[9])


def test_capacity_free_and_full_error():
    cache = make_cache(num_blocks=4, block_size=4)
    assert cache.free_tokens == 16 and cache.can_fit(16) and not cache.can_fit(17)
    cache.add_sequence("a", reserve_tokens=6)  # 2 blocks
    assert cache.num_free_blocks == 2
    cache.append("a", 6)
    cache.commit("a")
    assert cache.num_free_blocks == 2  # the reservation covered it
    cache.add_sequence("b")
    cache.append("b", 8)
    assert cache.num_free_blocks == 0
    assert cache.can_fit(2, "a") and not cache.can_fit(3, "a")
    with pytest.raises(KVCacheFullError, match="needs 1 more KV blocks"):
        cache.append("a", 3)
    # the failed append changed nothing
    assert cache.num_pending("a") == 0 and cache.seq_len("a") == 6
    with pytest.raises(KVCacheFullError):
        cache.add_sequence("c", reserve_tokens=1)
    assert "c" not in cache
    with pytest.raises(KVCacheFullError, match="whole cache holds 16"):
        cache.add_sequence("d", reserve_tokens=17)
    cache.free("b")
    cache.free("a")
    assert cache.num_free_blocks == 4 and cache.req_ids == []


def test_truncate_and_block_transfer():
    cache = make_cache()
    cache.add_sequence("a")
    cache.append("a", 6)
    fill(cache, "a", 0, [1, 2, 3, 4, 5, 6])
    cache.commit("a")
    cache.truncate("a", 4)
    assert cache.seq_len("a") == 4
    with pytest.raises(ValueError):
        cache.truncate("a", 5)
    # blocks move to another worker's cache verbatim
    other = make_cache()
    other.add_sequence("a", reserve_tokens=4)
    other.write_blocks(other.block_table("a"), cache.read_blocks(cache.block_table("a")[:1]))
    assert read(other, "a", 0, 4) == [1, 2, 3, 4]


def test_step_batch_masks_and_layout():
    cache = make_cache(num_blocks=16)
    for req in ("p", "d"):
        cache.add_sequence(req)
    cache.append("d", 3)
    cache.commit("d")
    batch = StepBatch.build(
        cache,
        [SeqStep("p", [1, 2, 3], logits="last"), SeqStep("d", [7, 8, 9], parents=[-1, 0, 0])],
    )
    assert batch.input_ids.tolist() == [1, 2, 3, 7, 8, 9]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 4]
    assert batch.logits_index.tolist() == [2, 3, 4, 5]
    assert batch.logits_counts == [1, 3]
    assert batch.q_index.tolist() == [[0, 1, 2], [3, 4, 5]]
    causal = batch.attn_mask[0, 0, :, :3].tolist()
    assert causal == [[True, False, False], [True, True, False], [True, True, True]]
    tree = batch.attn_mask[1, 0].tolist()
    assert tree[2] == [True, True, True, True, False, True]  # prefix, root, not sibling, self
    with pytest.raises(ValueError, match="no tokens"):
        StepBatch.build(cache, [SeqStep("p", [])])
