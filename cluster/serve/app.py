"""Build and deploy the Serve application of one cluster (control plane).

    app = build_app(config)            # EngineServer + OpenAIIngress (+ GrpcIngress)
    handle = deploy(config)            # serve.start on config.serve.host/http_port, then serve.run

One application, one engine: ``EngineServer`` owns the ``Cluster``; ``OpenAIIngress`` (HTTP) and,
when ``config.serve.grpc_port`` is set and ``cluster.serve.grpc_ingress`` exists,
``GrpcIngress`` (a grpc.aio server on that port) hold handles to it. The HTTP ingress is the
application's ingress; the gRPC deployment is bound into its arguments so that Serve deploys it
in the same application (it shares the engine).

Limits: ``EngineServer`` admits up to ``max_running + max_waiting`` (+ slack) concurrent calls, so
the engine's own bounded queue, not Serve's, decides when to refuse (429); the HTTP ingress takes
``serve.max_concurrent_requests`` at once and queues ``serve.max_queued_requests`` more at Serve
(beyond that Serve answers 503).
"""

from __future__ import annotations

import logging
import warnings

from cluster.config import ClusterConfig

log = logging.getLogger("outrider.serve")

APP_NAME = "outrider"


def _grpc_ingress_class():
    try:
        from cluster.serve.grpc_ingress import GrpcIngress
    except ModuleNotFoundError as exc:
        if exc.name not in ("cluster.serve.grpc_ingress", "grpc", "grpc_health", "grpc_reflection"):
            raise
        warnings.warn(f"gRPC is not available ({exc}); serving HTTP only", RuntimeWarning, stacklevel=3)
        return None
    return GrpcIngress


def build_app(config: ClusterConfig):
    """The Serve ``Application`` of ``config``: the engine server bound under the HTTP (and gRPC) ingress."""
    from cluster.serve.engine_server import EngineServer
    from cluster.serve.openai_ingress import OpenAIIngress

    opts = config.serve
    engine = EngineServer.options(
        max_ongoing_requests=config.max_running + config.max_waiting + 64,
    ).bind(config.model_dump())
    serve_options = opts.to_dict()
    grpc = None
    if opts.grpc_port is not None:
        cls = _grpc_ingress_class()
        if cls is not None:
            grpc = cls.bind(engine, serve_options)
    return OpenAIIngress.options(
        max_ongoing_requests=opts.max_concurrent_requests,
        max_queued_requests=opts.max_queued_requests,
    ).bind(engine, serve_options, grpc_ingress=grpc)


def deploy(config: ClusterConfig, *, name: str = APP_NAME, blocking: bool = False):
    """Start Serve's HTTP proxy on ``config.serve.host:http_port`` and run the application.

    Ray must already be initialised (``ray.init``). Returns the ingress deployment's handle."""
    from ray import serve

    opts = config.serve
    http_options = {"host": opts.host, "port": opts.http_port}
    if opts.request_timeout_s is not None:
        http_options["request_timeout_s"] = opts.request_timeout_s
    logging_config = {"enable_access_log": opts.access_log, "log_level": opts.log_level}
    serve.start(http_options=http_options, logging_config=logging_config)
    return serve.run(build_app(config), name=name, route_prefix="/", blocking=blocking,
                     logging_config=logging_config)
