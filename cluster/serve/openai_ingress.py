"""The OpenAI-compatible HTTP API: a FastAPI app served by Ray Serve (control plane).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (non-streaming, or server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``; FastAPI's
``/openapi.json`` and ``/docs``. Every generation goes to ``EngineServer`` through its Serve
handle (``cluster.serve.engine_server``); this deployment holds no model.

Behaviour clients rely on:

* Request bodies are pydantic models with unknown fields refused. Every bad request — malformed
  JSON, unknown field, wrong type, unknown model, empty prompt or messages, ``max_tokens`` <= 0 or
  beyond the context, a prompt longer than the context, temperature outside [0, 2], top_p outside
  (0, 1], options that are not supported (``logprobs``, penalties, tools...) — is answered 400
  with ``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``. The engine
  validates what depends on the model (context, vocabulary) and its ``ValueError`` becomes the 400.
* A full engine queue is 429 with ``Retry-After``; a dead engine is 503; Serve's own back
  pressure (``serve.max_queued_requests``) is 503.
* ``n`` > 1 (and a list of prompts) runs one engine request per choice; a seeded request gives
  choice i the seed ``seed + i``. Streams end with a chunk carrying ``usage`` (and ``choices:
  []``, as OpenAI's ``stream_options.include_usage``; ``include_usage: false`` leaves it out),
  then ``data: [DONE]``. Responses carry the speculation statistics as ``"outrider"``.
* A client that disconnects (or times out) aborts its engine requests: their KV is freed.
* With ``serve.api_key`` set, every route but ``/health`` needs ``Authorization: Bearer <key>``
  (401 otherwise). ``/health`` is 200 while the engine serves, 503 ``NOT_SERVING`` when it is
  dead, recovering or stuck.
* ``/metrics`` is the engine's Prometheus text (label ``model``) followed by this ingress's own
  ``outrider_http_*`` metrics: requests by route and status, latency, TTFT as the client sees it,
  active streams, client disconnects.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types at
run time, inside a Serve replica.
"""

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve.engine_server import RequestFailedError, unwrap_error

log = logging.getLogger("outrider.serve")

MAX_CHOICES = 64  # n x prompts per request
HEALTH_TIMEOUT_S = 5.0
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


# ----------------------------------------------------------------- request models
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: str | None = Field(None, description="The served model id (GET /v1/models); optional.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; default: serve.default_max_tokens.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (the default).")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Outrider extension: sample among the k best tokens; 0 = all.")
    n: int = Field(1, ge=1, le=16, description="Completions per prompt (one engine request each).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings (not included in the output).")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    ignore_eos: bool = Field(False, description="Outrider extension: do not stop at end-of-sequence.")
    user: str | None = None
    # accepted for compatibility, refused unless neutral (the engine does not implement them)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a list of either (one completion set per prompt).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Not supported (400).")
    echo: bool | None = Field(None, description="Not supported (400).")
    best_of: int | None = Field(None, ge=1, le=16, description="Only equal to n.")
    suffix: str | None = Field(None, description="Not supported (400).")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")
    logprobs: bool | None = Field(None, description="Not supported (400 when true).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Not supported (400).")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported (400).")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none'.")


# ----------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _guess_param(message: str) -> str | None:
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "messages", "prompt"):
        if message.startswith(name) or f" {name}" in message or f"({name}" in message:
            return name
    return "prompt" if "prompt" in message or "token ids" in message or "context" in message else None


def map_error(exc: BaseException) -> APIError:
    """The HTTP answer to an error raised by the engine server (through the handle) or Serve."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from cluster.engine import EngineDeadError
    from cluster.scheduler import EngineOverloadedError

    if isinstance(exc, APIError):
        return exc
    cause = unwrap_error(exc)
    if isinstance(cause, EngineOverloadedError):
        retry = max(1, math.ceil(getattr(cause, "retry_after_s", 1.0) or 1.0))
        return APIError(429, f"the server is at capacity: {cause}; retry after {retry} s", code="rate_limit_exceeded",
                        type="rate_limit_error", headers={"Retry-After": str(retry)})
    if isinstance(cause, EngineDeadError):
        return APIError(503, f"the engine is not serving: {cause}", code="engine_unavailable", type="server_error",
                        headers={"Retry-After": "5"})
    if isinstance(cause, (BackPressureError, DeploymentUnavailableError)):
        return APIError(503, f"the server is at capacity: {cause}", code="overloaded", type="server_error",
                        headers={"Retry-After": "1"})
    if isinstance(cause, ValueError):
        return APIError(400, str(cause), param=_guess_param(str(cause)), code="invalid_value")
    if isinstance(cause, RequestFailedError):
        return APIError(500, str(cause), type="server_error", code="request_failed", headers={"Retry-After": "1"})
    log.error("request failed: %s: %s", type(cause).__name__, cause)
    return APIError(500, f"internal error: {type(cause).__name__}: {cause}", type="server_error", code="internal_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "value_error", "loc": ("body",), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"malformed JSON in the request body{': ' + detail if detail else ''}", code="json_invalid")
    if first["type"] == "missing" and not loc:
        return APIError(400, "the request body is missing (expected a JSON object)", code="missing")
    # drop pydantic's union tags ("str", "list[int]", "function-after[...]") from the path
    path = [x for x in loc if not (x in ("str", "int", "float", "bool") or "[" in x)]
    param = ".".join(path) or None
    if first["type"] == "extra_forbidden":
        message = f"unknown field {param!r}" if param else "unknown field"
    else:
        message = f"{param + ': ' if param else ''}{first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=path[0] if path else None, code=first["type"])


# ----------------------------------------------------------------- metrics and middleware
class _HttpMetrics:
    def __init__(self, model: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
        self.requests = Counter("outrider_http_requests", "HTTP requests by route, method and status code",
                                ["model", "route", "method", "status"], registry=self.registry)
        self.latency = Histogram("outrider_http_request_duration_seconds",
                                 "HTTP request time until the last byte was sent", ["model", "route"],
                                 buckets=buckets, registry=self.registry)
        self.ttft = Histogram("outrider_http_time_to_first_token_seconds",
                              "time from a stream's arrival to its first generated text sent",
                              ["model", "route"], buckets=buckets, registry=self.registry)
        self.streams = Gauge("outrider_http_streams_active", "open server-sent event streams", ["model"],
                             registry=self.registry)
        self.disconnects = Counter("outrider_http_client_disconnects",
                                   "requests whose client went away before the answer was complete",
                                   ["model", "route"], registry=self.registry)
        self.choices = Counter("outrider_http_engine_requests", "engine requests started (one per choice)",
                               ["model", "route"], registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Middleware:
    """Authentication (Bearer key, everything but /health) and per-route HTTP metrics (pure ASGI,
    so streaming responses and client disconnects pass through untouched)."""

    def __init__(self, app, server: "OpenAIServer") -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # an application under a route prefix
            path = path[len(root):] or "/"
        route = path if path in _ROUTES else "other"

        async def send_and_count(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            key = self.server.api_key
            if key and path != "/health" and not _authorized(scope, key):
                await APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                               ).response()(scope, receive, send_and_count)
                return
            await self.app(scope, receive, send_and_count)
        finally:
            m = self.server.http_metrics
            if m is not None:
                m.requests.labels(m.model, route, scope.get("method", ""), str(status[0])).inc()
                m.latency.labels(m.model, route).observe(time.perf_counter() - start)


def _authorized(scope, key: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


# ----------------------------------------------------------------- the server
class OpenAIServer:
    """The HTTP front end's logic; ``OpenAIIngress`` is this class as a Serve deployment (and
    ``create_app(server)`` its FastAPI app). ``serve_options`` is ``ServeOptions.to_dict()``;
    ``grpc_ingress`` (a bound deployment, optional) only rides along so that Serve deploys it in
    the same application."""

    def __init__(self, engine_handle, serve_options: dict, grpc_ingress=None) -> None:
        self.engine = engine_handle
        self.options = dict(serve_options)
        self.api_key: str | None = self.options.get("api_key") or None
        self.http_metrics: _HttpMetrics | None = None  # created with the model name on first use
        self._grpc = grpc_ingress
        self._info: dict | None = None
        self._created = int(time.time())

    def __serve_build_asgi_app__(self) -> FastAPI:  # Serve: the app, built in the replica
        return create_app(self)

    # ----------------------------------------------------------------- helpers
    async def info(self) -> dict:
        if self._info is None:
            info = await self.engine.info.remote()
            if self.http_metrics is None:
                self.http_metrics = _HttpMetrics(info["model"])
            self._info = info
        return self._info

    async def metrics_of_http(self) -> _HttpMetrics:
        await self.info()
        return self.http_metrics

    async def _check_model(self, body: _Sampling) -> dict:
        info = await self.info()
        if body.model is not None and body.model != info["model"]:
            raise APIError(400, f"model {body.model!r} does not exist; this server serves {info['model']!r}",
                           param="model", code="model_not_found")
        return info

    @staticmethod
    def _check_common(body: _Sampling) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported (only 0)", param=name, code="unsupported")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported")

    @staticmethod
    def _engine_requests(body: _Sampling, prompts: list[dict], max_tokens: int | None) -> list[dict]:
        requests = []
        for prompt in prompts:
            for i in range(body.n):
                requests.append({
                    **prompt, "max_tokens": max_tokens, "temperature": body.temperature or 0.0,
                    "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or 0,
                    "seed": None if body.seed is None else body.seed + i,
                    "stop": [body.stop] if isinstance(body.stop, str) else body.stop, "ignore_eos": body.ignore_eos,
                })
        if len(requests) > MAX_CHOICES:
            raise APIError(400, f"n x prompts is {len(requests)}; at most {MAX_CHOICES} per request", param="n",
                           code="too_many_choices")
        return requests

    async def _run(self, kind: str, body: _Sampling, requests: list[dict]):
        route = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
        metrics = await self.metrics_of_http()
        metrics.choices.labels(metrics.model, route).inc(len(requests))
        arrival = time.perf_counter()
        gens = [self.engine.options(stream=True).generate.remote(r) for r in requests]
        handed_over = False
        try:
            if not body.stream:
                finals = await _all_or_none([_final_of(g) for g in gens])
                return JSONResponse(self._response(kind, requests, finals, await self.info()))
            # the first event of every choice before the headers: bad input is a 400, not a broken stream
            firsts = await _all_or_none([g.__anext__() for g in gens])
            handed_over = True  # the stream owns the engine requests from here
            return StreamingResponse(
                self._stream(kind, body, requests, gens, firsts, arrival, route), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        except asyncio.CancelledError:  # the client went away (or Serve's request timeout)
            metrics.disconnects.labels(metrics.model, route).inc()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to the right status
            raise map_error(exc) from None
        finally:
            if not handed_over:
                for g in gens:
                    g.cancel()  # aborts what still runs in the engine (no-op for finished requests)

    async def _stream(self, kind: str, body: _Sampling, requests: list[dict], gens: list, firsts: list,
                      arrival: float, route: str) -> AsyncIterator[str]:
        info = await self.info()
        metrics = await self.metrics_of_http()
        metrics.streams.labels(metrics.model).inc()
        rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        created = int(time.time())
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(_pump(i, first, g, queue)) for i, (first, g) in enumerate(zip(firsts, gens))]
        finals: list[dict | None] = [None] * len(gens)
        first_sent, done = False, False

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if kind == "completion":
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            else:
                delta = {} if text is None and not role else {"content": text or ""}
                if role:
                    delta["role"] = "assistant"
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": created, "model": info["model"], "choices": [choice]})

        try:
            if kind == "chat":
                for i in range(len(gens)):
                    yield chunk(i, "", None, role=True)
            remaining = len(gens)
            while remaining:
                index, event = await queue.get()
                if isinstance(event, BaseException):
                    yield _sse(map_error(event).body())
                    yield _sse("[DONE]")
                    done = True
                    return
                if event is None:
                    remaining -= 1
                    continue
                if event["type"] == "chunk":
                    if event["text"]:
                        if not first_sent:
                            metrics.ttft.labels(metrics.model, route).observe(time.perf_counter() - arrival)
                            first_sent = True
                        yield chunk(index, event["text"], None)
                else:
                    finals[index] = event
                    yield chunk(index, None, event["finish_reason"])
            include = body.stream_options.include_usage if body.stream_options is not None else None
            if include is not False:
                yield _sse({"id": rid, "object": obj, "created": created, "model": info["model"], "choices": [],
                            "usage": _usage(requests, finals), "outrider": _spec_summary(finals, info)})
            yield _sse("[DONE]")
            done = True
        finally:
            metrics.streams.labels(metrics.model).dec()
            if not done:
                metrics.disconnects.labels(metrics.model, route).inc()
            for p in pumps:
                p.cancel()
            for g in gens:
                g.cancel()  # aborts whatever still runs in the engine (its KV is freed)

    def _response(self, kind: str, requests: list[dict], finals: list[dict], info: dict) -> dict:
        rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        if kind == "completion":
            choices = [{"index": i, "text": f["text"], "logprobs": None, "finish_reason": f["finish_reason"]}
                       for i, f in enumerate(finals)]
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": f["text"]}, "logprobs": None,
                        "finish_reason": f["finish_reason"]} for i, f in enumerate(finals)]
        return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                "created": int(time.time()), "model": info["model"], "choices": choices,
                "usage": _usage(requests, finals), "outrider": _spec_summary(finals, info)}

    # ----------------------------------------------------------------- routes
    async def completions(self, body: CompletionRequest):
        self._check_common(body)
        for name, neutral in (("logprobs", None), ("echo", (None, False)), ("suffix", None)):
            value = getattr(body, name)
            if value is not None and (not isinstance(neutral, tuple) or value not in neutral):
                raise APIError(400, f"{name} is not supported", param=name, code="unsupported")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of", code="unsupported")
        await self._check_model(body)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt is empty", param="prompt", code="empty_prompt")
        requests = self._engine_requests(body, [{"prompt": p} for p in prompts], body.max_tokens)
        return await self._run("completion", body, requests)

    async def chat_completions(self, body: ChatCompletionRequest):
        self._check_common(body)
        if body.logprobs or body.top_logprobs is not None:
            raise APIError(400, "logprobs is not supported", param="logprobs", code="unsupported")
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools", code="unsupported")
        if body.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice is not supported", param="tool_choice", code="unsupported")
        if body.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format is not supported (only {'type': 'text'})",
                           param="response_format", code="unsupported")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens differ", param="max_completion_tokens")
        info = await self._check_model(body)
        if not body.messages:
            raise APIError(400, "messages is empty", param="messages", code="empty_messages")
        if not info.get("chat_template", True):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions with a prompt",
                           param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.content if not isinstance(m.content, list)
                     else [p.model_dump() for p in m.content]} for m in body.messages]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        requests = self._engine_requests(body, [{"messages": messages}], max_tokens)
        return await self._run("chat", body, requests)

    async def models(self) -> dict:
        info = await self.info()
        return {"object": "list", "data": [{
            "id": info["model"], "object": "model", "created": self._created, "owned_by": "outrider",
            "max_model_len": info["max_context"], "draft": info.get("draft"),
            "num_draft_tokens": info.get("num_draft_tokens")}]}

    async def health(self):
        response = self.engine.health.remote()
        try:
            state = await asyncio.wait_for(_awaited(response), HEALTH_TIMEOUT_S)
        except TimeoutError:
            response.cancel()  # a stuck engine must not collect one pending health call per probe
            state = {"serving": False, "reason": f"the engine did not answer within {HEALTH_TIMEOUT_S:.0f} s"}
        except Exception as exc:  # noqa: BLE001 - the replica is gone or failing: not serving
            cause = unwrap_error(exc)
            state = {"serving": False, "reason": f"{type(cause).__name__}: {cause}"}
        body = {"reason": state["reason"], **({"stores": state["stores"]} if state.get("stores") else {})}
        if state["serving"]:
            return {"status": "SERVING", **body}
        return JSONResponse({"status": "NOT_SERVING", **body}, status_code=503)

    async def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        try:
            await self.metrics_of_http()  # (creates the ingress's metrics on first use)
            response = self.engine.metrics.remote()
            try:
                engine = await asyncio.wait_for(_awaited(response), HEALTH_TIMEOUT_S)
            except TimeoutError:
                response.cancel()
                raise
        except Exception as exc:  # noqa: BLE001 - still export what the ingress has
            engine = f"# engine metrics unavailable: {type(unwrap_error(exc)).__name__}\n".encode()
        own = self.http_metrics.render() if self.http_metrics is not None else b""
        return Response(engine + own + await self._grpc_metrics(), media_type=CONTENT_TYPE_LATEST)

    async def _grpc_metrics(self) -> bytes:
        """The gRPC edge's metrics (when gRPC is on), so one scrape sees both edges."""
        if self._grpc is None or not hasattr(self._grpc, "metrics_text"):
            return b""
        response = self._grpc.metrics_text.remote()
        try:
            return await asyncio.wait_for(_awaited(response), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - still export the rest
            if isinstance(exc, TimeoutError):
                response.cancel()
            return f"# gRPC metrics unavailable: {type(unwrap_error(exc)).__name__}\n".encode()


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of ``server`` (routes, error handlers, auth and metrics middleware)."""
    app = FastAPI(
        title="Outrider",
        summary="OpenAI-compatible API of an Outrider cluster (lossless speculative decoding on Ray).",
        version="1",
    )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind,
                        headers=getattr(exc, "headers", None) or {}).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return map_error(exc).response()

    errors = {400: {"description": "bad request (OpenAI-style error body)"},
              401: {"description": "missing or wrong API key"},
              429: {"description": "engine queue full; see Retry-After"},
              503: {"description": "engine not serving or Serve at capacity"}}

    @app.post("/v1/completions", summary="Create a completion (OpenAI-compatible)", responses=errors)
    async def completions(body: CompletionRequest):
        return await server.completions(body)

    @app.post("/v1/chat/completions", summary="Create a chat completion (OpenAI-compatible)", responses=errors)
    async def chat_completions(body: ChatCompletionRequest):
        return await server.chat_completions(body)

    @app.get("/v1/models", summary="The served model")
    async def models():
        return await server.models()

    @app.get("/health", summary="200 SERVING while the engine serves; 503 NOT_SERVING otherwise (no auth)",
             responses={503: {"description": "NOT_SERVING"}})
    async def health():
        return await server.health()

    @app.get("/metrics", summary="Prometheus metrics: the engine's and this ingress's",
             response_class=Response)
    async def metrics():
        return await server.metrics()

    app.add_middleware(_Middleware, server=server)
    return app


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class OpenAIIngress(OpenAIServer):
    """``OpenAIServer`` as a Serve deployment: ``OpenAIIngress.bind(engine, serve_options)``."""


async def _all_or_none(coros: list) -> list:
    """Every result, or the first error with the other tasks cancelled (their errors retrieved)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise


async def _awaited(response):
    return await response


async def _final_of(gen) -> dict:
    final = None
    async for event in gen:
        if event["type"] == "final":
            final = event
    if final is None:
        raise RuntimeError("the engine ended a request without a final event")
    return final


async def _pump(index: int, first: dict, gen, queue: asyncio.Queue) -> None:
    try:
        await queue.put((index, first))
        if first["type"] != "final":
            async for event in gen:
                await queue.put((index, event))
        await queue.put((index, None))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - handed to the stream, which reports it
        await queue.put((index, exc))


def _usage(requests: list[dict], finals: list[dict | None]) -> dict:
    prompts: dict[str, int] = {}
    completion = 0
    for req, final in zip(requests, finals):
        if final is None:
            continue
        key = json.dumps(req.get("prompt") if req.get("prompt") is not None else req.get("messages"))
        prompts[key] = final["usage"]["prompt_tokens"]  # a prompt counts once, whatever n is
        completion += final["usage"]["completion_tokens"]
    prompt = sum(prompts.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _spec_summary(finals: list[dict | None], info: dict) -> dict:
    """Speculation statistics of the response: pooled over choices, and per choice when n > 1."""
    done = [f for f in finals if f is not None]

    def one(f: dict) -> dict:
        s = f["stats"]
        return {"mean_accepted_length": round(float(s.get("mean_accepted_length", 0.0)), 4),
                "target_forward_passes": int(s.get("target_forward_passes", 0)),
                "acceptance_by_position": [round(float(a), 4) for a in s.get("acceptance_by_position", [])],
                "ttft_s": None if f.get("ttft_s") is None else round(float(f["ttft_s"]), 6)}

    lengths = [n for f in done for n in f["stats"].get("accepted_lengths", [])]
    summary = {"draft": info.get("draft"), "num_draft_tokens": info.get("num_draft_tokens"),
               "mean_accepted_length": round(sum(lengths) / len(lengths), 4) if lengths else 0.0,
               "target_forward_passes": sum(int(f["stats"].get("target_forward_passes", 0)) for f in done)}
    if len(done) == 1:
        summary.update({k: v for k, v in one(done[0]).items() if k not in summary})
    elif done:
        summary["choices"] = [one(f) for f in done]
    return summary
