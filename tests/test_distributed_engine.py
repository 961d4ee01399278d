"""Distributed engine on a local Ray cluster with fake GPUs and gloo (one Ray instance per module).

The draft and the target run as two Ray actors exchanging proposals and tokens over
``torch.distributed``; their output must equal the single-process reference loop's — token for
token when greedy, and exactly when sampling with the same seeds. KV capacity returns to its
starting value on both workers, and a killed worker makes ``generate`` raise instead of hang.
"""

import os
import threading
import time

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import ray
import torch

from actors.model.loader import load_model
from actors.spec.proposers import DraftModelProposer
from actors.spec.reference import generate as reference_generate
from actors.spec.types import SamplingParams
from cluster.engine import DistributedEngine, EngineError
from tests.tiny_models import write_tiny_checkpoint

VOCAB = 320
KV_TOKENS = 2048


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    target = write_tiny_checkpoint(root / "target", arch="llama", num_layers=4, with_tokenizer=False)
    draft = write_tiny_checkpoint(root / "draft", arch="llama", num_layers=2, seed=3, with_tokenizer=False)
    return str(target), str(draft)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, num_gpus=4, object_store_memory=256 * 2**20,
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def self_draft_engine(ray_local, checkpoints):
    """Target and a self:2 draft on separate (fake) GPUs, 3 draft tokens."""
    engine = DistributedEngine.start(checkpoints[0], "self:2", 3, kv_budget_tokens=KV_TOKENS, step_timeout_s=30)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def target_model(checkpoints):
    return load_model(checkpoints[0])


def prompts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 17, 9, 40)]


def reference(target_model, draft_model, params, k):
    proposer = DraftModelProposer(draft_model, target_vocab_size=VOCAB,
                                  kv_budget_bytes=KV_TOKENS * draft_model.kv_bytes_per_token)
    return reference_generate(target_model, prompts(), params, proposer=proposer, num_draft_tokens=k)


def assert_same(got, want):
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert [r.stats for r in got] == [r.stats for r in want]


def greedy_params(target_model):
    """Mixed limits: one request ends at prefill, one at a stop token found in its own output."""
    plain = reference_generate(target_model, prompts(), SamplingParams(max_tokens=20))
    stop = plain[2].token_ids[6]
    return [SamplingParams(max_tokens=20), SamplingParams(max_tokens=1),
            SamplingParams(max_tokens=20, stop_token_ids=(stop,)), SamplingParams(max_tokens=27)]


def test_greedy_self_draft_matches_reference(self_draft_engine, target_model):
    params = greedy_params(target_model)
    want = reference(target_model, target_model.truncated(2), params, k=3)
    assert want[2].finish_reason == "stop" and want[1].token_ids and len(want[1].token_ids) == 1
    got = self_draft_engine.generate(prompts(), params)
    assert_same(got, want)
    assert max(r.stats["mean_accepted_length"] for r in got) > 1.0  # speculation did accept tokens


def test_seeded_sampling_reproduces_reference(self_draft_engine, target_model):
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, max_tokens=16) for i in range(4)]
    want = reference(target_model, target_model.truncated(2), params, k=3)
    got = self_draft_engine.generate(prompts(), params)
    assert_same(got, want)
    assert got != self_draft_engine.generate(
        prompts(), [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=200 + i, max_tokens=16) for i in range(4)]
    )


def test_kv_capacity_returns_on_both_workers(self_draft_engine):
    before = self_draft_engine.kv_free_tokens()
    assert set(before) == {"target", "draft"} and all(v > 0 for v in before.values())
    self_draft_engine.generate(prompts(), SamplingParams(max_tokens=12))
    assert self_draft_engine.kv_free_tokens() == before


def test_colocated_checkpoint_draft_one_token(ray_local, checkpoints, target_model):
    engine = DistributedEngine.start(checkpoints[0], checkpoints[1], 1, target_gpus=0.5, draft_gpus=0.5,
                                     colocate=True, kv_budget_tokens=KV_TOKENS, step_timeout_s=30)
    try:
        before = engine.kv_free_tokens()
        params = greedy_params(target_model)
        want = reference(target_model, load_model(checkpoints[1]), params, k=1)
        assert_same(engine.generate(prompts(), params), want)
        assert engine.kv_free_tokens() == before
    finally:
        engine.shutdown()


def test_killed_draft_raises_instead_of_hanging(ray_local, checkpoints):
    engine = DistributedEngine.start(checkpoints[0], "self:1", 2, kv_budget_tokens=KV_TOKENS, step_timeout_s=20)
    try:
        engine.generate(prompts()[:1], SamplingParams(max_tokens=4))  # the transport works
        killer = threading.Timer(0.3, lambda: ray.kill(engine.workers["draft"], no_restart=True))
        killer.start()
        start = time.monotonic()
        with pytest.raises(EngineError, match="draft worker failed"):
            while time.monotonic() - start < 30:
                engine.generate(prompts(), SamplingParams(max_tokens=100))
        killer.join()
        assert time.monotonic() - start < 25
        with pytest.raises(EngineError, match="unusable"):
            engine.generate(prompts()[:1], SamplingParams(max_tokens=4))
    finally:
        engine.shutdown()


def test_killed_target_raises_instead_of_hanging(ray_local, checkpoints):
    engine = DistributedEngine.start(checkpoints[0], "self:1", 2, kv_budget_tokens=KV_TOKENS, step_timeout_s=20)
    try:
        killer = threading.Timer(0.3, lambda: ray.kill(engine.workers["target"], no_restart=True))
        killer.start()
        start = time.monotonic()
        with pytest.raises(EngineError, match="target worker failed"):
            while time.monotonic() - start < 30:
                engine.generate(prompts(), SamplingParams(max_tokens=100))
        killer.join()
        assert time.monotonic() - start < 25
    finally:
        engine.shutdown()


def test_target_only_matches_reference(ray_local, checkpoints, target_model):
    engine = DistributedEngine.start(checkpoints[0], "none", 0, kv_budget_tokens=KV_TOKENS, step_timeout_s=30)
    try:
        params = greedy_params(target_model)
        assert_same(engine.generate(prompts(), params), reference_generate(target_model, prompts(), params))
        assert set(engine.kv_free_tokens()) == {"target"}
    finally:
        engine.shutdown()


def test_proposal_and_token_messages_round_trip():
    """The wire format alone (no process group): mixed lengths, empty proposals, probs or not."""
    from actors.spec.types import Proposal
    from actors.transport import (
        pack_proposals,
        pack_tokens,
        unpack_proposals,
        unpack_tokens,
    )

    q = torch.softmax(torch.randn(3, VOCAB), dim=-1)
    sent = {4: Proposal.chain([5, 6, 7], q), 9: Proposal.empty(), 2: Proposal(torch.tensor([8, 9]), (-1, -1))}
    got = unpack_proposals(pack_proposals(list(sent), list(sent.values())))
    assert list(got) == list(sent)
    for req_id, proposal in sent.items():
        assert got[req_id].token_ids.tolist() == proposal.token_ids.tolist()
        assert got[req_id].parents == proposal.parents
        assert (got[req_id].draft_probs is None) == (proposal.draft_probs is None)
    assert torch.equal(got[4].draft_probs, q)
    assert unpack_tokens(pack_tokens({3: [1, 2], 7: [], 1: [9]})) == {3: [1, 2], 7: [], 1: [9]}


def test_target_worker_is_plain_python(checkpoints, target_model):
    """No Ray and no transport: the worker alone decodes like the reference (target-only)."""
    from actors.target_worker import TargetWorker

    worker = TargetWorker(checkpoints[0], kv_budget_tokens=256, device="cpu")
    free = worker.kv_free_tokens()
    prompt = prompts()[1]
    tokens = worker.add_requests([(5, prompt, SamplingParams(max_tokens=8))])[5]["token_ids"]
    for step in range(7):
        tokens += worker.verify(step, [5], [])[5]["token_ids"]
    assert tokens == reference_generate(target_model, [prompt], SamplingParams(max_tokens=8))[0].token_ids
    assert worker.kv_free_tokens() < free
    worker.free([5])
    assert worker.kv_free_tokens() == free
