"""Model hyper-parameters the runtime needs, read once from a transformers config (data plane).

``ModelConfig`` is a frozen, hashable value: every worker holding a piece of the same checkpoint
builds an equal one. It carries the rotary ``inv_freq`` already computed by transformers' own rope
initialisers (default, linear, llama3, yarn), so the runtime never re-derives scaling rules.

Invariants:

* only the architectures in ``SUPPORTED_ARCHITECTURES`` are accepted; anything else raises
  ``UnsupportedArchitectureError`` naming it;
* ``num_heads % num_kv_heads == 0`` and ``len(inv_freq) == head_dim // 2`` (full rotary dim);
* ``max_context`` is the longest sequence the runtime will serve: ``max_position_embeddings``,
  capped by the sliding window when one is configured (sliding-window attention is not
  implemented, so positions past the window are out of range rather than silently wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Architecture name (config.architectures[0]) -> family name used by the runtime.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPE_TO_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Rope types whose frequencies do not depend on the current sequence length.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ModelLoadError(ValueError):
    """Base of every error raised while reading a model's config, weights or tokenizer."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's architecture (or one of its features) is not implemented by the runtime."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # e.g. "LlamaForCausalLM"
    family: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool  # bias on o_proj (Llama attention_bias)
    mlp_bias: bool
    max_context: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    rope_type: str
    rope_theta: float
    inv_freq: tuple[float, ...]  # [head_dim // 2] rotary inverse frequencies (fp32 values)
    rope_attention_scaling: float  # cos/sin multiplier (yarn mscale; 1.0 otherwise)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a ``transformers.PretrainedConfig`` of a supported architecture."""
        arch = _architecture_of(hf_config)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedArchitectureError(f"{arch}: activation {act!r} is not supported (only silu)")
        num_heads = int(hf_config.num_attention_heads)
        num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
        if num_heads % num_kv_heads:
            raise UnsupportedArchitectureError(
                f"{arch}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads)
        rope_type, rope_theta, inv_freq, scaling = _rope(hf_config, arch, head_dim)

        max_context = int(hf_config.max_position_embeddings)
        window = getattr(hf_config, "sliding_window", None)
        uses_window = family == "mistral" or bool(getattr(hf_config, "use_sliding_window", False))
        if uses_window and window:
            max_context = min(max_context, int(window))

        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        bos = getattr(hf_config, "bos_token_id", None)
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=attention_bias if family == "llama" else False,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)) if family == "llama" else False,
            max_context=max_context,
            bos_token_id=None if bos is None else int(bos if not isinstance(bos, (list, tuple)) else bos[0]),
            eos_token_ids=eos_ids,
            rope_type=rope_type,
            rope_theta=rope_theta,
            inv_freq=inv_freq,
            rope_attention_scaling=scaling,
        )


def _architecture_of(hf_config: Any) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return str(archs[0])
    model_type = getattr(hf_config, "model_type", None)
    return _MODEL_TYPE_TO_ARCH.get(model_type, f"model_type={model_type}")


def _rope(hf_config: Any, arch: str, head_dim: int) -> tuple[str, float, tuple[float, ...], float]:
    """(rope_type, rope_theta, inv_freq, attention_scaling) computed by transformers itself."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    if "rope_type" not in params and hasattr(hf_config, "standardize_rope_params"):
        hf_config.standardize_rope_params()
        params = hf_config.rope_parameters or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _STATIC_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"{arch}: rope type {rope_type!r} is not supported (supported: {', '.join(_STATIC_ROPE_TYPES)})"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedArchitectureError(f"{arch}: partial rotary embeddings are not supported")
    if rope_type == "default":
        # Same formula as transformers' compute_default_rope_parameters (shared by llama/mistral/qwen2).
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    inv_freq = inv_freq.float()
    if inv_freq.numel() != head_dim // 2:
        raise UnsupportedArchitectureError(
            f"{arch}: rope has {inv_freq.numel()} frequencies, expected head_dim // 2 = {head_dim // 2}"
        )
    return rope_type, float(params.get("rope_theta", 10000.0)), tuple(inv_freq.tolist()), float(scaling)
