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
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

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

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, cache: PagedKVCache, steps: Sequence[SeqStep]) -> StepBatch:
        """Append every step's tokens to ``cache`` (as pending entries) and build the metadata."""
        if not steps:
            raise ValueError("a step needs at least one sequence")
        device = cache.device
        input_ids, positions, slot_mapping, kv_rows, masks, logits_rows, counts = [], [], [], [], [], [], []
        offset = 0
        for step in steps:
            num_new = len(step.token_ids)
            if num_new == 0:
                raise ValueError(f"sequence {step.req_id!r} feeds no tokens")
            committed = cache.seq_len(step.req_id)
            pending_before = cache.num_pending(step.req_id)
            slots, pos = cache.append(step.req_id, num_new, step.parents)
            total = committed + pending_before + num_new
            input_ids.append(torch.as_tensor(list(step.token_ids), dtype=torch.long))
            positions.append(pos)
            slot_mapping.append(slots)
            kv_rows.append(cache.slots(step.req_id, 0, total))
            if cache.pending_is_chain(step.req_id):
                first = committed + pending_before
                mask = torch.arange(total)[None, :] <= (first + torch.arange(num_new))[:, None]
            else:
                visible = cache.pending_visibility(step.req_id)[pending_before:]
                mask = torch.cat([torch.ones(num_new, committed, dtype=torch.bool), visible], dim=1)
            masks.append(mask)
            if step.logits == "all":
                logits_rows.append(torch.arange(offset, offset + num_new))
            elif step.logits == "last":
                logits_rows.append(torch.tensor([offset + num_new - 1]))
            elif step.logits != "none":
                raise ValueError(f"logits must be 'all', 'last' or 'none', not {step.logits!r}")
            counts.append({"all": num_new, "last": 1, "none": 0}[step.logits])
            offset += num_new

        batch, max_q = len(steps), max(len(s.token_ids) for s in steps)
        max_kv = max(row.shape[0] for row in kv_rows)
        q_index = torch.zeros(batch, max_q, dtype=torch.long)
        q_valid = torch.zeros(batch, max_q, dtype=torch.bool)
        kv_slots = torch.zeros(batch, max_kv, dtype=torch.long)
        attn_mask = torch.zeros(batch, 1, max_q, max_kv, dtype=torch.bool)
        attn_mask[:, :, :, 0] = True  # padding rows attend to entry 0; real rows always do
        offset = 0
        for b, (row, mask) in enumerate(zip(kv_rows, masks)):
            num_new, num_kv = mask.shape
            q_index[b, :num_new] = torch.arange(offset, offset + num_new)
            q_valid[b, :num_new] = True
            kv_slots[b, :num_kv] = row.cpu()
            attn_mask[b, 0, :num_new, :num_kv] = mask
            offset += num_new
        empty = torch.zeros(0, dtype=torch.long)
        return cls(
            req_ids=[s.req_id for s in steps],
            query_lens=[len(s.token_ids) for s in steps],
            input_ids=torch.cat(input_ids).to(device),
            positions=torch.cat(positions).to(device),
            slot_mapping=torch.cat(slot_mapping).to(device),
            q_index=q_index.to(device),
            q_valid=q_valid.to(device),
            kv_slots=kv_slots.to(device),
            attn_mask=attn_mask.to(device),
            logits_index=torch.cat(logits_rows).to(device) if logits_rows else empty.to(device),
            logits_counts=counts,
        )

    def split_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Split [N, vocab] logits (rows of ``logits_index``) into one tensor per sequence."""
        return list(torch.split(logits, self.logits_counts))
