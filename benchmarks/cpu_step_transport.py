"""CPU: the engine's per-step call to its workers as a Ray actor call vs over the step channel (benchmark).

One process, one local Ray instance, one tiny random checkpoint written by transformers (Llama
shape, 2 layers), batch 1, greedy, ``ignore_eos``: the cluster engine decodes the same prompt with
``step_transport: ray`` (an actor call per step, the baseline) and ``step_transport: socket`` (the
step channel), target-only and with a self-speculative draft (``self:1``, overlap, adaptive). The
configurations alternate over the repeats so drift on a shared machine hits each alike. Per
configuration: the median and min-max wall time per engine step (generation wall time / target
forward passes), and from the engine's metrics the mean engine step and the target's own step time,
whose difference is the control plane's share. Outputs must be token-identical across transports.

Writes ``result.json`` and ``README.md`` under ``benchmarks/results/<date>-cpu-step-transport/``.

    python benchmarks/cpu_step_transport.py [--tokens 300] [--repeats 5]

This measures the control plane on a CPU machine (2 cores on CI); the GPU hosts' figures come from
``outrider bench`` (``benchmarks/gpu_*_run.sh``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _metric(snapshot: dict, name: str) -> float:
    return float(snapshot.get(name, 0.0))


def run_one(cluster, tokens: int) -> tuple[float, int, list[int]]:
    from actors.spec.types import SamplingParams

    start = time.perf_counter()
    out = list(cluster.generate_sync([5, 6, 7, 8], SamplingParams(max_tokens=tokens), ignore_eos=True))[-1]
    return time.perf_counter() - start, out.stats["target_forward_passes"], list(out.token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300, help="tokens per generation (default 300)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per configuration (default 5)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import torch

    from cluster.cluster import Cluster
    from cluster.config import ClusterConfig
    from tests.tiny_models import write_tiny_checkpoint

    torch.set_num_threads(1)
    ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="outrider-bench-")) / "tiny", num_layers=2)
    ray.init(address="local", num_cpus=2, num_gpus=8, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    configs = [(draft, transport) for draft in ("none", "self:1") for transport in ("ray", "socket")]
    clusters = {}
    for draft, transport in configs:
        print(f"[bench] starting draft={draft} step_transport={transport}", flush=True)
        clusters[(draft, transport)] = Cluster.start(ClusterConfig(
            target=str(ckpt), draft=draft, num_draft_tokens=3, cpus_per_worker=0, kv_budget_tokens=4096,
            step_transport=transport, start_timeout_s=60))
        run_one(clusters[(draft, transport)], 32)  # warm-up
    walls = {c: [] for c in configs}
    outputs = {c: None for c in configs}
    for rep in range(args.repeats):
        for c in configs:
            wall, passes, ids = run_one(clusters[c], args.tokens)
            walls[c].append(wall / passes)
            outputs[c] = ids
        print(f"[bench] repeat {rep + 1}/{args.repeats} done", flush=True)
    rows = []
    for c in configs:
        snap = clusters[c].metrics_snapshot()
        steps = _metric(snap, "outrider_engine_step_seconds_count")
        engine_s = _metric(snap, "outrider_engine_step_seconds_sum") / max(steps, 1)
        verify_s = _metric(snap, "outrider_verify_step_seconds_sum") / max(_metric(snap, "outrider_verify_step_seconds_count"), 1)
        w = sorted(walls[c])
        rows.append({"draft": c[0], "step_transport": c[1], "wall_ms_per_step_median": 1e3 * statistics.median(w),
                     "wall_ms_per_step_min": 1e3 * w[0], "wall_ms_per_step_max": 1e3 * w[-1],
                     "engine_step_ms_mean": 1e3 * engine_s, "target_step_ms_mean": 1e3 * verify_s,
                     "control_share": 1 - verify_s / engine_s if engine_s else None})
    for c in configs:
        clusters[c].shutdown()
    ray.shutdown()
    same = {d: outputs[(d, "ray")] == outputs[(d, "socket")] for d in ("none", "self:1")}
    for d in ("none", "self:1"):
        base = next(r for r in rows if r["draft"] == d and r["step_transport"] == "ray")
        for r in rows:
            if r["draft"] == d:
                r["speedup_vs_ray"] = base["wall_ms_per_step_median"] / r["wall_ms_per_step_median"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": dt.date.today().isoformat(), "commit": commit, "machine": platform.platform(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "ray": ray.__version__, "tokens": args.tokens, "repeats": args.repeats, "rows": rows,
              "outputs_identical_across_transports": same}
    out = ROOT / "benchmarks" / "results" / f"{result['date']}-cpu-step-transport"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Step transport on CPU ({result['date']}, commit {commit[:10]})", "",
             f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}; "
             f"tiny 2-layer Llama-shape random checkpoint, batch 1, greedy, {args.tokens} tokens, "
             f"{args.repeats} repeats (alternating).", "",
             "| draft | step transport | ms/step median (min-max) | vs ray | engine step ms | target step ms | control share |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['draft']} | {r['step_transport']} | {r['wall_ms_per_step_median']:.2f} "
                     f"({r['wall_ms_per_step_min']:.2f}-{r['wall_ms_per_step_max']:.2f}) | {r['speedup_vs_ray']:.2f}x | "
                     f"{r['engine_step_ms_mean']:.2f} | {r['target_step_ms_mean']:.2f} | {r['control_share']:.0%} |")
    lines += ["", f"Greedy outputs identical across transports: {same}.", "",
              "Control share = 1 - target step / engine step (the engine step includes the call to the workers "
              "and back). The self-draft on a random tiny model is rarely accepted, so the adaptive policy mostly "
              "chooses k = 0: that row measures the control plane with a draft attached."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
