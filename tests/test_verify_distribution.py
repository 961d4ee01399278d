"""Losslessness of stochastic verification, measured: speculative output vs exact target law.

Synthetic "table models" over V = 5 tokens: the target p(x | context) and the draft q(x | context)
are fixed, different, context-dependent distributions (seeded Gaussian logits, the draft's being
the target's plus noise), processed by ``processed_probs``. The exact law of the first HORIZON
tokens under target-only sampling is enumerated (V**HORIZON outcomes); a speculative loop
(draft proposes from q, ``verify_stochastic`` decides, repeat until HORIZON tokens exist) is run
many times with fixed seeds and compared by a chi-square test and a total-variation bound.

The same harness is run on deliberately broken verifiers / proposals, which must fail it by a wide
margin: the test has teeth.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

from actors.spec.sampling import processed_probs
from actors.spec.types import Proposal, SamplingParams, Verdict
from actors.spec.verify import _residual, verify, verify_stochastic

V = 5
HORIZON = 3
N_SAMPLES = 16_000
N_BROKEN = 5_000
P_PASS = 1e-4  # a correct sampler must give p-value above this (deterministic under fixed seeds)
P_FAIL = 1e-10  # a broken one must give p-value below this
PLAIN = SamplingParams(temperature=1.0)


MAX_CONTEXT = HORIZON - 1 + 4  # longest context a node can have: < HORIZON committed + depth <= 4


def child(ctx: int, x: int) -> int:
    """Contexts are numbered as a complete V-ary tree: () is 0, ctx + (x,) is ctx * V + 1 + x."""
    return ctx * V + 1 + x


@functools.lru_cache(maxsize=8)
def table_models(params: SamplingParams, seed: int = 0) -> TableModels:
    return TableModels(params, seed)


class TableModels:
    """Target and draft next-token distributions, a fixed random function of the context.

    Every context of length <= MAX_CONTEXT gets its own seeded Gaussian logits (the draft's are
    the target's plus noise), processed by ``processed_probs`` with ``params`` in one batch.
    """

    def __init__(self, params: SamplingParams, seed: int = 0, draft_noise: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        count = (V ** (MAX_CONTEXT + 1) - 1) // (V - 1)
        target = rng.normal(0.0, 1.5, (count, V))
        draft = target + rng.normal(0.0, draft_noise, (count, V))
        self.p = processed_probs(torch.tensor(target, dtype=torch.float32), params).numpy()
        self.q32 = processed_probs(torch.tensor(draft, dtype=torch.float32), params).numpy()
        self.q = self.q32.tolist()  # Python lists (exact float32 values): the draft draws in pure Python
        self.q_rank = np.argsort(-self.q32, axis=1, kind="stable").tolist()  # draft's tokens, best first

    def exact_law(self) -> np.ndarray:
        """P(x_1..x_HORIZON) under target-only sampling, flattened in base-V order."""
        law, first = np.ones(1), 0
        for length in range(HORIZON):
            law = (law[:, None] * self.p[first:first + V**length].astype(np.float64)).reshape(-1)
            first = child(first, 0)  # first context of the next length
        return law / law.sum()  # float32 rows sum to 1 only up to rounding


# --- proposers: (models, ctx, rng) -> (tokens, parents, draft rows (lists) or None, node contexts)


def _draw(q: list[float], rng: random.Random) -> int:
    """Inverse-CDF draw from an (unnormalised) distribution q."""
    cdf = list(itertools.accumulate(q))
    return min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), V - 1)


def chain(k: int) -> Callable:
    """k tokens drawn one after another from the draft, with their draft rows."""

    def propose(models: TableModels, ctx: int, rng: random.Random):
        tokens, rows, nodes = [], [], []
        for _ in range(k):
            x = _draw(models.q[ctx], rng)
            rows.append(models.q[ctx])
            ctx = child(ctx, x)
            tokens.append(x)
            nodes.append(ctx)
        return tokens, list(range(-1, k - 1)), rows, nodes

    return propose


def argmax_chain(k: int) -> Callable:
    """Model-free deterministic chain: the draft's argmax, no probabilities."""

    def propose(models: TableModels, ctx: int, rng: random.Random):
        tokens, nodes = [], []
        for _ in range(k):
            x = models.q_rank[ctx][0]
            ctx = child(ctx, x)
            tokens.append(x)
            nodes.append(ctx)
        return tokens, list(range(-1, k - 1)), None, nodes

    return propose


def tree(branching: tuple[int, ...], *, replacement: bool = False, honest: bool = True,
         deterministic: bool = False) -> Callable:
    """Tree with branching[d] children per node at depth d (nodes numbered depth-first).

    Without replacement: child j is drawn from q renormalised without the earlier siblings, and
    that conditional is its draft row (``honest=False`` reports the unconditioned q: a proposal
    bug). With replacement: i.i.d. siblings, row q. Deterministic: the top-b tokens of q, no rows.
    """

    def propose(models: TableModels, ctx: int, rng: random.Random):
        tokens, parents, rows, nodes = [], [], [], []

        def grow(parent: int, at: int, depth: int) -> None:
            if depth == len(branching):
                return
            picks = models.q_rank[at]
            remaining = list(models.q[at])
            for j in range(branching[depth]):
                if deterministic:
                    x = picks[j]
                else:
                    total = sum(remaining)
                    if total <= 0.0:
                        return  # support exhausted
                    x = _draw(remaining, rng)
                    rows.append([r / total for r in remaining] if honest and not replacement else models.q[at])
                    if not replacement:
                        remaining[x] = 0.0
                tokens.append(x)
                parents.append(parent)
                nodes.append(child(at, x))
                grow(len(tokens) - 1, nodes[-1], depth + 1)

        grow(-1, ctx, 0)
        return tokens, parents, None if deterministic else rows, nodes

    return propose


def multi_draft(k: int, depth: int) -> Callable:
    """k independent draft chains (i.i.d., repeats allowed) as sibling subtrees of the root."""
    return tree((k,) + (1,) * (depth - 1), replacement=True)


# --- the harness ---------------------------------------------------------------------------------


@dataclass
class Result:
    counts: np.ndarray
    law: np.ndarray
    p_value: float
    tv: float
    tv_bound: float

    def assert_lossless(self) -> None:
        assert self.p_value > P_PASS, f"chi-square p = {self.p_value:.3g} (TV {self.tv:.4f})"
        assert self.tv < self.tv_bound, f"TV {self.tv:.4f} >= bound {self.tv_bound:.4f}"


def compare(counts: np.ndarray, law: np.ndarray) -> Result:
    n = counts.sum()
    support = law > 0
    expected = n * law
    if counts[~support].any():  # a token sequence the target cannot produce
        p_value = 0.0
    else:
        big = support & (expected >= 5)  # pool rare cells so the chi-square approximation holds
        obs = np.append(counts[big], counts[support & ~big].sum())
        exp = np.append(expected[big], expected[support & ~big].sum())
        if exp[-1] == 0:
            obs, exp = obs[:-1], exp[:-1]
        # One cell holding all the mass (a deterministic law) leaves nothing to test but support.
        p_value = float(stats.chisquare(obs, exp).pvalue) if len(obs) > 1 else 1.0
    tv = 0.5 * float(np.abs(counts / n - law).sum())
    # Null TV ~ 0.5 * sum E|c_i/n - p_i| ~ 0.5 * sum sqrt(2 p_i (1 - p_i) / (pi n)); its spread is
    # about 0.5 * sqrt((1 - 2/pi) / n). Bound: mean + 6 spreads.
    mean = 0.5 * float(np.sqrt(2 * law * (1 - law) / (math.pi * n)).sum())
    bound = mean + 6 * 0.5 * math.sqrt((1 - 2 / math.pi) / n)
    return Result(counts, law, p_value, tv, bound)


def run_speculative(propose: Callable, params: SamplingParams = PLAIN, verifier: Callable = verify_stochastic,
                    n: int = N_SAMPLES, seed: int = 0) -> Result:
    """n speculative generations of HORIZON tokens; their empirical law against the exact one."""
    models = table_models(params, seed)
    rng = random.Random(seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    counts = np.zeros(V**HORIZON, dtype=np.int64)
    for _ in range(n):
        out: list[int] = []
        ctx = 0
        while len(out) < HORIZON:
            tokens, parents, rows, nodes = propose(models, ctx, rng)
            target = torch.from_numpy(models.p[[ctx, *nodes]])  # row 0: root, row i + 1: node i
            draft = torch.from_numpy(np.array(rows, dtype=np.float32)) if rows else None
            proposal = Proposal(torch.from_numpy(np.array(tokens, dtype=np.int64)), tuple(parents), draft)
            verdict = verifier(proposal, target, generator)
            assert len(verdict.token_ids) == len(verdict.accepted) + 1
            for x in verdict.token_ids:
                ctx = child(ctx, x)
            out += verdict.token_ids
        counts[(out[0] * V + out[1]) * V + out[2]] += 1
    return compare(counts, models.exact_law())


# --- correct samplers pass -----------------------------------------------------------------------

COLD_TOP_K = SamplingParams(temperature=0.7, top_k=3)
HOT_NUCLEUS = SamplingParams(temperature=1.3, top_p=0.8)
ALL_THREE = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)

# (a) chains with draft probs, (b) model-free chain, (c) trees drawn without replacement,
# (d) i.i.d. multi-draft, (e) deterministic top-k tree; (f) processing on both target and draft
# (zeros in p and q: impossible tokens, draft tokens the target cannot emit) for one of each kind.
CORRECT = {
    "chain1": (chain(1), PLAIN),
    "chain2_t0.7_k3": (chain(2), COLD_TOP_K),
    "chain4": (chain(4), PLAIN),
    "argmax_chain3": (argmax_chain(3), PLAIN),
    "tree_wor_2x2": (tree((2, 2)), PLAIN),
    "tree_wor_3x1x1_t1.3_p0.8": (tree((3, 1, 1)), HOT_NUCLEUS),
    "multi_draft_3x2": (multi_draft(3, 2), PLAIN),
    "topk_tree_3x2_t0.7_k3": (tree((3, 2), deterministic=True), COLD_TOP_K),
    "multi_draft_2x2_t0.8_k4_p0.9": (multi_draft(2, 2), ALL_THREE),
}


@pytest.mark.parametrize("case", list(CORRECT))
def test_speculative_law_equals_target_law(case):
    propose, params = CORRECT[case]
    run_speculative(propose, params).assert_lossless()


def test_processed_target_law_has_holes():
    """With top-k / top-p the exact law has impossible sequences; the harness checks them too."""
    law = table_models(COLD_TOP_K).exact_law()
    assert (law == 0).sum() > 0 and law.sum() == pytest.approx(1.0)
    counts = np.round(law * 10_000).astype(np.int64)
    counts[np.argmin(law)] += 1  # one impossible sequence observed
    assert compare(counts, law).p_value == 0.0


# --- broken samplers fail the same harness -------------------------------------------------------


def reference_verify(proposal: Proposal, target_probs: torch.Tensor, generator: torch.Generator,
                     bug: str | None = None) -> Verdict:
    """A small NumPy recursive rejection sampler, with optional injected bugs:

    ``no_residual``   on rejection keep p (the next sibling, or the final draw, uses p, not
                      normalize(max(p - q, 0)));
    ``fresh_siblings`` every sibling is tested against the fresh target row; only the final draw
                      uses the residual of the last sibling (naive multi-draft);
    ``inverted_ratio`` accept with min(1, q(x)/p(x)) instead of min(1, p(x)/q(x));
    ``shrunk_accept`` accept with 0.9 * min(1, p(x)/q(x)) (a subtle bias: rejected mass leaks to
                      the residual);
    ``row_off_by_one`` the children of node i are tested against row i instead of row i + 1
                      (a target-logit layout mistake).

    (Dropping the min(1, .) alone is harmless in the form ``u < p/q`` used here: a ratio above 1
    accepts always either way, so that is not a bug to inject.)
    """
    n = len(proposal)
    u = torch.rand(n + 1, generator=generator, dtype=torch.float64).tolist()
    rows = target_probs.double().numpy()
    tokens = proposal.token_ids.tolist()
    q_rows = None if proposal.draft_probs is None else proposal.draft_probs.double().numpy()
    node, accepted = -1, []
    while True:
        fresh = rows[node] if bug == "row_off_by_one" else rows[node + 1]
        p, chosen = fresh, None
        for c in proposal.children[node]:
            x = tokens[c]
            q = np.eye(V)[x] if q_rows is None else q_rows[c]
            test_p = fresh if bug == "fresh_siblings" else p
            ratio = q[x] / test_p[x] if bug == "inverted_ratio" else test_p[x] / q[x]
            if u[c] < (0.9 * min(ratio, 1.0) if bug == "shrunk_accept" else ratio):
                chosen = c
                break
            if bug != "no_residual":
                r = np.maximum(test_p - q, 0.0)
                p = r / r.sum() if r.sum() > 0 else test_p
        if chosen is None:
            x = int(np.searchsorted(np.cumsum(p), u[n] * p.sum(), side="right"))
            return Verdict(accepted, [tokens[i] for i in accepted] + [min(x, V - 1)])
        accepted.append(chosen)
        node = chosen


def _with_bug(bug: str | None) -> Callable:
    return lambda proposal, target, generator: reference_verify(proposal, target, generator, bug)


def test_reference_verifier_is_lossless():
    """The bug-injection host itself is correct, so the failures below are the bugs' doing."""
    run_speculative(multi_draft(3, 2), verifier=_with_bug(None), n=N_BROKEN).assert_lossless()


BROKEN = {  # name: (proposer, verifier, samples); subtle biases get more samples
    "chain2_resample_from_p": (chain(2), _with_bug("no_residual"), N_BROKEN),
    "chain2_inverted_ratio": (chain(2), _with_bug("inverted_ratio"), N_BROKEN),
    "chain3_row_off_by_one": (chain(3), _with_bug("row_off_by_one"), N_BROKEN),
    "chain2_shrunk_accept": (chain(2), _with_bug("shrunk_accept"), 2 * N_BROKEN),
    "multi_draft_fresh_siblings": (multi_draft(3, 2), _with_bug("fresh_siblings"), N_BROKEN),
    "tree_wor_unconditioned_rows": (tree((3, 1), honest=False), verify_stochastic, 2 * N_BROKEN),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_sampler_fails_harness(case):
    propose, verifier, n = BROKEN[case]
    result = run_speculative(propose, verifier=verifier, n=n)
    assert result.p_value < P_FAIL, f"broken sampler not caught: p = {result.p_value:.3g}, TV {result.tv:.4f}"
    with pytest.raises(AssertionError):
        result.assert_lossless()


# --- edge cases of verify_stochastic -------------------------------------------------------------


def test_residual_of_equal_distributions_falls_back_to_p():
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert torch.equal(_residual(p, p.clone()), p)  # max(p - p, 0) has no mass
    certain = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.equal(_residual(certain, 1), certain)  # point mass on a certain token
    q = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)
    torch.testing.assert_close(_residual(p, q), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(_residual(p, 2), torch.tensor([0.4, 0.6, 0.0], dtype=torch.float64))


def _repeat(proposal: Proposal, target: torch.Tensor, times: int = 4000, seed: int = 0) -> list[Verdict]:
    g = torch.Generator().manual_seed(seed)
    return [verify_stochastic(proposal, target, g) for _ in range(times)]


def test_zero_target_probability_is_never_accepted():
    target = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.25] * 4])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    verdicts = _repeat(Proposal.chain([1], q), target)
    assert all(v.accepted == [] for v in verdicts)
    # residual normalize(max(p - q, 0)) = (0.4, 0, 0.3, 0) / 0.7
    first = np.bincount([v.token_ids[0] for v in verdicts], minlength=4)
    assert first[1] == first[3] == 0
    assert abs(first[0] / len(verdicts) - 4 / 7) < 0.03


def test_zero_draft_probability_of_own_token_is_a_point_mass():
    """q_j(x_j) = 0: x_j was not drawn from q_j; it is verified as a deterministic proposal:
    accepted with probability p(x) (not always, as an infinite ratio would), else p without x."""
    target = torch.tensor([[0.2, 0.5, 0.3], [1 / 3] * 3])
    q = torch.tensor([[0.5, 0.0, 0.5]])
    verdicts = _repeat(Proposal.chain([1], q), target)
    accepted = sum(v.num_accepted for v in verdicts) / len(verdicts)
    assert abs(accepted - 0.5) < 0.03
    corrections = [v.token_ids[0] for v in verdicts if not v.accepted]
    assert 1 not in corrections
    assert abs(corrections.count(0) / len(corrections) - 0.4) < 0.04


def test_identical_draft_is_always_accepted():
    p = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), -1)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        tokens = [int(torch.multinomial(p[i], 1, generator=g)) for i in range(3)]  # x_i ~ p(. | path)
        # the table is context-free here, so the chain's rows are p[0..2] and the target's p[0..3]
        v = verify_stochastic(Proposal.chain(tokens, p[:3]), p, g)
        assert v.accepted == [0, 1, 2] and v.extras["bonus"] is True


def test_verdict_is_a_root_to_leaf_path_with_extras():
    g = torch.Generator().manual_seed(5)
    parents = (-1, -1, -1, 0, 0, 1, 3, 3)
    for _ in range(200):
        tokens = torch.randint(0, 6, (8,), generator=g)
        proposal = Proposal(tokens, parents, torch.softmax(torch.randn(8, 6, generator=g), -1))
        v = verify_stochastic(proposal, torch.softmax(torch.randn(9, 6, generator=g), -1), g)
        assert len(v.token_ids) == v.num_accepted + 1
        assert [proposal.parents[a] for a in v.accepted] == [-1, *v.accepted][: v.num_accepted]
        assert v.token_ids[:-1] == [int(tokens[a]) for a in v.accepted]
        tried = v.extras["tried_per_depth"]
        assert len(tried) == v.num_accepted + (0 if v.extras["bonus"] else 1)
        assert all(1 <= t <= 3 for t in tried)


def test_seeded_verification_is_reproducible():
    probs = torch.softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(2)), -1)
    proposal = Proposal(torch.tensor([1, 4, 2]), (-1, -1, 0), probs[:3])
    runs = [[v.token_ids for v in _repeat(proposal, probs, times=50, seed=7)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] != [v.token_ids for v in _repeat(proposal, probs, times=50, seed=8)]


def test_empty_proposal_samples_row_zero():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    params = SamplingParams(temperature=1.0, top_k=2, seed=3)
    g = torch.Generator().manual_seed(3)
    draws = [verify(Proposal.empty(), logits, params, g).token_ids for _ in range(3000)]
    assert all(len(d) == 1 and d[0] in (1, 2) for d in draws)
    share = sum(d[0] == 1 for d in draws) / len(draws)
    assert abs(share - 1 / (1 + math.exp(-1.0))) < 0.03
    with pytest.raises(ValueError):
        verify_stochastic(Proposal.chain([1]), torch.softmax(logits, -1), g)  # needs 2 rows


def test_large_vocabulary_smoke():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 32_000, generator=g) * 4
    params = SamplingParams(temperature=0.9, top_p=0.95)
    draft = processed_probs(logits[:4] + torch.randn(4, 32_000, generator=g), params)
    tokens = [int(torch.multinomial(draft[i], 1, generator=g)) for i in range(4)]
    v = verify(Proposal.chain(tokens, draft), logits, params, g)
    assert len(v.token_ids) == v.num_accepted + 1
    assert processed_probs(logits, params)[v.num_accepted, v.token_ids[-1]] > 0
