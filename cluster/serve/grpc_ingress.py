"""``GrpcIngress``: the gRPC API (``protos/outrider/v1/generate.proto``) as a Ray Serve deployment.

Plane: control. The replica runs a ``grpc.aio`` server on ``host:grpc_port`` (127.0.0.1 unless
told otherwise) on its own event loop, and answers every RPC through a Serve handle to the
``EngineServer`` deployment — the same engine, KV cache and metrics as the HTTP API.

Services:
* ``outrider.v1.Generation`` — ``Generate`` (unary: drains the engine's event stream) and
  ``GenerateStream`` (one message per engine chunk, the last with finish reason, usage, stats);
* ``grpc.health.v1.Health`` — services "" and "outrider.v1.Generation": SERVING / NOT_SERVING from
  ``engine.health()``, polled every ``health_poll_s``; an engine that does not answer within
  ``health_timeout_s`` (stuck, gone) is NOT_SERVING;
* server reflection (v1alpha), so ``grpcurl`` needs no ``.proto``.

Metrics (``metrics()``, Prometheus text; the HTTP ingress appends it to ``GET /metrics``): RPCs of
the Generation service by method and status code, their duration, the time to a stream's first
message, and the streams open now — counted at this edge, beside the engine's own metrics.

Errors: a bad field (checked here, then by the engine) -> INVALID_ARGUMENT with a message naming
it; ``EngineOverloadedError`` or Serve back-pressure -> RESOURCE_EXHAUSTED with trailing metadata
``retry-after`` (whole seconds) and ``retry-after-ms``; ``EngineDeadError`` or an unreachable
engine replica -> UNAVAILABLE; anything else -> INTERNAL (logged).

Auth: with ``api_key`` set, every RPC except health and reflection needs metadata
``authorization: Bearer <key>`` (compared in constant time), else UNAUTHENTICATED.

Invariants: a client that cancels (or whose deadline passes) aborts its engine request at once —
the handle's stream is cancelled from the RPC's done callback, so the engine frees its KV at its
next step; a port that cannot be bound fails the replica's constructor (no silent sharing:
``SO_REUSEPORT`` is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from ray import serve

from protos.outrider.v1 import generate_pb2 as pb
from protos.outrider.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger("outrider.serve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "outrider.v1.Generation"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_EXEMPT = (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)


class BadRequest(ValueError):
    """A request field is invalid (INVALID_ARGUMENT)."""


def unwrap_error(exc: BaseException) -> BaseException:
    """The exception the engine replica raised, out of Ray's ``RayTaskError`` wrapper (if any)."""
    for _ in range(4):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(status code, details, trailing metadata) for an error raised by the engine handle."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        RequestCancelledError,
    )

    from cluster.scheduler import EngineOverloadedError

    cause = unwrap_error(exc)
    name = type(cause).__name__
    if isinstance(cause, (EngineOverloadedError, BackPressureError)):
        retry_s = float(getattr(cause, "retry_after_s", 1.0) or 1.0)
        meta = (("retry-after", str(max(1, math.ceil(retry_s)))), ("retry-after-ms", str(int(retry_s * 1000))))
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"engine overloaded: {cause}; retry after {retry_s:g} s", meta
    if name == "EngineDeadError":  # cluster.engine (imported by name: it pulls in torch)
        return grpc.StatusCode.UNAVAILABLE, f"engine unavailable: {cause}", ()
    if isinstance(cause, (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, f"engine unavailable: {name}: {cause}", ()
    if isinstance(cause, (RequestCancelledError, asyncio.CancelledError)):
        return grpc.StatusCode.CANCELLED, "request cancelled", ()
    if isinstance(cause, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause), ()
    log.error("engine request failed: %s: %s", name, cause, exc_info=cause)
    return grpc.StatusCode.INTERNAL, f"internal error: {name}: {cause}", ()


def engine_request(request: pb.GenerateRequest, *, model_name: str, max_context: int | None = None) -> dict:
    """The engine contract's request dict for ``request``; ``BadRequest`` naming the bad field."""
    if request.model and request.model != model_name:
        raise BadRequest(f"model {request.model!r} is not served here; this server serves {model_name!r}")
    kind = request.WhichOneof("prompt")
    if kind is not None and len(request.messages):
        raise BadRequest("set either a prompt (text or token_ids) or messages, not both")
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    if kind == "text":
        if not request.text:
            raise BadRequest("text: the prompt is empty")
        prompt = request.text
    elif kind == "token_ids":
        if not len(request.token_ids.ids):
            raise BadRequest("token_ids: the prompt is empty")
        prompt = [int(t) for t in request.token_ids.ids]
    elif len(request.messages):
        messages = []
        for i, m in enumerate(request.messages):
            if not m.role:
                raise BadRequest(f"messages[{i}].role is empty")
            messages.append({"role": m.role, "content": m.content})
    else:
        raise BadRequest("no prompt: set text, token_ids or messages")

    s = request.sampling
    if not (math.isfinite(s.temperature) and s.temperature >= 0.0):
        raise BadRequest(f"sampling.temperature must be >= 0, got {s.temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"sampling.top_p must be in (0, 1], got {top_p}")
    if s.top_k < 0:
        raise BadRequest(f"sampling.top_k must be >= 0, got {s.top_k}")
    max_tokens = s.max_tokens if s.HasField("max_tokens") else None
    if max_tokens is not None and max_tokens <= 0:
        raise BadRequest(f"sampling.max_tokens must be > 0, got {max_tokens}")
    if max_tokens is not None and max_context is not None and max_tokens > max_context:
        raise BadRequest(f"sampling.max_tokens {max_tokens} exceeds the model's context ({max_context} tokens)")
    for i, stop in enumerate(request.stop):
        if not stop:
            raise BadRequest(f"stop[{i}] is empty")
    return {
        "prompt": prompt, "messages": messages, "max_tokens": max_tokens,
        "temperature": float(s.temperature), "top_p": float(top_p), "top_k": int(s.top_k),
        "seed": int(s.seed) if s.HasField("seed") else None,
        "stop": list(request.stop) or None, "ignore_eos": bool(request.ignore_eos),
    }


def _usage(final: dict) -> pb.Usage:
    u = final.get("usage") or {}
    prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=int(u.get("total_tokens", prompt + completion)))


def _stats(final: dict) -> pb.SpecStats:
    s = final.get("stats") or {}
    stats = pb.SpecStats(
        target_forward_passes=int(s.get("target_forward_passes", 0)),
        mean_accepted_length=float(s.get("mean_accepted_length", 0.0)),
        accepted_lengths=[int(x) for x in s.get("accepted_lengths", ())],
        acceptance_by_position=[float(x) for x in s.get("acceptance_by_position", ())],
    )
    if final.get("ttft_s") is not None:
        stats.ttft_s = float(final["ttft_s"])
    return stats


async def _awaited(response):
    return await response


class _GrpcMetrics:
    """The gRPC edge's own Prometheus metrics (one registry per ingress replica)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
        self.requests = Counter("outrider_grpc_requests", "gRPC calls of the Generation service by method and status code",
                                ["model", "method", "code"], registry=self.registry)
        self.latency = Histogram("outrider_grpc_request_duration_seconds", "gRPC call time until its status was sent",
                                 ["model", "method"], buckets=buckets, registry=self.registry)
        self.ttft = Histogram("outrider_grpc_time_to_first_token_seconds",
                              "time from a GenerateStream call's arrival to its first message",
                              ["model"], buckets=buckets, registry=self.registry)
        self.streams = Gauge("outrider_grpc_streams_active", "GenerateStream calls open now", ["model"],
                             registry=self.registry)

    @contextlib.contextmanager
    def track(self, method: str, context: grpc.aio.ServicerContext, model: str):
        """Count one call: its status is the context's code (set by ``abort``), CANCELLED when the
        client went away, INTERNAL for an unexpected error, else OK."""
        start = time.perf_counter()
        code = None
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            if code is None:
                code = _context_code(context) or grpc.StatusCode.OK
            self.requests.labels(model, method, code.name).inc()
            self.latency.labels(model, method).observe(time.perf_counter() - start)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _context_code(context) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc without ServicerContext.code()
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return None


class _Generation(pb_grpc.GenerationServicer):
    """The Generation service over an engine handle."""

    def __init__(self, ingress: GrpcIngress) -> None:
        self.ingress = ingress

    async def _prepare(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> tuple[dict, str]:
        if not self.ingress.authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata 'authorization: Bearer <key>'")
        try:
            info = await self.ingress.engine_info()
        except Exception as exc:  # noqa: BLE001 - the engine is unreachable
            code, details, meta = status_for(exc)
            await context.abort(code, details, trailing_metadata=meta)
        try:
            return engine_request(request, model_name=info["model"], max_context=info.get("max_context")), info["model"]
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _open(self, body: dict, context: grpc.aio.ServicerContext):
        events = self.ingress.engine.options(stream=True).generate.remote(body)
        # a cancelled call, a passed deadline or a finished one: the engine request is aborted
        # (cancelling an already finished stream is a no-op)
        context.add_done_callback(lambda _ctx: events.cancel())
        return events

    def _model(self) -> str:
        info = self.ingress._info
        return (info or {}).get("model") or self.ingress._model_name or "unknown"

    async def Generate(self, request, context):
        with self.ingress.metrics.track("Generate", context, self._model()):
            return await self._generate(request, context)

    async def GenerateStream(self, request, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        metrics, start, first = self.ingress.metrics, time.perf_counter(), True
        with metrics.track("GenerateStream", context, self._model()):
            model = self._model()
            metrics.streams.labels(model).inc()
            try:
                async for message in self._generate_stream(request, context):
                    if first:
                        metrics.ttft.labels(model).observe(time.perf_counter() - start)
                        first = False
                    yield message
            finally:
                metrics.streams.labels(model).dec()

    async def _generate(self, request, context):
        body, model = await self._prepare(request, context)
        events = self._open(body, context)
        final = None
        error = None
        try:
            async for event in events:
                if event.get("type") == "final":
                    final = event
        except asyncio.CancelledError:
            events.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            error = exc
        if error is not None:
            code, details, meta = status_for(error)
            await context.abort(code, details, trailing_metadata=meta)
        if final is None:
            await context.abort(grpc.StatusCode.INTERNAL, "the engine ended the request without a result")
        return pb.GenerateResponse(
            text=final.get("text") or "", token_ids=[int(t) for t in final.get("token_ids", ())],
            finish_reason=_FINISH.get(final.get("finish_reason"), pb.FINISH_REASON_UNSPECIFIED),
            usage=_usage(final), stats=_stats(final), model=model)

    async def _generate_stream(self, request, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        body, model = await self._prepare(request, context)
        events = self._open(body, context)
        sent_text, sent_ids = [], 0
        error = None
        try:
            async for event in events:
                if event.get("type") == "chunk":
                    ids = [int(t) for t in event.get("token_ids", ())]
                    text = event.get("text") or ""
                    sent_text.append(text)
                    sent_ids += len(ids)
                    yield pb.GenerateStreamResponse(text=text, token_ids=ids, model=model)
                elif event.get("type") == "final":
                    # the final event carries the whole output: send what the chunks did not
                    # (text held back for stop strings, flushed at the end)
                    text, so_far = event.get("text") or "", "".join(sent_text)
                    rest = text[len(so_far):] if text.startswith(so_far) else ""
                    ids = [int(t) for t in event.get("token_ids", ())][sent_ids:]
                    yield pb.GenerateStreamResponse(
                        text=rest, token_ids=ids,
                        finish_reason=_FINISH.get(event.get("finish_reason"), pb.FINISH_REASON_UNSPECIFIED),
                        usage=_usage(event), stats=_stats(event), model=model)
        except (asyncio.CancelledError, GeneratorExit):
            events.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            error = exc
        if error is not None:
            code, details, meta = status_for(error)
            await context.abort(code, details, trailing_metadata=meta)


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1)
class GrpcIngress:
    """A ``grpc.aio`` server inside a Serve replica, in front of an ``EngineServer`` handle.

    ``serve_options``: ``host`` (default 127.0.0.1), ``grpc_port`` (0 picks a free port),
    ``api_key`` (str or None), ``model_name`` (None: the engine's); optional ``health_poll_s``
    (default 2) and ``health_timeout_s`` (default 10). Other keys (the HTTP side's) are ignored.
    It reserves no CPU, like Serve's own proxies; one replica per host and port.
    """

    async def __init__(self, engine_handle, serve_options: dict) -> None:
        opts = dict(serve_options or {})
        self.engine = engine_handle
        self.host = opts.get("host") or "127.0.0.1"
        port = opts.get("grpc_port")
        if port is None:
            raise ValueError("serve_options.grpc_port is not set (gRPC is off): do not deploy GrpcIngress")
        api_key = opts.get("api_key")
        if hasattr(api_key, "get_secret_value"):
            api_key = api_key.get_secret_value()
        self._api_key = api_key.encode() if api_key else None
        self._model_name = opts.get("model_name") or None
        self._poll_s = float(opts.get("health_poll_s") or 2.0)
        self._health_timeout_s = float(opts.get("health_timeout_s") or 10.0)
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()
        self.metrics = _GrpcMetrics()
        self.serving: bool | None = None  # the last health poll's verdict
        self.health_reason = "not checked yet"

        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GenerationServicer_to_server(_Generation(self), self._server)
        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, *_EXEMPT), self._server)
        address = f"[{self.host}]:{int(port)}" if ":" in self.host else f"{self.host}:{int(port)}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC: cannot listen on {address} ({exc}); is the port taken?") from None
        if not self.port:
            raise RuntimeError(f"gRPC: cannot listen on {address}; is the port taken?")
        await self._set_health(False)
        await self._server.start()
        await self._poll_once()
        self._poller = asyncio.create_task(self._poll_health())
        self._closed = False
        log.info("gRPC API listening on %s:%d (auth %s)", self.host, self.port, "on" if self._api_key else "off")

    # ----------------------------------------------------------------- helpers
    def authorized(self, context: grpc.aio.ServicerContext) -> bool:
        if self._api_key is None:
            return True
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key)
        return False

    async def engine_info(self) -> dict:
        """The engine's ``info()`` (fetched once), with ``model`` replaced by ``model_name`` if set."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    info = dict(await self.engine.info.remote())
                    if self._model_name:
                        info["model"] = self._model_name
                    self._info = info
        return self._info

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def _poll_once(self) -> None:
        response = self.engine.health.remote()
        try:
            state = await asyncio.wait_for(_awaited(response), self._health_timeout_s)
            serving, reason = bool(state.get("serving")), str(state.get("reason", ""))
        except TimeoutError:
            response.cancel()  # a stuck engine must not pile up one pending health call per poll
            serving, reason = False, f"the engine did not answer a health check within {self._health_timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure to reach the engine is NOT_SERVING
            serving, reason = False, f"engine unreachable: {type(unwrap_error(exc)).__name__}: {unwrap_error(exc)}"
        if serving != self.serving:
            log.log(logging.INFO if serving else logging.WARNING, "gRPC health: %s (%s)",
                    "SERVING" if serving else "NOT_SERVING", reason or "ok")
        self.serving, self.health_reason = serving, reason
        await self._set_health(serving)

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gRPC health poll failed")

    # ----------------------------------------------------------------- Serve methods
    async def metrics_text(self) -> bytes:
        """This edge's Prometheus text (module docstring)."""
        return self.metrics.render()

    async def ready(self) -> dict:
        """Where the server listens (tests, the CLI)."""
        return {"host": self.host, "port": self.port}

    async def check_health(self) -> None:
        """Serve's replica health check: the gRPC server must still be running."""
        if self._poller.done() and not self._poller.cancelled() and self._poller.exception() is not None:
            raise RuntimeError(f"gRPC health poller died: {self._poller.exception()}")

    def __del__(self):
        """Serve's graceful shutdown: stop polling, report NOT_SERVING and stop the server, letting
        calls in flight finish for up to 5 s. (Synchronous so that the garbage collector's later
        call is a no-op; under Serve it returns the coroutine Serve awaits.)"""
        if getattr(self, "_closed", True):  # never started, or already stopped
            return None
        self._closed = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # collected outside any loop: the process is going away
            return None
        return self._stop()

    async def _stop(self) -> None:
        self._poller.cancel()
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace=5.0)
