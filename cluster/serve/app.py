"""Build and deploy the Serve application of one cluster (control plane).

    app = build_app(config)            # EngineServer + OpenAIIngress (+ GrpcIngress)
    handle = deploy(config)            # serve.start on config.serve.host/http_port, then serve.run

In a Serve config file (the Helm chart's RayService ``serveConfigV2``) the application is built by
``app_builder`` from ``args: {config: {...}}``, a mapping in this project's own ``ClusterConfig``
schema, loaded through ``load_config`` exactly like ``outrider serve --config`` (``OUTRIDER_*``
environment variables of the process override it; that is how secrets such as the API key and the
Redis password arrive):

    applications:
      - name: outrider
        import_path: cluster.serve.app:app_builder
        args: {config: {target: demo, draft: "self:8", serve: {...}, stores: {...}}}

With ``serve.ingress_resource`` set, the engine server and both ingresses require a sliver of that
Ray custom resource, so they run on the nodes that advertise it (the chart's head pod, which its
HTTP and gRPC Services select).

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


# the share of ``serve.ingress_resource`` each pinned deployment takes (any node that advertises one
# unit of it hosts all three, with room to spare)
INGRESS_RESOURCE_SHARE = 0.01


def _pinned(deployment, opts, **options):
    """``deployment.options(...)``, requiring a sliver of ``opts.ingress_resource`` when it is set."""
    if opts.ingress_resource:
        actor = dict(deployment.ray_actor_options or {})
        actor["resources"] = {**actor.get("resources", {}), opts.ingress_resource: INGRESS_RESOURCE_SHARE}
        options["ray_actor_options"] = actor
    return deployment.options(**options)


def build_app(config: ClusterConfig, *, engine=None):
    """The Serve ``Application`` of ``config``: the engine server bound under the HTTP (and gRPC) ingress.

    ``engine`` replaces the bound ``EngineServer`` (tests: a deployment with the same contract)."""
    from cluster.serve.engine_server import EngineServer
    from cluster.serve.openai_ingress import OpenAIIngress

    opts = config.serve
    if engine is None:
        engine = _pinned(EngineServer, opts,
                         max_ongoing_requests=config.max_running + config.max_waiting + 64,
                         ).bind(config.model_dump())
    serve_options = opts.to_dict()
    grpc = None
    if opts.grpc_port is not None:
        cls = _grpc_ingress_class()
        if cls is not None:
            grpc = _pinned(cls, opts).bind(engine, serve_options)
    return _pinned(OpenAIIngress, opts,
                   max_ongoing_requests=opts.max_concurrent_requests,
                   max_queued_requests=opts.max_queued_requests,
                   ).bind(engine, serve_options, grpc_ingress=grpc)


def config_from_args(args: dict, *, env=None) -> ClusterConfig:
    """The ``ClusterConfig`` of a Serve application's ``args`` (``{"config": {...}}``), through the
    project's loader: ``OUTRIDER_*`` variables of ``env`` (default: this process's) override it.

    Raises ``ConfigError`` naming the bad field (``... (from serveConfigV2 args.config)``)."""
    from cluster.config import ConfigError, load_config

    if not isinstance(args, dict):
        raise ConfigError(f"application args: expected a mapping with a 'config' key, got {type(args).__name__}")
    unknown = sorted(set(args) - {"config"})
    if unknown:
        raise ConfigError(f"application args: unknown key(s) {', '.join(unknown)}; expected only 'config'")
    data = args.get("config")
    if not isinstance(data, dict):
        raise ConfigError("application args.config: expected a mapping of configuration fields")
    return load_config(data=data, env=env, data_source="serveConfigV2 args.config")


def app_builder(args: dict):
    """Ray Serve application builder (``import_path: cluster.serve.app:app_builder``)."""
    config = config_from_args(args)
    log.info("building the application: target %s, draft %s, node pools %s, stores %s",
             config.target, config.draft, config.node_pools, config.stores.backend)
    return build_app(config)


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
