"""Sampling: processed distributions (temperature, top-k, top-p, greedy), seeds, batched draws."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from actors.spec.sampling import (
    draw_one,
    make_generator,
    processed_probs,
    sample,
    sample_from_uniforms,
    sample_next,
)
from actors.spec.types import SamplingParams


def logits_of(probs) -> torch.Tensor:
    return torch.log(torch.tensor([probs], dtype=torch.float32))


def support(row: torch.Tensor) -> list[int]:
    return torch.nonzero(row > 0).flatten().tolist()


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, -0.5, 3.0], [0.0, 0.0, 1.0, -2.0]])
    for t in (0.3, 1.0, 2.5):
        got = processed_probs(logits, SamplingParams(temperature=t))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.softmax(logits / t, dim=-1))


def test_top_k_keeps_k_largest_and_renormalises():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]])
    got = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    assert support(got) == [2, 3]
    expect = torch.softmax(torch.tensor([3.0, 4.0]), dim=0)
    torch.testing.assert_close(got[[2, 3]], expect)
    # k >= V is no restriction
    full = processed_probs(logits, SamplingParams(temperature=1.0, top_k=9))
    torch.testing.assert_close(full, torch.softmax(logits, dim=-1))


def test_top_k_ties_break_towards_lower_ids():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, -1.0]])
    got = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))[0]
    assert support(got) == [1, 2]
    torch.testing.assert_close(got[[1, 2]], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.05, [0]), (0.45, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.97, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_smallest_set_reaching_mass(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]
    got = processed_probs(logits_of(probs), SamplingParams(temperature=1.0, top_p=top_p))[0]
    assert support(got) == kept
    mass = sum(probs[i] for i in kept)
    torch.testing.assert_close(got[kept], torch.tensor([probs[i] / mass for i in kept]))


def test_top_p_ignores_vocabulary_order():
    probs = [0.05, 0.15, 0.3, 0.5]  # same distribution, reversed ids
    got = processed_probs(logits_of(probs), SamplingParams(temperature=1.0, top_p=0.75))[0]
    assert support(got) == [2, 3]


def test_order_is_temperature_then_top_k_then_top_p():
    probs = [0.4, 0.3, 0.2, 0.1]
    # top-p alone at 0.5 keeps {0, 1} (0.4 < 0.5); after top-k=2 the renormalised head is 4/7 >= 0.5.
    alone = processed_probs(logits_of(probs), SamplingParams(temperature=1.0, top_p=0.5))[0]
    assert support(alone) == [0, 1]
    both = processed_probs(logits_of(probs), SamplingParams(temperature=1.0, top_k=2, top_p=0.5))[0]
    assert support(both) == [0]
    assert both[0].item() == 1.0
    # A high temperature flattens before the nucleus is taken: more tokens survive.
    cold = processed_probs(logits_of(probs), SamplingParams(temperature=1.0, top_p=0.6))[0]
    hot = processed_probs(logits_of(probs), SamplingParams(temperature=10.0, top_p=0.6))[0]
    assert len(support(cold)) == 2 and len(support(hot)) == 3


def test_greedy_is_one_hot_of_first_argmax():
    logits = torch.tensor([[0.1, 3.0, 3.0, -1.0], [5.0, 1.0, 2.0, 4.9]])
    got = processed_probs(logits, SamplingParams(temperature=0.0))
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_rows_are_distributions_and_independent():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8)
    batch = processed_probs(logits, params)
    torch.testing.assert_close(batch.sum(-1), torch.ones(6))
    assert (batch >= 0).all()
    for i in range(6):
        torch.testing.assert_close(batch[i], processed_probs(logits[i : i + 1], params)[0])
        assert 1 <= len(support(batch[i])) <= 10


def test_make_generator_seeds_per_request():
    assert make_generator(SamplingParams(temperature=1.0)) is None
    probs = torch.full((64, 7), 1 / 7)
    a = sample(probs, make_generator(SamplingParams(temperature=1.0, seed=11)))
    b = sample(probs, make_generator(SamplingParams(temperature=1.0, seed=11)))
    c = sample(probs, make_generator(SamplingParams(temperature=1.0, seed=12)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (64,)


def test_sample_matches_distribution_and_never_draws_zero_mass():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    n = 20_000
    draws = sample(probs.expand(n, -1).contiguous(), torch.Generator().manual_seed(0))
    counts = np.bincount(draws.numpy(), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    p = stats.chisquare(counts[[1, 3, 4]], n * probs[[1, 3, 4]].double().numpy()).pvalue
    assert p > 1e-4


def test_inverse_cdf_edges():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]])
    # u * total rounding up to total must land on the last positive token, not on trailing zeros.
    assert sample_from_uniforms(probs, torch.tensor([1.0], dtype=torch.float64)).item() == 2
    assert draw_one(probs[0], 1.0) == 2
    assert sample_from_uniforms(probs, torch.tensor([0.0], dtype=torch.float64)).item() == 1  # skips leading zero
    assert draw_one(probs[0], 0.0) == 1
    assert draw_one(probs[0], 0.5) == 2  # cdf[1] = 0.5 is not > 0.5
    unnormalised = torch.tensor([[2.0, 0.0, 6.0]])
    assert sample_from_uniforms(unnormalised, torch.tensor([0.2], dtype=torch.float64)).item() == 0
    assert sample_from_uniforms(unnormalised, torch.tensor([0.3], dtype=torch.float64)).item() == 2


def test_sample_next_mixes_greedy_and_sampled_rows():
    torch.manual_seed(1)
    logits = torch.randn(5, 30)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),  # sampled but deterministic
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_p=0.9, seed=3),
        SamplingParams(temperature=1.2, top_k=5),
    ]
    gens = [make_generator(p) for p in params]
    out = sample_next(logits, params, gens)
    argmax = logits.argmax(-1)
    assert out.dtype == torch.int64
    assert out[0] == argmax[0] and out[1] == argmax[1] and out[2] == argmax[2]
    assert processed_probs(logits[3:4], params[3])[0, out[3]] > 0
    assert processed_probs(logits[4:5], params[4])[0, out[4]] > 0
    # All greedy: plain argmax.
    assert torch.equal(sample_next(logits, [SamplingParams()] * 5), argmax)


def test_sample_next_seeded_row_ignores_batch_composition():
    torch.manual_seed(2)
    logits = torch.randn(4, 40)
    mine = SamplingParams(temperature=1.0, seed=123)
    alone = [int(sample_next(logits[2:3], [mine], [g])[0]) for g in [make_generator(mine)] for _ in range(20)]
    gen = make_generator(mine)
    others = [SamplingParams(temperature=0.5), SamplingParams(), mine, SamplingParams(temperature=2.0, top_k=3)]
    batched = []
    for _ in range(20):
        gens = [None, None, gen, make_generator(SamplingParams(temperature=1.0, seed=9))]
        batched.append(int(sample_next(logits, others, gens)[2]))
    assert alone == batched


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=6, top_p=0.9), SamplingParams(temperature=1.5)])
def test_sample_next_distribution(params):
    torch.manual_seed(3)
    row = torch.randn(1, 12) * 2
    n = 20_000
    draws = sample_next(row.expand(n, -1).contiguous(), [params] * n)
    expect = processed_probs(row, params)[0].double().numpy()
    counts = np.bincount(draws.numpy(), minlength=12)
    assert counts[expect == 0].sum() == 0
    keep = expect > 0
    expect_counts = n * expect[keep] / expect[keep].sum()
    assert stats.chisquare(counts[keep], expect_counts).pvalue > 1e-4
    assert math.isclose(counts.sum(), n)


def test_tiny_positive_temperature_and_top_p_stay_finite():
    """1e-300 rounds to 0 in float32; it must act as the smallest positive value, not give NaN."""
    from actors.spec.sampling import processed_probs

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, top_p=1e-300),
                   SamplingParams(temperature=1e-300, top_p=1e-300, top_k=5)):
        probs = processed_probs(logits, params)
        assert torch.isfinite(probs).all()
        assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.allclose(probs.sum(-1), torch.ones(3))
