"""Our LlamaModel vs transformers on tiny random checkpoints: prefill, ragged batches, trees, greedy."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.model.loader import load_model
from actors.step_batch import SeqStep, StepBatch
from tests.tiny_models import write_tiny_checkpoint

ARCHS = ["llama", "llama3", "mistral", "qwen2"]
ATOL = 1e-4
BUDGET = 1 << 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: write_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {arch: AutoModelForCausalLM.from_pretrained(str(d)).eval() for arch, d in checkpoints.items()}


@pytest.fixture(scope="module")
def our_models(checkpoints):
    return {arch: load_model(d) for arch, d in checkpoints.items()}


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] logits of transformers for one sequence."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def step(model, cache, steps: list[SeqStep]) -> list[torch.Tensor]:
    batch = StepBatch.build(cache, steps)
    return batch.split_logits(model(batch, cache))


def assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"max abs diff {diff} > {atol}"


@pytest.mark.parametrize("arch", ARCHS)
def test_config_matches_hf(arch, hf_models, our_models):
    cfg, hf = our_models[arch].config, hf_models[arch]
    assert cfg.family == {"llama3": "llama"}.get(arch, arch)
    assert cfg.qkv_bias == (arch == "qwen2")
    assert cfg.tie_word_embeddings == (arch == "llama3")
    assert cfg.max_context == (256 if arch == "mistral" else 512)
    rotary = hf.model.rotary_emb
    assert torch.equal(torch.tensor(cfg.inv_freq), rotary.inv_freq.float())
    assert cfg.rope_attention_scaling == rotary.attention_scaling
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_single_prefill(arch, hf_models, our_models):
    model, ids = our_models[arch], prompt(0, 21)
    cache = model.make_kv_cache(BUDGET)
    cache.add_sequence("a")
    (logits,) = step(model, cache, [SeqStep("a", ids)])
    assert logits.dtype == torch.float32
    assert_close(logits, hf_logits(hf_models[arch], ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_batches(arch, hf_models, our_models):
    model, hf = our_models[arch], hf_models[arch]
    cache = model.make_kv_cache(BUDGET, block_size=4)  # small blocks: sequences span many blocks
    seqs = {"a": prompt(1, 5), "b": prompt(2, 9), "c": prompt(3, 13)}
    for rid in seqs:
        cache.add_sequence(rid)

    outs = step(model, cache, [SeqStep(rid, ids) for rid, ids in seqs.items()])
    for (rid, ids), out in zip(seqs.items(), outs):
        assert_close(out, hf_logits(hf, ids))
        cache.commit(rid)
        ids.append(int(out[-1].argmax()))

    for _ in range(3):  # decode steps for all three
        outs = step(model, cache, [SeqStep(rid, ids[-1:]) for rid, ids in seqs.items()])
        for (rid, ids), out in zip(seqs.items(), outs):
            assert_close(out, hf_logits(hf, ids)[-1:])
            cache.commit(rid)
            ids.append(int(out[-1].argmax()))

    # Mixed: a new prompt's prefill, decodes, and a 3-token chain for "b".
    seqs["d"] = prompt(4, 7)
    cache.add_sequence("d")
    chain = prompt(5, 2)
    feeds = {"a": seqs["a"][-1:], "d": seqs["d"], "b": seqs["b"][-1:] + chain, "c": seqs["c"][-1:]}
    outs = step(model, cache, [SeqStep(rid, feed) for rid, feed in feeds.items()])
    seqs["b"] += chain
    for (rid, feed), out in zip(feeds.items(), outs):
        assert out.shape[0] == len(feed)
        assert_close(out, hf_logits(hf, seqs[rid])[-len(feed):])


@pytest.mark.parametrize("arch", ARCHS)
def test_token_tree(arch, hf_models, our_models):
    model, hf = our_models[arch], hf_models[arch]
    cache = model.make_kv_cache(BUDGET, block_size=4)
    ids = prompt(6, 10)
    cache.add_sequence("t")
    step(model, cache, [SeqStep("t", ids, logits="last")])
    cache.commit("t")
    tokens, parents = [40, 41, 42, 43, 44], [-1, 0, 0, 1, 2]
    (out,) = step(model, cache, [SeqStep("t", tokens, parents=parents)])
    for node in range(len(tokens)):
        path, cur = [], node
        while cur >= 0:
            path.insert(0, tokens[cur])
            cur = parents[cur]
        assert_close(out[node : node + 1], hf_logits(hf, ids + path)[-1:])
    # Accept the path 0 -> 2 -> 4 (not a prefix: entries are copied down), then keep decoding.
    cache.commit("t", [0, 2, 4])
    ids += [40, 42, 44]
    (out,) = step(model, cache, [SeqStep("t", [7])])
    assert_close(out, hf_logits(hf, ids + [7])[-1:])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_hf(arch, hf_models, our_models):
    model, hf = our_models[arch], hf_models[arch]
    ids = prompt(7, 8)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=0
        )[0, len(ids):].tolist()
    cache = model.make_kv_cache(BUDGET)
    cache.add_sequence("g")
    feed, generated = ids, []
    for _ in range(64):
        (out,) = step(model, cache, [SeqStep("g", feed, logits="last")])
        cache.commit("g")
        feed = [int(out[-1].argmax())]
        generated += feed
    assert generated == ref
