"""Test-wide settings. The models in tests are tiny: one intra-op thread is fastest for them, and
several threads per process oversubscribe a 2-core CI machine by orders of magnitude. Modules
that need Ray share one local instance per module (``ray_local``): 2 CPUs, 4 fake GPUs, and the
role-pool resources the Helm chart's worker groups advertise (2 units each of ``outrider_target``
and ``outrider_draft``), which only placements with ``node_pools: per_role`` ask for."""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=4, object_store_memory=256 * 2**20,
             resources={"outrider_target": 2, "outrider_draft": 2},
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
