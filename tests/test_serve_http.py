"""The OpenAI-compatible HTTP API on Ray Serve: real servers on 127.0.0.1, real clients.

One Ray (fake GPUs) and one Serve application for the module: ``EngineServer`` (a tiny checkpoint
with a chat template, a self-speculative draft, a small queue so overload is easy to reach) under
``OpenAIIngress``; a second, ingress-only application with an API key shares its engine. The
``openai`` client and httpx talk to it, streaming and not; greedy text must equal the Python
API's (a target-only ``Cluster`` in the same Ray: speculation is lossless) and the gRPC front
end's (deployed in the same application); every bad input is a
400 in OpenAI's shape; a client that disconnects frees its KV; a full queue is a 429; the API is
fuzzed from its OpenAPI schema (no 5xx, no hang); the last test stops the engine (/health 503).
"""

import asyncio
import json
import os
import socket
import time

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import httpx
import openai
import pytest
import ray
from ray import serve

from actors.spec.types import SamplingParams
from cluster.cluster import Cluster
from cluster.config import ClusterConfig
from cluster.serve.app import APP_NAME, deploy
from cluster.serve.openai_ingress import OpenAIIngress
from tests.tiny_models import write_tiny_checkpoint
from tests.conftest import free_port, start_local_ray

CONTEXT = 128
API_KEY = "test-key-123"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "the cat and the hat"


def _grpc_available() -> bool:
    try:
        import cluster.serve.grpc_ingress  # noqa: F401
    except ImportError:
        return False
    return True


GRPC = _grpc_available()  # the gRPC front end shares the engine: its text must match too


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat", num_layers=2,
                                 max_position_embeddings=CONTEXT)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server(checkpoint):
    start_local_ray(num_cpus=4, num_gpus=3)
    port, grpc_port = free_port(), free_port()
    config = ClusterConfig(
        target=checkpoint, draft="self:1", num_draft_tokens=3, num_gpus=3, cpus_per_worker=0,
        kv_budget_tokens=1024, max_running=2, max_waiting=4, step_timeout_s=30, start_timeout_s=120,
        serve={"http_port": port, "grpc_port": grpc_port if GRPC else None, "default_max_tokens": 16})
    deploy(config)
    engine = serve.get_deployment_handle("EngineServer", app_name=APP_NAME)
    yield {"config": config, "base": f"http://127.0.0.1:{port}", "model": "tiny-chat", "engine": engine,
           "grpc": f"127.0.0.1:{grpc_port}" if GRPC else None,
           "kv0": engine.kv_free_tokens.remote().result(timeout_s=60)}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["base"], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def python_api(server, checkpoint):
    """The same model through the Python API (target only) in the same Ray: the reference text."""
    cluster = Cluster.start(ClusterConfig(target=checkpoint, num_gpus=3, cpus_per_worker=0, kv_budget_tokens=512,
                                          step_timeout_s=30, start_timeout_s=120))
    yield cluster
    cluster.shutdown()


def python_text(cluster, prompt, max_tokens, **kw):
    async def run():
        stream = await cluster.generate(prompt, SamplingParams(max_tokens=max_tokens), **kw)
        return await stream.result()

    return asyncio.run(run())


def kv_free(server) -> dict:
    return server["engine"].kv_free_tokens.remote().result(timeout_s=60)


def sse_events(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----------------------------------------------------------------- the happy paths
def test_models_health_and_metrics(http, server):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == server["model"]
    assert models["data"][0]["max_model_len"] == CONTEXT and models["data"][0]["draft"] == "self:1"
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "SERVING"
    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    text = http.get("/metrics").text
    assert f'outrider_requests_total{{finish_reason="length",model="{server["model"]}",status="finished"}}' in text
    for name in ("outrider_time_to_first_token_seconds_bucket", "outrider_draft_tokens_proposed_total",
                 "outrider_spec_mean_accepted_length", "outrider_kv_cache_usage_ratio",
                 'outrider_http_requests_total{method="POST",model="tiny-chat",route="/v1/completions",status="200"}',
                 "# TYPE outrider_http_time_to_first_token_seconds histogram"):
        assert name in text, name


def test_completion_matches_python_api(client, http, python_api, server):
    reference = python_text(python_api, PROMPT, 24)
    out = client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=24)
    assert out.choices[0].text == reference.text
    assert out.choices[0].finish_reason == reference.finish_reason
    assert out.usage.completion_tokens == len(reference.token_ids)
    assert out.usage.prompt_tokens == len(reference.prompt_token_ids)
    spec = out.model_extra["outrider"]
    assert spec["draft"] == "self:1" and spec["mean_accepted_length"] >= 1.0 and spec["target_forward_passes"] >= 1

    # streaming through the openai client: the same text, then a usage chunk
    chunks = list(client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=24, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reference.token_ids)

    # and raw server-sent events: finish_reason chunk, usage chunk with speculation stats, [DONE]
    with http.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["total_tokens"] == len(reference.prompt_token_ids) + len(reference.token_ids)
    assert "mean_accepted_length" in events[-2]["outrider"]
    assert events[-3]["choices"][0]["finish_reason"] == reference.finish_reason
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == reference.text

    # token-id prompts give the same output as text prompts
    ids = python_api.encode(PROMPT)
    assert client.completions.create(model=server["model"], prompt=ids, max_tokens=24).choices[0].text == reference.text

    # and the gRPC front end of the same application (same engine) gives the same text
    if server["grpc"] is not None:
        import grpc

        from protos.outrider.v1 import generate_pb2 as pb
        from protos.outrider.v1 import generate_pb2_grpc as pb_grpc

        with grpc.insecure_channel(server["grpc"]) as channel:
            reply = pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=24)), timeout=60)
        assert reply.text == reference.text and list(reply.token_ids) == reference.token_ids
        # one scrape of /metrics sees the gRPC edge too
        grpc_ok = [line for line in http.get("/metrics").text.splitlines()
                   if line.startswith("outrider_grpc_requests_total{") and 'method="Generate"' in line
                   and 'code="OK"' in line]
        assert grpc_ok and float(grpc_ok[0].rsplit(" ", 1)[1]) >= 1


def test_chat_matches_python_api(client, python_api, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a hat"}]
    prompt_ids = python_api.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]
    reference = python_text(python_api, list(prompt_ids), 20)
    out = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=20)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference.text
    assert out.usage.prompt_tokens == len(prompt_ids)
    stream = client.chat.completions.create(model=server["model"], messages=messages, max_completion_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference.text
    assert chunks[-1].usage.completion_tokens == len(reference.token_ids)


def test_n_seed_and_stop(client, python_api, server):
    out = client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=12, n=3, temperature=1.0,
                                    seed=5)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens <= 3 * 12
    # (choice i is seeded with seed + i; with overlap and adaptive k the engine's random streams depend
    # on the batch, so a seed does not promise the same text twice here)
    assert out.usage.prompt_tokens == len(python_api.encode(PROMPT))  # the prompt counts once
    assert len(out.model_extra["outrider"]["choices"]) == 3

    # two prompts x n=2, streamed: four choices, each finished once
    chunks = list(client.completions.create(model=server["model"], prompt=[PROMPT, "a hat"], max_tokens=6, n=2,
                                            stream=True))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2, 3]

    # a stop string: the text ends before it, finish_reason "stop"
    full = python_text(python_api, PROMPT, 24).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = client.completions.create(model=server["model"], prompt=PROMPT, max_tokens=24, stop=stop)
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------- bad input
BAD_REQUESTS = [
    ("completions", b"{not json", "json_invalid", None),
    ("completions", b'["a list"]', None, None),
    ("completions", {"prompt": PROMPT, "bogus": 1}, "extra_forbidden", "bogus"),
    ("completions", {"prompt": PROMPT, "model": "gpt-4"}, "model_not_found", "model"),
    ("completions", {"prompt": ""}, "empty_prompt", "prompt"),
    ("completions", {"prompt": []}, "empty_prompt", "prompt"),
    ("completions", {"prompt": [PROMPT, ""]}, "empty_prompt", "prompt"),
    ("completions", {}, "missing", "prompt"),
    ("completions", {"prompt": 5}, None, "prompt"),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, None, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": -3}, None, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": CONTEXT}, "invalid_value", "max_tokens"),
    ("completions", {"prompt": list(range(3, 3 + CONTEXT))}, "invalid_value", "prompt"),
    ("completions", {"prompt": "the " * 200, "max_tokens": 1}, "invalid_value", "prompt"),
    ("completions", {"prompt": [3, 99999]}, "invalid_value", "prompt"),
    ("completions", {"prompt": PROMPT, "temperature": -0.1}, None, "temperature"),
    ("completions", {"prompt": PROMPT, "temperature": 2.5}, None, "temperature"),
    ("completions", {"prompt": PROMPT, "top_p": 0}, None, "top_p"),
    ("completions", {"prompt": PROMPT, "top_p": 1.5}, None, "top_p"),
    ("completions", {"prompt": PROMPT, "temperature": "hot"}, None, "temperature"),
    ("completions", {"prompt": PROMPT, "n": 0}, None, "n"),
    ("completions", {"prompt": PROMPT, "logprobs": 2}, "unsupported", "logprobs"),
    ("completions", {"prompt": PROMPT, "echo": True}, "unsupported", "echo"),
    ("completions", {"prompt": PROMPT, "presence_penalty": 0.5}, "unsupported", "presence_penalty"),
    ("completions", {"prompt": PROMPT, "stop": [""]}, "invalid_value", "stop"),
    ("completions", {"prompt": PROMPT, "stop": ["x"] * 17}, "invalid_value", "stop"),
    ("chat/completions", {"messages": []}, "empty_messages", "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, None, "messages"),
    ("chat/completions", {"messages": [{"role": "user"}], "max_tokens": 0}, None, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "unsupported",
     "logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "unsupported", "tools"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, "extra_forbidden",
     "prompt"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 200}]}, "invalid_value", None),
]


@pytest.mark.parametrize("route,body,code,param", BAD_REQUESTS,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_REQUESTS)])
def test_bad_request_is_400(http, route, body, code, param):
    if isinstance(body, bytes):
        r = http.post(f"/v1/{route}", content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(f"/v1/{route}", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def test_extreme_sampling_values_harm_nothing(http, server):
    """Values at the edges of the schema (found by fuzzing: a temperature or top_p that rounds to 0
    in float32 used to crash the target worker and fail every running request)."""
    for extra in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 2, "top_k": 10**9},
                  {"temperature": 1.0, "seed": -(2**63)}, {"temperature": 1.0, "seed": 2**63 - 1}):
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **extra})
        assert r.status_code == 200, (extra, r.text)
    assert _requests_with(http, 'status="failed"') == 0


def test_bad_requests_harm_nothing(http, server):
    assert http.get("/nope").status_code == 404 and http.get("/nope").json()["error"]["type"] == "not_found_error"
    assert http.get("/v1/completions").status_code == 405
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}).status_code == 200
    assert kv_free(server) == server["kv0"]


# ----------------------------------------------------------------- disconnects and overload
def test_disconnect_mid_stream_frees_kv(http, server):
    start = kv_free(server)
    body = {"prompt": PROMPT, "max_tokens": CONTEXT - 16, "ignore_eos": True, "stream": True}

    def stream_then_leave():
        with httpx.Client(base_url=server["base"], timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        # the connection is closed mid-stream: the engine aborts the request and frees its KV

    assert _aborted_by_leaving(http, stream_then_leave)
    assert kv_free(server) == start

    def post_then_leave():  # a non-streaming request whose client gives up while it runs
        payload = json.dumps({**body, "stream": False}).encode()
        host, port = server["base"].removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (host.encode(), len(payload)) + payload)
            deadline = time.monotonic() + 10
            while _gauge(http, "outrider_requests_running") < 1 and time.monotonic() < deadline:
                time.sleep(0.005)

    assert _aborted_by_leaving(http, post_then_leave)
    assert kv_free(server) == start


def _aborted_by_leaving(http, leave, attempts: int = 5) -> bool:
    """Run ``leave`` (start a request, drop its connection while it runs) until one such request
    ends aborted rather than finished: on a fast machine a short request can finish first."""
    for _ in range(attempts):
        aborted, finished = _aborted(http), _requests_with(http, 'status="finished"')
        leave()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _aborted(http) > aborted:
                return True
            if _requests_with(http, 'status="finished"') > finished:
                break  # it finished before the disconnect reached the engine: try again
            time.sleep(0.05)
    return False


def _gauge(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _requests_with(http, label: str) -> float:
    """Engine requests (outrider_requests_total) whose labels include ``label``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
               if line.startswith("outrider_requests_total{") and label in line)


def _aborted(http) -> float:
    return _requests_with(http, 'status="aborted"')


def test_overload_is_429_with_retry_after(server):
    start = kv_free(server)
    body = {"prompt": PROMPT, "max_tokens": CONTEXT - 16, "ignore_eos": True, "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=server["base"], timeout=60) as c:
            requests = [c.build_request("POST", "/v1/completions", json=body) for _ in range(10)]
            responses = await asyncio.gather(*(c.send(r, stream=True) for r in requests))
            try:
                codes = [r.status_code for r in responses]
                limited = [r for r in responses if r.status_code == 429]
                bodies = [json.loads(await r.aread()) for r in limited]
                return codes, [r.headers.get("retry-after") for r in limited], bodies
            finally:
                for r in responses:
                    await r.aclose()  # the accepted streams are dropped mid-way: aborted

    codes, retry_after, bodies = asyncio.run(run())
    # max_waiting 4 bounds what is not admitted yet; max_running 2 what runs: 4 to 6 get in, the rest 429
    assert 4 <= codes.count(200) <= 6 and codes.count(200) + codes.count(429) == 10, codes
    assert all(int(x) >= 1 for x in retry_after)
    assert all(b["error"]["type"] == "rate_limit_error" and "capacity" in b["error"]["message"] for b in bodies)
    assert kv_free(server) == start

    # one request whose n choices do not all fit: 429 as a whole, and the choices that got in are aborted
    r = httpx.post(server["base"] + "/v1/completions", json={**body, "stream": False, "n": 12}, timeout=60)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert kv_free(server) == start


# ----------------------------------------------------------------- auth
def test_api_key(server, http):
    key_app = OpenAIIngress.bind(server["engine"], {**server["config"].serve.to_dict(), "api_key": API_KEY})
    serve.run(key_app, name="secure", route_prefix="/secure", logging_config={"enable_access_log": False})
    base = server["base"] + "/secure"
    assert httpx.get(base + "/health").status_code == 200  # health never needs the key
    for path in ("/v1/models", "/metrics", "/openapi.json", "/nope"):
        r = httpx.get(base + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(base + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    keyed = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    assert keyed.completions.create(model=server["model"], prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
    # the app without a key stays open
    assert http.get("/v1/models").status_code == 200
    serve.delete("secure")


# ----------------------------------------------------------------- fuzzing
def test_fuzz_openapi_schema(server):
    """Every operation of the OpenAPI schema with schema-valid and schema-violating inputs: never a
    5xx, never a hang (each call has a deadline). Derandomized, so CI runs the same cases."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server["base"] + "/openapi.json")
    budget = {("/v1/completions", "POST"): 25, ("/v1/chat/completions", "POST"): 25, ("/v1/models", "GET"): 3,
              ("/health", "GET"): 3, ("/metrics", "GET"): 3}
    failures, calls = [], [0]
    for (path, method), examples in budget.items():
        operation = schema[path][method]
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if method == "POST" else (GenerationMode.POSITIVE,)
        for mode in modes:  # (an operation without parameters has no negative cases)
            _fuzz(operation, mode, examples, server["base"], failures, calls)
    assert not failures, "\n".join(map(str, failures[:5]))
    assert calls[0] >= 40
    assert httpx.get(server["base"] + "/health").status_code == 200


def _fuzz(operation, mode, examples: int, base: str, failures: list, calls: list) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        calls[0] += 1
        response = case.call(base_url=base, timeout=30)
        if response.status_code >= 500:
            failures.append((operation.label, mode.value, case.body, response.status_code, response.text[-1500:]))

    check()


# ----------------------------------------------------------------- last: a dead engine
def test_dead_engine_is_503(http, server):
    server["engine"].shutdown_engine.remote().result(timeout_s=60)
    r = http.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "NOT_SERVING" and "shut down" in r.json()["reason"]
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert "Retry-After" in r.headers
