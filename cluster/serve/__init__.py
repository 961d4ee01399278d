"""Serving Outrider (control plane): Ray Serve deployments in front of one ``Cluster``.

* ``engine_server.EngineServer`` — the deployment that owns the cluster engine; every front end
  (HTTP here, gRPC in ``grpc_ingress``) calls it through a Serve handle, so they share one engine;
* ``openai_ingress.OpenAIIngress`` — the OpenAI-compatible HTTP API (FastAPI through Serve);
* ``app.build_app`` / ``app.deploy`` — bind them into one Serve application from a ``ClusterConfig``.

Nothing here is imported by the engine; importing this package does not import Ray Serve.
"""
