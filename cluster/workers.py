"""The worker actors of one replica: start, connect, call with deadlines, recover (control plane).

``WorkerSet`` places the target ranks and the draft through ``placement/`` (one placement group
per replica, each actor pinned to its bundle), forms the tensor-parallel group of the target
ranks and the draft link (target rank 0 <-> draft) as ``torch.distributed`` groups, and wraps
every actor call in a deadline. A failure is classified once, here, as a ``WorkerFailure`` with
the role that failed — the engine decides what to do with it.

Invariants:
* every wait on a worker has a deadline; a worker that does not answer in time counts as failed;
* the actors are created with Ray restarts (``max_worker_restarts``); ``restart(role)`` kills a
  role's actors so Ray starts them afresh, and ``wait_ready(role)`` polls them without blocking
  longer than asked. A group (TP, or the draft link) is always re-formed on a fresh port after
  any of its members restarted — ``torch.distributed`` cannot re-admit a rank;
* the draft link uses gloo whenever the two ends share a device or run on CPU, NCCL otherwise;
* joining a cluster whose nodes come and go (``address`` set, or role pools — a Kubernetes
  deployment whose worker pods may join after the engine starts), a placement the current nodes
  cannot hold is retried until ``start_timeout_s``, with one log line saying what is awaited; on a
  local cluster it fails at once;
* the engine calls the workers over step channels (``actors/step_channel.py``) when
  ``step_transport`` is ``socket``; a channel that cannot connect (a network policy, say) is
  logged and that worker is called through Ray instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from cluster.config import ClusterConfig
from placement.groups import PlacedCluster, create_placement_groups
from placement.planner import plan
from placement.spec import DRAFT, TARGET, ClusterResources, PlacementError

log = logging.getLogger("outrider.workers")

PLACEMENT_POLL_S = 2.0
CHANNEL_CONNECT_S = 10.0  # a step channel that does not connect within this falls back to Ray calls


def plan_when_placeable(config: ClusterConfig, *, poll_s: float = PLACEMENT_POLL_S):
    """The placement plan of ``config`` on the Ray cluster's nodes; waits for nodes to join (up to
    ``start_timeout_s``) when the cluster may still grow (module docstring), else fails at once."""
    may_grow = bool(config.address) or config.node_pools == "per_role"
    deadline = time.monotonic() + config.start_timeout_s
    logged = False
    while True:
        try:
            return plan(config.placement_request(), ClusterResources.from_ray())
        except PlacementError as exc:
            left = deadline - time.monotonic()
            if not may_grow or left <= 0:
                if may_grow:
                    raise PlacementError(f"{exc} (waited {config.start_timeout_s:g} s for nodes to join)") from None
                raise
            if not logged:
                log.warning("waiting up to %.0f s for nodes that can hold the workers: %s",
                            config.start_timeout_s, exc)
                logged = True
            time.sleep(min(poll_s, left))


class WorkerFailure(RuntimeError):
    """A worker of ``role`` died, raised, or did not answer within the deadline."""

    def __init__(self, role: str, kind: str, message: str) -> None:
        super().__init__(f"the {role} worker {kind}: {message}")
        self.role, self.kind = role, kind


@dataclass
class WorkerInfo:
    vocab_size: int
    max_context: int
    target_kv_tokens: int
    draft_kv_tokens: int | None
    target_device: str
    draft_device: str | None


def verify_queries(config: ClusterConfig) -> list[int]:
    """Tokens per sequence the target's steps may feed: 1 (decode) and k + 1 (a chain verify);
    with adaptive k every 1 .. k + 1, since the policy may choose any k (an explore probe of
    k = 1 met an uncaptured Q = 2 bucket inside a timed repetition on an H100, 2026-12-07)."""
    k = config.num_draft_tokens if config.has_draft else 0
    return list(range(1, k + 2)) if config.adaptive else sorted({1, k + 1})


class WorkerSet:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.placed: PlacedCluster | None = None
        self.targets: list = []
        self.draft = None
        self.info: WorkerInfo | None = None
        self.link_backend: str | None = None  # the draft link's: nccl | gloo (None without a draft)
        self.link_rtt_s: float | None = None  # one proposal-sized message there and back, timed at connect
        self.channels: list = []  # StepChannel per target rank (step_transport socket), else empty
        self.draft_channel = None  # the draft's StepChannel (step_transport socket), else None
        self.captured: dict = {}  # capture_at_start: {role: {"shapes", "captured", "seconds"}}

    # ----------------------------------------------------------------- start
    def start(self) -> WorkerInfo:
        from actors.draft_worker import DraftWorker
        from actors.target_worker import TargetWorker

        cfg = self.config
        self.plan = plan_when_placeable(cfg)
        self.placed = create_placement_groups(self.plan, timeout_s=cfg.start_timeout_s)
        common = {"dtype": cfg.torch_dtype(), "kv_budget_tokens": cfg.kv_budget_tokens, "block_size": cfg.block_size,
                  "fused_kernels": cfg.fused_kernels}
        restarts = {"max_restarts": cfg.max_worker_restarts, "max_task_retries": 0}
        self.targets = [
            ray.remote(TargetWorker).options(**self.placed.actor_options(0, TARGET, rank), **restarts).remote(
                cfg.target, tp_rank=rank, tp_size=cfg.target_gpus, **common)
            for rank in range(cfg.target_gpus)
        ]
        if cfg.has_draft:
            oracle = None
            if cfg.oracle_continuations:
                from actors.spec.oracle import load_continuations

                oracle = [{"prompt": p, "output": o} for p, o in load_continuations(cfg.oracle_continuations)]
            self.draft = ray.remote(DraftWorker).options(**self.placed.actor_options(0, DRAFT, 0), **restarts).remote(
                cfg.draft, cfg.target, num_draft_tokens=cfg.num_draft_tokens, overlap=cfg.overlap,
                pre_verify=cfg.pre_verify, oracle_continuations=oracle, **common)
        self.form_target_group(cfg.start_timeout_s)
        self.open_channels(cfg.start_timeout_s)
        leader = self.call([(TARGET, self.targets[0].info.remote())], "start", cfg.start_timeout_s)[0]
        draft_info = None
        if self.draft is not None:
            draft_info = self.call([(DRAFT, self.draft.info.remote())], "start", cfg.start_timeout_s)[0]
            self.connect_draft(cfg.start_timeout_s)
        self.info = WorkerInfo(
            vocab_size=leader["vocab_size"], max_context=leader["max_context"],
            target_kv_tokens=leader["kv_capacity_tokens"],
            draft_kv_tokens=None if draft_info is None else draft_info["kv_capacity_tokens"],
            target_device=leader["device"], draft_device=None if draft_info is None else draft_info["device"])
        if cfg.capture_at_start:
            self.capture_buckets(cfg.start_timeout_s)
        return self.info

    def capture_buckets(self, timeout_s: float) -> dict:
        """Have every worker capture its decode and verify buckets now (``capture_at_start``):
        target Q = ``verify_queries(config)``, draft Q = 1 and 2, batch buckets up to
        ``max_running``, KV buckets up to the context (or the KV cache). Returns {role: {"shapes",
        "captured", "seconds"}}."""
        cfg, info = self.config, self.info
        max_kv = min(info.max_context, info.target_kv_tokens)
        queries = verify_queries(cfg) if self.draft is not None else [1]
        calls = [(TARGET, t.capture_buckets.remote(cfg.max_running, queries, max_kv)) for t in self.targets]
        if self.draft is not None:
            draft_kv = min(info.max_context, info.draft_kv_tokens or max_kv)
            calls.append((DRAFT, self.draft.capture_buckets.remote(cfg.max_running, [1, 2], draft_kv)))
        results = self.call(calls, "graph capture", timeout_s)
        self.captured = {TARGET: results[0]}
        if self.draft is not None:
            self.captured[DRAFT] = results[-1]
        for role, r in self.captured.items():
            if r["captured"]:
                log.info("%s: captured %d CUDA graphs at start in %.1f s", role, r["captured"], r["seconds"])
        return self.captured

    def form_target_group(self, timeout_s: float) -> None:
        """Tensor-parallel group of the target ranks (each loads its shard); nothing for tp=1."""
        if len(self.targets) == 1:
            return
        addr, port = self.call([(TARGET, self.targets[0].transport_address.remote())], "tp setup", timeout_s)[0]
        self.call([(TARGET, t.init_tp.remote(addr, port, None, self.config.step_timeout_s)) for t in self.targets],
                  "tp setup", timeout_s)

    def open_channels(self, timeout_s: float) -> None:
        """(Re)connect the step channel of every target rank (``step_transport: socket``); a channel
        left from before a fault is closed first."""
        from actors.step_channel import StepChannel, close_all

        close_all(self.channels)
        self.channels = []
        if self.config.step_transport != "socket":
            return
        addresses = self.call([(TARGET, t.open_step_channel.remote()) for t in self.targets], "step channel",
                              timeout_s)
        channels = []
        try:
            for host, port, token in addresses:
                channels.append(StepChannel(host, port, token, timeout_s=min(timeout_s, CHANNEL_CONNECT_S)))
        except OSError as exc:  # e.g. a network policy between nodes: slower, but nothing is lost
            close_all(channels)
            log.warning("step channel to a target rank at %s:%d unreachable (%s): the engine calls the "
                        "targets through Ray instead", host, port, exc)
            return
        self.channels = channels

    def connect_draft(self, timeout_s: float) -> str:
        """(Re)form the draft link on a fresh port; returns the backend."""
        from actors.transport import same_physical_gpu

        addr, port = self.call([(TARGET, self.targets[0].transport_address.remote())], "draft link", timeout_s)[0]
        target_info = self.call([(TARGET, self.targets[0].info.remote())], "draft link", timeout_s)[0]
        draft_info = self.call([(DRAFT, self.draft.info.remote())], "draft link", timeout_s)[0]
        # NCCL between two distinct GPUs; gloo on CPU and when the draft shares target rank 0's GPU
        on_gpus = "cuda" in target_info["device"] and "cuda" in draft_info["device"]
        distinct = on_gpus and not same_physical_gpu(target_info, draft_info)
        backend = None if distinct and self.config.draft_link == "auto" else "gloo"
        link_timeout = self.config.step_timeout_s / 2
        (used, rtt), _ = self.call([
            (TARGET, self.targets[0].connect_draft.remote(addr, port, backend, link_timeout)),
            (DRAFT, self.draft.init_transport.remote(addr, port, backend, link_timeout)),
        ], "draft link", timeout_s)
        self.link_backend, self.link_rtt_s = used, rtt
        self.open_draft_channel(timeout_s)
        return used

    def open_draft_channel(self, timeout_s: float) -> None:
        """(Re)connect the draft's step channel (``step_transport: socket``)."""
        from actors.step_channel import StepChannel

        self.close_draft_channel()
        if self.config.step_transport != "socket" or self.draft is None:
            return
        host, port, token = self.call([(DRAFT, self.draft.open_step_channel.remote())], "draft step channel",
                                      timeout_s)[0]
        try:
            self.draft_channel = StepChannel(host, port, token, timeout_s=min(timeout_s, CHANNEL_CONNECT_S))
        except OSError as exc:
            log.warning("step channel to the draft at %s:%d unreachable (%s): the engine calls it through "
                        "Ray instead", host, port, exc)

    def close_draft_channel(self) -> None:
        if self.draft_channel is not None:
            self.draft_channel.close()
            self.draft_channel = None

    # ----------------------------------------------------------------- calls
    def call(self, calls: list[tuple[str, ray.ObjectRef]], phase: str, timeout_s: float | None = None) -> list:
        """Wait for every call with one deadline; a failure or silence raises ``WorkerFailure``."""
        timeout_s = self.config.step_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        role_of = {ref: role for role, ref in calls}
        pending = [ref for _, ref in calls]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                silent = sorted({role_of[ref] for ref in pending})
                raise WorkerFailure(silent[0], "did not answer",
                                    f"{phase}: no reply within {timeout_s:.0f} s")
            check(ready[0], role_of[ready[0]], phase)
        return ray.get([ref for _, ref in calls])

    def restart(self, role: str) -> None:
        """Kill the role's actors so Ray restarts them (their state is gone; groups must be re-formed)."""
        for actor in (self.targets if role == TARGET else [self.draft]):
            if actor is not None:
                ray.kill(actor, no_restart=False)

    def poll_ready(self, role: str, timeout_s: float) -> bool:
        """True when every actor of the role answers ``info`` within ``timeout_s``."""
        actors = self.targets if role == TARGET else [self.draft]
        try:
            self.call([(role, a.info.remote()) for a in actors], "restart", timeout_s)
            return True
        except WorkerFailure:
            return False

    def shutdown(self) -> None:
        from actors.step_channel import close_all

        close_all(self.channels)
        self.channels = []
        self.close_draft_channel()
        for actor in [self.draft, *self.targets]:
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.draft, self.targets = None, []
        if self.placed is not None:
            self.placed.remove()
            self.placed = None


def check(ref: ray.ObjectRef, role: str, phase: str) -> None:
    """Raise ``WorkerFailure`` if the finished call ``ref`` failed."""
    try:
        ray.get(ref, timeout=0)
    except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
        raise WorkerFailure(role, "died", f"{phase}: {type(exc).__name__}: {_gist(exc)}") from exc
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise WorkerFailure(role, "failed", f"{phase}: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}") from exc
    except ray.exceptions.RayError as exc:
        raise WorkerFailure(role, "died", f"{phase}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


def _gist(exc: BaseException) -> str:
    """First line of a Ray error and, when its text carries a traceback, the error it ends with."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return ""
    gist = lines[0][:300]
    cause = next((line for line in reversed(lines) if "Error" in line.split(":")[0]), None)
    if cause and cause != lines[0]:
        gist += f" ... {cause[:300]}"
    return gist
