"""``EngineServer``: the Serve deployment that owns one cluster engine (control plane).

Every front end — the OpenAI-compatible HTTP ingress, the gRPC ingress — holds a Serve handle to
this deployment and nothing else, so they share one engine, one KV cache and one set of metrics.
The replica starts a ``cluster.Cluster`` in its constructor (it joins the Ray cluster the replica
runs in: the workers are Ray actors placed by ``placement/`` as usual).

The request contract (one ``dict`` in, ``dict`` events out, plain Python values only):

    request = {"prompt": str | list[int] | None,        # exactly one of prompt / messages
               "messages": [{"role", "content"}] | None, # chat template of the tokenizer
               "max_tokens": int | None,                 # None: serve.default_max_tokens, capped by the context
               "temperature": float, "top_p": float, "top_k": int, "seed": int | None,
               "stop": list[str] | None, "ignore_eos": bool}

    async for event in handle.options(stream=True).generate.remote(request):
        {"type": "chunk", "token_ids": [...], "text": str}     # per accepted step
        {"type": "final", "token_ids": [...all...], "text": str,
         "finish_reason": "stop" | "length" | "abort",
         "usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
         "stats": {"target_forward_passes", "mean_accepted_length", "accepted_lengths",
                   "acceptance_by_position"},
         "ttft_s": float | None}                                 # exactly once, last

Errors: ``ValueError`` for bad input (the message names the field), ``EngineOverloadedError``
(``retry_after_s``) when the engine's queue is full, ``EngineDeadError`` when the engine is not
running; they are raised before the first event. A request that fails later (a worker failed
under it; the engine restarts its workers) raises ``RequestFailedError``. A temperature below
``SAMPLING_EPS`` is greedy and a smaller top_p is ``SAMPLING_EPS`` (float32 samplers). Through a Serve handle they arrive wrapped in a
``RayTaskError`` that is also an instance of the original class; ``unwrap_error`` gives the
original. A caller that stops iterating or is cancelled (a client disconnect) aborts the request:
its KV is freed on every worker at the engine's next step.

Shared store: the replica opens ``config.stores`` before it starts the cluster (an unreachable Redis
fails the start with a clear message) and announces itself there (``cluster.stores.EngineRegistry``);
``health`` reports the store, ``engines`` lists the live engines of its model.

Invariants: a request yields chunks whose ``token_ids`` concatenate to the final ``token_ids``;
the engine is shut down with the replica; ``check_health`` fails (Serve replaces the replica)
when the engine died by itself, not when it was stopped with ``shutdown_engine``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from actors.spec.types import SamplingParams
from cluster.config import ClusterConfig
from cluster.engine import EngineDeadError
from cluster.scheduler import EngineOverloadedError

log = logging.getLogger("outrider.serve")

SAMPLING_EPS = 1e-5


class RequestFailedError(RuntimeError):
    """A request failed inside the engine after it was admitted (a worker failed mid-request)."""

ROLES = ("system", "developer", "user", "assistant", "tool")


def unwrap_error(exc: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's ``RayTaskError`` wrapper (if any)."""
    seen = 0
    while seen < 4 and hasattr(exc, "cause") and isinstance(exc.cause, BaseException) and exc.cause is not exc:
        exc, seen = exc.cause, seen + 1
    return exc


def default_model_name(config: ClusterConfig) -> str:
    from actors.model.sources import is_demo

    if config.serve.model_name:
        return config.serve.model_name
    if is_demo(config.target):
        from cluster.demo_model import DEMO_MODEL_NAME

        return DEMO_MODEL_NAME
    return Path(config.target).name.removesuffix(".gguf") or "outrider"


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=5, health_check_timeout_s=30)
class EngineServer:
    """One ``Cluster`` behind a Serve handle (see the module docstring for the contract)."""

    def __init__(self, config: dict) -> None:
        from cluster.cluster import Cluster

        from cluster.stores import EngineRegistry, open_store

        self.config = ClusterConfig(**config)
        self.model_name = default_model_name(self.config)
        self.store = open_store(self.config.stores)  # an unreachable store fails the start, clearly
        self.cluster = Cluster.start(self.config)
        self._stopped_on_request = False
        self.registry = EngineRegistry(self.store, self.model_name, self.cluster.health).start()
        _quiet_expected_errors()
        log.info("engine server up: model %s, context %d", self.model_name, self.cluster.max_context)

    # ----------------------------------------------------------------- requests
    def parse_request(self, request: dict) -> tuple[list[int], SamplingParams, tuple[str, ...], bool]:
        """(prompt ids, sampling, stop strings, ignore_eos) of a contract request; ``ValueError`` if bad."""
        from cluster.detokenizer import validate_stop_strings

        if not isinstance(request, dict):
            raise ValueError(f"a request is a dict, got {type(request).__name__}")  # noqa: TRY004
        prompt, messages = request.get("prompt"), request.get("messages")
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt and messages")
        prompt_ids = self._encode_messages(messages) if messages is not None else self._encode_prompt(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")

        def number(name: str, default, kind):
            value = request.get(name)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")  # noqa: TRY004
            return kind(value)

        max_tokens = number("max_tokens", None, int)
        if max_tokens is None:  # the default, capped by the rest of the context (>= 1: a full prompt gets
            # the engine's clear error)
            max_tokens = max(1, min(self.config.serve.default_max_tokens, self.cluster.max_context - len(prompt_ids)))
        seed = request.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        temperature, top_p = number("temperature", 0.0, float), number("top_p", 1.0, float)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        # The samplers work in float32: a temperature or top_p that rounds to 0 there would divide by
        # zero or drop every token. Below SAMPLING_EPS a temperature is greedy (as in vLLM), and a tiny
        # top_p keeps only the most likely token, which top_p = SAMPLING_EPS does too.
        if 0.0 < temperature < SAMPLING_EPS:
            temperature = 0.0
        if 0.0 < top_p < SAMPLING_EPS:
            top_p = SAMPLING_EPS
        params = SamplingParams(  # validates ranges; its messages name the field
            temperature=temperature, top_p=top_p, top_k=number("top_k", 0, int), seed=seed, max_tokens=max_tokens)
        stop = validate_stop_strings(request.get("stop"))
        ignore_eos = request.get("ignore_eos") or False
        if not isinstance(ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {ignore_eos!r}")  # noqa: TRY004
        return prompt_ids, params, stop, ignore_eos

    def _encode_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return self.cluster.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
                raise ValueError("a token prompt must be a list of integers")
            return [int(t) for t in prompt]
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _encode_messages(self, messages: Any) -> list[int]:
        tokenizer = self.cluster.tokenizer
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list, got {type(messages).__name__}")  # noqa: TRY004
        if not messages:
            raise ValueError("messages is empty")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages[{i}] must be an object with a role and content")  # noqa: TRY004
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}].role {m['role']!r}: expected one of {', '.join(ROLES)}")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: text only
                texts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ValueError(f"messages[{i}].content[{j}]: only text parts are supported")
                    texts.append(part["text"])
                content = "".join(texts)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string or a list of text parts")  # noqa: TRY004
            clean.append({"role": m["role"], "content": content})
        if tokenizer is None:
            raise ValueError("messages need a tokenizer, and the target checkpoint has none")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: send a prompt to /v1/completions")
        try:
            encoded = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception(), bad roles, ...
            raise ValueError(f"messages: the chat template refused them: {exc}") from None
        return [int(t) for t in encoded["input_ids"]]

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Chunks as tokens are accepted, then one final event (module docstring)."""
        prompt_ids, params, stop, ignore_eos = self.parse_request(request)
        stream = await self.cluster.generate(prompt_ids, params, stop=list(stop) or None, ignore_eos=ignore_eos)
        finished = False
        try:
            async for chunk in stream:
                yield {"type": "chunk", "token_ids": list(chunk.token_ids), "text": chunk.text}
            out = await stream.result()
            finished = True
        except (ValueError, EngineOverloadedError, EngineDeadError):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a WorkerFailure (not picklable): one type callers read
            raise RequestFailedError(f"the request failed: {type(exc).__name__}: {exc}") from None
        finally:
            if not finished:  # the caller went away (closed, cancelled) or the request failed
                stream.abort()
        yield {"type": "final", "token_ids": list(out.token_ids), "text": out.text or "",
               "finish_reason": out.finish_reason, "usage": out.usage, "stats": out.stats,
               "ttft_s": out.ttft_s}

    # ----------------------------------------------------------------- state
    async def health(self) -> dict:
        if self._stopped_on_request:
            return {"serving": False, "reason": "the engine was shut down"}
        serving, reason = self.cluster.health()
        store = self.store.describe if self.registry.last_error is None else self.registry.last_error
        return {"serving": bool(serving), "reason": reason, "stores": store}

    def engines(self) -> dict:
        """The live engines of this model announced in the shared store (this one included)."""
        return self.registry.engines()

    def check_health(self) -> None:
        """Serve's replica health check: a dead engine gets the replica replaced (and restarted)."""
        if self.cluster.engine.dead is not None and not self._stopped_on_request:
            raise RuntimeError(f"engine dead: {self.cluster.engine.dead}")

    def metrics(self) -> bytes:
        """The engine's Prometheus text, every sample labelled with ``model``."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Labelled(self.cluster.engine.metrics.registry, {"model": self.model_name}))
        return generate_latest(registry)

    def info(self) -> dict:
        tokenizer = self.cluster.tokenizer
        return {"model": self.model_name, "max_context": int(self.cluster.max_context),
                "vocab_size": int(self.cluster.engine.vocab_size), "draft": self.config.draft,
                "num_draft_tokens": self.config.num_draft_tokens if self.config.has_draft else 0,
                "chat_template": bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))}

    async def kv_free_tokens(self) -> dict:
        """Free KV tokens per role once the engine is idle (tests and operators: nothing leaked)."""
        await asyncio.to_thread(self.cluster.wait_idle, 30.0)
        return await asyncio.to_thread(self.cluster.kv_free_tokens)

    def shutdown_engine(self) -> None:
        """Stop the engine and its workers; health then reports NOT_SERVING (no automatic restart)."""
        self._stopped_on_request = True
        self.registry.stop()
        self.cluster.shutdown()

    def __del__(self) -> None:
        registry = getattr(self, "registry", None)
        if registry is not None:
            registry.stop()
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception:  # teardown of a replica: nothing to report to
                log.exception("engine shutdown failed")


class _ExpectedErrors(logging.Filter):
    """Drops Serve's "Request failed." traceback for the errors the contract raises on purpose (bad
    input, a full queue, a stopped engine): callers answer them (400/429/503); under overload a
    traceback per refused request would flood the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage() == "Request failed.":
            return not isinstance(record.exc_info[1], (ValueError, EngineOverloadedError, EngineDeadError))
        return True


def _quiet_expected_errors() -> None:
    from ray.serve._private.constants import SERVE_LOGGER_NAME

    logger = logging.getLogger(SERVE_LOGGER_NAME)
    if not any(isinstance(f, _ExpectedErrors) for f in logger.filters):
        logger.addFilter(_ExpectedErrors())


class _Labelled:
    """A collector that re-exports another registry's metrics with extra labels."""

    def __init__(self, registry, labels: dict[str, str]) -> None:
        self.registry, self.labels = registry, labels

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for family in self.registry.collect():
            metric = Metric(family.name, family.documentation, family.type, family.unit)
            metric.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield metric
