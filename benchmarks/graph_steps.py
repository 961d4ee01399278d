"""Decode and verify step time on a GPU: eager vs CUDA-graph replay (GraphRunner) (benchmark).

For each model shape (random bf16 weights, written as a checkpoint with transformers in this run and
loaded through ``load_model``) and each scenario — decode (1 new token per sequence, one logit row)
and chain verify (1 + 4 tokens per sequence, every logit row) at batch 1, 8 and 32 — with every
sequence holding ``--context`` committed tokens in the paged KV cache:

* **step**: the whole step as a worker runs it, host clock: build the step metadata (appending to
  the cache), forward, argmax of the logits to the host (the sync a verifier does), and rollback
  (``commit(req, [])``) so every repeat sees the same context. Eager = ``StepBatch.build`` +
  ``model.forward``; graph = ``GraphRunner.build`` + ``GraphRunner.forward``.
* **device**: the forward alone, back to back on a prebuilt batch, timed with CUDA events
  (``--device-iters`` forwards per timing): the GPU's time per step when the host keeps up, or
  the host's launch rate when it does not (eager).

Eager and graph blocks alternate (``--rounds``), so drift hits both alike. Reported: medians with
min–max, and each figure as a fraction of its floor — bytes a step must read (every weight once,
the embedding's rows aside, plus the KV of every sequence) over the device-to-device copy bandwidth
measured in this run (bytes read + written). The bf16 matmul rate is measured too. Graph logits
are checked against eager ones on every scenario (argmax agreement, max |Δ|).

Writes ``result.json`` and ``README.md`` under ``--out`` (default
``benchmarks/results/<date>-<gpu>-graph-steps/``). Needs torch + transformers, no Ray.

    python benchmarks/graph_steps.py [--models smollm2-135m,llama-3.2-1b] [--batches 1,8,32]
    python benchmarks/graph_steps.py --device cpu --models tiny   # a dry run of the code paths
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
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.model.graph_runner import GraphRunner  # noqa: E402
from actors.model.loader import load_model  # noqa: E402
from actors.step_batch import SeqStep, StepBatch  # noqa: E402

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # a dry-run shape for CPU
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
SCENARIOS = (("decode", 1, "last"), ("verify 1+4", 5, "all"))


def write_checkpoint(name: str, directory: Path, device: str) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[name], bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(directory))
    del model
    return directory


def copy_bandwidth(device: str, num_bytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of ``iters``."""
    src = torch.randn(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    times = [_device_time(lambda: dst.copy_(src), device) for _ in range(iters + 2)][2:]
    return 2 * num_bytes / statistics.median(times)


def matmul_rate(device: str, n: int = 8192, iters: int = 10) -> float:
    """bf16 matmul FLOP/s (random inputs), median of ``iters``."""
    if device != "cuda":
        n = 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = [_device_time(lambda: a @ b, device) for _ in range(iters + 2)][2:]
    return 2 * n**3 / statistics.median(times)


def _device_time(fn, device: str, repeat: int = 1) -> float:
    """Seconds per call of ``fn`` (``repeat`` back to back), CUDA events on a GPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stats(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


@torch.inference_mode()
def bench_model(name: str, args, bandwidth: float) -> dict:
    device = args.device
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        path = write_checkpoint(name, Path(tmp), device)
        t_write = time.perf_counter() - t0
        model = load_model(path, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    t_load = time.perf_counter() - t0 - t_write
    max_batch, max_new = max(args.batches), max(q for _, q, _ in SCENARIOS)
    context = args.context
    tokens = max_batch * (context + max_new + 16) + 64
    cache = model.make_kv_cache(tokens * model.kv_bytes_per_token, block_size=16)
    kv_buckets = tuple(args.kv_buckets) if args.kv_buckets else None
    runner = GraphRunner(model, cache, mode="graph" if device == "cuda" else "padded", kv_buckets=kv_buckets,
                         max_kv=max(1024, context * 2))
    # --compile: a second runner whose graphs are captured with the layers' element-wise chains fused
    # by torch.compile (actors.model.fused); same model, weights and cache
    fused_runner = (GraphRunner(model, cache, mode="graph" if device == "cuda" else "padded",
                                kv_buckets=kv_buckets, max_kv=max(1024, context * 2)) if args.compile else None)
    # Every sequence holds ``context`` committed entries of random KV (a prefill's content does not
    # change a decode step's cost).
    for r in range(max_batch):
        cache.add_sequence(r)
        cache.append_host(r, context)
        cache.commit(r)
    gen = torch.Generator(device=device).manual_seed(1)
    cache.storage.normal_(0.0, 1.0, generator=gen)
    vocab = model.config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters(remove_duplicate=False)
                       if not n.startswith("embed_tokens"))
    rows, errors = [], []
    for label, q, logits in SCENARIOS:
        for b in args.batches:
            ids = torch.randint(vocab, (b, q), generator=torch.Generator().manual_seed(b * 10 + q)).tolist()
            steps = [SeqStep(r, ids[r], logits=logits) for r in range(b)]
            try:
                rows.append(bench_scenario(label, model, cache, runner, steps, args, weight_bytes, bandwidth,
                                           fused_runner))
            except Exception as exc:  # keep the other rows; the error is in the JSON
                import traceback

                traceback.print_exc()
                errors.append({"scenario": label, "batch": b, "error": repr(exc)})
                for r in range(b):
                    cache.commit(r, [])
                continue
            r = rows[-1]
            print(f"  {name:>13} {label:>10} B={b:<3} eager {r['eager_step']['median_ms']:7.3f} ms  graph "
                  f"{r['graph_step']['median_ms']:7.3f} ms  (device {r['eager_device']['median_ms']:.3f} / "
                  f"{r['graph_device']['median_ms']:.3f} ms, floor {r['floor_ms']:.3f} ms, argmax agree "
                  f"{r['argmax_agree']}/{r['logit_rows']})", flush=True)
            if "fused_step" in r:
                print(f"  {'':>13} {'':>10}       fused graph {r['fused_step']['median_ms']:7.3f} ms (device "
                      f"{r['fused_device']['median_ms']:.3f} ms, {r['fused_speedup_over_graph']:.2f}× the graph "
                      f"step; first step incl. compile {r['first_fused_step_incl_compile_s']:.1f} s, argmax agree "
                      f"{r['fused_argmax_agree']}/{r['logit_rows']})", flush=True)
    profile = fused_profile = None
    if device == "cuda" and args.profile:
        try:
            profile = kernel_profile(model, cache, runner, vocab)
            if args.compile:
                with fused_kernels(model):
                    fused_profile = kernel_profile(model, cache, runner, vocab)
        except Exception as exc:  # the profile is diagnostic only
            profile = {"error": repr(exc)}
            print(f"    kernel profile failed: {exc!r}")
    return {
        "kernel_profile": profile, "kernel_profile_fused": fused_profile,
        "fused_runner_stats": None if fused_runner is None else fused_runner.stats,
        "model": name, "config": SHAPES[name], "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes_read_per_step": weight_bytes, "kv_bytes_per_token": model.kv_bytes_per_token,
        "context": context, "write_checkpoint_s": t_write, "load_s": t_load, "runner_stats": runner.stats,
        "kv_buckets": list(runner.kv_buckets), "scenarios": rows, "errors": errors,
    }


def kernel_profile(model, cache, runner, vocab: int) -> dict:
    """CUDA kernels of one decode step at batch 1 (the padded batch, run eagerly): what the graph
    replays, kernel by kernel. Kernel times are the same inside a graph."""
    from torch.profiler import ProfilerActivity, profile

    steps = [SeqStep(0, [vocab // 2], logits="last")]
    batch = StepBatch.build(cache, steps, padding=runner.bucket(steps))
    for _ in range(3):
        model.forward(batch, cache)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.forward(batch, cache)
        torch.cuda.synchronize()
    cache.commit(0, [])
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    time_attr = "device_time_total" if hasattr(kernels[0], "device_time_total") else "cuda_time_total"
    rows = sorted(({"kernel": e.key[:120], "count": e.count, "total_us": getattr(e, time_attr)} for e in kernels),
                  key=lambda r: -r["total_us"])
    total_count, total_us = sum(r["count"] for r in rows), sum(r["total_us"] for r in rows)
    layers = model.num_held_layers
    print(f"    kernels per decode step: {total_count} ({total_count / layers:.1f} per layer), "
          f"kernel time {total_us / 1e3:.3f} ms")
    for r in rows[:12]:
        print(f"      {r['count']:5d} × {r['total_us'] / max(r['count'], 1):7.2f} us  {r['kernel'][:90]}")
    return {"kernels_per_step": total_count, "kernels_per_layer": total_count / layers,
            "kernel_time_ms": total_us / 1e3, "top": rows[:40]}


@contextmanager
def fused_kernels(model):
    """The model's element-wise chains through torch.compile while inside (actors.model.fused)."""
    previous = model.kernels
    model.use_compiled(True)
    try:
        yield
    finally:
        model.kernels = previous


def bench_scenario(label, model, cache, runner, steps, args, weight_bytes, bandwidth, fused_runner=None) -> dict:
    device = args.device
    req_ids = [s.req_id for s in steps]

    def rollback():
        for r in req_ids:
            cache.commit(r, [])

    def eager_step():
        t0 = time.perf_counter()
        batch = StepBatch.build(cache, steps)
        t1 = time.perf_counter()
        model.forward(batch, cache).argmax(-1).cpu()
        rollback()
        return t1 - t0

    def graph_step():
        t0 = time.perf_counter()
        batch = runner.build(steps)
        t1 = time.perf_counter()
        runner.forward(batch).argmax(-1).cpu()
        rollback()
        return t1 - t0

    # correctness: graph vs eager logits on the same cache content
    batch = StepBatch.build(cache, steps)
    eager_logits = model.forward(batch, cache).float()
    rollback()
    gbatch = runner.build(steps)
    t_cap = time.perf_counter()
    graph_logits = runner.forward(gbatch).float()
    _sync(device)
    first_graph_s = time.perf_counter() - t_cap  # includes the capture of this bucket
    rollback()
    agree = int((eager_logits.argmax(-1) == graph_logits.argmax(-1)).sum())
    max_diff = float((eager_logits - graph_logits).abs().max())

    def fused_step():
        with fused_kernels(model):  # only the first call per bucket (compile + capture) needs it
            t0 = time.perf_counter()
            batch = fused_runner.build(steps)
            t1 = time.perf_counter()
            fused_runner.forward(batch).argmax(-1).cpu()
        rollback()
        return t1 - t0

    fused = {}
    if fused_runner is not None:  # correctness and compile + capture time of the fused graph
        t_comp = time.perf_counter()
        with fused_kernels(model):
            fused_logits = fused_runner.forward(fused_runner.build(steps)).float()
        _sync(device)
        fused["first_fused_step_incl_compile_s"] = time.perf_counter() - t_comp
        rollback()
        fused["fused_argmax_agree"] = int((fused_logits.argmax(-1) == graph_logits.argmax(-1)).sum())
        fused["fused_max_abs_logit_diff"] = float((fused_logits - graph_logits).abs().max())

    eager_times, graph_times, eager_build, graph_build = [], [], [], []
    fused_times, fused_build = [], []
    modes = [(eager_step, eager_times, eager_build), (graph_step, graph_times, graph_build)]
    if fused_runner is not None:
        modes.append((fused_step, fused_times, fused_build))
    for fn, _, _ in modes:
        for _ in range(args.warmup):
            fn()
    for _ in range(args.rounds):
        for fn, times, builds in modes:
            for _ in range(args.steps):
                _sync(device)
                t0 = time.perf_counter()
                builds.append(fn())
                times.append(time.perf_counter() - t0)

    # device time of the forward alone, back to back on a prebuilt batch
    eager_dev, graph_dev = [], []
    batch = StepBatch.build(cache, steps)
    for _ in range(args.rounds):
        eager_dev.append(_device_time(lambda: model.forward(batch, cache), device, args.device_iters))
    rollback()
    gbatch = runner.build(steps)
    for _ in range(args.rounds):
        graph_dev.append(_device_time(lambda: runner.forward(gbatch), device, args.device_iters))
    rollback()
    fused_dev = []
    if fused_runner is not None:
        fbatch = fused_runner.build(steps)
        for _ in range(args.rounds):
            fused_dev.append(_device_time(lambda: fused_runner.forward(fbatch), device, args.device_iters))
        rollback()

    b, q = len(steps), len(steps[0].token_ids)
    kv_entries = sum(cache.seq_len(r) + q for r in req_ids)
    step_bytes = weight_bytes + kv_entries * model.kv_bytes_per_token
    floor_ms = step_bytes / bandwidth * 1e3
    out = {
        "scenario": label, "batch": b, "tokens_per_seq": q, "logit_rows": int(eager_logits.shape[0]),
        "bucket": None if gbatch.padding is None else [gbatch.padding.batch, gbatch.padding.query,
                                                      gbatch.padding.kv, gbatch.padding.logits],
        "eager_step": _stats(eager_times), "graph_step": _stats(graph_times),
        "eager_device": _stats(eager_dev), "graph_device": _stats(graph_dev),
        "eager_build": _stats(eager_build), "graph_build": _stats(graph_build),
        "first_graph_step_incl_capture_s": first_graph_s,
        "bytes_per_step": step_bytes, "floor_ms": floor_ms,
        "argmax_agree": agree, "max_abs_logit_diff": max_diff,
    }
    keys = ["eager_step", "graph_step", "eager_device", "graph_device"]
    if fused_runner is not None:
        out.update(fused, fused_step=_stats(fused_times), fused_device=_stats(fused_dev),
                   fused_build=_stats(fused_build))
        keys += ["fused_step", "fused_device"]
    for key in keys:
        out[key]["fraction_of_floor"] = floor_ms / out[key]["median_ms"]
    out["speedup_step"] = out["eager_step"]["median_ms"] / out["graph_step"]["median_ms"]
    if fused_runner is not None:
        out["fused_speedup_over_graph"] = out["graph_step"]["median_ms"] / out["fused_step"]["median_ms"]
    return out


def _commit() -> str:
    if os.environ.get("OUTRIDER_COMMIT"):
        return os.environ["OUTRIDER_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "n/a"


def markdown(r: dict) -> str:
    lines = [
        f"# Decode / verify step: eager vs CUDA graphs — {r['date']}",
        "",
        f"{r['device_name']} (driver {r['driver']}), torch {r['torch']}, transformers {r['transformers']}, "
        f"commit `{r['commit']}`. Random bf16 weights (transformers-written checkpoints), every sequence "
        f"holding {r['context']} committed tokens in the paged KV cache. Medians of {r['rounds']} × "
        f"{r['steps']} alternating steps (min–max in the JSON).",
        "",
        f"Measured in this run: device copy bandwidth **{r['copy_bandwidth_gb_s']:.0f} GB/s** (read + write), "
        f"bf16 matmul **{r['matmul_tflops']:.0f} TFLOP/s**. Floor = (weights read once + KV of every "
        "sequence) / copy bandwidth; 'of floor' = floor / measured.",
        "",
        "**step**: build + forward + argmax to host + rollback, host clock (what a worker pays per step). "
        "**device**: forward alone, back to back, CUDA events. **build**: the host's metadata build "
        "(inside step).",
        "",
        "| model | scenario | B | bucket (B,Q,L,N) | eager step ms | graph step ms | speedup | "
        "eager device ms | graph device ms | graph build ms | floor ms | graph step of floor | "
        "graph device of floor | argmax agree |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in r["models"]:
        for s in m["scenarios"]:
            lines.append(
                f"| {m['model']} | {s['scenario']} | {s['batch']} | {s['bucket']} | "
                f"{s['eager_step']['median_ms']:.3f} | {s['graph_step']['median_ms']:.3f} | "
                f"{s['speedup_step']:.2f}× | {s['eager_device']['median_ms']:.3f} | "
                f"{s['graph_device']['median_ms']:.3f} | {s['graph_build']['median_ms']:.3f} | "
                f"{s['floor_ms']:.3f} | "
                f"{s['graph_step']['fraction_of_floor']:.0%} | {s['graph_device']['fraction_of_floor']:.0%} | "
                f"{s['argmax_agree']}/{s['logit_rows']} |")
    fused_rows = [(m, s) for m in r["models"] for s in m["scenarios"] if "fused_step" in s]
    if fused_rows:
        lines += ["", "**fused**: the same graphed step with each layer's element-wise chains fused by "
                  "`torch.compile` (`actors.model.fused`), captured by a second runner; same rounds.", "",
                  "| model | scenario | B | graph step ms | fused step ms | fused ÷ graph | graph device ms | "
                  "fused device ms | fused device of floor | compile + capture s | argmax agree (fused vs graph) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m, s in fused_rows:
            lines.append(
                f"| {m['model']} | {s['scenario']} | {s['batch']} | {s['graph_step']['median_ms']:.3f} | "
                f"{s['fused_step']['median_ms']:.3f} | {1 / s['fused_speedup_over_graph']:.2f} | "
                f"{s['graph_device']['median_ms']:.3f} | {s['fused_device']['median_ms']:.3f} | "
                f"{s['fused_device']['fraction_of_floor']:.0%} | {s['first_fused_step_incl_compile_s']:.1f} | "
                f"{s['fused_argmax_agree']}/{s['logit_rows']} |")
    lines.append("")
    for m in r["models"]:
        kf = m.get("kernel_profile_fused")
        if kf and "error" not in kf:
            lines.append(f"- {m['model']} fused: a batch-1 decode step runs {kf['kernels_per_step']} kernels "
                         f"({kf['kernels_per_layer']:.1f} per layer), {kf['kernel_time_ms']:.3f} ms of kernel time.")
        kp = m.get("kernel_profile")
        kp = kp if kp and "error" not in kp else None
        prof = (f" A batch-1 decode step runs {kp['kernels_per_step']} kernels ({kp['kernels_per_layer']:.1f} per "
                f"layer), {kp['kernel_time_ms']:.3f} ms of kernel time." if kp else "")
        lines.append(f"- {m['model']}: {m['params'] / 1e6:.0f} M parameters, "
                     f"{m['weight_bytes_read_per_step'] / 1e6:.0f} MB of weights read per step, "
                     f"{m['kv_bytes_per_token']} KV bytes per token; graphs captured {m['runner_stats']['captures']} "
                     f"in {m['runner_stats']['capture_s']:.2f} s; KV buckets {m['kv_buckets']}.{prof}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=500, help="committed tokens per sequence")
    parser.add_argument("--kv-buckets", default="", help="comma-separated KV buckets (default: powers of two)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and mode")
    parser.add_argument("--device-iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the per-kernel profile of a batch-1 decode step")
    parser.add_argument("--compile", action="store_true",
                        help="also time the graphed step with the layers' element-wise chains fused by torch.compile")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.kv_buckets = [int(k) for k in args.kv_buckets.split(",")] if args.kv_buckets else []
    import transformers

    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    bandwidth, flops = copy_bandwidth(device), matmul_rate(device)
    print(f"{name}: copy {bandwidth / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    result = {
        "benchmark": "graph-steps", "date": dt.date.today().isoformat(), "device": device, "device_name": name,
        "driver": _driver() if device == "cuda" else "n/a", "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "commit": _commit(),
        "copy_bandwidth_gb_s": bandwidth / 1e9, "matmul_tflops": flops / 1e12, "context": args.context,
        "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "device_iters": args.device_iters,
        "models": [],
    }
    for model_name in args.models.split(","):
        result["models"].append(bench_model(model_name, args, bandwidth))
        if device == "cuda":
            torch.cuda.empty_cache()
    gpu = "h100" if "H100" in name else ("h200" if "H200" in name else device)
    out = args.out or ROOT / "benchmarks" / "results" / f"{result['date']}-{gpu}-graph-steps"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "README.md").write_text(table)
    print(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
