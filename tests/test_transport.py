"""The draft link's wire format, over a real two-rank gloo group (two threads of this process):
every message comes back exactly — int64 bodies that fit the first frame, fill it exactly, or
spill past it; other dtypes, empty tensors, proposal and token messages — in order."""

import threading

import pytest
import torch

from actors.spec.types import Proposal
from actors.transport import FRAME, Transport, free_port, pack_proposals, pack_tokens, unpack_proposals


def _header_len(tensors) -> int:
    return 1 + sum(2 + t.dim() for t in tensors)


def _two_ranks(rank) -> list[BaseException]:
    """Run ``rank(0)`` and ``rank(1)`` on two threads; the exceptions they raised."""
    errors = []

    def guarded(r: int) -> None:
        try:
            rank(r)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def _messages() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    out = [[torch.arange(5)], [torch.zeros(0, dtype=torch.int64)], []]
    for body in (FRAME - 2, FRAME - 1, FRAME, 3 * FRAME + 7):  # around the frame's edge, and far past it
        n = body - _header_len([torch.zeros(1, dtype=torch.int64)])
        out.append([torch.randint(-2**40, 2**40, (n,), generator=gen)])
    out.append([torch.randint(0, 9, (3, 4), generator=gen), torch.randn(2, 7, generator=gen),
                torch.zeros(0, 5), torch.randn(4, generator=gen).to(torch.bfloat16),
                torch.tensor([True, False])])
    out.append(pack_proposals([4, 9], [Proposal.chain(torch.tensor([1, 2, 3])),
                                       Proposal.chain(torch.tensor([7]), torch.rand(1, 11, generator=gen))]))
    out.append(pack_tokens({4: [1, 2], 9: list(range(40 * FRAME))}))
    return out


def test_messages_cross_the_link_exactly_and_in_order():
    port, sent, got = free_port(), _messages(), []
    done = threading.Barrier(2, timeout=60)  # close only once everything arrived

    def rank(r: int) -> None:
        link = Transport("127.0.0.1", port, r, 2, "cpu", time_round_trips=True, timeout_s=60)
        if r == 1:
            for message in sent:
                link.send(message, 0)
            link.isend(sent[-1], 0)  # an asynchronous send arrives the same way
        else:
            got.extend(link.recv(1) for _ in range(len(sent) + 1))
            assert link.round_trip_s is not None and link.round_trip_s > 0
        done.wait()
        link.close()

    errors = _two_ranks(rank)
    assert not errors, errors
    assert len(got) == len(sent) + 1
    for want, have in zip(sent + [sent[-1]], got):
        assert len(want) == len(have)
        for a, b in zip(want, have):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    proposals = unpack_proposals(got[-3])
    assert proposals[4].token_ids.tolist() == [1, 2, 3] and proposals[9].draft_probs.shape == (1, 11)


def test_a_silent_peer_is_a_lost_peer():
    from actors.transport import PeerLostError

    port, links = free_port(), {}

    def rank(r: int) -> None:
        links[r] = Transport("127.0.0.1", port, r, 2, "cpu", timeout_s=30)

    errors = _two_ranks(rank)
    assert not errors, errors
    with pytest.raises(PeerLostError):
        links[0].recv(1, timeout_s=0.3)
    for link in links.values():
        link.close()
