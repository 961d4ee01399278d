"""The configuration of a benchmark run and the greedy match check (pure Python, no torch).

``BenchConfig`` fields map one to one onto ``outrider bench`` flags. ``greedy_match`` compares a
configuration's greedy outputs with target-only decoding, token for token (PROTOCOL rule 3).
``arrival_times`` gives the seeded open-loop arrival schedule of the Poisson (or bursty) sweep.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

OURS_SCENARIOS = ("ours-target-only", "ours-spec")
HF_SCENARIOS = ("hf-target-only", "hf-assisted", "hf-lookup", "hf-compiled")
CLUSTER_SCENARIOS = ("cluster-target-only", "cluster-colocated-turns", "cluster-colocated-overlap",
                     "cluster-separate-turns", "cluster-separate-overlap")
SCENARIOS = ("cost-curve", *OURS_SCENARIOS, *HF_SCENARIOS, *CLUSTER_SCENARIOS)
DEMO = "demo"


@dataclass
class BenchConfig:
    """Everything one run needs; ``outrider bench`` flags map one to one onto these fields."""

    models: list[str] = field(default_factory=lambda: [DEMO])  # "demo", a path, or "shape:NAME"; "@d1,d2" = drafts
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    drafts: list[str] | None = None  # default: per model (see default_drafts)
    cluster_draft: str | None = None  # the cluster rows' draft; default: see runner.cluster_draft
    num_draft_tokens: int = 4
    adaptive: str = "off"  # cluster speculation length: off (fixed k) | on | both
    step_transport: str = "socket"  # how the cluster rows' engine calls its workers: socket | ray | both
    run_ahead: str = "on"  # cluster rows: the target runs plain decode steps ahead (on | off | both)
    capture_at_start: bool = False  # cluster rows: workers capture their decode/verify graphs at start
    fused_kernels: bool = False  # layers' element-wise chains fused by torch.compile (ours and cluster rows)
    draft_link: str = "auto"  # separate-GPU rows' draft link: auto (NCCL between GPUs) | gloo | both
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    max_tokens: int = 64
    max_prompt_tokens: int = 512
    prompts_file: str | None = None
    per_category: int | None = 1
    categories: list[str] | None = None
    repetitions: int = 3
    warmup: bool = True
    device: str | None = None
    dtype: str | None = None
    tokenizer: str | None = None  # tokenizer for checkpoints without one (shapes)
    shape_dir: str | None = None
    seed: int = 0
    num_gpus: int | None = None  # GPUs declared for a local Ray (fake GPUs on CPU)
    cpus_per_worker: float = 1.0
    cost_batches: list[int] = field(default_factory=lambda: [1, 4, 16])
    cost_tokens: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    cost_context: int = 256
    # the cluster rows' cost table (adaptive speculation): None = the policy's prior, corrected online;
    # "measured" = this run's cost curve of that model (cost-curve scenario); else a JSON file
    cluster_cost_table: str | None = None
    # hf-compiled (static cache + torch.compile reduce-overhead): auto = on CUDA only (skipped on CPU,
    # where transformers does not compile and inductor is slow), on = also on CPU, off = skipped
    hf_compile: str = "auto"
    # open-loop arrivals for the cluster rows, after their closed-loop sweep (requests per second)
    arrival_rates: list[float] = field(default_factory=list)
    arrival_requests: int = 16  # requests per rate
    arrival_cv: float = 1.0  # coefficient of variation of the gaps: 1 = Poisson, > 1 = bursty (gamma)
    slo_ttft_s: float = 0.5
    slo_tpot_s: float = 0.1
    slo_attainment: float = 0.9  # goodput: the highest rate at which this share of requests meets both SLOs
    time_limit_s: float | None = None
    name: str = "bench"
    out_dir: str | None = None
    plots: bool = True

    def validate(self) -> None:
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
        if self.adaptive not in ("off", "on", "both"):
            raise ValueError(f"adaptive must be off, on or both, got {self.adaptive!r}")
        if self.draft_link not in ("auto", "gloo", "both"):
            raise ValueError(f"draft_link must be auto, gloo or both, got {self.draft_link!r}")
        if self.run_ahead not in ("on", "off", "both"):
            raise ValueError(f"run_ahead must be on, off or both, got {self.run_ahead!r}")
        if self.step_transport not in ("socket", "ray", "both"):
            raise ValueError(f"step_transport must be socket, ray or both, got {self.step_transport!r}")
        for name, value in (("repetitions", self.repetitions), ("max_tokens", self.max_tokens),
                            ("num_draft_tokens", self.num_draft_tokens), ("max_prompt_tokens", self.max_prompt_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.hf_compile not in ("auto", "on", "off"):
            raise ValueError(f"hf_compile must be auto, on or off, got {self.hf_compile!r}")
        if any(not (math.isfinite(r) and r > 0) for r in self.arrival_rates):
            raise ValueError(f"arrival rates must be positive requests per second, got {self.arrival_rates}")
        if self.arrival_requests < 1:
            raise ValueError(f"arrival_requests must be >= 1, got {self.arrival_requests}")
        if not (math.isfinite(self.arrival_cv) and self.arrival_cv > 0):
            raise ValueError(f"arrival_cv must be > 0, got {self.arrival_cv}")
        if not (self.slo_ttft_s > 0 and self.slo_tpot_s > 0):
            raise ValueError(f"SLOs must be > 0, got TTFT {self.slo_ttft_s} s, TPOT {self.slo_tpot_s} s")
        if not 0.0 < self.slo_attainment <= 1.0:
            raise ValueError(f"slo_attainment must be in (0, 1], got {self.slo_attainment}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def greedy_match(reference: list[list[int]], outputs: list[list[int]], prompt_index: list[int]) -> dict:
    """Token-for-token comparison with the target-only reference: mismatched requests, and the
    reference tokens not reproduced before the first divergence (0 = identical)."""
    mismatched, matched, total = 0, 0, 0
    first_divergence = []
    for i, out in enumerate(outputs):
        ref = reference[prompt_index[i]]
        n = 0
        while n < min(len(ref), len(out)) and ref[n] == out[n]:
            n += 1
        total += len(ref)
        matched += n
        if list(out) != list(ref):
            mismatched += 1
            first_divergence.append(n)
    return {"requests": len(outputs), "mismatched_requests": mismatched, "reference_tokens": total,
            "matched_tokens": matched, "mismatched_tokens": total - matched,
            "match_rate": matched / total if total else 1.0, "first_divergence": first_divergence}


def arrival_times(rate: float, n: int, *, seed: int = 0, cv: float = 1.0) -> list[float]:
    """Seeded arrival offsets in seconds (increasing) of ``n`` requests at ``rate`` per second.

    The gaps are exponential (a Poisson process) for ``cv == 1``, else gamma with that coefficient
    of variation (shape 1/cv², same mean 1/rate): ``cv > 1`` is bursty. The same (rate, n, seed,
    cv) gives the same schedule in every run; the first request arrives after one gap."""
    if not (rate > 0 and math.isfinite(rate)) or n < 0 or not cv > 0:
        raise ValueError(f"rate must be > 0, n >= 0, cv > 0 (got {rate}, {n}, {cv})")
    rng = random.Random(f"outrider-arrivals:{seed}:{float(rate)!r}:{float(cv)!r}")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate) if cv == 1.0 else rng.gammavariate(1.0 / cv ** 2, cv ** 2 / rate)
        out.append(t)
    return out
