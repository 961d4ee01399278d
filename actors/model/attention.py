"""Paged attention over one ragged ``StepBatch`` (data plane).

For one layer: write the step's new K/V into the paged cache at ``batch.slot_mapping``, gather
every sequence's K/V by ``batch.kv_slots``, gather queries by ``batch.q_index``, run
``scaled_dot_product_attention`` under ``batch.attn_mask`` (GQA via ``enable_gqa``), and scatter
the per-sequence outputs back to token order.

Invariants:

* no Python loop over sequences or tokens; no host-device synchronisation (no boolean-mask
  indexing), so the same code runs on CPU and CUDA;
* the cache is written before it is read, so a token attends to its own K/V and to earlier
  tokens of the same step exactly as the mask allows;
* padding query rows (``q_valid`` False) are computed (they see entry 0) and then dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.step_batch import StepBatch


def write_kv(
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D], already rotated
    k: torch.Tensor,  # [T, Hkv, D], already rotated
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    batch: StepBatch,
) -> torch.Tensor:  # [T, Hq, D]
    write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, max_q = batch.q_index.shape
    # [B, L, Hkv, D] -> [B, Hkv, L, D]
    keys = k_cache[batch.kv_slots].to(q.dtype).transpose(1, 2)
    values = v_cache[batch.kv_slots].to(q.dtype).transpose(1, 2)
    gqa = num_heads != k.shape[1]
    if num_seqs == 1 and max_q == num_tokens:
        # One sequence, no padding: T order is the query order.
        queries = q.unsqueeze(0).transpose(1, 2)  # [1, Hq, T, D]
    else:
        queries = q[batch.q_index].transpose(1, 2)  # [B, Q, Hq, D] -> [B, Hq, Q, D]
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=batch.attn_mask, enable_gqa=gqa
    )  # [B, Hq, Q, D]
    out = out.transpose(1, 2)  # [B, Q, Hq, D]
    if num_seqs == 1 and max_q == num_tokens:
        return out[0]
    # Scatter valid rows back to token order; padding rows go to a scratch row T that is dropped.
    dest = torch.where(batch.q_valid, batch.q_index, num_tokens).reshape(-1)  # [B*Q]
    result = q.new_empty(num_tokens + 1, num_heads, head_dim)
    result.index_copy_(0, dest, out.reshape(num_seqs * max_q, num_heads, head_dim))
    return result[:num_tokens]
