"""Placement inputs: what the user asks for and what the cluster has.

Plane: control. Pure Python; nothing here imports Ray at module level (`ClusterResources.from_ray`
imports it when called), so every value can be built and checked in unit tests.

Invariants:
* every value is a frozen dataclass, validated when it is built: a bad field raises
  `PlacementError` (a `ValueError`) that names the field and the value, before any planning;
* GPU counts are whole numbers, except the share a colocated role takes of its host's GPU, which
  lies strictly inside (0, 1);
* a role never has zero GPUs: a draft without a GPU of its own must be colocated;
* user values are never rewritten: derived quantities (roles, per-draft shares) are computed by
  methods, not stored back.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

TARGET = "target"
DRAFT = "draft"

# With role pools (``PlacementRequest.role_pools``), a worker of role R also asks for one unit per
# GPU of the Ray custom resource ``outrider_R``, which only the nodes of R's pool advertise (the Helm
# chart's worker group of that role sets it in ``rayStartParams``).
ROLE_RESOURCE_PREFIX = "outrider_"


def role_resource(role: str) -> str:
    """The Ray custom resource that marks the nodes of `role`'s pool: ``outrider_<role>``."""
    return ROLE_RESOURCE_PREFIX + role

# Ray accounts fractional resources in units of 1/10000; shares are rounded down to that grain so
# that a GPU split between a target and its drafts never sums to more than one.
RESOURCE_GRAIN = 10_000


class PlacementError(ValueError):
    """A placement request that cannot be planned or placed; the message says why."""


def floor_share(x: float) -> float:
    """Round a fractional resource amount down to Ray's 1/10000 grain."""
    return math.floor(x * RESOURCE_GRAIN + 1e-9) / RESOURCE_GRAIN


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_whole(x: object) -> bool:
    return _is_number(x) and float(x).is_integer()


def fmt_amount(x: float) -> str:
    """1.0 -> '1', 0.5 -> '0.5': counts print as the user wrote them."""
    return str(int(x)) if _is_whole(x) else str(x)


def _require_whole(field: str, value: object, minimum: int, why: str = "") -> None:
    if not _is_whole(value):
        raise PlacementError(f"{field}={value!r}: must be a whole number{why}")
    if value < minimum:
        raise PlacementError(f"{field}={fmt_amount(value)}: must be >= {minimum}{why}")


def _require_non_negative(field: str, value: object) -> None:
    if not _is_number(value) or value < 0:
        raise PlacementError(f"{field}={value!r}: must be a number >= 0")


@dataclass(frozen=True)
class RoleSpec:
    """One role of a replica: `num_workers` actors, each holding `gpus_per_worker` GPUs.

    A role with `colocated_with` set holds no bundle of its own: its workers share the bundle (and
    so the device) of rank 0 of that role, each taking `gpus_per_worker` (a fraction in (0, 1)).
    """

    name: str
    num_workers: int
    gpus_per_worker: float
    cpus_per_worker: float = 1.0
    colocated_with: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlacementError(f"RoleSpec.name={self.name!r}: must be a non-empty string")
        _require_whole(f"{self.name}.num_workers", self.num_workers, 1)
        g = self.gpus_per_worker
        field = f"{self.name}.gpus_per_worker"
        if not _is_number(g) or g <= 0:
            raise PlacementError(f"{field}={g!r}: every role needs a GPU (a share > 0)")
        if self.colocated_with is None:
            if not _is_whole(g):
                raise PlacementError(
                    f"{field}={g}: a role on its own GPUs needs a whole number of them; "
                    "fractional GPUs only for a role colocated with another")
        elif not 0 < g < 1:
            raise PlacementError(
                f"{field}={g}: a colocated role takes a fraction of its host's GPU, in (0, 1)")
        if self.colocated_with == self.name:
            raise PlacementError(
                f"{self.name}.colocated_with={self.name!r}: a role cannot host itself")
        _require_non_negative(f"{self.name}.cpus_per_worker", self.cpus_per_worker)


@dataclass(frozen=True)
class PlacementRequest:
    """What to place, per replica: a target, tensor-parallel over `target_tp` GPUs, and its drafts.

    CLI mapping: `--target-gpus N` -> target_tp, `--draft-gpus N` -> draft_gpus (GPUs per draft
    worker), `--colocate` -> colocate (each draft on the GPU of target rank 0, taking
    `colocated_draft_fraction` of it, split evenly between the replica's drafts).
    `num_drafts_per_replica=0` means no draft model (target-only or model-free proposers).
    """

    target_tp: int
    num_target_replicas: int = 1
    draft_gpus: int = 1
    num_drafts_per_replica: int = 1
    colocate: bool = False
    colocated_draft_fraction: float = 0.5
    target_cpus_per_worker: float = 1.0
    draft_cpus_per_worker: float = 1.0
    role_pools: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.role_pools, bool):
            raise PlacementError(f"role_pools={self.role_pools!r}: must be True or False")
        _require_whole("target_tp", self.target_tp, 1, " (the target needs at least one GPU)")
        _require_whole("num_target_replicas", self.num_target_replicas, 1)
        _require_whole("num_drafts_per_replica", self.num_drafts_per_replica, 0)
        if not isinstance(self.colocate, bool):
            raise PlacementError(f"colocate={self.colocate!r}: must be True or False")
        f = self.colocated_draft_fraction
        if not _is_number(f) or not 0 < f < 1:
            raise PlacementError(
                f"colocated_draft_fraction={f!r}: must lie in (0, 1), the share of the target's "
                "GPU a colocated draft takes")
        _require_non_negative("target_cpus_per_worker", self.target_cpus_per_worker)
        _require_non_negative("draft_cpus_per_worker", self.draft_cpus_per_worker)
        self._check_draft()

    def _check_draft(self) -> None:
        g, n = self.draft_gpus, self.num_drafts_per_replica
        if not _is_number(g) or g < 0:
            raise PlacementError(f"draft_gpus={g!r}: must be a number >= 0")
        if self.colocate:
            if n == 0:
                raise PlacementError(
                    "colocate=True with num_drafts_per_replica=0: there is no draft to colocate")
            if g not in (0, 1):
                raise PlacementError(
                    f"draft_gpus={fmt_amount(g)} with colocate: a colocated draft shares one GPU "
                    "with target rank 0; set its share with colocated_draft_fraction")
            if floor_share(self.colocated_draft_fraction / n) <= 0:
                raise PlacementError(
                    f"colocated_draft_fraction={self.colocated_draft_fraction} split over "
                    f"{n} drafts leaves each less than 1/{RESOURCE_GRAIN} GPU")
            return
        if n == 0:
            return
        if g == 0:
            raise PlacementError(
                "draft_gpus=0 without colocate: a draft worker needs a GPU; use --colocate to "
                "share the target's GPU, or num_drafts_per_replica=0 for no draft")
        if not _is_whole(g):
            raise PlacementError(
                f"draft_gpus={g}: a draft on its own GPUs needs a whole number of them; "
                "fractional GPUs only with --colocate (share set by colocated_draft_fraction)")

    def roles(self) -> tuple[RoleSpec, ...]:
        """The roles of one replica, target first (a colocated draft's host must precede it)."""
        target = RoleSpec(TARGET, int(self.target_tp), 1, self.target_cpus_per_worker)
        n = int(self.num_drafts_per_replica)
        if n == 0:
            return (target,)
        if self.colocate:
            share = floor_share(self.colocated_draft_fraction / n)
            draft = RoleSpec(DRAFT, n, share, self.draft_cpus_per_worker, colocated_with=TARGET)
        else:
            draft = RoleSpec(DRAFT, n, int(self.draft_gpus), self.draft_cpus_per_worker)
        return (target, draft)


@dataclass(frozen=True)
class NodeResources:
    """One node's total GPUs and CPUs (Ray's logical resources, so fake GPUs count too)."""

    node_id: str
    num_gpus: int
    num_cpus: float
    custom: tuple[tuple[str, float], ...] = ()  # Ray custom resources, e.g. (("outrider_target", 4),)

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise PlacementError(
                f"NodeResources.node_id={self.node_id!r}: must be a non-empty string")
        _require_whole(f"node {self.node_id} num_gpus", self.num_gpus, 0)
        _require_non_negative(f"node {self.node_id} num_cpus", self.num_cpus)
        for name, amount in self.custom:
            _require_non_negative(f"node {self.node_id} resource {name}", amount)

    def amount(self, resource: str) -> float:
        """This node's total of a custom resource (0 when it has none)."""
        return sum(a for n, a in self.custom if n == resource)


@dataclass(frozen=True)
class ClusterResources:
    """The nodes a plan may use. Totals, not what is free now: `groups.py` reports a plan that
    Ray cannot place (because something else holds the resources) as a timeout error."""

    nodes: tuple[NodeResources, ...]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise PlacementError("ClusterResources.nodes=(): the cluster has no nodes")
        ids = [n.node_id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise PlacementError(f"ClusterResources.nodes: duplicate node ids in {ids}")

    @property
    def total_gpus(self) -> int:
        return int(sum(n.num_gpus for n in self.nodes))

    @property
    def largest_node_gpus(self) -> int:
        return int(max(n.num_gpus for n in self.nodes))

    @classmethod
    def local(cls, num_gpus: int, num_cpus: float) -> ClusterResources:
        """One host (a laptop, one multi-GPU box, or a CPU box with fake GPUs)."""
        return cls((NodeResources("local", num_gpus, num_cpus),))

    @classmethod
    def uniform(cls, num_nodes: int, gpus_per_node: int, cpus_per_node: float) -> ClusterResources:
        """`num_nodes` identical hosts, named node-0, node-1, ..."""
        _require_whole("num_nodes", num_nodes, 1)
        return cls(tuple(NodeResources(f"node-{i}", gpus_per_node, cpus_per_node)
                         for i in range(num_nodes)))

    @classmethod
    def from_ray(cls) -> ClusterResources:
        """The alive nodes of the Ray cluster this process is connected to (`ray.init` first)."""
        import ray

        nodes = tuple(
            NodeResources(n["NodeID"], int(n["Resources"].get("GPU", 0)),
                          float(n["Resources"].get("CPU", 0)),
                          tuple(sorted((k, float(v)) for k, v in n["Resources"].items()
                                       if k.startswith(ROLE_RESOURCE_PREFIX))))
            for n in ray.nodes() if n.get("Alive"))
        if not nodes:
            raise PlacementError("the Ray cluster has no alive nodes")
        return cls(nodes)
