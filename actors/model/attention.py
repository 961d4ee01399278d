"""Paged attention over one ragged ``StepBatch`` (data plane).

For one layer: write the step's new K/V into the paged cache at ``batch.slot_mapping``, gather
every sequence's K/V by ``batch.kv_slots``, gather queries by ``batch.q_index``, run
``scaled_dot_product_attention`` under ``batch.attn_mask`` (grouped-query attention by folding
each KV head's query heads into the query axis), and scatter the per-sequence outputs back to
token order.

Invariants:

* no Python loop over sequences or tokens; no host-device synchronisation (no boolean-mask
  indexing), so the same code runs on CPU and CUDA;
* the cache is written before it is read, so a token attends to its own K/V and to earlier
  tokens of the same step exactly as the mask allows;
* padding query rows (``q_valid`` False) are computed (they see entry 0) and then dropped;
* a dense (padded, ``batch.dense``) batch has row ``b * Q + j`` for sequence b's j-th query: the
  queries are a reshape of T (no gather, no scatter) and every row is written.
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
    attn_bias: torch.Tensor | None = None,  # attention_bias(batch, Hq // Hkv, q.dtype), once per step
) -> torch.Tensor:  # [T, Hq, D]
    write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, max_q = batch.q_index.shape
    # [B, L, Hkv, D] -> [B, Hkv, L, D]
    keys = k_cache[batch.kv_slots].to(q.dtype).transpose(1, 2)
    values = v_cache[batch.kv_slots].to(q.dtype).transpose(1, 2)
    if (batch.dense and num_seqs * max_q == num_tokens) or (num_seqs == 1 and max_q == num_tokens):
        # Dense layout (or one unpadded sequence): T order is the query order.
        out = _attend(q.view(num_seqs, max_q, num_heads, head_dim), keys, values, batch.attn_mask, attn_bias)
        return out.reshape(num_tokens, num_heads, head_dim)
    out = _attend(q[batch.q_index], keys, values, batch.attn_mask, attn_bias)  # [B, Q, Hq, D]
    # Scatter valid rows back to token order; padding rows go to a scratch row T that is dropped.
    dest = torch.where(batch.q_valid, batch.q_index, num_tokens).reshape(-1)  # [B*Q]
    result = q.new_empty(num_tokens + 1, num_heads, head_dim)
    result.index_copy_(0, dest, out.reshape(num_seqs * max_q, num_heads, head_dim))
    return result[:num_tokens]


def attention_bias(batch: StepBatch, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The step mask as an additive bias for ``group`` query heads per KV head (0 where visible,
    -inf elsewhere), [B, 1, group * Q, L] with rows ordered (head in group, query): computed once
    per step and shared by every layer. Its rows are 16-element aligned (fused kernels want that)."""
    mask = batch.attn_mask  # [B, 1, Q, L]
    b, _, q, kv_len = mask.shape
    aligned = -(-kv_len // 16) * 16
    bias = torch.full((b, 1, group * q, aligned), float("-inf"), dtype=dtype, device=mask.device)
    bias = bias[..., :kv_len]
    bias.masked_fill_(mask.expand(b, group, q, kv_len).reshape(b, 1, group * q, kv_len), 0.0)
    return bias


def _attend(
    queries: torch.Tensor,  # [B, Q, Hq, D]
    keys: torch.Tensor,  # [B, Hkv, L, D]
    values: torch.Tensor,  # [B, Hkv, L, D]
    mask: torch.Tensor,  # [B, 1, Q, L] bool
    bias: torch.Tensor | None,  # attention_bias(batch, Hq // Hkv, dtype) or None
) -> torch.Tensor:  # [B, Q, Hq, D]
    """SDPA under the step mask. Grouped-query attention folds each KV head's G query heads into
    the query axis ([B, Hkv, G*Q, D], the mask repeated G times), so no backend repeats K/V and
    the fused (memory-efficient) kernels, which take a mask but not ``enable_gqa``, stay eligible."""
    b, qlen, hq, d = queries.shape
    hkv, kv_len = keys.shape[1], keys.shape[2]
    g = hq // hkv
    if bias is None:
        bias = mask.expand(b, g, qlen, kv_len).reshape(b, 1, g * qlen, kv_len)
    if hq == hkv:
        return F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=bias).transpose(1, 2)
    folded = queries.view(b, qlen, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * qlen, d)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=bias)  # [B, Hkv, G*Q, D]
    return out.view(b, hkv, g, qlen, d).permute(0, 3, 1, 2, 4).reshape(b, qlen, hq, d)
