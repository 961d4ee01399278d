"""Admission by KV capacity: reservations, FIFO without overtaking, bounded queue, clear refusals."""

import pytest

from cluster.scheduler import EngineOverloadedError, Scheduler


def make(capacity=1024, **kw):
    args = {"block_size": 16, "max_context": 512, "draft_slack_tokens": 5, "max_running": 8, "max_waiting": 4,
            "max_prefill_tokens": 256}
    return Scheduler({"target": capacity, "draft": capacity}, **{**args, **kw})


def test_reservation_rounds_to_blocks_and_caps_at_context():
    s = make()
    assert s.reservation(10, 20) == 48  # 10 + 20 + 5 = 35 -> 3 blocks
    assert s.reservation(500, 100) == 528  # capped at the context (512) + slack, rounded up


def test_admits_while_it_fits_and_releases_exactly():
    s = make(capacity=160)
    for i in range(3):
        s.add(i, 20, 40)  # 65 -> 80 tokens each
    assert s.admit() == [0, 1]
    assert s.reserved == {"target": 160, "draft": 160}
    assert s.admit() == []  # request 2 waits, nothing overtakes it
    s.release(0)
    assert s.admit() == [2]
    s.release(1), s.release(2), s.release(2)  # a second release is a no-op
    assert s.reserved == {"target": 0, "draft": 0} and not s.running


def test_prefill_budget_and_running_cap():
    s = make(max_prefill_tokens=50, max_running=2)
    s.add(0, 40, 1), s.add(1, 40, 1), s.add(2, 300, 1)
    assert s.admit() == [0]  # 40 + 40 > 50: the second waits for the next step
    assert s.admit() == [1]
    assert s.admit() == []  # two running
    s.release(0)
    assert s.admit() == [2]  # a long prompt alone is always admitted


def test_refuses_what_never_fits_and_bounds_the_queue():
    s = make(capacity=64)
    with pytest.raises(ValueError, match="KV tokens"):
        s.add(0, 100, 10)
    for i in range(4):
        s.add(i, 10, 10)
    with pytest.raises(EngineOverloadedError, match="max_waiting"):
        s.add(9, 10, 10)
    assert s.remove_waiting(2) and not s.remove_waiting(2)
