"""Goodput-adaptive speculation length, SmartSpec-style (control plane, pure Python + numpy).

The engine calls, once per step::

    decision = policy.choose(req_ids, caps, resume)  # before the step: how many draft tokens each
    ...run the step...
    estimator.observe(req_id, proposed, accepted)  # after it, per request
    costs.observe_verify(B, n, seconds); costs.observe_draft(B, k, seconds)
    costs.observe_catch_up(N, seconds)             # a draft call that first fed N missed tokens

Three pieces, each usable alone:

* ``AcceptanceEstimator`` — the conditional acceptance rate by draft position j (the probability
  that draft token j is accepted given tokens < j were), per request and globally. A verification
  of a chain of ``p`` drafts that accepted the first ``a`` *tested* positions ``0..a`` (``0..a-1``
  accepted, ``a`` rejected when ``a < p``); positions after the first rejection were never tested
  and are not counted at all. Counts are exponentially decayed per position, on that position's
  own trials. Global rates shrink toward a prior with ``prior_strength`` pseudo-trials — position 0
  toward ``prior[0]``, position j toward the estimate at j - 1 (times ``prior[j] / prior[j-1]``),
  so deep positions that are rarely tested follow the shallower ones; a request's rates shrink
  toward the global ones with ``request_strength`` pseudo-trials, so a new request starts at the
  global estimate and a request with many trials follows its own.
* ``StepCostModel`` — predicted seconds of a target verify step as a function of the tokens it
  feeds, ``T = B * n`` (B sequences, n = 1 + draft tokens each), and of one draft level (one
  token for each of B sequences) as a function of B. Each is a positive, non-decreasing curve on
  a log2 grid of token counts (1 .. 2**20, half-octave knots). It starts from a *base* curve: a
  prior roofline ``t = t0 * (1 + T / knee)``, or a measured table interpolated piecewise-linearly
  in log-log space (the prior's shape beyond the table's ends). Online observations then take
  over where they exist: at each knot, a kernel-weighted local affine fit ``t = a + b T`` (the
  roofline's shape: flat while memory-bound, linear once compute-bound) of the exponentially
  decayed observations; away from them, the base's shape anchored to the nearest fitted level.
  The knots are made non-decreasing by isotonic regression, so more tokens never predict less
  time. Details in ``_Curve``.
  A third curve, ``catch_up_time(N)``, is the draft's cost of first feeding N tokens it missed
  (an eager forward: a prompt it never saw, or the tokens of steps it sat out), learned the same
  way from the draft calls that began with such a catch-up.
* ``GoodputPolicy`` — for each batch-wide k in ``[min_draft_tokens, max_draft_tokens]``, predicts
  expected tokens per step, step time and goodput (tokens/s) and picks the best k; then, per
  request, drops draft tokens whose expected yield does not pay for their verify cost (see
  ``GoodputPolicy``). Resuming a draft that sat steps out costs its catch-up, amortised over the
  steps the decision is expected to last. ``FixedPolicy`` has the same interface for a fixed k
  (``adaptive=False``).

Invariants: every predicted time is > 0 (``draft_time(B, 0) == 0``: no drafting); predicted verify
time is non-decreasing in ``B * n``; rates lie in [0, 1]; ``choose`` never gives a request more
than ``max_draft_tokens`` or its cap; a decision carries every input it was made from
(``SpecDecision.candidates``) and a human-readable reason. Nothing here touches Ray, torch or a
device; everything is deterministic given the observations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "AcceptanceEstimator",
    "Candidate",
    "FixedPolicy",
    "GoodputPolicy",
    "SpecDecision",
    "StepCostModel",
    "expected_tokens",
]


def expected_tokens(rates: Sequence[float], k: int) -> float:
    """Expected tokens one verification emits for a chain of k drafts: 1 + sum_j prod_{i<=j} rates[i]."""
    if k <= 0:
        return 1.0
    return 1.0 + float(np.cumprod(np.asarray(rates, dtype=float)[:k]).sum())


# --------------------------------------------------------------------------- acceptance


class AcceptanceEstimator:
    """Online conditional acceptance rate by draft position, per request and global.

    ``rates(r)[j]`` estimates P(draft token j accepted | tokens < j accepted) for request r
    (j = 0 is the first draft token). ``decay`` applies to a request's counts, ``global_decay`` to
    the global counts, each per trial of a position (window ≈ 1 / (1 - decay) trials).
    """

    def __init__(self, max_depth: int, prior: float | Sequence[float] = 0.7, decay: float = 0.9,
                 global_decay: float = 0.999, prior_strength: float = 8.0, request_strength: float = 4.0) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        for name, value in (("decay", decay), ("global_decay", global_decay)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not (prior_strength > 0 and request_strength > 0):
            raise ValueError("prior_strength and request_strength must be positive")
        values = [float(prior)] if np.isscalar(prior) else [float(p) for p in prior]
        if not values or not all(0.0 <= p <= 1.0 for p in values):
            raise ValueError(f"prior must be one or more rates in [0, 1], got {prior!r}")
        values = (values + [values[-1]] * max_depth)[:max_depth]
        self.max_depth = max_depth
        self.decay, self.global_decay = decay, global_decay
        self.prior_strength, self.request_strength = prior_strength, request_strength
        self._prior = np.array(values)
        self._g_trials = np.zeros(max_depth)
        self._g_accepts = np.zeros(max_depth)
        self._req: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}

    def observe(self, req_id: Hashable, num_proposed: int, num_accepted: int) -> None:
        """One verification of a chain of ``num_proposed`` drafts whose first ``num_accepted`` were accepted."""
        if not 0 <= num_accepted <= num_proposed:
            raise ValueError(f"need 0 <= num_accepted <= num_proposed, got {num_accepted}, {num_proposed}")
        tested = min(num_proposed if num_accepted == num_proposed else num_accepted + 1, self.max_depth)
        if tested == 0:
            return
        outcome = np.zeros(tested)
        outcome[: min(num_accepted, tested)] = 1.0
        self._update(self._g_trials, self._g_accepts, outcome, self.global_decay)
        trials, accepts = self._req.setdefault(req_id, (np.zeros(self.max_depth), np.zeros(self.max_depth)))
        self._update(trials, accepts, outcome, self.decay)

    @staticmethod
    def _update(trials: np.ndarray, accepts: np.ndarray, outcome: np.ndarray, decay: float) -> None:
        t = outcome.shape[0]
        trials[:t] = decay * trials[:t] + 1.0
        accepts[:t] = decay * accepts[:t] + outcome

    def _global(self) -> np.ndarray:
        # Position 0 shrinks toward prior[0]; position j toward the estimate at j - 1 scaled by the
        # prior's ratio, so rarely tested deep positions follow what shallower ones have learned.
        m, prior = self.prior_strength, self._prior
        out = np.empty(self.max_depth)
        target = prior[0]
        for j in range(self.max_depth):
            if j:
                target = prior[j] if prior[j - 1] <= 0 else min(1.0, out[j - 1] * prior[j] / prior[j - 1])
            out[j] = (self._g_accepts[j] + m * target) / (self._g_trials[j] + m)
        return out

    def global_rates(self) -> list[float]:
        return self._global().tolist()

    def rates_array(self, req_ids: Sequence[Hashable]) -> np.ndarray:
        """Rates of several requests as a [len(req_ids), max_depth] array."""
        g = self._global()
        out = np.empty((len(req_ids), self.max_depth))
        m = self.request_strength
        for row, req_id in enumerate(req_ids):
            counts = self._req.get(req_id)
            out[row] = g if counts is None else (counts[1] + m * g) / (counts[0] + m)
        return np.clip(out, 0.0, 1.0)

    def rates(self, req_id: Hashable) -> list[float]:
        return self.rates_array([req_id])[0].tolist()

    def trials(self, req_id: Hashable) -> list[float]:
        """Decayed number of trials per position of a request (0 for an unknown request)."""
        counts = self._req.get(req_id)
        return [0.0] * self.max_depth if counts is None else counts[0].tolist()

    def forget(self, req_id: Hashable) -> None:
        self._req.pop(req_id, None)

    def __contains__(self, req_id: Hashable) -> bool:
        return req_id in self._req


# --------------------------------------------------------------------------- step costs

_GRID = np.arange(0.0, 20.25, 0.5)  # knots, log2 of token counts: 1 .. 2**20, half an octave apart
_GRID_X = 2.0 ** _GRID
_BINS = np.arange(0.0, 20.125, 0.25)  # observations are summarised per quarter octave
_BANDWIDTH = 0.75  # octaves: the Gaussian kernel of the local fits
_KERNEL_DATA = np.exp(-0.5 * ((_GRID[:, None] - _BINS[None, :]) / _BANDWIDTH) ** 2)
_SLOPE_RIDGE = 0.1  # weight (in observations) of the base's slope in each local fit
_BLEND = 0.5  # kernel-weighted observations at which a knot is half data, half base shape
REFIT_EVERY = 8  # once a curve has this many observations, it is refitted every this many more


def _isotonic(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [value, weight, size]
    for yi, wi in zip(y.tolist(), w.tolist()):
        blocks.append([yi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(int(n), v) for v, _, n in blocks])


class _Curve:
    """A positive, non-decreasing function of x >= 1, learned online on top of a base curve.

    Observations (x, y) are kept as decayed sufficient statistics per quarter-octave bin (decay
    applied to a bin on each of its own observations). At each half-octave knot g the prediction is
    a local *affine* least-squares fit y = a + b x (Gaussian kernel of 0.75 octave in log2 x) with
    a >= 0, b >= 0 and a weak ridge pulling b toward the slope of the base curve scaled to the
    data's level (base times the geometric-mean ratio observed / base), so a knot whose nearby
    observations all sit at one x takes the base's slope through them. An affine local model is the
    roofline's own shape (flat while memory-bound, linear once compute-bound), so it extrapolates
    sensibly an octave or two past the data — which is what lets a wrong prior be corrected from
    the step sizes the engine actually runs. In log space the knot's value is then blended, by the
    data's kernel mass m as m / (m + 0.5), with the base's shape anchored to the fits of the knots
    with m >= 0.5 (interpolated between them, constant ratio beyond them); far from any data the
    base's shape is kept. Isotonic regression makes the knots non-decreasing, and predictions
    interpolate between knots in log-log space.
    """

    def __init__(self, base: np.ndarray, decay: float) -> None:
        if base.shape != _GRID.shape or not np.all(np.isfinite(base)) or not np.all(base > 0):
            raise ValueError("base curve must be positive and finite on the grid")
        self.base = base
        self.log_base = np.log(base)
        self.base_slope = np.gradient(self.log_base, _GRID * math.log(2.0))  # d log y / d log x
        self.decay = decay
        # per bin: count, sum of log(y / base), then sums of x, x^2, y, x y
        self._sums = np.zeros((_BINS.shape[0], 6))
        self._observations = 0
        self._log_values: np.ndarray | None = None
        self._list: list[float] = []
        self._fitted_at = 0

    def observe(self, x: float, y: float) -> bool:
        if not (math.isfinite(y) and y > 0 and math.isfinite(x) and x > 0):
            return False
        x = max(x, 1.0)
        lx = min(math.log2(x), float(_BINS[-1]))
        row = self._sums[round(lx / 0.25)]
        row *= self.decay
        log_ratio = math.log(y) - float(np.interp(lx, _GRID, self.log_base))
        row += (1.0, log_ratio, x, x * x, y, x * y)
        self._observations += 1
        # refit lazily, and at most every REFIT_EVERY observations once warm: a fit costs ~0.1 ms of
        # numpy and one more sample barely moves it
        if self._log_values is not None and self._observations - self._fitted_at >= self._refit_every():
            self._log_values = None
        return True

    def _refit_every(self) -> int:
        return 1 if self._observations <= REFIT_EVERY else REFIT_EVERY

    def _values(self) -> np.ndarray:
        if self._log_values is None:
            self._log_values = self._fit()
            self._list = self._log_values.tolist()
            self._fitted_at = self._observations
        return self._log_values

    def _fit(self) -> np.ndarray:
        count = self._sums[:, 0]
        if count.sum() <= 1e-9:
            return self.log_base.copy()
        scaled = self.base * math.exp(self._sums[:, 1].sum() / count.sum())
        s = _KERNEL_DATA @ self._sums  # [knots, 6]
        x = _GRID_X  # solve in units of x / X_g for conditioning
        s0, sx, sxx, sy, sxy = s[:, 0], s[:, 2] / x, s[:, 3] / x ** 2, s[:, 4], s[:, 5] / x
        ridge, b_prior = _SLOPE_RIDGE, self.base_slope * scaled  # dy / d(x / X_g) of the scaled base
        sxx, sxy = sxx + ridge, sxy + ridge * b_prior
        det = s0 * sxx - sx * sx
        with np.errstate(divide="ignore", invalid="ignore"):
            a = (sy * sxx - sx * sxy) / det
            b = (s0 * sxy - sx * sy) / det
            flat = sy / s0  # best fit with b = 0
            through_origin = sxy / sxx  # best fit with a = 0
        a, b = np.where(b < 0, flat, a), np.maximum(b, 0.0)
        b = np.where(a < 0, through_origin, b)
        fit = np.maximum(a, 0.0) + b  # the fit at x = X_g, i.e. at 1 in scaled units
        fit = np.where(np.isfinite(fit) & (fit > 0) & (s0 > 1e-9), fit, scaled)
        mass = _KERNEL_DATA @ count
        blend = mass / (mass + _BLEND)
        # away from the data: the base's shape, anchored to the fits of the knots the data supports
        supported = mass >= _BLEND
        if supported.any():
            anchor = np.log(fit[supported]) - self.log_base[supported]
            target = self.log_base + np.interp(_GRID, _GRID[supported], anchor)
        else:
            target = np.log(scaled)
        log_values = blend * np.log(fit) + (1.0 - blend) * target
        return _isotonic(log_values, 1.0 + mass)

    def __call__(self, x: float) -> float:
        """Log-log interpolation between knots (plain Python: the policy calls this often)."""
        x = max(float(x), 1.0)
        self._values()
        values = self._list
        pos = math.log2(x) * 2.0
        last = len(values) - 1
        if pos >= last:  # past 2**20 tokens: linear in x
            return math.exp(values[last]) * x / float(_GRID_X[-1])
        i = int(pos)
        return math.exp(values[i] + (pos - i) * (values[i + 1] - values[i]))

    @property
    def observations(self) -> int:
        return self._observations


def _roofline(fixed_s: float, knee_tokens: float) -> np.ndarray:
    return fixed_s * (1.0 + _GRID_X / knee_tokens)


def _base_from_points(points: Iterable[tuple[float, float]], prior: np.ndarray) -> np.ndarray:
    """Log-log interpolation of measured (x, seconds) points on the grid; the prior's shape past the ends."""
    by_x: dict[float, list[float]] = {}
    for x, seconds in points:
        by_x.setdefault(math.log2(x), []).append(math.log(seconds))
    if not by_x:
        raise ValueError("no measured points")
    lx = np.array(sorted(by_x))
    ly = np.array([float(np.mean(by_x[v])) for v in lx])
    ly = _isotonic(ly, np.array([len(by_x[v]) for v in lx], dtype=float))
    log_prior = np.log(prior)
    inside = np.interp(_GRID, lx, ly)
    below = ly[0] + log_prior - np.interp(lx[0], _GRID, log_prior)
    above = ly[-1] + log_prior - np.interp(lx[-1], _GRID, log_prior)
    out = np.where(_GRID < lx[0], below, np.where(_GRID > lx[-1], above, inside))
    return np.exp(out)


class StepCostModel:
    """Online model of target verify time t(B, n) and draft time per drafted token d(B).

    Prior (no table): ``verify(T) = fixed_s * (1 + T / knee_tokens)`` with ``T = B * n``, and
    ``draft per token(B) = draft_ratio * verify(T = B)``. With ``from_table``, measured points
    replace the prior inside their range. Online observations correct either (see ``_Curve``);
    ``decay`` is applied per quarter-octave bin on each of its observations, so a bin remembers
    about 1 / (1 - decay) recent observations. ``draft_time`` is linear in the number of levels
    (a fixed per-call overhead, e.g. catching up on the emitted tokens, is folded into the rate).
    ``catch_up_time(N)`` is the draft's cost of first feeding N missed tokens in one eager forward;
    its base is ``catch_up_factor`` times the draft curve at N tokens (one level of N sequences,
    replayed from a graph where the table was measured), corrected online by ``observe_catch_up``.
    """

    def __init__(self, *, fixed_s: float = 0.02, knee_tokens: float = 128.0, draft_ratio: float = 0.1,
                 decay: float = 0.95, verify_points: Iterable[Sequence[float]] | None = None,
                 draft_points: Iterable[Sequence[float]] | None = None, catch_up_factor: float = 3.0) -> None:
        if not (fixed_s > 0 and knee_tokens > 0 and draft_ratio > 0 and catch_up_factor > 0):
            raise ValueError("fixed_s, knee_tokens, draft_ratio and catch_up_factor must be positive")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        prior = _roofline(fixed_s, knee_tokens)
        verify_base = prior
        if verify_points is not None:
            pts = [_check_point(row, 3, "verify") for row in verify_points]
            verify_base = _base_from_points(((b * n, s) for b, n, s in pts), prior)
        draft_base = draft_ratio * verify_base
        if draft_points is not None:
            pts = [_check_point(row, 2, "draft") for row in draft_points]
            draft_base = _base_from_points(pts, draft_ratio * prior)
        self._verify = _Curve(verify_base, decay)
        self._draft = _Curve(draft_base, decay)
        self._catch_up = _Curve(catch_up_factor * draft_base, decay)

    @classmethod
    def from_table(cls, table: Mapping | str | Path, **kwargs) -> StepCostModel:
        """Measured points: a dict or a JSON file ``{"verify": [[B, n, seconds], ...], "draft": [[B, seconds_per_token], ...]}``.

        Either key may be missing (the prior fills in); remaining keyword arguments go to the constructor.
        """
        if not isinstance(table, Mapping):
            table = json.loads(Path(table).read_text())
        unknown = set(table) - {"verify", "draft"}
        if unknown:
            raise ValueError(f"unknown keys in cost table: {sorted(unknown)}")
        return cls(verify_points=table.get("verify"), draft_points=table.get("draft"), **kwargs)

    # observations ---------------------------------------------------------------------------

    def observe_verify(self, batch_size: int, tokens_per_seq: float, seconds: float) -> None:
        """A verify step of ``batch_size`` sequences, ``tokens_per_seq`` tokens each (1 + drafts), took ``seconds``."""
        if batch_size >= 1 and tokens_per_seq >= 1:
            self._verify.observe(batch_size * tokens_per_seq, seconds)

    def observe_draft(self, batch_size: int, num_tokens: int, seconds: float) -> None:
        """Drafting ``num_tokens`` sequential levels for ``batch_size`` sequences took ``seconds``."""
        if batch_size >= 1 and num_tokens >= 1:
            self._draft.observe(batch_size, seconds / num_tokens)

    def observe_catch_up(self, num_tokens: int, seconds: float) -> None:
        """A draft call that first fed ``num_tokens`` tokens it had missed took ``seconds`` for that."""
        if num_tokens >= 1:
            self._catch_up.observe(num_tokens, seconds)

    # predictions ----------------------------------------------------------------------------

    def verify_time(self, batch_size: float, tokens_per_seq: float) -> float:
        """Seconds of one verify step over ``batch_size`` sequences of ``tokens_per_seq`` tokens (> 0)."""
        return self._verify(max(batch_size, 1.0) * max(tokens_per_seq, 1.0))

    def verify_time_for_tokens(self, num_tokens: float) -> float:
        """Seconds of one verify step feeding ``num_tokens`` tokens in all (ragged batches)."""
        return self._verify(num_tokens)

    def draft_time(self, batch_size: float, num_tokens: int) -> float:
        """Seconds to draft ``num_tokens`` sequential levels for ``batch_size`` sequences (0 for none)."""
        if num_tokens <= 0:
            return 0.0
        return num_tokens * self._draft(max(batch_size, 1.0))

    def catch_up_time(self, num_tokens: float) -> float:
        """Seconds for the draft to feed ``num_tokens`` missed tokens before drafting (0 for none)."""
        return self._catch_up(num_tokens) if num_tokens >= 1 else 0.0

    @property
    def num_observations(self) -> dict[str, int]:
        return {"verify": self._verify.observations, "draft": self._draft.observations,
                "catch_up": self._catch_up.observations}


def _check_point(row: Sequence[float], width: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in row)
    if len(values) != width:
        raise ValueError(f"{name} point {list(row)!r}: expected {width} numbers")
    *sizes, seconds = values
    if not all(math.isfinite(v) and v >= 1 for v in sizes) or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} point {list(row)!r}: sizes must be >= 1 and seconds > 0")
    return values


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Candidate:
    """The prediction for one batch-wide k (per-request k may be lower: caps, refinement)."""

    k: int
    expected_tokens: float  # per step, whole batch (accepted drafts + one target token each)
    draft_s: float
    verify_s: float
    step_s: float
    goodput: float  # expected_tokens / step_s, tokens per second
    num_draft_tokens: int  # sum of the per-request k
    resume_s: float = 0.0  # the draft's catch-up for this allocation, amortised per step (in step_s)


@dataclass(frozen=True)
class SpecDecision:
    """How many draft tokens each request gets this step, and everything the choice was made from.

    ``k`` is the batch-wide k; ``per_request[r] <= k``; ``draft_levels`` (the max of them) is how
    many sequential draft levels run. ``candidates`` holds the prediction of every k considered.
    """

    k: int
    per_request: dict
    batch_size: int
    candidates: tuple[Candidate, ...]
    reason: str
    reason_code: str  # "goodput" | "explore" | "fixed" | "capped" | "empty": a label-safe summary
    overlap: bool = False
    chosen: Candidate | None = None

    @property
    def draft_levels(self) -> int:
        return max(self.per_request.values(), default=0)

    @property
    def expected_tokens(self) -> float:
        return self.chosen.expected_tokens if self.chosen else 0.0

    @property
    def step_s(self) -> float:
        return self.chosen.step_s if self.chosen else 0.0

    @property
    def goodput(self) -> float:
        return self.chosen.goodput if self.chosen else 0.0

    def k_for(self, req_id: Hashable) -> int:
        return self.per_request.get(req_id, 0)

    def as_dict(self) -> dict:
        return {
            "k": self.k, "draft_levels": self.draft_levels, "batch_size": self.batch_size,
            "per_request": dict(self.per_request), "reason": self.reason, "reason_code": self.reason_code,
            "overlap": self.overlap, "expected_tokens": self.expected_tokens, "step_s": self.step_s,
            "goodput": self.goodput, "candidates": [vars(c).copy() for c in self.candidates],
        }


@dataclass
class _Batch:
    """Rates of one batch and the cost model; evaluates an allocation of per-request k."""

    ids: list
    rates: np.ndarray  # [B, D]
    costs: StepCostModel
    overlap: bool
    resume: np.ndarray | None = None  # [B] tokens the draft must catch up on before drafting for r
    left: float = math.inf  # mean tokens the requests may still emit (bounds the amortisation)
    cum: np.ndarray = field(init=False)  # cum[r, j] = P(first j + 1 drafts of r accepted)

    def __post_init__(self) -> None:
        self.cum = np.cumprod(self.rates, axis=1)

    def evaluate(self, k: int, per_req: np.ndarray) -> Candidate:
        batch = len(self.ids)
        depth = self.rates.shape[1]
        positions = np.arange(depth)
        mask = positions[None, :] < per_req[:, None]
        tokens = batch + float((self.cum * mask).sum())
        levels = int(per_req.max(initial=0))
        # requests still drafting at depth j = 1..levels
        level_sizes = np.cumsum(np.bincount(per_req, minlength=levels + 1)[::-1])[::-1][1:].tolist()
        draft = sum(self.costs.draft_time(size, 1) for size in level_sizes)
        verify = self.costs.verify_time_for_tokens(batch + int(per_req.sum()))
        if not self.overlap or levels == 0:
            step = draft + verify
        else:
            # The draft speculates the next chain while the target verifies this one; that work is
            # usable when the whole chain is accepted and the draft guessed the extra token too.
            rows = np.arange(batch)
            last = np.clip(per_req - 1, 0, depth - 1)
            nxt = np.clip(per_req, 0, depth - 1)
            hit = np.where(per_req > 0, self.cum[rows, last] * self.rates[rows, nxt], 1.0)
            p_any_miss = 1.0 - float(np.prod(hit))
            penalty = 0.0
            if p_any_miss > 0.0:
                misses = float((1.0 - hit).sum()) / p_any_miss  # expected misses, given at least one
                penalty = p_any_miss * self.costs.draft_time(max(1.0, misses), levels)
            step = max(draft, verify) + penalty
        resume_s = 0.0
        if self.resume is not None and levels > 0:
            missed = float(self.resume[per_req > 0].sum())
            if missed >= 1:
                # paid once, then the decision lasts about RESUME_HORIZON steps (fewer near the end)
                steps = min(RESUME_HORIZON, max(1.0, self.left * batch / tokens))
                resume_s = self.costs.catch_up_time(missed) / steps
                step += resume_s
        return Candidate(k=k, expected_tokens=tokens, draft_s=draft, verify_s=verify, step_s=step,
                         goodput=tokens / step, num_draft_tokens=int(per_req.sum()), resume_s=resume_s)


RESUME_HORIZON = 8.0  # steps a decision to resume drafting is expected to last (cf. the controller's reuse)
PROBE_RESUME_TOKENS = 64  # an explore probe drafts only for requests with at most this much to catch up
PROBE_BUDGET = 0.02  # a probe that needs a long catch-up waits until it costs at most this share of the time since the last


def _resume_array(ids: Sequence[Hashable], resume: Mapping[Hashable, int] | None) -> np.ndarray | None:
    if not resume:
        return None
    return np.array([max(0, int(resume.get(r, 0))) for r in ids], dtype=float)


def _mean_left(ids: Sequence[Hashable], caps: Mapping[Hashable, int] | None) -> float:
    """Mean tokens the requests may still emit (their caps; unbounded without)."""
    return float(np.mean([caps.get(r, math.inf) for r in ids])) if caps else math.inf


def _caps_array(ids: Sequence[Hashable], caps: Mapping[Hashable, int] | None, upper: int) -> np.ndarray:
    if caps is None:
        return np.full(len(ids), upper, dtype=int)
    return np.clip(np.array([caps.get(r, upper) for r in ids], dtype=int), 0, upper)


class GoodputPolicy:
    """Chooses the speculation length that maximises predicted goodput (SmartSpec-style).

    For each batch-wide k in ``[min_draft_tokens, max_draft_tokens]`` (each request capped by
    ``caps[r]``, e.g. the tokens it may still emit or has room for):

      expected tokens  E(k) = sum_r (1 + sum_{j<=k_r} prod_{i<=j} alpha_r,i)
      step time        taking turns:  draft(k) + verify(sum_r (1 + k_r))
                       overlap:       max(draft, verify) + P(any miss) * draft_time(E[misses | any], k)
      goodput          E(k) / step time

    where draft(k) sums one draft level per depth over the requests still drafting at that depth.
    Resuming: ``resume[r]`` (optional) is how many tokens the draft has not seen of request r (a
    prompt it never prefilled, or the tokens of steps it sat out while k was 0). Drafting for r
    first costs that catch-up, so each k > 0 candidate's step time also carries
    ``catch_up_time(sum of resume[r] over the requests it drafts for) / H``, with H the steps the
    decision is expected to last: ``RESUME_HORIZON``, fewer when the requests are nearly done.
    Switching speculation back on must therefore pay for itself over those steps.
    With ``overlap`` (PEARL-style: the draft speculates the next chain while the target verifies),
    request r's pre-drafted work is usable ("hit") with probability prod_{i<=k_r} alpha_r,i times
    alpha_r,k_r+1 (the draft also guessed the extra target token); on a miss the draft redrafts
    after the verdict, and that redraft cannot overlap.

    Per-request refinement (``refine=True``): after the batch-wide prediction, request r keeps only
    draft depths j whose expected yield prod_{i<=j} alpha_r,i is at least
    ``max(min_yield, goodput * marginal verify seconds per token)`` — a token must pay for the
    verify time it adds — and the refined allocation is kept only when its predicted goodput is
    higher. The best k wins; the previous k is kept while it is within ``hysteresis`` of the best
    (to avoid flapping on estimation noise).

    Exploration: the cost model only learns the step sizes the engine runs and trusts its local
    fits for an octave or two around them, so a k that a wrong prior makes look bad might never be
    run and never be corrected. Every ``explore_every``-th decision (0 = never) therefore runs a
    neighbour of the best k instead (alternately k - 1 and k + 1, every request at that k, no
    refinement), with reason code ``explore``; it does not change the k hysteresis keeps. A probe
    drafts only for the requests with at most ``PROBE_RESUME_TOKENS`` to catch up on; when there
    are none, for the one with the fewest, and only once that catch-up costs at most
    ``PROBE_BUDGET`` of the predicted time since the last probe (it waits until then), so that
    learning never costs a batch of prompt prefills nor a prefill every few steps.
    """

    def __init__(self, estimator: AcceptanceEstimator, costs: StepCostModel, max_draft_tokens: int,
                 overlap: bool = False, min_draft_tokens: int = 0, *, refine: bool = True,
                 min_yield: float = 0.02, hysteresis: float = 0.02, explore_every: int = 50) -> None:
        if not 0 <= min_draft_tokens <= max_draft_tokens:
            raise ValueError(f"need 0 <= min_draft_tokens <= max_draft_tokens, got {min_draft_tokens}, {max_draft_tokens}")
        if max_draft_tokens > estimator.max_depth:
            raise ValueError(f"max_draft_tokens {max_draft_tokens} exceeds the estimator's max_depth {estimator.max_depth}")
        self.estimator, self.costs = estimator, costs
        self.max_draft_tokens, self.min_draft_tokens = max_draft_tokens, min_draft_tokens
        self.overlap, self.refine = overlap, refine
        self.min_yield, self.hysteresis = min_yield, hysteresis
        self.explore_every = explore_every
        self._last_k: int | None = None
        self._since_probe = 0  # decisions since the last probe
        self._elapsed_s = 0.0  # their predicted step time (a decision the controller reuses counts once)
        self._probes = 0

    def choose(self, req_ids: Iterable[Hashable], caps: Mapping[Hashable, int] | None = None,
               resume: Mapping[Hashable, int] | None = None) -> SpecDecision:
        """Draft tokens per request for the next step.

        ``caps[r]`` (optional, per request) is a hard upper bound — e.g. the tokens r may still emit
        or has context room for — and wins over ``min_draft_tokens``; requests not in ``caps`` are
        capped by ``max_draft_tokens`` only. ``resume[r]`` (optional): tokens of r the draft must
        catch up on before it can draft for r (absent: none).
        """
        ids = list(req_ids)
        if not ids:
            return SpecDecision(0, {}, 0, (), "empty batch", "empty", self.overlap)
        cap = _caps_array(ids, caps, self.max_draft_tokens)
        if not cap.any():
            only = _Batch(ids, self.estimator.rates_array(ids), self.costs, self.overlap).evaluate(0, cap)
            return SpecDecision(0, dict.fromkeys(ids, 0), len(ids), (only,), "every request capped at k=0",
                                "capped", self.overlap, only)
        resume_arr = _resume_array(ids, resume)
        batch = _Batch(ids, self.estimator.rates_array(ids), self.costs, self.overlap, resume_arr, _mean_left(ids, caps))
        candidates, allocations, plain = [], {}, {}
        for k in range(self.min_draft_tokens, self.max_draft_tokens + 1):
            per_req = np.minimum(cap, k)
            best = plain[k] = batch.evaluate(k, per_req)
            if self.refine and k > 0:
                refined = self._refine(batch, k, per_req, best)
                if refined is not None and refined[0].goodput > best.goodput:
                    best, per_req = refined
            candidates.append(best)
            allocations[k] = per_req
        top = max(candidates, key=lambda c: c.goodput)
        chosen, note = top, ""
        if self._last_k is not None and self._last_k != top.k:
            previous = next((c for c in candidates if c.k == self._last_k), None)
            if previous is not None and previous.goodput >= (1.0 - self.hysteresis) * top.goodput:
                chosen = previous
                note = f"; kept k={previous.k} (within {self.hysteresis:.0%} of k={top.k})"
        self._last_k = chosen.k
        reason, code = self._reason(chosen, candidates) + note, "goodput"
        self._since_probe += 1
        self._elapsed_s += chosen.step_s
        probe = self._probe(chosen.k)
        alloc = None if probe is None else self._probe_allocation(probe, np.minimum(cap, probe), resume_arr)
        if alloc is not None:  # unrefined, so that the probe really runs k tokens for each request it drafts for
            self._since_probe, self._elapsed_s, self._probes = 0, 0.0, self._probes + 1
            best = chosen
            chosen = plain[probe] if np.array_equal(alloc, np.minimum(cap, probe)) else batch.evaluate(probe, alloc)
            allocations[probe] = alloc
            reason = (f"explore k={probe} (every {self.explore_every} steps): predicted {chosen.goodput:.0f} tok/s "
                      f"vs {best.goodput:.0f} at k={best.k}")
            code = "explore"
        per_request = {r: int(v) for r, v in zip(ids, allocations[chosen.k])}
        return SpecDecision(chosen.k, per_request, len(ids), tuple(candidates), reason, code, self.overlap, chosen)

    def _probe(self, best: int) -> int | None:
        """The k to probe now (None: no probe is due)."""
        if not self.explore_every or self._since_probe < self.explore_every:
            return None
        low, high = self.min_draft_tokens, self.max_draft_tokens
        order = (best + 1, best - 1) if self._probes % 2 else (best - 1, best + 1)
        return next((k for k in order if low <= k <= high), None)

    def _probe_allocation(self, probe: int, alloc: np.ndarray, resume: np.ndarray | None) -> np.ndarray | None:
        """Who drafts in a probe of ``probe`` tokens (None: not yet, its catch-up is too dear)."""
        if resume is None or probe == 0:
            return alloc
        cheap = resume <= PROBE_RESUME_TOKENS
        if not cheap.any():  # every request needs a long catch-up: the cheapest one, once it is affordable
            one = int(np.argmin(np.where(alloc > 0, resume, np.inf)))
            if self.costs.catch_up_time(float(resume[one])) > PROBE_BUDGET * self._elapsed_s:
                return None
            cheap = np.arange(len(resume)) == one
        return np.where(cheap, alloc, 0)

    def _refine(self, batch: _Batch, k: int, per_req: np.ndarray, current: Candidate):
        tokens = len(batch.ids) + int(per_req.sum())
        fewer = max(len(batch.ids), tokens - len(batch.ids))
        marginal = 0.0
        if tokens > fewer:
            marginal = (self.costs.verify_time_for_tokens(tokens) - self.costs.verify_time_for_tokens(fewer)) / (tokens - fewer)
        threshold = max(self.min_yield, current.goodput * marginal)
        worth = (batch.cum[:, :k] >= threshold).sum(axis=1)  # cum is non-increasing in depth
        refined = np.minimum(per_req, np.maximum(worth, self.min_draft_tokens))
        if np.array_equal(refined, per_req):
            return None
        return batch.evaluate(k, refined), refined

    @staticmethod
    def _reason(chosen: Candidate, candidates: list[Candidate]) -> str:
        others = [c for c in candidates if c.k != chosen.k]
        if not others:
            return f"goodput {chosen.goodput:.0f} tok/s at k={chosen.k} (only candidate)"
        if chosen.k > 0:
            base = next((c for c in others if c.k == 0), None) or min(others, key=lambda c: c.k)
            return f"goodput {chosen.goodput:.0f} tok/s at k={chosen.k} vs {base.goodput:.0f} at k={base.k}"
        drafting = [c for c in others if c.num_draft_tokens > 0]
        if not drafting:
            return f"goodput {chosen.goodput:.0f} tok/s at k=0: no draft token pays for its verify time"
        rival = max(drafting, key=lambda c: c.goodput)
        return (f"goodput {chosen.goodput:.0f} tok/s at k=0 vs {rival.goodput:.0f} at k={rival.k}, "
                f"the best speculative choice")


class FixedPolicy:
    """A fixed k for every request (``adaptive=False``), with ``GoodputPolicy``'s interface.

    Given an estimator and a cost model, the decision also carries the predicted goodput of that k.
    """

    def __init__(self, k: int, estimator: AcceptanceEstimator | None = None, costs: StepCostModel | None = None,
                 overlap: bool = False) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.max_draft_tokens = self.min_draft_tokens = k
        self.estimator, self.costs, self.overlap = estimator, costs, overlap

    def choose(self, req_ids: Iterable[Hashable], caps: Mapping[Hashable, int] | None = None,
               resume: Mapping[Hashable, int] | None = None) -> SpecDecision:
        ids = list(req_ids)
        k = self.max_draft_tokens
        if not ids:
            return SpecDecision(0, {}, 0, (), "empty batch", "empty", self.overlap)
        per_req = _caps_array(ids, caps, k)
        chosen = None
        if self.estimator is not None and self.costs is not None:
            rates = self.estimator.rates_array(ids)
            if rates.shape[1] < k:  # deeper than the estimator tracks: repeat its last position
                rates = np.concatenate([rates, np.repeat(rates[:, -1:], k - rates.shape[1], axis=1)], axis=1)
            chosen = _Batch(ids, rates, self.costs, self.overlap, _resume_array(ids, resume),
                            _mean_left(ids, caps)).evaluate(k, per_req)
        reason = f"fixed k={k} (adaptive off)"
        if chosen is not None:
            reason += f", predicted goodput {chosen.goodput:.0f} tok/s"
        return SpecDecision(k, {r: int(v) for r, v in zip(ids, per_req)}, len(ids),
                            (chosen,) if chosen else (), reason, "fixed", self.overlap, chosen)
