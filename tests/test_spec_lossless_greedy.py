"""Greedy losslessness of the reference loop: speculative output equals target-only output, token
for token, for every proposer, chain length, tree shape and batch composition."""

import pytest
import torch

from actors.model.loader import load_model
from actors.spec.model_free import FunctionProposer, PromptLookupProposer
from actors.spec.proposers import DraftModelProposer, TreeShape, build_proposer
from actors.spec.reference import generate
from actors.spec.types import SamplingParams
from tests.tiny_models import write_tiny_checkpoint

PROMPTS = [
    [5, 17, 3, 99, 42, 7],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
    [200],
    [64, 65, 64, 65, 64, 65, 64, 65, 64],
    [250, 3, 250, 3, 9],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def target_path(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("target"), arch="llama", num_layers=4, with_tokenizer=False)


@pytest.fixture(scope="module")
def target(target_path):
    return load_model(target_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def perturbed_draft(target_path):
    """A draft that agrees with the target often but not always: the target's weights plus noise."""
    draft = load_model(target_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.35 * param.std())
    return draft


@pytest.fixture(scope="module")
def reference(target):
    return [r.token_ids for r in generate(target, PROMPTS, GREEDY)]


def draft_proposer(draft, target):
    return DraftModelProposer(draft, target_vocab_size=target.config.vocab_size, kv_budget_bytes=4 << 20)


def test_target_only_is_batch_invariant(target, reference):
    alone = [generate(target, [p], GREEDY)[0].token_ids for p in PROMPTS]
    assert alone == reference
    reordered = generate(target, PROMPTS[::-1], GREEDY)
    assert [r.token_ids for r in reordered][::-1] == reference
    assert all(len(ids) == GREEDY.max_tokens for ids in reference)


def test_target_only_matches_transformers(target_path, reference):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    for prompt, ours in zip(PROMPTS[:3], reference):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("num_draft_tokens", [1, 2, 3, 5])
def test_draft_model_chains(target, perturbed_draft, reference, num_draft_tokens):
    results = generate(target, PROMPTS, GREEDY, proposer=draft_proposer(perturbed_draft, target),
                       num_draft_tokens=num_draft_tokens)
    assert [r.token_ids for r in results] == reference
    steps = sum(len(r.stats["accepted_lengths"]) for r in results)
    accepted = sum(sum(r.stats["accepted_lengths"]) for r in results)
    # speculation really happened: some drafts were accepted, some rejected
    assert steps < accepted < steps * (num_draft_tokens + 1)
    for r in results:
        assert r.stats["target_forward_passes"] == len(r.stats["accepted_lengths"]) + 1
        assert len(r.stats["acceptance_by_position"]) <= num_draft_tokens


@pytest.mark.parametrize(
    "shape",
    [TreeShape((2, 2, 1)), TreeShape((3, 1)), TreeShape((1, 3, 2)), TreeShape.multi_draft(3, 3)],
    ids=["2-2-1", "3-1", "1-3-2", "multi-draft-3x3"],
)
def test_draft_model_trees(target, perturbed_draft, reference, shape):
    results = generate(target, PROMPTS, GREEDY, proposer=draft_proposer(perturbed_draft, target), tree=shape)
    assert [r.token_ids for r in results] == reference


@pytest.mark.parametrize("num_layers", [1, 3])
def test_self_speculative(target, reference, num_layers):
    proposer = build_proposer(f"self:{num_layers}", target, kv_budget_tokens=2048)
    results = generate(target, PROMPTS, GREEDY, proposer=proposer, num_draft_tokens=3)
    assert [r.token_ids for r in results] == reference


def test_oracle_and_corrupted_function_proposers(target, reference):
    """Proposals from the known future (all accepted), and the same with every third token wrong."""
    futures = {tuple(p): p + out for p, out in zip(PROMPTS, reference)}

    def oracle(ids, k, corrupt=False):
        for full in futures.values():
            if full[: len(ids)] == list(ids):
                draft = full[len(ids) : len(ids) + k]
                return [(t + 1) % 256 if corrupt and (len(ids) + i) % 3 == 0 else t for i, t in enumerate(draft)]
        raise AssertionError("unknown prefix")

    perfect = generate(target, PROMPTS, GREEDY, proposer=FunctionProposer(oracle), num_draft_tokens=4)
    assert [r.token_ids for r in perfect] == reference
    # all but the last step accept every draft token
    assert all(min(r.stats["accepted_lengths"][:-1], default=5) == 5 for r in perfect)
    noisy = generate(target, PROMPTS, GREEDY, proposer=FunctionProposer(lambda i, k: oracle(i, k, True)))
    assert [r.token_ids for r in noisy] == reference
    lookup = generate(target, PROMPTS, GREEDY, proposer=PromptLookupProposer(), num_draft_tokens=3)
    assert [r.token_ids for r in lookup] == reference


def test_batch_compositions_and_mixed_lengths(target, perturbed_draft, reference):
    params = [SamplingParams(max_tokens=n) for n in (3, 24, 11, 1, 17)]
    results = generate(target, PROMPTS, params, proposer=draft_proposer(perturbed_draft, target), num_draft_tokens=4)
    assert [r.token_ids for r in results] == [ref[: p.max_tokens] for ref, p in zip(reference, params)]
    assert all(r.finish_reason == "length" for r in results)
    subset = [1, 3]
    results = generate(target, [PROMPTS[i] for i in subset], GREEDY, proposer=draft_proposer(perturbed_draft, target))
    assert [r.token_ids for r in results] == [reference[i] for i in subset]


def test_stop_tokens(target, perturbed_draft, reference):
    stop = reference[1][6]
    params = SamplingParams(max_tokens=24, stop_token_ids=(stop,))
    plain = generate(target, PROMPTS, params)
    spec = generate(target, PROMPTS, params, proposer=draft_proposer(perturbed_draft, target), num_draft_tokens=5)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    first = reference[1].index(stop)
    assert plain[1].token_ids == reference[1][: first + 1] and plain[1].finish_reason == "stop"


def test_context_limit(target, perturbed_draft):
    limit = target.config.max_context
    prompt = [7] * (limit - 6)
    plain = generate(target, [prompt], SamplingParams(max_tokens=50))[0]
    spec = generate(target, [prompt], SamplingParams(max_tokens=50), proposer=draft_proposer(perturbed_draft, target))[0]
    assert spec.token_ids == plain.token_ids and len(plain.token_ids) == 6
    assert plain.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        generate(target, [[1] * limit], GREEDY)


def test_bad_inputs(target):
    with pytest.raises(ValueError, match="empty"):
        generate(target, [[]], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, [[target.config.vocab_size]], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, [[1, 2]], GREEDY, proposer=FunctionProposer(lambda ids, k: [10**6]))
    with pytest.raises(ValueError, match="self:N"):
        build_proposer("self:x", target)


def test_draft_checkpoint_with_other_tokenizer_is_refused(tmp_path, target_path, target):
    from actors.model.tokenizer import TokenizerMismatchError
    from tests.tiny_models import write_tiny_tokenizer

    target_dir = write_tiny_checkpoint(tmp_path / "target", num_layers=2)
    same = write_tiny_checkpoint(tmp_path / "same", num_layers=1, seed=5)
    proposer = build_proposer(str(same), target, target_path=target_dir, kv_budget_tokens=512)
    assert isinstance(proposer, DraftModelProposer) and proposer.model.config.num_layers == 1
    other = write_tiny_checkpoint(tmp_path / "other", num_layers=1, seed=5, with_tokenizer=False)
    write_tiny_tokenizer(other, variant=1)
    with pytest.raises(TokenizerMismatchError):
        build_proposer(str(other), target, target_path=target_dir)


def test_streaming_callback_sees_every_accepted_token_in_order(target, perturbed_draft, reference):
    streamed = {i: [] for i in range(len(PROMPTS))}
    results = generate(target, PROMPTS, GREEDY, proposer=draft_proposer(perturbed_draft, target),
                       on_tokens=lambda i, ids: streamed[i].extend(ids))
    assert [streamed[i] for i in range(len(PROMPTS))] == [r.token_ids for r in results] == reference


@pytest.mark.parametrize("mode", ["eager", "padded"])
def test_greedy_chains_without_host_round_trips_equal_level_by_level_drafting(target, perturbed_draft, mode):
    """The fast greedy-chain path (argmax kept on the device, fed into the next level's input ids)
    drafts exactly what the level-by-level path drafts, and leaves the draft cache in the same
    state, over rounds where sequences grow by accepted tokens, in ragged and dense layouts."""
    from actors.model.graph_runner import GraphRunner
    from actors.spec.proposers import ProposeRequest

    fast, slow = draft_proposer(perturbed_draft, target), draft_proposer(perturbed_draft, target)
    slow.fast_greedy_chains = False
    for proposer in (fast, slow):
        proposer.runner = GraphRunner(perturbed_draft, proposer.cache, mode=mode, kv_buckets=(32, 64, 128))
    tokens = {i: list(p) for i, p in enumerate(PROMPTS)}
    for round_ in range(6):
        depth = 1 + round_ % 4
        ids = sorted(tokens)[round_ % 2:]  # batch composition changes between rounds
        requests = [ProposeRequest(i, tokens[i], GREEDY) for i in ids]
        got = fast.propose(requests, TreeShape.chain(depth))
        want = slow.propose(requests, TreeShape.chain(depth))
        for i, g, w in zip(ids, got, want):
            assert g.token_ids.tolist() == w.token_ids.tolist() and g.parents == w.parents
            assert g.draft_probs is None and len(g) == depth
            assert fast.cache.seq_len(i) == slow.cache.seq_len(i)
            accepted = g.token_ids.tolist()[: round_ % (depth + 1)]  # some accepted, then a correction
            tokens[i] += accepted + [(sum(tokens[i]) + round_) % 250]
