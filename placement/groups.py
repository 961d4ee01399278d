"""Creating the planned placement groups and pinning actors to their bundles.

Plane: control. This is the only module in Outrider that touches Ray placement groups: everything
else asks `PlacedCluster.actor_options(replica, role, rank)` for the `.options(...)` of an actor.

Invariants:
* groups are created only from a `PlacementPlan`, so the planner's checks ran first;
* creation never hangs: groups not placed within `timeout_s` are reported (replica, bundles,
  Ray's state for them, what the cluster has free) in a `PlacementError`, and every group this
  call created is removed before it raises;
* an actor asks for exactly its slot's share (fractional GPU for a colocated pair), pinned to its
  slot's bundle, so Ray gives colocated workers the same device and separate workers distinct ones.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .planner import PlacementPlan
from .spec import PlacementError


@dataclass
class PlacedCluster:
    """The placement groups of a plan, one per replica, ready to host actors."""

    plan: PlacementPlan
    groups: tuple[PlacementGroup, ...]

    def actor_options(self, replica: int, role: str, rank: int) -> dict:
        """`.options(...)` kwargs that put worker (replica, role, rank) on its bundle."""
        slot = self.plan.slot(replica, role, rank)
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.groups[replica],
            placement_group_bundle_index=slot.bundle_index,
        )
        return {"num_gpus": slot.num_gpus, "num_cpus": slot.num_cpus,
                "scheduling_strategy": strategy}

    def node_ids(self, replica: int) -> list[str]:
        """The Ray node of each bundle of `replica`'s group, in bundle order."""
        table = placement_group_table(self.groups[replica])
        by_index = table.get("bundles_to_node_id", {})
        return [by_index.get(i, "") for i in range(len(self.plan.replicas[replica].bundles))]

    def remove(self) -> None:
        """Free every group (Ray kills actors still running in them). Safe to call twice."""
        _remove_all(self.groups)
        self.groups = ()


def _remove_all(groups) -> None:
    for pg in groups:
        try:
            remove_placement_group(pg)
        except Exception:  # already removed, or Ray shut down: nothing left to free
            pass


def _pending_report(plan: PlacementPlan, groups, pending: list[int]) -> str:
    rows = []
    for i in pending:
        table = placement_group_table(groups[i])
        state = table.get("state", "?")
        sched = (table.get("stats") or {}).get("scheduling_state", "")
        rows.append(f"replica {i} ({plan.replicas[i].strategy}, bundles "
                    f"{list(plan.replicas[i].bundles)}, state {state}"
                    f"{'/' + sched if sched else ''})")
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("GPU", "CPU")}
    free = {k: v for k, v in ray.available_resources().items() if k in ("GPU", "CPU")}
    return f"{'; '.join(rows)}. Cluster has {total}, free now {free}"


def create_placement_groups(plan: PlacementPlan, timeout_s: float = 60.0,
                            name_prefix: str = "outrider") -> PlacedCluster:
    """Create one placement group per replica of `plan` and wait until Ray has placed them all.

    Raises `PlacementError` naming the groups and bundles Ray could not place within `timeout_s`
    (the cluster is smaller than the plan assumed, or others hold the resources). Ray waits in
    whole seconds, so a failure can take up to one second longer than `timeout_s`.
    """
    if not ray.is_initialized():
        raise PlacementError("Ray is not initialised: call ray.init(...) before placing groups")
    tag = uuid.uuid4().hex[:6]
    groups = tuple(
        placement_group(list(r.bundles), strategy=r.strategy,
                        name=f"{name_prefix}-{tag}-r{r.replica}")
        for r in plan.replicas)
    deadline = time.monotonic() + timeout_s
    # Ray's wait counts whole seconds (0.5 s would not wait at all): round the time left up.
    pending = [i for i, pg in enumerate(groups)
               if not pg.wait(timeout_seconds=max(math.ceil(deadline - time.monotonic()), 0))]
    if pending:
        report = _pending_report(plan, groups, pending)
        _remove_all(groups)
        raise PlacementError(
            f"{len(pending)} of {len(groups)} placement group(s) not placed within {timeout_s} s: "
            f"{report}")
    return PlacedCluster(plan, groups)
