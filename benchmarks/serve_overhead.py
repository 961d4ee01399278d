"""The serving layer's overhead: the same load through the Python API and through HTTP (issue 4).

One process run, one device, one checkpoint (a shape with random weights, or any checkpoint):

1. ``Cluster.start`` + ``await cluster.generate`` — closed loop at each concurrency;
2. ``outrider serve``'s application (Ray Serve, OpenAI-compatible HTTP) on the same configuration —
   the same prompts as streaming ``/v1/completions`` requests from httpx clients.

Reports tokens/s and TTFT (client-measured, p50) per path and the HTTP/API ratios, and checks the
engine's ``/metrics`` (TTFT histogram count and mean, generated tokens) against the client's own
numbers. Greedy text must be identical on both paths. Writes ``serve_overhead.json`` and
``serve_overhead.md`` into ``--out``.

    python benchmarks/serve_overhead.py --shape 1B --tokenizer .demo/tokenizer --out results/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(f"[serve-overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def api_load(cluster, prompts, max_tokens, concurrency):
    from actors.spec.types import SamplingParams

    queue = list(prompts) * max(1, concurrency // len(prompts) + 1)
    queue = queue[: max(concurrency * 2, len(prompts))]
    texts, ttfts, tokens = {}, [], 0

    async def worker(items):
        nonlocal tokens
        for i, prompt in items:
            start = time.perf_counter()
            stream = await cluster.generate(prompt, SamplingParams(max_tokens=max_tokens), ignore_eos=True)
            first = None
            async for chunk in stream:
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - start
            out = await stream.result()
            ttfts.append(first)
            tokens += len(out.token_ids)
            texts[i] = out.text

    items = list(enumerate(queue))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(items[w::concurrency]) for w in range(concurrency)))
    return {"tok_s": tokens / (time.perf_counter() - t0), "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "tokens": tokens, "requests": len(items), "texts": texts}


async def http_load(base, model, prompts, max_tokens, concurrency):
    import httpx

    queue = list(prompts) * max(1, concurrency // len(prompts) + 1)
    queue = queue[: max(concurrency * 2, len(prompts))]
    texts, ttfts, tokens = {}, [], 0

    async def worker(client, items):
        nonlocal tokens
        for i, prompt in items:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
            start, first, text = time.perf_counter(), None, []
            async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    for choice in data.get("choices") or []:
                        if choice.get("text"):
                            first = first or time.perf_counter() - start
                            text.append(choice["text"])
                    if data.get("usage"):
                        tokens += data["usage"]["completion_tokens"]
            ttfts.append(first)
            texts[i] = "".join(text)

    items = list(enumerate(queue))
    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client, items[w::concurrency]) for w in range(concurrency)))
    return {"tok_s": tokens / (time.perf_counter() - t0), "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "tokens": tokens, "requests": len(items), "texts": texts}


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory (default: write --shape)")
    p.add_argument("--shape", default="1B")
    p.add_argument("--tokenizer", default=".demo/tokenizer")
    p.add_argument("--draft", default="none")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--out", default="benchmarks/results/serve-overhead")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from cluster.cluster import Cluster
    from cluster.config import ClusterConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = args.checkpoint
    if path is None:
        from cluster.bench.models import write_shape_checkpoint

        log(f"writing shape {args.shape}")
        path = str(write_shape_checkpoint(args.shape, f"/tmp/shapes/serve-{args.shape}", tokenizer_dir=args.tokenizer))
    prompts = ["Summarize the history of the printing press in three sentences.",
               "Write a short poem about the sea at night.",
               "Explain how a refrigerator works to a ten-year-old.",
               "List five uses of graphene and explain one in detail."]
    levels = [int(c) for c in args.concurrency.split(",")]
    fields = {"target": path, "draft": args.draft, "num_gpus": args.num_gpus, "dtype": "bfloat16"
              if torch.cuda.is_available() else "float32", "kv_budget_tokens": 32768, "adaptive": False}
    ray.init(address="local", num_gpus=args.num_gpus, include_dashboard=False, log_to_driver=False)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "checkpoint": path, "draft": args.draft, "max_tokens": args.max_tokens, "rows": []}

    log("Python API: starting the cluster")
    cluster = Cluster.start(ClusterConfig(**fields))
    asyncio.run(api_load(cluster, prompts, args.max_tokens, 1))  # warm-up (graph captures)
    api = {}
    for c in levels:
        api[c] = asyncio.run(api_load(cluster, prompts, args.max_tokens, c))
        log(f"API c={c}: {api[c]['tok_s']:.1f} tok/s, TTFT p50 {api[c]['ttft_p50_ms']:.1f} ms")
    cluster.shutdown()

    log("HTTP: deploying the Serve application")
    from cluster.serve.app import deploy

    config = ClusterConfig(**fields, serve={"http_port": args.port, "grpc_port": None, "model_name": "bench"})
    deploy(config)
    base = f"http://127.0.0.1:{args.port}"
    asyncio.run(http_load(base, "bench", prompts, args.max_tokens, 1))  # warm-up
    import httpx

    before = httpx.get(f"{base}/metrics", timeout=30).text
    http = {}
    for c in levels:
        http[c] = asyncio.run(http_load(base, "bench", prompts, args.max_tokens, c))
        log(f"HTTP c={c}: {http[c]['tok_s']:.1f} tok/s, TTFT p50 {http[c]['ttft_p50_ms']:.1f} ms")
    after = httpx.get(f"{base}/metrics", timeout=30).text
    for name in ("outrider_time_to_first_token_seconds_count", "outrider_time_to_first_token_seconds_sum",
                 "outrider_generation_tokens_total"):
        results[f"metrics_delta:{name}"] = metric_sum(after, name) - metric_sum(before, name)
    client_tokens = sum(h["tokens"] for h in http.values())
    client_requests = sum(h["requests"] for h in http.values())
    results["client_tokens"], results["client_requests"] = client_tokens, client_requests

    lines = ["| concurrency | API tok/s | HTTP tok/s | HTTP / API | API TTFT p50 ms | HTTP TTFT p50 ms | same text |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in levels:
        a, h = api[c], http[c]
        same = all(a["texts"][i] == h["texts"][i] for i in a["texts"])
        results["rows"].append({"concurrency": c, "api": {k: v for k, v in a.items() if k != "texts"},
                                "http": {k: v for k, v in h.items() if k != "texts"}, "same_text": same})
        lines.append(f"| {c} | {a['tok_s']:.1f} | {h['tok_s']:.1f} | {h['tok_s'] / a['tok_s']:.2f} | "
                     f"{a['ttft_p50_ms']:.1f} | {h['ttft_p50_ms']:.1f} | {same} |")
    count = results["metrics_delta:outrider_time_to_first_token_seconds_count"]
    lines += ["", f"Device {results['device']}; checkpoint {path}; draft {args.draft}; {args.max_tokens} new tokens.",
              f"/metrics during the HTTP load: {count:.0f} TTFT observations for {client_requests} client requests, "
              f"{results['metrics_delta:outrider_generation_tokens_total']:.0f} generated tokens for "
              f"{client_tokens} counted by the clients; engine mean TTFT "
              f"{1000 * results['metrics_delta:outrider_time_to_first_token_seconds_sum'] / max(count, 1):.1f} ms."]
    (out / "serve_overhead.json").write_text(json.dumps(results, indent=2))
    (out / "serve_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
