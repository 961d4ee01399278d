"""``outrider bench`` on CPU with a tiny checkpoint: every scenario kind runs once and writes its files.

One Ray instance for the module (fake GPUs; the harness joins it). The greedy match check must be
real: a deliberately wrong "speculative" output is reported as mismatches.
"""

import json
import os

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import ray

from actors.spec import reference
from actors.spec.proposers import parse_draft_spec
from cluster.bench import BenchConfig, greedy_match, run_bench
from cluster.bench.models import shape_hf_config, shape_tensor_shapes
from cluster.cli import main
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
                                    drafts=["lookup", "self:1", "oracle:0.9:self:1"]))
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
            assert row["reps"][0]["metrics"]["engine_steps"] > 0
            assert 0.0 <= row["control_plane_share"]["median"] <= 1.0
            assert row["gpus"] == (2 if "separate" in row["scenario"] else 1)
    assert {(x["batch"], x["tokens_per_seq"]) for x in model["cost_curve"]} == {(1, 1), (1, 4), (2, 1), (2, 4)}
    assert model["draft_cost_curve"] and results["floor"]["copy"]["bytes_per_s"] > 0
    by_cat = next(r for r in rows if r["scenario"] == "ours-target-only" and r["concurrency"] == 1)["by_category"]
    assert set(by_cat) == {"writing", "qa"}

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["env"]["torch"] and saved["env"]["commit"] and len(saved["models"][0]["rows"]) == len(rows)
    md = (tmp_path / "results.md").read_text()
    assert "| scenario | c | tok/s median (min–max)" in md and "emulated α = 0.9" in md
    assert "cluster-separate-overlap" in md and "Per Spec-Bench category" in md
    for png in ("throughput.png", "cost_curve.png", "acceptance.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


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
