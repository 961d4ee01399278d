"""The measured physical floor of the device a benchmark runs on.

* copy bandwidth: a large device-to-device copy, counting bytes read + written (on CPU: memcpy);
* matmul rate: a large square product in the run's dtype (bf16 on a GPU, fp32 on CPU);
* the decode floor of one step: the bytes it must read (weights once + the KV of its context) over
  that bandwidth. A decode figure is reported as floor time / measured time (1.0 = at the floor).

GPU times come from CUDA events after a warm-up; CPU times from ``perf_counter``. Medians.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int = 2, repeats: int = 10) -> list[float]:
    """Seconds per call of ``fn`` (each timed alone), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, num_bytes: int | None = None) -> dict:
    """Bytes/s of a large copy (read + write)."""
    num_bytes = num_bytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.randn(num_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, repeats=10)
    rates = [2 * num_bytes / t for t in times]
    return {"bytes_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "buffer_bytes": num_bytes,
            "raw_s": times}


def matmul_rate(device: torch.device, dtype: torch.dtype | None = None, n: int | None = None) -> dict:
    """FLOP/s of an n x n x n product on random data."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_fn(lambda: a @ b, device, warmup=3, repeats=10)
    rates = [2 * n**3 / t for t in times]
    return {"flop_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "n": n,
            "dtype": str(dtype).removeprefix("torch."), "raw_s": times}


def measure(device: torch.device) -> dict:
    out = {"copy": copy_bandwidth(device), "matmul": matmul_rate(device)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def decode_floor_s(weight_bytes: int, kv_bytes_per_token: int, context_tokens: float, bandwidth: float,
                   batch: int = 1) -> float:
    """Seconds a decode step of ``batch`` sequences must take: weights once, each sequence's KV."""
    return (weight_bytes + batch * kv_bytes_per_token * context_tokens) / bandwidth
