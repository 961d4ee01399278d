"""Serve's own limits in front of the HTTP API, through the real ``build_app`` options: a full
ingress (``serve.max_concurrent_requests`` in flight, ``serve.max_queued_requests`` queued) answers
503, and ``serve.request_timeout_s`` answers 408 — and in both cases the engine request that was
running is aborted (its KV would be freed). The engine is ``test_grpc``'s fake deployment with the
``EngineServer`` contract (a "slow" prompt streams until its caller goes away)."""

import os
import threading
import time

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import httpx
import pytest
import ray
from ray import serve

from cluster.config import ClusterConfig
from cluster.serve.app import build_app
from tests.conftest import free_port, start_local_ray, wait_for
from tests.test_grpc import FakeEngine

TIMEOUT_S = 4.0  # long enough for the back-pressure test to finish inside one held stream


@pytest.fixture(scope="module")
def served():
    start_local_ray(num_cpus=2, num_gpus=1)
    port = free_port()
    config = ClusterConfig(target="unused", serve={"http_port": port, "grpc_port": None, "max_concurrent_requests": 1,
                                                   "max_queued_requests": 1, "request_timeout_s": TIMEOUT_S})
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": TIMEOUT_S},
                logging_config={"enable_access_log": False})
    serve.run(build_app(config, engine=FakeEngine.bind()), name="limits", route_prefix="/")
    engine = serve.get_deployment_handle("FakeEngine", app_name="limits")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client, engine
    serve.shutdown()
    ray.shutdown()


def aborted(engine) -> list[str]:
    return engine.state.remote().result(timeout_s=10)["aborted"]


def test_a_full_ingress_answers_503_and_the_held_request_is_aborted_when_its_client_leaves(served):
    client, engine = served
    model = client.get("/v1/models").json()["data"][0]["id"]
    before = aborted(engine).count("slow-held")
    opened = threading.Event()
    leave = threading.Event()

    def hold():
        body = {"model": model, "prompt": "slow-held", "stream": True, "max_tokens": 10_000}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for _ in response.iter_lines():
                opened.set()
                if leave.is_set():
                    break

    holder = threading.Thread(target=hold)
    holder.start()
    queued: list[int] = []
    short = {"model": model, "prompt": "abc", "max_tokens": 2}
    waiter = threading.Thread(target=lambda: queued.append(client.post("/v1/completions", json=short).status_code))
    try:
        assert opened.wait(20)
        waiter.start()  # waits in Serve's queue (1 place) behind the held stream
        time.sleep(0.5)
        assert not queued
        refused = client.post("/v1/completions", json=short)
        assert refused.status_code == 503  # Serve's back-pressure: 1 in flight, 1 queued, no more
    finally:
        leave.set()
        holder.join(20)
        if waiter.is_alive() or waiter.ident:
            waiter.join(20)
    assert queued == [200]  # the queued one ran once the held stream left
    assert wait_for(lambda: aborted(engine).count("slow-held") == before + 1)


def test_request_timeout_answers_408_and_aborts_the_engine_request(served):
    client, engine = served
    model = client.get("/v1/models").json()["data"][0]["id"]
    before = aborted(engine).count("slow-forever")
    start = time.monotonic()
    response = client.post("/v1/completions", json={"model": model, "prompt": "slow-forever", "max_tokens": 10_000})
    assert response.status_code == 408
    assert TIMEOUT_S * 0.9 < time.monotonic() - start < TIMEOUT_S + 10
    assert wait_for(lambda: aborted(engine).count("slow-forever") == before + 1)
