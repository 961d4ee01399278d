"""``outrider serve`` end to end: the command in a subprocess (its own local Ray), called as the
banner says (HTTP with the API key from the environment, gRPC health), stopped with Ctrl-C pressed
twice (SIGINT) — it must exit 0 and take its server down."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.tiny_models import write_tiny_checkpoint
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def grpc_available() -> bool:
    try:
        import cluster.serve.grpc_ingress  # noqa: F401
    except ImportError:
        return False
    return True


def test_outrider_serve_runs_until_ctrl_c(tmp_path):
    target = write_tiny_checkpoint(tmp_path / "tiny", num_layers=2, max_position_embeddings=128)
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "OUTRIDER_API_KEY": "cli-key", "PYTHONUNBUFFERED": "1"}
    env.pop("OUTRIDER_CONFIG", None)
    grpc = grpc_available()
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--target", str(target), "--draft", "none",
           "--port", str(port), "--grpc-port", str(grpc_port) if grpc else "none", "--kv-budget-tokens", "512"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        banner, deadline = [], time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"outrider serve exited ({proc.wait()}): {proc.stderr.read()[-3000:]}")
            banner.append(line)
            if line.startswith("Ctrl-C stops the server"):
                break
        text = "".join(banner)
        assert f"http://127.0.0.1:{port}/v1" in text and "curl -N" in text and "Authorization: Bearer cli-key" in text

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0, timeout=60)
        chunks = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=8, stream=True))
        assert chunks[-1].usage.completion_tokens == 8
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # the key from the environment
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        if grpc:
            import grpc as grpc_lib
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with grpc_lib.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, to the command only ...
            time.sleep(0.5)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # ... twice: the clean-up still completes
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    stderr = proc.stderr.read()
    assert code == 0, stderr[-3000:]
    assert "shutting down" in stderr
    with pytest.raises(httpx.HTTPError):  # the server is gone
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
