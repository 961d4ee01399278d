"""Admission by KV capacity and the waiting queue (control plane, pure Python).

Every request reserves, on every worker role, the KV it can ever need: its prompt, its
``max_tokens`` (capped by the context) and the draft slack (the draft tokens of one step plus the
overlap's speculative ones), rounded up to whole blocks. A request is admitted only when its
reservation fits next to those of the running requests, so a running request never runs out of
KV and nothing is ever preempted. Requests wait in arrival order (FIFO, no overtaking: a large
request at the head is not starved by small ones behind it).

Invariants:
* ``reserved[role] <= capacity[role]`` at all times, and ``release`` returns exactly what ``admit``
  took; when nothing runs, ``reserved`` is zero;
* the queue is bounded (``max_waiting``): ``add`` raises ``EngineOverloadedError`` beyond it — the
  serving layer turns it into 429/RESOURCE_EXHAUSTED — and a request that could never fit raises
  ``ValueError`` at once instead of waiting forever;
* at most ``max_running`` requests run, and one step prefills at most ``max_prefill_tokens``
  prompt tokens (but always at least one request, however long its prompt).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Scheduler:
    def __init__(self, capacity_tokens: dict[str, int], *, block_size: int, max_context: int,
                 draft_slack_tokens: int, max_running: int, max_waiting: int, max_prefill_tokens: int) -> None:
        self.capacity = dict(capacity_tokens)
        self.reserved = {role: 0 for role in self.capacity}
        self.block_size = block_size
        self.max_context = max_context
        self.slack = draft_slack_tokens
        self.max_running, self.max_waiting, self.max_prefill_tokens = max_running, max_waiting, max_prefill_tokens
        self.waiting: deque[tuple[Hashable, int, int]] = deque()  # (req_id, prompt_len, reservation)
        self.running: dict[Hashable, int] = {}  # req_id -> reservation

    def reservation(self, prompt_len: int, max_tokens: int) -> int:
        tokens = min(prompt_len + max_tokens, self.max_context) + self.slack
        return -(-tokens // self.block_size) * self.block_size

    def add(self, req_id: Hashable, prompt_len: int, max_tokens: int) -> None:
        need = self.reservation(prompt_len, max_tokens)
        for role, cap in self.capacity.items():
            if need > cap:
                raise ValueError(
                    f"request needs {need} KV tokens (prompt {prompt_len} + max_tokens {max_tokens} + draft slack) "
                    f"but the {role} worker holds only {cap}; lower max_tokens or raise kv_budget_tokens")
        if len(self.waiting) >= self.max_waiting:
            raise EngineOverloadedError(
                f"{len(self.waiting)} requests are waiting (max_waiting={self.max_waiting}); retry later")
        self.waiting.append((req_id, prompt_len, need))

    def remove_waiting(self, req_id: Hashable) -> bool:
        for item in self.waiting:
            if item[0] == req_id:
                self.waiting.remove(item)
                return True
        return False

    def admit(self) -> list[Hashable]:
        """Move requests from the queue head to running while they fit; return them."""
        admitted, prefill = [], 0
        while self.waiting and len(self.running) < self.max_running:
            req_id, prompt_len, need = self.waiting[0]
            if admitted and prefill + prompt_len > self.max_prefill_tokens:
                break
            if any(self.reserved[role] + need > cap for role, cap in self.capacity.items()):
                break
            self.waiting.popleft()
            for role in self.reserved:
                self.reserved[role] += need
            self.running[req_id] = need
            admitted.append(req_id)
            prefill += prompt_len
        return admitted

    def release(self, req_id: Hashable) -> None:
        need = self.running.pop(req_id, None)
        if need is not None:
            for role in self.reserved:
                self.reserved[role] -= need

    def usage(self) -> dict[str, float]:
        return {role: self.reserved[role] / cap if cap else 0.0 for role, cap in self.capacity.items()}
