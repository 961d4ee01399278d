"""The worker classes without Ray: the wire format of proposals and tokens, and a target worker
decoding alone (no transport) exactly like the reference loop."""

import torch

from actors.spec.reference import generate as reference_generate
from actors.spec.types import Proposal, SamplingParams
from actors.transport import (
    same_physical_gpu,
    pack_proposals,
    pack_tokens,
    unpack_proposals,
    unpack_tokens,
)
from tests.tiny_models import write_tiny_checkpoint

VOCAB = 320


def test_proposal_and_token_messages_round_trip():
    """Mixed lengths, empty proposals, with and without draft probabilities."""
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


def test_draft_link_backend_tells_gpus_apart_by_node_and_ray_gpu_id():
    """Every Ray actor calls its first GPU cuda:0, so the link's backend (gloo when shared, NCCL
    between distinct GPUs) must come from the node and Ray's GPU ids, never the device string."""
    rank0 = {"device": "cuda:0", "gpu_ids": ["0"], "node": "n1"}
    assert same_physical_gpu(rank0, {"device": "cuda:0", "gpu_ids": ["0"], "node": "n1"})  # colocated share
    assert not same_physical_gpu(rank0, {"device": "cuda:0", "gpu_ids": ["1"], "node": "n1"})  # its own GPU
    assert not same_physical_gpu(rank0, {"device": "cuda:0", "gpu_ids": ["0"], "node": "n2"})  # another node
    assert same_physical_gpu({"gpu_ids": ["0", "1"], "node": "n1"}, {"gpu_ids": ["1"], "node": "n1"})


def test_target_worker_decodes_alone_like_the_reference(tmp_path):
    from actors.model.loader import load_model
    from actors.target_worker import TargetWorker

    path = str(write_tiny_checkpoint(tmp_path / "t", num_layers=2, with_tokenizer=False))
    worker = TargetWorker(path, kv_budget_tokens=256, device="cpu")
    free = worker.kv_free_tokens()
    prompts = {5: [7, 8, 9, 10, 11], 6: [12, 13]}
    params = SamplingParams(max_tokens=8)
    out = worker.step(0, [(r, p, params) for r, p in prompts.items()], [], [], [])["results"]
    tokens = {r: list(out[r]["token_ids"]) for r in prompts}
    for step in range(1, 8):
        out = worker.step(step, [], list(prompts), [], [])["results"]
        for r in prompts:
            assert out[r]["num_proposed"] == 0
            tokens[r] += out[r]["token_ids"]
    want = reference_generate(load_model(path), list(prompts.values()), params)
    assert [tokens[r] for r in prompts] == [w.token_ids for w in want]
    assert worker.kv_free_tokens() < free
    worker.step(8, [], [], [], [5, 6])  # frees ride on the step
    assert worker.kv_free_tokens() == free and worker.num_requests() == 0


def test_draft_catch_up_length_counts_what_the_next_proposal_prefills(tmp_path):
    from actors.model.loader import load_model
    from actors.spec.proposers import DraftModelProposer, ProposeRequest, TreeShape

    path = str(write_tiny_checkpoint(tmp_path / "d", num_layers=1, with_tokenizer=False))
    model = load_model(path)
    proposer = DraftModelProposer(model, target_vocab_size=VOCAB, kv_budget_bytes=256 * model.kv_bytes_per_token)
    tokens = [5, 6, 7, 8, 9]
    assert proposer.catch_up_length(1, tokens) == 5  # unknown request: its whole prompt
    proposer.propose([ProposeRequest(1, tokens, SamplingParams())], TreeShape.chain(2))
    assert proposer.catch_up_length(1, tokens + [10, 11]) == 2  # the last token is always re-fed
    assert proposer.catch_up_length(1, [5, 6, 99, 8, 9, 10]) == 4  # diverged after two tokens


def test_workers_fuse_their_layers_when_asked(tmp_path):
    """``fused_kernels`` reaches both workers' models (compiled lazily at their first step)."""
    from actors.draft_worker import DraftWorker
    from actors.model import fused
    from actors.target_worker import TargetWorker

    path = write_tiny_checkpoint(tmp_path / "ckpt", arch="llama", num_layers=2, with_tokenizer=False)
    assert TargetWorker(str(path), fused_kernels=True).model.kernels is fused.compiled()
    assert TargetWorker(str(path)).model.kernels is fused.EAGER
    draft = DraftWorker("self:1", str(path), num_draft_tokens=2, fused_kernels=True)
    assert draft.proposer.model.kernels is fused.compiled()


def test_speculation_depth_fits_the_verify_and_chains_concatenate_with_their_probabilities():
    from actors.draft_worker import chain_concat, speculation_depth
    from actors.spec.types import Proposal

    assert speculation_depth(5, None, 0.002) == 5 and speculation_depth(5, 0.01, None) == 5  # unknown: all
    assert speculation_depth(5, 0.0095, 0.0024) == 3  # what fits in the verify
    assert speculation_depth(5, 0.1, 0.001) == 5 and speculation_depth(5, 0.001, 0.01) == 2  # at most, at least
    q1, q2 = torch.rand(2, 7), torch.rand(3, 7)
    both = chain_concat(Proposal.chain([4, 5], q1), Proposal.chain([6, 1, 2], q2))
    assert both.token_ids.tolist() == [4, 5, 6, 1, 2] and both.parents == (-1, 0, 1, 2, 3)
    assert torch.equal(both.draft_probs, torch.cat([q1, q2]))
    assert chain_concat(Proposal.chain([4]), Proposal.chain([6], q2[:1])).draft_probs is None


def test_target_reply_names_the_graphs_a_step_captured(tmp_path):
    """A step that captured CUDA graphs is no cost sample (forward_s None) and says how many it
    captured and how long they took; other steps carry neither key. The capture is simulated on
    the CPU runner (which runs eagerly) by bumping its counters as GraphRunner._capture does."""
    from actors.target_worker import TargetWorker

    path = str(write_tiny_checkpoint(tmp_path / "t", num_layers=1, with_tokenizer=False))
    worker = TargetWorker(path, kv_budget_tokens=128, device="cpu")
    params = SamplingParams(max_tokens=4)
    reply = worker.step(0, [(1, [5, 6, 7], params)], [], [], [])
    assert reply["forward_s"] is not None and "captures" not in reply

    forward = worker.runner.forward

    def capturing_forward(batch):
        worker.runner.stats["captures"] += 2
        worker.runner.stats["capture_s"] += 0.05
        return forward(batch)

    worker.runner.forward = capturing_forward
    reply = worker.step(1, [], [1], [], [])
    assert reply["forward_s"] is None
    assert reply["captures"] == 2 and abs(reply["capture_s"] - 0.05) < 1e-9
