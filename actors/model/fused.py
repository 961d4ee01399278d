"""The element-wise chains of a decoder layer, eager or fused by ``torch.compile`` (data plane).

A decode step of a small model is latency-bound: profiled on an H100 (Llama-3.2-1B shape, batch 1,
``benchmarks/results/2026-11-23-h100-graph-steps``) each layer ran ~28 kernels, of which only 4 are
the weight GEMMs; the RMSNorm casts, RoPE, SiLU·up and residual adds took about as long as all the
GEMMs' weight reads together. These functions are the layer's pieces around paged attention, as
pure tensor functions so that ``torch.compile`` can fuse each chain (and the residual add into the
GEMM's neighbourhood) into a few kernels; the CUDA graphs of ``GraphRunner`` then capture the
compiled kernels like any others.

``EAGER`` is exactly the model's plain computation (the default everywhere). ``compiled()`` gives
the same functions through ``torch.compile(dynamic=True, fullgraph=True)``, compiled lazily on first
use per shape class (the graph runner's warm-up step, before capture). Used only without tensor
parallelism (the all-reduce between the GEMM and the residual stays eager). Numerics: fp32 agrees
to rounding; half precision may differ in the last bit where a fused kernel rounds once instead of
per op (greedy-equality tests compare a model with itself, eager or fused, never the two).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from actors.model.rope import RotaryEmbedding


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> [T, H]; normalised in fp32, weight applied in x's dtype (as HF)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def qkv_rope(hidden: torch.Tensor, norm: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None,
             cos: torch.Tensor, sin: torch.Tensor, eps: float, num_heads: int, num_kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H] -> rotated q [T, Hq, D], rotated k [T, Hkv, D], v [T, Hkv, D]."""
    num_tokens = hidden.shape[0]
    qkv = F.linear(rms_norm(hidden, norm, eps), w_qkv, b_qkv)  # [T, (Hq + 2 Hkv) D]
    split = (num_heads + num_kv_heads) * head_dim
    qk = qkv[:, :split].view(num_tokens, num_heads + num_kv_heads, head_dim)
    qk = RotaryEmbedding.apply(qk, cos, sin)
    v = qkv[:, split:].view(num_tokens, num_kv_heads, head_dim)
    return qk[:, :num_heads], qk[:, num_heads:], v


def attention_out(hidden: torch.Tensor, attn: torch.Tensor, w_o: torch.Tensor,
                  b_o: torch.Tensor | None) -> torch.Tensor:
    """hidden [T, H] + o_proj(attn [T, Hq D])."""
    return hidden + F.linear(attn, w_o, b_o)


def ffn(hidden: torch.Tensor, norm: torch.Tensor, w_gate_up: torch.Tensor, b_gate_up: torch.Tensor | None,
        w_down: torch.Tensor, b_down: torch.Tensor | None, eps: float) -> torch.Tensor:
    """hidden [T, H] + down(silu(gate) * up) of the post-attention norm."""
    gate, up = F.linear(rms_norm(hidden, norm, eps), w_gate_up, b_gate_up).chunk(2, dim=-1)
    return hidden + F.linear(F.silu(gate) * up, w_down, b_down)


EAGER = SimpleNamespace(qkv_rope=qkv_rope, attention_out=attention_out, ffn=ffn, name="eager")
_COMPILED: SimpleNamespace | None = None


def compiled() -> SimpleNamespace:
    """The same functions through ``torch.compile`` (one set per process, shared by every model)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = SimpleNamespace(**{fn.__name__: torch.compile(fn, dynamic=True, fullgraph=True)
                                       for fn in (qkv_rope, attention_out, ffn)}, name="compiled")
    return _COMPILED
