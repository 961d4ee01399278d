"""Placement planner, pure tier (no Ray): plans for 1 host x {1, 2, 4, 8} GPUs and 2 hosts x 4
GPUs, and every infeasible request raising PlacementError with a message naming the problem."""

import pytest

from placement.planner import STRICT_PACK, WorkerSlot, plan
from placement.spec import (
    DRAFT,
    TARGET,
    ClusterResources,
    NodeResources,
    PlacementError,
    PlacementRequest,
    RoleSpec,
)

ONE = {"GPU": 1, "CPU": 1}


def local(num_gpus):
    return ClusterResources.local(num_gpus, num_cpus=32)


def two_hosts():
    return ClusterResources.uniform(2, gpus_per_node=4, cpus_per_node=32)


def slots(p, replica, role):
    return list(p.replicas[replica].workers[role])


def nodes_of(p):
    return [r.node_id for r in p.replicas]


# ---- feasible plans -------------------------------------------------------------------------


def test_one_gpu_colocated_target_and_draft_share_one_bundle():
    p = plan(PlacementRequest(target_tp=1, colocate=True), local(1))
    (r,) = p.replicas
    assert r.strategy == STRICT_PACK
    assert r.bundles == ({"GPU": 1, "CPU": 2},)
    assert slots(p, 0, TARGET) == [WorkerSlot(0, 0.5, 1)]
    assert slots(p, 0, DRAFT) == [WorkerSlot(0, 0.5, 1)]
    assert p.total_gpus == 1 and nodes_of(p) == ["local"]


def test_one_gpu_target_only():
    p = plan(PlacementRequest(target_tp=1, num_drafts_per_replica=0), local(1))
    assert p.replicas[0].bundles == (ONE,)
    assert list(p.replicas[0].workers) == [TARGET]


def test_colocated_fraction_splits_between_target_and_drafts():
    req = PlacementRequest(target_tp=1, colocate=True, colocated_draft_fraction=0.25)
    p = plan(req, local(1))
    assert slots(p, 0, TARGET)[0].num_gpus == 0.75
    assert slots(p, 0, DRAFT)[0].num_gpus == 0.25
    req = PlacementRequest(target_tp=1, colocate=True, num_drafts_per_replica=3)
    p = plan(req, local(1))
    shares = [s.num_gpus for s in slots(p, 0, DRAFT)] + [slots(p, 0, TARGET)[0].num_gpus]
    assert all(s == 0.1666 for s in shares[:3]) and sum(shares) <= 1
    assert p.replicas[0].bundles == ({"GPU": 1, "CPU": 4},)


def test_two_gpus_target_and_draft_on_separate_gpus():
    p = plan(PlacementRequest(target_tp=1), local(2))
    assert p.replicas[0].bundles == (ONE, ONE)
    assert slots(p, 0, TARGET) == [WorkerSlot(0, 1, 1)]
    assert slots(p, 0, DRAFT) == [WorkerSlot(1, 1, 1)]
    assert p.total_gpus == 2


def test_four_gpus_tp2_plus_draft():
    p = plan(PlacementRequest(target_tp=2), local(4))
    assert p.replicas[0].bundles == (ONE, ONE, ONE)
    assert [s.bundle_index for s in slots(p, 0, TARGET)] == [0, 1]
    assert [s.bundle_index for s in slots(p, 0, DRAFT)] == [2]
    assert p.total_gpus == 3


def test_four_gpus_two_replicas_of_tp1_plus_draft():
    p = plan(PlacementRequest(target_tp=1, num_target_replicas=2), local(4))
    assert len(p.replicas) == 2
    assert all(r.bundles == (ONE, ONE) and r.strategy == STRICT_PACK for r in p.replicas)
    assert nodes_of(p) == ["local", "local"] and p.total_gpus == 4


def test_four_gpus_colocated_tp2_draft_on_rank0():
    req = PlacementRequest(target_tp=2, colocate=True, colocated_draft_fraction=0.25)
    p = plan(req, local(4))
    assert p.replicas[0].bundles == ({"GPU": 1, "CPU": 2}, ONE)
    assert slots(p, 0, TARGET) == [WorkerSlot(0, 0.75, 1), WorkerSlot(1, 1, 1)]
    assert slots(p, 0, DRAFT) == [WorkerSlot(0, 0.25, 1)]
    assert p.total_gpus == 2


def test_eight_gpus_tp4_plus_draft_of_two_gpus():
    p = plan(PlacementRequest(target_tp=4, draft_gpus=2), local(8))
    assert p.replicas[0].bundles == (ONE,) * 4 + ({"GPU": 2, "CPU": 1},)
    assert slots(p, 0, DRAFT) == [WorkerSlot(4, 2, 1)]
    assert p.total_gpus == 6


def test_eight_gpus_two_replicas_of_tp2_plus_two_drafts():
    req = PlacementRequest(target_tp=2, num_target_replicas=2, num_drafts_per_replica=2)
    p = plan(req, local(8))
    for r in p.replicas:
        assert r.bundles == (ONE,) * 4
        assert [s.bundle_index for s in r.workers[DRAFT]] == [2, 3]
    assert p.total_gpus == 8


def test_eight_gpus_tp8_colocated():
    p = plan(PlacementRequest(target_tp=8, colocate=True), local(8))
    assert len(p.replicas[0].bundles) == 8 and p.total_gpus == 8
    assert slots(p, 0, DRAFT) == [WorkerSlot(0, 0.5, 1)]


def test_two_hosts_one_replica_per_node():
    req = PlacementRequest(target_tp=2, num_target_replicas=2)
    p = plan(req, two_hosts())
    assert nodes_of(p) == ["node-0", "node-1"]  # 3 GPUs each: the second cannot join the first
    assert all(r.strategy == STRICT_PACK and r.bundles == (ONE,) * 3 for r in p.replicas)
    req = PlacementRequest(target_tp=2, num_target_replicas=2, num_drafts_per_replica=2)
    assert nodes_of(plan(req, two_hosts())) == ["node-0", "node-1"]
    req = PlacementRequest(target_tp=4, num_target_replicas=2, colocate=True)
    p = plan(req, two_hosts())
    assert nodes_of(p) == ["node-0", "node-1"] and p.total_gpus == 8


def test_two_hosts_four_small_replicas_two_per_node():
    req = PlacementRequest(target_tp=1, num_target_replicas=4)
    p = plan(req, two_hosts())
    assert sorted(nodes_of(p)) == ["node-0", "node-0", "node-1", "node-1"]
    assert p.total_gpus == 8


def test_bin_packing_skips_nodes_without_room():
    cluster = ClusterResources((NodeResources("small", 1, 8), NodeResources("big", 4, 8)))
    p = plan(PlacementRequest(target_tp=1, num_target_replicas=2), cluster)
    assert nodes_of(p) == ["big", "big"]
    cluster = ClusterResources((NodeResources("small", 2, 8), NodeResources("big", 4, 8)))
    p = plan(PlacementRequest(target_tp=1, num_target_replicas=3), cluster)
    assert nodes_of(p) == ["small", "big", "big"] and p.total_gpus == 6


def test_describe_lists_every_worker():
    req = PlacementRequest(target_tp=2, num_target_replicas=2)
    text = plan(req, two_hosts()).describe()
    lines = text.splitlines()
    assert "6 of 8 GPUs" in lines[0] and STRICT_PACK in lines[0]
    assert len(lines) == 2 + 2 * 3
    assert "draft" in lines[-1] and "node-1" in lines[-1]


def test_slot_lookup_and_unknown_worker():
    p = plan(PlacementRequest(target_tp=2), local(4))
    assert p.slot(0, TARGET, 1) == WorkerSlot(1, 1, 1)
    with pytest.raises(PlacementError, match="rank=5"):
        p.slot(0, TARGET, 5)


def test_cpus_per_worker_reach_bundles_and_slots():
    req = PlacementRequest(target_tp=1, colocate=True, target_cpus_per_worker=2,
                           draft_cpus_per_worker=0.5)
    p = plan(req, local(1))
    assert p.replicas[0].bundles == ({"GPU": 1, "CPU": 2.5},)
    req = PlacementRequest(target_tp=1, num_drafts_per_replica=0, target_cpus_per_worker=0)
    assert plan(req, local(1)).replicas[0].bundles == ({"GPU": 1},)


# ---- infeasible plans -----------------------------------------------------------------------


@pytest.mark.parametrize("req, cluster, message", [
    (PlacementRequest(target_tp=2, num_target_replicas=2), local(4),
     "needs 6 GPUs, cluster has 4"),
    (PlacementRequest(target_tp=1), local(1),
     "needs 2 GPUs, cluster has 1.*--colocate"),
    (PlacementRequest(target_tp=8), local(4),
     "target_tp=8 but the largest node has 4 GPUs"),
    (PlacementRequest(target_tp=8, colocate=True), two_hosts(),
     "target_tp=8 but the largest node has 4 GPUs"),
    (PlacementRequest(target_tp=4), two_hosts(),
     "one replica needs 5 GPUs on one node.*largest node has 4.*--colocate"),
    (PlacementRequest(target_tp=1), local(0), "cluster has 0 GPUs"),
    (PlacementRequest(target_tp=2, num_target_replicas=2, colocate=True),
     ClusterResources((NodeResources("a", 3, 8), NodeResources("b", 1, 8))),
     "cannot fit 2 replicas of 2 GPUs"),
    (PlacementRequest(target_tp=2, target_cpus_per_worker=8), ClusterResources.local(4, 8),
     "needs 17 CPUs on one node"),
], ids=["more-gpus-than-cluster", "separate-on-one-gpu", "tp-bigger-than-node",
        "tp-across-nodes", "replica-bigger-than-node", "no-gpus", "fragmented", "cpus"])
def test_infeasible_plans(req, cluster, message):
    with pytest.raises(PlacementError, match=message):
        plan(req, cluster)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_tp=0), "target_tp=0: must be >= 1"),
    (dict(target_tp=1.5), "target_tp=1.5: must be a whole number"),
    (dict(target_tp=True), "target_tp=True"),
    (dict(target_tp=1, num_target_replicas=0), "num_target_replicas=0"),
    (dict(target_tp=1, num_drafts_per_replica=-1), "num_drafts_per_replica=-1"),
    (dict(target_tp=1, draft_gpus=0), "draft_gpus=0 without colocate.*--colocate"),
    (dict(target_tp=1, draft_gpus=0.5), "draft_gpus=0.5: .*whole number"),
    (dict(target_tp=1, colocate=True, colocated_draft_fraction=1.0),
     "colocated_draft_fraction=1.0"),
    (dict(target_tp=1, colocate=True, colocated_draft_fraction=0), "colocated_draft_fraction=0"),
    (dict(target_tp=1, colocated_draft_fraction=1.5), "colocated_draft_fraction=1.5"),
    (dict(target_tp=1, colocate=True, draft_gpus=2), "draft_gpus=2 with colocate"),
    (dict(target_tp=1, colocate=True, num_drafts_per_replica=0), "no draft to colocate"),
    (dict(target_tp=1, colocate="yes"), "colocate='yes'"),
    (dict(target_tp=1, draft_cpus_per_worker=-1), "draft_cpus_per_worker=-1"),
])
def test_invalid_requests(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        PlacementRequest(**kwargs)


def test_no_draft_needs_no_draft_gpus():
    p = plan(PlacementRequest(target_tp=1, draft_gpus=0, num_drafts_per_replica=0),
             local(1))
    assert p.total_gpus == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="draft", num_workers=1, gpus_per_worker=0), "draft.gpus_per_worker=0"),
    (dict(name="draft", num_workers=1, gpus_per_worker=0.5), "fractional GPUs only"),
    (dict(name="draft", num_workers=1, gpus_per_worker=1, colocated_with="target"), r"in \(0, 1\)"),
    (dict(name="draft", num_workers=0, gpus_per_worker=1), "draft.num_workers=0"),
    (dict(name="", num_workers=1, gpus_per_worker=1), "RoleSpec.name"),
])
def test_invalid_roles(kwargs, message):
    with pytest.raises(PlacementError, match=message):
        RoleSpec(**kwargs)


def test_invalid_clusters():
    with pytest.raises(PlacementError, match="no nodes"):
        ClusterResources(())
    with pytest.raises(PlacementError, match="duplicate"):
        ClusterResources((NodeResources("a", 1, 1), NodeResources("a", 1, 1)))
    with pytest.raises(PlacementError, match="num_gpus=1.5"):
        NodeResources("a", 1.5, 1)
    assert isinstance(PlacementError("x"), ValueError)


# ---- role pools (the Helm chart's worker group per role) -------------------------------------


def pools(target=(4,), draft=(1,), head_gpus=0):
    """A head node without GPUs, target-pool nodes and draft-pool nodes (as the chart renders them)."""
    nodes = [NodeResources("head", head_gpus, 8)]
    nodes += [NodeResources(f"target-{i}", g, 16, (("outrider_target", g),)) for i, g in enumerate(target)]
    nodes += [NodeResources(f"draft-{i}", g, 16, (("outrider_draft", g),)) for i, g in enumerate(draft)]
    return ClusterResources(tuple(nodes))


def test_role_pools_bundles_ask_for_their_role_resource_and_pack_across_pools():
    p = plan(PlacementRequest(target_tp=4, draft_gpus=1, role_pools=True), pools())
    (r,) = p.replicas
    assert r.strategy == "PACK"  # target and draft live on different nodes
    assert r.bundles == ({"GPU": 1, "CPU": 1, "outrider_target": 1},) * 4 + (
        {"GPU": 1, "CPU": 1, "outrider_draft": 1},)
    assert r.node_id == "target-0"
    assert "role pools" in p.describe().splitlines()[0]


def test_role_pools_colocated_draft_stays_strict_pack_in_the_target_pool():
    p = plan(PlacementRequest(target_tp=2, colocate=True, role_pools=True), pools(target=(2,), draft=()))
    (r,) = p.replicas
    assert r.strategy == STRICT_PACK
    assert r.bundles == ({"GPU": 1, "CPU": 2, "outrider_target": 1}, {"GPU": 1, "CPU": 1, "outrider_target": 1})
    assert all("outrider_draft" not in b for b in r.bundles)


def test_role_pools_refuse_a_missing_pool_naming_the_resource():
    with pytest.raises(PlacementError, match="no node advertises outrider_draft.*rayStartParams"):
        plan(PlacementRequest(target_tp=1, draft_gpus=1, role_pools=True), pools(target=(1,), draft=()))


def test_role_pools_keep_a_targets_ranks_on_one_node():
    # two target nodes of 2 GPUs hold 4 units in all, but no single node holds the TP=4 target
    with pytest.raises(PlacementError, match="needs 4 outrider_target on one node.*target-0: 2, target-1: 2"):
        plan(PlacementRequest(target_tp=4, draft_gpus=1, role_pools=True), pools(target=(2, 2)))


def test_role_pools_place_replicas_on_separate_target_nodes():
    p = plan(PlacementRequest(target_tp=2, num_target_replicas=2, draft_gpus=1, role_pools=True),
             pools(target=(2, 2), draft=(2,)))
    assert nodes_of(p) == ["target-0", "target-1"]
    with pytest.raises(PlacementError, match="cannot place replica 1.*outrider_draft"):
        plan(PlacementRequest(target_tp=2, num_target_replicas=2, draft_gpus=1, role_pools=True),
             pools(target=(2, 2), draft=(1,)))


def test_role_pools_off_ignores_custom_resources():
    p = plan(PlacementRequest(target_tp=1, draft_gpus=1), ClusterResources.local(2, 8))
    assert p.replicas[0].bundles == (ONE, ONE)
