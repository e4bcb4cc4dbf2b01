"""One communication interface, two backends, traffic counted per topology level.

* `TorchComm` wraps torch.distributed (gloo on CPU, nccl on GPU) with one process group per
  hierarchical step of the topology, created once, in the same order, on every rank.
* `SimComm` runs N ranks as N threads of one process (`SimWorld.run`) and exchanges tensors
  through shared memory. The algorithm code is the same SPMD per-rank code in both cases, so a
  dispatcher tested on SimComm at 32 ranks is the code that runs on gloo or NCCL.

Collectives: uneven AlltoAll, AllReduce, AllGather (a list, or concatenated along dim 0),
ReduceScatter (equal chunks along dim 0), each with an asynchronous twin returning a `Handle`
whose `wait()` gives the result, and autograd twins for the ones models differentiate through
(AlltoAll <-> AlltoAll, AllGather <-> ReduceScatter).

Both backends count, for every message a rank sends, the rows and bytes per topology level the
message crosses (`Topology.link_level`), per collective kind ('a2a', 'ag', 'rs', 'ar'), category
('tokens' for hidden vectors, 'meta' for split counts, gate weights, ids and decisions, 'grads'
for gradient reductions, ...) and phase ('fwd', 'bwd'). A collective is counted as the messages of
its point-to-point equivalent: AllGather sends a rank's block to every other member;
ReduceScatter sends block j to member j; AllReduce counts as ReduceScatter then AllGather of the
equal chunks (the ring / Rabenseifner volume, 2 (P-1)/P of the tensor per rank). Messages to
oneself are local copies and are not traffic. Summed over ranks this is `bytes_by_level` in every
run record.

Lanes: `comm.lane(name)` is a view of the same rank with its own process group per step, created
by every rank in the same order, so collectives issued concurrently from several threads (one per
lane, FSMoE's executor) never share a gloo group. `comm.device` is where the backend wants
tensors (metadata included): CUDA under NCCL, else CPU.
"""
from __future__ import annotations

import math
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

from .config import DEFAULT_TIMEOUT_S
from .topology import Topology

__all__ = ["Comm", "CommGroup", "TrafficCounter", "TorchComm", "SimComm", "SimWorld", "CommError", "Handle",
           "COLLECTIVE_KINDS", "all_to_all_autograd", "all_gather_autograd", "reduce_scatter_autograd"]

COLLECTIVE_KINDS = ("a2a", "ag", "rs", "ar")


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
    """Rows, bytes and messages sent by one rank, keyed by (collective kind, category, phase,
    level name). Thread-safe: lanes of one rank add from several threads."""

    def __init__(self, topology: Topology):
        self.topology = topology
        self.bytes: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self.rows: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self.messages: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, src: int, dst: int, rows: int, row_bytes: int, category: str, phase: str, kind: str = "a2a"):
        level = self.topology.link_name(src, dst)
        if level is None or rows == 0:
            return
        key = (kind, category, phase, level)
        with self._lock:
            self.rows[key] += rows
            self.bytes[key] += rows * row_bytes
            self.messages[key] += 1

    def reset(self):
        with self._lock:
            self.bytes.clear(), self.rows.clear(), self.messages.clear()

    def by_level(self, what: str = "bytes", category: str | None = "tokens", phase: str | None = "fwd",
                 kind: str | None = None) -> dict[str, int]:
        """{level name: total} for one category, phase and collective kind (None = all), every
        level present."""
        table = {"bytes": self.bytes, "rows": self.rows, "messages": self.messages}[what]
        out = {name: 0 for name in self.topology.level_names}
        for (kd, cat, ph, level), v in table.items():
            if (category is None or cat == category) and (phase is None or ph == phase) and (kind is None or kd == kind):
                out[level] += v
        return out

    def as_tensor(self) -> tuple[list[tuple[str, ...]], torch.Tensor]:
        tables = {"bytes": self.bytes, "rows": self.rows, "messages": self.messages}
        keys = sorted({(what,) + k for what, table in tables.items() for k in table})
        return keys, torch.tensor([tables[k[0]][k[1:]] for k in keys], dtype=torch.float64)

    def merge(self, other: "TrafficCounter"):
        with self._lock:
            for mine, theirs in ((self.bytes, other.bytes), (self.rows, other.rows), (self.messages, other.messages)):
                for k, v in theirs.items():
                    mine[k] += v

    def to_dict(self, kind: str | None = None) -> dict:
        """Nested {category: {phase: {what: {level: n}}}} for records, over the collectives of
        one kind (None = all kinds)."""
        out: dict = {}
        for what, table in (("bytes", self.bytes), ("rows", self.rows), ("messages", self.messages)):
            for (kd, cat, ph, level), v in table.items():
                if kind is not None and kd != kind:
                    continue
                out.setdefault(cat, {}).setdefault(ph, {}).setdefault(what, {n: 0 for n in self.topology.level_names})
                out[cat][ph][what][level] += v
        return out


class Handle:
    """An asynchronous collective in flight: `wait()` blocks until it completes and returns its
    result (the same object every time)."""

    def __init__(self, wait_fn: Callable[[], Any]):
        self._wait_fn, self._done, self._value = wait_fn, False, None

    def wait(self) -> Any:
        if not self._done:
            self._value, self._done = self._wait_fn(), True
        return self._value


def _chunk_rows(n: int, parts: int) -> list[int]:
    """Rows of each of `parts` near-equal chunks of `n` rows (torch.tensor_split's sizes)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class Comm(ABC):
    """Per-rank view of the collectives used by every dispatcher."""

    device = torch.device("cpu")
    lane_name: str | None = None

    def __init__(self, topology: Topology, rank: int):
        self.topology = topology
        self.rank = rank
        self.world_size = topology.G
        self.traffic = TrafficCounter(topology)
        self._groups: dict[tuple[str, int], CommGroup] = {}   # filled by the backend
        self._lanes: dict[str, "Comm"] = {}

    # ---- lanes ---------------------------------------------------------------------------
    def lane(self, name: str) -> "Comm":
        """This rank with its own process group per step for lane `name` (FSMoE's 'inter' and
        'intra' lanes), sharing this comm's traffic counter. The backend creates lane groups on
        first use; with torch.distributed that is a collective: every rank asks for the same
        lanes in the same order (`TorchComm(..., lanes=...)` creates them up front)."""
        if not isinstance(name, str) or not name:
            raise CommError(f"lane name must be a non-empty string, got {name!r}")
        if self.lane_name is not None:
            raise CommError(f"comm is already lane {self.lane_name!r}; ask the rank's main comm for lanes")
        if name not in self._lanes:
            self._lanes[name] = self._make_lane(name)
        return self._lanes[name]

    @abstractmethod
    def _make_lane(self, name: str) -> "Comm": ...

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

    def _own(self, group: CommGroup | None) -> CommGroup:
        """This comm's group for the same step: a group taken from another lane of this rank
        names the same ranks but another process group, which must not be used from here."""
        if group is None:
            return self.world
        return self._groups.get((group.kind, group.level), group)

    # ---- collectives ---------------------------------------------------------------------
    def all_to_all(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                   group: CommGroup | None = None, *, category: str = "tokens", phase: str = "fwd") -> torch.Tensor:
        """Uneven all-to-all over `group` along dim 0: `send_splits[j]` rows go to the j-th
        member of the group, `recv_splits[j]` rows arrive from it. Not differentiable: use
        `all_to_all_autograd` inside models."""
        group = self._own(group)
        send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
        self._check_splits(x, send_splits, recv_splits, group)
        self._count_all_to_all(x, send_splits, group, category, phase)
        return self._all_to_all(x.contiguous(), send_splits, recv_splits, group)

    def _check_splits(self, x, send_splits, recv_splits, group):
        if len(send_splits) != group.size or len(recv_splits) != group.size:
            raise CommError(f"rank {self.rank}: {len(send_splits)} send / {len(recv_splits)} recv splits "
                            f"for a group of {group.size} ranks")
        if sum(send_splits) != x.shape[0]:
            raise CommError(f"rank {self.rank}: send splits sum to {sum(send_splits)}, tensor has {x.shape[0]} rows")

    def _count_all_to_all(self, x, send_splits, group, category, phase):
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        for peer, rows in zip(group.ranks, send_splits):
            self.traffic.add(self.rank, peer, rows, row_bytes, category, phase, "a2a")

    def exchange_counts(self, counts: Sequence[int], group: CommGroup | None = None, *, phase: str = "fwd") -> list[int]:
        """Each rank tells each member how many rows it will send: an all-to-all of one int per peer.
        Counted as metadata."""
        n = self._own(group).size
        t = torch.tensor([int(c) for c in counts], dtype=torch.int64)
        return self.all_to_all_on_host(t, [1] * n, [1] * n, group, category="meta", phase=phase).tolist()

    def all_to_all_async(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                         group: CommGroup | None = None, *, category: str = "tokens", phase: str = "fwd") -> Handle:
        """`all_to_all` started now, finished by `handle.wait()`."""
        group = self._own(group)
        send_splits, recv_splits = [int(s) for s in send_splits], [int(s) for s in recv_splits]
        self._check_splits(x, send_splits, recv_splits, group)
        self._count_all_to_all(x, send_splits, group, category, phase)
        return self._start(lambda: self._all_to_all(x.contiguous(), send_splits, recv_splits, group),
                           "a2a", x.contiguous(), group, send_splits=send_splits, recv_splits=recv_splits)

    # ---- AllGather / ReduceScatter / AllReduce ---------------------------------------------
    def all_gather_cat(self, x: torch.Tensor, group: CommGroup | None = None, *, category: str = "tokens",
                       phase: str = "fwd") -> torch.Tensor:
        """Every member's `x` (same shape on all ranks) concatenated along dim 0, in group order."""
        return self.all_gather_cat_async(x, group, category=category, phase=phase).wait()

    def all_gather_cat_async(self, x: torch.Tensor, group: CommGroup | None = None, *, category: str = "tokens",
                             phase: str = "fwd") -> Handle:
        group = self._own(group)
        x = x.contiguous()
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        for peer in group.ranks:
            self.traffic.add(self.rank, peer, x.shape[0], row_bytes, category, phase, "ag")
        return self._start(lambda: self._all_gather_cat(x, group) if group.size > 1 else x.clone(), "ag", x, group)

    def reduce_scatter(self, x: torch.Tensor, group: CommGroup | None = None, *, category: str = "tokens",
                       phase: str = "fwd") -> torch.Tensor:
        """Sum over the group of `x` (same shape on all ranks, rows divisible by the group size),
        and of that sum this member's block of rows: block j goes to the j-th member."""
        return self.reduce_scatter_async(x, group, category=category, phase=phase).wait()

    def reduce_scatter_async(self, x: torch.Tensor, group: CommGroup | None = None, *, category: str = "tokens",
                             phase: str = "fwd") -> Handle:
        group = self._own(group)
        if x.dim() == 0 or x.shape[0] % group.size:
            raise CommError(f"rank {self.rank}: reduce_scatter needs rows divisible by the group size "
                            f"{group.size}; got shape {tuple(x.shape)}")
        x = x.contiguous()
        block = x.shape[0] // group.size
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        for peer in group.ranks:
            self.traffic.add(self.rank, peer, block, row_bytes, category, phase, "rs")
        return self._start(lambda: self._reduce_scatter(x, group) if group.size > 1 else x.clone(), "rs", x, group)

    def all_reduce(self, x: torch.Tensor, op: str = "sum", group: CommGroup | None = None, *,
                   category: str = "meta", phase: str = "fwd") -> torch.Tensor:
        """The reduction ('sum', 'max' or 'min') of `x` over `group`, as a new tensor."""
        return self.all_reduce_async(x, op, group, category=category, phase=phase).wait()

    def reduce_on_host(self, x: torch.Tensor, op: str = "sum", group: CommGroup | None = None, *,
                       category: str = "meta", phase: str = "fwd") -> torch.Tensor:
        """`all_reduce` of a small table the host reads (counts, statistics, a decision's scalars),
        wherever `x` lives: sent from `self.device` (the backend's: NCCL takes CUDA tensors only)
        and returned on the CPU."""
        return self.all_reduce(x.to(self.device), op, group, category=category, phase=phase).cpu()

    def gather_on_host(self, x: torch.Tensor, group: CommGroup | None = None, *, category: str = "meta",
                       phase: str = "fwd") -> torch.Tensor:
        """`all_gather` of a small row the host reads, wherever `x` lives: sent from `self.device`,
        returned stacked in group order ([members, *x.shape]) on the CPU."""
        return torch.stack(self.all_gather(x.to(self.device), group, category=category, phase=phase)).cpu()

    def all_to_all_on_host(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                           group: CommGroup | None = None, *, category: str = "meta", phase: str = "fwd") -> torch.Tensor:
        """`all_to_all` of a small table the host reads (split counts, a notify), wherever `x` lives:
        sent from `self.device` and returned on the CPU, the rows of each member in group order."""
        return self.all_to_all(x.to(self.device), send_splits, recv_splits, group, category=category,
                               phase=phase).cpu()

    def all_reduce_async(self, x: torch.Tensor, op: str = "sum", group: CommGroup | None = None, *,
                         category: str = "meta", phase: str = "fwd") -> Handle:
        self._check_op(op)
        group = self._own(group)
        x = x.detach()
        flat = max(x.numel(), 1)
        chunks = _chunk_rows(x.numel(), group.size)
        for peer, rows in zip(group.ranks, chunks):       # reduce-scatter of the chunks, then all-gather
            self.traffic.add(self.rank, peer, rows, x.element_size(), category, phase, "ar")
        me = chunks[group.index(self.rank)] if flat else 0
        for peer in group.ranks:
            self.traffic.add(self.rank, peer, me, x.element_size(), category, phase, "ar")
        return self._start(lambda: self._all_reduce(x, op, group), "ar", x, group, op=op)

    def all_gather(self, x: torch.Tensor, group: CommGroup | None = None, *, category: str = "meta",
                   phase: str = "fwd") -> list[torch.Tensor]:
        """Every member's `x` (same shape on all ranks), as a list in group order."""
        group = self._own(group)
        one_row = x.detach().reshape((1,) + tuple(x.shape)).contiguous()
        row_bytes = x.numel() * x.element_size()
        for peer in group.ranks:
            self.traffic.add(self.rank, peer, 1, row_bytes, category, phase, "ag")
        return list(self._all_gather_cat(one_row, group).unbind(0))

    # ---- backend primitives (uncounted) --------------------------------------------------
    @abstractmethod
    def _all_to_all(self, x, send_splits, recv_splits, group) -> torch.Tensor: ...

    @abstractmethod
    def _all_reduce(self, x: torch.Tensor, op: str, group: CommGroup) -> torch.Tensor: ...

    @abstractmethod
    def _all_gather_cat(self, x: torch.Tensor, group: CommGroup) -> torch.Tensor: ...

    @abstractmethod
    def _reduce_scatter(self, x: torch.Tensor, group: CommGroup) -> torch.Tensor: ...

    @abstractmethod
    def _start(self, run: Callable[[], torch.Tensor], kind: str, x: torch.Tensor, group: CommGroup,
               **args) -> Handle:
        """Start one collective asynchronously: `run()` is its blocking form."""

    @abstractmethod
    def barrier(self, group: CommGroup | None = None): ...

    def total_traffic(self) -> TrafficCounter:
        """Traffic summed over all ranks (a collective: every rank must call it; not counted)."""
        keys, values = self.traffic.as_tensor()
        all_keys = self.all_gather_object(keys)
        union = sorted({k for ks in all_keys for k in ks})
        local = torch.zeros(len(union), dtype=torch.float64, device=self.device)
        index = {k: i for i, k in enumerate(union)}
        for k, v in zip(keys, values.tolist()):
            local[index[k]] = v
        total = self._all_reduce(local, "sum", self.world).cpu()
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


class _AllGather(torch.autograd.Function):
    """Concatenating AllGather; its backward is the ReduceScatter of the gradient."""

    @staticmethod
    def forward(ctx, x, comm, group, category):
        ctx.comm, ctx.group, ctx.category = comm, group, category
        return comm.all_gather_cat(x.detach(), group, category=category, phase="fwd")

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad, ctx.group, category=ctx.category, phase="bwd"), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """ReduceScatter; its backward is the concatenating AllGather of the gradient."""

    @staticmethod
    def forward(ctx, x, comm, group, category):
        ctx.comm, ctx.group, ctx.category = comm, group, category
        return comm.reduce_scatter(x.detach(), group, category=category, phase="fwd")

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather_cat(grad, ctx.group, category=ctx.category, phase="bwd"), None, None, None


def all_gather_autograd(comm: Comm, x: torch.Tensor, group: CommGroup | None = None, *,
                        category: str = "tokens") -> torch.Tensor:
    """`comm.all_gather_cat` with gradients (backward: ReduceScatter, counted under 'bwd')."""
    return _AllGather.apply(x, comm, group or comm.world, category)


def reduce_scatter_autograd(comm: Comm, x: torch.Tensor, group: CommGroup | None = None, *,
                            category: str = "tokens") -> torch.Tensor:
    """`comm.reduce_scatter` with gradients (backward: AllGather, counted under 'bwd')."""
    return _ReduceScatter.apply(x, comm, group or comm.world, category)


# ==========================================================================================
# torch.distributed backend
# ==========================================================================================
class TorchComm(Comm):
    """torch.distributed backend. Call after `init_process_group`; creates every step group of
    the topology (all ranks, same order), so any dispatcher can use any step, and the step groups
    of every lane in `lanes`. `on_collective` is called as each collective starts (the launcher
    counts them to name a rank that lags)."""

    def __init__(self, topology: Topology, timeout_s: float = DEFAULT_TIMEOUT_S, lanes: Sequence[str] = (),
                 on_collective: Callable[[], None] | None = None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise CommError("TorchComm needs torch.distributed to be initialised first (see impl.common.launcher)")
        if dist.get_world_size() != topology.G:
            raise CommError(f"world size {dist.get_world_size()} does not match topology {topology.name!r} "
                            f"(G = {topology.G}); pick a topology with {dist.get_world_size()} GPUs")
        super().__init__(topology, dist.get_rank())
        self._dist = dist
        self._entered = on_collective or (lambda: None)
        self.backend = dist.get_backend()
        self.timeout_s = timeout_s
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._groups = self._create_groups(include_world=False)
        for name in lanes:
            self.lane(name)

    def _create_groups(self, include_world: bool) -> dict[tuple[str, int], CommGroup]:
        """One process group per distinct rank set of the topology's steps; every rank creates
        every group, in the same order (torch.distributed requirement). The main comm uses the
        default group for the whole world; a lane gets its own."""
        world = tuple(range(self.topology.G))
        timeout = timedelta(seconds=self.timeout_s)
        handles: dict[tuple[int, ...], Any] = {} if include_world else {world: self._dist.group.WORLD}
        groups = {}
        for kind, level, ranks in self.topology.all_step_groups():
            if ranks not in handles:
                handles[ranks] = self._dist.new_group(list(ranks), timeout=timeout)
            if self.rank in ranks:
                groups[(kind, level)] = CommGroup(kind, level, ranks, handles[ranks])
        return groups

    def _make_lane(self, name):
        view = object.__new__(TorchComm)
        view.__dict__.update(self.__dict__)          # same rank, topology, device and traffic counter
        view._lanes, view.lane_name = {}, name
        view._groups = self._create_groups(include_world=True)
        return view

    _OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}

    def _launch(self, kind, x, group, send_splits=None, recv_splits=None, op="sum"):
        """Issue one collective with async_op=True: (work, result tensor or list)."""
        self._entered()
        d = self._dist
        if kind == "a2a":
            out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
            return d.all_to_all_single(out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                                       group=group.handle, async_op=True), out
        if kind == "ag":
            out = x.new_empty((x.shape[0] * group.size,) + tuple(x.shape[1:]))
            # torch 2.13 names it *_single; older releases *_into_tensor / *_tensor
            gather = getattr(d, "all_gather_single", None) or d.all_gather_into_tensor
            return gather(out, x, group=group.handle, async_op=True), out
        if kind == "rs":
            out = x.new_empty((x.shape[0] // group.size,) + tuple(x.shape[1:]))
            scatter = getattr(d, "reduce_scatter_single", None) or d.reduce_scatter_tensor
            return scatter(out, x, group=group.handle, async_op=True), out
        out = x.clone()
        return d.all_reduce(out, op=getattr(d.ReduceOp, self._OPS[op]), group=group.handle, async_op=True), out

    def _start(self, run, kind, x, group, **args):
        if group.size == 1:
            value = run()
            return Handle(lambda: value)
        work, out = self._launch(kind, x, group, **args)

        def finish():
            work.wait()
            return out
        return Handle(finish)

    def _all_to_all(self, x, send_splits, recv_splits, group):
        if group.size == 1:
            return x.clone()
        work, out = self._launch("a2a", x, group, send_splits, recv_splits)
        work.wait()
        return out

    def _all_reduce(self, x, op, group):
        work, out = self._launch("ar", x.detach(), group, op=op)
        work.wait()
        return out

    def _all_gather_cat(self, x, group):
        work, out = self._launch("ag", x, group)
        work.wait()
        return out

    def _reduce_scatter(self, x, group):
        work, out = self._launch("rs", x, group)
        work.wait()
        return out

    def all_gather_object(self, obj):
        self._entered()
        outs = [None] * self.world_size
        self._dist.all_gather_object(outs, obj, group=self.world.handle)
        return outs

    def barrier(self, group=None):
        self._entered()
        group = self._own(group)
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

    Collectives meet at per-(lane, group) barriers with a timeout, so a rank that raises or calls
    collectives in a different order stops the whole run with a CommError naming the rank
    instead of hanging. Tensors stay on their device (ranks may share one GPU); metadata the
    collectives build is on `comm.device`, the CPU."""

    def __init__(self, topology: Topology, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.topology = topology
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._states: dict[tuple[str | None, tuple[int, ...]], _SimGroupState] = {}
        self.comms = [SimComm(self, r) for r in range(topology.G)]

    def state(self, lane: str | None, ranks: tuple[int, ...]) -> _SimGroupState:
        with self._lock:
            if (lane, ranks) not in self._states:
                self._states[(lane, ranks)] = _SimGroupState(len(ranks), self.timeout_s)
            return self._states[(lane, ranks)]

    def abort(self):
        with self._lock:
            for st in self._states.values():
                st.barrier.abort()

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> list[Any]:
        results: list[Any] = [None] * self.topology.G
        errors: dict[int, BaseException] = {}

        def body(rank: int):
            try:
                # backward on this thread: autograd otherwise runs CUDA nodes on one shared device
                # thread, where the first rank's collective would wait forever for the others
                with torch.autograd.set_multithreading_enabled(False):
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
        for c in self.comms:
            c.finish_async()
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
    """One simulated rank of a SimWorld. Asynchronous collectives run, in issue order, on one
    worker thread per (rank, lane), so a rank can keep computing while they meet."""

    backend = "sim"

    def __init__(self, world: SimWorld, rank: int):
        super().__init__(world.topology, rank)
        self._world = world
        topo = world.topology
        self._groups = {(kind, level): CommGroup(kind, level, ranks)
                        for kind, level, ranks in topo.all_step_groups() if rank in ranks}
        self._async: ThreadPoolExecutor | None = None

    def _make_lane(self, name):
        view = object.__new__(SimComm)
        view.__dict__.update(self.__dict__)          # same rank, topology and traffic counter
        view._lanes, view.lane_name, view._async = {}, name, None
        return view

    def finish_async(self) -> None:
        """Stop this rank's async workers (after a run; pending collectives finish or fail first)."""
        for comm in (self, *self._lanes.values()):
            if comm._async is not None:
                comm._async.shutdown(wait=True)
                comm._async = None

    def _worker_prefix(self) -> str:
        return f"sim-rank-{self.rank}-{self.lane_name or 'main'}-async"

    def _start(self, run, kind, x, group, **args):
        if self._async is None:
            self._async = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._worker_prefix())
        future = self._async.submit(run)
        return Handle(lambda: future.result())

    def _exchange(self, group: CommGroup, payload: Any) -> list[Any]:
        """Meet the group's members. While async collectives of this comm exist, blocking ones
        queue behind them on the same worker, so collectives keep their issue order (as they
        do on one torch.distributed group)."""
        if self._async is not None and not threading.current_thread().name.startswith(self._worker_prefix()):
            return self._async.submit(self._exchange_now, group, payload).result()
        return self._exchange_now(group, payload)

    def _exchange_now(self, group: CommGroup, payload: Any) -> list[Any]:
        st = self._world.state(self.lane_name, group.ranks)
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

    @staticmethod
    def _reduce(vals: list[torch.Tensor], op: str) -> torch.Tensor:
        """Members' tensors reduced in group order (a fixed order, so results are reproducible)."""
        out = vals[0].clone()
        for v in vals[1:]:
            if op == "sum":
                out = out + v
            else:
                out = torch.maximum(out, v) if op == "max" else torch.minimum(out, v)
        return out

    def _all_reduce(self, x, op, group):
        return self._reduce(self._exchange(group, x.detach().clone()), op)

    def _all_gather_cat(self, x, group):
        return torch.cat(self._exchange(group, x.detach()))

    def _reduce_scatter(self, x, group):
        vals = self._exchange(group, x.detach())
        block = x.shape[0] // group.size
        me = group.index(self.rank)
        return self._reduce([v[me * block:(me + 1) * block] for v in vals], "sum")

    def all_gather_object(self, obj):
        return self._exchange(self.world, obj)

    def barrier(self, group=None):
        self._exchange(self._own(group), None)
