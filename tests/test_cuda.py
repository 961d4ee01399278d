"""The same runtime on a CUDA device (skipped without one; run on the GPU hosts)."""

import pytest
import torch

from actors.model.loader import load_model
from actors.spec.proposers import TreeShape, build_proposer
from actors.spec.reference import generate
from actors.spec.types import SamplingParams
from tests.tiny_models import write_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [[5, 17, 3, 99, 42, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200]]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cuda"), arch="llama", num_layers=4, with_tokenizer=False)


def test_cuda_fp32_matches_cpu(path):
    params = SamplingParams(max_tokens=20)
    cpu = generate(load_model(path, dtype=torch.float32, device="cpu"), PROMPTS, params)
    target = load_model(path, dtype=torch.float32, device="cuda")
    gpu = generate(target, PROMPTS, params)
    assert [r.token_ids for r in gpu] == [r.token_ids for r in cpu]
    for shape in (TreeShape.chain(4), TreeShape((2, 2, 1))):
        spec = generate(target, PROMPTS, params, proposer=build_proposer("self:2", target), tree=shape)
        assert [r.token_ids for r in spec] == [r.token_ids for r in gpu]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_speculation(path, dtype):
    target = load_model(path, dtype=dtype, device="cuda")
    params = SamplingParams(max_tokens=20)
    plain = generate(target, PROMPTS, params)
    spec = generate(target, PROMPTS, params, proposer=build_proposer("self:2", target), num_draft_tokens=3)
    matches = sum(a == b for p, s in zip(plain, spec) for a, b in zip(p.token_ids, s.token_ids))
    assert matches / sum(len(p.token_ids) for p in plain) > 0.8  # half precision: report, not exact


def test_cuda_seeded_sampling_reproduces(path):
    target = load_model(path, dtype=torch.float32, device="cuda")
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=16)
    runs = [
        [r.token_ids for r in generate(target, PROMPTS, params, proposer=build_proposer("self:2", target))]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("overlap", [False, True])
def test_cluster_colocated_on_one_real_gpu(path, overlap):
    """Draft and target actors sharing one real GPU (gloo link), against the reference."""
    import asyncio
    import os

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster.cluster import Cluster
    from cluster.config import ClusterConfig

    params = SamplingParams(max_tokens=20)
    reference = generate(load_model(path, dtype=torch.float32, device="cuda"), PROMPTS, params)
    config = ClusterConfig(target=str(path), draft="self:2", num_draft_tokens=3, colocate=True, draft_gpus=0,
                           overlap=overlap, dtype="float32", kv_budget_tokens=2048, step_timeout_s=60,
                           cpus_per_worker=0)

    async def run(cluster):
        streams = [await cluster.generate(p, params, ignore_eos=True) for p in PROMPTS]
        return [await s.result() for s in streams]

    with Cluster.start(config) as cluster:
        assert cluster.workers.info.target_device.startswith("cuda")
        assert cluster.workers.info.draft_device.startswith("cuda")
        results = asyncio.run(run(cluster))
    assert not ray.is_initialized()
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]


def _cluster_matches_reference(path, **layout):
    """Run PROMPTS through a cluster with `layout` and compare greedy output with the reference loop."""
    import asyncio
    import os

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster.cluster import Cluster
    from cluster.config import ClusterConfig

    params = SamplingParams(max_tokens=20)
    reference = generate(load_model(path, dtype=torch.float32, device="cuda"), PROMPTS, params)
    config = ClusterConfig(target=str(path), draft="self:2", num_draft_tokens=3, dtype="float32",
                           kv_budget_tokens=2048, step_timeout_s=60, cpus_per_worker=0, **layout)

    async def run(cluster):
        streams = [await cluster.generate(p, params, ignore_eos=True) for p in PROMPTS]
        return [await s.result() for s in streams]

    with Cluster.start(config) as cluster:
        info = cluster.workers.info
        results = asyncio.run(run(cluster))
    assert not ray.is_initialized()
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    return info


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL paths)")


@needs_two_gpus
@pytest.mark.parametrize("overlap", [False, True])
def test_cluster_draft_on_its_own_gpu_over_nccl(path, overlap):
    """Draft and target on two distinct GPUs: the draft link is an NCCL group."""
    info = _cluster_matches_reference(path, target_gpus=1, draft_gpus=1, colocate=False, overlap=overlap)
    assert info.target_device.startswith("cuda") and info.draft_device.startswith("cuda")


@needs_two_gpus
def test_cluster_tensor_parallel_target_over_nccl(path):
    """A target split over two GPUs (NCCL all-reduce) with a draft colocated on rank 0's GPU."""
    _cluster_matches_reference(path, target_gpus=2, draft_gpus=0, colocate=True, overlap=True)
