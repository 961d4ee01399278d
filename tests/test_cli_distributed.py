"""``outrider generate`` with placement flags: the same request through the Ray cluster engine.

Each call starts (and stops) its own local Ray with fake GPUs declared by ``--num-gpus``; greedy
output must equal the single-process path's, and impossible placements must fail before any
worker starts, with one clear line and exit status 2.
"""

from __future__ import annotations

import json
import os

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest

from cluster.cli import main
from tests.tiny_models import write_tiny_checkpoint

PROMPT = "the cat and the hat"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("cli-dist") / "target", num_layers=4, seed=0))


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_separate_gpus_and_colocated_match_single_process(target, capsys):
    base = ["--json", "--model", target, "--prompt", PROMPT, "--max-tokens", "16", "--draft", "self:2"]
    code, out, _ = run(capsys, *base)
    assert code == 0
    single = json.loads(out)
    code, out, err = run(capsys, *base, "--num-gpus", "2", "--target-gpus", "1", "--draft-gpus", "1")
    assert code == 0, err
    separate = json.loads(out)
    assert separate["token_ids"] == single["token_ids"] and separate["text"] == single["text"]
    assert "target" in separate["placement"] and "draft" in separate["placement"]
    assert separate["metrics"]  # the engine's metrics snapshot rides along
    code, out, err = run(capsys, *base, "--num-gpus", "1", "--colocate", "--no-overlap", "--no-adaptive")
    assert code == 0, err
    colocated = json.loads(out)
    assert colocated["token_ids"] == single["token_ids"]
    assert "colocated" in colocated["placement"]


@pytest.mark.parametrize("args, message", [
    (["--num-gpus", "2", "--target-gpus", "3"], "GPU"),
    (["--distributed", "--draft", "lookup"], "single-process"),
    (["--target-gpus", "0"], "target_gpus"),
])
def test_bad_placement_is_one_clear_line(target, capsys, args, message):
    code, out, err = run(capsys, "--model", target, "--prompt", PROMPT, "--max-tokens", "4", *args)
    assert code == 2 and out == ""
    assert "Traceback" not in err and message in err
    assert err.strip().startswith("outrider generate: error:")
