"""Decode and verify steps replayed from CUDA graphs, bucketed by shape (data plane).

A ``GraphRunner`` wraps one whole ``LlamaModel`` and its ``PagedKVCache``. Each step is laid out
densely (``StepBatch`` with ``Padding``) in the smallest bucket that holds it:

    B: sequences          batch_buckets  (default 1 2 4 8 16 32 64)
    Q: tokens / sequence  query_buckets  (default 1 2 3 4 5 6 8: decode, chains, small trees)
    L: KV entries / seq.  kv_buckets     (default powers of two, 128 … max_kv)
    N: logit rows         B (one row per sequence: decode, "last") or B * Q ("all" of a verify)

and replayed from a CUDA graph captured for that bucket the first time it is met (warm-up on a side
stream, then capture; every graph of a runner draws on one memory pool). Anything else — a prompt
(prefill), a tree or batch beyond the buckets, a context beyond ``max_kv``, a CPU model, a model
under tensor parallelism (its all-reduce runs on a process group) — runs the model eagerly, on the
ordinary ragged ``StepBatch`` — with the model's plain element-wise chains even when it runs fused
(compiled) ones, which pay off inside graphs only.

    runner = GraphRunner(model, cache)
    batch = runner.build(steps)        # appends to the cache, like StepBatch.build(cache, steps)
    logits = runner.forward(batch)     # [batch.num_logits, V] float32, like model.forward(batch, cache)
    rows = batch.split_logits(logits)

Invariants:

* the logits of real rows equal the eager forward's on the same step (up to the kernels chosen for
  the bucket's shape: fp32 agrees to rounding, bf16 to its own precision);
* padding never touches a sequence's KV entries: padded rows write to the cache's scratch slot
  (``PagedKVCache.reserve_scratch_slot``, a block no sequence owns) and padded KV entries are
  masked out; everything padding computes is finite, so masked entries cannot leak NaN;
* the step path has no host-device synchronisation: metadata is built on the host and copied
  (pinned, asynchronous) into the bucket's static input buffers; the replay and the copy of the
  logits out of the graph's output buffer are stream-ordered;
* a batch from ``build`` must be passed to ``forward`` before the next ``build`` (the bucket's
  static buffers hold one step at a time); ``forward`` refuses a stale batch;
* graphs of one pool are replayed one at a time on one stream (never concurrently).

``mode``: ``"graph"`` (the default on CUDA without TP), ``"padded"`` (the same dense layout run
eagerly: on CPU it tests the padding logic, on CUDA it isolates graph effects), ``"eager"`` (plain
``model.forward``; the default elsewhere).
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from actors.kv_cache import PagedKVCache
from actors.model import fused
from actors.step_batch import Padding, SeqStep, StepBatch, build_host, packed_nbytes

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_QUERY_BUCKETS = (1, 2, 3, 4, 5, 6, 8)
MODES = ("graph", "padded", "eager")


def power_of_two_buckets(low: int, high: int) -> tuple[int, ...]:
    """low, 2 low, 4 low, … up to the first value >= high."""
    out = [low]
    while out[-1] < high:
        out.append(out[-1] * 2)
    return tuple(out)


@dataclass
class _Entry:
    """One bucket: its static inputs (one packed byte buffer and a StepBatch of views) and graph."""

    padding: Padding
    packed: torch.Tensor
    static: StepBatch
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output buffer [N, V]


class GraphRunner:
    def __init__(
        self,
        model,
        cache: PagedKVCache,
        *,
        batch_buckets: Iterable[int] = DEFAULT_BATCH_BUCKETS,
        query_buckets: Iterable[int] = DEFAULT_QUERY_BUCKETS,
        kv_buckets: Iterable[int] | None = None,
        max_kv: int = 8192,
        mode: str | None = None,
        warmup_iters: int = 2,
        pool=None,
    ) -> None:
        if mode is None:
            mode = "graph" if cache.device.type == "cuda" and not model.tp.enabled else "eager"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mode == "graph" and cache.device.type != "cuda":
            raise ValueError("mode 'graph' needs a CUDA cache and model")
        if mode == "graph" and model.tp.enabled:
            raise ValueError("mode 'graph' does not capture tensor-parallel models (their all-reduce "
                             "runs on a process group); use 'eager'")
        self.model, self.cache, self.mode = model, cache, mode
        self.batch_buckets = tuple(sorted(set(int(b) for b in batch_buckets)))
        self.query_buckets = tuple(sorted(set(int(q) for q in query_buckets)))
        if kv_buckets is None:
            kv_buckets = power_of_two_buckets(128, max_kv)
        self.kv_buckets = tuple(sorted(set(int(k) for k in kv_buckets)))
        if not (self.batch_buckets and self.query_buckets and self.kv_buckets) or min(
            self.batch_buckets + self.query_buckets + self.kv_buckets
        ) < 1:
            raise ValueError("buckets must be non-empty and positive")
        self.warmup_iters = warmup_iters
        self.scratch_slot = cache.reserve_scratch_slot() if mode != "eager" else None
        self.pool = (torch.cuda.graph_pool_handle() if pool is None else pool) if mode == "graph" else None
        self._entries: dict[tuple[int, int, int, int], _Entry] = {}
        self._generation = 0
        self.stats = {"graph_steps": 0, "padded_steps": 0, "eager_steps": 0, "captures": 0, "capture_s": 0.0}

    # ----------------------------------------------------------------- buckets
    def bucket(self, steps: Sequence[SeqStep]) -> Padding | None:
        """The bucket shape a step would use, or None (eager). Reads the cache, changes nothing."""
        if self.mode == "eager" or not steps:
            return None
        cache = self.cache
        max_q = max(len(s.token_ids) for s in steps)
        max_kv = max(cache.seq_len(s.req_id) + cache.num_pending(s.req_id) + len(s.token_ids) for s in steps)
        num_logits = sum(len(s.token_ids) if s.logits == "all" else int(s.logits == "last") for s in steps)
        b = _ceil(self.batch_buckets, len(steps))
        q = _ceil(self.query_buckets, max_q)
        kv = _ceil(self.kv_buckets, max_kv)
        if b is None or q is None or kv is None:
            return None
        n = b if num_logits <= b else b * q
        return Padding(b, q, kv, n, self.scratch_slot)

    def _entry(self, padding: Padding) -> _Entry:
        key = (padding.batch, padding.query, padding.kv, padding.logits)
        entry = self._entries.get(key)
        if entry is None:
            packed = torch.zeros(packed_nbytes(padding.shape), dtype=torch.uint8, device=self.cache.device)
            static = StepBatch.from_packed(packed, padding.shape, [], [], [], padding)
            entry = _Entry(padding, packed, static)
            self._entries[key] = entry
        return entry

    # ----------------------------------------------------------------- the step
    @torch.inference_mode()
    def build(self, steps: Sequence[SeqStep]) -> StepBatch:
        """Append the steps to the cache and build the batch: dense in its bucket when one fits
        (written into that bucket's static buffers under ``mode='graph'``), else ragged."""
        padding = self.bucket(steps)
        self._generation += 1
        if padding is None:
            batch = StepBatch.build(self.cache, steps)
        elif self.mode == "graph":
            entry = self._entry(padding)
            host, _, counts = build_host(self.cache, steps, padding, pin=True)
            entry.packed.copy_(host, non_blocking=True)
            batch = dataclasses.replace(entry.static, req_ids=[s.req_id for s in steps],
                                        query_lens=[len(s.token_ids) for s in steps], logits_counts=counts)
        else:
            batch = StepBatch.build(self.cache, steps, padding=padding)
        batch._runner_generation = (id(self), self._generation)
        return batch

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits [batch.num_logits, V] float32 of the batch's wanted rows, as ``model.forward``."""
        if batch.padding is None:
            self.stats["eager_steps"] += 1
            if self.mode == "graph" and self.model.kernels is not fused.EAGER:
                return self._forward_plain(batch)
            return self.model.forward(batch, self.cache)
        if getattr(batch, "_runner_generation", None) != (id(self), self._generation):
            raise RuntimeError("this padded batch is not the runner's latest build(): build, then forward, "
                               "one step at a time")
        n = batch.num_logits
        if self.mode == "padded":
            self.stats["padded_steps"] += 1
            return self.model.forward(batch, self.cache)[:n]
        entry = self._entry(batch.padding)
        if entry.graph is None:
            self._capture(entry)
        entry.graph.replay()
        self.stats["graph_steps"] += 1
        return entry.logits[:n].clone()

    def _forward_plain(self, batch: StepBatch) -> torch.Tensor:
        """An eager step of a graph runner whose model runs fused (compiled) chains: run it with the
        plain chains. Outside a graph the compiled ones cost more than they save (their guards and
        dynamic shapes: a 1B-shape step took 9.8 ms against 6.7 ms plain on an H100, 2026-12-06),
        and such steps (prefills, catch-ups and batches beyond the buckets) are never replayed."""
        kernels, self.model.kernels = self.model.kernels, fused.EAGER
        try:
            return self.model.forward(batch, self.cache)
        finally:
            self.model.kernels = kernels

    def step(self, steps: Sequence[SeqStep]) -> tuple[StepBatch, torch.Tensor]:
        """``build`` then ``forward``."""
        batch = self.build(steps)
        return batch, self.forward(batch)

    # ----------------------------------------------------------------- capture
    @torch.inference_mode()
    def capture(self, shapes: Iterable[tuple[int, int, int]], *, all_logits: bool = True) -> None:
        """Capture graphs ahead of time for (B, Q, L) bucket shapes (each rounded up to a bucket),
        with N = B (one logit row per sequence) and, when ``all_logits`` and Q > 1, N = B * Q.
        Captures run on all-padding inputs, which write the scratch slot only."""
        if self.mode != "graph":
            return
        for b, q, kv in shapes:
            pb, pq, pk = _ceil(self.batch_buckets, b), _ceil(self.query_buckets, q), _ceil(self.kv_buckets, kv)
            if pb is None or pq is None or pk is None:
                raise ValueError(f"({b}, {q}, {kv}) is beyond the buckets")
            for n in {pb, pb * pq if all_logits else pb}:
                entry = self._entry(Padding(pb, pq, pk, n, self.scratch_slot))
                if entry.graph is None:
                    self._generation += 1  # any outstanding batch is overwritten below
                    host, _, _ = build_host(self.cache, [], entry.padding, pin=True)
                    entry.packed.copy_(host, non_blocking=True)
                    self._capture(entry)

    def capture_decode_buckets(self, max_batch: int, queries: Iterable[int], max_kv: int, *,
                               all_logits: bool = True) -> dict:
        """Capture ahead of time the buckets that steps of up to ``max_batch`` sequences feeding
        ``queries`` tokens each (1 for decode, k + 1 for a chain verify) over up to ``max_kv`` KV
        entries meet: every batch bucket up to ``max_batch``'s, every KV bucket up to ``max_kv``'s.
        ``all_logits``: also the N = B·Q variant of Q > 1 (a verify's). Returns {"shapes",
        "captured", "seconds"}; nothing is captured outside mode 'graph'."""
        top_b = _ceil(self.batch_buckets, max_batch) or self.batch_buckets[-1]
        top_kv = _ceil(self.kv_buckets, max_kv) or self.kv_buckets[-1]
        qs = sorted({q for q in queries if _ceil(self.query_buckets, q) is not None})
        shapes = [(b, q, kv) for b in self.batch_buckets if b <= top_b for q in qs
                  for kv in self.kv_buckets if kv <= top_kv]
        before, seconds = self.stats["captures"], self.stats["capture_s"]
        self.capture(shapes, all_logits=all_logits)
        return {"shapes": len(shapes), "captured": self.stats["captures"] - before,
                "seconds": self.stats["capture_s"] - seconds}

    def _capture(self, entry: _Entry) -> None:
        """Warm up on a side stream, then capture ``model.forward`` on the bucket's static inputs.

        The static buffers hold a real step (or all padding): warm-up runs execute it, writing the
        same K/V to the same slots that the replay then writes again (idempotent)."""
        t0 = time.perf_counter()
        static = entry.static
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                self.model.forward(static, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.model.forward(static, self.cache)
        entry.graph, entry.logits = graph, logits
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0

    @property
    def num_graphs(self) -> int:
        return sum(e.graph is not None for e in self._entries.values())


def _ceil(buckets: tuple[int, ...], value: int) -> int | None:
    i = bisect.bisect_left(buckets, value)
    return buckets[i] if i < len(buckets) else None
