"""``outrider bench``: the benchmark harness (control plane; runs models only through the data
plane's entry points and the cluster's Python API).

One process run measures, on one device, with the same weights, prompts and limits
(``../shared/bench/PROTOCOL.md``): our reference loop target-only and with each proposer, the
cluster (target-only; draft colocated taking turns or overlapping; draft on its own GPU) under a
closed loop of N clients and, optionally, open-loop Poisson (or bursty) arrivals per rate with
TTFT / TPOT percentiles and goodput against SLOs, Hugging Face ``generate`` baselines (target-only,
``assistant_model=``, ``prompt_lookup_num_tokens=``, and static cache + ``torch.compile``), the
target's step-cost curve, and the device's floor (copy bandwidth, matmul rate). It writes
``results.json``, ``results.md``, PNG plots and ``cost_table-<model>.json`` (the measured step
costs in ``StepCostModel.from_table``'s format, to seed adaptive speculation) under
``benchmarks/results/<date>-<name>/``.

    from cluster.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig(models=["shape:1B"], concurrency=[1, 4]))

Modules: ``config`` (settings, greedy match, arrival schedules), ``runner`` (orchestration),
``scenarios`` (the measured runs), ``models`` (shape checkpoints), ``workload`` (Spec-Bench
prompts), ``floor`` (device floor), ``report`` (JSON, Markdown, plots, cost table); emulated
acceptance is ``actors.spec.oracle``.
"""

from cluster.bench.config import SCENARIOS, BenchConfig, arrival_times, greedy_match


def run_bench(config: BenchConfig) -> dict:
    """Run the benchmark; returns the results (also written under ``results["out_dir"]``)."""
    from cluster.bench.runner import run_bench as _run

    return _run(config)


__all__ = ["SCENARIOS", "BenchConfig", "arrival_times", "greedy_match", "run_bench"]
