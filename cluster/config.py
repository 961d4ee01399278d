"""The cluster's configuration: one validated schema for the engine, the CLI and serving.

Plane: control. ``ClusterConfig`` is a pydantic model, validated once at the edge: unknown
fields and bad values raise ``pydantic.ValidationError`` naming the field. Everything that starts
workers, schedules requests or serves them reads its settings from here and nowhere else; the
serving options (``outrider serve``: listen address, ports, API key, model name, limits) are the
nested ``serve`` section (``ServeOptions``).

Sources (``load_config``), later ones win: defaults < YAML file < environment (``OUTRIDER_<FIELD>``
for every top-level field and every ``serve`` field, e.g. ``OUTRIDER_DRAFT=self:8``,
``OUTRIDER_HTTP_PORT=9000``, ``OUTRIDER_API_KEY=...``; ``OUTRIDER_STORES_<FIELD>`` for the ``stores``
section, e.g. ``OUTRIDER_STORES_REDIS_PASSWORD``) < CLI flags. A bad value raises
``ConfigError`` naming the field and where the value came from.

Invariants:
* ``draft`` is ``none``, ``self:N`` (the target's first N layers) or a checkpoint path;
  ``num_draft_tokens`` is the most draft tokens per step (the adaptive policy may choose fewer);
* the placement fields map one to one onto ``placement.spec.PlacementRequest`` (``placement_request``);
* ``kv_budget_tokens`` is per worker; admission never lets reserved tokens exceed it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from placement.spec import PlacementRequest


class ServeOptions(BaseModel):
    """How ``outrider serve`` listens and what it admits (the ``serve`` section of the config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", min_length=1,
                      description="Address the HTTP (and gRPC) servers listen on; 0.0.0.0 for every interface.")
    http_port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI-compatible HTTP API.")
    grpc_port: int | None = Field(50051, ge=1, le=65535, description="Port of the gRPC API; null = no gRPC.")
    api_key: SecretStr | None = Field(
        None, description="When set, every route and RPC except health needs `Authorization: Bearer <key>`.")
    model_name: str | None = Field(
        None, min_length=1, description="The model id clients send and /v1/models lists; default: the target's name.")
    default_max_tokens: int = Field(
        512, ge=1, description="max_tokens of a request that sets none (capped by the rest of the context).")
    max_concurrent_requests: int = Field(
        256, ge=1, description="HTTP requests in flight per ingress replica; beyond it they queue at Serve.")
    max_queued_requests: int = Field(
        64, ge=1, description="HTTP requests queued at Serve beyond max_concurrent_requests (at least 1: Serve "
                              "refuses 0); beyond it: 503.")
    request_timeout_s: float | None = Field(
        None, gt=0, description="End-to-end limit of one HTTP request (Serve answers 408 and aborts it).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Log level of Serve's components and the deployments.")
    access_log: bool = Field(False, description="Log every HTTP request (Serve's access log; needs log_level INFO).")
    ingress_resource: str | None = Field(
        None, min_length=1,
        description="A Ray custom resource the HTTP/gRPC ingress and the engine server require a sliver of, "
                    "to pin them to the nodes that advertise it (the Helm chart: the head pod, which its "
                    "Services select).")

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("api_key must not be empty (leave it unset for no authentication)")
        return value

    def api_key_value(self) -> str | None:
        return None if self.api_key is None else self.api_key.get_secret_value()

    def to_dict(self) -> dict:
        """Plain values (the API key revealed): what the Serve deployments are given."""
        return {**self.model_dump(), "api_key": self.api_key_value()}


class StoreOptions(BaseModel):
    """Where the cluster's shared stores live (the ``stores`` section of the config).

    ``memory``: in the engine server's process (one replica, nothing shared, nothing to run).
    ``redis``: a Redis server every replica reaches at ``redis_url``; the password may be in the
    URL or, better, in ``redis_password`` (env ``OUTRIDER_STORES_REDIS_PASSWORD``, from a Secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["memory", "redis"] = Field("memory", description="Store backend: memory or redis.")
    redis_url: str | None = Field(
        None, description="redis://[user:password@]host:port/db or rediss://... (TLS); needed with backend redis.")
    redis_password: SecretStr | None = Field(
        None, description="Redis AUTH password (overrides one in the URL).")
    key_prefix: str = Field("outrider", min_length=1, description="Prefix of every key the cluster writes.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Time to connect to (and ping) the store at start.")

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ValueError(f"redis_url {value!r}: expected redis://host:port/db, rediss://... or unix://path")
        return value.strip()

    @model_validator(mode="after")
    def _check_backend(self) -> StoreOptions:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend redis needs redis_url")
        return self

    def password(self) -> str | None:
        return None if self.redis_password is None else self.redis_password.get_secret_value()


class ClusterConfig(BaseModel):
    """Models, roles and GPU counts, speculation and scheduling settings of one cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _resolve_overlap(cls, data):
        """``overlap`` unset (None): on with a draft of its own GPUs, off with a colocated one."""
        if isinstance(data, dict) and data.get("overlap") is None:
            data = {**data, "overlap": not data.get("colocate", False)}
        return data

    # models
    target: str = Field(min_length=1, description="Target checkpoint: a directory (safetensors + config.json), "
                                                  "a .gguf file, or 'demo' (the demo model, fetched on first use).")
    draft: str = Field("none", description="Draft: 'none', 'self:N' (target's first N layers) or a checkpoint path.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; 'auto' = the checkpoint's (float32 on CPU).")

    # placement
    target_gpus: int = Field(1, ge=1, description="GPUs of the target: its tensor-parallel degree.")
    draft_gpus: int = Field(1, ge=0, description="GPUs of the draft worker (0 only with colocate).")
    colocate: bool = Field(False, description="Put the draft on the GPU of target rank 0.")
    colocated_draft_fraction: float = Field(0.5, gt=0, lt=1, description="Share of that GPU the draft takes.")
    cpus_per_worker: float = Field(1.0, ge=0, description="Ray CPUs reserved per worker actor.")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs to declare for a local Ray cluster (fake GPUs on a CPU machine).")
    address: str | None = Field(None, description="Ray cluster to join; None starts a local one.")
    node_pools: Literal["shared", "per_role"] = Field(
        "shared", description="shared: any node with GPUs hosts any role, a replica on one node; per_role: "
                              "workers need the Ray resource outrider_target / outrider_draft (1 per GPU) that "
                              "only their role's nodes advertise (the Helm chart's worker groups).")

    # speculation
    num_draft_tokens: int = Field(4, ge=0, le=64, description="Most draft tokens per request per step.")
    adaptive: bool = Field(True, description="Choose the draft length per step for goodput (SmartSpec).")
    overlap: bool | None = Field(
        None, description="Draft step t+1 while the target verifies step t (PEARL). None (default): on when the "
                          "draft has GPUs of its own, off when it is colocated: two processes time-slice one GPU, "
                          "so the speculation delays the verify (H100, 8B + 1B shapes: taking turns beat "
                          "overlap in three runs out of three).")
    pre_verify: bool = Field(
        False, description="With overlap: after a miss, send the first fresh draft token at once (PEARL pre-verify).")
    cost_table: str | None = Field(None, description="JSON of measured step costs to seed the adaptive policy.")
    oracle_continuations: str | None = Field(
        None, description="With draft oracle:ALPHA:DRAFT (benchmarks): JSON of the target's recorded greedy outputs.")

    draft_link: Literal["auto", "gloo"] = Field(
        "auto", description="Backend of the draft <-> target tensor link: auto = NCCL between two distinct GPUs, "
        "gloo otherwise; gloo = always gloo (host copies over TCP), to compare the two.")
    fused_kernels: bool = Field(
        False, description="Fuse each layer's element-wise chains with torch.compile in the workers (experimental: "
        "compiled at each bucket's first step, captured in the CUDA graphs; not under tensor parallelism).")
    capture_at_start: bool = Field(
        False, description="On GPUs: capture the CUDA graphs of the decode and verify buckets (target Q = 1 and "
                           "k + 1, every Q up to k + 1 with adaptive k; draft Q = 1 and 2) for every batch bucket "
                           "up to max_running and KV bucket up to "
                           "the context at start, so serving meets no capture for them (start time and graph memory).")
    run_ahead: bool = Field(
        True, description="With the socket step transport: while the engine handles a step's reply, the "
                          "target (one rank) already runs the next step when it expects a plain decode (no "
                          "draft tokens, no arrivals), undone exactly when the engine asks otherwise; and the "
                          "draft (greedy requests, no pre_verify) drafts the next chain as soon as the target's "
                          "tokens reach it (with overlap: where its speculation missed), dropped when the "
                          "next step asks otherwise.")
    step_transport: Literal["socket", "ray"] = Field(
        "socket", description="How the engine calls the target each step: socket (a direct connection to each "
                              "rank, no Ray task per step) or ray (an actor call per step).")

    # scheduling and memory
    kv_budget_tokens: int = Field(4096, ge=16, description="KV cache size per worker, in tokens.")
    block_size: int = Field(16, ge=1, description="KV cache block size in tokens.")
    max_running: int = Field(64, ge=1, description="Most requests decoding at once.")
    max_waiting: int = Field(256, ge=0, description="Most requests queued; beyond it new requests are refused.")
    max_prefill_tokens: int = Field(4096, ge=1, description="Most prompt tokens prefilled in one step.")

    # faults and timeouts
    step_timeout_s: float = Field(60.0, gt=0, description="A worker that does not answer a step in time is failed.")
    start_timeout_s: float = Field(300.0, gt=0, description="Time to start workers and place them.")
    draft_restart_s: float = Field(1.0, gt=0, description="How often to check whether a lost draft is back.")
    max_worker_restarts: int = Field(3, ge=0, description="Ray restarts per worker actor before giving up.")

    # serving (outrider serve)
    serve: ServeOptions = Field(default_factory=ServeOptions, description="HTTP/gRPC serving options.")
    stores: StoreOptions = Field(default_factory=StoreOptions, description="The cluster's shared stores.")

    @field_validator("draft")
    @classmethod
    def _check_draft(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("self:"):
            n = value.removeprefix("self:")
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"draft {value!r}: expected self:N with N >= 1")
        elif value == "lookup":
            raise ValueError("draft 'lookup' runs in the single-process engine only (outrider generate)")
        elif value.startswith("oracle:"):
            from actors.spec.proposers import parse_draft_spec

            parse_draft_spec(value)  # raises ValueError naming the problem
        return value

    @model_validator(mode="after")
    def _check_placement(self) -> ClusterConfig:
        self.placement_request()  # raises PlacementError (a ValueError) naming the field
        if self.draft.startswith("oracle:") and not self.oracle_continuations:
            raise ValueError("draft oracle:... needs oracle_continuations (the target's recorded outputs)")
        return self

    @property
    def has_draft(self) -> bool:
        return self.draft != "none" and self.num_draft_tokens > 0

    def placement_request(self) -> PlacementRequest:
        return PlacementRequest(
            target_tp=self.target_gpus,
            draft_gpus=0 if self.colocate else self.draft_gpus,
            num_drafts_per_replica=1 if self.has_draft else 0,
            colocate=self.colocate and self.has_draft,
            colocated_draft_fraction=self.colocated_draft_fraction,
            target_cpus_per_worker=self.cpus_per_worker,
            draft_cpus_per_worker=self.cpus_per_worker,
            role_pools=self.node_pools == "per_role",
        )

    def torch_dtype(self):
        import torch

        return None if self.dtype == "auto" else getattr(torch, self.dtype)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> ClusterConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of configuration fields at the top level")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and where its value came from."""


ENV_PREFIX = "OUTRIDER_"


SECTIONS: dict[str, type[BaseModel]] = {"serve": ServeOptions, "stores": StoreOptions}
# environment names of section fields: serve fields keep the short OUTRIDER_<FIELD> (OUTRIDER_HTTP_PORT),
# the others carry their section (OUTRIDER_STORES_REDIS_URL)
_SECTION_ENV_PREFIX = {"serve": "", "stores": "STORES_"}


def env_variables() -> dict[str, tuple[str, ...]]:
    """``OUTRIDER_<NAME>`` -> the config field it sets (``("serve", "http_port")`` for a section's field)."""
    names: dict[str, tuple[str, ...]] = {}
    for name in ClusterConfig.model_fields:
        if name not in SECTIONS:
            names[ENV_PREFIX + name.upper()] = (name,)
    for section, model in SECTIONS.items():
        for name in model.model_fields:
            key = ENV_PREFIX + _SECTION_ENV_PREFIX[section] + name.upper()
            if key in names:
                raise RuntimeError(f"{section} field {name} collides with another field's variable {key}")
            names[key] = (section, name)
    return names


def _allows_none(path: tuple[str, ...]) -> bool:
    fields = SECTIONS[path[0]].model_fields if len(path) > 1 else ClusterConfig.model_fields
    info = fields[path[-1]]
    return info.default is None or "None" in str(info.annotation)


class _Null:
    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()  # a flag value that sets a field to None (a plain None flag means "not given")


def merge_sources(path: str | Path | None = None, *, flags: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None,
                  data: Mapping[str, Any] | None = None, data_source: str = "config"
                  ) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The raw field values of ``load_config`` (not validated) and, per field path, where each came from."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    source: dict[tuple[str, ...], str] = {}

    def put(layer: Mapping[str, Any], where: str, prefix: tuple[str, ...] = ()) -> None:
        for key, value in layer.items():
            if value is None and where in ("flag", "default"):
                continue
            if key in SECTIONS and not prefix and isinstance(value, Mapping):
                put(value, where, (key,))
                continue
            target = values.setdefault(prefix[0], {}) if prefix else values
            target[key] = None if value is NULL else value
            source[(*prefix, key)] = where

    put(defaults or {}, "default")
    if path is not None:
        path = Path(path)
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
        put(_check_layer(from_file, str(path)), str(path))
    if data is not None:
        put(_check_layer(data, data_source), data_source)
    for name, field_path in env_variables().items():
        if name in env:
            raw = env[name]
            value: Any = None if raw.strip().lower() in ("", "none", "null") and _allows_none(field_path) else raw
            put({field_path[-1]: value}, name, field_path[:-1])
    put(dict(flags or {}), "flag")
    return values, source


def _check_layer(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of configuration fields at the top level")
    for section in SECTIONS:
        if section in data and data[section] is not None and not isinstance(data[section], Mapping):
            raise ConfigError(f"{section} (from {where}): expected a mapping of {section} options")
    return data


def load_config(path: str | Path | None = None, *, flags: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None,
                data: Mapping[str, Any] | None = None, data_source: str = "config") -> ClusterConfig:
    """One ``ClusterConfig`` from, in rising precedence: ``defaults`` (e.g. the demo model chosen by
    the CLI), the YAML file at ``path``, the mapping ``data`` (e.g. a Serve application's args; named
    ``data_source`` in errors), ``OUTRIDER_*`` environment variables (``env``, default
    ``os.environ``; an empty value or ``none`` sets an optional field to None) and ``flags``
    (``None`` values are "not given"; ``NULL`` sets a field to None; serve options under ``"serve"``).

    Raises ``ConfigError`` naming the bad field and its source; unknown fields are refused."""
    values, source = merge_sources(path, flags=flags, env=env, defaults=defaults, data=data,
                                   data_source=data_source)
    try:
        return ClusterConfig(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None
    except ValueError as exc:  # a model validator (placement) raising outside pydantic's wrapping
        raise ConfigError(str(exc)) from None


def describe_validation_error(exc: ValidationError, source: Mapping[tuple[str, ...], str] | None = None) -> str:
    """``field (from SOURCE): message`` for each error, joined by '; '."""
    parts = []
    for error in exc.errors():
        loc = tuple(str(x) for x in error["loc"])
        field = ".".join(loc) or "config"
        where = (source or {}).get(loc)
        label = {"flag": "command line", "default": "default"}.get(where, where) if where else None
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{field}{f' (from {label})' if label else ''}: {msg}")
    return "; ".join(parts)
