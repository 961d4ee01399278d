"""Greedy verification: hand-built chains and trees, and exact equality with target-only argmax
decoding on synthetic table models (with a broken verifier that the same check must catch)."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from actors.spec.types import Proposal, SamplingParams, Verdict
from actors.spec.verify import verify, verify_greedy, verify_stochastic

V = 8


def rows(*argmaxes: int) -> torch.Tensor:
    """Target logits [len, V] whose row r has its maximum at argmaxes[r] (with distractors)."""
    out = torch.linspace(0.0, 1.0, V).repeat(len(argmaxes), 1)
    for r, a in enumerate(argmaxes):
        out[r, a] = 5.0
    return out


def test_chain_accept_all_then_bonus():
    v = verify_greedy(Proposal.chain([3, 1, 4]), rows(3, 1, 4, 6))
    assert v.accepted == [0, 1, 2] and v.token_ids == [3, 1, 4, 6]
    assert v.extras == {"tried_per_depth": [1, 1, 1], "bonus": True}


def test_chain_reject_first():
    v = verify_greedy(Proposal.chain([3, 1, 4]), rows(2, 1, 4, 6))
    assert v.accepted == [] and v.token_ids == [2]
    assert v.extras["bonus"] is False


def test_chain_reject_mid_chain():
    v = verify_greedy(Proposal.chain([3, 1, 4, 1]), rows(3, 1, 5, 1, 0))
    assert v.accepted == [0, 1] and v.token_ids == [3, 1, 5]
    assert v.num_accepted == 2


def test_later_rows_are_ignored_after_a_rejection():
    # Node 2 would match row 3, but node 1 was rejected: nothing past it may be used.
    v = verify_greedy(Proposal.chain([3, 1, 4]), rows(3, 7, 4, 6))
    assert v.token_ids == [3, 7]


def test_empty_proposal_takes_root_argmax():
    v = verify_greedy(Proposal.empty(), rows(5))
    assert v.accepted == [] and v.token_ids == [5] and v.extras["bonus"] is True


def test_tree_selects_matching_sibling():
    #        root
    #      /   |   \
    #    2(0) 6(1) 4(2)        target argmax after root: 6
    #     |    / \
    #   1(3) 0(4) 7(5)         target argmax after node 1: 7; after node 5: 2
    proposal = Proposal(torch.tensor([2, 6, 4, 1, 0, 7]), (-1, -1, -1, 0, 1, 1))
    target = rows(6, 1, 7, 0, 0, 0, 2)  # row i + 1 is after node i
    v = verify_greedy(proposal, target)
    assert v.accepted == [1, 5] and v.token_ids == [6, 7, 2]
    assert v.extras["tried_per_depth"] == [2, 2]
    assert v.extras["bonus"] is True


def test_tree_no_sibling_matches_gives_correction():
    proposal = Proposal(torch.tensor([2, 6, 4, 1]), (-1, -1, -1, 0))
    v = verify_greedy(proposal, rows(5, 1, 0, 0, 0))
    assert v.accepted == [] and v.token_ids == [5]
    assert v.extras == {"tried_per_depth": [3], "bonus": False}


def test_tree_bonus_at_inner_leaf():
    # Node 1 matches and is a leaf although its sibling has children.
    proposal = Proposal(torch.tensor([2, 6, 1]), (-1, -1, 0))
    v = verify_greedy(proposal, rows(6, 0, 3, 0))
    assert v.accepted == [1] and v.token_ids == [6, 3]


def test_duplicate_siblings_take_the_first():
    proposal = Proposal(torch.tensor([6, 6, 1]), (-1, -1, 1))
    v = verify_greedy(proposal, rows(6, 4, 1, 0))
    assert v.accepted == [0] and v.token_ids == [6, 4]


def test_ties_use_the_first_maximum():
    target = torch.zeros(2, V)
    target[0, 3] = target[0, 5] = 1.0
    assert verify_greedy(Proposal.chain([5]), target).token_ids == [3]
    assert verify_greedy(Proposal.chain([3]), target).token_ids == [3, 0]


def test_verify_dispatches_greedy_and_ignores_draft_probs():
    proposal = Proposal.chain([3, 1], torch.full((2, V), 1 / V))
    v = verify(proposal, rows(3, 2, 0), SamplingParams(temperature=0.0), None)
    assert v.token_ids == [3, 2]


def test_row_count_is_checked():
    with pytest.raises(ValueError):
        verify_greedy(Proposal.chain([3, 1]), rows(3, 1))


@pytest.mark.parametrize("seed", range(5))
def test_stochastic_on_one_hot_target_is_greedy(seed):
    """A one-hot target leaves rejection sampling no freedom: it must reproduce greedy."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (6,), generator=g)
    proposal = Proposal(tokens, (-1, -1, 0, 0, 2, 4), torch.softmax(torch.randn(6, V, generator=g), -1))
    logits = torch.randn(7, V, generator=g)
    for i, a in [(0, 1), (1, 2), (3, 4), (5, 6)]:
        logits[a, int(tokens[i])] = 10.0  # make some of the path the argmax
    expect = verify_greedy(proposal, logits)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    for _ in range(20):
        assert verify_stochastic(proposal, one_hot, g).token_ids == expect.token_ids
    assert verify(proposal, logits, SamplingParams(temperature=1.0, top_k=1), g).token_ids == expect.token_ids


# --- speculative greedy decoding equals target-only argmax decoding ------------------------------


def table_logits(seed: int, ctx: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([seed, len(ctx), *ctx]).normal(size=V)


def target_argmax_decode(prompt: tuple[int, ...], steps: int) -> list[int]:
    ctx = prompt
    for _ in range(steps):
        ctx += (int(np.argmax(table_logits(0, ctx))),)
    return list(ctx[len(prompt):])


def draft_tree(ctx: tuple[int, ...], branching: tuple[int, ...]) -> tuple[list[int], list[int], list[tuple[int, ...]]]:
    """Top-b tokens of a draft that usually, not always, agrees with the target (depth-first)."""
    tokens, parents, paths = [], [], []

    def grow(parent: int, path: tuple[int, ...]) -> None:
        if len(path) == len(branching):
            return
        draft = table_logits(0, ctx + path) + 1.2 * table_logits(1, ctx + path)
        for x in np.argsort(-draft, kind="stable")[: branching[len(path)]].tolist():
            tokens.append(x)
            parents.append(parent)
            paths.append(path + (x,))
            grow(len(tokens) - 1, path + (x,))

    grow(-1, ())
    return tokens, parents, paths


def speculative_decode(prompt: tuple[int, ...], steps: int, branching: tuple[int, ...], verifier: Callable) -> list[int]:
    ctx = prompt
    while len(ctx) - len(prompt) < steps:
        tokens, parents, paths = draft_tree(ctx, branching)
        target = torch.tensor(np.stack([table_logits(0, ctx + p) for p in [(), *paths]]), dtype=torch.float32)
        verdict: Verdict = verifier(Proposal(torch.tensor(tokens, dtype=torch.long), tuple(parents)), target)
        ctx += tuple(verdict.token_ids)
    return list(ctx[len(prompt):])[:steps]


def assert_greedy_lossless(verifier: Callable, branching: tuple[int, ...]) -> None:
    for prompt in [(), (1,), (2, 7), (5, 5, 5), (0, 3)]:
        expect = target_argmax_decode(prompt, 12)
        got = speculative_decode(prompt, 12, branching, verifier)
        assert got == expect, f"prompt {prompt}: speculative {got} != target-only {expect}"


BRANCHINGS = [(), (1,), (1, 1, 1), (1,) * 5, (2, 2), (3, 1, 1), (2, 2, 2)]


@pytest.mark.parametrize("branching", BRANCHINGS)
def test_speculative_greedy_equals_target_argmax(branching):
    assert_greedy_lossless(verify_greedy, branching)
    params = SamplingParams(temperature=0.0)
    assert_greedy_lossless(lambda p, t: verify(p, t, params, None), branching)


def broken_bonus_from_parent(proposal: Proposal, target_logits: torch.Tensor) -> Verdict:
    """Bug: the bonus token is read from the last accepted node's parent row (off by one)."""
    verdict = verify_greedy(proposal, target_logits)
    if verdict.accepted:
        row = proposal.parents[verdict.accepted[-1]] + 1
        verdict.token_ids[-1] = int(target_logits[row].argmax())
    return verdict


def broken_child_row(proposal: Proposal, target_logits: torch.Tensor) -> Verdict:
    """Bug: node c is checked against its own row c + 1 instead of its parent's row (layout)."""
    best = target_logits.argmax(-1).tolist()
    tokens = proposal.token_ids.tolist()
    node, accepted = -1, []
    while True:
        node = next((c for c in proposal.children[node] if tokens[c] == best[c + 1]), None)
        if node is None:
            break
        accepted.append(node)
    last = accepted[-1] if accepted else -1
    return Verdict(accepted, [tokens[i] for i in accepted] + [best[last + 1]])


@pytest.mark.parametrize("broken", [broken_bonus_from_parent, broken_child_row])
def test_greedy_check_catches_broken_verifiers(broken):
    with pytest.raises(AssertionError):
        for branching in [(1, 1, 1), (2, 2), (3, 1, 1)]:
            assert_greedy_lossless(broken, branching)


def test_verify_batch_equals_verifying_each_sequence():
    """One step's rows verified together (one argmax read for the greedy ones) give what each
    sequence's own verify gives, sampled sequences included (same generator state)."""
    from actors.spec.verify import verify_batch

    gen = torch.Generator().manual_seed(3)
    proposals = [Proposal.chain([3, 1]), Proposal.empty(), Proposal(torch.tensor([2, 4, 4]), (-1, -1, 0)),
                 Proposal.chain([0, 5, 6])]
    counts = [len(p) + 1 for p in proposals]
    logits = torch.randn(sum(counts), 8, generator=gen)
    logits[0, 3] = logits[1, 1] = 50.0  # the first chain is accepted whole
    params = [SamplingParams(), SamplingParams(), SamplingParams(), SamplingParams(temperature=0.9, seed=5)]
    rows = torch.split(logits, counts)
    want = [verify(p, r, sp, torch.Generator().manual_seed(9)) for p, r, sp in zip(proposals, rows, params)]
    got = verify_batch(proposals, logits, counts, params, [torch.Generator().manual_seed(9) for _ in proposals])
    assert [(v.accepted, v.token_ids) for v in got] == [(v.accepted, v.token_ids) for v in want]
    assert got[0].accepted == [0, 1]
