"""Lossless verification of a draft token tree against the target (data plane).

Layout contract: the target runs one tree-masked forward over [last committed token, *draft], so
``target_logits`` / ``target_probs`` has n + 1 rows: row 0 is the distribution after the root (the
last committed token), row i + 1 the distribution after node i.

Invariants of every Verdict:

* ``accepted`` is a root-to-leaf path of the proposal tree (each node's parent is the previous one);
* ``token_ids`` = the accepted tokens followed by exactly one target token (bonus or correction);
* greedy: every accepted token is the target's argmax given its path, and so is the last token,
  so the output equals target-only greedy decoding token for token;
* stochastic: the emitted tokens are distributed exactly as target-only sampling from the
  processed target distribution (recursive rejection sampling, proof sketched below), for any
  proposal whose child j was drawn from ``draft_probs[j]`` given its path and earlier siblings,
  or was chosen by any rule not looking at this verification's randomness (``draft_probs`` None);
* a seeded generator consumes exactly n + 1 uniforms per call: reproducible per request.

``extras``: ``tried_per_depth`` (siblings tested at each visited depth, a measure of tree
usefulness) and ``bonus`` (True when the last token follows a fully accepted leaf/root without
children, False when it corrects a rejection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actors.spec.sampling import draw_one, processed_probs
from actors.spec.types import Proposal, SamplingParams, Verdict


def _check_rows(proposal: Proposal, rows: torch.Tensor) -> None:
    if rows.dim() != 2 or rows.shape[0] != len(proposal) + 1:
        raise ValueError(f"expected [{len(proposal) + 1}, V] target rows, got {tuple(rows.shape)}")


def verify_greedy(proposal: Proposal, target_logits: torch.Tensor | None = None, *,
                  argmax: list[int] | None = None) -> Verdict:
    """Accept the longest path whose every token is the target's argmax at its parent. ``argmax``:
    the rows' argmax already on the host (a batch computes it once for all its requests, one
    device->host read instead of one per request); else taken from ``target_logits``."""
    if argmax is None:
        _check_rows(proposal, target_logits)
        best = target_logits.argmax(dim=-1).tolist()  # best[i + 1]: target argmax after node i
    else:
        if len(argmax) != len(proposal) + 1:
            raise ValueError(f"expected {len(proposal) + 1} argmax rows, got {len(argmax)}")
        best = argmax
    tokens = proposal.token_ids.tolist()
    children = proposal.children
    node, accepted, tried = -1, [], []
    while True:
        want = best[node + 1]
        kids = children[node]
        match = next((j for j, c in enumerate(kids) if tokens[c] == want), None)
        if kids:
            tried.append(len(kids) if match is None else match + 1)
        if match is None:
            break
        node = kids[match]
        accepted.append(node)
    out = [tokens[i] for i in accepted] + [want]  # `want` is the bonus / correction argmax
    return Verdict(accepted, out, {"tried_per_depth": tried, "bonus": not children[node]})


def _residual(p: torch.Tensor, q: torch.Tensor | int) -> torch.Tensor:
    """normalize(max(p - q, 0)) for a draft row q, or for a point mass at token q.

    Rejecting a child drawn from q happens with probability sum_x max(q - p, 0) = sum_x
    max(p - q, 0) = m (both sum to 1). When m is 0 (p == q up to rounding) the rejection branch
    has probability 0 (or of the order of the rounding), so what it emits cannot move the output
    distribution by more than m in total variation; we then keep p, which stays inside the
    target's support (any residual with m > 0 does too, since max(p - q, 0) <= p elementwise,
    and r / m cannot overflow since every r_i <= m).
    """
    if isinstance(q, int):  # point mass: max(p - delta_x, 0) is p with x zeroed
        r = p.clone()
        r[q] = 0.0
    else:
        r = (p - q).clamp_min_(0.0)
    m = float(r.sum())
    return r / m if m > 0.0 else p


def verify_stochastic(proposal: Proposal, target_probs: torch.Tensor, generator: torch.Generator | None = None) -> Verdict:
    """Recursive rejection sampling over the tree (chains, SpecInfer multi-draft, w/o replacement).

    At a node with target distribution p, for each child j in sibling order, token x, draft q_j:
        accept with probability min(1, p(x) / q_j(x))            [u * q_j(x) < p(x), u ~ U[0,1)]
        else p <- normalize(max(p - q_j, 0)) and try the next sibling.
    All rejected -> emit a draw from the current (residual) p. Accepted -> descend; the child's p
    is its fresh target row; a child without children emits a bonus draw from that row.

    Why lossless: for one sibling, P(emit y) = min(p, q_j)(y) [accepted] + P(reject) * r(y), and
    P(reject) = 1 - sum min(p, q_j) = sum max(p - q_j, 0), so the second term is max(p - q_j, 0)(y)
    and the sum is p(y). The remaining siblings then reproduce r given x_j (induction from the
    last sibling, whose continuation is a plain draw from r), whatever the dependence of q_{j+1}
    on x_j (without replacement, or i.i.d. multi-draft). Descending repeats this on the next row.

    Model-free children (draft_probs None) are point masses q = delta_x: accept with probability
    p(x), residual = p with x removed. That is lossless for *any* choice of x made without this
    call's uniforms. A child whose own draft probability q_j(x_j) is 0 cannot have been drawn from
    q_j, so it is treated as such a point mass too (the only safe reading).
    """
    _check_rows(proposal, target_probs)
    n = len(proposal)
    device = target_probs.device
    # u[i]: acceptance test of node i; u[n]: the final draw. Always n + 1 of them.
    u = torch.rand(n + 1, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else device).tolist()
    tokens = proposal.token_ids.tolist()
    draft = proposal.draft_probs
    # Fresh-target probability of each node's token, p_fresh[i] = target[parent_i + 1, x_i], and
    # its own draft probability q_self[i] = draft[i, x_i]: two gathers, no index tensor to build.
    p_fresh, q_self = [0.0] * n, [1.0] * n
    if n:
        ids = proposal.token_ids.to(device)
        columns = target_probs.index_select(1, ids).tolist()  # [n + 1][n]: every row at our tokens
        p_fresh = [columns[a + 1][i] for i, a in enumerate(proposal.parents)]
        if draft is not None:
            q_cols = draft.index_select(1, ids.to(draft.device)).tolist()  # [n][n], diagonal wanted
            q_self = [q_cols[i][i] for i in range(n)]
    children = proposal.children
    node, accepted, tried = -1, [], []
    while True:
        kids = children[node]
        p = None  # None: the fresh target row node + 1 (its values at our tokens are in p_fresh)
        chosen = None
        for count, c in enumerate(kids, start=1):
            x = tokens[c]
            point = draft is None or not q_self[c] > 0.0  # q_j(x_j) = 0: not drawn from q_j
            qx = 1.0 if point else q_self[c]
            px = p_fresh[c] if p is None else float(p[x])
            if u[c] * qx < px:  # u < min(1, p/q); p(x) = 0 is always rejected
                chosen = c
                break
            if p is None:
                p = target_probs[node + 1].double()
            p = _residual(p, x if point else draft[c].to(device, torch.float64))
        if kids:
            tried.append(count)
        if chosen is None:
            final = target_probs[node + 1] if p is None else p
            out = [tokens[i] for i in accepted] + [draw_one(final, u[n])]
            return Verdict(accepted, out, {"tried_per_depth": tried, "bonus": not kids})
        accepted.append(chosen)
        node = chosen


def verify(proposal: Proposal, target_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Verdict:
    """Greedy params -> exact argmax matching; otherwise processed probs + rejection sampling.

    ``proposal.draft_probs`` must already be processed with the same ``params``.
    """
    if params.greedy:
        return verify_greedy(proposal, target_logits)
    if len(proposal) == 0:
        target_logits = target_logits[:1]  # only row 0 is ever used
    return verify_stochastic(proposal, processed_probs(target_logits, params), generator)


def verify_batch(proposals: Sequence[Proposal], logits: torch.Tensor, counts: Sequence[int],
                 params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> list[Verdict]:
    """Verify every sequence of one step: ``logits`` [N, V] holds each sequence's rows in order
    (``counts[i]`` of them). The argmax of the greedy sequences is taken for the whole step at once,
    one device->host read instead of one per sequence; sampled sequences go through ``verify``."""
    total = sum(counts)
    rows = torch.split(logits[:total], list(counts))
    flat = logits[:total].argmax(dim=-1).tolist() if any(p.greedy for p in params) else None
    out, start = [], 0
    for proposal, row, p, generator, n in zip(proposals, rows, params, generators, counts):
        if p.greedy:
            out.append(verify_greedy(proposal, argmax=flat[start:start + n]))
        else:
            out.append(verify(proposal, row, p, generator))
        start += n
    return out
