"""The Python API of a running Outrider cluster (control plane).

    cluster = Cluster.start(ClusterConfig(target=path, draft="self:2"))
    stream = await cluster.generate("Hello", SamplingParams(max_tokens=32))
    async for chunk in stream:          # chunks as tokens are accepted
        print(chunk.text, end="")
    output = await stream.result()      # token ids, text, finish reason, usage, speculation stats
    cluster.shutdown()

``Cluster.start`` joins Ray (``config.address``) or starts a local Ray with ``config.num_gpus``
GPUs declared (fake GPUs on a CPU machine), places and starts the workers, and runs the engine
loop on a background thread; ``generate`` works from any asyncio event loop (it validates the
request and queues it, then returns a ``RequestStream``). ``generate_sync`` is the same for plain
threads. Experiments and the serving layer use this API and nothing below it.

Invariants: a stream yields every accepted token exactly once and ends with the request's
``GenerationOutput`` or its error; ``abort`` (or dropping out of the stream early via ``aclose``)
frees the request's KV on every worker; ``shutdown`` ends every open stream with an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from actors.spec.types import SamplingParams
from cluster.config import ClusterConfig
from cluster.engine import Engine, EngineDeadError, GenerationOutput
from cluster.workers import WorkerSet

log = logging.getLogger("outrider.cluster")


@dataclass
class GenerationChunk:
    """Tokens accepted in one step of one request, and the text they completed."""

    token_ids: list[int]
    text: str


class RequestStream:
    """Async iterator over the chunks of one request; ``result()`` gives the final output."""

    def __init__(self, cluster: Cluster, loop: asyncio.AbstractEventLoop) -> None:
        self._cluster, self._loop = cluster, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._final: GenerationOutput | None = None
        self._error: BaseException | None = None
        self._done = asyncio.Event()
        self.request_id: int | None = None

    def _sink(self, event: tuple) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            if self.request_id is not None:
                self._cluster.abort(self.request_id)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self

    async def __anext__(self) -> GenerationChunk:
        while True:
            if self._done.is_set():
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            event = await self._queue.get()
            if event[0] == "tokens":
                return GenerationChunk(list(event[1]), event[2])
            if event[0] == "finished":
                self._final = event[1]
            else:
                self._error = event[1]
            self._done.set()

    async def result(self) -> GenerationOutput:
        """Drain the stream and return the final output (raises the request's error)."""
        async for _ in self:
            pass
        return self._final

    def abort(self) -> None:
        if self.request_id is not None and not self._done.is_set():
            self._cluster.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class Cluster:
    def __init__(self, config: ClusterConfig, workers: WorkerSet, engine: Engine, tokenizer, *,
                 owns_ray: bool) -> None:
        self.config, self.workers, self.engine, self.tokenizer = config, workers, engine, tokenizer
        self._owns_ray = owns_ray

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def start(cls, config: ClusterConfig | dict | None = None, **fields) -> Cluster:
        """Start (or join) Ray, place and start the workers, start the engine loop."""
        import ray

        from cluster.metrics import EngineMetrics
        from cluster.speculation import build_policy

        if config is None or isinstance(config, dict):
            config = ClusterConfig(**{**(config or {}), **fields})
        elif fields:
            config = config.model_copy(update=fields)
            config = ClusterConfig(**config.model_dump())
        owns_ray = False
        if not ray.is_initialized() and not config.address:
            # a local cluster's resources are known before Ray starts: refuse an impossible plan now
            from placement.planner import plan
            from placement.spec import ClusterResources

            gpus = config.num_gpus
            if gpus is None:  # Ray will detect the machine's GPUs
                import torch

                gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            plan(config.placement_request(), ClusterResources.local(gpus, os.cpu_count() or 1))
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kwargs = {"include_dashboard": False, "log_to_driver": True}
            if config.address:
                ray.init(address=config.address, **kwargs)
            else:
                ray.init(address="local", num_gpus=config.num_gpus, **kwargs)
                owns_ray = True
        from actors.model.sources import resolve_model_path

        local_target = resolve_model_path(config.target, progress=True)  # "demo" -> this node's cached copy
        tokenizer = _load_tokenizer(local_target)
        workers = WorkerSet(config)
        try:
            workers.start()
            engine = Engine(config, workers, tokenizer=tokenizer, policy=build_policy(config),
                            metrics=EngineMetrics(max_draft_tokens=max(config.num_draft_tokens, 1)))
        except BaseException:
            workers.shutdown()
            if owns_ray:
                ray.shutdown()
            raise
        engine.start()
        cluster = cls(config, workers, engine, tokenizer, owns_ray=owns_ray)
        cluster.local_target = local_target
        return cluster

    def shutdown(self) -> None:
        import ray

        self.engine.shutdown()
        self.workers.shutdown()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- requests
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer, and the target checkpoint has none; "
                                 "pass token ids")
            return [int(t) for t in self.tokenizer.encode(prompt)]
        return [int(t) for t in prompt]

    def default_params(self, sampling: SamplingParams | None) -> SamplingParams:
        """The request's parameters, with the model's end-of-sequence tokens added as stop tokens."""
        import dataclasses

        sampling = sampling or SamplingParams()
        eos = set(sampling.stop_token_ids) | set(self.eos_token_ids)
        return dataclasses.replace(sampling, stop_token_ids=tuple(sorted(eos)))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: the model config's (all of them, e.g. Llama 3's <|eot_id|>) and the tokenizer's."""
        if not hasattr(self, "_eos"):
            from actors.model.loader import load_config

            ids = set(load_config(getattr(self, "local_target", self.config.target)).eos_token_ids)
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                ids.add(int(self.tokenizer.eos_token_id))
            self._eos = tuple(sorted(ids))
        return self._eos

    async def generate(self, prompt: str | list[int], sampling: SamplingParams | None = None, *,
                       stop: str | list[str] | None = None, ignore_eos: bool = False) -> RequestStream:
        """Queue one request; returns its stream. Raises ``ValueError`` for bad input,
        ``EngineOverloadedError`` when the queue is full, ``EngineDeadError`` when stopped."""
        stream = RequestStream(self, asyncio.get_running_loop())
        params = sampling or SamplingParams() if ignore_eos else self.default_params(sampling)
        stream.request_id = self.engine.submit(self.encode(prompt), params, stream._sink, stop=_stops(stop))
        return stream

    def generate_sync(self, prompt: str | list[int], sampling: SamplingParams | None = None, *,
                      stop: str | list[str] | None = None, ignore_eos: bool = False,
                      timeout_s: float | None = None) -> Iterator[GenerationChunk | GenerationOutput]:
        """Blocking variant: yields chunks, then the final ``GenerationOutput`` last."""
        events: queue.Queue = queue.Queue()
        params = sampling or SamplingParams() if ignore_eos else self.default_params(sampling)
        req_id = self.engine.submit(self.encode(prompt), params, events.put, stop=_stops(stop))
        try:
            while True:
                event = events.get(timeout=timeout_s)
                if event[0] == "tokens":
                    yield GenerationChunk(list(event[1]), event[2])
                elif event[0] == "finished":
                    yield event[1]
                    return
                else:
                    raise event[1]
        finally:
            self.engine.abort(req_id)  # no-op when finished; frees KV when the caller stopped early

    def abort(self, request_id: int) -> None:
        self.engine.abort(request_id)

    # ----------------------------------------------------------------- introspection
    def kv_free_tokens(self) -> dict[str, int]:
        """Free KV tokens per role as the workers report them (between steps)."""
        calls = [("target", self.workers.targets[0].kv_free_tokens.remote())]
        if self.workers.draft is not None and self.engine.draft_up:
            calls.append(("draft", self.workers.draft.kv_free_tokens.remote()))
        return dict(zip((role for role, _ in calls), self.workers.call(calls, "kv_free_tokens")))

    def retrack_oracle(self, continuations: list[dict]) -> int:
        """Benchmarks: give an ``oracle:`` draft the target's latest outputs to emulate acceptance
        against (``[{"prompt": ids, "output": ids}, ...]``). Returns how many prompts the draft
        re-recorded: 0 without a draft, with the draft down, or with a draft that is no oracle."""
        if self.workers.draft is None or not self.engine.draft_up:
            return 0
        [count] = self.workers.call([("draft", self.workers.draft.retrack_oracle.remote(continuations))],
                                    "retrack_oracle")
        return int(count)

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Block until no request runs or waits and freed KV has been returned to the workers."""
        return self.engine.idle.wait(timeout_s)

    def health(self) -> tuple[bool, str]:
        """(serving, why): see ``Engine.health``."""
        return self.engine.health()

    def metrics_text(self) -> bytes:
        return self.engine.metrics.render()

    def metrics_snapshot(self) -> dict:
        return self.engine.metrics.snapshot()

    @property
    def max_context(self) -> int:
        return self.engine.max_context


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    from cluster.detokenizer import validate_stop_strings

    return tuple(validate_stop_strings(stop) or ())


def _load_tokenizer(path: str):
    from actors.model.tokenizer import TokenizerLoadError, load_tokenizer

    try:
        return load_tokenizer(path)
    except TokenizerLoadError:
        return None


__all__ = ["Cluster", "ClusterConfig", "EngineDeadError", "GenerationChunk", "GenerationOutput", "RequestStream"]
