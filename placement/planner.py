"""The placement planner: a request and the cluster's resources -> placement-group bundles.

Plane: control. Pure Python, no Ray: `plan()` is a function of its two arguments, so every
topology (one GPU, one multi-GPU host, several hosts, fake GPUs) is tested without a cluster.

Rules it keeps:
* one placement group per target replica, holding its tensor-parallel ranks and its drafts, with
  strategy STRICT_PACK: the whole replica sits on one node, so the target's all-reduce stays on
  NVLink and the per-step draft <-> target exchange (token ids, probabilities) never crosses the
  network. A replica bigger than every node is an error; cross-node tensor parallelism and drafts
  on another node than their target are not supported (PACK would not keep TP ranks together, and
  splitting a replica across two groups would give up the co-location the overlap relies on);
* one bundle per GPU-holding worker, `{"GPU": g, "CPU": c}` with whole g; bundle order within a
  group is target ranks 0..tp-1, then separate drafts;
* a colocated draft has no bundle of its own: it joins target rank 0's bundle (its CPUs added
  there) and the GPU of that bundle is split: target rank 0 takes 1 - fraction, each draft takes
  fraction / num_drafts, rounded down to Ray's 1/10000 grain, and target rank 0 the rest (so the
  shares never sum past 1) — Ray then hands them the same device;
* role pools (``PlacementRequest.role_pools``, the Helm chart's worker group per role): every
  bundle also asks for ``outrider_<role>`` (one unit per GPU), which only the nodes of that role's
  pool advertise, so target ranks land on target nodes and drafts on draft nodes. A replica whose
  draft has its own bundle is then one PACK group (target and draft may sit on different nodes;
  the draft link crosses the network) and the planner checks that one target node holds all
  ``target_tp`` units, so Ray's packing keeps the ranks together; otherwise it stays STRICT_PACK;
* feasibility is decided here, before anything is created: first-fit decreasing of the replicas
  over each node's GPUs (and CPUs). The node of each replica is the planner's witness that a
  placement exists; Ray picks the actual node. Replicas of one request are identical, so any
  greedy order Ray uses places them all whenever the witness exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import (
    DRAFT,
    TARGET,
    ClusterResources,
    NodeResources,
    PlacementError,
    PlacementRequest,
    RoleSpec,
    fmt_amount,
    floor_share,
    role_resource,
)

STRICT_PACK = "STRICT_PACK"
PACK = "PACK"


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker runs: a bundle of its replica's group and what its actor asks for."""

    bundle_index: int
    num_gpus: float
    num_cpus: float


@dataclass(frozen=True)
class ReplicaPlan:
    """One placement group: its bundles, strategy, and the slot of every worker by role and rank."""

    replica: int
    bundles: tuple[dict[str, float], ...]
    strategy: str
    workers: dict[str, tuple[WorkerSlot, ...]]
    node_id: str  # the planner's feasibility witness; Ray chooses the real node

    @property
    def num_gpus(self) -> int:
        return int(sum(b.get("GPU", 0) for b in self.bundles))

    @property
    def num_cpus(self) -> float:
        return sum(b.get("CPU", 0) for b in self.bundles)


@dataclass(frozen=True)
class PlacementPlan:
    """The placement of a whole request: one `ReplicaPlan` (placement group) per target replica."""

    request: PlacementRequest
    replicas: tuple[ReplicaPlan, ...]
    cluster_gpus: int = 0

    @property
    def total_gpus(self) -> int:
        return sum(r.num_gpus for r in self.replicas)

    def slot(self, replica: int, role: str, rank: int) -> WorkerSlot:
        try:
            return self.replicas[replica].workers[role][rank]
        except (IndexError, KeyError):
            raise PlacementError(
                f"no worker (replica={replica}, role={role!r}, rank={rank}) in this plan") from None

    def describe(self) -> str:
        """A small table: one row per worker, with its bundle, its share and its node."""
        req = self.request
        drafts = "no draft"
        if req.num_drafts_per_replica:
            how = (f"colocated, {fmt_amount(req.colocated_draft_fraction)} of target rank 0's GPU"
                   if req.colocate else f"{fmt_amount(req.draft_gpus)} GPU each")
            drafts = f"{req.num_drafts_per_replica} draft ({how})"
        lines = [
            f"{len(self.replicas)} replica(s) x [target tp={req.target_tp}, {drafts}]: "
            f"{self.total_gpus} of {self.cluster_gpus} GPUs, one {self.replicas[0].strategy} group per replica"
            + (" (role pools)" if req.role_pools else ""),
            f"{'replica':>7}  {'role':<6}  {'rank':>4}  {'bundle':>6}  {'GPU':>6}  {'CPU':>5}"
            "  node",
        ]
        for r in self.replicas:
            for role, slots in r.workers.items():
                for rank, s in enumerate(slots):
                    lines.append(
                        f"{r.replica:>7}  {role:<6}  {rank:>4}  {s.bundle_index:>6}  "
                        f"{fmt_amount(s.num_gpus):>6}  {fmt_amount(s.num_cpus):>5}  "
                        f"{r.node_id[:12]}")
        return "\n".join(lines)


def _replica_layout(
    roles: tuple[RoleSpec, ...], role_pools: bool = False,
) -> tuple[tuple[dict[str, float], ...], dict[str, tuple[WorkerSlot, ...]]]:
    """Bundles and worker slots of one replica (the same for every replica of a request)."""
    bundles: list[dict[str, float]] = []
    workers: dict[str, list[WorkerSlot]] = {}
    for role in roles:
        if role.colocated_with is None:
            slots = []
            for _ in range(int(role.num_workers)):
                bundle = {"GPU": int(role.gpus_per_worker), "CPU": role.cpus_per_worker}
                if role_pools:
                    bundle[role_resource(role.name)] = int(role.gpus_per_worker)
                bundles.append(bundle)
                slots.append(WorkerSlot(len(bundles) - 1, int(role.gpus_per_worker),
                                        role.cpus_per_worker))
            workers[role.name] = slots
            continue
        host = workers.get(role.colocated_with)
        if not host:
            raise PlacementError(
                f"{role.name}.colocated_with={role.colocated_with!r}: no such role before it")
        h0 = host[0]
        bundle = bundles[h0.bundle_index]
        if bundle["GPU"] != 1:
            raise PlacementError(
                f"{role.name} colocated with {role.colocated_with}: the host's rank 0 must hold "
                f"exactly one GPU to share, it holds {fmt_amount(bundle['GPU'])}")
        host_share = floor_share(h0.num_gpus - role.gpus_per_worker * role.num_workers)
        if host_share <= 0:
            raise PlacementError(
                f"{role.name}: {role.num_workers} x {role.gpus_per_worker} GPU leaves nothing of "
                f"the GPU for {role.colocated_with} rank 0")
        host[0] = WorkerSlot(h0.bundle_index, host_share, h0.num_cpus)
        bundle["CPU"] = bundle["CPU"] + role.cpus_per_worker * role.num_workers
        workers[role.name] = [WorkerSlot(h0.bundle_index, role.gpus_per_worker,
                                         role.cpus_per_worker)] * int(role.num_workers)
    clean = tuple({k: v for k, v in b.items() if v} for b in bundles)  # zero amounts are left out
    return clean, {name: tuple(slots) for name, slots in workers.items()}


def _demand_text(req: PlacementRequest) -> str:
    parts = [f"target_tp={req.target_tp}"]
    if req.num_drafts_per_replica and not req.colocate:
        parts.append(f"{req.num_drafts_per_replica} draft x {fmt_amount(req.draft_gpus)} GPU")
    elif req.num_drafts_per_replica:
        parts.append(f"{req.num_drafts_per_replica} colocated draft")
    return " + ".join(parts)


def _colocate_hint(req: PlacementRequest, gpus_available: int, per_replica: bool) -> str:
    """Suggest --colocate when the drafts' own GPUs are what does not fit."""
    if req.colocate or not req.num_drafts_per_replica:
        return ""
    need = req.target_tp * (1 if per_replica else req.num_target_replicas)
    if need > gpus_available:
        return ""
    return (f"; with --colocate each draft shares its target's GPU and this needs {need} "
            f"GPU{'s' if need != 1 else ''}")


def _check_cluster(req: PlacementRequest, resources: ClusterResources, gpus: int, cpus: float):
    largest = resources.largest_node_gpus
    if resources.total_gpus == 0:
        raise PlacementError(
            "the cluster has 0 GPUs and every role needs one (on a CPU machine, declare fake GPUs "
            "with --num-gpus)")
    if req.target_tp > largest:
        raise PlacementError(
            f"target_tp={req.target_tp} but the largest node has {largest} GPUs: tensor "
            "parallelism stays within one node (cross-node TP is not supported)")
    need, have = gpus * req.num_target_replicas, resources.total_gpus
    if need > have:
        raise PlacementError(
            f"needs {need} GPUs, cluster has {have}: {req.num_target_replicas} replica(s) of "
            f"{_demand_text(req)}{_colocate_hint(req, have, per_replica=False)}")
    if gpus > largest:
        raise PlacementError(
            f"one replica needs {gpus} GPUs on one node ({_demand_text(req)}) but the largest "
            f"node has {largest}: a replica is one {STRICT_PACK} group, drafts beside their "
            f"target{_colocate_hint(req, largest, per_replica=True)}")
    most_cpus = max(n.num_cpus for n in resources.nodes)
    if cpus > most_cpus:
        raise PlacementError(
            f"one replica needs {fmt_amount(cpus)} CPUs on one node but the largest node has "
            f"{fmt_amount(most_cpus)}; lower target_cpus_per_worker / draft_cpus_per_worker")


def _bin_pack(demands: list[tuple[int, float]], nodes: tuple[NodeResources, ...]) -> list[str]:
    """First-fit decreasing: node id for each (gpus, cpus) demand, in the demands' order."""
    free = {n.node_id: [n.num_gpus, n.num_cpus] for n in nodes}
    order = sorted(range(len(demands)), key=lambda i: demands[i], reverse=True)
    placed: dict[int, str] = {}
    for i in order:
        g, c = demands[i]
        node = next((nid for nid, (fg, fc) in free.items() if fg >= g and fc >= c), None)
        if node is None:
            left = ", ".join(f"{nid[:12]}: {fmt_amount(fg)} GPU/{fmt_amount(fc)} CPU"
                             for nid, (fg, fc) in free.items())
            raise PlacementError(
                f"cannot fit {len(demands)} replicas of {g} GPUs / {fmt_amount(c)} CPUs: after "
                f"{len(placed)} placed, no node has room for the next (free: {left})")
        free[node][0] -= g
        free[node][1] -= c
        placed[i] = node
    return [placed[i] for i in range(len(demands))]


def _pool_demands(bundles: tuple[dict[str, float], ...]) -> dict[str, list[float]]:
    """Per role resource, the units of each bundle that asks for it (bundle order)."""
    demands: dict[str, list[float]] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            if key not in ("GPU", "CPU"):
                demands.setdefault(key, []).append(amount)
    return demands


def _plan_pools(req: PlacementRequest, resources: ClusterResources,
                bundles: tuple[dict[str, float], ...]) -> list[str]:
    """Role pools: check every role's pool and return a witness node per replica (its target's)."""
    n = int(req.num_target_replicas)
    target_key = role_resource(TARGET)
    witness: list[str] = []
    for key, units in _pool_demands(bundles).items():
        pool = [node for node in resources.nodes if node.amount(key) > 0]
        have = ", ".join(f"{node.node_id[:12]}: {fmt_amount(node.amount(key))}" for node in pool) or "none"
        where = (f"role pools: the nodes advertise {key} ({have}); each worker group of the role "
                 "sets it in rayStartParams resources")
        if not pool:
            raise PlacementError(f"no node advertises {key}, which the {key.removeprefix('outrider_')} "
                                 f"workers need ({where})")
        # a target's ranks stay on one node: its units are one demand; a draft's bundles are separate
        per_replica = [sum(units)] if key == target_key else list(units)
        free = {node.node_id: node.amount(key) for node in pool}
        for replica in range(n):
            for demand in per_replica:
                node = next((nid for nid, f in free.items() if f >= demand), None)
                if node is None:
                    raise PlacementError(
                        f"cannot place replica {replica}: it needs {fmt_amount(demand)} {key} on one node "
                        f"and no node has that much left ({where})")
                free[node] -= demand
                if key == target_key:
                    witness.append(node)
    return witness


def plan(request: PlacementRequest, resources: ClusterResources) -> PlacementPlan:
    """Plan the placement groups for `request` on `resources`, or raise `PlacementError`."""
    bundles, workers = _replica_layout(request.roles(), request.role_pools)
    gpus = int(sum(b.get("GPU", 0) for b in bundles))
    cpus = sum(b.get("CPU", 0) for b in bundles)
    n = int(request.num_target_replicas)
    strategy = STRICT_PACK
    if request.role_pools:
        if resources.total_gpus == 0:
            raise PlacementError("the cluster has 0 GPUs and every role needs one")
        node_ids = _plan_pools(request, resources, bundles)
        if len(workers) > 1 and any(s.bundle_index != 0 for s in workers.get(DRAFT, ())):
            strategy = PACK  # a draft with a bundle of its own lives in the draft pool
    else:
        _check_cluster(request, resources, gpus, cpus)
        node_ids = _bin_pack([(gpus, cpus)] * n, resources.nodes)
    replicas = tuple(
        ReplicaPlan(i, tuple(dict(b) for b in bundles), strategy, dict(workers), node_ids[i])
        for i in range(n))
    return PlacementPlan(request, replicas, resources.total_gpus)


__all__ = ["DRAFT", "TARGET", "PACK", "STRICT_PACK", "PlacementPlan", "ReplicaPlan", "WorkerSlot", "plan"]
