"""The measured runs: our reference loop, Hugging Face ``generate``, the cluster, the cost curve.

Every runner takes the same requests (prompt token ids, indexed by prompt) and the same greedy
limits, and returns one *measurement*: per repetition the wall time, the tokens and per-request
numbers; the greedy outputs of the first repetition (checked against target-only by the caller).

* ``run_ours``: ``actors.spec.reference.generate`` in this process; concurrency c = the requests
  are generated in static batches of c (a closed loop in which a batch ends together);
* ``run_hf``: ``model.generate`` one request at a time (target-only, ``assistant_model=`` or
  ``prompt_lookup_num_tokens=``; transformers' assisted modes take batch 1 only);
* ``run_hf_compiled``: the same with transformers' fastest single-request form, a static KV cache
  and the decode step compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); the
  compile happens in an untimed warm-up pass and is reported on its own;
* ``run_cluster``: ``Cluster.generate`` with c concurrent clients, each sending its next request
  when the last one finished (continuous batching in the engine), metrics read before and after;
* ``run_arrivals``: ``Cluster.generate`` open loop: each request sent at its scheduled arrival time
  (``config.arrival_times``: Poisson or bursty), whatever is still running; client-side TTFT / TPOT
  from the scheduled arrival, and the share of requests meeting both SLOs (goodput);
* ``cost_curve``: one target step as the workers run it (``GraphRunner.build`` + ``forward`` +
  rollback: a CUDA graph replay where the shape fits the runner's buckets, else eager) over B
  sequences x T new tokens each at a fixed context: where verification stops being free.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import torch

from actors.spec import reference
from actors.spec.types import SamplingParams
from cluster.metrics import STEP_PHASES


@dataclass
class Requests:
    """The run's requests: prompt ids per request, the prompt index each comes from."""

    prompt_ids: list[tuple[int, ...]]
    prompt_index: list[int]

    @classmethod
    def for_concurrency(cls, prompts: list[tuple[int, ...]], concurrency: int) -> Requests:
        n = max(len(prompts), concurrency)
        return cls([prompts[i % len(prompts)] for i in range(n)], [i % len(prompts) for i in range(n)])

    @classmethod
    def cycle(cls, prompts: list[tuple[int, ...]], n: int) -> Requests:
        """Exactly ``n`` requests, going round the prompts."""
        return cls([prompts[i % len(prompts)] for i in range(n)], [i % len(prompts) for i in range(n)])

    def __len__(self) -> int:
        return len(self.prompt_ids)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _aggregate_stats(stats_list: list[dict]) -> dict:
    """Mean accepted length and acceptance by draft position over several requests' stats."""
    lengths = [x for s in stats_list for x in s.get("accepted_lengths", [])]
    steps_by_pos: list[float] = []
    acc_by_pos: list[float] = []
    for s in stats_list:
        n = len(s.get("accepted_lengths", []))
        for j, rate in enumerate(s.get("acceptance_by_position", [])):
            if j >= len(steps_by_pos):
                steps_by_pos.append(0.0)
                acc_by_pos.append(0.0)
            steps_by_pos[j] += n
            acc_by_pos[j] += rate * n
    hist: dict[int, int] = {}
    for x in lengths:
        hist[x] = hist.get(x, 0) + 1
    return {
        "verify_steps": len(lengths),
        "mean_accepted_length": sum(lengths) / len(lengths) if lengths else None,
        "acceptance_by_position": [a / s if s else 0.0 for a, s in zip(acc_by_pos, steps_by_pos)],
        "accepted_length_hist": {str(k): v for k, v in sorted(hist.items())},
    }


# ---------------------------------------------------------------------------- ours (reference loop)
def run_ours(target, requests: Requests, concurrency: int, params: SamplingParams, *, proposer=None,
             num_draft_tokens: int = 4, repetitions: int = 3, warmup: bool = True, device="cpu",
             generate_fn=None) -> dict:
    gen = generate_fn or reference.generate
    chunks = [list(range(i, min(i + concurrency, len(requests)))) for i in range(0, len(requests), concurrency)]

    def one_pass() -> tuple[list, list, list]:
        outputs: list = [None] * len(requests)
        chunk_s = []
        for chunk in chunks:
            sync(device)
            t0 = time.perf_counter()
            results = gen(target, [list(requests.prompt_ids[i]) for i in chunk], params, proposer=proposer,
                          num_draft_tokens=num_draft_tokens)
            sync(device)
            chunk_s.append(time.perf_counter() - t0)
            for i, r in zip(chunk, results):
                outputs[i] = r
        return outputs, chunk_s, chunks

    if warmup:  # a whole pass: every shape the timed passes meet has been run once (allocator, kernels)
        one_pass()
    reps = []
    first_outputs = None
    for _ in range(repetitions):
        outputs, chunk_s, used = one_pass()
        if first_outputs is None:
            first_outputs = outputs
        tokens = sum(len(r.token_ids) for r in outputs)
        wall = sum(chunk_s)
        per_request = []
        for chunk, secs in zip(used, chunk_s):
            for i in chunk:
                r = outputs[i]
                per_request.append({"request": i, "prompt": requests.prompt_index[i], "tokens": len(r.token_ids),
                                    "seconds": secs if concurrency == 1 else None,
                                    "forward_passes": r.stats["target_forward_passes"],
                                    "accepted_length_sum": sum(r.stats["accepted_lengths"]),
                                    "verify_steps": len(r.stats["accepted_lengths"])})
        reps.append({"wall_s": wall, "chunk_s": chunk_s, "tokens": tokens, "tok_s": tokens / wall if wall else 0.0,
                     "forward_passes": sum(r.stats["target_forward_passes"] for r in outputs),
                     "per_request": per_request, **_aggregate_stats([r.stats for r in outputs])})
    return {"reps": reps, "outputs": [list(r.token_ids) for r in first_outputs]}


# ---------------------------------------------------------------------------- Hugging Face
def load_hf(path, dtype, device, num_hidden_layers: int | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    return model.to(device).eval()


def hf_generation_config(model, params: SamplingParams, **extra):
    import copy

    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.temperature, gc.top_p, gc.top_k = None, None, None
    gc.max_new_tokens = params.max_tokens
    gc.min_new_tokens = None
    gc.eos_token_id = list(params.stop_token_ids) or None
    gc.pad_token_id = params.stop_token_ids[0] if params.stop_token_ids else 0
    for k, v in extra.items():
        setattr(gc, k, v)
    return gc


@torch.inference_mode()
def run_hf(model, requests: Requests, params: SamplingParams, *, assistant=None, lookup_tokens: int | None = None,
           num_draft_tokens: int = 4, repetitions: int = 3, warmup: bool = True, device="cpu",
           generation_extra: dict | None = None, warmup_order: list[int] | None = None) -> dict:
    """``generation_extra``: more generation-config fields (the compiled row's cache and compile
    settings); ``warmup_order``: the requests of the warm-up pass, in order (default: all).
    The result's ``warmup`` holds the seconds of each warm-up call."""
    extra = dict(generation_extra or {})
    if lookup_tokens:
        extra["prompt_lookup_num_tokens"] = lookup_tokens
        extra["max_matching_ngram_size"] = 3  # as ours (PromptLookupProposer max_ngram=3)
    if assistant is not None:
        agc = assistant.generation_config
        agc.num_assistant_tokens = num_draft_tokens
        agc.num_assistant_tokens_schedule = "constant"  # a fixed k, like ours with adaptive off
        if hasattr(agc, "assistant_confidence_threshold"):
            agc.assistant_confidence_threshold = 0.0
    gc = hf_generation_config(model, params, **extra)

    def one(i: int, gc_used) -> tuple[list[int], float]:
        ids = torch.tensor([list(requests.prompt_ids[i])], device=device)
        sync(device)
        t0 = time.perf_counter()
        kwargs = {"assistant_model": assistant} if assistant is not None else {}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc_used, **kwargs)
        sync(device)
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0

    warm = []
    if warmup:  # a whole pass, as for ours
        for i in (warmup_order if warmup_order is not None else range(len(requests))):
            warm.append({"request": i, "seconds": one(i, gc)[1]})
    reps, first = [], None
    for _ in range(repetitions):
        outputs, per_request = [], []
        for i in range(len(requests)):
            ids, secs = one(i, gc)
            outputs.append(ids)
            per_request.append({"request": i, "prompt": requests.prompt_index[i], "tokens": len(ids), "seconds": secs})
        first = first or outputs
        wall = sum(r["seconds"] for r in per_request)
        tokens = sum(r["tokens"] for r in per_request)
        reps.append({"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall if wall else 0.0,
                     "per_request": per_request})
    return {"reps": reps, "outputs": first, "warmup": warm}


def run_hf_compiled(model, requests: Requests, params: SamplingParams, *, repetitions: int = 3, device="cpu",
                    fullgraph: bool = True, all_devices: bool = False) -> dict:
    """``generate`` with a static cache and the decode forward compiled (``mode="reduce-overhead"``).

    transformers 5 compiles the decode step itself when the cache is static (prefill stays eager:
    its shapes change with every prompt), through ``generation_config.compile_config``; this is the
    documented equivalent of ``model.forward = torch.compile(model.forward, mode="reduce-overhead",
    fullgraph=True)`` without recompiling for every prompt length. The static cache is sized once
    for the longest request (``max_cache_len``; the longest request also warms up first, so versions
    that reuse a large-enough cache do too), so one graph serves every request. transformers only
    compiles on an accelerator unless ``all_devices``. The warm-up pass always runs (it compiles);
    ``compile_s`` = the first call minus that request's timed median."""
    from transformers.generation.configuration_utils import CompileConfig

    compile_config = CompileConfig(fullgraph=fullgraph, mode="reduce-overhead")
    if all_devices:
        compile_config._compile_all_devices = True
    longest = max(range(len(requests)), key=lambda i: len(requests.prompt_ids[i]))
    max_cache_len = len(requests.prompt_ids[longest]) + params.max_tokens + 1
    order = [longest] + [i for i in range(len(requests)) if i != longest]
    meas = run_hf(model, requests, params, repetitions=repetitions, warmup=True, device=device,
                  generation_extra={"cache_implementation": "static", "max_cache_len": max_cache_len,
                                    "compile_config": compile_config, "disable_compile": False},
                  warmup_order=order)
    first = meas["warmup"][0]["seconds"]
    steady = statistics.median(r["seconds"] for rep in meas["reps"] for r in rep["per_request"]
                               if r["request"] == longest)
    meas["compile"] = {"compiled": hasattr(model, "_compiled_call"), "fullgraph": fullgraph,
                       "mode": "reduce-overhead", "cache_implementation": "static", "max_cache_len": max_cache_len,
                       "first_call_s": first, "compile_s": max(0.0, first - steady),
                       "warmup_s": sum(w["seconds"] for w in meas["warmup"])}
    return meas


# ---------------------------------------------------------------------------- the cluster
def _metric(snap: dict, name: str, labels: str | None = None) -> float:
    value = snap.get(name)
    if labels is not None:
        return float((value or {}).get(labels, 0.0))
    return float(value or 0.0)


def _metric_delta(before: dict, after: dict, max_positions: int) -> dict:
    def delta(name: str, labels: str | None = None) -> float:
        return _metric(after, name, labels) - _metric(before, name, labels)

    positions = [f"position={j}" for j in range(1, max_positions + 1)]
    roles = ("target", "draft")
    return {"engine_steps": delta("outrider_engine_steps_total"),
            "verify_s_sum": delta("outrider_verify_step_seconds_sum"),
            "verify_count": delta("outrider_verify_step_seconds_count"),
            "draft_s_sum": delta("outrider_draft_step_seconds_sum"),
            "draft_count": delta("outrider_draft_step_seconds_count"),
            "draft_propose_wall_s": delta("outrider_draft_propose_wall_seconds_total"),
            "draft_ahead_used": delta("outrider_draft_ahead_used_total"),
            "position_tested": [delta("outrider_spec_position_tested_total", lab) for lab in positions],
            "position_accepted": [delta("outrider_spec_position_accepted_total", lab) for lab in positions],
            "overlap": {o: delta("outrider_overlap_speculations_total", f"outcome={o}") for o in ("hit", "miss")},
            "graph_captures": {r: delta("outrider_graph_captures_total", f"role={r}") for r in roles},
            "graph_capture_s": {r: delta("outrider_graph_capture_seconds_total", f"role={r}") for r in roles},
            "run_ahead": {o: delta("outrider_target_run_ahead_total", f"outcome={o}") for o in ("used", "discarded")},
            # steps by the k they ran with (the histogram's buckets are cumulative: k <= j) and by reason
            "k_at_most": {j: delta("outrider_spec_num_draft_tokens_bucket", f"le={float(j)}") for j in range(max_positions + 1)},
            "decisions": {c: delta("outrider_spec_steps_total", f"reason_code={c}")
                          for c in ("goodput", "explore", "fixed", "capped", "empty")},
            # seconds by role and phase of the step (cluster.metrics.STEP_PHASES): the step's profile
            "phases": {role: {ph: delta("outrider_step_phase_seconds_total", f"phase={ph},role={role}") for ph in phs}
                       for role, phs in STEP_PHASES.items()}}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_cluster(cluster, requests: Requests, concurrency: int, params: SamplingParams, *, repetitions: int = 3,
                warmup: bool = True, max_positions: int = 4, retrack_oracle: bool = False) -> dict:
    """Closed-loop passes over ``requests`` (a warm-up pass, then ``repetitions`` timed ones).
    ``retrack_oracle``: after each pass, an ``oracle:`` draft re-records the outputs the target
    really produced in it (``Cluster.retrack_oracle``), so the next pass emulates its α against
    this batch composition's own greedy continuations, not against a batch-1 record."""

    def retrack(results: dict) -> int | None:
        if not retrack_oracle:
            return None
        return cluster.retrack_oracle([{"prompt": list(requests.prompt_ids[i]), "output": list(results[i][0].token_ids)}
                                       for i in sorted(results)])

    def closed_loop(reqs: list[int], p: SamplingParams):
        async def main():
            todo = list(reqs)
            results: dict[int, tuple] = {}

            async def client():
                while todo:
                    i = todo.pop(0)
                    t0 = time.perf_counter()
                    stream = await cluster.generate(list(requests.prompt_ids[i]), p, ignore_eos=True)
                    out = await stream.result()
                    results[i] = (out, time.perf_counter() - t0)

            await asyncio.gather(*(client() for _ in range(min(concurrency, len(reqs)))))
            return results

        return asyncio.run(main())

    if warmup:  # a whole pass, as for ours
        warm = closed_loop(list(range(len(requests))), params)
        cluster.wait_idle(60)
        retrack(warm)
    reps, first = [], None
    for _ in range(repetitions):
        before = cluster.metrics_snapshot()
        t0 = time.perf_counter()
        results = closed_loop(list(range(len(requests))), params)
        wall = time.perf_counter() - t0
        cluster.wait_idle(60)
        after = cluster.metrics_snapshot()
        retracked = retrack(results)
        outs = [results[i][0] for i in range(len(requests))]
        if first is None:
            first = [list(o.token_ids) for o in outs]
        tokens = sum(len(o.token_ids) for o in outs)
        delta = _metric_delta(before, after, max_positions)
        step_s = wall / delta["engine_steps"] if delta["engine_steps"] else None
        forward_s = delta["verify_s_sum"] / delta["verify_count"] if delta["verify_count"] else None
        overhead = (step_s - forward_s) / step_s if step_s and forward_s is not None else None
        ttft = [o.ttft_s for o in outs if o.ttft_s is not None]
        tpot = [(o.latency_s - o.ttft_s) / (len(o.token_ids) - 1) for o in outs
                if o.latency_s is not None and o.ttft_s is not None and len(o.token_ids) > 1]
        reps.append({
            "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall if wall else 0.0,
            "per_request": [{"request": i, "prompt": requests.prompt_index[i], "tokens": len(outs[i].token_ids),
                             "seconds": results[i][1] if concurrency == 1 else None,
                             "latency_s": outs[i].latency_s, "ttft_s": outs[i].ttft_s,
                             "forward_passes": outs[i].stats["target_forward_passes"],
                             "accepted_length_sum": sum(outs[i].stats["accepted_lengths"]),
                             "verify_steps": len(outs[i].stats["accepted_lengths"])}
                            for i in range(len(requests))],
            "metrics": delta, "wall_per_step_s": step_s, "forward_per_step_s": forward_s,
            "control_plane_share": overhead, "oracle_retracked": retracked,
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
            "tpot_p50_s": _pct(tpot, 0.5), "tpot_p99_s": _pct(tpot, 0.99),
            **_aggregate_stats([o.stats for o in outs]),
        })
        tested, acc = delta["position_tested"], delta["position_accepted"]
        # from the engine's counters: accepted / reached (every earlier position accepted)
        reps[-1]["conditional_acceptance_by_position"] = [a / t for a, t in zip(acc, tested) if t]
    return {"reps": reps, "outputs": first}


def arrival_stats(per_request: list[dict], duration_s: float, *, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """One open-loop repetition's summary from its per-request records (``ttft_s``, ``tpot_s``,
    ``tokens``; ``error`` for a request that failed): throughput, TTFT / TPOT percentiles, and the
    requests meeting both SLOs (a failed request meets none; one token has no TPOT to miss)."""
    ok = [r for r in per_request if r.get("error") is None]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tpot = [r["tpot_s"] for r in ok if r.get("tpot_s") is not None]
    met = sum(1 for r in ok if r.get("ttft_s") is not None and r["ttft_s"] <= slo_ttft_s
              and (r.get("tpot_s") is None or r["tpot_s"] <= slo_tpot_s))
    tokens = sum(r.get("tokens", 0) for r in ok)
    n = len(per_request)
    return {"duration_s": duration_s, "tokens": tokens, "tok_s": tokens / duration_s if duration_s > 0 else 0.0,
            "completed": len(ok), "failed": n - len(ok), "slo_met": met, "slo_attainment": met / n if n else None,
            "goodput_rps": met / duration_s if duration_s > 0 else 0.0,
            "throughput_rps": len(ok) / duration_s if duration_s > 0 else 0.0,
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9), "ttft_p99_s": _pct(ttft, 0.99),
            "tpot_p50_s": _pct(tpot, 0.5), "tpot_p90_s": _pct(tpot, 0.9), "tpot_p99_s": _pct(tpot, 0.99)}


def run_arrivals(cluster, requests: Requests, schedule: list[float], params: SamplingParams, *,
                 slo_ttft_s: float, slo_tpot_s: float, repetitions: int = 3, max_positions: int = 4,
                 retrack_oracle: bool = False) -> dict:
    """Open loop: request i is sent ``schedule[i]`` seconds after the start, whatever is running.

    TTFT and latency are the client's, from the *scheduled* arrival (a late send counts against
    the system); TPOT = (latency - TTFT) / (tokens - 1). Every repetition replays the same schedule.
    ``retrack_oracle``: as in ``run_cluster``, after each repetition.
    """
    if len(schedule) != len(requests):
        raise ValueError(f"{len(schedule)} arrival times for {len(requests)} requests")

    def one_pass():
        async def main():
            t0 = time.perf_counter()

            async def one(i: int) -> dict:
                due = t0 + schedule[i]
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.perf_counter()
                rec = {"request": i, "prompt": requests.prompt_index[i], "arrival_s": schedule[i],
                       "send_lateness_s": sent - due}
                first = None
                try:
                    stream = await cluster.generate(list(requests.prompt_ids[i]), params, ignore_eos=True)
                    async for chunk in stream:
                        if first is None and chunk.token_ids:
                            first = time.perf_counter()
                    out = await stream.result()
                except Exception as exc:  # noqa: BLE001 - a rejected / failed request misses the SLOs
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    rec["done_s"] = time.perf_counter() - t0
                    return rec
                done = time.perf_counter()
                n = len(out.token_ids)
                rec.update({"tokens": n, "output": list(out.token_ids), "done_s": done - t0,
                            "ttft_s": None if first is None else first - due, "latency_s": done - due,
                            "engine_ttft_s": out.ttft_s, "stats": out.stats})
                rec["tpot_s"] = (done - first) / (n - 1) if first is not None and n > 1 else None
                return rec

            recs = await asyncio.gather(*(one(i) for i in range(len(requests))))
            return recs, time.perf_counter() - t0

        return asyncio.run(main())

    reps, first_outputs = [], None
    for _ in range(repetitions):
        before = cluster.metrics_snapshot()
        recs, duration = one_pass()
        cluster.wait_idle(60)
        after = cluster.metrics_snapshot()
        outputs = [r.get("output", []) for r in recs]
        retracked = None
        if retrack_oracle:
            retracked = cluster.retrack_oracle([{"prompt": list(requests.prompt_ids[r["request"]]), "output": r["output"]}
                                                for r in recs if r.get("output")])
        if first_outputs is None:
            first_outputs = outputs
        stats = [r.pop("stats") for r in recs if "stats" in r]
        for r in recs:
            r.pop("output", None)
        lateness = [r["send_lateness_s"] for r in recs]
        reps.append({**arrival_stats(recs, duration, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s),
                     "wall_s": duration, "send_lateness_p99_s": _pct(lateness, 0.99),
                     "metrics": _metric_delta(before, after, max_positions), "per_request": recs,
                     "oracle_retracked": retracked, **_aggregate_stats(stats)})
    return {"reps": reps, "outputs": first_outputs}


# ---------------------------------------------------------------------------- cost curve
@torch.inference_mode()
def cost_curve(model, *, batches: list[int], tokens: list[int], context: int, repetitions: int = 5,
               device="cpu", seed: int = 0) -> list[dict]:
    """Median seconds of one step over B sequences x T new tokens (chains), context ``context``,
    through a ``GraphRunner`` as in the workers: replayed from a CUDA graph where (B, T) fits its
    buckets on a GPU (captured in the untimed first step; ``graphed`` in the row), else eager."""
    from actors.model.graph_runner import GraphRunner
    from actors.step_batch import SeqStep, StepBatch

    max_b, max_t = max(batches), max(tokens)
    block = 16
    per_seq = context + max_t + 2 * block
    cache = model.make_kv_cache(max_b * per_seq * model.kv_bytes_per_token, block_size=block)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    for b in range(max_b):
        cache.add_sequence(b)
    prefill = StepBatch.build(cache, [SeqStep(b, torch.randint(3, vocab, (context,), generator=gen).tolist(),
                                              logits="none") for b in range(max_b)])
    model.forward(prefill, cache)
    for b in range(max_b):
        cache.commit(b)
    runner = GraphRunner(model, cache)  # graphs on a GPU without TP, eager elsewhere
    sync(device)
    rows = []
    for B in batches:
        for T in tokens:
            ids = [torch.randint(3, vocab, (T,), generator=gen).tolist() for _ in range(B)]

            def step(ids=ids, B=B):
                runner.step([SeqStep(b, ids[b]) for b in range(B)])
                for b in range(B):
                    cache.commit(b, [])

            step()  # a bucket's graph is captured here, untimed
            sync(device)
            graph_steps = runner.stats["graph_steps"]
            times = []
            for _ in range(repetitions):
                t0 = time.perf_counter()
                step()
                sync(device)
                times.append(time.perf_counter() - t0)
            rows.append({"batch": B, "tokens_per_seq": T, "context": context, "median_s": statistics.median(times),
                         "min_s": min(times), "max_s": max(times), "raw_s": times,
                         "graphed": runner.stats["graph_steps"] - graph_steps == repetitions})
    for b in range(max_b):
        cache.free(b)
    return rows
