"""``outrider bench`` on CPU with a tiny checkpoint: every scenario kind runs once and writes its files.

One Ray instance for the module (fake GPUs; the harness joins it). The greedy match check must be
real: a deliberately wrong "speculative" output is reported as mismatches.
"""

import json
import math
import os
import statistics

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import ray

from actors.spec import reference
from actors.spec.proposers import parse_draft_spec
from cluster.bench import BenchConfig, greedy_match, run_bench
from cluster.bench.config import arrival_times
from cluster.bench.models import shape_hf_config, shape_tensor_shapes
from cluster.bench.scenarios import arrival_stats
from cluster.cli import main
from cluster.speculation_policy import StepCostModel
from tests.tiny_models import write_tiny_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", arch="llama", num_layers=2,
                                     with_tokenizer=True))


PROMPTS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a short note about a trip to the sea."]},
    {"question_id": 2, "category": "qa", "turns": ["What is the boiling point of water at sea level?"]},
    {"question_id": 3, "category": "summarization", "turns": ["Summarize: the cat sat on the mat all day."]},
    {"question_id": 4, "category": "translation", "turns": ["Translate to French: good morning, friends."]},
]


@pytest.fixture(scope="module", autouse=True)
def prompts_file(tmp_path_factory):
    """A small Spec-Bench-shaped file, so the tests need nothing beside the repository."""
    path = tmp_path_factory.mktemp("prompts") / "specbench.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    global PROMPTS_FILE
    PROMPTS_FILE = str(path)
    return path


PROMPTS_FILE = ""


def tiny_config(checkpoint, out, **fields):
    base = {"models": [checkpoint], "categories": ["writing", "qa"], "per_category": 1, "max_tokens": 6,
            "max_prompt_tokens": 40, "repetitions": 1, "concurrency": [1, 2], "cost_batches": [1, 2],
            "cost_tokens": [1, 4], "cost_context": 16, "cpus_per_worker": 0, "out_dir": str(out),
            "warmup": False, "prompts_file": PROMPTS_FILE}  # the CLI test runs the warm-up pass
    return BenchConfig(**{**base, **fields})


def test_greedy_match_counts():
    ref = [[1, 2, 3, 4], [5, 6]]
    same = greedy_match(ref, [[1, 2, 3, 4], [5, 6], [1, 2, 3, 4]], [0, 1, 0])
    assert same["mismatched_requests"] == 0 and same["mismatched_tokens"] == 0 and same["match_rate"] == 1.0
    wrong = greedy_match(ref, [[1, 2, 9, 4], [5, 6]], [0, 1])
    assert wrong["mismatched_requests"] == 1 and wrong["mismatched_tokens"] == 2 and wrong["first_divergence"] == [2]
    short = greedy_match(ref, [[1, 2, 3], [5, 6, 7]], [0, 1])  # too short, too long: both mismatches
    assert short["mismatched_requests"] == 2


def test_every_scenario_kind(ray_local, checkpoint, tmp_path):
    scenarios = ["cost-curve", "ours-target-only", "ours-spec", "hf-target-only", "hf-assisted", "hf-lookup",
                 "cluster-colocated-turns", "cluster-separate-overlap"]
    results = run_bench(tiny_config(checkpoint, tmp_path, scenarios=scenarios, cluster_draft="oracle:0.9:self:1",
                                    drafts=["lookup", "self:1", "oracle:0.9:self:1"], cost_tokens=[1, 2, 4],
                                    cluster_cost_table="measured", arrival_rates=[4.0, 400.0], arrival_requests=4,
                                    slo_ttft_s=5.0, slo_tpot_s=1.0))
    assert results["errors"] == []
    assert ray.is_initialized()  # the harness joined the module's Ray and left it running
    (model,) = results["models"]
    rows = model["rows"]
    seen = {(r["scenario"], r["draft"], r["concurrency"]) for r in rows}
    for draft in ("lookup", "self:1", "oracle:0.9:self:1"):
        assert {("ours-spec", draft, 1), ("ours-spec", draft, 2)} <= seen
    assert {("ours-target-only", "none", 1), ("ours-target-only", "none", 2), ("hf-target-only", "none", 1),
            ("hf-lookup", "lookup", 1), ("hf-assisted", "self:1", 1)} <= seen
    oracle = "oracle:0.9:self:1"  # the cluster rows: emulated acceptance through the draft worker
    assert {("cluster-colocated-turns", oracle, 1), ("cluster-colocated-turns", oracle, 2),
            ("cluster-separate-overlap", oracle, 2)} <= seen
    for row in rows:  # fp32: every configuration reproduces target-only exactly
        assert row["greedy"]["mismatched_requests"] == 0, row["scenario"]
        assert row["tok_s"]["median"] > 0
    for row in rows:
        if row["draft"].startswith("oracle"):
            assert row["emulated_alpha"] == 0.9 and row["mean_accepted_length"]["median"] > 1.5, row["scenario"]
    for row in rows:
        if row["scenario"].startswith("cluster"):
            metrics = row["reps"][0]["metrics"]
            assert metrics["engine_steps"] > 0
            assert metrics["graph_captures"] == {"target": 0, "draft": 0}  # CPU: eager, nothing captured
            assert metrics["draft_propose_wall_s"] > 0  # every cluster row here drafts
            # every decoding step ran a fixed-k decision (prefill-only steps decide nothing)
            decided = metrics["decisions"]["fixed"] + metrics["decisions"]["capped"]
            assert 0 < decided == sum(metrics["decisions"].values()) <= metrics["engine_steps"]
            assert metrics["k_at_most"][0] < decided  # k = 1 or 2 drafted on some of them
            # the oracle re-recorded each pass's real outputs, one record per request
            assert all(rep["oracle_retracked"] == len(rep["per_request"]) for rep in row["reps"]), row["scenario"]
            assert 0.0 <= row["control_plane_share"]["median"] <= 1.0
            assert row["gpus"] == (2 if "separate" in row["scenario"] else 1)
            assert row["draft_link"] == "gloo" and row["draft_link_rtt_ms"] > 0  # CPU: gloo, timed at connect
            # the step profile: every role reported, and its parts fit inside the measured wall time
            phases = metrics["phases"]
            assert phases["engine"]["wait"] > 0 and phases["target"]["verify"] > 0
            assert phases["draft"]["propose"] > 0 and phases["target"]["wait_proposals"] > 0
            assert sum(phases["engine"].values()) <= row["reps"][0]["wall_s"] * 1.05
            assert sum(phases["target"].values()) <= phases["engine"]["wait"] * 1.05
    assert {(x["batch"], x["tokens_per_seq"]) for x in model["cost_curve"]} == {(b, n) for b in (1, 2) for n in (1, 2, 4)}
    assert not any(x["graphed"] for x in model["cost_curve"])  # CPU: the workers' runner runs eagerly
    assert model["draft_cost_curve"] and results["floor"]["copy"]["bytes_per_s"] > 0
    by_cat = next(r for r in rows if r["scenario"] == "ours-target-only" and r["concurrency"] == 1)["by_category"]
    assert set(by_cat) == {"writing", "qa"}

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["env"]["torch"] and saved["env"]["commit"] and len(saved["models"][0]["rows"]) == len(rows)
    md = (tmp_path / "results.md").read_text()
    assert "| scenario | c | tok/s median (min–max)" in md and "emulated α = 0.9" in md
    assert "cluster-separate-overlap" in md and "Per Spec-Bench category" in md
    assert "Draft link (timed at connect" in md and "Step profile: milliseconds per engine step" in md
    for png in ("throughput.png", "cost_curve.png", "acceptance.png", "goodput.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG
    check_arrivals(model, md, ("cluster-colocated-turns", "cluster-separate-overlap"), (4.0, 400.0), 4)
    check_cost_table(model, md, tmp_path)


def test_wrong_speculative_output_is_reported(checkpoint, tmp_path, monkeypatch):
    real = reference.generate

    def broken(target, prompts, params, *, proposer=None, **kwargs):
        results = real(target, prompts, params, proposer=proposer, **kwargs)
        if proposer is not None:  # a "speculative" path that gets the last token wrong
            for r in results:
                r.token_ids[-1] = (r.token_ids[-1] + 1) % target.config.vocab_size
        return results

    monkeypatch.setattr(reference, "generate", broken)
    results = run_bench(tiny_config(checkpoint, tmp_path, scenarios=["ours-target-only", "ours-spec"],
                                    drafts=["lookup"], concurrency=[1], plots=False))
    rows = {r["scenario"]: r for r in results["models"][0]["rows"]}
    assert rows["ours-target-only"]["greedy"]["mismatched_requests"] == 0
    assert rows["ours-spec"]["greedy"]["mismatched_requests"] == 2
    assert rows["ours-spec"]["greedy"]["mismatched_tokens"] == 2
    assert "| 1/2 |" not in (tmp_path / "results.md").read_text()
    assert "2/2 (" in (tmp_path / "results.md").read_text()


def test_cli_bench(checkpoint, tmp_path, capsys):
    rc = main(["bench", "--model", f"{checkpoint}@lookup", "--scenarios", "ours-target-only,ours-spec",
               "--prompts", PROMPTS_FILE,
               "--concurrency", "1", "--max-tokens", "4", "--categories", "qa", "--repetitions", "1",
               "--max-prompt-tokens", "32", "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())["models"][0]["rows"]
    assert [r["draft"] for r in rows] == ["none", "lookup"]
    assert main(["bench", "--scenarios", "nope"]) == 2
    assert main(["bench", "--concurrency", "0"]) == 2


def test_shapes_and_oracle_spec():
    config = shape_hf_config("8B")
    shapes = shape_tensor_shapes(config)
    params = sum(a * (b if len(s) > 1 else 1) for s in shapes.values() for a, b in [(s[0], s[-1])])
    assert 7.9e9 < params < 8.1e9  # Llama-3.1-8B: 8.03 B parameters
    one_b = shape_tensor_shapes(shape_hf_config("1B"))
    assert 1.2e9 < sum(s[0] * (s[1] if len(s) > 1 else 1) for s in one_b.values()) < 1.3e9  # tied: 1.24 B
    assert parse_draft_spec("oracle:0.5:self:4") == ("oracle", (0.5, "self:4"))
    with pytest.raises(ValueError):
        parse_draft_spec("oracle:1.5:self:4")


# ---------------------------------------------------------------------------- open loop (Poisson arrivals)
def test_arrival_times_are_seeded_poisson():
    times = arrival_times(5.0, 4000, seed=3)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g > 0 for g in gaps) and times == sorted(times)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 5.0, rel=0.06)  # exponential gaps: mean 1/rate ...
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, abs=0.08)  # ... and coefficient of variation 1
    assert sum(g < mean for g in gaps) / len(gaps) == pytest.approx(1 - math.exp(-1), abs=0.03)  # P(gap < mean)
    assert arrival_times(5.0, 4000, seed=3) == times  # seeded: the same schedule in every run
    assert arrival_times(5.0, 50, seed=4) != times[:50]
    bursty = arrival_times(5.0, 4000, seed=3, cv=3.0)
    bgaps = [b - a for a, b in zip([0.0] + bursty, bursty)]
    assert statistics.fmean(bgaps) == pytest.approx(0.2, rel=0.15)
    assert statistics.pstdev(bgaps) / statistics.fmean(bgaps) == pytest.approx(3.0, rel=0.15)
    with pytest.raises(ValueError):
        arrival_times(0.0, 3)


def test_arrival_stats_slo_and_goodput():
    recs = [{"tokens": 5, "ttft_s": 0.1, "tpot_s": 0.01},  # meets both
            {"tokens": 5, "ttft_s": 0.9, "tpot_s": 0.01},  # TTFT too late
            {"tokens": 5, "ttft_s": 0.1, "tpot_s": 0.30},  # too slow per token
            {"tokens": 1, "ttft_s": 0.2, "tpot_s": None},  # one token: no TPOT to miss
            {"error": "EngineOverloadedError: full"}]  # rejected: misses
    s = arrival_stats(recs, 2.0, slo_ttft_s=0.5, slo_tpot_s=0.05)
    assert s["slo_met"] == 2 and s["slo_attainment"] == pytest.approx(0.4) and s["goodput_rps"] == pytest.approx(1.0)
    assert s["completed"] == 4 and s["failed"] == 1 and s["tok_s"] == pytest.approx(8.0)
    assert s["ttft_p50_s"] in (0.1, 0.2) and s["ttft_p99_s"] == 0.9


def check_arrivals(model, md, scenarios, rates, n):
    """The open-loop rows of a run with lenient SLOs: one per (scenario, rate), on the seeded schedule."""
    arrivals = model["arrival_rows"]
    assert {(r["scenario"], r["rate_rps"]) for r in arrivals} == {(s, rate) for s in scenarios for rate in rates}
    for row in arrivals:
        rep = row["reps"][0]
        assert row["requests"] == n and len(rep["per_request"]) == n and rep["failed"] == 0
        assert row["schedule_s"] == arrival_times(row["rate_rps"], n, seed=0)  # the seeded schedule
        assert row["greedy"]["mismatched_requests"] == 0, row["scenario"]
        assert row["tok_s"]["median"] > 0 and row["ttft_p50_s"]["median"] > 0 and row["tpot_p99_s"]["median"] > 0
        assert row["ttft_p50_s"]["median"] <= row["ttft_p99_s"]["median"]
        assert row["slo_attainment"]["median"] == 1.0 and row["meets_slo"]  # lenient SLOs: every request meets
        assert row["goodput_rps"]["median"] == pytest.approx(n / rep["duration_s"])
        assert rep["duration_s"] >= row["schedule_s"][-1]  # the last request is sent on schedule, not before
    assert {g["configuration"].split()[0]: g["goodput_rate_rps"] for g in model["goodput"]} == {
        s: max(rates) for s in scenarios}
    assert "| scenario | rate req/s | offered | tok/s |" in md and f"goodput **{max(rates):g} req/s**" in md


def check_cost_table(model, md, out):
    """The run's cost curve as a table: from_table's format, monotone in tokens, used by the cluster rows."""
    path = out / "cost_table-tiny.json"
    assert model["cost_table_file"] == str(path) and model["cluster_cost_table"] == str(path)
    table = json.loads(path.read_text())
    assert set(table) == {"verify", "draft"}
    assert sorted((b, n) for b, n, _ in table["verify"]) == sorted(
        (x["batch"], x["tokens_per_seq"]) for x in model["cost_curve"])
    assert [b for b, _ in table["draft"]] == [x["batch"] for x in model["draft_cost_curve"]]
    costs = StepCostModel.from_table(path)
    one = next(x["median_s"] for x in model["cost_curve"] if x["batch"] == 1 and x["tokens_per_seq"] == 1)
    assert costs.verify_time(1, 1) == pytest.approx(one, rel=0.5)  # isotonic smoothing aside
    times = [costs.verify_time_for_tokens(t) for t in (1, 2, 4, 8, 16, 64, 256)]
    assert all(t > 0 for t in times) and times == sorted(times)  # monotone in the tokens verified
    # per level at batch 1: the measured value, or its isotonic pool when a noisy CPU timed a larger
    # batch faster (the curve is kept non-decreasing in the batch)
    per_level = [s for _, s in table["draft"]]
    assert min(per_level) * (1 - 1e-9) <= costs.draft_time(1, 1) <= max(per_level) * (1 + 1e-9)
    assert costs.draft_time(1, 3) == pytest.approx(3 * costs.draft_time(1, 1), rel=1e-9)
    assert "cost_table-tiny.json" in md


def test_hf_compiled_skips_on_cpu_and_survives_a_failed_compile(checkpoint, tmp_path, monkeypatch):
    results = run_bench(tiny_config(checkpoint, tmp_path, scenarios=["hf-target-only", "hf-compiled"],
                                    concurrency=[1], plots=False))
    assert results["errors"] == [] and [r["scenario"] for r in results["models"][0]["rows"]] == ["hf-target-only"]
    (skip,) = [s for s in results["skipped"] if "hf-compiled" in s["what"]]
    assert "CUDA only" in skip["why"] and "--hf-compile on" in skip["why"]
    assert "hf-compiled" in (tmp_path / "results.md").read_text()  # listed under Skipped

    import torch

    calls = []

    def broken_compile(fn, **kwargs):  # inductor unavailable: the compiled call raises when first run
        calls.append(kwargs)

        def run(*args, **kw):
            raise RuntimeError("inductor: no compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    results = run_bench(tiny_config(checkpoint, tmp_path / "forced", scenarios=["hf-compiled"], concurrency=[1],
                                    hf_compile="on", plots=False))
    assert results["errors"] == [] and results["models"][0]["rows"] == []
    assert [c["fullgraph"] for c in calls] == [True, False] and calls[0]["mode"] == "reduce-overhead"
    (skip,) = [s for s in results["skipped"] if "hf-compiled" in s["what"]]
    assert "torch.compile failed" in skip["why"] and "inductor: no compiler" in skip["why"]


def test_cli_bench_arrival_flags(tmp_path):
    assert main(["bench", "--arrival-rates", "0", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--arrival-rates", "2,x", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--arrival-cv", "0", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--slo-attainment", "1.5", "--out", str(tmp_path)]) == 2


def test_step_transport_both_gives_each_transport_its_own_baseline(ray_local, checkpoint, tmp_path):
    """--step-transport both: the cluster rows run with a Ray call per step and with the step channel,
    each row over the target-only row of its own transport, and both greedy-identical to target-only."""
    results = run_bench(tiny_config(checkpoint, tmp_path, scenarios=["cluster-target-only"], concurrency=[1],
                                    step_transport="both", plots=False))
    assert results["errors"] == []
    rows = results["models"][0]["rows"]
    assert sorted(r["step_transport"] for r in rows) == ["ray", "socket"]
    assert all(r["greedy"]["mismatched_requests"] == 0 for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert "cluster-target-only [Ray call per step]" in md
    assert md.count("| 1.00× |") >= 2  # each transport's row is its own baseline
    with pytest.raises(ValueError, match="step_transport must be socket, ray or both"):
        tiny_config(checkpoint, tmp_path, step_transport="grpc").validate()


def test_run_ahead_both_gives_each_setting_its_own_row_and_baseline(ray_local, checkpoint, tmp_path):
    """--run-ahead both: cluster-target-only without and with the target running steps ahead, each
    its own baseline, both greedy-identical; the per-rep metrics count the steps run ahead. With
    --capture-at-start the rows record what each worker captured at start."""
    results = run_bench(tiny_config(checkpoint, tmp_path, scenarios=["cluster-target-only"], concurrency=[1],
                                    run_ahead="both", max_tokens=12, capture_at_start=True, plots=False))
    assert results["errors"] == []
    rows = {r["run_ahead"]: r for r in results["models"][0]["rows"]}
    # --capture-at-start reaches the workers (nothing to capture on CPU)
    assert all(r["captured_at_start"]["target"]["shapes"] > 0 for r in rows.values())
    assert set(rows) == {False, True}
    assert all(r["greedy"]["mismatched_requests"] == 0 for r in rows.values())
    assert all(rep["metrics"]["run_ahead"]["used"] > 0 for rep in rows[True]["reps"])
    assert all(rep["metrics"]["run_ahead"]["used"] == 0 for rep in rows[False]["reps"])
    md = (tmp_path / "results.md").read_text()
    assert "cluster-target-only [no run-ahead]" in md
    assert md.count("| 1.00× |") >= 2
    with pytest.raises(ValueError, match="run_ahead must be on, off or both"):
        tiny_config(checkpoint, tmp_path, run_ahead="yes").validate()


def test_draft_link_both_runs_separate_rows_per_link(ray_local, checkpoint, tmp_path):
    """--draft-link both: each separate-GPU row once with the automatic link and once forced to gloo
    (both gloo on CPU), each reporting the link's measured round trip; other rows run once."""
    results = run_bench(tiny_config(checkpoint, tmp_path, scenarios=["cluster-target-only", "cluster-separate-turns"],
                                    cluster_draft="oracle:0.9:self:1", concurrency=[1], draft_link="both",
                                    plots=False))
    assert results["errors"] == []
    rows = results["models"][0]["rows"]
    assert sorted(r["scenario"] for r in rows) == ["cluster-separate-turns"] * 2 + ["cluster-target-only"]
    assert all(r["greedy"]["mismatched_requests"] == 0 for r in rows)
    assert all(r["draft_link_rtt_ms"] > 0 for r in rows if r["scenario"] == "cluster-separate-turns")
    with pytest.raises(ValueError, match="draft_link must be auto, gloo or both"):
        tiny_config(checkpoint, tmp_path, draft_link="tcp").validate()


def test_report_names_graph_captures_inside_timed_repetitions():
    """Captures during timed repetitions are listed per row and repetition; none, no section."""
    from cluster.bench.report import _capture_notes

    def row(captures):
        return {"scenario": "cluster-colocated-overlap", "draft": "self:1", "k": 4, "adaptive": True,
                "concurrency": 8, "emulated_alpha": None,
                "reps": [{"metrics": {"graph_captures": c, "graph_capture_s": {"target": 0.0, "draft": 0.03 * c["draft"]}}}
                         for c in captures]}

    quiet = row([{"target": 0, "draft": 0}] * 3)
    assert _capture_notes([quiet]) == []
    notes = _capture_notes([quiet, row([{"target": 0, "draft": 2}, {"target": 0, "draft": 0}, {"target": 0, "draft": 0}])])
    assert "CUDA graphs captured inside timed repetitions" in notes[1]
    assert notes[-1].endswith(": 2 draft (60 ms), none, none") and "c = 8" in notes[-1]


def test_report_lists_run_ahead_and_draft_activity_per_repetition():
    from cluster.bench.report import _activity_notes

    def row(run_ahead, metrics, **extra):
        return {"scenario": "cluster-target-only", "concurrency": 1, "run_ahead": run_ahead,
                "reps": [{"metrics": m} for m in metrics], **extra}

    off = row(False, [{"engine_steps": 50, "run_ahead": {"used": 0, "discarded": 0}}])
    assert _activity_notes([off]) == []  # nothing ran ahead and no draft: no line
    on = row(True, [{"engine_steps": 50, "run_ahead": {"used": 47, "discarded": 1}},
                    {"engine_steps": 50, "run_ahead": {"used": 48, "discarded": 0}}])
    spec = row(True, [{"engine_steps": 40, "run_ahead": {"used": 30, "discarded": 0}, "draft_count": 4,
                       "draft_propose_wall_s": 0.021, "k_at_most": {0: 36, 1: 40},
                       "decisions": {"goodput": 38, "explore": 2}}], scenario="cluster-colocated-overlap", adaptive=True)
    notes = _activity_notes([off, on, spec])
    assert notes[-2] == "- cluster-target-only, c = 1: 47/50 run ahead (1 undone); 48/50 run ahead"
    assert notes[-1].endswith("c = 1: 30/40 run ahead, k > 0 on 4/40 steps (2 explore), 4 draft calls (21 ms proposing)")


def test_cost_table_note_says_how_the_curve_was_run():
    from cluster.bench.report import _graphed_note

    assert _graphed_note([{"graphed": False}] * 3) == "measured eagerly, without CUDA graphs"
    assert _graphed_note([{"graphed": True}] * 2).startswith("every point replayed from a CUDA graph")
    assert _graphed_note([{"graphed": True}, {"graphed": False}]).startswith("1 of 2 points replayed")


def test_report_flags_rows_whose_emulated_acceptance_was_not_reached():
    from cluster.bench.report import _emulation_notes

    def row(c, first, mismatched=0):
        return {"scenario": "cluster-colocated-overlap", "draft": "oracle:0.8:self:4", "adaptive": False, "k": 4,
                "concurrency": c, "emulated_alpha": 0.8, "acceptance_by_position": [first, 0.7],
                "greedy": {"mismatched_requests": mismatched, "requests": 8}}

    assert _emulation_notes([row(1, 0.84), row(1, 0.7)]) == []  # within the slack
    notes = _emulation_notes([row(1, 0.84), row(8, 0.25, mismatched=4)])
    assert "Emulated acceptance not reached" in notes[1]
    assert notes[-1].endswith("c = 8: first-position acceptance 0.25; greedy mismatches against the reference 4/8")
    assert _emulation_notes([{**row(8, 0.1), "emulated_alpha": None}]) == []  # a real draft: no claim
