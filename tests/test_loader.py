"""Loader, pieces and errors: shards, dtypes, layer ranges, halves, truncation, GGUF, bad inputs."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config

from actors.model.config import ModelConfig, ModelLoadError, UnsupportedArchitectureError
from actors.model.loader import (
    CorruptCheckpointError,
    GGUFUnavailableError,
    MissingConfigError,
    MissingTensorError,
    MissingWeightsError,
    ModelNotFoundError,
    TensorShapeError,
    load_config,
    load_model,
)
from actors.model.tokenizer import (
    TokenizerLoadError,
    TokenizerMismatchError,
    ensure_same_tokenizer,
    load_tokenizer,
)
from actors.step_batch import SeqStep, StepBatch
from tests.tiny_models import write_tiny_checkpoint, write_tiny_gguf, write_tiny_tokenizer

BUDGET = 1 << 20


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(llama_dir)


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_script(model, feeds: list[list[list[int]]]) -> list[torch.Tensor]:
    """Feed steps (each: one token list per sequence) through ``model.forward``; all logits, in order."""
    cache, outs = model.make_kv_cache(BUDGET, block_size=4), []
    for i in range(len(feeds[0])):
        cache.add_sequence(i)
    for feed in feeds:
        batch = StepBatch.build(cache, [SeqStep(i, toks) for i, toks in enumerate(feed)])
        outs.append(model(batch, cache))
        for i in range(len(feed)):
            cache.commit(i)
    return outs


SCRIPT = [[prompt(0, 6), prompt(1, 11)], [[5], [6, 7, 8]], [[9], [10]]]


def test_sharded_checkpoint_matches(tmp_path, llama, llama_dir):
    sharded = write_tiny_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for ours, ref in zip(run_script(load_model(sharded), SCRIPT), run_script(llama, SCRIPT)):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_runs(llama_dir, llama, dtype):
    model = load_model(llama_dir, dtype=dtype)
    assert model.layers[0].w_qkv.dtype == dtype
    assert model.make_kv_cache(BUDGET).storage.dtype == dtype
    for ours, ref in zip(run_script(model, SCRIPT), run_script(llama, SCRIPT)):
        assert ours.dtype == torch.float32
        assert (ours - ref).abs().max() < 0.1 * ref.abs().max()
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
    # Same dtype as transformers: the same roundings (exact on CPU), so a tight tolerance.
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=dtype).eval()
    ids = prompt(9, 17)
    (ours,) = run_script(model, [[ids]])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max() < 1e-2


def test_default_dtype_is_checkpoint_dtype(tmp_path, llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir)).to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path))
    assert load_model(tmp_path).dtype == torch.bfloat16
    assert load_model(llama_dir).dtype == torch.float32


def test_layer_range_pieces_compose(llama_dir, llama):
    a = load_model(llama_dir, layer_range=(0, 2), has_head=False)
    b = load_model(llama_dir, layer_range=(2, 4), has_embed=False)
    assert a.lm_head is None and b.embed_tokens is None and len(a.layers) == len(b.layers) == 2
    cache_a, cache_b, cache_full = a.make_kv_cache(BUDGET), b.make_kv_cache(BUDGET), llama.make_kv_cache(BUDGET)
    for cache in (cache_a, cache_b, cache_full):
        cache.add_sequence("s")
        cache.add_sequence("t")
    for feed in SCRIPT:
        steps = [SeqStep("s", feed[0]), SeqStep("t", feed[1])]
        batch_a, batch_b, batch_f = (StepBatch.build(c, steps) for c in (cache_a, cache_b, cache_full))
        hidden = a.run_layers(a.embed(batch_a.input_ids), batch_a, cache_a)
        hidden = b.run_layers(hidden, batch_b, cache_b)
        logits = b.head(hidden[batch_b.logits_index])
        assert torch.equal(logits, llama(batch_f, cache_full))
        for cache in (cache_a, cache_b, cache_full):
            cache.commit("s")
            cache.commit("t")
    with pytest.raises(RuntimeError, match="whole model"):
        a(batch_a, cache_a)


def test_halves_compose_to_run_layers(llama):
    caches = [llama.make_kv_cache(BUDGET) for _ in range(3)]
    for cache in caches:
        cache.add_sequence("s")
    for feed in ([prompt(3, 9)], [[4]], [[5, 6]]):
        batches = [StepBatch.build(cache, [SeqStep("s", feed[0])]) for cache in caches]
        ref = llama.run_layers(llama.embed(batches[0].input_ids), batches[0], caches[0])
        hidden = llama.embed(batches[1].input_ids)
        for layer in range(4):
            hidden = llama.ffn_half(layer, llama.attention_half(layer, hidden, batches[1], caches[1]))
        assert torch.equal(hidden, ref)
        split = llama.run_layers(llama.embed(batches[2].input_ids), batches[2], caches[2], end=1)
        split = llama.run_layers(split, batches[2], caches[2], start=1, end=4)
        assert torch.equal(split, ref)
        for cache in caches:
            cache.commit("s")
    with pytest.raises(IndexError):
        llama.attention_half(4, hidden, batches[1], caches[1])


def test_truncated_equals_shallow_model(llama_dir, llama):
    draft = llama.truncated(2)
    assert draft.layers[1].w_qkv is llama.layers[1].w_qkv and draft.lm_head is llama.lm_head
    assert draft.config.num_layers == 2 and draft.make_kv_cache(BUDGET).num_layers == 2
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    hf.model.layers = hf.model.layers[:2]
    hf.config.num_hidden_layers = 2
    ids = prompt(8, 12)
    (out,) = run_script(draft, [[ids]])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (out - ref).abs().max() < 1e-4
    for bad in (0, 5):
        with pytest.raises(ValueError, match="truncated"):
            llama.truncated(bad)


@pytest.mark.parametrize("arch", ["llama", "llama3"])
def test_gguf_matches_safetensors(tmp_path, arch):
    directory = write_tiny_checkpoint(tmp_path / "ckpt", arch)
    gguf_path = write_tiny_gguf(directory, tmp_path / "tiny.gguf")
    config = load_config(gguf_path)
    assert config.tie_word_embeddings == (arch == "llama3")
    ours, ref = load_model(gguf_path), load_model(directory)
    assert ours.dtype == torch.float32
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    for out, expected in zip(run_script(ours, SCRIPT), run_script(ref, SCRIPT)):
        assert (out - expected).abs().max() < 1e-4
    text = "the cat and the hat"
    assert load_tokenizer(gguf_path)(text)["input_ids"] == load_tokenizer(directory)(text)["input_ids"]


# ----------------------------------------------------------------------------- bad input
def test_unsupported_architecture(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path, dirs_exist_ok=True)
    GPT2Config(architectures=["GPT2LMHeadModel"], n_layer=1, n_embd=32, n_head=2).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="model_type=gpt2"):
        ModelConfig.from_hf(GPT2Config())


def test_missing_path_and_config(tmp_path, llama_dir):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    shutil.copy(llama_dir / "model.safetensors", tmp_path)
    with pytest.raises(MissingConfigError, match="config.json"):
        load_model(tmp_path)


def test_missing_weights(tmp_path, llama_dir):
    shutil.copy(llama_dir / "config.json", tmp_path)
    with pytest.raises(MissingWeightsError, match="no weight files"):
        load_model(tmp_path)


def test_corrupt_safetensors(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_model(tmp_path)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptCheckpointError, match="corrupt"):
        load_model(tmp_path)


def test_missing_and_misshapen_tensor(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path, dirs_exist_ok=True)
    tensors = load_file(str(llama_dir / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MissingTensorError, match=name):
        load_model(tmp_path)
    load_model(tmp_path, layer_range=(0, 1), has_head=False)  # pieces not needing it still load
    save_file({**tensors, name: torch.zeros(64, 100)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(TensorShapeError, match=r"down_proj.*\[64, 100\].*\[64, 128\]"):
        load_model(tmp_path)


def test_index_with_missing_shard(tmp_path):
    directory = write_tiny_checkpoint(tmp_path, "llama", max_shard_size="40KB", with_tokenizer=False)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (directory / shard).unlink()
    with pytest.raises(MissingWeightsError, match=shard):
        load_model(directory)


def test_gguf_package_missing(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(GGUFUnavailableError, match="gguf"):
        load_model(path)


def test_errors_are_one_family():
    for cls in (UnsupportedArchitectureError, ModelNotFoundError, MissingConfigError, MissingWeightsError,
                CorruptCheckpointError, MissingTensorError, TensorShapeError, GGUFUnavailableError,
                TokenizerMismatchError):
        assert issubclass(cls, ModelLoadError) and issubclass(cls, ValueError)


def test_tokenizers(tmp_path, llama_dir):
    same, other = write_tiny_tokenizer(tmp_path / "same"), write_tiny_tokenizer(tmp_path / "other", variant=1)
    target = load_tokenizer(llama_dir)
    assert target.eos_token_id == 2 and target.bos_token_id == 1
    ensure_same_tokenizer(target, load_tokenizer(same))
    with pytest.raises(TokenizerMismatchError, match="token id 282 is 'Ġh' in the target but 'Ġm'"):
        ensure_same_tokenizer(target, load_tokenizer(other))
    different_eos = load_tokenizer(same)
    different_eos.eos_token = "<unk>"
    with pytest.raises(TokenizerMismatchError, match="eos_token"):
        ensure_same_tokenizer(target, different_eos)
    with pytest.raises(TokenizerLoadError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    shorter = load_tokenizer(same)
    shorter.add_tokens(["<extra>"])
    with pytest.raises(TokenizerMismatchError, match="vocabulary sizes differ"):
        ensure_same_tokenizer(target, shorter)
