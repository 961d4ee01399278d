"""The cluster's shared stores: small JSON records in Redis or in process memory (control plane).

``open_store(StoreOptions)`` gives a ``Store``: ``memory`` keeps records in this process (one engine,
nothing shared, nothing to run); ``redis`` keeps them in a Redis server that every engine replica
and, later, the router reach (the Helm chart runs one per release, or points at an external one).
The first user is ``EngineRegistry``: each engine server announces itself (model, node, health) under
a key that expires unless refreshed, so whoever reads the store sees the live engines only.

Invariants:
* every key the cluster writes starts with ``StoreOptions.key_prefix`` and ``:``;
* values are JSON objects; a record written with ``ttl_s`` disappears after it unless written again;
* ``open_store`` connects and pings within ``connect_timeout_s``: an unreachable or misconfigured
  Redis (wrong password, wrong host) raises ``StoreUnavailableError`` at start, naming the URL with
  its password masked — never later on a request path;
* no secret is logged: URLs are shown through ``masked_url``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from urllib.parse import urlsplit, urlunsplit

from cluster.config import StoreOptions

log = logging.getLogger("outrider.stores")


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached (or refused us); the message names it, password masked."""


def masked_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Store(ABC):
    """A namespace of JSON records. Keys are given without the prefix; ``scan`` returns them so too."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    @property
    @abstractmethod
    def describe(self) -> str:
        """What this store is, for logs and health (no secrets)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise ``StoreUnavailableError`` unless the store answers."""

    @abstractmethod
    def put(self, key: str, value: dict, ttl_s: float | None = None) -> None: ...

    @abstractmethod
    def get(self, key: str) -> dict | None: ...

    @abstractmethod
    def scan(self, prefix: str = "") -> dict[str, dict]:
        """Every live record whose key starts with ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        pass


class MemoryStore(Store):
    """Records in this process, with expiry checked on read."""

    def __init__(self, prefix: str = "outrider") -> None:
        super().__init__(prefix)
        self._data: dict[str, tuple[str, float | None]] = {}
        self._lock = threading.Lock()

    @property
    def describe(self) -> str:
        return "memory"

    def ping(self) -> None:
        return None

    def put(self, key: str, value: dict, ttl_s: float | None = None) -> None:
        expires = None if ttl_s is None else time.monotonic() + ttl_s
        with self._lock:
            self._data[self._key(key)] = (json.dumps(value), expires)

    def _live(self, full: str) -> str | None:
        raw, expires = self._data.get(full, (None, None))
        if raw is not None and expires is not None and time.monotonic() >= expires:
            del self._data[full]
            return None
        return raw

    def get(self, key: str) -> dict | None:
        with self._lock:
            raw = self._live(self._key(key))
        return None if raw is None else json.loads(raw)

    def scan(self, prefix: str = "") -> dict[str, dict]:
        start = self._key(prefix)
        with self._lock:
            found = {k: self._live(k) for k in list(self._data) if k.startswith(start)}
        return {k.removeprefix(self.prefix + ":"): json.loads(v) for k, v in found.items() if v is not None}

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(self._key(key), None)


class RedisStore(Store):
    """Records in Redis: ``SET key json PX ttl``, read back with ``GET`` and ``SCAN MATCH``."""

    def __init__(self, url: str, password: str | None = None, *, prefix: str = "outrider",
                 timeout_s: float = 5.0) -> None:
        import redis

        super().__init__(prefix)
        self.url = url
        kwargs = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, "decode_responses": True}
        if password is not None:
            kwargs["password"] = password
        self._redis = redis.Redis.from_url(url, **kwargs)

    @property
    def describe(self) -> str:
        return f"redis at {masked_url(self.url)}"

    def _call(self, what: str, fn, *args, **kwargs):
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"{self.describe}: {what} failed: {type(exc).__name__}: {exc}") from None

    def ping(self) -> None:
        self._call("PING", self._redis.ping)

    def put(self, key: str, value: dict, ttl_s: float | None = None) -> None:
        px = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._call("SET", self._redis.set, self._key(key), json.dumps(value), px=px)

    def get(self, key: str) -> dict | None:
        raw = self._call("GET", self._redis.get, self._key(key))
        return None if raw is None else json.loads(raw)

    def scan(self, prefix: str = "") -> dict[str, dict]:
        keys = list(self._call("SCAN", self._redis.scan_iter, match=_glob_escape(self._key(prefix)) + "*",
                               count=500))
        if not keys:
            return {}
        values = self._call("MGET", self._redis.mget, keys)
        return {k.removeprefix(self.prefix + ":"): json.loads(v) for k, v in zip(keys, values) if v is not None}

    def delete(self, key: str) -> None:
        self._call("DEL", self._redis.delete, self._key(key))

    def close(self) -> None:
        self._redis.close()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def open_store(options: StoreOptions) -> Store:
    """The store ``options`` describe, connected and pinged (``StoreUnavailableError`` if it cannot be)."""
    if options.backend == "memory":
        return MemoryStore(options.key_prefix)
    store = RedisStore(options.redis_url, options.password(), prefix=options.key_prefix,
                       timeout_s=options.connect_timeout_s)
    try:
        store.ping()
    except StoreUnavailableError as exc:
        store.close()
        raise StoreUnavailableError(
            f"stores: cannot use {exc} (check stores.redis_url and the password in "
            "OUTRIDER_STORES_REDIS_PASSWORD)") from None
    log.info("stores: %s", store.describe)
    return store


class EngineRegistry:
    """Announces one engine server in the store: ``engines:<model>:<id>`` -> who, where, health.

    ``start`` writes the record and refreshes it every ``period_s`` on a daemon thread (the record
    expires after ``3 * period_s`` without a refresh: a dead engine drops out by itself); ``stop``
    deletes it. A store that fails mid-way is logged and retried on the next beat — the engine keeps
    serving; ``last_error`` says what failed (health reports it)."""

    def __init__(self, store: Store, model: str, health, *, period_s: float = 5.0) -> None:
        self.store, self.model, self._health, self.period_s = store, model, health, period_s
        self.engine_id = uuid.uuid4().hex[:12]
        self.key = f"engines:{model}:{self.engine_id}"
        self.started_at = time.time()
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict:
        serving, reason = self._health()
        return {"model": self.model, "engine_id": self.engine_id, "host": socket.gethostname(),
                "pid": os.getpid(), "started_at": self.started_at, "updated_at": time.time(),
                "serving": bool(serving), "reason": reason}

    def beat(self) -> None:
        try:
            self.store.put(self.key, self.record(), ttl_s=3 * self.period_s)
        except StoreUnavailableError as exc:
            if self.last_error is None:
                log.warning("engine registry: %s (the engine keeps serving; retrying)", exc)
            self.last_error = str(exc)
        else:
            if self.last_error is not None:
                log.warning("engine registry: the store is back")
            self.last_error = None

    def start(self) -> EngineRegistry:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="outrider-engine-registry", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.period_s + 1)
        try:
            self.store.delete(self.key)
        except StoreUnavailableError as exc:
            log.warning("engine registry: could not remove %s: %s", self.key, exc)

    def engines(self) -> dict[str, dict]:
        """Every live engine of this model in the store (this one included)."""
        return self.store.scan(f"engines:{self.model}:")


__all__ = ["EngineRegistry", "MemoryStore", "RedisStore", "Store", "StoreUnavailableError", "masked_url",
           "open_store"]
