"""One communication interface, two backends, traffic counted per topology level.

* `TorchComm` wraps torch.distributed (gloo on CPU, nccl on GPU) with one process group per
  hierarchical step of the topology, created once, in the same order, on every rank.
* `SimComm` runs N ranks as N threads of one process (`SimWorld.run`) and exchanges tensors
  through shared memory. The algorithm code is the same SPMD per-rank code in both cases, so a
  dispatcher tested on SimComm at 32 ranks is the code that runs on gloo or NCCL.

Both count, for every message a rank sends, the rows and bytes per topology level the message
crosses (`Topology.link_level`), per category ('tokens' for hidden vectors, 'meta' for split
counts, gate weights and ids) and per phase ('fwd', 'bwd'). Messages to oneself are local copies
and are not traffic. Summed over ranks this is `bytes_by_level` in every run record.
"""
from __future__ import annotations

import math
import threading
import traceback
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

from .topology import Topology

__all__ = ["Comm", "CommGroup", "TrafficCounter", "TorchComm", "SimComm", "SimWorld", "CommError",
           "all_to_all_autograd"]

DEFAULT_TIMEOUT_S = 120.0


class CommError(RuntimeError):
    """A collective failed: a peer died, timed out, or called collectives in another order."""


@dataclass(frozen=True)
class CommGroup:
    """One communication step's group as seen from one rank: `kind` is 'intra' or 'inter',
    `ranks` the global ranks in group order; `handle` is the backend's group object."""

    kind: str
    level: int
    ranks: tuple[int, ...]
    handle: Any = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int) -> int:
        return self.ranks.index(rank)

    @property
    def name(self) -> str:
        return "flat" if (self.kind, self.level) == ("intra", 0) else f"{self.kind}-{self.level}"


class TrafficCounter:
    """Rows, bytes and messages sent by one rank, keyed by (category, phase, level name)."""

    def __init__(self, topology: Topology):
        self.topology = topology
        self.bytes: dict[tuple[str, str, str], int] = defaultdict(int)
        self.rows: dict[tuple[str, str, str], int] = defaultdict(int)
        self.messages: dict[tuple[str, str, str], int] = defaultdict(int)

    def add(self, src: int, dst: int, rows: int, row_bytes: int, category: str, phase: str):
        level = self.topology.link_name(src, dst)
        if level is None or rows == 0:
            return
        key = (category, phase, level)
        self.rows[key] += rows
        self.bytes[key] += rows * row_bytes
        self.messages[key] += 1

    def reset(self):
        self.bytes.clear(), self.rows.clear(), self.messages.clear()

    def by_level(self, what: str = "bytes", category: str = "tokens", phase: str | None = "fwd") -> dict[str, int]:
        """{level name: total} for one category and phase (None = all phases), every level present."""
        table = {"bytes": self.bytes, "rows": self.rows, "messages": self.messages}[what]
        out = {name: 0 for name in self.topology.level_names}
        for (cat, ph, level), v in table.items():
            if cat == category and (phase is None or ph == phase):
                out[level] += v
        return out

    def as_tensor(self) -> tuple[list[tuple[str, str, str, str]], torch.Tensor]:
        keys = sorted({("bytes",) + k for k in self.bytes} | {("rows",) + k for k in self.rows}
                      | {("messages",) + k for k in self.messages})
        tables = {"bytes": self.bytes, "rows": self.rows, "messages": self.messages}
        return keys, torch.tensor([tables[k[0]][k[1:]] for k in keys], dtype=torch.float64)

    def merge(self, other: "TrafficCounter"):
        for mine, theirs in ((self.bytes, other.bytes), (self.rows, other.rows), (self.messages, other.messages)):
            for k, v in theirs.items():
                mine[k] += v

    def to_dict(self) -> dict:
        """Nested {category: {phase: {what: {level: n}}}} for records."""
        out: dict = {}
        for what, table in (("bytes", self.bytes), ("rows", self.rows), ("messages", self.messages)):
            for (cat, ph, level), v in table.items():
                out.setdefault(cat, {}).setdefault(ph, {}).setdefault(what, {n: 0 for n in self.topology.level_names})
                out[cat][ph][what][level] += v
        return out


class Comm(ABC):
    """Per-rank view of the collectives used by every dispatcher."""

    def __init__(self, topology: Topology, rank: int):
        self.topology = topology
        self.rank = rank
        self.world_size = topology.G
        self.traffic = TrafficCounter(topology)
        self._groups: dict[tuple[str, int], CommGroup] = {}   # filled by the backend

    # ---- groups --------------------------------------------------------------------------
    def group(self, kind: str, level: int) -> CommGroup:
        """This rank's group for the Inter-level-`level` or Intra-level-`level` step."""
        try:
            return self._groups[(kind, level)]
        except KeyError:
            raise CommError(f"no {kind}-level-{level} step in topology {self.topology.name!r}; "
                            f"steps: {sorted(self._groups)}") from None

    @property
    def world(self) -> CommGroup:
        return self.group("intra", 0)

    # ---- collectives ---------------------------------------------------------------------
    def all_to_all(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                   group: CommGroup | None = None, *, category: str = "tokens", phase: str = "fwd") -> torch.Tensor:
        """Uneven all-to-all over `group` along dim 0: `send_splits[j]` rows go to the j-th
        member of the group, `recv_splits[j]` rows arrive from it. Not differentiable: use
        `all_to_all_autograd` inside models."""
        group = group or self.world
        send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
        if len(send_splits) != group.size or len(recv_splits) != group.size:
            raise CommError(f"rank {self.rank}: {len(send_splits)} send / {len(recv_splits)} recv splits "
                            f"for a group of {group.size} ranks")
        if sum(send_splits) != x.shape[0]:
            raise CommError(f"rank {self.rank}: send splits sum to {sum(send_splits)}, tensor has {x.shape[0]} rows")
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        for peer, rows in zip(group.ranks, send_splits):
            self.traffic.add(self.rank, peer, rows, row_bytes, category, phase)
        return self._all_to_all(x.contiguous(), send_splits, recv_splits, group)

    def exchange_counts(self, counts: Sequence[int], group: CommGroup | None = None, *, phase: str = "fwd") -> list[int]:
        """Each rank tells each member how many rows it will send: an all-to-all of one int per peer.
        Counted as metadata."""
        group = group or self.world
        t = torch.tensor([int(c) for c in counts], dtype=torch.int64)
        out = self.all_to_all(t, [1] * group.size, [1] * group.size, group, category="meta", phase=phase)
        return [int(v) for v in out.tolist()]

    @abstractmethod
    def _all_to_all(self, x, send_splits, recv_splits, group) -> torch.Tensor: ...

    @abstractmethod
    def all_reduce(self, x: torch.Tensor, op: str = "sum", group: CommGroup | None = None) -> torch.Tensor:
        """Returns the reduction ('sum' or 'max') of `x` over `group` (a new tensor)."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor, group: CommGroup | None = None) -> list[torch.Tensor]:
        """Returns every member's `x` (same shape on all ranks), in group order."""

    @abstractmethod
    def barrier(self, group: CommGroup | None = None): ...

    def total_traffic(self) -> TrafficCounter:
        """Traffic summed over all ranks (a collective: every rank must call it)."""
        keys, values = self.traffic.as_tensor()
        all_keys = self.all_gather_object(keys)
        union = sorted({k for ks in all_keys for k in ks})
        local = torch.zeros(len(union), dtype=torch.float64)
        index = {k: i for i, k in enumerate(union)}
        for k, v in zip(keys, values.tolist()):
            local[index[k]] = v
        total = self.all_reduce(local, "sum")
        out = TrafficCounter(self.topology)
        tables = {"bytes": out.bytes, "rows": out.rows, "messages": out.messages}
        for k, v in zip(union, total.tolist()):
            tables[k[0]][k[1:]] = int(round(v))
        return out

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def _check_op(self, op: str):
        if op not in ("sum", "max", "min"):
            raise CommError(f"all_reduce op {op!r} not supported; allowed: 'sum', 'max', 'min'")


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all: the backward is the all-to-all with swapped splits."""

    @staticmethod
    def forward(ctx, x, comm, send_splits, recv_splits, group, category):
        ctx.comm, ctx.send_splits, ctx.recv_splits, ctx.group, ctx.category = comm, send_splits, recv_splits, group, category
        return comm.all_to_all(x.detach(), send_splits, recv_splits, group, category=category, phase="fwd")

    @staticmethod
    def backward(ctx, grad):
        g = ctx.comm.all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group, category=ctx.category, phase="bwd")
        return g, None, None, None, None, None


def all_to_all_autograd(comm: Comm, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                        group: CommGroup | None = None, *, category: str = "tokens") -> torch.Tensor:
    """`comm.all_to_all` with gradients: every forward all-to-all has a backward twin of the same
    volume, counted under phase 'bwd'."""
    return _AllToAll.apply(x, comm, tuple(int(s) for s in send_splits), tuple(int(s) for s in recv_splits),
                           group or comm.world, category)


# ==========================================================================================
# torch.distributed backend
# ==========================================================================================
class TorchComm(Comm):
    """torch.distributed backend. Call after `init_process_group`; creates every step group of
    the topology (all ranks, same order), so any dispatcher can use any step."""

    def __init__(self, topology: Topology, timeout_s: float = DEFAULT_TIMEOUT_S):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise CommError("TorchComm needs torch.distributed to be initialised first (see impl.common.launcher)")
        if dist.get_world_size() != topology.G:
            raise CommError(f"world size {dist.get_world_size()} does not match topology {topology.name!r} "
                            f"(G = {topology.G}); pick a topology with {dist.get_world_size()} GPUs")
        super().__init__(topology, dist.get_rank())
        self._dist = dist
        self.backend = dist.get_backend()
        timeout = timedelta(seconds=timeout_s)
        self._handles: dict[tuple[int, ...], Any] = {tuple(range(topology.G)): dist.group.WORLD}
        for kind, level, ranks in topology.all_step_groups():
            if ranks not in self._handles:
                # every rank creates every group, in the same order (torch.distributed requirement)
                self._handles[ranks] = dist.new_group(list(ranks), timeout=timeout)
            if self.rank in ranks:
                self._groups[(kind, level)] = CommGroup(kind, level, ranks, self._handles[ranks])

    def _all_to_all(self, x, send_splits, recv_splits, group):
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        if group.size == 1:
            return x.clone()
        self._dist.all_to_all_single(out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                                     group=group.handle)
        return out

    def all_reduce(self, x, op="sum", group=None):
        self._check_op(op)
        group = group or self.world
        out = x.detach().clone()
        ops = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX, "min": self._dist.ReduceOp.MIN}
        self._dist.all_reduce(out, op=ops[op], group=group.handle)
        return out

    def all_gather(self, x, group=None):
        group = group or self.world
        outs = [torch.empty_like(x) for _ in range(group.size)]
        self._dist.all_gather(outs, x.contiguous(), group=group.handle)
        return outs

    def all_gather_object(self, obj):
        outs = [None] * self.world_size
        self._dist.all_gather_object(outs, obj)
        return outs

    def barrier(self, group=None):
        group = group or self.world
        self._dist.barrier(group=group.handle)


# ==========================================================================================
# in-process simulation backend
# ==========================================================================================
class _SimGroupState:
    def __init__(self, size: int, timeout_s: float):
        self.barrier = threading.Barrier(size, timeout=timeout_s)
        self.slots: list[Any] = [None] * size


class SimWorld:
    """N simulated ranks of one topology in one process: `SimWorld(topo).run(fn, ...)` calls
    `fn(comm, *args)` on G threads (one SimComm each) and returns the per-rank results.

    Collectives meet at per-group barriers with a timeout, so a rank that raises or calls
    collectives in a different order stops the whole run with a CommError naming the rank
    instead of hanging."""

    def __init__(self, topology: Topology, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.topology = topology
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._states: dict[tuple[int, ...], _SimGroupState] = {}
        self.comms = [SimComm(self, r) for r in range(topology.G)]

    def state(self, ranks: tuple[int, ...]) -> _SimGroupState:
        with self._lock:
            if ranks not in self._states:
                self._states[ranks] = _SimGroupState(len(ranks), self.timeout_s)
            return self._states[ranks]

    def abort(self):
        with self._lock:
            for st in self._states.values():
                st.barrier.abort()

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> list[Any]:
        results: list[Any] = [None] * self.topology.G
        errors: dict[int, BaseException] = {}

        def body(rank: int):
            try:
                results[rank] = fn(self.comms[rank], *args, **kwargs)
            except threading.BrokenBarrierError as e:
                errors.setdefault(rank, e)
                self.abort()
            except BaseException as e:  # noqa: BLE001 - reported with the rank below
                e.__sim_traceback__ = traceback.format_exc()
                errors[rank] = e
                self.abort()

        threads = [threading.Thread(target=body, args=(r,), name=f"sim-rank-{r}", daemon=True)
                   for r in range(self.topology.G)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self._lock:
            self._states.clear()  # a fresh set of barriers for the next run
        if errors:
            primary = {r: e for r, e in errors.items() if not isinstance(e, threading.BrokenBarrierError)}
            if primary:
                rank, err = min(primary.items())
                raise CommError(f"simulated rank {rank} failed: {type(err).__name__}: {err}\n"
                                f"{getattr(err, '__sim_traceback__', '')}") from err
            raise CommError(f"simulated collectives timed out after {self.timeout_s:.0f} s "
                            f"(ranks {sorted(errors)} waiting): ranks called collectives in different orders")
        return results

    def total_traffic(self) -> TrafficCounter:
        out = TrafficCounter(self.topology)
        for c in self.comms:
            out.merge(c.traffic)
        return out

    def reset_traffic(self):
        for c in self.comms:
            c.traffic.reset()


class SimComm(Comm):
    """One simulated rank of a SimWorld."""

    backend = "sim"

    def __init__(self, world: SimWorld, rank: int):
        super().__init__(world.topology, rank)
        self._world = world
        topo = world.topology
        self._groups = {(kind, level): CommGroup(kind, level, ranks)
                        for kind, level, ranks in topo.all_step_groups() if rank in ranks}

    def _exchange(self, group: CommGroup, payload: Any) -> list[Any]:
        st = self._world.state(group.ranks)
        st.slots[group.index(self.rank)] = payload
        st.barrier.wait()
        out = list(st.slots)
        st.barrier.wait()  # nobody overwrites a slot before every member has read them all
        return out

    def _all_to_all(self, x, send_splits, recv_splits, group):
        chunks = self._exchange(group, (list(x.split(send_splits)), send_splits))
        me = group.index(self.rank)
        pieces = []
        for j, (their_chunks, their_splits) in enumerate(chunks):
            if their_splits[me] != recv_splits[j]:
                raise CommError(f"rank {self.rank}: expects {recv_splits[j]} rows from rank {group.ranks[j]}, "
                                f"which sends {their_splits[me]}")
            pieces.append(their_chunks[me])
        if not pieces:
            return x.new_empty((0,) + tuple(x.shape[1:]))
        return torch.cat(pieces, dim=0)

    def all_reduce(self, x, op="sum", group=None):
        self._check_op(op)
        vals = self._exchange(group or self.world, x.detach().clone())
        stacked = torch.stack(vals)
        return {"sum": stacked.sum(0), "max": stacked.max(0).values, "min": stacked.min(0).values}[op]

    def all_gather(self, x, group=None):
        return [v.clone() for v in self._exchange(group or self.world, x.detach())]

    def all_gather_object(self, obj):
        return self._exchange(self.world, obj)

    def barrier(self, group=None):
        self._exchange(group or self.world, None)
