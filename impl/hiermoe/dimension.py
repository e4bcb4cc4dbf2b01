"""The dimension d* of HierD-AlltoAll: HierMoE's alpha-beta performance model (Eqs. (1)-(7),
Algorithm 1) evaluated on duplicate-free token counts, and the exact per-level volume of every
HDd / Hd route computed from routing masks alone.

Counts (Eq. (7)). Experts live in physical slots; the experts of a level-L group (one of U[L],
U[D] = G GPUs) are a contiguous block of E / U[L] slots. For every origin rank s and every
level-L group j, q_L[s, j] is the number of rows s starts towards group j:

* with dedup (HDd): the tokens of s that select at least one expert of block j (the OR of the
  mask over the block, then a count);
* without (Hd): the (token, expert) pairs of s inside block j.

`process()` (Algorithm 1, line 9). Our reading: it tracks *who holds* the rows entering each
step. The route of `impl.hiermoe.dedup_a2a` is deterministic: after Inter-1..Inter-P, the copy of
a token of origin s that serves level-P group p is held by the rank whose coarsest P coordinates
are p's and whose other coordinates are s's. That copy carries only p's experts, and the blocks
of finer levels nest inside p's block, so the rows entering step (destination level L, parent
level P) are the per-origin counts q_L re-indexed to their holders:

    rows[holder, peer in group j] = sum of q_L[s, j] over the U[P] origins s whose
                                    coordinates below level P are the holder's

(`holder_rows`). One pass over the routing therefore gives every step of every dimension, as
Algorithm 1 intends, and the same counts give the exact bytes and messages per level
(`route_volumes`), equal to what the dispatcher's traffic counters record.

The paper's model (Eqs. (1)-(5), `paper_time`). A step over sub-groups of `fan` ranks is one
AlltoAll, padded to the largest split, whose per-rank buffer is n = fan * max(rows) * M * v bytes
(nccl-tests size); its time is alpha + beta * n with the profile's model of that step:

    t_1 = T_flat(G * max rows_flat)
    t_d = sum_{i<d} T_inter-i((U[i]/U[i-1]) * max rows_inter-i) + T_intra-(d-1)((G/U[d-1]) * max rows_intra-(d-1))

Our model (`route_collectives`, `route_time`, the default `charge='all'`). The paper charges one
start-up per step and the token rows only, but a step of the real dispatch issues four AlltoAlls
(split counts, expert ids, rows, gate weights) and the combine and the backward twins move rows
and gate-weight gradients too. Each collective the dispatcher issues is charged alpha + beta * n
of its step, n its own padded buffer (largest split x fan), metadata bytes included; a layer's
iteration is dispatch + combine + their backward twins, which do not carry equal volumes (only
the forward dispatch sends counts and ids). `flat_collectives` does the same for Megatron-LM's flat
AlltoAll (a [G, E/G] count table, rows, one gate weight per row); Tutel-2DH's and the DeepEP-style
dispatcher's live beside them (`baselines`). Bytes and messages per level of every collective
equal the dispatchers' traffic counters (category 'tokens' and 'meta'; tests). `charge='tokens'`
is the paper's 4 x t_d, kept for the ablation that shows what charging the metadata changes.

d* (Eq. (6)): d* = 1 if t_1 < min_{d>1} t_d, else argmin_{d>1} t_d (the smallest such d on a
tie; a tie between t_1 and a deeper t_d goes deeper, as the paper's strict < says), with t_d the
modeled iteration time of HDd under the chosen charge.

Where the paper is unclear (digest section 3.5) and what we chose:

* Whose max. The paper's max(p) is read as the padded *per-rank* buffer: the largest split any
  rank sends to any peer in that step (self included, as in nccl-tests), the max over every
  concurrent sub-group, since the step ends with its slowest sub-AlltoAll.
* Agreement. Every rank must issue the same collectives, so d* is chosen from *global* counts:
  `choose_dimension` all-reduces (sum) a [G, 2 (U[1] + ... + U[D])] table (copies and pairs) in
  which each rank fills its own row, then every rank evaluates the same deterministic model on
  the same numbers. A sum over ranks of the count vectors would not do: which holder carries a
  row depends on its origin. One all-reduce per layer and step (`agreement_bytes`, 30 KiB at
  G = 32; it grows as G^2); the paper does not cover this cost. The sim charges it to HD-MoE and
  HierMoE (`agreement_collective`, `allreduce_time`).
* Frequency. Per MoE layer, per step, before the dispatch, from that layer's routing.
* Placement. The OR blocks are taken over physical slot order (the placement is applied to the
  mask columns first), so expert swaps change the counts.
"""
from __future__ import annotations


import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import torch

from impl.common.comm import Comm
from impl.common.costmodel import HardwareProfile
from impl.common.dispatcher import ExpertPlacement, check_expert_parallel
from impl.common.topology import Topology

__all__ = ["RouteCounts", "StepVolume", "RouteVolumes", "DispatchCounts", "Collective", "CHARGES", "COUNT_BYTES",
           "local_counts", "route_counts", "gather_counts", "dispatch_counts", "gather_dispatch_counts",
           "selected_slots", "counts_from_slots", "uniform_counts",
           "holder_rows", "route_steps", "step_name_of", "route_volumes", "volumes", "step_maxima", "link_table",
           "mask_bytes", "agreement_bytes", "BUFFERS", "a2a_collective", "route_collectives", "flat_collectives",
           "agreement_collective", "allreduce_collective", "traffic_of", "allreduce_time", "collective_time", "collectives_time",
           "paper_time", "paper_times", "route_time", "flat_time", "iteration_times", "select_dimension",
           "choose_from_counts", "choose_dimension", "check_profile", "variant_name"]


# ==========================================================================================
# counts
# ==========================================================================================
@dataclass(frozen=True, eq=False)
class RouteCounts:
    """Rows every origin rank starts towards every group of every level: the one input of the
    model and of the volumes. by_level[L - 1] is int64 [G, U[L]] for L = 1..D (level D = GPUs)."""

    topology: Topology
    dedup: bool
    by_level: tuple[torch.Tensor, ...]

    def __post_init__(self):
        topo = self.topology
        if len(self.by_level) != topo.D:
            raise ValueError(f"RouteCounts needs {topo.D} levels for topology {topo.name!r}, got {len(self.by_level)}")
        for L, q in enumerate(self.by_level, start=1):
            if tuple(q.shape) != (topo.G, topo.U[L]):
                raise ValueError(f"RouteCounts level {L}: expected shape ({topo.G}, {topo.U[L]}), got {tuple(q.shape)}")

    @classmethod
    def from_table(cls, topology: Topology, table_GX: torch.Tensor, dedup: bool) -> "RouteCounts":
        """From the [G, U[1] + ... + U[D]] table of per-rank count vectors (`local_counts` rows)."""
        widths = list(topology.U[1:])
        if tuple(table_GX.shape) != (topology.G, sum(widths)):
            raise ValueError(f"count table must be [{topology.G}, {sum(widths)}] for topology "
                             f"{topology.name!r}, got {tuple(table_GX.shape)}")
        return cls(topology, dedup, tuple(table_GX.to(torch.int64).split(widths, dim=1)))

    def level(self, L: int) -> torch.Tensor:
        return self.by_level[L - 1]


def _check_map(routing_map_TE: torch.Tensor, topology: Topology) -> int:
    if routing_map_TE.dim() != 2 or routing_map_TE.dtype != torch.bool:
        raise ValueError(f"routing_map_TE must be a 2-D bool tensor [T, E], got dtype {routing_map_TE.dtype} "
                         f"and shape {tuple(routing_map_TE.shape)}")
    E = routing_map_TE.shape[1]
    check_expert_parallel(E, topology.G)
    return E


def _slot_order(placement: ExpertPlacement | None, num_experts: int) -> torch.Tensor | None:
    """Logical expert of every slot, or None for the identity placement."""
    if placement is None:
        return None
    if placement.num_experts != num_experts:
        raise ValueError(f"placement has {placement.num_experts} experts, routing map {num_experts}")
    expert_of_slot = placement.expert_of_slot
    return None if expert_of_slot == tuple(range(num_experts)) else torch.tensor(expert_of_slot)


def local_counts(routing_map_TE: torch.Tensor, topology: Topology, placement: ExpertPlacement | None = None,
                 dedup: bool = True) -> torch.Tensor:
    """One rank's counts, int64 [U[1] + ... + U[D]]: for each level L = 1..D and group j, the
    tokens (dedup) or (token, expert) pairs (no dedup) of this rank that need group j (Eq. (7))."""
    E = _check_map(routing_map_TE, topology)
    order_S = _slot_order(placement, E)
    if order_S is not None:
        order_S = order_S.to(routing_map_TE.device)
    T, G, U = routing_map_TE.shape[0], topology.G, topology.U
    if not dedup:
        pairs_S = routing_map_TE.sum(0)
        if order_S is not None:
            pairs_S = pairs_S.index_select(0, order_S)
        return torch.cat([pairs_S.view(U[L], E // U[L]).sum(1) for L in range(1, topology.D + 1)])
    # slot-major bytes [E, T] (0 / 1): the OR over a block of slots is a max over contiguous rows
    map_ST = routing_map_TE.t()
    map_ST = map_ST.contiguous() if order_S is None else map_ST.index_select(0, order_S)
    needs = [map_ST.view(torch.uint8).view(G, E // G, T).amax(1)]            # [G, T]: OR per GPU
    for L in range(topology.D - 1, 0, -1):                                   # coarser blocks nest
        needs.append(needs[-1].view(U[L], U[L + 1] // U[L], T).amax(1))
    return torch.cat([n.sum(1) for n in reversed(needs)])


def selected_slots(routing_map_TE: torch.Tensor, placement: ExpertPlacement | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK, valid_TK): each token's selected *slots*, ascending, padded to the largest number
    any token selects (top-K routing: exactly K) with the sentinel E / False. Sparse: no [T, E]
    permutation of the map."""
    T, E = routing_map_TE.shape
    t, e = routing_map_TE.nonzero(as_tuple=True)                  # row-major: each token's experts ascending
    if placement is not None and tuple(placement.slot_of_expert) == tuple(range(E)):
        placement = None
    s = e if placement is None else torch.tensor(placement.slot_of_expert, dtype=torch.long, device=e.device)[e]
    per_token = torch.bincount(t, minlength=T)
    K = int(per_token.max()) if T else 0
    if T and t.numel() == T * K:                                  # every token selects K (top-K, no drops)
        ids_TK = s.view(T, K)
    else:
        pos = torch.arange(t.numel(), device=t.device) - (torch.cumsum(per_token, 0) - per_token)[t]
        ids_TK = torch.full((T, K), E, dtype=torch.long, device=t.device)
        ids_TK[t, pos] = s
    if placement is not None or t.numel() != T * K:
        ids_TK = torch.sort(ids_TK, dim=1).values
    return ids_TK, ids_TK < E


def counts_from_slots(slots_NK: torch.Tensor, origin_N: torch.Tensor, topology: Topology, num_experts: int
                      ) -> "DispatchCounts":
    """Both per-origin count tables from every token's selected slots (`selected_slots`: ascending,
    padded with the sentinel E) and its origin rank, all ranks at once: per level L, the groups of a
    token's sorted slots are sorted, so its distinct groups are where the group changes. Sparse
    (O(N * K * D)); equal to `route_counts` with and without dedup (tested)."""
    E, G, D = num_experts, topology.G, topology.D
    check_expert_parallel(E, G)
    U = torch.tensor(topology.U[1:], dtype=torch.int32).view(D, 1, 1)
    width = [G * (u + 1) for u in topology.U[1:]]                  # per level: G origins x (U[L] + spare)
    offset = torch.tensor([0] + width[:-1], dtype=torch.int32).cumsum(0).to(torch.int32).view(D, 1, 1)
    slots = slots_NK.to(torch.int32).unsqueeze(0)
    valid = (slots < E).expand(D, -1, -1)
    grp = torch.where(valid, slots // (E // U), U)                    # [D, N, K]; padding -> the spare group
    first = valid.clone()
    first[:, :, 1:] &= grp[:, :, 1:] != grp[:, :, :-1]
    index = grp + offset + origin_N.to(torch.int32).view(1, -1, 1) * (U + 1)
    total = sum(width)
    tables = []
    for keep in (first, valid):                                     # one bincount for all levels
        flat = torch.bincount(torch.where(keep, index, total).view(-1), minlength=total + 1)[:total]
        tables.append([t.view(G, u + 1)[:, :u] for t, u in zip(flat.split(width), topology.U[1:])])
    copies, pairs = tables
    return DispatchCounts(RouteCounts(topology, True, tuple(copies)), RouteCounts(topology, False, tuple(pairs)), E)


def route_counts(routing_maps: Sequence[torch.Tensor], topology: Topology,
                 placement: ExpertPlacement | None = None, dedup: bool = True) -> RouteCounts:
    """Global counts from every rank's routing map (rank order): the sim tier's input."""
    if len(routing_maps) != topology.G:
        raise ValueError(f"got routing maps of {len(routing_maps)} ranks; topology {topology.name!r} has G = {topology.G}")
    table = torch.stack([local_counts(m, topology, placement, dedup) for m in routing_maps])
    return RouteCounts.from_table(topology, table, dedup)


def uniform_counts(topology: Topology, num_experts: int, top_k: int, tokens_per_rank: int, dedup: bool) -> RouteCounts:
    """Counts with every split at its expectation under uniform top-K routing without replacement
    (digest section 3.7's idealised setting): a group of g = E / U[L] experts is touched by a token
    with probability 1 - C(E - g, K) / C(E, K) (dedup), or receives K / U[L] of its pairs."""
    E, K, T = num_experts, top_k, tokens_per_rank
    levels = []
    for L in range(1, topology.D + 1):
        g = E // topology.U[L]
        mean = T * (1 - math.comb(E - g, K) / math.comb(E, K)) if dedup else T * K / topology.U[L]
        levels.append(torch.full((topology.G, topology.U[L]), round(mean), dtype=torch.int64))
    return RouteCounts(topology, dedup, tuple(levels))


def gather_counts(comm: Comm, routing_map_TE: torch.Tensor, placement: ExpertPlacement | None = None,
                  dedup: bool = True) -> RouteCounts:
    """Global counts on every rank: one all-reduce (sum) of a table holding each rank's row."""
    topo = comm.topology
    mine = local_counts(routing_map_TE, topo, placement, dedup)
    table = torch.zeros(topo.G, mine.numel(), dtype=torch.int64, device=mine.device)
    table[comm.rank] = mine
    return RouteCounts.from_table(topo, comm.reduce_on_host(table, "sum"), dedup)


# ==========================================================================================
# the route: steps, holders (process) and their splits
# ==========================================================================================
def route_steps(topology: Topology, dim: int) -> list[tuple[int, int]]:
    """(level L of the destination groups, parent level P) of each step of an HD`dim` / H`dim`
    route: Inter-i = (i, i-1) for i < dim, then Intra-(dim-1) = (D, dim-1)."""
    if not 1 <= dim <= topology.D:
        raise ValueError(f"dimension d={dim} not available on topology {topology.name!r}; allowed: 1..{topology.D}")
    return [(i, i - 1) for i in range(1, dim)] + [(topology.D, dim - 1)]


def step_name_of(topology: Topology, L: int, P: int) -> str:
    """The profile's name of step (L, P): 'inter-L' for L < D, else 'flat' / 'intra-P'."""
    if L < topology.D:
        return f"inter-{L}"
    return "flat" if P == 0 else f"intra-{P}"


def holder_rows(counts: RouteCounts, L: int, P: int) -> torch.Tensor:
    """process(): rows entering step (L, P), int64 [G/U[P], U[L]]. Entry [x, j] is what the
    holder with lower coordinates x (inside the level-P group above j) sends to its peer in
    level-L group j: the sum of q_L over the U[P] origins with those lower coordinates."""
    topo = counts.topology
    return counts.level(L).view(topo.U[P], topo.G // topo.U[P], topo.U[L]).sum(0)


@lru_cache(maxsize=None)
def link_table(topology: Topology) -> torch.Tensor:
    """int64 [G, G]: the level whose link a message a -> b crosses (`Topology.link_level`), -1 for
    a message to oneself; vectorised, so topologies of a thousand GPUs are cheap."""
    coords = torch.tensor([topology.coords(r) for r in range(topology.G)], dtype=torch.int64)   # [G, D]
    differ = coords.unsqueeze(1) != coords.unsqueeze(0)                                        # [G, G, D]
    return torch.where(differ.any(2), differ.to(torch.int8).argmax(2), torch.full((), -1)).to(torch.int64)


@lru_cache(maxsize=None)
def _step_geometry(topology: Topology, L: int, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(holder, peer, link level or -1 for oneself), each int64 [G/U[P], U[L]], of step (L, P)."""
    G, U = topology.G, topology.U
    x = torch.arange(G // U[P]).view(-1, 1)
    j = torch.arange(U[L]).view(1, -1)
    holder = (j // (U[L] // U[P])) * (G // U[P]) + x
    peer = j * (G // U[L]) + x % (G // U[L])
    return holder, peer, link_table(topology)[holder, peer]


def step_maxima(counts: RouteCounts) -> dict[tuple[int, int], int]:
    """Largest split of every step any dimension uses (Algorithm 1's single pass):
    Inter-i for 1 <= i < D and Intra-P for 0 <= P < D."""
    topo = counts.topology
    keys = [(i, i - 1) for i in range(1, topo.D)] + [(topo.D, P) for P in range(topo.D)]
    return {k: int(holder_rows(counts, *k).max()) for k in keys}


# ==========================================================================================
# volumes
# ==========================================================================================
@dataclass(frozen=True)
class StepVolume:
    """One sub-AlltoAll of a route, all its concurrent sub-groups together."""

    step: str          # profile step name: 'inter-i', 'intra-i' or 'flat'
    fan: int           # ranks per sub-group
    max_rows: int      # largest split any rank sends to any peer (itself included)
    rows: int          # rows sent to other ranks
    messages: int      # non-empty (rank, other rank) splits

    def padded_bytes(self, row_bytes: int) -> int:
        """The model's per-rank buffer n = fan * max split * row bytes (Eqs. (2), (4), (5))."""
        return self.fan * self.max_rows * row_bytes


@dataclass(frozen=True)
class RouteVolumes:
    """Exact traffic of one dispatch of an HD`dim` / H`dim` route (the combine mirrors it)."""

    dim: int
    dedup: bool
    row_bytes: int
    rows_by_level: dict[str, int]
    bytes_by_level: dict[str, int]
    messages_by_level: dict[str, int]
    steps: tuple[StepVolume, ...]

    @property
    def variant(self) -> str:
        return variant_name(self.dim, self.dedup)


def variant_name(dim: int, dedup: bool) -> str:
    return f"{'HD' if dedup else 'H'}{dim}"


def route_volumes(counts: RouteCounts, dim: int, row_bytes: int) -> RouteVolumes:
    """Rows, bytes and messages per topology level (the level whose link a message crosses, as
    `TrafficCounter` counts them) and per step, of the HD`dim` (counts.dedup) or H`dim` route."""
    topo = counts.topology
    names = topo.level_names
    rows_lv = torch.zeros(topo.D, dtype=torch.int64)
    msgs_lv = torch.zeros(topo.D, dtype=torch.int64)
    steps = []
    for L, P in route_steps(topo, dim):
        rows = holder_rows(counts, L, P)
        _, _, link = _step_geometry(topo, L, P)
        remote = link >= 0
        rows_lv.index_add_(0, link[remote], rows[remote])
        msgs_lv.index_add_(0, link[remote], (rows[remote] > 0).to(torch.int64))
        steps.append(StepVolume(step_name_of(topo, L, P), topo.U[L] // topo.U[P], int(rows.max()),
                                int(rows[remote].sum()), int((rows[remote] > 0).sum())))
    rows_by = {n: int(v) for n, v in zip(names, rows_lv.tolist())}
    return RouteVolumes(dim, counts.dedup, int(row_bytes), rows_by, {n: v * int(row_bytes) for n, v in rows_by.items()},
                        {n: int(v) for n, v in zip(names, msgs_lv.tolist())}, tuple(steps))


def volumes(routing_maps: Sequence[torch.Tensor], topology: Topology, placement: ExpertPlacement | None,
            dim: int, dedup: bool, *, row_bytes: int = 1) -> RouteVolumes:
    """Exact per-level traffic of one HD`dim` (dedup) / H`dim` dispatch, analytically from the
    routing maps of all G ranks (logical expert columns; `placement` maps them to slots).
    `row_bytes` is the size of one token row (M * v); the default 1 makes bytes count rows."""
    return route_volumes(route_counts(routing_maps, topology, placement, dedup), dim, row_bytes)


# ==========================================================================================
# what a dispatch issues: every collective, metadata included
# ==========================================================================================
COUNT_BYTES = 8          # one split count per peer and step, int64
CHARGES = ("all", "tokens")
BUFFERS = ("padded", "total")


@dataclass(frozen=True, eq=False)
class DispatchCounts:
    """The two per-origin count tables every collective of a dispatch follows from:
    `copies`, the duplicate-free rows (what HDd sends), and `pairs`, the (token, expert) pairs
    (the rows of Hd and of the flat AlltoAll, and the number of gate weights that travel with the
    rows of any route)."""

    copies: RouteCounts
    pairs: RouteCounts
    num_experts: int

    def __post_init__(self):
        if not self.copies.dedup or self.pairs.dedup or self.copies.topology != self.pairs.topology:
            raise ValueError("DispatchCounts needs dedup copies and no-dedup pairs of one topology")
        object.__setattr__(self, "_memo", {})     # collectives already derived from these counts

    def memo(self, key, build):
        """`build()` once per key: the systems of a sim run evaluate the same routes on one routing."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def topology(self) -> Topology:
        return self.copies.topology

    def rows(self, dedup: bool) -> RouteCounts:
        return self.copies if dedup else self.pairs


def dispatch_counts(routing_maps: Sequence[torch.Tensor], topology: Topology,
                    placement: ExpertPlacement | None = None) -> DispatchCounts:
    """Both tables from every rank's routing map (rank order): the sim tier's input."""
    if len(routing_maps) != topology.G:
        raise ValueError(f"got routing maps of {len(routing_maps)} ranks; topology {topology.name!r} has G = {topology.G}")
    E = _check_map(routing_maps[0], topology)
    if placement is not None and placement.num_experts != E:
        raise ValueError(f"placement has {placement.num_experts} experts, routing map {E}")
    slots_NK, _ = selected_slots(torch.cat(list(routing_maps)), placement)
    origin_N = torch.repeat_interleave(torch.arange(topology.G), torch.tensor([m.shape[0] for m in routing_maps]))
    return counts_from_slots(slots_NK, origin_N, topology, E)


def gather_dispatch_counts(comm: Comm, routing_map_TE: torch.Tensor, placement: ExpertPlacement | None = None
                           ) -> DispatchCounts:
    """Both tables on every rank: ONE all-reduce (sum) of a [G, 2 (U[1] + ... + U[D])] int64
    table in which each rank fills its own row (`agreement_bytes`)."""
    topo = comm.topology
    mine = torch.cat([local_counts(routing_map_TE, topo, placement, True),
                      local_counts(routing_map_TE, topo, placement, False)])
    table = torch.zeros(topo.G, mine.numel(), dtype=torch.int64, device=mine.device)
    table[comm.rank] = mine
    copies, pairs = comm.reduce_on_host(table, "sum").split(mine.numel() // 2, dim=1)   # counts feed a host model
    return DispatchCounts(RouteCounts.from_table(topo, copies, True), RouteCounts.from_table(topo, pairs, False),
                          routing_map_TE.shape[1])


def agreement_bytes(topology: Topology) -> int:
    """Bytes of the count table HierD-AlltoAll all-reduces to agree on d* (per layer and step)."""
    return topology.G * 2 * sum(topology.U[1:]) * COUNT_BYTES


def mask_bytes(num_experts: int, groups: int) -> int:
    """Bytes of the expert ids a row carries towards one of `groups` groups: a bitmask over the
    group's E / groups slots (1 byte for up to 8 slots; never wider than K one-byte ids when the
    group has at most 8 K slots)."""
    return -(-(num_experts // groups) // 8)


@dataclass(frozen=True)
class Collective:
    """One collective of a dispatch or combine, all its concurrent sub-groups together.

    stage: the six-stage call that issues it ('dispatch': preprocess + token_dispatch; 'combine');
    phase: 'fwd', or 'bwd' for the autograd twin of a forward AlltoAll; what: 'counts' (split
    sizes), 'ids' (expert ids: bitmasks), 'tokens', 'weights' (gate weights), 'notify' (all split
    sizes of a route at once) or 'agree' (an all-reduce that agrees on a choice); category: the
    TrafficCounter category ('tokens', 'meta').
    max_bytes is the largest split any rank sends to any peer (itself included), the model's
    per-rank buffer is fan * max_bytes (Eqs. (2), (4), (5), 'padded'); max_total_bytes is the
    largest amount any rank sends or receives in it (the 'total' reading of the buffer, for the
    ablation); an all-reduce's buffer is max_bytes."""

    stage: str
    phase: str
    what: str
    category: str
    kind: str
    step: str
    fan: int
    max_bytes: int
    bytes_by_level: Mapping[str, int] = field(default_factory=dict)
    messages_by_level: Mapping[str, int] = field(default_factory=dict)
    max_total_bytes: int | None = None

    @property
    def nbytes(self) -> int:
        return self.fan * self.max_bytes if self.kind == "a2a" else self.max_bytes

    def buffer_bytes(self, buffer: str = "padded") -> int:
        """The per-rank buffer the alpha-beta model is evaluated at: 'padded' (fan x largest split,
        the paper's Eq. (2) read per rank) or 'total' (the largest amount one rank sends or
        receives; equal for even splits)."""
        if buffer == "total" and self.kind == "a2a" and self.max_total_bytes is not None:
            return self.max_total_bytes
        return self.nbytes


def allreduce_time(profile: HardwareProfile, nbytes: float) -> float:
    """An all-reduce over all ranks: the profile's 'allreduce/flat' model when it has one, else
    estimated as two flat AlltoAlls of the buffer (a ring all-reduce sends every rank (G-1)/G of
    it twice; modeled, no measurement behind it)."""
    if profile.has_comm("allreduce", "flat"):
        return profile.comm_time("allreduce", "flat", nbytes)
    return 2 * profile.comm_time("a2a", "flat", nbytes)


def _check_buffer(buffer: str) -> None:
    if buffer not in BUFFERS:
        raise ValueError(f"buffer: {buffer!r} is not allowed; allowed: {', '.join(BUFFERS)}")


def collective_time(c: Collective, profile: HardwareProfile, buffer: str = "padded") -> float:
    if c.kind == "a2a":
        return profile.comm_time("a2a", c.step, c.buffer_bytes(buffer))
    return allreduce_time(profile, c.nbytes)


def collectives_time(collectives: Sequence[Collective], profile: HardwareProfile, buffer: str = "padded") -> float:
    """Modeled ms of the collectives, one after another (none overlaps another)."""
    _check_buffer(buffer)
    return sum(collective_time(c, profile, buffer) for c in collectives)


def a2a_collective(topology: Topology, L: int, P: int, units_XJ: torch.Tensor, unit_bytes: int, *,
                   with_levels: bool = True, totals: bool = True, max_units: int | None = None,
                   **fields) -> Collective:
    """The AlltoAll of step (L, P) whose split (holder, peer) carries units_XJ[x, j] units of
    `unit_bytes` (layout of `holder_rows`); bytes and messages per level as TrafficCounter counts
    them (messages to oneself and empty splits are not traffic). `totals`: also the largest
    amount a rank sends or receives (the 'total' buffer); `max_units`: units_XJ.max() if known."""
    D, G = topology.D, topology.G
    holder, peer, link = _step_geometry(topology, L, P)
    if max_units is None:
        max_units = int(units_XJ.max()) if units_XJ.numel() else 0
    out = dict(kind="a2a", step=step_name_of(topology, L, P), fan=topology.U[L] // topology.U[P],
               max_bytes=max_units * int(unit_bytes))
    if totals:
        sent = torch.zeros(G, dtype=torch.int64).index_add_(0, holder.reshape(-1), units_XJ.reshape(-1))
        got = torch.zeros(G, dtype=torch.int64).index_add_(0, peer.reshape(-1), units_XJ.reshape(-1))
        out["max_total_bytes"] = int(torch.maximum(sent, got).max()) * int(unit_bytes)
    if with_levels:
        remote = link >= 0
        units = units_XJ[remote]
        b = torch.zeros(D, dtype=torch.int64).index_add_(0, link[remote], units * int(unit_bytes))
        m = torch.zeros(D, dtype=torch.int64).index_add_(0, link[remote], (units > 0).to(torch.int64))
        out["bytes_by_level"] = dict(zip(topology.level_names, b.tolist()))
        out["messages_by_level"] = dict(zip(topology.level_names, m.tolist()))
    return Collective(**fields, **out)


def _step_phases(topo: Topology, L: int, P: int, rows: torch.Tensor, pairs: torch.Tensor, row_bytes: int,
                 weight_bytes: int, ids_bytes: int, counts_bytes: int | None, with_levels: bool,
                 totals: bool = True) -> dict:
    """The collectives one step of a route issues, by (stage, phase): the dispatch sends the split
    counts (unless a notify gave them), the ids, then the rows and their gate weights; the combine
    sends the rows back; autograd adds the twins of the three data AlltoAlls."""
    most = {id(rows): int(rows.max()) if rows.numel() else 0, id(pairs): int(pairs.max()) if pairs.numel() else 0}

    def c(units, unit_bytes, stage, phase, what, category):
        return a2a_collective(topo, L, P, units, unit_bytes, with_levels=with_levels, totals=totals,
                              max_units=most.get(id(units)), stage=stage, phase=phase, what=what, category=category)
    dispatch = []
    if counts_bytes is not None:
        dispatch.append(c(torch.ones_like(rows), counts_bytes, "dispatch", "fwd", "counts", "meta"))
    if ids_bytes:
        dispatch.append(c(rows, ids_bytes, "dispatch", "fwd", "ids", "meta"))
    dispatch += [c(rows, row_bytes, "dispatch", "fwd", "tokens", "tokens"),
                 c(pairs, weight_bytes, "dispatch", "fwd", "weights", "meta")]
    return {("dispatch", "fwd"): dispatch,
            ("combine", "fwd"): [c(rows, row_bytes, "combine", "fwd", "tokens", "tokens")],
            ("combine", "bwd"): [c(rows, row_bytes, "combine", "bwd", "tokens", "tokens")],
            ("dispatch", "bwd"): [c(rows, row_bytes, "dispatch", "bwd", "tokens", "tokens"),
                                  c(pairs, weight_bytes, "dispatch", "bwd", "weights", "meta")]}


def _in_order(per_step: list[dict]) -> tuple[Collective, ...]:
    """Issue order over an iteration: dispatch, combine (forward), then their backward twins."""
    out = []
    for key, steps in ((("dispatch", "fwd"), per_step), (("combine", "fwd"), per_step[::-1]),
                       (("combine", "bwd"), per_step), (("dispatch", "bwd"), per_step[::-1])):
        for s in steps:
            out += s[key]
    return tuple(out)


def route_collectives(counts: DispatchCounts, dim: int, dedup: bool, row_bytes: int, weight_bytes: int = 4, *,
                      notify: bool = False, with_levels: bool = True, totals: bool = True) -> tuple[Collective, ...]:
    """Every collective one layer's HD`dim` (dedup) / H`dim` route issues in one training
    iteration, as `impl.hiermoe.dedup_a2a` issues them: per step of the dispatch the split counts
    (one int64 per peer), the ids (a bitmask of the destination group's slots per row), the rows
    and the gate weights of the experts in the destination group (one per (row, expert) pair);
    per step of the combine the rows back; in backward the twins of the data AlltoAlls.
    `notify`: the split counts of every step come from one notify beforehand (not included here)."""
    topo = counts.topology

    def build():
        per_step = []
        for L, P in route_steps(topo, dim):
            rows = holder_rows(counts.rows(dedup), L, P)
            pairs = holder_rows(counts.pairs, L, P)
            per_step.append(_step_phases(topo, L, P, rows, pairs, row_bytes, weight_bytes,
                                         mask_bytes(counts.num_experts, topo.U[L]), None if notify else COUNT_BYTES,
                                         with_levels, totals))
        return _in_order(per_step)

    return counts.memo(("route", dim, dedup, row_bytes, weight_bytes, notify, with_levels, totals), build)


def flat_collectives(counts: DispatchCounts, row_bytes: int, weight_bytes: int = 4, *,
                     with_levels: bool = True, totals: bool = True) -> tuple[Collective, ...]:
    """Every collective of Megatron-LM's flat AlltoAll (`FlatAlltoAllDispatcher`) in one
    iteration: the [G, E/G] rows-per-expert table (E/G int64 per peer), the rows and one gate
    weight per row; the combine's rows; the backward twins. No ids travel: rows arrive sorted by
    expert."""
    topo = counts.topology
    El = counts.num_experts // topo.G

    def build():
        pairs = holder_rows(counts.pairs, topo.D, 0)
        return _in_order([_step_phases(topo, topo.D, 0, pairs, pairs, row_bytes, weight_bytes, 0, El * COUNT_BYTES,
                                       with_levels, totals)])

    return counts.memo(("flat", row_bytes, weight_bytes, with_levels, totals), build)


def allreduce_collective(topology: Topology, elements: int, element_bytes: int, *, stage: str = "dispatch",
                         what: str = "agree") -> Collective:
    """An all-reduce of `elements` over all ranks, with the bytes and messages per level that the
    TrafficCounter counts for it (category 'meta'): the reduce-scatter of near-equal chunks, then
    the all-gather of this rank's chunk, each a message to every other rank that has one."""
    b, m = _allreduce_levels(topology, int(elements), int(element_bytes))
    return Collective(stage, "fwd", what, "meta", "allreduce", "flat", topology.G, int(elements) * element_bytes,
                      dict(b), dict(m))


@lru_cache(maxsize=64)
def _allreduce_levels(topology: Topology, elements: int, element_bytes: int) -> tuple[tuple, tuple]:
    G = topology.G
    base, extra = divmod(elements, G)
    chunk = np.array([base + (1 if i < extra else 0) for i in range(G)])
    coords = np.array([topology.coords(r) for r in range(G)])                       # [G, D]
    differs = coords[:, None, :] != coords[None, :, :]                              # [G, G, D]
    level = np.where(differs.any(-1), differs.argmax(-1), -1)                        # -1: oneself
    pair_bytes = (chunk[None, :] + chunk[:, None]) * element_bytes
    pair_msgs = (chunk[None, :] > 0).astype(int) + (chunk[:, None] > 0).astype(int)
    b = tuple((n, int(pair_bytes[level == i].sum())) for i, n in enumerate(topology.level_names))
    m = tuple((n, int(pair_msgs[level == i].sum())) for i, n in enumerate(topology.level_names))
    return b, m


def agreement_collective(topology: Topology) -> Collective:
    """HierD-AlltoAll's all-reduce of the count table (d* the same on every rank)."""
    return allreduce_collective(topology, agreement_bytes(topology) // COUNT_BYTES, COUNT_BYTES)


def traffic_of(collectives: Sequence[Collective], what: str = "bytes", category: str = "tokens",
               phase: str | None = "fwd") -> dict[str, int]:
    """{level: total} of the collectives, in `TrafficCounter.by_level`'s form (every level present)."""
    out: dict[str, int] = {}
    for c in collectives:
        table = c.bytes_by_level if what == "bytes" else c.messages_by_level
        for n, v in table.items():
            out[n] = out.get(n, 0) + (v if c.category == category and (phase is None or c.phase == phase) else 0)
    return out


# ==========================================================================================
# the model and the choice of d*
# ==========================================================================================
def check_profile(profile: HardwareProfile, topology: Topology) -> None:
    """The profile must model a topology of the same shape (same fan-outs, coarsest first)."""
    theirs = profile.get_topology()
    if tuple(lv.fanout for lv in theirs.levels) != tuple(lv.fanout for lv in topology.levels):
        raise ValueError(f"hardware profile {profile.name!r} models topology {theirs.name!r} ({theirs.describe()}), "
                         f"not {topology.name!r} ({topology.describe()}); pick a profile of the same shape")


def _check_charge(charge: str) -> None:
    if charge not in CHARGES:
        raise ValueError(f"charge: {charge!r} is not allowed; allowed: {', '.join(CHARGES)}")


def _paper(profile: HardwareProfile, topo: Topology, maxima: Mapping[tuple[int, int], int], dim: int,
           row_bytes: int) -> float:
    total = 0.0
    for L, P in route_steps(topo, dim):
        fan = topo.U[L] // topo.U[P]
        total += profile.comm_time("a2a", step_name_of(topo, L, P), fan * maxima[(L, P)] * row_bytes)
    return total


def paper_time(counts: RouteCounts, dim: int, profile: HardwareProfile, row_bytes: int) -> float:
    """The paper's t_d (ms, Eqs. (1)-(5)) of one dispatch of the HD`dim` (counts.dedup) or H`dim`
    route: one start-up per step and the token rows only."""
    check_profile(profile, counts.topology)
    return _paper(profile, counts.topology, step_maxima(counts), dim, row_bytes)


def paper_times(counts: RouteCounts, profile: HardwareProfile, row_bytes: int) -> dict[int, float]:
    """{d: t_d} of the paper's model for every d = 1..D, from one pass over the counts."""
    check_profile(profile, counts.topology)
    maxima = step_maxima(counts)
    return {d: _paper(profile, counts.topology, maxima, d, row_bytes) for d in range(1, counts.topology.D + 1)}


def _tokens_only(cs: Sequence[Collective]) -> list[Collective]:
    """The paper's charge: the forward dispatch's token AlltoAlls, one per step, x 4 phases."""
    return [c for c in cs if c.stage == "dispatch" and c.phase == "fwd" and c.what == "tokens"] * 4


def _padded_time(counts: DispatchCounts, steps, profile: HardwareProfile, row_bytes: int, weight_bytes: int,
                 ids: bool, counts_bytes: int | None) -> float:
    """`collectives_time` of a route's collectives with the padded buffer, in closed form: every
    collective of a step has the step's alpha, beta and fan, and its buffer is fan x the largest
    split of rows (counts, ids, 4 x rows) or pairs (2 x gate weights); no Collective is built (the
    planners evaluate it for every d, every layer and step). Equal to the collectives' sum (tested)."""
    topo = counts.topology
    total = 0.0
    for L, P, rows_of in steps:
        rm, pm = counts.memo(("max", L, P, rows_of), lambda: (int(holder_rows(counts.rows(rows_of), L, P).max()),
                                                              int(holder_rows(counts.pairs, L, P).max())))
        model = profile.comm_model("a2a", step_name_of(topo, L, P))
        fan = topo.U[L] // topo.U[P]
        mb = mask_bytes(counts.num_experts, topo.U[L]) if ids else 0
        n = 6 + (1 if ids else 0) + (0 if counts_bytes is None else 1)
        per_rank = (0 if counts_bytes is None else counts_bytes) + rm * mb + 4 * rm * row_bytes + 2 * pm * weight_bytes
        total += n * model.alpha_ms + model.beta_ms * fan * per_rank
    return total


def route_time(counts: DispatchCounts, dim: int, dedup: bool, profile: HardwareProfile, row_bytes: int,
               weight_bytes: int = 4, charge: str = "all", buffer: str = "padded", notify: bool = False) -> float:
    """Modeled ms of one layer's HD`dim` / H`dim` AlltoAlls in one training iteration (dispatch,
    combine and their backward twins). charge='all': every collective the dispatcher issues with
    every byte it sends (`route_collectives`); charge='tokens': the paper's model, 4 x t_d.
    buffer: 'padded' (fan x largest split, the paper's reading) or 'total' (`Collective.buffer_bytes`).
    notify: the split counts come from one notify (not included), as for the DeepEP-style route."""
    _check_charge(charge)
    _check_buffer(buffer)
    check_profile(profile, counts.topology)
    if charge == "tokens" and buffer == "padded":
        return 4 * paper_time(counts.rows(dedup), dim, profile, row_bytes)
    if charge == "all" and buffer == "padded":
        steps = [(L, P, dedup) for L, P in route_steps(counts.topology, dim)]
        return _padded_time(counts, steps, profile, row_bytes, weight_bytes, True, None if notify else COUNT_BYTES)
    cs = route_collectives(counts, dim, dedup, row_bytes, weight_bytes, notify=notify, with_levels=False,
                           totals=buffer == "total")
    return collectives_time(_tokens_only(cs) if charge == "tokens" else cs, profile, buffer)


def flat_time(counts: DispatchCounts, profile: HardwareProfile, row_bytes: int, weight_bytes: int = 4,
              charge: str = "all", buffer: str = "padded") -> float:
    """Modeled ms of Megatron-LM's flat AlltoAlls of one layer in one iteration (see `route_time`)."""
    _check_charge(charge)
    _check_buffer(buffer)
    check_profile(profile, counts.topology)
    if charge == "tokens" and buffer == "padded":
        return 4 * paper_time(counts.pairs, 1, profile, row_bytes)
    if charge == "all" and buffer == "padded":
        El = counts.num_experts // counts.topology.G
        return _padded_time(counts, [(counts.topology.D, 0, False)], profile, row_bytes, weight_bytes, False,
                            El * COUNT_BYTES)
    cs = flat_collectives(counts, row_bytes, weight_bytes, with_levels=False, totals=buffer == "total")
    return collectives_time(_tokens_only(cs) if charge == "tokens" else cs, profile, buffer)


def iteration_times(counts: DispatchCounts, profile: HardwareProfile, row_bytes: int, weight_bytes: int = 4,
                    charge: str = "all", buffer: str = "padded") -> dict[int, float]:
    """{d: modeled ms of HDd's AlltoAlls in one iteration} for d = 1..D: what d* minimises."""
    return {d: route_time(counts, d, True, profile, row_bytes, weight_bytes, charge, buffer)
            for d in range(1, counts.topology.D + 1)}


def select_dimension(times: Mapping[int, float]) -> int:
    """Eq. (6): 1 if t_1 is strictly below every deeper t_d, else the deeper argmin (first on ties)."""
    if 1 not in times:
        raise ValueError(f"times must include d=1, got d={sorted(times)}")
    deeper = sorted(d for d in times if d > 1)
    if not deeper:
        return 1
    best = min(deeper, key=lambda d: (times[d], d))
    return 1 if times[1] < times[best] else best


def choose_from_counts(counts: DispatchCounts, profile: HardwareProfile, row_bytes: int, weight_bytes: int = 4,
                       charge: str = "all", buffer: str = "padded") -> int:
    """d* from global counts (sim tier, or after `gather_dispatch_counts`)."""
    if not isinstance(counts, DispatchCounts):
        raise ValueError("d* is chosen from DispatchCounts (copies and pairs); build them with dispatch_counts")
    return select_dimension(iteration_times(counts, profile, row_bytes, weight_bytes, charge, buffer))


def choose_dimension(comm: Comm, routing_map_TE: torch.Tensor, placement: ExpertPlacement | None,
                     hidden: int, bytes_per_elem: int, profile: HardwareProfile, weight_bytes: int = 4) -> int:
    """d* of this layer and step, the same on every rank: every rank calls it (one all-reduce)."""
    for name, value in (("hidden", hidden), ("bytes_per_elem", bytes_per_elem), ("weight_bytes", weight_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_profile(profile, comm.topology)
    counts = gather_dispatch_counts(comm, routing_map_TE, placement)
    return choose_from_counts(counts, profile, hidden * bytes_per_elem, weight_bytes)
