"""Oracle drafting (emulated acceptance α for random-weight benchmarks): the draft model runs for
real, its tokens are the target's recorded greedy continuation with seeded errors; greedy output
stays the target's, and the measured acceptance by position matches α."""

import json

import pytest
import torch

from actors.model.loader import load_model
from actors.spec.proposers import build_proposer, parse_draft_spec
from actors.spec.reference import generate
from actors.spec.types import SamplingParams
from tests.tiny_models import write_tiny_checkpoint

PARAMS = SamplingParams(max_tokens=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    path = write_tiny_checkpoint(root / "t", num_layers=2, with_tokenizer=False)
    target = load_model(path)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (4, 9, 6, 5)]
    plain = generate(target, prompts, PARAMS)
    recorded = root / "continuations.json"
    recorded.write_text(json.dumps([{"prompt": p, "output": r.token_ids} for p, r in zip(prompts, plain)]))
    return path, target, prompts, plain, recorded


def rates(results, depth):
    tested, accepted = [0] * depth, [0] * depth
    for r in results:
        for length in r.stats["accepted_lengths"]:
            a = length - 1
            for j in range(min(depth, a + 1)):
                tested[j] += 1
                accepted[j] += j < a
    return [a / t for a, t in zip(accepted, tested) if t], sum(accepted) / sum(tested)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_emulated_acceptance_matches_alpha_and_output_is_unchanged(setup, alpha):
    path, target, prompts, plain, recorded = setup
    proposer = build_proposer(f"oracle:{alpha}:self:1", target, oracle_continuations=recorded)
    spec = generate(target, prompts, PARAMS, proposer=proposer, num_draft_tokens=3)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    by_position, pooled = rates(spec, 3)
    if alpha in (0.0, 1.0):
        assert set(by_position) == {alpha} and pooled == alpha
    else:  # a few hundred trials: within sampling noise of alpha
        assert abs(pooled - alpha) < 0.08 and all(abs(m - alpha) < 0.2 for m in by_position), by_position


def test_off_track_prompts_fall_back_to_the_real_draft(setup):
    path, target, prompts, plain, recorded = setup
    proposer = build_proposer("oracle:1.0:self:1", target, oracle_continuations=recorded)
    other = [[7, 7, 7, 8]]
    want = generate(target, other, PARAMS)[0].token_ids
    assert generate(target, other, PARAMS, proposer=proposer, num_draft_tokens=3)[0].token_ids == want


def test_bad_specs_are_refused(setup):
    for spec in ("oracle:1.5:self:1", "oracle:x:self:1", "oracle:0.5:", "oracle:0.5:lookup"):
        with pytest.raises(ValueError, match="oracle"):
            parse_draft_spec(spec)
    with pytest.raises(ValueError, match="continuations"):
        build_proposer("oracle:0.5:self:1", setup[1])


def test_retrack_replaces_a_stale_record(setup):
    """A record the target departs from (a batch-1 record under batched numerics) emulates almost
    no acceptance; re-recorded from the target's real outputs, it emulates the labelled α again."""
    path, target, prompts, plain, recorded = setup
    stale = [(p, [(t + 1) % 320 for t in r.token_ids]) for p, r in zip(prompts, plain)]
    proposer = build_proposer("oracle:1.0:self:1", target, oracle_continuations=[
        {"prompt": p, "output": o} for p, o in stale])
    before = generate(target, prompts, PARAMS, proposer=proposer, num_draft_tokens=3)
    assert [r.token_ids for r in before] == [r.token_ids for r in plain]
    assert rates(before, 3)[1] < 0.2
    assert proposer.retrack([(p, r.token_ids) for p, r in zip(prompts, plain)]) == len(prompts)
    after = generate(target, prompts, PARAMS, proposer=proposer, num_draft_tokens=3)
    assert [r.token_ids for r in after] == [r.token_ids for r in plain]
    assert rates(after, 3)[1] == 1.0


def test_copies_of_a_prompt_follow_the_record_they_match(setup):
    """Copies of one prompt that decoded differently in a pass are all kept: each request follows
    the record that matches its tokens (here the true one, listed after a decoy that departs from
    it half-way), and the emulated acceptance stays exact."""
    path, target, prompts, plain, recorded = setup
    records = []
    for p, r in zip(prompts, plain):
        half = len(r.token_ids) // 2
        decoy = r.token_ids[:half] + [(t + 1) % 320 for t in r.token_ids[half:]]
        records += [{"prompt": p, "output": decoy}, {"prompt": p, "output": r.token_ids}]
    proposer = build_proposer("oracle:1.0:self:1", target, oracle_continuations=records)
    spec = generate(target, prompts, PARAMS, proposer=proposer, num_draft_tokens=3)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    # a request may follow the decoy up to the fork (the oracle cannot know the branch ahead of the
    # target): at most one rejected draft per prompt there, none before or after it
    # (the last verify of each request may be cut short by max_tokens: not counted)
    rejected = [sum(1 for length in r.stats["accepted_lengths"][:-1] if length - 1 < 3) for r in spec]
    assert all(n <= 1 for n in rejected) and sum(rejected) >= 1, rejected
