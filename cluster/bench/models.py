"""Models of a benchmark run: checkpoint paths and "shape" checkpoints with random weights.

A *shape* is a real model's configuration (Llama-3.2-1B, -3B, Llama-3.1-8B, SmolLM2-135M) with
random weights, written once per run as an ordinary Hugging Face directory (``config.json`` from
transformers' own ``LlamaConfig`` + ``model.safetensors``) so that Outrider and transformers load
exactly the same files. Random weights make every cost real (same tensors, same bytes) and every
acceptance meaningless: drafts on shapes either measure cost at whatever acceptance the random
weights give, or use the oracle drafter (emulated acceptance, labelled as such).

Weights are drawn on the benchmark's device (fast on a GPU), seeded, normal with the configs'
``initializer_range`` (norm weights 1), in the run's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# name -> LlamaConfig fields. Values from the models' published config.json files.
_LLAMA3_ROPE_1B3B = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_ROPE_8B = {**_LLAMA3_ROPE_1B3B, "factor": 8.0}
SHAPES: dict[str, dict] = {
    "SmolLM2-135M": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
                     "bos_token_id": 1, "eos_token_id": 2},
    "Llama-3.2-1B": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_parameters": _LLAMA3_ROPE_1B3B,
                     "bos_token_id": 128000, "eos_token_id": 128001},
    "Llama-3.2-3B": {"vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_parameters": _LLAMA3_ROPE_1B3B,
                     "bos_token_id": 128000, "eos_token_id": 128001},
    "Llama-3.1-8B": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_parameters": _LLAMA3_ROPE_8B,
                     "bos_token_id": 128000, "eos_token_id": 128001},
}
# Short names accepted on the command line.
ALIASES = {"135M": "SmolLM2-135M", "1B": "Llama-3.2-1B", "3B": "Llama-3.2-3B", "8B": "Llama-3.1-8B"}
SHAPE_PREFIX = "shape:"


def shape_name(name: str) -> str:
    name = name.removeprefix(SHAPE_PREFIX)
    name = ALIASES.get(name, name)
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)} (or {', '.join(ALIASES)})")
    return name


def shape_hf_config(name: str, overrides: dict | None = None):
    from transformers import LlamaConfig

    fields = {**SHAPES[shape_name(name)], "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False,
              "pad_token_id": None, **(overrides or {})}
    return LlamaConfig(**fields)


def shape_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a Llama config (no biases)."""
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    return shapes


def write_shape_checkpoint(name: str, directory: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                           device: str | torch.device = "cpu", seed: int = 0, tokenizer_dir: str | Path | None = None,
                           overrides: dict | None = None) -> Path:
    """Write the shape ``name`` with seeded random weights to ``directory`` (skipped when already
    complete there). ``tokenizer_dir``: tokenizer files to copy in (their ids must fit the vocab)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    marker = directory / "outrider-shape.json"
    stamp = {"shape": shape_name(name), "dtype": str(dtype), "seed": seed, "overrides": overrides or {}}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = shape_hf_config(name, overrides)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(str(directory))
    gen = torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range
    tensors = {}
    for tensor_name, shape in shape_tensor_shapes(config).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype).cpu()
        tensors[tensor_name] = t
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        import shutil

        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy(f, directory / f.name)
    marker.write_text(json.dumps(stamp))
    return directory


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every parameter once, the embedding as one row
    (or in full when it is also the LM head)."""
    total = 0
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("embed_tokens") and getattr(model, "lm_head", None) is not p:
            total += p.shape[-1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total
