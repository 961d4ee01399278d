"""Placement on a local Ray cluster with four fake GPUs (one Ray instance for the module): groups
are created from plans, actors pinned to bundles see the GPUs the plan gave them, impossible plans
fail before anything starts or time out into a clear error, and every group is freed."""

import os
import time

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402
import ray  # noqa: E402
from ray.util.placement_group import placement_group_table  # noqa: E402

from placement.groups import create_placement_groups  # noqa: E402
from placement.planner import plan  # noqa: E402
from placement.spec import (  # noqa: E402
    DRAFT,
    TARGET,
    ClusterResources,
    PlacementError,
    PlacementRequest,
)
from tests.conftest import start_local_ray  # noqa: E402

NUM_GPUS = 4
NUM_CPUS = 8


def make_probe():
    """A trivial actor class that reports the device Ray gave it. Defined inside a function so
    that Ray ships it by value: worker processes cannot import this test module."""

    class Probe:
        def devices(self) -> dict:
            ctx = ray.get_runtime_context()
            return {
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "gpu_share": ctx.get_assigned_resources().get("GPU"),
                "node_id": ctx.get_node_id(),
            }

    return ray.remote(Probe)


@pytest.fixture(scope="module")
def ray_local():
    start_local_ray(num_cpus=NUM_CPUS, num_gpus=NUM_GPUS)
    yield
    ray.shutdown()


def live_groups() -> int:
    return sum(1 for g in placement_group_table().values() if g["state"] != "REMOVED")


def wait_free_gpus(expected: float, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources().get("GPU", 0)
        if free == expected or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


def probe_all(placed) -> dict:
    """Start one Probe per worker of the plan; return (replica, role, rank) -> its devices."""
    probe = make_probe()
    actors = {}
    for r in placed.plan.replicas:
        for role, slots in r.workers.items():
            for rank in range(len(slots)):
                opts = placed.actor_options(r.replica, role, rank)
                actors[(r.replica, role, rank)] = probe.options(**opts).remote()
    keys = list(actors)
    seen = dict(zip(keys, ray.get([actors[k].devices.remote() for k in keys], timeout=60)))
    for a in actors.values():
        ray.kill(a)
    return seen


def test_from_ray_reads_the_local_node(ray_local):
    cluster = ClusterResources.from_ray()
    assert len(cluster.nodes) == 1
    assert cluster.total_gpus == NUM_GPUS and cluster.nodes[0].num_cpus == NUM_CPUS


def test_separate_roles_get_distinct_gpus(ray_local):
    req = PlacementRequest(target_tp=1, num_target_replicas=2)  # 2 x (target + draft) = 4 GPUs
    placed = create_placement_groups(plan(req, ClusterResources.from_ray()), timeout_s=30)
    try:
        seen = probe_all(placed)
        assert len(seen) == 4
        ids = [d["gpu_ids"] for d in seen.values()]
        assert all(len(i) == 1 for i in ids)
        assert len({i[0] for i in ids}) == 4
        assert {d["cuda_visible_devices"] for d in seen.values()} == {"0", "1", "2", "3"}
        assert all(d["gpu_share"] == 1 for d in seen.values())
        assert all(len(set(placed.node_ids(r))) == 1 for r in range(2))
    finally:
        placed.remove()
    assert wait_free_gpus(NUM_GPUS) == NUM_GPUS


def test_colocated_target_and_draft_share_one_gpu(ray_local):
    req = PlacementRequest(target_tp=2, colocate=True, colocated_draft_fraction=0.25)
    placed = create_placement_groups(plan(req, ClusterResources.from_ray()), timeout_s=30)
    try:
        seen = probe_all(placed)
        t0, t1, d0 = seen[(0, TARGET, 0)], seen[(0, TARGET, 1)], seen[(0, DRAFT, 0)]
        assert t0["gpu_ids"] == d0["gpu_ids"] and len(t0["gpu_ids"]) == 1
        assert t0["cuda_visible_devices"] == d0["cuda_visible_devices"]
        assert t1["gpu_ids"] != t0["gpu_ids"]
        assert (t0["gpu_share"], d0["gpu_share"], t1["gpu_share"]) == (0.75, 0.25, 1)
        assert wait_free_gpus(NUM_GPUS - 2) == NUM_GPUS - 2
    finally:
        placed.remove()
    assert wait_free_gpus(NUM_GPUS) == NUM_GPUS


def test_infeasible_request_fails_before_anything_starts(ray_local):
    before = live_groups()
    with pytest.raises(PlacementError, match="target_tp=8 but the largest node has 4 GPUs"):
        plan(PlacementRequest(target_tp=8), ClusterResources.from_ray())
    with pytest.raises(PlacementError, match="needs 6 GPUs, cluster has 4"):
        plan(PlacementRequest(target_tp=2, num_target_replicas=2), ClusterResources.from_ray())
    assert live_groups() == before
    assert ray.available_resources().get("GPU") == NUM_GPUS


def test_unplaceable_plan_times_out_with_a_clear_error(ray_local):
    # Planned for a cluster that does not exist: replica 0 fits the real node, replica 1 cannot.
    lie = ClusterResources.uniform(2, gpus_per_node=4, cpus_per_node=NUM_CPUS)
    p = plan(PlacementRequest(target_tp=2, num_target_replicas=2), lie)
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"1 of 2 placement group\(s\) not placed within 2"
                                             r".*replica 1 \(STRICT_PACK.*'GPU': 1"):
        create_placement_groups(p, timeout_s=2)
    assert 2 <= time.monotonic() - start < 10
    assert live_groups() == 0  # replica 0's group, which was placed, is freed too
    assert wait_free_gpus(NUM_GPUS) == NUM_GPUS


def test_every_group_is_removed(ray_local):
    assert live_groups() == 0
    assert wait_free_gpus(NUM_GPUS) == NUM_GPUS
