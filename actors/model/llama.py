"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2), executable by pieces (data plane).

A ``LlamaModel`` holds global layers ``[first_layer, end_layer)`` and optionally the embedding and
the head (final norm + lm_head). Pieces compose: ``embed -> run_layers -> head`` on one worker, or
split across workers that pass hidden states [T, H] along. Each layer is also split into an
``attention_half`` and an ``ffn_half``.

Invariants:

* weights are fused at load: q/k/v into one [(Hq + 2 Hkv) D, H] matrix, gate/up into one
  [2 I, H] matrix; one matmul each;
* the KV cache passed in is sized for the held layers: cache layer = global layer - first_layer;
* RMSNorm runs in fp32 and casts back before the weight multiply (as HF); logits are fp32;
* no Python loop over tokens or sequences; the device and dtype are whatever was given;
* ``truncated(n)`` shares (never copies) weights with the model it came from;
* tensor parallelism (``tp``, see ``actors.model.tensor_parallel``): each rank holds its heads and
  MLP slice; ``w_o`` and ``w_down`` are followed by one all-reduce each; ``model.config`` stays the
  checkpoint's config and the local sizes are ``model.tp``'s. With one rank (the default) the code
  path is the unsharded one: no group, no all-reduce.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from actors.kv_cache import PagedKVCache
from actors.model import fused
from actors.model.attention import attention_bias, paged_attention
from actors.model.config import ModelConfig
from actors.model.fused import rms_norm
from actors.model.rope import RotaryEmbedding
from actors.model.tensor_parallel import TensorParallel
from actors.step_batch import StepBatch


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    """Fused weights of one decoder layer (this rank's shard: ``tp``'s head and MLP sizes)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, qkv, inter = cfg.hidden_size, tp.q_size + 2 * tp.kv_size, tp.intermediate_size
        p = lambda *s: _param(*s, dtype=dtype, device=device)  # noqa: E731
        self.input_norm = p(h)
        self.w_qkv = p(qkv, h)  # rows: q | k | v (this rank's heads)
        self.b_qkv = p(qkv) if cfg.qkv_bias else None
        self.w_o = p(h, tp.q_size)  # row-parallel: this rank's input columns
        self.b_o = p(h) if cfg.o_bias else None  # whole; added once, after the all-reduce
        self.post_norm = p(h)
        self.w_gate_up = p(2 * inter, h)  # rows: gate | up (this rank's slice of each)
        self.b_gate_up = p(2 * inter) if cfg.mlp_bias else None
        self.w_down = p(h, inter)  # row-parallel
        self.b_down = p(h) if cfg.mlp_bias else None


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        layer_range: tuple[int, int] | None = None,
        has_embed: bool = True,
        has_head: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        first, end = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= first <= end <= config.num_layers:
            raise ValueError(f"layer_range {layer_range} is not within [0, {config.num_layers}]")
        self.config = config
        self.tp = tp if tp is not None else TensorParallel.for_config(config)
        self.first_layer, self.end_layer = int(first), int(end)
        self.has_embed, self.has_head = has_embed, has_head
        self.dtype = dtype
        self.device = torch.device(device)
        self.layers = nn.ModuleList(DecoderLayer(config, self.tp, dtype, self.device) for _ in range(first, end))
        v, h = config.vocab_size, config.hidden_size
        self.embed_tokens = _param(v, h, dtype=dtype, device=self.device) if has_embed else None
        self.final_norm = _param(h, dtype=dtype, device=self.device) if has_head else None
        if has_head:
            tied = config.tie_word_embeddings and has_embed
            self.lm_head = self.embed_tokens if tied else _param(v, h, dtype=dtype, device=self.device)
        else:
            self.lm_head = None
        self.rope = RotaryEmbedding(config, dtype=dtype, device=self.device) if end > first else None
        self.kernels = fused.EAGER  # the layers' element-wise chains: eager, or fused (use_compiled)

    # ----------------------------------------------------------------- pieces
    @property
    def num_held_layers(self) -> int:
        return self.end_layer - self.first_layer

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes across the held layers (K and V) of this rank, in this dtype."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_held_layers * self.tp.num_kv_heads * self.config.head_dim * elem

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64 -> hidden [T, H]."""
        if self.embed_tokens is None:
            raise RuntimeError("this model piece holds no embedding")
        return F.embedding(input_ids, self.embed_tokens)

    def _layer(self, layer: int) -> DecoderLayer:
        if not self.first_layer <= layer < self.end_layer:
            raise IndexError(f"layer {layer} is not held (held: [{self.first_layer}, {self.end_layer}))")
        return self.layers[layer - self.first_layer]

    def attention_half(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        batch: StepBatch,
        cache: PagedKVCache,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,  # from self.rope.cos_sin(positions)
        attn_bias: torch.Tensor | None = None,  # from self.attention_bias(batch), once per step
    ) -> torch.Tensor:  # [T, H]
        cfg, tp, w = self.config, self.tp, self._layer(layer)  # tp: this rank's head counts
        cos, sin = cos_sin if cos_sin is not None else self.rope.cos_sin(batch.positions)
        num_tokens = hidden.shape[0]
        kernels = self.kernels if not tp.enabled else fused.EAGER
        q, k, v = kernels.qkv_rope(hidden, w.input_norm, w.w_qkv, w.b_qkv, cos, sin, cfg.rms_norm_eps,
                                   tp.num_heads, tp.num_kv_heads, cfg.head_dim)
        k_cache, v_cache = cache.layer_kv(layer - self.first_layer)
        attn = paged_attention(q, k, v, k_cache, v_cache, batch, attn_bias)  # [T, Hq, D]
        attn = attn.reshape(num_tokens, tp.q_size)
        if not tp.enabled:
            return kernels.attention_out(hidden, attn, w.w_o, w.b_o)
        return hidden + self._row_parallel(attn, w.w_o, w.b_o)

    def attention_bias(self, batch: StepBatch) -> torch.Tensor:
        """The step's attention mask as the additive bias every layer shares (see attention.py)."""
        return attention_bias(batch, self.tp.num_heads // self.tp.num_kv_heads, self.dtype)

    def ffn_half(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> [T, H]."""
        cfg, w = self.config, self._layer(layer)
        if not self.tp.enabled:
            return self.kernels.ffn(hidden, w.post_norm, w.w_gate_up, w.b_gate_up, w.w_down, w.b_down,
                                    cfg.rms_norm_eps)
        x = rms_norm(hidden, w.post_norm, cfg.rms_norm_eps)
        gate_up = F.linear(x, w.w_gate_up, w.b_gate_up)  # [T, 2 I]
        gate, up = gate_up.chunk(2, dim=-1)
        return hidden + self._row_parallel(F.silu(gate) * up, w.w_down, w.b_down)

    def _row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight.T + bias; under TP a partial sum, all-reduced, then the (whole) bias once."""
        if not self.tp.enabled:
            return F.linear(x, weight, bias)
        out = self.tp.all_reduce_(F.linear(x, weight))
        return out if bias is None else out + bias

    def run_layers(
        self,
        hidden: torch.Tensor,  # [T, H]
        batch: StepBatch,
        cache: PagedKVCache,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:  # [T, H]
        start = self.first_layer if start is None else start
        end = self.end_layer if end is None else end
        if not self.first_layer <= start <= end <= self.end_layer:
            raise IndexError(f"layers [{start}, {end}) not held (held: [{self.first_layer}, {self.end_layer}))")
        if start == end:
            return hidden
        cos_sin = self.rope.cos_sin(batch.positions)
        bias = self.attention_bias(batch)
        for layer in range(start, end):
            hidden = self.attention_half(layer, hidden, batch, cache, cos_sin, bias)
            hidden = self.ffn_half(layer, hidden)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] float32."""
        if self.lm_head is None:
            raise RuntimeError("this model piece holds no head")
        x = rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    @torch.no_grad()
    def forward(self, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        """Whole step: logits [len(batch.logits_index), V] float32 for the wanted rows only."""
        whole = self.first_layer == 0 and self.end_layer == self.config.num_layers
        if not (self.has_embed and self.has_head and whole):
            raise RuntimeError("forward needs the whole model; run the pieces (embed/run_layers/head) instead")
        hidden = self.run_layers(self.embed(batch.input_ids), batch, cache)
        return self.head(hidden.index_select(0, batch.logits_index))

    # ----------------------------------------------------------------- helpers
    def use_compiled(self, enabled: bool = True) -> None:
        """Run the layers' element-wise chains fused by ``torch.compile`` (``actors.model.fused``),
        or eagerly again. Steps captured in CUDA graphs keep the kernels they were captured with."""
        self.kernels = fused.compiled() if enabled else fused.EAGER

    def make_kv_cache(self, budget_bytes: int, block_size: int = 16) -> PagedKVCache:
        """A paged KV cache for the held layers, in this model's dtype and device."""
        if self.num_held_layers == 0:
            raise ValueError("this model piece holds no layers, so it needs no KV cache")
        return PagedKVCache(
            self.num_held_layers,
            self.tp.num_kv_heads,  # this rank's KV heads
            self.config.head_dim,
            budget_bytes=budget_bytes,
            block_size=block_size,
            dtype=self.dtype,
            device=self.device,
        )

    def truncated(self, num_layers: int) -> LlamaModel:
        """A draft model of layers [0, n) + embed + head, sharing this model's weights."""
        if not (self.has_embed and self.has_head and self.first_layer == 0):
            raise ValueError("truncated() needs a model holding the embedding, the head and layer 0")
        if not 1 <= num_layers <= self.num_held_layers:
            raise ValueError(f"truncated({num_layers}): n must be in [1, {self.num_held_layers}]")
        draft = LlamaModel.__new__(LlamaModel)
        nn.Module.__init__(draft)
        draft.config = dataclasses.replace(self.config, num_layers=num_layers)
        draft.first_layer, draft.end_layer = 0, num_layers
        draft.has_embed = draft.has_head = True
        draft.dtype, draft.device = self.dtype, self.device
        draft.tp = self.tp  # same shard, same group: every TP rank must run the draft too
        draft.layers = nn.ModuleList(self.layers[:num_layers])
        draft.embed_tokens, draft.final_norm, draft.lm_head = self.embed_tokens, self.final_norm, self.lm_head
        draft.rope = self.rope
        draft.kernels = self.kernels
        return draft

    # ----------------------------------------------------------------- loading
    def hf_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF checkpoint tensor name -> shape (whole, as in the checkpoint), for every tensor the held
        pieces need; under TP, ``tensor_parallel.hf_shard_index`` says which slice this rank keeps."""
        cfg = self.config
        h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_size
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(self.first_layer, self.end_layer):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            for name, rows in (("q_proj", cfg.q_size), ("k_proj", kv), ("v_proj", kv)):
                shapes[p + f"self_attn.{name}.weight"] = (rows, h)
                if cfg.qkv_bias:
                    shapes[p + f"self_attn.{name}.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (h, cfg.q_size)
            if cfg.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                shapes[p + f"mlp.{name}.weight"] = shape
                if cfg.mlp_bias:
                    shapes[p + f"mlp.{name}.bias"] = shape[:1]
        if self.has_embed or (self.has_head and cfg.tie_word_embeddings):
            shapes["model.embed_tokens.weight"] = (cfg.vocab_size, h)
        if self.has_head:
            shapes["model.norm.weight"] = (h,)
            if not cfg.tie_word_embeddings:
                shapes["lm_head.weight"] = (cfg.vocab_size, h)
        return shapes

    @torch.no_grad()
    def load_hf_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one HF-named tensor (shape checked by the caller) into its (possibly fused) slot.

        Under TP, ``tensor`` is this rank's slice (``tensor_parallel.shard_hf_tensor``)."""
        cfg, tp = self.config, self.tp
        if name == "model.embed_tokens.weight":
            tied_head = self.lm_head if cfg.tie_word_embeddings else None
            targets = [t for t in (self.embed_tokens, tied_head) if t is not None]
            for target in {id(t): t for t in targets}.values():  # tied + both held: one tensor
                target.copy_(tensor)
            return
        if name == "lm_head.weight":
            self.lm_head.copy_(tensor)
            return
        if name == "model.norm.weight":
            self.final_norm.copy_(tensor)
            return
        parts = name.split(".")  # model.layers.{i}.{module}.{proj}.{weight|bias}
        w = self._layer(int(parts[2]))
        kind, proj = parts[-1], ".".join(parts[3:-1])
        q, kv, inter = tp.q_size, tp.kv_size, tp.intermediate_size  # local (== config's with one rank)
        spans = {
            "input_layernorm": ("input_norm", 0, None),
            "post_attention_layernorm": ("post_norm", 0, None),
            "self_attn.q_proj": ("qkv", 0, q),
            "self_attn.k_proj": ("qkv", q, q + kv),
            "self_attn.v_proj": ("qkv", q + kv, q + 2 * kv),
            "self_attn.o_proj": ("o", 0, None),
            "mlp.gate_proj": ("gate_up", 0, inter),
            "mlp.up_proj": ("gate_up", inter, 2 * inter),
            "mlp.down_proj": ("down", 0, None),
        }
        attr, lo, hi = spans[proj]
        if attr in ("input_norm", "post_norm"):
            target = getattr(w, attr)
        else:
            target = getattr(w, ("w_" if kind == "weight" else "b_") + attr)
        target[lo:hi].copy_(tensor)
