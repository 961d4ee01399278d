"""Tiny random Llama-family checkpoints, tokenizers and GGUF files for tests (offline, seconds).

``write_tiny_checkpoint`` builds the model with transformers itself and ``save_pretrained``s it, so
tests compare our runtime with ``AutoModelForCausalLM`` on exactly the same files. Weights use a
large initializer range and randomised norms/biases so logits are well spread (no argmax ties)
and a mis-loaded norm or bias cannot hide behind an all-ones/all-zeros initial value.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Byte-level BPE over 256 byte symbols + these merges (applied in order).
_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("in", "g"), ("e", "r"), ("a", "n"), ("Ġ", "a"),
    ("o", "n"), ("r", "e"), ("Ġ", "s"), ("e", "d"), ("Ġ", "w"), ("o", "u"), ("Ġa", "n"), ("Ġan", "d"),
    ("Ġ", "o"), ("Ġo", "f"), ("i", "s"), ("Ġ", "c"), ("a", "t"), ("Ġ", "b"), ("o", "r"), ("Ġ", "h"),
]
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2


def tiny_vocab(variant: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tiny byte-level BPE; ``variant`` != 0 gives a different vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = list(_MERGES) if variant == 0 else list(_MERGES[:-1]) + [("Ġ", "m")]
    tokens = SPECIALS + sorted(bytes_to_unicode().values()) + ["".join(m) for m in merges]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tiny_tokenizer(directory: str | Path, variant: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = tiny_vocab(variant)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return Path(directory)


def _hf_config(arch: str, vocab_size: int, tie: bool, num_layers: int, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        initializer_range=0.15, tie_word_embeddings=tie, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=None,
    )
    if arch == "llama":
        cls, extra = LlamaConfig, dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif arch == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cls, extra = LlamaConfig, dict(rope_parameters=rope)
    elif arch == "mistral":
        cls, extra = MistralConfig, dict(sliding_window=256, head_dim=16)
    elif arch == "qwen2":
        cls, extra = Qwen2Config, dict(use_sliding_window=False)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    return cls(**{**common, **extra, **overrides})


def build_tiny_hf_model(
    arch: str = "llama", *, vocab_size: int = 320, tie_word_embeddings: bool | None = None,
    num_layers: int = 4, seed: int = 0, **config_overrides,
):
    """A transformers model (fp32, eval) with seeded, well-spread random weights."""
    from transformers import AutoModelForCausalLM

    tie = (arch == "llama3") if tie_word_embeddings is None else tie_word_embeddings
    config = _hf_config(arch, vocab_size, tie, num_layers, config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def write_tiny_checkpoint(
    directory: str | Path,
    arch: str = "llama",
    *,
    vocab_size: int = 320,
    tie_word_embeddings: bool | None = None,
    num_layers: int = 4,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Save a tiny random model of ``arch`` ("llama" | "llama3" | "mistral" | "qwen2") to ``directory``.

    "llama3" uses ``rope_type: llama3`` scaling and tied embeddings (unless told otherwise).
    """
    directory = Path(directory)
    model = build_tiny_hf_model(
        arch, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings, num_layers=num_layers,
        seed=seed, **config_overrides,
    )
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(directory), **kwargs)
    if with_tokenizer:
        write_tiny_tokenizer(directory)
    return directory


def _permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, interleave the two rotary halves ([h, 2, d/2] -> [h, d/2, 2])."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_tiny_gguf(checkpoint_dir: str | Path, gguf_path: str | Path) -> Path:
    """Convert a tiny *llama* safetensors checkpoint to an f32 GGUF file (llama arch, gpt2 tokenizer)."""
    import json

    import gguf
    from safetensors.torch import load_file

    checkpoint_dir, gguf_path = Path(checkpoint_dir), Path(gguf_path)
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    tensors = load_file(str(checkpoint_dir / "model.safetensors"))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab, merges = tiny_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(0)

    rope = cfg["rope_parameters"]
    if rope.get("rope_type") == "llama3":  # llama.cpp stores llama3 scaling as per-frequency divisors
        from transformers import AutoConfig

        from actors.model.config import ModelConfig

        scaled = torch.tensor(ModelConfig.from_hf(AutoConfig.from_pretrained(str(checkpoint_dir))).inv_freq)
        base = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        writer.add_tensor("rope_freqs.weight", (base / scaled).float().numpy())

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, tensor in tensors.items():
        tensor = tensor.float()
        if name in names:
            gguf_name = names[name]
        else:
            _, _, layer, *module, kind = name.split(".")
            gguf_name = f"blk.{layer}.{per_layer['.'.join(module)]}.{kind}"
            if module[-1] == "q_proj":
                tensor = _permute_for_gguf(tensor, n_head)
            elif module[-1] == "k_proj":
                tensor = _permute_for_gguf(tensor, n_kv)
        writer.add_tensor(gguf_name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path
