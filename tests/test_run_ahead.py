"""The target worker's run-ahead (async scheduling one step deep, actors/target_worker.py).

A worker told ``run_ahead`` runs the next plain decode once its reply is out; the engine's next
call is answered from it when it is that step, and otherwise the run-ahead is undone exactly.
Checked here without Ray, against a worker that never runs ahead, on the same script of steps:
every reply's tokens are identical — greedy and seeded sampling (the undo restores the sampler),
through arrivals, frees on the step and through ``free``, a step with draft requests, and the
model's context limit — and the KV cache ends where it started. A run-ahead that fails half-way
makes the next step fail loudly instead of serving from an unknown state.
"""

import pytest
import torch

from actors.spec.types import SamplingParams
from actors.target_worker import TargetWorker
from tests.tiny_models import write_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=64)
# on a GPU the same scripts run through CUDA graphs (the device-fed input written into a graph's
# static buffer); CI has none
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="needs a CUDA device"))]


def sampled(seed):
    return SamplingParams(temperature=1.0, top_p=0.9, max_tokens=64, seed=seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ra") / "t", num_layers=2, with_tokenizer=False,
                                     max_position_embeddings=40))


# (new requests, running req_ids, draft_req_ids, free_ids) per step; between steps, ("free", ids)
# is a Ray-path free (the engine's idle flush)
SCRIPT = [
    ([(1, [5, 6, 7], GREEDY), (2, [8, 9], sampled(11))], [], [], []),
    ([], [1, 2], [], []),
    ([], [1, 2], [], []),
    ([], [1, 2], [], []),
    ([(3, [10, 11, 12, 13], sampled(12))], [1, 2], [], []),  # an arrival: the run-ahead is undone
    ([], [1, 2, 3], [], []),
    ([], [1, 2, 3], [], []),
    ([], [1, 3], [], [2]),  # request 2 finished: freed on the step, the run-ahead still serves
    ([], [1, 3], [], []),
    ([], [1, 3], [1], []),  # the engine drafts for request 1: undone
    ([], [1, 3], [], []),
    ("free", [3]),  # freed between steps: dropped from the run-ahead
    ([], [1], [], []),
    ([], [1], [], []),
    ([(4, [3] * 30, sampled(13))], [1], [], []),  # prompt 30 + 1 token: 9 steps from the context (40)
    *[([], [1, 4], [], [])] * 9,  # request 4 reaches the context: nothing runs ahead after that
]


# greedy only: run-ahead steps pipeline (the next launched from the device tokens before the read)
GREEDY_SCRIPT = [
    ([(1, [5, 6, 7], GREEDY), (2, [8, 9], GREEDY)], [], [], []),
    *[([], [1, 2], [], [])] * 3,
    ([(3, [10, 11, 12, 13], GREEDY)], [1, 2], [], []),  # an arrival: in-flight and stored steps undone
    *[([], [1, 2, 3], [], [])] * 3,
    ([], [1, 3], [], [2]),  # freed on the step: the in-flight step skips it when read
    *[([], [1, 3], [], [])] * 2,
    ("free", [3]),  # freed between steps
    *[([], [1], [], [])] * 2,
    ([], [1], [1], []),  # drafting: undone
    *[([], [1], [], [])] * 2,
    ([(4, [3] * 30, GREEDY)], [1], [], []),
    *[([], [1, 4], [], [])] * 9,  # request 4 reaches the context with a step in flight
]


def drive(worker, run_ahead: bool, script=SCRIPT) -> list[dict]:
    replies = []
    for i, entry in enumerate(script):
        if entry[0] == "free":
            worker.free(entry[1])
            continue
        new, req_ids, draft_ids, free_ids = entry
        reply = worker.step(i, new, req_ids, draft_ids, free_ids, False, run_ahead)
        replies.append(reply)
        worker.run_ahead()  # what the step channel does once the reply is sent
    return replies


@pytest.mark.parametrize("device", DEVICES)
def test_run_ahead_replies_equal_plain_steps_and_undo_is_exact(checkpoint, device):
    plain, ahead = (TargetWorker(checkpoint, kv_budget_tokens=256, device=device) for _ in range(2))
    free = plain.kv_free_tokens()
    want, got = drive(plain, False), drive(ahead, True)
    assert [r["results"] for r in got] == [r["results"] for r in want]
    used = [i for i, r in enumerate(got) if r.get("ran_ahead")]
    discarded = [i for i, r in enumerate(got) if r.get("ahead_discarded")]
    stats = ahead.run_ahead_stats()
    assert (stats["used"], stats["discarded"]) == (len(used), len(discarded))
    assert len(used) >= 10
    assert discarded == [4, 9, 13]  # the arrival, the drafting step, the next arrival
    assert 7 in used and 12 in used  # frees on the step and between steps keep the run-ahead
    assert not any(r.get("ran_ahead") for r in want) and plain.run_ahead_stats() == {"used": 0, "discarded": 0, "pipelined": 0}
    # request 4 reached the context (40 tokens) at the last step, so nothing was run ahead after it
    assert ahead.ahead.ahead is None and ahead.ahead.inflight is None
    for worker in (plain, ahead):
        worker.free([1, 4])
        assert worker.kv_free_tokens() == free and worker.num_requests() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_pipelined_greedy_run_ahead_equals_plain_steps(checkpoint, device):
    plain, ahead = (TargetWorker(checkpoint, kv_budget_tokens=256, device=device) for _ in range(2))
    free = plain.kv_free_tokens()
    want, got = drive(plain, False, GREEDY_SCRIPT), drive(ahead, True, GREEDY_SCRIPT)
    assert [r["results"] for r in got] == [r["results"] for r in want]
    stats = ahead.run_ahead_stats()
    assert [i for i, r in enumerate(got) if r.get("ahead_discarded")] == [4, 13, 16]
    assert stats["used"] >= 20 and stats["pipelined"] >= 15
    assert all(r["forward_s"] is None or r["forward_s"] >= 0 for r in got)
    assert ahead.ahead.ahead is None and ahead.ahead.inflight is None  # at the context: nothing ran ahead
    for worker in (plain, ahead):
        worker.free([1, 4])
        assert worker.kv_free_tokens() == free and worker.num_requests() == 0


def test_a_step_not_asked_to_run_ahead_launches_nothing_more(checkpoint):
    """Greedy requests pipeline: the run-ahead step is read back and the one after it is already
    launched. A step not asked to run ahead launches nothing new; the launched one is still read
    back (its work is done) and answers the next call if that is the step."""
    worker = TargetWorker(checkpoint, kv_budget_tokens=128, device="cpu")
    worker.step(0, [(1, [5, 6, 7], GREEDY)], [], [], [], False, True)
    worker.run_ahead()
    assert worker.ahead.ahead is not None and worker.ahead.inflight is not None
    assert worker.step(1, [], [1], [], [], False, False).get("ran_ahead")
    worker.run_ahead()
    assert worker.ahead.ahead is not None and worker.ahead.inflight is None
    assert worker.step(2, [], [1], [], [], False, False).get("ran_ahead")
    worker.run_ahead()
    assert worker.ahead.ahead is None
    assert worker.run_ahead_stats() == {"used": 2, "discarded": 0, "pipelined": 1}
    assert not worker.step(3, [], [1], [], [], False, False).get("ran_ahead")


def test_a_failed_run_ahead_fails_the_next_step_loudly(checkpoint):
    worker = TargetWorker(checkpoint, kv_budget_tokens=128, device="cpu")
    worker.step(0, [(1, [5, 6, 7], GREEDY)], [], [], [], False, True)

    def broken(batch):
        raise RuntimeError("device fault")

    worker.runner.forward = broken
    with pytest.raises(RuntimeError, match="device fault"):
        worker.run_ahead()
    with pytest.raises(RuntimeError, match="run-ahead step failed .*device fault"):
        worker.step(1, [], [1], [], [], False, True)
