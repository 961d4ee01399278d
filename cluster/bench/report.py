"""Writes a run's results: ``results.json`` (every raw number), ``results.md`` (tables), PNG plots.

Tables give the median over the repetitions with the min–max spread, the speedup over our own
target-only at the same concurrency, the mean accepted length τ, each figure as a fraction of its
bandwidth floor, and the greedy match against target-only for every row ("0/N" = identical).
Rows with an oracle drafter say "emulated α" — their acceptance is not real. Open-loop rows
(Poisson / bursty arrivals) have their own table: per arrival rate, throughput, TTFT / TPOT
percentiles, the share of requests meeting both SLOs and goodput. Each measured target cost
curve is also written as ``cost_table-<model>.json`` (``cost_table``), the format
``cluster.speculation_policy.StepCostModel.from_table`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

PLOTS = ("throughput.png", "cost_curve.png", "acceptance.png", "goodput.png")


def write_results(results: dict, out_dir: str | Path, *, plots: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
    if plots:
        write_plots(results, out)
    return out


# ---------------------------------------------------------------------------- cost table, goodput
def cost_table(model: dict) -> dict:
    """A model's measured step costs in ``StepCostModel.from_table``'s format: ``verify`` =
    ``[[B, n, seconds]]`` (median of one target forward over B sequences x n new tokens each, at the
    curve's context), ``draft`` = ``[[B, seconds per drafted token]]`` (the first model draft's
    forward at n = 1, one draft level), when measured."""
    table = {"verify": [[r["batch"], r["tokens_per_seq"], r["median_s"]] for r in model["cost_curve"]]}
    if model.get("draft_cost_curve"):
        table["draft"] = [[r["batch"], r["median_s"]] for r in model["draft_cost_curve"]]
    return table


def arrival_series(row: dict) -> str:
    return row_name(row).replace("`", "")


def goodput_summary(model: dict) -> list[dict]:
    """Per open-loop configuration: the highest swept arrival rate at which the SLO attainment
    (median over the repetitions) reached the target (DistServe's goodput), None if none did."""
    out: dict[str, dict] = {}
    for row in model.get("arrival_rows") or []:
        name = arrival_series(row)
        entry = out.setdefault(name, {"configuration": name, "scenario": row["scenario"], "draft": row["draft"],
                                      "adaptive": row["adaptive"], "slo": row["slo"], "rates": [],
                                      "goodput_rate_rps": None})
        entry["rates"].append(row["rate_rps"])
        if row.get("meets_slo") and (entry["goodput_rate_rps"] is None or row["rate_rps"] > entry["goodput_rate_rps"]):
            entry["goodput_rate_rps"] = row["rate_rps"]
    for entry in out.values():
        entry["rates"].sort()
        entry["swept_max"] = entry["goodput_rate_rps"] is not None and entry["goodput_rate_rps"] == entry["rates"][-1]
    return list(out.values())


# ---------------------------------------------------------------------------- markdown
def _f(value, fmt: str = "{:.1f}", none: str = "–") -> str:
    return none if value is None else fmt.format(value)


def _spread(ms: dict, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    if not ms or ms.get("median") is None:
        return "–"
    return f"{fmt.format(ms['median'] * scale)} ({fmt.format(ms['min'] * scale)}–{fmt.format(ms['max'] * scale)})"


def row_name(row: dict) -> str:
    name = row["scenario"]
    draft = row.get("draft", "none")
    if draft and draft != "none":
        name += f" `{_short_draft(draft)}`"
    if row.get("adaptive") is not None:
        name += " adaptive" if row["adaptive"] else " fixed-k"
    if row.get("step_transport") == "ray":
        name += " [Ray call per step]"
    if row.get("run_ahead") is False:
        name += " [no run-ahead]"
    if row.get("draft_link") == "gloo" and row["scenario"].startswith("cluster-separate"):
        name += " [gloo link]"
    if row.get("emulated_alpha") is not None:
        name += f" (emulated α = {row['emulated_alpha']:g})"
    return name


def _short_draft(draft: str) -> str:
    parts = draft.split(":")
    return ":".join(Path(p).name if "/" in p else p for p in parts)


def _baseline(models: list[dict], model: dict, row: dict) -> float | None:
    """Target-only tok/s of the same path at the same concurrency: cluster rows over
    cluster-target-only, every other row over our reference loop (from any section of this model)."""
    want = "cluster-target-only" if row["scenario"].startswith("cluster") else "ours-target-only"
    for m in [model] + [x for x in models if x is not model and x["path"] == model["path"]]:
        for other in m["rows"]:
            if (other["scenario"] == want and other["concurrency"] == row["concurrency"]
                    and other.get("step_transport") == row.get("step_transport")
                    and other.get("run_ahead", True) == row.get("run_ahead", True)):
                return other["tok_s"]["median"]
    return None


def _greedy(row: dict) -> str:
    g = row["greedy"]
    text = f"{g['mismatched_requests']}/{g['requests']}"
    if g["mismatched_requests"]:
        text += f" ({g['match_rate']:.1%} tok)"
    return text


def _graphed_note(curve: list[dict]) -> str:
    """How the cost curve's points were run: CUDA graph replays (as the workers run them) or eager."""
    graphed = sum(bool(x.get("graphed")) for x in curve)
    if graphed == len(curve):
        return "every point replayed from a CUDA graph, as the workers run it"
    if graphed == 0:
        return "measured eagerly, without CUDA graphs"
    return (f"{graphed} of {len(curve)} points replayed from CUDA graphs as the workers run them, the rest "
            "(beyond the graph buckets) eager")


def _capture_notes(rows: list[dict]) -> list[str]:
    """Rows whose timed repetitions included CUDA graph captures (a bucket met for the first time):
    a one-time cost that a short repetition cannot amortise."""
    notes = []
    for row in rows:
        per_rep = [rep.get("metrics", {}) for rep in row.get("reps", [])]
        counts = [{k: int(v) for k, v in (m.get("graph_captures") or {}).items() if v} for m in per_rep]
        if not any(counts):
            continue
        seconds = [sum((m.get("graph_capture_s") or {}).values()) for m in per_rep]
        cells = ", ".join(
            (" + ".join(f"{n} {role}" for role, n in c.items()) + f" ({s * 1e3:.0f} ms)") if c else "none"
            for c, s in zip(counts, seconds))
        notes.append(f"- {row_name(row)}, c = {row['concurrency']}: {cells}")
    if not notes:
        return []
    return ["", "CUDA graphs captured inside timed repetitions (per repetition; a one-time cost of a bucket "
            "met for the first time, on the step's critical path):", ""] + notes


def _activity_notes(rows: list[dict]) -> list[str]:
    """Per timed repetition of each cluster row: target steps answered from a run-ahead (of all
    engine steps; undone ones in brackets), the steps whose decision drafted (k > 0; explore probes
    in brackets) and, where a draft ran, its calls and proposal wall time."""
    notes = []
    for row in rows:
        per_rep = [rep.get("metrics") or {} for rep in row.get("reps", [])]
        if not per_rep or "engine_steps" not in per_rep[0]:
            continue
        cells = []
        for m in per_rep:
            ahead = m.get("run_ahead") or {}
            cell = f"{int(ahead.get('used', 0))}/{int(m['engine_steps'])} run ahead"
            if ahead.get("discarded"):
                cell += f" ({int(ahead['discarded'])} undone)"
            decided = sum((m.get("decisions") or {}).values())
            if decided:
                drafting = decided - (m.get("k_at_most") or {}).get(0, (m.get("k_at_most") or {}).get("0", 0))
                explore = (m.get("decisions") or {}).get("explore", 0)
                cell += f", k > 0 on {int(drafting)}/{int(decided)} steps" + (f" ({int(explore)} explore)" if explore else "")
            if m.get("draft_count"):
                cell += (f", {int(m['draft_count'])} draft calls"
                         + (f" ({m['draft_propose_wall_s'] * 1e3:.0f} ms proposing)" if m.get("draft_propose_wall_s")
                            else "")
                         + (f", {int(m['draft_ahead_used'])} chains drafted ahead" if m.get("draft_ahead_used") else ""))
            cells.append(cell)
        if row.get("run_ahead", True) or any(m.get("draft_count") for m in per_rep):
            notes.append(f"- {row_name(row)}, c = {row['concurrency']}: " + "; ".join(cells))
    if not notes:
        return []
    return ["", "Per timed repetition: target steps answered from a run-ahead out of all engine steps, and the "
            "draft's calls:", ""] + notes


def _phase_notes(rows: list[dict]) -> list[str]:
    """Each cluster row's step profile: milliseconds per engine step in each phase of the engine,
    the target and the draft (``cluster.metrics.STEP_PHASES``), over all timed repetitions. Steps
    answered from a target run-ahead report no target phases (their work ran before they were asked)."""
    notes = []
    for row in rows:
        per_rep = [rep.get("metrics") or {} for rep in row.get("reps", [])]
        steps = sum(m.get("engine_steps", 0) for m in per_rep)
        if not steps or not any(m.get("phases") for m in per_rep):
            continue
        parts = []
        for role in ("engine", "target", "draft"):
            totals: dict[str, float] = {}
            for m in per_rep:
                for phase, seconds in ((m.get("phases") or {}).get(role) or {}).items():
                    totals[phase] = totals.get(phase, 0.0) + seconds
            cells = [f"{phase} {seconds / steps * 1e3:.2f}" for phase, seconds in totals.items() if seconds > 0]
            if cells:
                parts.append(f"{role}: " + ", ".join(cells))
        notes.append(f"- {row_name(row)}, c = {row['concurrency']}: " + "; ".join(parts))
    if not notes:
        return []
    return ["", "Step profile: milliseconds per engine step in each phase (engine: plan = choose k and send, "
            "wait = until the target's reply, apply = emit, between = the loop; target: wait_proposals, build, "
            "launch, verify = the forward's GPU time and acceptance, commit, emit; draft: recv_tokens, propose, "
            "send, speculate, ahead = the next chain drafted before it is asked for):", ""] + notes


EMULATION_SLACK = 0.15  # first-position acceptance this far below the emulated α is reported


def _emulation_notes(rows: list[dict]) -> list[str]:
    """Rows whose measured first-position acceptance falls well below their emulated α: the
    oracle proposes the target's recorded continuation, so once the target's outputs depart from
    the record (bf16 numerics of another batch composition) its tokens are wrong and the row
    measures a lower acceptance than its label says. Cluster rows re-record the continuation from
    each pass's real outputs (``oracle_retracked``), which leaves only the departures between one
    pass and the next (a batch composition or k that differs from the pass before)."""
    notes = []
    for row in rows:
        alpha, by_pos = row.get("emulated_alpha"), row.get("acceptance_by_position") or []
        if alpha is None or not by_pos or by_pos[0] >= alpha - EMULATION_SLACK:
            continue
        g = row.get("greedy") or {}
        notes.append(f"- {row_name(row)}, c = {row['concurrency']}: first-position acceptance {by_pos[0]:.2f}"
                     + (f"; greedy mismatches against the reference {g['mismatched_requests']}/{g['requests']}"
                        if g.get("mismatched_requests") else ""))
    if not notes:
        return []
    return ["", "Emulated acceptance not reached (the target's outputs departed from the oracle's recorded "
            "continuation, so its proposals were wrong from there on; these rows measure a lower α):", ""] + notes


def markdown(r: dict) -> str:
    env, fl = r["env"], r.get("floor") or {}
    lines = [f"# Outrider bench — {r['date']} — {r['name']}", ""]
    lines.append(
        f"Device **{env.get('device_name')}** ({env.get('device')}, driver {env.get('driver')}), torch {env['torch']}, "
        f"transformers {env['transformers']}, Ray {env.get('ray')}, Python {env['python']}, commit `{env['commit']}`. "
        f"dtype {r['dtype']}, greedy decoding.")
    cfg = r["config"]
    lines.append("")
    lines.append(
        f"Workload: {r.get('workload', {}).get('prompts', '?')} Spec-Bench prompts "
        f"({', '.join(r.get('workload', {}).get('categories', []))}; first turn, chat template), "
        f"max {cfg['max_tokens']} new tokens, prompts cut to {cfg['max_prompt_tokens']} tokens; "
        f"{cfg['num_draft_tokens']} draft tokens per step; {cfg['repetitions']} repetitions"
        f"{' after a warm-up' if cfg['warmup'] else ''}: each figure is the median (min–max).")
    if cfg["repetitions"] < 3:
        lines.append("")
        lines.append(f"**Fewer than 3 repetitions ({cfg['repetitions']}): not a reportable figure (PROTOCOL rule 2).**")
    if fl:
        lines += ["", (f"Measured floor: copy bandwidth **{fl['copy']['bytes_per_s'] / 1e9:.1f} GB/s** (read + "
                       f"write, {fl['copy']['buffer_bytes'] >> 20} MiB buffer), matmul "
                       f"**{fl['matmul']['flop_per_s'] / 1e12:.2f} TFLOP/s** ({fl['matmul']['dtype']}, "
                       f"{fl['matmul']['n']}³).")]
    lines += ["", ("Columns: tok/s = output tokens per second of the whole request set; × base = over "
              "target-only on the same path at the same concurrency (our reference loop; cluster rows: the "
              "cluster's target-only); τ = mean accepted length (tokens per target forward, bonus "
              "included); floor = tok/s over the bandwidth floor's tok/s for target-only decoding at that batch "
              "(weights + KV read once per step; > 1 only through speculation); greedy = requests whose output "
              "differs from our target-only output (token match rate if any); ctrl = control-plane share of the "
              "engine step ((wall per step − target forward) / wall per step).")]
    for model in r["models"]:
        lines += ["", f"## {model['label']}", ""]
        mf = model.get("floor", {})
        lines.append(
            f"`{model['path']}` — {model['num_layers']} layers, vocab {model['vocab_size']}, "
            f"{model['weight_bytes_per_step'] / 1e6:.0f} MB of weights read per step, KV "
            f"{model['kv_bytes_per_token'] / 1e3:.1f} kB/token; mean prompt {model['mean_prompt_tokens']:.0f} tokens; "
            f"batch-1 floor {_f(mf.get('step_s_batch1') and mf['step_s_batch1'] * 1e3, '{:.3f}')} ms/token "
            f"({_f(mf.get('tok_s_batch1'), '{:.0f}')} tok/s) at {mf.get('context_tokens', 0):.0f} tokens of context."
            + (" Prompts are synthetic token ids (no tokenizer)." if model.get("tokenizer") is None else ""))
        if model["is_shape"]:
            lines.append("")
            lines.append("Random weights: acceptance of real drafts here says nothing about real models; rows "
                         "marked *emulated α* use the oracle drafter (draft forward passes real, its tokens "
                         "replaced by the target's own with a seeded error rate).")
        rows = model["rows"]
        if rows:
            lines += ["", ("| scenario | c | tok/s median (min–max) | × base | τ | floor | greedy mismatches | "
                           "ctrl | TTFT p50 ms | TPOT p50 ms | GPUs |"),
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for row in sorted(rows, key=lambda x: (x["concurrency"], x["scenario"])):
                base = _baseline(r["models"], model, row)
                speed = row["tok_s"]["median"] / base if base and row["tok_s"]["median"] else None
                lines.append(
                    f"| {row_name(row)} | {row['concurrency']} | {_spread(row['tok_s'])} | {_f(speed, '{:.2f}×')} | "
                    f"{_f(row['mean_accepted_length']['median'], '{:.2f}')} | {_f(row.get('fraction_of_floor'), '{:.2f}')} | "
                    f"{_greedy(row)} | {_f(row['control_plane_share']['median'], '{:.0%}')} | "
                    f"{_spread(row.get('ttft_p50_s'), '{:.1f}', 1e3)} | {_spread(row.get('tpot_p50_s'), '{:.1f}', 1e3)} | "
                    f"{row['gpus']} |")
        links = {}
        for row in rows:  # measured once per cluster start, so once per scenario
            if row.get("draft_link_rtt_ms") is not None:
                links.setdefault(row_name(row), (row.get("draft_link"), row["draft_link_rtt_ms"]))
        if links:
            lines += ["", "Draft link (timed at connect: one proposal-sized message there and back):", ""]
            lines += [f"- {name}: {backend}, {rtt:.3f} ms" for name, (backend, rtt) in links.items()]
        lines += _capture_notes(rows)
        lines += _emulation_notes(rows)
        lines += _activity_notes([row for row in rows if row["scenario"].startswith("cluster")
                                  and row.get("concurrency") is not None])
        lines += _phase_notes([row for row in rows if row["scenario"].startswith("cluster")
                               and row.get("concurrency") is not None])
        cats = [row for row in rows if row.get("by_category")]
        base_row = next((x for x in rows if x["scenario"] == "ours-target-only" and x["concurrency"] == 1), None)
        if cats and base_row and base_row.get("by_category"):
            names = sorted(base_row["by_category"])
            lines += ["", "Per Spec-Bench category, concurrency 1: speedup over our target-only (τ)", "",
                      "| scenario | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
            for row in cats:
                cells = []
                for n in names:
                    e, b = row["by_category"].get(n), base_row["by_category"].get(n)
                    if not e or not b or not b["tok_s"]:
                        cells.append("–")
                        continue
                    tau = e.get("mean_accepted_length")
                    cells.append(f"{e['tok_s'] / b['tok_s']:.2f}×" + (f" ({tau:.2f})" if tau and row["k"] else ""))
                lines.append(f"| {row_name(row)} | " + " | ".join(cells) + " |")
        if model.get("cost_curve"):
            curve = model["cost_curve"]
            tokens = sorted({x["tokens_per_seq"] for x in curve})
            lines += ["", (f"Target step time, ms (B sequences × T new tokens each, {curve[0]['context']} tokens "
                           "of context; fraction of the floor max(bytes/bandwidth, FLOPs/matmul rate) in brackets)"),
                      "",
                      "| B \\ T | " + " | ".join(str(t) for t in tokens) + " |", "| --- |" + " ---: |" * len(tokens)]
            for b in sorted({x["batch"] for x in curve}):
                cells = []
                for t in tokens:
                    x = next((y for y in curve if y["batch"] == b and y["tokens_per_seq"] == t), None)
                    cells.append("–" if x is None else f"{x['median_s'] * 1e3:.2f} ({x['fraction_of_floor']:.2f})")
                lines.append(f"| {b} | " + " | ".join(cells) + " |")
        if model.get("draft_cost_curve"):
            d = model["draft_cost_curve"]
            lines += ["", f"Draft `{_short_draft(d[0]['draft'])}` step (T = 1): " + ", ".join(
                f"B={x['batch']}: {x['median_s'] * 1e3:.2f} ms ({_f(x.get('ratio_to_target_step'), '{:.2f}')} of a "
                "target step)" for x in d)]
        if model.get("cost_table_file"):
            lines += ["", (f"Cost table for the adaptive policy: `{Path(model['cost_table_file']).name}` "
                           "(`StepCostModel.from_table` format; `cost_table: FILE` in the cluster config, or "
                           f"OUTRIDER_COST_TABLE; {_graphed_note(model['cost_curve'])}).")]
        if model.get("cluster_cost_table"):
            lines += ["", f"Cluster rows: the speculation policy's cost model starts from `{model['cluster_cost_table']}`."]
        for x in rows:
            if x.get("compile"):
                c = x["compile"]
                lines += ["", (f"hf-compiled: static cache, torch.compile mode={c['mode']}, fullgraph={c['fullgraph']}"
                               f"{'' if c['compiled'] else ' (**not compiled**: transformers ran it eagerly)'}; "
                               f"compile {c['compile_s']:.1f} s (first call {c['first_call_s']:.1f} s, warm-up pass "
                               f"{c['warmup_s']:.1f} s), not in the timed figures.")]
        arrivals = model.get("arrival_rows") or []
        if arrivals:
            slo = arrivals[0]["slo"]
            lines += ["", (f"Open loop: {arrivals[0]['requests']} requests per rate, {arrivals[0]['arrival']} arrivals "
                           f"(seed {arrivals[0]['seed']}), cluster batch limit {arrivals[0]['max_running']}; TTFT and "
                           "TPOT from the scheduled arrival, as the client sees them; offered = the schedule's own "
                           "rate (requests / last arrival time). SLO: TTFT ≤ "
                           f"{slo['ttft_s'] * 1e3:.0f} ms and TPOT ≤ {slo['tpot_s'] * 1e3:.0f} ms; goodput = requests "
                           "meeting both per second."), "",
                      ("| scenario | rate req/s | offered | tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
                       "TPOT p99 ms | SLO met | goodput req/s | τ | greedy mismatches |"),
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for row in sorted(arrivals, key=lambda x: (arrival_series(x), x["rate_rps"])):
                lines.append(
                    f"| {row_name(row)} | {row['rate_rps']:g} | {_f(row.get('offered_rps'), '{:.2f}')} | "
                    f"{_spread(row['tok_s'])} | "
                    f"{_spread(row['ttft_p50_s'], '{:.1f}', 1e3)} | {_spread(row['ttft_p99_s'], '{:.1f}', 1e3)} | "
                    f"{_spread(row['tpot_p50_s'], '{:.1f}', 1e3)} | {_spread(row['tpot_p99_s'], '{:.1f}', 1e3)} | "
                    f"{_f(row['slo_attainment']['median'], '{:.0%}')} | {_spread(row['goodput_rps'], '{:.2f}')} | "
                    f"{_f(row['mean_accepted_length']['median'], '{:.2f}')} | {_greedy(row)} |")
            lines.append("")
            for g in goodput_summary(model):
                rate = g["goodput_rate_rps"]
                lines.append(f"- {g['configuration']}: goodput "
                             + (f"**{rate:g} req/s**" + (" (the highest rate swept: a lower bound)" if g["swept_max"]
                                                          else "") if rate is not None
                                else f"below the lowest rate swept ({g['rates'][0]:g} req/s)")
                             + f" (≥ {slo['attainment']:.0%} of requests within both SLOs)")
    if r.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s['what']}: {s['why']}" for s in r["skipped"]]
    if r.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['what']}: `{e['error']}`" for e in r["errors"]]
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if r.get("elapsed_s") is not None:
        lines += ["", f"Run time {r['elapsed_s']:.0f} s."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def write_plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    empty = [{"label": "(no data)", "rows": []}]

    def with_data(test) -> list[dict]:  # one panel per model section that has data for the plot
        return [m for m in results["models"] if test(m)] or empty

    models = with_data(lambda m: any(r["tok_s"]["median"] is not None for r in m["rows"]))
    n = len(models)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        series: dict[str, list] = {}
        for row in model["rows"]:
            if row["tok_s"]["median"] is not None:
                series.setdefault(row_name(row).replace("`", ""), []).append(
                    (row["concurrency"], row["tok_s"]["median"], row["tok_s"]["min"], row["tok_s"]["max"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel("output tokens/s")
        ax.set_title(model["label"], fontsize=9)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    models = with_data(lambda m: bool(m.get("cost_curve")))
    n = len(models)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        curve = model.get("cost_curve") or []
        for b in sorted({x["batch"] for x in curve}):
            pts = sorted((x["tokens_per_seq"], x["median_s"] * 1e3) for x in curve if x["batch"] == b)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"target, B={b}")
        for x in model.get("draft_cost_curve") or []:
            ax.plot([1], [x["median_s"] * 1e3], marker="x", linestyle="none",
                    label=f"draft {_short_draft(x['draft'])}, B={x['batch']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens verified per sequence (T)")
        ax.set_ylabel("step time, ms")
        ax.set_title(model["label"], fontsize=9)
        ax.grid(alpha=0.3)
        if curve:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "cost_curve.png", dpi=110)
    plt.close(fig)

    models = with_data(lambda m: any(r["concurrency"] == 1 and r.get("acceptance_by_position") for r in m["rows"]))
    n = len(models)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        drawn = False
        for row in model["rows"]:
            acc = row.get("acceptance_by_position")
            if row["concurrency"] != 1 or not acc:
                continue
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=row_name(row).replace("`", ""))
            drawn = True
        ax.set_xlabel("draft position")
        ax.set_ylabel("accepted / proposed at this position")
        ax.set_ylim(0, 1.05)
        ax.set_title(model["label"] + " — concurrency 1", fontsize=9)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=110)
    plt.close(fig)

    models = with_data(lambda m: bool(m.get("arrival_rows")))
    n = len(models)
    fig, axes = plt.subplots(2, n, figsize=(6 * n, 8), squeeze=False)
    for col, model in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        series: dict[str, list] = {}
        for row in model.get("arrival_rows") or []:
            series.setdefault(arrival_series(row), []).append(row)
        rates = sorted({r["rate_rps"] for rows in series.values() for r in rows})
        for name, rows in sorted(series.items()):
            rows = sorted(rows, key=lambda r: r["rate_rps"])
            xs = [r["rate_rps"] for r in rows]
            g = [r["goodput_rps"] for r in rows]
            top.errorbar(xs, [x["median"] for x in g], yerr=[[x["median"] - x["min"] for x in g],
                                                              [x["max"] - x["median"] for x in g]],
                         marker="o", capsize=3, label=name)
            bottom.plot(xs, [r["slo_attainment"]["median"] for r in rows], marker="o", label=name)
        if rates:
            top.plot(rates, rates, linestyle=":", color="grey", label="every request within SLO")
            slo = (model["arrival_rows"][0])["slo"]
            bottom.axhline(slo["attainment"], linestyle=":", color="grey")
            top.set_title(f"{model['label']} — SLO TTFT ≤ {slo['ttft_s'] * 1e3:.0f} ms, "
                          f"TPOT ≤ {slo['tpot_s'] * 1e3:.0f} ms", fontsize=9)
            top.legend(fontsize=6)
        else:
            top.set_title(model["label"], fontsize=9)
        for ax in (top, bottom):
            if rates and rates[-1] >= 4 * rates[0]:  # a geometric sweep
                ax.set_xscale("log", base=2)
            ax.set_xlabel("arrival rate, requests/s (open loop)")
            ax.grid(alpha=0.3)
        top.set_ylabel("goodput, requests/s within both SLOs")
        bottom.set_ylabel("share of requests within both SLOs")
        bottom.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(out / "goodput.png", dpi=110)
    plt.close(fig)
