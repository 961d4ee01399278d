"""The gRPC API: a real ``grpc.aio`` client against ``GrpcIngress`` served by Ray Serve on 127.0.0.1.

One Ray + Serve for the module (no HTTP proxy, no access log). Most tests run against a fake
engine deployment with the ``EngineServer`` contract (scripted by prompt: "overload", "dead",
"bad", "slow..." streams until cancelled, "holdback" withholds text from its chunks like a stop
string would), shared by two ingresses: one open, one with an API key. One test runs the real
``EngineServer`` on a tiny checkpoint when it exists. The build of the generated code is tested on
a copy of the ``.proto`` (concurrent processes, a changed ``.proto``, a read-only directory).
"""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ray import cloudpickle, serve

from cluster.scheduler import EngineOverloadedError
from cluster.serve.grpc_ingress import GrpcIngress
from protos.outrider.v1 import generate_pb2 as pb
from protos.outrider.v1 import generate_pb2_grpc as pb_grpc
from tests.conftest import free_port, start_local_ray

REPO = Path(__file__).resolve().parents[1]
API_KEY = "s3cret-key"
MODEL = "fake-model"
MAX_CONTEXT = 128

# the fake engine is defined here, in a module Ray workers cannot import: ship it by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=1)
class FakeEngine:
    """The ``EngineServer`` contract, scripted by the prompt. Output: the prompt's characters
    reversed, one token per character (id = code point), three tokens per chunk."""

    def __init__(self) -> None:
        self.serving, self.hang = True, False
        self.requests: list[dict] = []
        self.aborted: list[str] = []

    async def generate(self, request: dict):
        from cluster.engine import EngineDeadError

        self.requests.append(request)
        prompt = request["prompt"]
        if request.get("messages") is not None:
            prompt = " ".join(m["content"] for m in request["messages"])
        if isinstance(prompt, list):
            prompt = "".join(chr(t) for t in prompt)
        if prompt == "overload":
            raise EngineOverloadedError("waiting queue full (2 requests)", retry_after_s=2.5)
        if prompt == "dead":
            raise EngineDeadError("the target could not be restarted")
        if prompt == "bad":
            raise ValueError("prompt: the engine refuses 'bad'")
        finished = False
        try:
            if prompt.startswith("slow"):
                while True:  # until the caller goes away
                    await asyncio.sleep(0.05)
                    yield {"type": "chunk", "token_ids": [46], "text": "."}
            ids = [ord(c) for c in reversed(prompt)][: request["max_tokens"] or 16]
            held = 2 if prompt == "holdback" else 0  # like text that may begin a stop string
            for i in range(0, len(ids), 3):
                part = ids[i:i + 3]
                text = "".join(map(chr, part))
                if i + 3 >= len(ids) and held:
                    text = text[:-held]
                yield {"type": "chunk", "token_ids": part, "text": text}
            finished = True
            n = len(ids)
            yield {"type": "final", "token_ids": ids, "text": "".join(map(chr, ids)),
                   "finish_reason": "length" if n < len(prompt) else "stop",
                   "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                             "total_tokens": len(prompt) + n},
                   "stats": {"target_forward_passes": (n + 2) // 3 + 1, "mean_accepted_length": 3.0,
                             "accepted_lengths": [3] * ((n + 2) // 3), "acceptance_by_position": [1.0, 0.5]},
                   "ttft_s": 0.01}
        finally:
            if not finished:
                self.aborted.append(prompt)

    async def health(self) -> dict:
        if self.hang:
            await asyncio.sleep(3600)
        return {"serving": self.serving, "reason": "ok" if self.serving else "stuck"}

    def info(self) -> dict:
        return {"model": "engine-name", "max_context": MAX_CONTEXT, "vocab_size": 0x110000}

    def set_health(self, serving: bool, hang: bool = False) -> None:
        self.serving, self.hang = serving, hang

    def state(self) -> dict:
        return {"requests": self.requests, "aborted": self.aborted}


@pytest.fixture(scope="module")
def served():
    start_local_ray(num_cpus=2, num_gpus=2)
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
    ports = {"open": free_port(), "auth": free_port()}
    opts = {"host": "127.0.0.1", "model_name": MODEL, "health_poll_s": 0.2, "health_timeout_s": 1.0,
            "http_port": 1234}  # keys of the HTTP side are ignored
    ingress = GrpcIngress.options(name="GrpcIngress")
    serve.run(ingress.bind(FakeEngine.bind(), {**opts, "grpc_port": ports["open"], "api_key": None}),
              name="open", route_prefix=None)
    engine = serve.get_deployment_handle("FakeEngine", app_name="open")
    serve.run(ingress.bind(engine, {**opts, "grpc_port": ports["auth"], "api_key": API_KEY}),
              name="auth", route_prefix=None)
    yield {"ports": ports, "engine": engine}
    serve.shutdown()
    ray.shutdown()


def run(coro):
    return asyncio.run(coro)


def stub(port: int):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.GenerationStub(channel)


def request(text: str | None = "hello world", **sampling) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if text is not None:
        req.text = text
    return req


async def unary(port, req, metadata=None, timeout=10):
    channel, s = stub(port)
    async with channel:
        return await s.Generate(req, metadata=metadata, timeout=timeout)


async def streamed(port, req, metadata=None, timeout=10):
    channel, s = stub(port)
    async with channel:
        return [m async for m in s.GenerateStream(req, metadata=metadata, timeout=timeout)]


def code_of(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        run(coro)
    return info.value


def engine_state(served) -> dict:
    return served["engine"].state.remote().result()


# ----------------------------------------------------------------------------- generation
def test_generate_unary(served):
    port = served["ports"]["open"]
    out = run(unary(port, request("hello world", max_tokens=5, temperature=0.7, top_p=0.9, top_k=4, seed=11)))
    assert out.text == "dlrow" and list(out.token_ids) == [ord(c) for c in "dlrow"]
    assert out.finish_reason == pb.FINISH_REASON_LENGTH and out.model == MODEL
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 5, 16)
    assert out.stats.target_forward_passes == 3 and out.stats.mean_accepted_length == 3.0
    assert list(out.stats.accepted_lengths) == [3, 3] and list(out.stats.acceptance_by_position) == [1.0, 0.5]
    assert out.stats.HasField("ttft_s") and out.stats.ttft_s == pytest.approx(0.01)
    sent = engine_state(served)["requests"][-1]
    assert sent == {"prompt": "hello world", "messages": None, "max_tokens": 5, "temperature": pytest.approx(0.7),
                    "top_p": pytest.approx(0.9), "top_k": 4, "seed": 11, "stop": None, "ignore_eos": False}


def test_stream_concatenates_to_unary(served):
    port = served["ports"]["open"]
    for text in ("quick brown fox", "holdback"):  # holdback: the final event flushes held text
        req = request(text)
        req.stop.append("zz")
        req.ignore_eos = True
        whole = run(unary(port, req))
        parts = run(streamed(port, req))
        assert len(parts) >= 3
        assert "".join(p.text for p in parts) == whole.text == text[::-1]
        assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
        assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not p.HasField("usage") for p in parts[:-1])
        last = parts[-1]
        assert last.finish_reason == whole.finish_reason == pb.FINISH_REASON_STOP
        assert last.usage == whole.usage and last.stats == whole.stats and last.model == MODEL
    sent = engine_state(served)["requests"][-1]
    assert sent["stop"] == ["zz"] and sent["ignore_eos"] is True and sent["max_tokens"] is None
    assert sent["temperature"] == 0.0 and sent["top_p"] == 1.0 and sent["seed"] is None


def test_token_ids_and_messages(served):
    port = served["ports"]["open"]
    out = run(unary(port, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[ord("a"), ord("b")]))))
    assert out.text == "ba"
    assert engine_state(served)["requests"][-1]["prompt"] == [97, 98]
    req = pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role="system", content="be"),
                                                    pb.ChatMessage(role="user", content="brief")])
    assert run(unary(port, req)).text == "feirb eb"
    assert engine_state(served)["requests"][-1]["messages"] == [
        {"role": "system", "content": "be"}, {"role": "user", "content": "brief"}]


BAD_REQUESTS = {
    "no prompt": (pb.GenerateRequest(), "no prompt"),
    "empty text": (request(""), "empty"),
    "empty token ids": (pb.GenerateRequest(token_ids=pb.TokenIds()), "empty"),
    "prompt and messages": (pb.GenerateRequest(text="x", messages=[pb.ChatMessage(role="user", content="y")]),
                            "not both"),
    "empty role": (pb.GenerateRequest(messages=[pb.ChatMessage(content="y")]), "role"),
    "max_tokens 0": (request(max_tokens=0), "max_tokens"),
    "max_tokens negative": (request(max_tokens=-3), "max_tokens"),
    "max_tokens beyond context": (request(max_tokens=MAX_CONTEXT + 1), "context"),
    "temperature negative": (request(temperature=-0.1), "temperature"),
    "temperature nan": (request(temperature=float("nan")), "temperature"),
    "top_p 0": (request(top_p=0.0), "top_p"),
    "top_p above 1": (request(top_p=1.5), "top_p"),
    "top_k negative": (request(top_k=-1), "top_k"),
    "unknown model": (pb.GenerateRequest(text="x", model="gpt-4"), "gpt-4"),
    "empty stop string": (pb.GenerateRequest(text="x", stop=["ok", ""]), "stop[1]"),
    "refused by the engine": (request("bad"), "engine refuses"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument(served, case):
    req, words = BAD_REQUESTS[case]
    port = served["ports"]["open"]
    for call in (unary, streamed):
        err = code_of(call(port, req))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err)
        assert words in err.details(), (case, err.details())


def test_overload_is_resource_exhausted_with_retry_hint(served):
    port = served["ports"]["open"]
    for call in (unary, streamed):
        err = code_of(call(port, request("overload")))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.details()
        trailing = dict(err.trailing_metadata())
        assert trailing["retry-after"] == "3" and trailing["retry-after-ms"] == "2500"


def test_dead_engine_is_unavailable(served):
    err = code_of(unary(served["ports"]["open"], request("dead")))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "could not be restarted" in err.details()


# ----------------------------------------------------------------------------- auth
def test_auth(served):
    port = served["ports"]["auth"]
    for call in (unary, streamed):
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", API_KEY),)):
            err = code_of(call(port, request("abc"), metadata=metadata))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        ok = run(call(port, request("abc"), metadata=(("authorization", f"Bearer {API_KEY}"),)))
        assert (ok.text if call is unary else "".join(m.text for m in ok)) == "cba"
    # bad input is still refused as unauthenticated first: nothing is revealed without the key
    assert code_of(unary(port, pb.GenerateRequest())).code() == grpc.StatusCode.UNAUTHENTICATED
    # health and reflection need no key
    assert run(health(port)) == {"": "SERVING", "outrider.v1.Generation": "SERVING"}
    assert "outrider.v1.Generation" in run(list_services(port))
    # the open server needs none
    assert run(unary(served["ports"]["open"], request("abc"))).text == "cba"


# ----------------------------------------------------------------------------- health, reflection
async def health(port, services=("", "outrider.v1.Generation")):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = health_pb2_grpc.HealthStub(channel)
        out = {}
        for name in services:
            r = await s.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        return out


def wait_health(port, want: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        got = run(health(port))
        if set(got.values()) == {want} or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_health_follows_the_engine(served):
    port, engine = served["ports"]["open"], served["engine"]
    assert wait_health(port, "SERVING") == {"": "SERVING", "outrider.v1.Generation": "SERVING"}
    try:
        engine.set_health.remote(False).result()  # the engine says it is stuck
        assert set(wait_health(port, "NOT_SERVING").values()) == {"NOT_SERVING"}
        assert set(wait_health(served["ports"]["auth"], "NOT_SERVING").values()) == {"NOT_SERVING"}
        engine.set_health.remote(True).result()
        assert set(wait_health(port, "SERVING").values()) == {"SERVING"}
        engine.set_health.remote(True, hang=True).result()  # the engine does not answer at all
        assert set(wait_health(port, "NOT_SERVING").values()) == {"NOT_SERVING"}
    finally:
        engine.set_health.remote(True).result()
    assert set(wait_health(port, "SERVING").values()) == {"SERVING"}


async def list_services(port) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="outrider.v1.Generation")]
        answers = [r async for r in s.ServerReflectionInfo(iter(requests), timeout=5)]
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answers[1].file_descriptor_response.file_descriptor_proto]
    (service,) = [s for f in files if f.package == "outrider.v1" for s in f.service]
    assert [m.name for m in service.method] == ["Generate", "GenerateStream"]
    return [s.name for s in answers[0].list_services_response.service]


def test_reflection_lists_the_services(served):
    names = run(list_services(served["ports"]["open"]))
    assert {"outrider.v1.Generation", "grpc.health.v1.Health"} <= set(names)


# ----------------------------------------------------------------------------- cancellation
def wait_aborted(served, prompt: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if prompt in engine_state(served)["aborted"]:
            return True
        time.sleep(0.05)
    return False


def test_cancel_mid_stream_aborts_the_request(served):
    port = served["ports"]["open"]

    async def go():
        channel, s = stub(port)
        async with channel:
            call = s.GenerateStream(request("slow-cancel"))
            got = [await call.read(), await call.read()]
            call.cancel()
            return got

    got = run(go())
    assert [m.text for m in got] == [".", "."]
    assert wait_aborted(served, "slow-cancel"), engine_state(served)["aborted"]


def test_deadline_aborts_the_request(served):
    err = code_of(unary(served["ports"]["open"], request("slow-deadline"), timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_aborted(served, "slow-deadline"), engine_state(served)["aborted"]


def _grpc_counts(served, app: str) -> dict[tuple[str, str], float]:
    handle = serve.get_deployment_handle("GrpcIngress", app_name=app)
    text = handle.metrics_text.remote().result(timeout_s=10).decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("outrider_grpc_requests_total{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].split(","))
            counts[(labels["method"].strip('"'), labels["code"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return counts


def test_edge_metrics_count_calls_by_method_and_code(served):
    ports = served["ports"]
    before = {app: _grpc_counts(served, app) for app in ("open", "auth")}
    run(unary(ports["open"], request("abc", max_tokens=2)))
    run(streamed(ports["open"], request("abc", max_tokens=2)))
    assert code_of(unary(ports["open"], request(None))).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(unary(ports["auth"], request("abc"))).code() == grpc.StatusCode.UNAUTHENTICATED
    after = {app: _grpc_counts(served, app) for app in ("open", "auth")}

    def delta(app, method, code):
        return after[app].get((method, code), 0) - before[app].get((method, code), 0)

    assert delta("open", "Generate", "OK") == 1 and delta("open", "GenerateStream", "OK") == 1
    assert delta("open", "Generate", "INVALID_ARGUMENT") == 1
    assert delta("auth", "Generate", "UNAUTHENTICATED") == 1
    text = serve.get_deployment_handle("GrpcIngress", app_name="open").metrics_text.remote().result().decode()
    assert "outrider_grpc_time_to_first_token_seconds_count" in text and "outrider_grpc_streams_active" in text


def test_port_in_use_fails_the_replica_constructor():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="cannot listen"):
            cls = GrpcIngress.func_or_class
            run(cls.__new__(cls).__init__(None, {"grpc_port": port}))  # an async __init__


# ----------------------------------------------------------------------------- the real engine
def test_real_engine_server(served, tmp_path):
    """Greedy text through gRPC unary, gRPC streaming and the engine handle is identical; a
    cancelled stream frees its KV."""
    engine_server = pytest.importorskip("cluster.serve.engine_server")
    from tests.tiny_models import write_tiny_checkpoint

    target = write_tiny_checkpoint(tmp_path / "target", arch="llama", num_layers=2)
    config = {"target": str(target), "draft": "none", "kv_budget_tokens": 1024, "cpus_per_worker": 0,
              "step_timeout_s": 30, "start_timeout_s": 60}
    port = free_port()
    engine_app = engine_server.EngineServer.bind(config)
    serve.run(GrpcIngress.bind(engine_app, {"grpc_port": port, "model_name": "tiny"}), name="real",
              route_prefix=None)
    try:
        engine = serve.get_deployment_handle("EngineServer", app_name="real")
        req = pb.GenerateRequest(text="the cat sat", sampling=pb.SamplingParams(max_tokens=12), ignore_eos=True)
        whole = run(unary(port, req, timeout=60))
        parts = run(streamed(port, req, timeout=60))
        assert len(whole.token_ids) == 12 and whole.finish_reason == pb.FINISH_REASON_LENGTH
        assert "".join(p.text for p in parts) == whole.text
        assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
        assert whole.usage.completion_tokens == 12 and whole.stats.target_forward_passes >= 1

        async def direct():
            body = {"prompt": "the cat sat", "messages": None, "max_tokens": 12, "temperature": 0.0, "top_p": 1.0,
                    "top_k": 0, "seed": None, "stop": None, "ignore_eos": True}
            return [e async for e in engine.options(stream=True).generate.remote(body)][-1]

        assert run(direct())["token_ids"] == list(whole.token_ids)
        assert code_of(unary(port, request("x", max_tokens=10**6))).code() == grpc.StatusCode.INVALID_ARGUMENT
        free_before = engine.kv_free_tokens.remote().result()

        async def cancel():
            channel, s = stub(port)
            async with channel:
                call = s.GenerateStream(pb.GenerateRequest(
                    text="a", sampling=pb.SamplingParams(max_tokens=400), ignore_eos=True))
                await call.read()
                call.cancel()

        run(cancel())
        assert engine.kv_free_tokens.remote().result() == free_before
        # health is polled (every 2 s; the first poll may have run while the engine was starting)
        assert wait_health(port, "SERVING", timeout_s=30) == {"": "SERVING", "outrider.v1.Generation": "SERVING"}
    finally:
        serve.delete("real")


# ----------------------------------------------------------------------------- the build
def _copy_proto(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "outrider" / "v1").mkdir(parents=True)
    shutil.copy(REPO / "protos" / "outrider" / "v1" / "generate.proto", root / "outrider" / "v1")
    return root


def test_build_concurrent_stale_and_read_only(tmp_path, monkeypatch):
    root = _copy_proto(tmp_path)
    pkg = root / "outrider" / "v1"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from protos.build import ensure
        print(ensure({str(pkg)!r}, root={str(root)!r}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    names = sorted(p.name for p in pkg.iterdir() if not p.name.startswith(".gen-"))
    assert names == [".generate.lock", ".generated.json", "generate.proto", "generate_pb2.py",
                     "generate_pb2.pyi", "generate_pb2_grpc.py"]
    assert "from . import generate_pb2" in (pkg / "generate_pb2_grpc.py").read_text()

    from protos import build

    # a changed .proto is regenerated
    before = (pkg / "generate_pb2.py").read_bytes()
    proto = pkg / "generate.proto"
    proto.write_text(proto.read_text().replace("string model = 6;\n}\n\n// One message",
                                               "string model = 6;\n  // new\n  string extra = 7;\n}\n\n// One message"))
    build._checked.clear()
    build.ensure(pkg, root=root)
    assert (pkg / "generate_pb2.py").read_bytes() != before

    # a package directory we may not write to (a read-only install): generated into the cache
    ro_root = _copy_proto(tmp_path / "ro")
    ro_pkg = ro_root / "outrider" / "v1"
    monkeypatch.setattr(build, "_writable", lambda d: False)
    monkeypatch.setenv("OUTRIDER_CACHE", str(tmp_path / "cache"))
    out = build.ensure(ro_pkg, root=ro_root)
    assert str(out).startswith(str(tmp_path / "cache")) and (out / "generate_pb2_grpc.py").exists()
    assert not (ro_pkg / "generate_pb2.py").exists()
