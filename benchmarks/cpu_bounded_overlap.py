"""CPU: overlap (PEARL) with a slow draft on its own device — taking turns vs unbounded vs bounded
speculation (benchmark).

The draft-on-its-own-GPU run on 2×H200 showed overlap losing to taking turns (1.17× vs 1.20×): the
1B-shape draft's k + 1 speculated levels (~12 ms) outlast the 8B target's verify (9.5 ms), and a
miss then waits for the whole speculation before drafting afresh. This reproduces that regime on
CPU — a target of 8 layers, an emulated α = 0.8 draft running the target's first 6 layers (its cost
real, its tokens the target's own with a seeded error rate), k = 4, batch 1, greedy, the draft in
its own process on its own core ("GPU" via Ray's fake GPUs: ``draft_gpus=1``) — and compares, in
one process with alternating repeats: taking turns (``overlap: false``), overlap with unbounded
speculation (the old behaviour: the engine's verify-time budget withheld), and overlap bounded by
the verify (the default). Outputs must equal target-only decoding.

Writes ``result.json`` and ``README.md`` under ``benchmarks/results/<date>-cpu-bounded-overlap/``.

    python benchmarks/cpu_bounded_overlap.py [--tokens 120] [--repeats 5]
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

PROMPT = [11, 57, 203, 9, 150, 33, 7, 98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=120, help="tokens per generation (default 120)")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per configuration (default 5)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from actors.model.loader import load_model
    from actors.spec.reference import generate
    from actors.spec.types import SamplingParams
    from cluster.cluster import Cluster
    from cluster.config import ClusterConfig
    from tests.tiny_models import write_tiny_checkpoint

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="outrider-bench-"))
    ckpt = write_tiny_checkpoint(work / "target", num_layers=8, hidden_size=256, intermediate_size=768,
                                 num_attention_heads=8, num_key_value_heads=4, with_tokenizer=False)
    params = SamplingParams(max_tokens=args.tokens)
    want = generate(load_model(ckpt), [PROMPT], params)[0].token_ids
    recorded = work / "continuations.json"
    recorded.write_text(json.dumps([{"prompt": PROMPT, "output": list(want)}]))
    ray.init(address="local", num_cpus=2, num_gpus=6, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)
    common = dict(target=str(ckpt), draft="oracle:0.8:self:6", oracle_continuations=str(recorded),
                  num_draft_tokens=4, adaptive=False, draft_gpus=1, cpus_per_worker=0,
                  kv_budget_tokens=4096, dtype="float32", start_timeout_s=120)
    configs = {"turns": dict(overlap=False), "overlap-unbounded": dict(overlap=True),
               "overlap-bounded": dict(overlap=True)}
    clusters = {}
    for name, fields in configs.items():
        print(f"[bench] starting {name}", flush=True)
        cluster = Cluster.start(ClusterConfig(**common, **fields))
        if name == "overlap-unbounded":
            cluster.engine._speculation_budget = lambda: None  # the draft speculates k + 1 levels
        clusters[name] = cluster
        list(cluster.generate_sync(PROMPT, params))  # warm-up
    walls = {name: [] for name in configs}
    outs = {}
    for rep in range(args.repeats):
        for name, cluster in clusters.items():
            t0 = time.perf_counter()
            out = list(cluster.generate_sync(PROMPT, params))[-1]
            walls[name].append((time.perf_counter() - t0) / len(out.token_ids))
            outs[name] = out
        print(f"[bench] repeat {rep + 1}/{args.repeats} done", flush=True)
    rows = []
    for name, cluster in clusters.items():
        m = cluster.engine.metrics
        w = sorted(walls[name])
        rows.append({
            "config": name, "ms_per_token_median": 1e3 * statistics.median(w), "ms_per_token_min": 1e3 * w[0],
            "ms_per_token_max": 1e3 * w[-1], "mean_accepted_length": outs[name].stats["mean_accepted_length"],
            "overlap_hits": m.get("outrider_overlap_speculations_total", outcome="hit") or 0,
            "overlap_misses": m.get("outrider_overlap_speculations_total", outcome="miss") or 0,
            "extended": m.get("outrider_overlap_extended_total") or 0,
            "greedy_equal": list(outs[name].token_ids) == list(want)})
        cluster.shutdown()
    ray.shutdown()
    base = rows[0]["ms_per_token_median"]
    for r in rows:
        r["speedup_vs_turns"] = base / r["ms_per_token_median"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": dt.date.today().isoformat(), "commit": commit, "machine": platform.platform(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__, "tokens": args.tokens,
              "repeats": args.repeats, "rows": rows}
    out = ROOT / "benchmarks" / "results" / f"{result['date']}-cpu-bounded-overlap"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Overlap with a slow draft on its own device, CPU ({result['date']}, commit {commit[:10]})", "",
             f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}. "
             "Target: random 8-layer Llama shape (hidden 256); draft: its first 6 layers with emulated "
             f"α = 0.8 (oracle), k = 4, on its own process and core; batch 1, greedy, {args.tokens} tokens, "
             f"{args.repeats} alternating repeats.", "",
             "| configuration | ms/token median (min-max) | vs turns | τ | overlap hits / misses | hits extended | "
             "greedy = target-only |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['ms_per_token_median']:.2f} ({r['ms_per_token_min']:.2f}-"
                     f"{r['ms_per_token_max']:.2f}) | {r['speedup_vs_turns']:.2f}x | {r['mean_accepted_length']:.2f} | "
                     f"{r['overlap_hits']:.0f} / {r['overlap_misses']:.0f} | {r['extended']:.0f} | {r['greedy_equal']} |")
    lines += ["", "Counters are totals over the warm-up and every repeat of that configuration."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
