"""Test-wide settings. The models in tests are tiny: one intra-op thread is fastest for them, and
several threads per process oversubscribe a 2-core CI machine by orders of magnitude. Modules
that need Ray start it with ``start_local_ray`` (a loaded machine can miss Ray's fixed 30 s
start-up wait; it retries instead of failing the whole module). Most share one local instance per
module (``ray_local``): 2 CPUs, 4 fake GPUs, and the role-pool resources the Helm chart's worker
groups advertise (2 units each of ``outrider_target`` and ``outrider_draft``), which only
placements with ``node_pools: per_role`` ask for. ``wait_for`` polls for states that background
work reaches, where a fixed sleep would be too short on a loaded machine."""

import os
import shutil
import socket
import subprocess
import time

import pytest
import torch

torch.set_num_threads(1)


RAY_START_ATTEMPTS = 3


def start_local_ray(**kwargs) -> None:
    """A fresh local Ray for one test module: small object store, no dashboard, workers' logs kept
    out of the test output. Ray waits a fixed 30 s for its raylet to register; on a loaded 2-core
    machine that can run out (it did once in CI, failing every test of the module), so a start-up
    timeout is retried with a clean slate before it counts as a failure."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    options = {"address": "local", "object_store_memory": 256 * 2**20, "include_dashboard": False,
               "log_to_driver": False, **kwargs}
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(**options)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == RAY_START_ATTEMPTS:
                raise
            print(f"Ray start-up timed out (attempt {attempt} of {RAY_START_ATTEMPTS}); retrying")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    start_local_ray(num_cpus=2, num_gpus=4, resources={"outrider_target": 2, "outrider_draft": 2})
    yield
    ray.shutdown()


REDIS_PASSWORD = "test-redis-password"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float = 60.0, poll_s: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; returns its last value. For
    states reached by background work: a fixed sleep is too short on a loaded machine."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return bool(condition())


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1 with AUTH, no persistence; ``restart`` keeps the port."""

    def __init__(self, binary: str, tmp) -> None:
        self.binary, self.dir, self.port = binary, tmp, free_port()
        self.password, self.proc = REDIS_PASSWORD, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--requirepass", self.password,
             "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not listen on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real Redis for the store tests. Missing ``redis-server`` skips, except where
    ``OUTRIDER_REQUIRE_REDIS=1`` (``.ci/run`` installs it and sets that): then it fails."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("OUTRIDER_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
