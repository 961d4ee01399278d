"""GraphRunner: bucketed, padded decode/verify steps (CPU: the padded layout run eagerly; CUDA: the
captured graphs, skipped without a device)."""

from __future__ import annotations

import random

import pytest
import torch

from actors.kv_cache import PagedKVCache
from actors.model.graph_runner import GraphRunner, power_of_two_buckets
from actors.model.loader import load_model
from actors.spec.proposers import DraftModelProposer, ProposeRequest, TreeShape
from actors.spec.reference import generate
from actors.spec.types import SamplingParams
from actors.step_batch import Padding, SeqStep, StepBatch
from tests.tiny_models import write_tiny_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("graph"), arch="llama", num_layers=3, with_tokenizer=False)


@pytest.fixture(scope="module")
def model(path):
    return load_model(path, dtype=torch.float32)


# --------------------------------------------------------------------------- helpers
def _script(seed: int, vocab: int, num_seqs: int = 5, rounds: int = 10):
    """A seeded mix of steps: prompts, decodes, chains and trees over a changing set of sequences.

    Yields lists of (SeqStep, keep) where keep is the path committed after the step."""
    rng = random.Random(seed)
    live: list[int] = []
    next_id = 0
    for _ in range(rounds):
        steps = []
        if len(live) < num_seqs:  # admit a sequence: a prompt (prefill-sized or tiny)
            n = 12 if next_id == 0 else rng.choice([1, 2, 3, 7])  # the first: beyond Q buckets
            steps.append((SeqStep(next_id, [rng.randrange(vocab) for _ in range(n)], logits="last"), None))
            live.append(next_id)
            next_id += 1
        for req in live[:-1] if steps else live:
            kind = rng.choice(["decode", "chain", "tree", "none"])
            if kind == "decode":
                steps.append((SeqStep(req, [rng.randrange(vocab)]), None))
            elif kind == "chain":
                k = rng.randint(2, 6)
                keep = list(range(rng.randint(1, k)))
                steps.append((SeqStep(req, [rng.randrange(vocab) for _ in range(k)]), keep))
            elif kind == "tree":
                parents = [-1, 0, 0, 1, 2][: rng.randint(3, 5)]
                steps.append((SeqStep(req, [rng.randrange(vocab) for _ in parents], parents=parents), [0, 2]))
        rng.shuffle(steps)
        if steps:
            yield steps


def _read_kv(cache: PagedKVCache, req, length: int) -> torch.Tensor:
    return cache.storage[:, :, cache.slots(req, 0, length)]


# --------------------------------------------------------------------------- CPU
def test_buckets_and_padding_shape(model):
    cache = model.make_kv_cache(1 << 20, block_size=4)
    runner = GraphRunner(model, cache, mode="padded", kv_buckets=(8, 16, 64))
    assert runner.scratch_slot is not None and cache.capacity_tokens == cache.num_slots - 4
    for r in range(3):
        cache.add_sequence(r)
    assert runner.bucket([SeqStep(0, [1])]) == Padding(1, 1, 8, 1, runner.scratch_slot)
    steps = [SeqStep(r, [1, 2, 3, 4, 5]) for r in range(3)]
    assert runner.bucket(steps) == Padding(4, 5, 8, 20, runner.scratch_slot)
    assert runner.bucket([SeqStep(0, list(range(9)), logits="last")]) is None  # Q beyond buckets
    assert runner.bucket([SeqStep(0, list(range(7)), logits="last")]) == Padding(1, 8, 8, 1, runner.scratch_slot)
    assert runner.bucket([SeqStep(0, [1] * 8), SeqStep(1, [1] * 8)]).kv == 8
    assert GraphRunner(model, model.make_kv_cache(1 << 16), mode="eager").bucket(steps) is None
    assert power_of_two_buckets(128, 1000) == (128, 256, 512, 1024)
    with pytest.raises(ValueError, match="mode"):
        GraphRunner(model, cache, mode="fast")
    with pytest.raises(ValueError, match="CUDA"):
        GraphRunner(model, cache, mode="graph")


def test_dense_layout_metadata():
    cache = PagedKVCache(1, 1, 4, num_blocks=8, block_size=4)
    scratch = cache.reserve_scratch_slot()
    assert cache.reserve_scratch_slot() == scratch  # once
    for req in ("a", "b"):
        cache.add_sequence(req)
    cache.append("a", 5)
    cache.commit("a")
    steps = [SeqStep("a", [7, 8], logits="all"), SeqStep("b", [9], logits="last")]
    pad = Padding(batch=4, query=3, kv=8, logits=12, scratch_slot=scratch)
    batch = StepBatch.build(cache, steps, padding=pad)
    a_slots, b_slots = cache.slots("a", 0, 7).tolist(), cache.slots("b", 0, 1).tolist()
    assert scratch not in a_slots + b_slots
    assert batch.input_ids.tolist() == [7, 8, 0, 9, 0, 0] + [0] * 6
    assert batch.positions.tolist() == [5, 6, 0, 0, 0, 0] + [0] * 6
    assert batch.slot_mapping.tolist() == a_slots[5:] + [scratch, b_slots[0]] + [scratch] * 8
    assert batch.q_index.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert batch.q_valid.all()
    assert batch.kv_slots.tolist() == [a_slots + [scratch], b_slots + [scratch] * 7, [scratch] * 8, [scratch] * 8]
    assert batch.logits_index.tolist() == [0, 1, 3] + [0] * 9 and batch.num_logits == 3
    mask = batch.attn_mask[:, 0].int().tolist()
    assert mask[0] == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert mask[1] == [[1] + [0] * 7] * 3  # b's query sees its only entry; padding rows entry 0
    assert mask[2] == mask[3] == [[1] + [0] * 7] * 3
    with pytest.raises(ValueError, match="does not fit"):
        StepBatch.build(cache, [SeqStep("a", [1, 2, 3, 4])], padding=pad)


def test_ragged_build_unchanged_for_trees_and_pending():
    """The numpy builder reproduces the ragged layout (incl. entries pending from an earlier pass)."""
    cache = PagedKVCache(1, 1, 4, num_blocks=16, block_size=4)
    for req in ("p", "d"):
        cache.add_sequence(req)
    cache.append("d", 6)
    cache.commit("d")
    cache.append("d", 2, parents=[-1, -1])  # an earlier pass of a tree: two roots
    batch = StepBatch.build(cache, [SeqStep("d", [4, 5], parents=[0, 1]), SeqStep("p", [1, 2, 3])])
    assert batch.positions.tolist() == [7, 7, 0, 1, 2]
    assert batch.q_index.tolist() == [[0, 1, 0], [2, 3, 4]]
    assert batch.q_valid.tolist() == [[True, True, False], [True, True, True]]
    d = batch.attn_mask[0, 0].int().tolist()
    assert d[0] == [1] * 6 + [1, 0, 1, 0] and d[1] == [1] * 6 + [0, 1, 0, 1] and d[2] == [1] + [0] * 9
    p = batch.attn_mask[1, 0].int().tolist()
    assert p == [[1] + [0] * 9, [1, 1] + [0] * 8, [1, 1, 1] + [0] * 7]
    assert batch.kv_slots[1, 3:].tolist() == [0] * 7  # ragged padding points at slot 0 (masked)
    assert batch.slot_mapping.tolist() == cache.slots("d", 8, 10).tolist() + cache.slots("p", 0, 3).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_steps_match_eager_on_cpu(model, seed):
    """The dense padded layout, run eagerly, gives the eager ragged forward's logits and KV."""
    eager_cache = model.make_kv_cache(1 << 20, block_size=4)
    padded_cache = model.make_kv_cache(1 << 20, block_size=4)
    runner = GraphRunner(model, padded_cache, mode="padded", batch_buckets=(1, 2, 4, 8),
                         query_buckets=(1, 2, 4, 8), kv_buckets=(16, 32, 64))
    lengths: dict[int, int] = {}
    padded_steps = 0
    for steps in _script(seed, model.config.vocab_size):
        seq_steps = [s for s, _ in steps]
        for s in seq_steps:
            if s.req_id not in eager_cache:
                eager_cache.add_sequence(s.req_id)
                padded_cache.add_sequence(s.req_id)
        eager_batch = StepBatch.build(eager_cache, seq_steps)
        want = model.forward(eager_batch, eager_cache)
        batch = runner.build(seq_steps)
        padded_steps += batch.padding is not None
        got = runner.forward(batch)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(batch.split_logits(got), eager_batch.split_logits(want)):
            assert a.shape == b.shape
        for s, keep in steps:
            for cache in (eager_cache, padded_cache):
                cache.commit(s.req_id, keep)
            lengths[s.req_id] = eager_cache.seq_len(s.req_id)
        for req, n in lengths.items():
            torch.testing.assert_close(_read_kv(padded_cache, req, n), _read_kv(eager_cache, req, n),
                                       rtol=1e-5, atol=1e-5)
    assert padded_steps >= 3 and runner.stats["padded_steps"] == padded_steps
    assert runner.stats["eager_steps"] >= 1  # 12-token prompts exceed the query buckets


def test_reference_loop_through_padded_runner(model):
    """Greedy speculative decoding with target and draft both going through padded runners equals
    plain target-only decoding (the runner is a drop-in for StepBatch.build + model.forward)."""
    prompts = [[5, 17, 3, 99, 42, 7], [200], [64, 65, 64, 65]]
    params = SamplingParams(max_tokens=12)
    reference = [r.token_ids for r in generate(model, prompts, params)]
    runner_out = _runner_generate(model, prompts, params, mode="padded")
    assert runner_out == reference


def _runner_generate(model, prompts, params, *, mode, num_draft=3):
    """A minimal greedy speculative loop (self-speculative draft) on runners."""
    cache = model.make_kv_cache(1 << 20)
    runner = GraphRunner(model, cache, mode=mode)
    draft = model.truncated(2)
    proposer = DraftModelProposer(draft, target_vocab_size=model.config.vocab_size, kv_budget_bytes=1 << 20)
    draft_runner = GraphRunner(draft, proposer.cache, mode=mode)
    proposer_build = _patch_proposer(proposer, draft_runner)
    tokens = [list(p) for p in prompts]
    for i in range(len(prompts)):
        cache.add_sequence(i)
    batch, logits = runner.step([SeqStep(i, p, logits="last") for i, p in enumerate(prompts)])
    for i, row in enumerate(batch.split_logits(logits)):
        cache.commit(i)
        tokens[i].append(int(row[-1].argmax()))
    while min(len(t) - len(p) for t, p in zip(tokens, prompts)) < params.max_tokens:
        proposals = proposer_build([ProposeRequest(i, t, params) for i, t in enumerate(tokens)], TreeShape.chain(num_draft))
        steps = [SeqStep(i, [t[-1], *p.token_ids.tolist()]) for i, (t, p) in enumerate(zip(tokens, proposals))]
        batch, logits = runner.step(steps)
        for i, (row, p) in enumerate(zip(batch.split_logits(logits), proposals)):
            target = row.argmax(-1).tolist()
            accepted = 0
            while accepted < len(p) and int(p.token_ids[accepted]) == target[accepted]:
                accepted += 1
            cache.commit(i, list(range(accepted + 1)))
            tokens[i].extend([*p.token_ids[:accepted].tolist(), target[accepted]])
    assert runner.stats["padded_steps" if mode == "padded" else "graph_steps"] > 0
    return [t[len(p): len(p) + params.max_tokens] for t, p in zip(tokens, prompts)]


def _patch_proposer(proposer, runner):
    """Route a DraftModelProposer's forwards through the given runner (it holds one of its own)."""
    proposer.runner = runner
    return proposer.propose


# --------------------------------------------------------------------------- CUDA
@pytest.fixture(scope="module")
def cuda_model(path):
    return load_model(path, dtype=torch.float32, device="cuda")


@cuda
@pytest.mark.parametrize("seed", [0, 1])
def test_graph_steps_match_eager_fp32(cuda_model, seed):
    model = cuda_model
    eager_cache = model.make_kv_cache(1 << 22, block_size=4)
    graph_cache = model.make_kv_cache(1 << 22, block_size=4)
    padded_cache = model.make_kv_cache(1 << 22, block_size=4)
    buckets = dict(batch_buckets=(1, 2, 4, 8), query_buckets=(1, 2, 4, 8), kv_buckets=(16, 32, 64))
    runner = GraphRunner(model, graph_cache, **buckets)
    padded = GraphRunner(model, padded_cache, mode="padded", **buckets)
    assert runner.mode == "graph"
    lengths: dict[int, int] = {}
    worst = [0.0, 0.0]  # max |graph - padded eager|, max |graph - ragged eager|
    for steps in _script(seed, model.config.vocab_size, rounds=8):
        seq_steps = [s for s, _ in steps]
        for s in seq_steps:
            if s.req_id not in eager_cache:
                for cache in (eager_cache, graph_cache, padded_cache):
                    cache.add_sequence(s.req_id)
        eager_batch = StepBatch.build(eager_cache, seq_steps)
        want = model.forward(eager_batch, eager_cache)
        batch = runner.build(seq_steps)
        got = runner.forward(batch)
        same_shape = padded.forward(padded.build(seq_steps))
        if batch.padding is not None:
            # the graph replays what the eager forward of the same padded batch computes
            torch.testing.assert_close(got, same_shape, rtol=1e-5, atol=1e-5)
            worst[0] = max(worst[0], float((got - same_shape).abs().max()))
        worst[1] = max(worst[1], float((got - want).abs().max()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for s, keep in steps:
            for cache in (eager_cache, graph_cache, padded_cache):
                cache.commit(s.req_id, keep)
            lengths[s.req_id] = eager_cache.seq_len(s.req_id)
        for req, n in lengths.items():
            torch.testing.assert_close(_read_kv(graph_cache, req, n), _read_kv(eager_cache, req, n),
                                       rtol=1e-4, atol=1e-4)
    assert runner.stats["graph_steps"] >= 4 and runner.num_graphs >= 2
    print(f"graph runner stats {runner.stats}; max |graph - padded eager| {worst[0]:.2e}, "
          f"max |graph - ragged eager| {worst[1]:.2e}")


@cuda
def test_graph_replay_does_not_sync(cuda_model):
    model = cuda_model
    cache = model.make_kv_cache(1 << 22)
    runner = GraphRunner(model, cache)
    for r in range(3):
        cache.add_sequence(r)
    runner.step([SeqStep(r, [1, 2, 3, 4], logits="last") for r in range(3)])
    for r in range(3):
        cache.commit(r)
    steps = [SeqStep(r, [5, 6, 7]) for r in range(3)]
    runner.step(steps)  # capture
    for r in range(3):
        cache.commit(r, [])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = runner.build(steps)
        logits = runner.forward(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (9, model.config.vocab_size) and runner.stats["graph_steps"] == 3


@cuda
def test_graph_rejects_stale_batch_and_precaptures(cuda_model):
    model = cuda_model
    cache = model.make_kv_cache(1 << 22)
    runner = GraphRunner(model, cache, kv_buckets=(128,))
    runner.capture([(2, 5, 100), (8, 1, 128)])
    assert runner.num_graphs == 3  # (2,5): N=2 and N=10; (8,1): N=8
    for r in range(2):
        cache.add_sequence(r)
        cache.append(r, 3)
        cache.commit(r)
    first = runner.build([SeqStep(0, [1])])
    runner.build([SeqStep(1, [1])])
    with pytest.raises(RuntimeError, match="latest"):
        runner.forward(first)
    assert torch.isfinite(cache.storage).all()  # padding wrote finite values to the scratch slot


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graph_half_precision_same_argmax(path, dtype):
    model = load_model(path, dtype=dtype, device="cuda")
    eager_cache, graph_cache = model.make_kv_cache(1 << 22), model.make_kv_cache(1 << 22)
    runner = GraphRunner(model, graph_cache)
    agree = total = 0
    for steps in _script(3, model.config.vocab_size, rounds=8):
        seq_steps = [s for s, _ in steps]
        for s in seq_steps:
            if s.req_id not in eager_cache:
                eager_cache.add_sequence(s.req_id)
                graph_cache.add_sequence(s.req_id)
        want = model.forward(StepBatch.build(eager_cache, seq_steps), eager_cache)
        got = runner.forward(runner.build(seq_steps))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += want.shape[0]
        for s, keep in steps:
            eager_cache.commit(s.req_id, keep)
            graph_cache.commit(s.req_id, keep)
    assert runner.stats["graph_steps"] > 0
    print(f"{dtype}: argmax agreement {agree}/{total}")
    assert agree / total > 0.95, (agree, total)


@cuda
def test_graph_speculative_loop_equals_target_only(cuda_model):
    prompts = [[5, 17, 3, 99, 42, 7], [200], [64, 65, 64, 65]]
    params = SamplingParams(max_tokens=16)
    reference = [r.token_ids for r in generate(cuda_model, prompts, params)]
    assert _runner_generate(cuda_model, prompts, params, mode="graph") == reference


@cuda
def test_graph_captures_fused_layers(cuda_model):
    """Graphs captured with the layers' element-wise chains compiled (torch.compile compiles in the
    runner's warm-up, before capture) replay the eager model's logits."""
    model = cuda_model
    cache = model.make_kv_cache(1 << 22)
    for r in range(2):
        cache.add_sequence(r)
        cache.append(r, 6)
        cache.commit(r)
    steps = [SeqStep(r, [3 + r, 9]) for r in range(2)]
    want = model.forward(StepBatch.build(cache, steps), cache)
    for r in range(2):
        cache.commit(r, [])
    runner = GraphRunner(model, cache)
    model.use_compiled(True)
    try:
        for _ in range(2):  # capture, then replay
            got = runner.forward(runner.build(steps))
            for r in range(2):
                cache.commit(r, [])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        model.use_compiled(False)
    assert runner.stats["captures"] >= 1 and runner.stats["graph_steps"] == 2


def _counting_kernels(base):
    """The model's kernel namespace with a call counter (which chains a forward ran)."""
    from types import SimpleNamespace

    calls = {"n": 0}

    def wrap(fn):
        def run(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return run

    names = ("qkv_rope", "attention_out", "ffn")
    return SimpleNamespace(**{n: wrap(getattr(base, n)) for n in names}, name="counting"), calls


def test_graph_runner_runs_its_eager_steps_with_plain_chains(model):
    """A graph runner's steps beyond the buckets (a prefill here) run eagerly with the plain
    element-wise chains even when the model runs fused ones, which pay off inside graphs only; the
    model's choice is restored. Simulated on CPU: a runner switched to mode 'graph' whose step
    misses every bucket never touches CUDA. On CPU (mode eager) the model's kernels are used."""
    from actors.model import fused

    cache = model.make_kv_cache(1 << 20)
    cache.add_sequence(0)
    runner = GraphRunner(model, cache)
    counting, calls = _counting_kernels(fused.EAGER)
    model.kernels = counting
    try:
        runner.forward(runner.build([SeqStep(0, list(range(3, 23)), logits="last")]))  # Q = 20 > 8
        assert calls["n"] > 0  # eager mode: the model's own chains
        calls["n"] = 0
        cache.commit(0, [])
        runner.mode = "graph"
        assert runner.bucket([SeqStep(0, list(range(3, 23)))]) is None
        got = runner.forward(runner.build([SeqStep(0, list(range(3, 23)), logits="last")]))
        assert calls["n"] == 0 and model.kernels is counting  # plain chains for that step, then restored
        assert torch.isfinite(got).all()
    finally:
        model.kernels = fused.EAGER


def test_decode_buckets_to_capture_at_start(model):
    """capture_decode_buckets enumerates every batch bucket up to max_batch's and KV bucket up to
    max_kv's for each query length within the buckets; on CPU nothing is captured."""
    cache = model.make_kv_cache(1 << 20)
    runner = GraphRunner(model, cache)
    seen = {}

    def spy(shapes, *, all_logits=True):
        seen["shapes"], seen["all_logits"] = list(shapes), all_logits

    out = runner.capture_decode_buckets(20, [1, 5, 99], 600)  # Q = 99 is beyond the query buckets
    assert out == {"shapes": 6 * 4 * 2, "captured": 0, "seconds": 0.0}  # B 1..32, KV 128..1024, Q 1 and 5
    runner.capture = spy
    runner.capture_decode_buckets(64, [1], 10_000, all_logits=False)
    assert len(seen["shapes"]) == 7 * 7 and seen["all_logits"] is False  # capped at the largest buckets
    assert (64, 1, 8192) in seen["shapes"] and (1, 1, 128) in seen["shapes"]


@cuda
def test_buckets_captured_at_start_are_not_captured_again(cuda_model):
    cache = cuda_model.make_kv_cache(1 << 22)
    runner = GraphRunner(cuda_model, cache)
    out = runner.capture_decode_buckets(4, [1, 3], 200)
    assert out["captured"] == runner.num_graphs > 0 and out["seconds"] > 0
    for r in range(3):
        cache.add_sequence(r)
        cache.append(r, 10)
        cache.commit(r)
    runner.forward(runner.build([SeqStep(r, [5]) for r in range(3)]))  # B 3 -> 4, Q 1, KV 11 -> 128
    runner.forward(runner.build([SeqStep(r, [5, 6, 7]) for r in range(3)]))  # a verify, Q 3
    assert runner.stats["captures"] == out["captured"] and runner.stats["graph_steps"] == 2
