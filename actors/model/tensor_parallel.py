"""Megatron-style tensor parallelism of the target model across ``size`` ranks (data plane).

A ``LlamaModel`` built with ``TensorParallel.for_config(config, rank, size, group)`` holds rank
``rank``'s shard of every decoder layer it holds:

* **column-parallel** (no communication): the fused ``w_qkv`` keeps this rank's ``num_heads / size``
  query heads and ``num_kv_heads / size`` KV heads (rows q | k | v of those heads, biases likewise);
  the fused ``w_gate_up`` keeps this rank's ``intermediate_size / size`` slice of gate and of up;
* **row-parallel** (one all-reduce each): ``w_o`` and ``w_down`` keep the matching input columns;
  each rank computes a partial sum, ``all_reduce`` (SUM) adds them, and the bias (if any) is added
  once, after the reduce, on every rank;
* **replicated**: the embedding, every RMSNorm, the final norm and ``lm_head``, so hidden states
  between layers and the logits are the same on every rank.

Per decoder layer that is two all-reduces of ``[T, hidden]``: after the attention output
projection and after the MLP down projection. Nothing else communicates.

Invariants:

* ``size == 1`` is the unsharded model: no group, no all-reduce, local sizes = config sizes;
* ``num_heads``, ``num_kv_heads`` and ``intermediate_size`` must be divisible by ``size``
  (``ValueError`` otherwise; KV heads are never replicated across ranks);
* query head ``j`` of a rank uses KV head ``j // (num_heads / num_kv_heads)`` of the same rank, so
  grouped-query attention needs no cross-rank traffic;
* every rank runs the same ``StepBatch`` with the same KV-cache bookkeeping; each rank's KV cache
  holds ``num_kv_heads / size`` heads (``model.make_kv_cache`` sizes it);
* ``group`` is an explicit process-group *object* (``actors.transport.make_process_group``), never
  the default group: its methods are called directly (``group.allreduce([t]).wait()``);
* ``model.config`` stays the checkpoint's (global) config; the shard's sizes are in ``model.tp``.

Loading: ``hf_shard_index(name, ...)`` says which slice of a checkpoint tensor (HF name, HF
layout) a rank keeps; ``actors.model.loader.load_model(..., tp_rank=, tp_size=, tp_group=)`` reads
only that slice from safetensors (GGUF: dequantised whole, then sliced on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from actors.model.config import ModelConfig

__all__ = ["TensorParallel", "check_tp_divisible", "hf_shard_index", "shard_hf_tensor"]


def check_tp_divisible(config: ModelConfig, size: int) -> None:
    """Raise ``ValueError`` unless heads, KV heads and the MLP width split evenly over ``size`` ranks."""
    if size < 1:
        raise ValueError(f"tp_size must be >= 1, got {size}")
    for what, value in (
        ("num_attention_heads", config.num_heads),
        ("num_key_value_heads", config.num_kv_heads),
        ("intermediate_size", config.intermediate_size),
    ):
        if value % size:
            raise ValueError(
                f"tensor parallelism: {what}={value} is not divisible by tp_size={size} "
                f"(num_attention_heads={config.num_heads}, num_key_value_heads={config.num_kv_heads}, "
                f"intermediate_size={config.intermediate_size})"
            )


@dataclass(frozen=True, eq=False)
class TensorParallel:
    """One rank's place in a tensor-parallel group and the local (per-rank) sizes of its shard."""

    rank: int
    size: int
    group: Any  # process-group object; None when size == 1
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    intermediate_size: int  # MLP width on this rank
    head_dim: int

    @classmethod
    def for_config(cls, config: ModelConfig, rank: int = 0, size: int = 1, group: Any = None) -> TensorParallel:
        check_tp_divisible(config, size)
        if not 0 <= rank < size:
            raise ValueError(f"tp_rank={rank} is not in [0, tp_size={size})")
        if size > 1:
            if group is None:
                raise ValueError(f"tp_size={size} needs a process group (tp_group) of {size} ranks")
            group_size, group_rank = _group_size_rank(group)
            if group_size is not None and group_size != size:
                raise ValueError(f"tp_group has {group_size} ranks but tp_size={size}")
            if group_rank is not None and group_rank != rank:
                raise ValueError(f"tp_group rank is {group_rank} but tp_rank={rank}")
        else:
            group = None  # one rank: never communicate
        return cls(
            rank=rank,
            size=size,
            group=group,
            num_heads=config.num_heads // size,
            num_kv_heads=config.num_kv_heads // size,
            intermediate_size=config.intermediate_size // size,
            head_dim=config.head_dim,
        )

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (contiguous) over the group in place; returns it. No-op for one rank."""
        if self.group is not None:
            self.group.allreduce([tensor]).wait()
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` (contiguous, same shape on every rank) with rank ``src``'s; returns it.

        For the worker: e.g. rank 0's accepted tokens, so every rank commits the same path.
        """
        if self.group is not None:
            opts = dist.BroadcastOptions()
            opts.rootRank = src
            self.group.broadcast([tensor], opts).wait()
        return tensor


def _group_size_rank(group: Any) -> tuple[int | None, int | None]:
    try:
        return int(group.size()), int(group.rank())
    except (AttributeError, TypeError, RuntimeError):
        return None, None


def hf_shard_index(name: str, config: ModelConfig, rank: int, size: int) -> tuple[slice, ...] | None:
    """The slice of checkpoint tensor ``name`` (HF name and layout) that rank ``rank`` keeps.

    ``None``: the tensor is replicated (norms, embedding, lm_head, row-parallel biases) or
    ``size == 1``.
    """
    if size == 1 or not name.startswith("model.layers."):
        return None
    parts = name.split(".")  # model.layers.{i}.{module}.{proj}.{weight|bias}
    proj, kind = ".".join(parts[3:-1]), parts[-1]
    d = config.head_dim
    if proj == "self_attn.q_proj":
        n = config.num_heads // size * d
        return (slice(rank * n, (rank + 1) * n),)
    if proj in ("self_attn.k_proj", "self_attn.v_proj"):
        n = config.num_kv_heads // size * d
        return (slice(rank * n, (rank + 1) * n),)
    if proj in ("mlp.gate_proj", "mlp.up_proj"):
        n = config.intermediate_size // size
        return (slice(rank * n, (rank + 1) * n),)
    if proj == "self_attn.o_proj":
        n = config.num_heads // size * d
        return (slice(None), slice(rank * n, (rank + 1) * n)) if kind == "weight" else None
    if proj == "mlp.down_proj":
        n = config.intermediate_size // size
        return (slice(None), slice(rank * n, (rank + 1) * n)) if kind == "weight" else None
    return None  # layer norms


def shard_hf_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a whole checkpoint tensor (a view; replicated tensors unchanged)."""
    index = hf_shard_index(name, config, rank, size)
    return tensor if index is None else tensor[index]
