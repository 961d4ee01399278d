"""Sampling losslessness through the real reference loop and a real (tiny) model: the joint
distribution of three generated tokens equals the target's exact distribution, for chain, tree and
multi-draft speculation; a deliberately broken verifier fails the same test."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from actors.model.loader import load_model
from actors.spec.proposers import DraftModelProposer, TreeShape
from actors.spec.reference import generate
from actors.spec.sampling import processed_probs
from actors.spec.types import SamplingParams, Verdict
from actors.step_batch import SeqStep, StepBatch
from tests.tiny_models import write_tiny_checkpoint

VOCAB = 6
PROMPT = [1, 4, 2, 5]
NUM_SAMPLES = 6000


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("v6"), arch="llama", vocab_size=VOCAB,
                                 num_layers=2, with_tokenizer=False)
    target = load_model(path, dtype=torch.float32)
    draft = load_model(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5 * param.std())
    return target, draft


def next_token_probs(model, contexts, params):
    """Exact processed next-token distributions after each context: [len(contexts), V]."""
    cache = model.make_kv_cache(len(contexts) * 64 * model.kv_bytes_per_token)
    for i in range(len(contexts)):
        cache.add_sequence(i)
    batch = StepBatch.build(cache, [SeqStep(i, c, logits="last") for i, c in enumerate(contexts)])
    return processed_probs(model.forward(batch, cache), params)


def exact_joint(model, params):
    """P(x1, x2, x3 | PROMPT) under the target, flattened to [V**3]."""
    p1 = next_token_probs(model, [PROMPT], params)[0]
    p2 = next_token_probs(model, [PROMPT + [a] for a in range(VOCAB)], params)
    p3 = next_token_probs(model, [PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)], params)
    joint = p1[:, None, None] * p2[:, :, None] * p3.view(VOCAB, VOCAB, VOCAB)
    return joint.flatten().double().numpy()


def sampled_joint(target, draft, params, shape):
    seeds = [SamplingParams(**{**params.__dict__, "seed": 10_000 + i}) for i in range(NUM_SAMPLES)]
    proposer = DraftModelProposer(draft, target_vocab_size=VOCAB, kv_budget_bytes=64 << 20)
    results = generate(target, [PROMPT] * NUM_SAMPLES, seeds, proposer=proposer, tree=shape)
    codes = [(r.token_ids[0] * VOCAB + r.token_ids[1]) * VOCAB + r.token_ids[2] for r in results]
    return np.bincount(codes, minlength=VOCAB**3), results


def chi_square_pvalue(counts, probs):
    """Chi-square goodness of fit, pooling cells whose expected count is below 5."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    assert obs[~keep].sum() == 0, "sampled an outcome of probability zero"
    return chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


def total_variation(counts, probs):
    return 0.5 * np.abs(counts / counts.sum() - probs).sum()


def noise_tv(probs, num_samples):
    """Expected total variation of an exact sampler from sampling noise alone:
    E|X/n - p| = sqrt(2 p (1 - p) / (pi n)) per cell (normal approximation), halved and summed."""
    return 0.5 * np.sqrt(2 * probs * (1 - probs) / (np.pi * num_samples)).sum()


CASES = {
    "chain-2": (SamplingParams(temperature=1.0, max_tokens=3), TreeShape.chain(2)),
    "tree-2x2-without-replacement": (SamplingParams(temperature=1.0, max_tokens=3), TreeShape((2, 2))),
    "multi-draft-3": (SamplingParams(temperature=0.8, top_k=4, max_tokens=3), TreeShape.multi_draft(3, 2)),
    "chain-3-top-p": (SamplingParams(temperature=1.3, top_p=0.85, max_tokens=3), TreeShape.chain(3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_joint_distribution_matches_target(models, case):
    target, draft = models
    params, shape = CASES[case]
    probs = exact_joint(target, params)
    counts, results = sampled_joint(target, draft, params, shape)
    assert chi_square_pvalue(counts, probs) > 1e-3
    assert total_variation(counts, probs) < 1.4 * noise_tv(probs, NUM_SAMPLES)
    # speculation really took part: drafts were accepted at least sometimes, and rejected too
    accepted = [length for r in results for length in r.stats["accepted_lengths"]]
    assert 1 < np.mean(accepted) < shape.depth + 1


def test_broken_verifier_fails_the_same_test(models, monkeypatch):
    """A verifier that accepts every draft token emits the draft's distribution, not the target's."""
    target, draft = models
    params, shape = CASES["chain-2"]

    def accept_everything(proposal, logits, params, generator):
        probs = processed_probs(logits[-1:], params)
        bonus = int(torch.multinomial(probs[0], 1, generator=generator))
        return Verdict(list(range(len(proposal))), [*proposal.token_ids.tolist(), bonus])

    import actors.spec.verify as verify_module

    monkeypatch.setattr(verify_module, "verify", accept_everything)  # what verify_batch calls per sequence
    probs = exact_joint(target, params)
    counts, _ = sampled_joint(target, draft, params, shape)
    assert chi_square_pvalue(counts, probs) < 1e-8
    assert total_variation(counts, probs) > 1.4 * noise_tv(probs, NUM_SAMPLES)
