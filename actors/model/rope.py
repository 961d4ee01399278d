"""Rotary position embedding at arbitrary per-token positions (data plane).

The cos/sin table is computed once, up to the model's max context, on the model's device, exactly
as transformers does it (``positions.float() * inv_freq`` in fp32, ``cat(freqs, freqs)``, cos/sin,
times the attention scaling, then cast to the model dtype), so results match HF bit for bit.

HF's "rotate_half" convention: ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x2, x1)``. We fold the sign into the table (``sin_signed = cat(-s, s)``) so
that ``rotate_half(x) * sin == roll(x, D/2) * sin_signed`` — the same values with fewer ops.

Invariants: positions are int64 in ``[0, max_positions)``; tables are read-only after construction.
"""

from __future__ import annotations

import torch

from actors.model.config import ModelConfig


class RotaryEmbedding:
    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.head_dim = config.head_dim
        self.max_positions = config.max_context
        inv_freq = torch.tensor(config.inv_freq, dtype=torch.float32, device=device)  # [D/2]
        pos = torch.arange(self.max_positions, device=device, dtype=torch.int64).float()  # [P]
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        scale = config.rope_attention_scaling
        cos = (emb.cos() * scale).to(dtype)
        sin = (emb.sin() * scale).to(dtype)
        half = self.head_dim // 2
        sin[:, :half].neg_()
        # [P, 2, D]: one gather per step fetches both tables.
        self.table = torch.stack((cos, sin), dim=1).contiguous()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> (cos [T, 1, D], sin_signed [T, 1, D]), broadcastable over heads."""
        cs = self.table.index_select(0, positions)  # [T, 2, D]
        return cs[:, 0:1], cs[:, 1:2]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] (any heads), cos/sin_signed [T, 1, D] -> rotated [T, H, D]."""
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed
