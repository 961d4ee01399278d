"""``outrider generate`` on tiny random checkpoints (control plane calling the data plane)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from tests.tiny_models import write_tiny_checkpoint, write_tiny_tokenizer

PROMPT = "the cat and the hat"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-models")
    target = write_tiny_checkpoint(root / "target", num_layers=4, seed=0)
    draft = write_tiny_checkpoint(root / "draft", num_layers=2, seed=1)
    other = write_tiny_checkpoint(root / "other-tokenizer", num_layers=2, seed=2, with_tokenizer=False)
    write_tiny_tokenizer(other, variant=1)
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((target / "config.json").read_text())
    write_tiny_tokenizer(no_weights)
    no_tokenizer = write_tiny_checkpoint(root / "no-tokenizer", num_layers=2, with_tokenizer=False)
    return {"target": target, "draft": draft, "other": other, "no_weights": no_weights,
            "no_tokenizer": no_tokenizer}


def run_json(capsys, *args: str) -> dict:
    assert main(["generate", "--json", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON document, nothing else on stdout


def run_error(capsys, *args: str) -> str:
    assert main(["generate", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err


def test_json_shape_and_types(models, capsys):
    result = run_json(capsys, "--model", str(models["target"]), "--prompt", PROMPT, "--max-tokens", "12",
                      "--draft", "self:2")
    assert isinstance(result["text"], str)
    ids = result["token_ids"]
    assert isinstance(ids, list) and 1 <= len(ids) <= 12 and all(type(t) is int for t in ids)
    stats = result["stats"]
    assert type(stats["target_forward_passes"]) is int and stats["target_forward_passes"] >= 1
    assert isinstance(stats["mean_accepted_length"], (int, float))
    lengths = stats["accepted_lengths"]
    assert isinstance(lengths, list) and all(type(n) is int and 1 <= n <= 5 for n in lengths)
    assert result["finish_reason"] in ("stop", "length")
    assert result["draft"] == "self:2"


def test_greedy_output_is_the_same_with_and_without_a_draft(models, capsys):
    common = ["--model", str(models["target"]), "--prompt", PROMPT, "--max-tokens", "24"]
    plain = run_json(capsys, *common, "--draft", "none")
    for draft in ("self:1", str(models["draft"])):
        spec = run_json(capsys, *common, "--draft", draft, "--num-draft-tokens", "3")
        assert spec["token_ids"] == plain["token_ids"]
        assert spec["text"] == plain["text"]
        assert spec["stats"]["accepted_lengths"]
    assert plain["stats"]["target_forward_passes"] == len(plain["token_ids"])


def test_seeded_sampling_is_reproducible(models, capsys):
    args = ["--model", str(models["target"]), "--prompt", PROMPT, "--max-tokens", "16",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "7"]
    first = run_json(capsys, *args, "--draft", "self:2")
    again = run_json(capsys, *args, "--draft", "self:2")
    assert first["token_ids"] == again["token_ids"]


def test_plain_output_prints_text_and_a_stats_line(models, capsys):
    assert main(["generate", "--model", str(models["target"]), "--prompt", PROMPT, "--max-tokens", "8",
                 "--draft", "self:1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")
    assert "[outrider]" in captured.err and "target forward passes" in captured.err
    assert "mean accepted length" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "   "], "--prompt is empty"),
        (["--temperature", "-0.5"], "--temperature must be >= 0"),
        (["--max-tokens", "0"], "--max-tokens must be positive"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--num-draft-tokens", "0"], "--num-draft-tokens must be positive"),
        (["--draft", "self:x"], "expected self:N"),
        (["--draft", "self:99"], "--draft self:99"),
        (["--draft", "no/such/draft"], "no such checkpoint path"),
        (["--chat"], "no chat template"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(models, capsys, args, message):
    base = {"--model": str(models["target"]), "--prompt": PROMPT}
    for flag in args:
        base.pop(flag, None)
    argv = [x for kv in base.items() for x in kv] + args
    assert message in run_error(capsys, *argv)


def test_missing_model_path(tmp_path, capsys):
    err = run_error(capsys, "--model", str(tmp_path / "nope"), "--prompt", PROMPT)
    assert "nope" in err and "no such file or directory" in err


def test_checkpoint_without_weights(models, capsys):
    err = run_error(capsys, "--model", str(models["no_weights"]), "--prompt", PROMPT)
    assert "no-weights" in err and "no weight files" in err


def test_checkpoint_without_tokenizer(models, capsys):
    err = run_error(capsys, "--model", str(models["no_tokenizer"]), "--prompt", PROMPT)
    assert "no-tokenizer" in err and "tokenizer" in err


def test_draft_with_another_tokenizer(models, capsys):
    err = run_error(capsys, "--model", str(models["target"]), "--draft", str(models["other"]), "--prompt", PROMPT)
    assert "--draft" in err and "differ" in err


def test_usage_errors_and_help(capsys):
    assert main([]) == 2
    assert main(["generate", "--prompt", "x", "--device", "tpu"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("examples:", "--draft", "self:N", "--json", "--num-draft-tokens"):
        assert text in out
