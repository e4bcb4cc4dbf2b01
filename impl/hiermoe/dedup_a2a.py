"""HierD-AlltoAll: the d-dimensional hierarchical AlltoAll, with (HDd) or without (Hd) token
deduplication, on the stateless six-stage dispatcher interface.

Route of HDd (HierMoE section III-A; per-step mechanics are our explicit reading of it):

    Inter-level-1 -> Inter-level-2 -> ... -> Inter-level-(d-1) -> Intra-level-(d-1) -> local expansion

* Before Inter-level-i, every row a rank holds needs experts only inside the rank's
  level-(i-1) group. The rank ORs each row's experts over the level-i child groups and sends the
  row *once* to each child group that needs it (to its member of the rank's inter-level-i group).
* Intra-level-(d-1) sends each row once to every GPU of the level-(d-1) group that hosts at
  least one of its experts; that GPU replicates the row locally, once per local expert.
* A copy sent towards a group carries only the expert ids inside that group, so the copies of a
  token partition its experts and every (token, expert) pair is computed exactly once.

What travels with the rows (metadata), per step: the split counts (one int64 per peer; the
AlltoAll of rows needs them), the ids as a bitmask over the destination unit's slots (ceil(S / 8)
bytes for a unit of S slots: 4 bytes towards a node of Qwen3's 32 slots, 1 byte towards a GPU of
4), and the gate weights of the experts in the destination unit only (one per (row, expert) pair,
in the router's dtype, so the router gradient is exact). At hidden 2048 in bf16 that is well under
1% of the token bytes (K = 8 int64 ids and K weights on every copy would be 2.3%). Four
AlltoAlls per step (counts, ids, rows, weights) in the dispatch, one (rows) per step in the
combine; `impl.hiermoe.dimension.route_collectives` models exactly these.

Combine [reconstruction: the paper does not describe it]: the exact reverse route. Each GPU sums
the gate-weighted outputs of its local experts per row, and every forwarding rank adds the
partial sums of the copies it sent, so the combine carries the same deduplicated rows as the
dispatch. Backward of both is autograd's: the gradient of a replication is a sum and vice versa;
the backward of the dispatch also returns the gate-weight gradients.

Hd (no dedup, for the ablation) is the same route over rows that are (token, expert) pairs from
the start: one copy per pair at every step. H1 is Megatron's flat AlltoAll.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from impl.common.comm import Comm, CommGroup, all_to_all_autograd
from impl.common.registry import register
from impl.common.dispatcher import DispatchedTokens, ExpertPlacement, TokenDispatcher
from impl.common.routing import RoutingResult

__all__ = ["HierarchicalDispatcher", "HierDAlltoAllDispatcher", "RouteStep", "HierDispatchMeta", "step_groups",
           "build_route", "pack_bits", "unpack_bits"]


@dataclass(frozen=True)
class RouteStep:
    """One sub-AlltoAll of the route, as seen from one rank: which held rows go to which member
    (`send_idx`, member-major), and which held (row, expert) pairs' gate weights go with them."""

    group: CommGroup
    rows_before: int                # rows held before the step
    send_idx: torch.Tensor          # those rows -> send buffer (member-major)
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    pair_send_idx: torch.Tensor     # pairs held before the step -> weight send buffer
    pair_send_splits: tuple[int, ...]
    pair_recv_splits: tuple[int, ...]


@dataclass(frozen=True)
class HierDispatchMeta:
    placement: ExpertPlacement
    num_tokens: int
    token_of_row: torch.Tensor | None   # Hd: the token of each initial (token, expert) row; HDd: None
    steps: tuple[RouteStep, ...]
    expand_row: torch.Tensor            # final row of every expert-input row (local-expert-major)
    expand_pair: torch.Tensor           # final pair (gate weight) of every expert-input row
    tokens_per_local_expert: tuple[int, ...]
    final_rows: int


def step_groups(comm: Comm, dim: int) -> list[tuple[CommGroup, int, int]]:
    """(group, unit level, first unit) for each step of an HD`dim` route on this rank:
    Inter-1..Inter-(dim-1), then Intra-(dim-1). Member j of a step's group serves the experts
    of unit `first unit + j`, a unit being a level-`unit level` group (E / U[level] slots);
    the final intra step's units are single GPUs (level D)."""
    topo = comm.topology
    out = []
    for i in range(1, dim):
        # members cover the level-i child groups inside this rank's level-(i-1) group, in order
        first_child = topo.group_index(comm.rank, i - 1) * (topo.U[i] // topo.U[i - 1])
        out.append((comm.group("inter", i), i, first_child))
    g = comm.group("intra", dim - 1)
    out.append((g, topo.D, g.ranks[0]))
    return out


@lru_cache(maxsize=None)
def _bit_values(device: torch.device) -> torch.Tensor:
    """The value of each bit of a byte (uint8: the packed ids' type), made once per device: pack and
    unpack run at every step of every dispatch. Cached by device alone, the one thing it depends on."""
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits(mask_RB: torch.Tensor) -> torch.Tensor:
    """bool [R, B] -> uint8 [R, ceil(B / 8)], bit b of row r at byte b // 8, bit b % 8."""
    R, B = mask_RB.shape
    nb = -(-B // 8)
    padded = torch.zeros(R, nb * 8, dtype=torch.uint8, device=mask_RB.device)
    padded[:, :B] = mask_RB
    return (padded.view(R, nb, 8) * _bit_values(mask_RB.device)).sum(2, dtype=torch.uint8)


def unpack_bits(packed_RN: torch.Tensor, B: int) -> torch.Tensor:
    """The inverse of `pack_bits`: uint8 [R, ceil(B / 8)] -> bool [R, B]."""
    bits = packed_RN.unsqueeze(2).bitwise_and(_bit_values(packed_RN.device)).ne(0)
    return bits.view(packed_RN.shape[0], packed_RN.shape[1] * 8)[:, :B]


def build_route(comm: Comm, steps, num_experts: int, rows: int, row_P: torch.Tensor, slot_P: torch.Tensor,
                recv_splits_of=None) -> tuple[list[RouteStep], int, torch.Tensor, torch.Tensor]:
    """Follow the (row, slot) pairs a rank holds through the route's steps: at each step every row
    goes once to each member whose unit hosts one of its slots, carrying a bitmask of those slots
    (the ids: one bit per slot of the destination unit) and their gate weights. Exchanges the split
    counts (`recv_splits_of(step index, group, send splits)`; default one count per peer, by
    `Comm.exchange_counts`) and the ids; returns (steps, final rows, final row_P, final slot_P),
    pairs sorted by (row, slot)."""
    route = []
    for k, (group, level, first_unit) in enumerate(steps):
        spu = num_experts // comm.topology.U[level]
        n = group.size
        member_P = slot_P // spu - first_unit
        key_P = member_P * max(rows, 1) + row_P
        copy_key, pair_copy = torch.unique(key_P, sorted=True, return_inverse=True)   # member-major, rows asc
        member_C, row_C = copy_key // max(rows, 1), copy_key % max(rows, 1)
        send_splits = torch.bincount(member_C, minlength=n).tolist()
        pair_order = torch.argsort(pair_copy * spu + (slot_P - (first_unit + member_P) * spu), stable=True)
        mask_CB = torch.zeros(copy_key.numel(), spu, dtype=torch.bool, device=slot_P.device)
        mask_CB[pair_copy, slot_P - (first_unit + member_P) * spu] = True
        recv_splits = (comm.exchange_counts(send_splits, group) if recv_splits_of is None
                       else recv_splits_of(k, group, send_splits))
        got = comm.all_to_all(pack_bits(mask_CB), send_splits, recv_splits, group, category="meta")
        mask_RB = unpack_bits(got, spu)
        row_P, bit_P = mask_RB.nonzero(as_tuple=True)                                   # row-major, slots asc
        per_row = mask_RB.sum(1).cpu()                                                 # summed per member on the host
        bounds = torch.tensor([0] + recv_splits).cumsum(0)
        pair_recv = [int(per_row[a:b].sum()) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
        route.append(RouteStep(group, rows, row_C, tuple(send_splits), tuple(recv_splits), pair_order,
                               tuple(torch.bincount(member_P, minlength=n).tolist()), tuple(pair_recv)))
        rows = int(sum(recv_splits))
        slot_P = (first_unit + group.index(comm.rank)) * spu + bit_P
    return route, rows, row_P, slot_P


class HierarchicalDispatcher(TokenDispatcher):
    """HD`dim` (dedup=True) or H`dim` (dedup=False) AlltoAll over the comm's topology."""

    def __init__(self, comm: Comm, num_experts: int, *, dim: int, dedup: bool = True):
        super().__init__(comm, num_experts)
        D = comm.topology.D
        if not 1 <= dim <= D:
            raise ValueError(f"dimension d={dim} not available on topology {comm.topology.name!r}; "
                             f"allowed: 1..{D}")
        self.dim, self.dedup = dim, dedup
        self._steps = step_groups(comm, dim)

    @property
    def name(self) -> str:
        return f"{'HD' if self.dedup else 'H'}{self.dim}"

    def initial_pairs(self, x_TM: torch.Tensor, routing: RoutingResult, placement: ExpertPlacement):
        """(rows, token_of_row or None, row_P, slot_P, gate weight_P): a row per token (HDd) or per
        (token, expert) pair (Hd); pairs sorted by (row, slot)."""
        map_TS = placement.to_slots(routing.routing_map_TE)
        probs_TS = placement.to_slots(routing.probs_TE)
        tok_P, slot_P = map_TS.nonzero(as_tuple=True)                 # token-major, slots ascending
        w_P = probs_TS[tok_P, slot_P]
        if self.dedup:
            return x_TM, None, tok_P, slot_P, w_P
        return x_TM.index_select(0, tok_P), tok_P, torch.arange(tok_P.numel(), device=tok_P.device), slot_P, w_P

    def recv_splits_of(self, routing_map_TS: torch.Tensor):
        """Hook for a dispatcher that learns every step's receive splits at once (None: each step
        exchanges its counts)."""
        return None

    def dispatch_preprocess(self, x_TM: torch.Tensor, routing: RoutingResult,
                            placement: ExpertPlacement | None = None):
        self.check_routing(routing)
        placement = self.placement_or_identity(placement)
        rows, token_of_row, row_P, slot_P, w_P = self.initial_pairs(x_TM, routing, placement)
        steps, final_rows, row_P, slot_P = build_route(
            self.comm, self._steps, self.num_experts, rows.shape[0], row_P, slot_P,
            self.recv_splits_of(placement.to_slots(routing.routing_map_TE)))
        # local expansion: one expert-input row per final pair (all of them are this GPU's slots)
        El = self.num_local_experts
        local_P = slot_P - self.comm.rank * El
        order_P = torch.argsort(local_P * max(final_rows, 1) + row_P, stable=True)
        meta = HierDispatchMeta(
            placement=placement, num_tokens=x_TM.shape[0], token_of_row=token_of_row, steps=tuple(steps),
            expand_row=row_P[order_P], expand_pair=order_P,
            tokens_per_local_expert=tuple(torch.bincount(local_P, minlength=El).tolist()),
            final_rows=final_rows)
        return rows, w_P, meta

    def token_dispatch(self, rows, probs, meta: HierDispatchMeta):
        """Each step moves the rows and, beside them, the gate weights of the experts each copy
        serves (`probs` holds one weight per held (row, expert) pair)."""
        for st in meta.steps:
            rows = all_to_all_autograd(self.comm, rows.index_select(0, st.send_idx), st.send_splits,
                                       st.recv_splits, st.group)
            probs = all_to_all_autograd(self.comm, probs.index_select(0, st.pair_send_idx), st.pair_send_splits,
                                        st.pair_recv_splits, st.group, category="meta")
        return rows, probs

    def dispatch_postprocess(self, rows, probs, meta: HierDispatchMeta):
        return DispatchedTokens(rows.index_select(0, meta.expand_row), probs.index_select(0, meta.expand_pair),
                                meta.tokens_per_local_expert)

    def combine_preprocess(self, expert_out_RM, meta: HierDispatchMeta):
        """Per-row partial sums of this GPU's experts (the outputs are already gate-weighted)."""
        out = expert_out_RM.new_zeros((meta.final_rows,) + tuple(expert_out_RM.shape[1:]))
        return out.index_add(0, meta.expand_row, expert_out_RM)

    def token_combine(self, rows, meta: HierDispatchMeta):
        """Reverse route: each step sends partial sums back and the sender adds up the copies."""
        for st in reversed(meta.steps):
            back = all_to_all_autograd(self.comm, rows, st.recv_splits, st.send_splits, st.group)
            rows = back.new_zeros((st.rows_before,) + tuple(back.shape[1:])).index_add(0, st.send_idx, back)
        return rows

    def combine_postprocess(self, rows, meta: HierDispatchMeta):
        if meta.token_of_row is None:
            return rows
        out = rows.new_zeros((meta.num_tokens,) + tuple(rows.shape[1:]))
        return out.index_add(0, meta.token_of_row, rows)



@dataclass(frozen=True)
class AdaptiveDispatchMeta:
    dim: int                      # d* chosen for this dispatch
    inner: HierDispatchMeta

    @property
    def placement(self) -> ExpertPlacement:
        return self.inner.placement


class HierDAlltoAllDispatcher(TokenDispatcher):
    """HierD-AlltoAll: HDd with d = d* chosen per dispatch (per layer, per step) by the alpha-beta
    model of `profile` (Eqs. (1)-(7), Algorithm 1) from globally reduced duplicate-free counts
    under the placement of this dispatch, so every rank picks the same d and issues the same
    collectives. The routes of every d are built once (they hold step groups, no placement); the
    choice costs one small all-reduce per dispatch."""

    def __init__(self, comm: Comm, num_experts: int, *, profile=None, bytes_per_elem: int | None = None):
        super().__init__(comm, num_experts)
        from impl.common.costmodel import load_profile
        from impl.hiermoe.dimension import check_profile

        self.profile = load_profile(profile or comm.topology.name) if not hasattr(profile, "comm_time") else profile
        check_profile(self.profile, comm.topology)
        self.bytes_per_elem = bytes_per_elem
        self.routes = {d: HierarchicalDispatcher(comm, num_experts, dim=d, dedup=True)
                       for d in range(1, comm.topology.D + 1)}
        self.last_dim: int | None = None

    @property
    def name(self) -> str:
        return "HierD"

    def dispatch_preprocess(self, x_TM: torch.Tensor, routing: RoutingResult,
                            placement: ExpertPlacement | None = None):
        from impl.hiermoe.dimension import choose_dimension

        self.check_routing(routing)
        placement = self.placement_or_identity(placement)
        v = self.bytes_per_elem or x_TM.element_size()
        d = choose_dimension(self.comm, routing.routing_map_TE, placement, x_TM.shape[-1], v, self.profile,
                             routing.probs_TE.element_size())
        self.last_dim = d
        rows, probs, inner = self.routes[d].dispatch_preprocess(x_TM, routing, placement)
        return rows, probs, AdaptiveDispatchMeta(d, inner)

    def token_dispatch(self, rows, probs, meta: AdaptiveDispatchMeta):
        return self.routes[meta.dim].token_dispatch(rows, probs, meta.inner)

    def dispatch_postprocess(self, rows, probs, meta: AdaptiveDispatchMeta):
        return self.routes[meta.dim].dispatch_postprocess(rows, probs, meta.inner)

    def combine_preprocess(self, expert_out_RM, meta: AdaptiveDispatchMeta):
        return self.routes[meta.dim].combine_preprocess(expert_out_RM, meta.inner)

    def token_combine(self, rows, meta: AdaptiveDispatchMeta):
        return self.routes[meta.dim].token_combine(rows, meta.inner)

    def combine_postprocess(self, rows, meta: AdaptiveDispatchMeta):
        return self.routes[meta.dim].combine_postprocess(rows, meta.inner)


register("dispatcher", "hierd")(HierDAlltoAllDispatcher)

def _variant(dim: int, dedup: bool):
    def factory(comm: Comm, num_experts: int):
        return HierarchicalDispatcher(comm, num_experts, dim=dim, dedup=dedup)
    factory.__qualname__ = f"{'HD' if dedup else 'H'}{dim}"
    return factory


# Named variants for configs: hd1..hd4 (dedup) and h1..h4 (hierarchical, no dedup), as deep as the
# deepest shipped topology (the HierMoE testbed, D = 4); deeper topologies use `hierd`. A name whose
# d exceeds the topology's depth fails at construction with the allowed range.
for _d in range(1, 5):
    register("dispatcher", f"hd{_d}")(_variant(_d, True))
    register("dispatcher", f"h{_d}")(_variant(_d, False))
