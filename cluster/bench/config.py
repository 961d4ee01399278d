"""The configuration of a benchmark run and the greedy match check (pure Python, no torch).

``BenchConfig`` fields map one to one onto ``outrider bench`` flags. ``greedy_match`` compares a
configuration's greedy outputs with target-only decoding, token for token (PROTOCOL rule 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

OURS_SCENARIOS = ("ours-target-only", "ours-spec")
HF_SCENARIOS = ("hf-target-only", "hf-assisted", "hf-lookup")
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
        for name, value in (("repetitions", self.repetitions), ("max_tokens", self.max_tokens),
                            ("num_draft_tokens", self.num_draft_tokens), ("max_prompt_tokens", self.max_prompt_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
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
