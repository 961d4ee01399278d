"""Point-to-point tensor channel between Ray actors over ``torch.distributed`` (data plane).

The control plane picks a free TCP port on the rank-0 host and tells every actor
``init_transport(addr, port, rank, world_size)``; the actors then form two process groups over one
store, one per direction ("down": to higher ranks, also the TP collectives; "up": to lower ranks),
and exchange a handshake token so NCCL's pair communicators exist before any step (NCCL when
every rank has its own GPU, gloo otherwise — CPU tests, or draft and target sharing one GPU,
where NCCL refuses two ranks on one device). Rank 0 is the target, rank 1 the draft.

Groups are explicit ``ProcessGroup`` objects (``make_process_group``), never the process-wide
default group: one process can be in several groups at once (the draft link and a target
tensor-parallel group), and a group whose peer died is simply dropped and a new one formed on a
fresh port when the peer is back (``torch.distributed`` cannot re-admit a rank to a group).

Wire format of one message (a list of tensors), all sends in this order:

    frame   int64 [FRAME]      body length n, then the body's first FRAME - 1 entries
    rest    int64 [n - FRAME + 1]  only when the body does not fit in the frame
    data    one send per non-int64 tensor with at least one element

The body is the header (num_tensors, then per tensor: dtype code, ndim, *shape) followed by every
int64 tensor's values; empty tensors are rebuilt from the header. A greedy step's messages (token
ids, parents, request ids of up to ~20 requests) fit in the frame: one send, one receive. Each
send is a round of the backend's protocol (~80 µs for gloo on a 2-core CPU), so the fixed
2 KB frame costs less than a second send would.

Invariants:
* messages between a pair of ranks are received in the order they were sent, so every sender
  and receiver pair must agree on the message sequence (the control plane keeps the count);
* tensors travel only here, never in Ray control messages; received tensors live on this
  transport's device;
* ``isend`` keeps the tensors of an asynchronous message alive until the receiver has them;
* every receive has a deadline: a dead or silent peer raises ``PeerLostError`` instead of hanging.

Two message kinds are defined on top: *proposals* (draft -> target: per request the draft token
ids, parent indices and optional draft probabilities) and *tokens* (target -> draft: per request
the tokens the target emitted in a step, so the draft stays in sync with the accepted output).
"""

from __future__ import annotations

import os
import math
import time
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.spec.types import Proposal

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


ROUND_TRIPS = 16  # timed at connect on a two-rank link
FRAME = 256  # int64 entries of a message's first send (2 KB)


class PeerLostError(RuntimeError):
    """The peer of a transport died or did not send within the deadline; the group is unusable."""


def make_process_group(addr: str, port: int, rank: int, world_size: int, backend: str,
                       device: torch.device, timeout_s: float = 120.0, *, store=None, prefix: str | None = None):
    """A new, unregistered process group. Rank 0 hosts its TCP store on ``addr:port``, unless a
    ``store`` is given; ``prefix`` puts the group's keys apart so several groups share one store."""
    if addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(addr, port, world_size, rank == 0, timeout=timeout)
    if prefix is not None:
        store = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"unknown backend {backend!r} (gloo or nccl)")


def node_address() -> str:
    """This node's address as Ray knows it (127.0.0.1 outside Ray)."""
    try:
        import ray
    except ImportError:
        return "127.0.0.1"
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` now (the process group's store binds it right after)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


def assigned_gpu_ids() -> list[str]:
    """The GPU ids Ray gave this process (fake ones on a CPU machine); [] outside Ray."""
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except ImportError:
        return []


def node_id() -> str | None:
    """This process's Ray node id (None outside Ray): with ``assigned_gpu_ids`` it names a physical GPU."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


def same_physical_gpu(a: dict, b: dict) -> bool:
    """Whether two workers' ``info()`` describe the same GPU. Device strings cannot tell: Ray sets
    CUDA_VISIBLE_DEVICES per actor, so every worker calls its first GPU ``cuda:0``."""
    return a.get("node") == b.get("node") and bool(set(a.get("gpu_ids", ())) & set(b.get("gpu_ids", ())))


def pick_device() -> torch.device:
    """``cuda`` when Ray assigned this process a GPU and CUDA exists, else ``cpu`` (fake GPUs)."""
    try:
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except ImportError:
        gpu_ids = []
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Transport:
    """One rank of a process group, sending and receiving whole messages (lists of tensors)."""

    def __init__(
        self,
        addr: str,
        port: int,
        rank: int,
        world_size: int,
        device: torch.device | str,
        *,
        backend: str | None = None,
        timeout_s: float = 120.0,
        time_round_trips: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self.timeout_s = timeout_s
        # one group per direction over one store: ``group`` carries messages to higher ranks (and the
        # tensor-parallel collectives), ``group_up`` messages to lower ranks. NCCL runs a pair's sends
        # and receives in order on one stream, so a target sending tokens while its draft sends a
        # proposal could each wait for the other's receive; one direction per group cannot.
        store = dist.TCPStore(addr, port, world_size, rank == 0, timeout=timedelta(seconds=timeout_s))
        self.group = make_process_group(addr, port, rank, world_size, self.backend, self.device, timeout_s,
                                        store=store, prefix="down")
        self.group_up = make_process_group(addr, port, rank, world_size, self.backend, self.device, timeout_s,
                                           store=store, prefix="up")
        # gloo moves CPU tensors; NCCL moves tensors on this rank's GPU
        self._wire_device = torch.device("cpu") if self.backend == "gloo" else self.device
        self._inflight: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
        self._handshake()
        # the draft link also times a step's message round trip: the transfer cost per step of a
        # multi-GPU layout, measured where it runs (rank 0 keeps the figure; both ranks must ask)
        self.round_trip_s = self._time_round_trips() if time_round_trips and world_size == 2 else None

    def _time_round_trips(self, rounds: int = ROUND_TRIPS) -> float | None:
        """Median seconds for one proposal-sized message there and back (rank 0; rank 1 echoes)."""
        peer = 1 - self.rank
        message = [torch.zeros(1, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64),
                   torch.zeros(0, 0)]  # what pack_proposals gives for one request drafting 4 tokens
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            if self.rank == 0:
                self.send(message, peer)
                self.recv(peer)
            else:
                self.send(self.recv(peer), peer)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] if self.rank == 0 else None

    def _group_for(self, peer: int):
        """The group a message between this rank and ``peer`` travels on (by its direction)."""
        group = self.group if peer > self.rank else self.group_up
        if group is None:
            raise PeerLostError("the transport is closed")
        return group

    def _group_from(self, peer: int):
        return self.group if peer < self.rank else self.group_up

    def _handshake(self) -> None:
        """One token each way between rank 0 and every other rank, while every rank is in its
        constructor. NCCL forms a pair's communicator at the pair's first send or receive, and both
        ranks must be there: formed lazily, the target's first token message would block until the
        draft's next step call — which the engine makes only after the target has answered.
        Fixed order (every "down" pair, then every "up" pair) so no rank waits on a later one."""
        peers = range(1, self.world_size) if self.rank == 0 else [0]
        deadline = time.monotonic() + self.timeout_s
        for direction_down in (True, False):
            for peer in peers:
                sending = (self.rank < peer) == direction_down
                token = torch.ones(1, dtype=torch.int64, device=self._wire_device)
                try:
                    if sending:
                        self._group_for(peer).send([token], peer, 0).wait()
                    else:
                        self._recv_into(token, peer, deadline)
                except RuntimeError as exc:
                    raise PeerLostError(f"handshake with rank {peer} failed: {str(exc).splitlines()[0][:300]}") \
                        from exc
        if self._wire_device.type == "cuda":
            torch.cuda.current_stream(self._wire_device).synchronize()

    # ----------------------------------------------------------------- messages
    def send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        works, _keep = self._post(tensors, dst)
        try:
            for work in works:
                work.wait()
        except RuntimeError as exc:
            raise PeerLostError(f"send to rank {dst} failed: {str(exc).splitlines()[0][:300]}") from exc

    def isend(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        """Send without waiting for the receiver; the buffers stay referenced until delivered."""
        # messages to one peer complete in order: drop delivered ones from the front, stop at the first
        # still in flight (checking every message each time cost a third of a step with a lagging draft)
        inflight = self._inflight
        done = 0
        while done < len(inflight) and all(x.is_completed() for x in inflight[done][0]):
            done += 1
        if done:
            del inflight[:done]
        inflight.append(self._post(tensors, dst))

    def recv(self, src: int, timeout_s: float | None = None) -> list[torch.Tensor]:
        """One whole message from ``src``; ``PeerLostError`` if it does not come within the deadline."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        frame = torch.empty(FRAME, dtype=torch.int64, device=self._wire_device)
        self._recv_into(frame, src, deadline)
        n = int(frame[0].item())
        body = frame[1 : 1 + n]
        if n > FRAME - 1:
            rest = torch.empty(n - (FRAME - 1), dtype=torch.int64, device=self._wire_device)
            self._recv_into(rest, src, deadline)
            body = torch.cat([body, rest])
        fields = body.tolist()
        specs, pos = [], 1
        for _ in range(fields[0]):
            dtype, ndim = _DTYPES[fields[pos]], fields[pos + 1]
            specs.append((dtype, fields[pos + 2 : pos + 2 + ndim]))
            pos += 2 + ndim
        out = []
        for dtype, shape in specs:  # int64 tensors ride in the body after the header, the rest follow
            if dtype == torch.int64:
                numel = math.prod(shape)
                tensor = body[pos : pos + numel].reshape(shape)
                pos += numel
            else:
                tensor = torch.empty(shape, dtype=dtype, device=self._wire_device)
                if tensor.numel():
                    self._recv_into(tensor, src, deadline)
            out.append(tensor.to(self.device))
        return out

    def close(self) -> None:
        """Leave the group (undelivered ``isend`` messages are dropped)."""
        self._inflight = []
        groups = (self.group, self.group_up)
        self.group = self.group_up = None
        for group in groups:
            if group is not None and self.backend == "nccl" and hasattr(group, "abort"):
                try:
                    group.abort()
                except Exception:  # noqa: BLE001 - a broken communicator may refuse; it is dropped anyway
                    pass

    def _recv_into(self, tensor: torch.Tensor, src: int, deadline: float) -> None:
        group = self._group_from(src)
        if group is None:
            raise PeerLostError("the transport is closed")
        try:
            work = group.recv([tensor], src, 0)
            if self.backend == "gloo":
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
            else:  # NCCL completes on the GPU; poll so a dead peer cannot block the host forever
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise PeerLostError(f"no message from rank {src} within {self.timeout_s:.0f} s")
                    time.sleep(0)
                work.wait()
        except PeerLostError:
            raise
        except RuntimeError as exc:
            raise PeerLostError(f"receive from rank {src} failed: {str(exc).splitlines()[0][:300]}") from exc

    # ----------------------------------------------------------------- helpers
    def _to_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self._wire_device).contiguous()

    def _post(self, tensors: Sequence[torch.Tensor], dst: int) -> tuple[list[dist.Work], list[torch.Tensor]]:
        """Post every send of one message; returns the works and the buffers they read.

        A message is one int64 body — the header (tensor count, then dtype code, ndim and shape of
        each tensor) followed by every int64 tensor's values — sent in a fixed frame with its length
        (and the rest of a body too long for it after), then each other tensor on its own: a greedy
        step's token and proposal messages take one send."""
        wire = [self._to_wire(t) for t in tensors]
        fields = [len(wire)]
        for t in wire:
            fields += [_CODE[t.dtype], t.dim(), *t.shape]
        header = torch.tensor(fields, dtype=torch.int64, device=self._wire_device)
        inline = [t.reshape(-1) for t in wire if t.dtype == torch.int64]
        body = torch.cat([header, *inline]) if inline else header
        n = body.numel()
        frame = torch.zeros(FRAME, dtype=torch.int64, device=self._wire_device)
        frame[0] = n
        frame[1 : 1 + min(n, FRAME - 1)] = body[: FRAME - 1]
        buffers = [frame] + ([body[FRAME - 1 :].contiguous()] if n > FRAME - 1 else [])
        buffers += [t for t in wire if t.dtype != torch.int64 and t.numel()]
        group = self._group_for(dst)
        try:
            return [group.send([t], dst, 0) for t in buffers], buffers
        except RuntimeError as exc:
            raise PeerLostError(f"send to rank {dst} failed: {str(exc).splitlines()[0][:300]}") from exc


# --------------------------------------------------------------------- message kinds
def pack_proposals(req_ids: Sequence[int], proposals: Sequence[Proposal]) -> list[torch.Tensor]:
    """Proposals of one step -> [meta [B, 3] (req_id, n, has_probs), ids_parents [2, N], probs [M, V]].

    ``probs`` stacks the draft probabilities of the proposals that have them (M rows, in order).
    """
    meta = torch.tensor(
        [[int(r), len(p), int(p.draft_probs is not None)] for r, p in zip(req_ids, proposals)], dtype=torch.int64
    ).reshape(-1, 3)
    ids = [p.token_ids.reshape(-1).long().cpu() for p in proposals]
    parents = [torch.tensor(p.parents, dtype=torch.int64) for p in proposals]
    ids_parents = torch.stack([torch.cat(ids or [torch.zeros(0, dtype=torch.int64)]),
                               torch.cat(parents or [torch.zeros(0, dtype=torch.int64)])])  # [2, N]
    with_probs = [p.draft_probs for p in proposals if p.draft_probs is not None]
    probs = torch.cat(with_probs) if with_probs else torch.zeros(0, 0)  # [M, V]
    return [meta, ids_parents, probs]


def unpack_proposals(tensors: Sequence[torch.Tensor]) -> dict[int, Proposal]:
    meta, ids_parents, probs = tensors
    ids_parents = ids_parents.cpu()  # one device->host copy; tokens and parents are read on the host
    out, start, row = {}, 0, 0
    for req_id, n, has_probs in meta.tolist():
        q = probs[row : row + n] if has_probs else None
        row += n if has_probs else 0
        out[req_id] = Proposal(ids_parents[0, start : start + n], tuple(ids_parents[1, start : start + n].tolist()), q)
        start += n
    return out


def pack_tokens(emitted: dict[int, Sequence[int]]) -> list[torch.Tensor]:
    """Tokens emitted per request -> [meta [B, 2] (req_id, n), token_ids [N]]."""
    meta = torch.tensor([[int(r), len(t)] for r, t in emitted.items()], dtype=torch.int64).reshape(-1, 2)
    flat = [int(x) for t in emitted.values() for x in t]
    return [meta, torch.tensor(flat, dtype=torch.int64)]


def unpack_tokens(tensors: Sequence[torch.Tensor]) -> dict[int, list[int]]:
    meta, flat = tensors
    flat_list, out, start = flat.tolist(), {}, 0
    for req_id, n in meta.tolist():
        out[req_id] = flat_list[start : start + n]
        start += n
    return out
