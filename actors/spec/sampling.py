"""Token sampling: the target's processed distribution, seeded generators, batched draws (data plane).

``processed_probs`` *defines* the distribution that lossless speculative decoding must reproduce:
the target's logits after temperature, top-k and top-p, renormalised. Draft distributions are
processed by the same function with the same parameters.

Invariants:

* every processed row is a probability vector (float32, >= 0, sums to 1 up to rounding) with at
  least one positive entry: the top token always survives top-k and top-p;
* greedy (``temperature == 0``) rows are the one-hot of ``torch.argmax`` (first maximum on ties),
  the same argmax the greedy verifier uses;
* top-k keeps exactly ``min(k, V)`` tokens; ties at the cut are broken towards the lower token id
  (stable sort), so the kept set is a deterministic function of the logits;
* a draw never returns a token of probability 0;
* a seeded request consumes exactly one uniform of its own generator per sampled row, so its
  output does not depend on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actors.spec.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``params.seed`` (reproducible per request), or None (global RNG)."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(params.seed))
    return generator


MIN_POSITIVE = 1e-6  # the smallest temperature / top_p applied; smaller positive values act as it


def _process(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row temperature, top-k, top-p of non-greedy rows: logits [N, V], params [N] -> probs [N, V]."""
    # T and top_p are positive but may round to 0 in float32 (1e-300): floor both at 1e-6 so a
    # request's parameters can never produce NaN probabilities (and crash the step it rides in)
    temperature = temperature.float().to(logits.device).clamp(min=MIN_POSITIVE)
    x = logits.float() / temperature[:, None]  # p ∝ exp(logit / T)
    vocab = x.shape[-1]
    k = top_k.to(logits.device)
    top_p = top_p.float().to(logits.device).clamp(min=MIN_POSITIVE)
    needs_top_k = bool(((k > 0) & (k < vocab)).any())
    needs_top_p = bool((top_p < 1.0).any())
    if not (needs_top_k or needs_top_p):
        return torch.softmax(x, dim=-1)
    # Work in descending order: rank r of a row is its r-th largest logit (stable: lower id first).
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=x.device)
    keep_k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
    sorted_x = sorted_x.masked_fill(ranks[None, :] >= keep_k[:, None], float("-inf"))  # top-k
    sorted_p = torch.softmax(sorted_x, dim=-1)
    # Nucleus: keep rank r iff the mass strictly above it is < top_p. That is the smallest prefix
    # whose mass reaches top_p, and rank 0 (mass above = 0 < top_p) is always kept. Rows with
    # top_p == 1 are left alone so rounding in the cumsum cannot drop their tail.
    mass_above = torch.cumsum(sorted_p, dim=-1) - sorted_p
    drop = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)  # renormalise the survivors
    return torch.zeros_like(sorted_p).scatter_(-1, order, sorted_p)


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, V] -> probs [N, V] float32 under ``params`` (greedy: one-hot of the argmax)."""
    if params.greedy:
        return _one_hot_argmax(logits)
    n = logits.shape[0]
    full = lambda value, dtype: torch.full((n,), value, dtype=dtype)  # noqa: E731
    return _process(logits, full(params.temperature, torch.float32), full(params.top_k, torch.long),
                    full(params.top_p, torch.float32))


def sample_from_uniforms(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [N, V] (need not be normalised), uniforms [N] in [0, 1) -> [N] int64.

    Token i is returned iff cdf[i-1] <= u * total < cdf[i], an interval of length probs[i], so
    P(i) = probs[i] / total and zero-probability tokens are never returned (empty interval).
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:].contiguous()
    target = uniforms.to(cdf.device, torch.float64)[:, None] * total
    index = torch.searchsorted(cdf, target, right=True)  # first i with cdf[i] > u * total
    # u * total can round up to total (index V). The first i with cdf[i] >= total has
    # cdf[i-1] < total <= cdf[i], so it is a positive token, and it is >= index otherwise.
    return torch.minimum(index, torch.searchsorted(cdf, total)).squeeze(-1)


def draw_one(probs: torch.Tensor, u: float) -> int:
    """``sample_from_uniforms`` for one row probs [V] and a Python uniform (fewer kernel launches)."""
    cdf = probs.cumsum(dim=0, dtype=torch.float64)
    total = float(cdf[-1])
    index = int(torch.searchsorted(cdf, total * u, right=True))  # first i with cdf[i] > u * total
    return index if index < cdf.shape[0] else int(torch.searchsorted(cdf, total))


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) per row: from the row's own generator, or (batched) from the global RNG."""
    out = torch.empty(len(generators), dtype=torch.float64, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        out[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, device=device)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.rand(1, generator=g, dtype=torch.float64, device=g.device).to(device)[0]
    return out


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs [N, V] -> [N] int64, reproducible under a seeded generator."""
    device = generator.device if generator is not None else probs.device
    uniforms = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64, device=device)
    return sample_from_uniforms(probs, uniforms)


def sample_next(
    logits: torch.Tensor,
    params_list: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Target-only next tokens: logits [N, V], one params (and generator) per row -> [N] int64.

    Greedy rows take one batched argmax; all sampled rows are processed together (per-row
    temperature / top-k / top-p tensors, one sort) and drawn with one inverse-CDF search.
    """
    n = logits.shape[0]
    if len(params_list) != n:
        raise ValueError(f"{len(params_list)} sampling parameters for {n} rows")
    generators = [None] * n if generators is None else list(generators)
    greedy = [i for i, p in enumerate(params_list) if p.greedy]
    if len(greedy) == n:
        return logits.argmax(dim=-1)
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    if greedy:
        out[greedy] = logits[greedy].argmax(dim=-1)
    rows = [i for i, p in enumerate(params_list) if not p.greedy]
    chosen = [params_list[i] for i in rows]
    probs = _process(
        logits[rows],
        torch.tensor([p.temperature for p in chosen], dtype=torch.float32),
        torch.tensor([p.top_k for p in chosen], dtype=torch.long),
        torch.tensor([p.top_p for p in chosen], dtype=torch.float32),
    )
    out[rows] = sample_from_uniforms(probs, _uniforms([generators[i] for i in rows], logits.device))
    return out
