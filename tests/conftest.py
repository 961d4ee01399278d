"""Test-wide settings. The models in tests are tiny: one intra-op thread is fastest for them, and
several threads per process oversubscribe a 2-core CI machine by orders of magnitude. Modules
that need Ray share one local instance per module (``ray_local``): 2 CPUs, 4 fake GPUs, and the
role-pool resources the Helm chart's worker groups advertise (2 units each of ``outrider_target``
and ``outrider_draft``), which only placements with ``node_pools: per_role`` ask for."""

import os
import shutil
import socket
import subprocess
import time

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=4, object_store_memory=256 * 2**20,
             resources={"outrider_target": 2, "outrider_draft": 2},
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


REDIS_PASSWORD = "test-redis-password"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
