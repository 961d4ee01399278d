"""Writes a run's results: ``results.json`` (every raw number), ``results.md`` (tables), PNG plots.

Tables give the median over the repetitions with the min–max spread, the speedup over our own
target-only at the same concurrency, the mean accepted length τ, each figure as a fraction of its
bandwidth floor, and the greedy match against target-only for every row ("0/N" = identical).
Rows with an oracle drafter say "emulated α" — their acceptance is not real.
"""

from __future__ import annotations

import json
from pathlib import Path

PLOTS = ("throughput.png", "cost_curve.png", "acceptance.png")


def write_results(results: dict, out_dir: str | Path, *, plots: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
    if plots:
        write_plots(results, out)
    return out


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
            if other["scenario"] == want and other["concurrency"] == row["concurrency"]:
                return other["tok_s"]["median"]
    return None


def _greedy(row: dict) -> str:
    g = row["greedy"]
    text = f"{g['mismatched_requests']}/{g['requests']}"
    if g["mismatched_requests"]:
        text += f" ({g['match_rate']:.1%} tok)"
    return text


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
