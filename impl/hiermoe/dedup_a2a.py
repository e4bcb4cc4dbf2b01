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

Combine [reconstruction: the paper does not describe it]: the exact reverse route. Each GPU sums
the gate-weighted outputs of its local experts per row, and every forwarding rank adds the
partial sums of the copies it sent, so the combine carries the same deduplicated volume as the
dispatch. Backward of both is autograd's: the gradient of a replication is a sum and vice versa,
so the four phases (dispatch, combine and their backward twins) move equal volumes. Gate weights
travel with the rows (K per row, metadata) so the router gradient is exact.

Hd (no dedup, for the ablation) is the same route over rows that are (token, expert) pairs from
the start: one copy per pair at every step. H1 is Megatron's flat AlltoAll.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from impl.common.comm import Comm, CommGroup, all_to_all_autograd
from impl.common.registry import register
from impl.common.dispatcher import DispatchedTokens, ExpertPlacement, TokenDispatcher
from impl.common.routing import RoutingResult

__all__ = ["HierarchicalDispatcher", "HierDAlltoAllDispatcher", "RouteStep", "HierDispatchMeta", "step_groups"]


@dataclass(frozen=True)
class RouteStep:
    """One sub-AlltoAll of the route, as seen from one rank."""

    group: CommGroup
    rows_before: int                # rows held before the step
    send_idx: torch.Tensor          # those rows -> send buffer (member-major)
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]


@dataclass(frozen=True)
class HierDispatchMeta:
    placement: ExpertPlacement
    num_tokens: int
    token_of_row: torch.Tensor | None   # Hd: the token of each initial (token, expert) row; HDd: None
    steps: tuple[RouteStep, ...]
    expand_row: torch.Tensor            # final row of every expert-input row (local-expert-major)
    expand_k: torch.Tensor              # which of the row's K slots it serves
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

    def _slots_per_unit(self, level: int) -> int:
        return self.num_experts // self.comm.topology.U[level]

    def dispatch_preprocess(self, x_TM: torch.Tensor, routing: RoutingResult,
                            placement: ExpertPlacement | None = None):
        self.check_routing(routing)
        placement = self.placement_or_identity(placement)
        map_TS = placement.to_slots(routing.routing_map_TE)
        probs_TS = placement.to_slots(routing.probs_TE)
        T = map_TS.shape[0]
        # every rank must ship K ids per row: agree on the largest experts-per-token of any rank
        local_K = int(map_TS.sum(1).max().item()) if T else 0
        K = max(1, int(self.comm.all_reduce(torch.tensor([local_K]), "max").item()))
        # K slot ids per token (-1 = none), and their gate weights (differentiable)
        order = torch.sort(map_TS.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :K]
        valid = torch.gather(map_TS, 1, order)
        ids_RK = torch.where(valid, order, torch.full_like(order, -1))
        probs_RK = torch.gather(probs_TS, 1, order) * valid
        token_of_row = None
        if not self.dedup:  # one row per (token, expert) pair from the start
            tok, k = valid.nonzero(as_tuple=True)
            token_of_row = tok
            ids_RK = torch.full((tok.numel(), K), -1, dtype=torch.long)
            ids_RK[torch.arange(tok.numel()), k] = order[tok, k]
            probs_RK = probs_RK[tok]
        rows = x_TM if token_of_row is None else x_TM.index_select(0, token_of_row)

        steps = []
        for group, level, first_unit in self._steps:
            spu = self._slots_per_unit(level)
            n = group.size
            member_RK = torch.where(ids_RK >= 0, ids_RK // spu - first_unit, torch.full_like(ids_RK, -1))
            inside = (member_RK >= 0) & (member_RK < n)
            need_RN = torch.zeros(ids_RK.shape[0], n + 1, dtype=torch.bool)
            need_RN.scatter_(1, torch.where(inside, member_RK, torch.full_like(member_RK, n)), True)
            need_RN = need_RN[:, :n]
            member_S, row_S = need_RN.t().nonzero(as_tuple=True)   # member-major, rows in order
            send_splits = need_RN.sum(0).tolist()
            # each copy keeps only the expert ids inside its destination member's range
            ids_SK = ids_RK.index_select(0, row_S)
            keep = member_RK.index_select(0, row_S) == member_S.unsqueeze(1)
            ids_SK = torch.where(keep, ids_SK, torch.full_like(ids_SK, -1))
            recv_splits = self.comm.exchange_counts(send_splits, group)
            ids_RK = self.comm.all_to_all(ids_SK, send_splits, recv_splits, group, category="meta")
            steps.append(RouteStep(group, need_RN.shape[0], row_S, tuple(send_splits), tuple(recv_splits)))

        # local expansion: one expert-input row per (row, k) whose slot is on this rank
        El = self.num_local_experts
        local_RK = ids_RK - self.comm.rank * El
        is_local = (ids_RK >= 0) & (local_RK >= 0) & (local_RK < El)
        row_P, k_P = is_local.nonzero(as_tuple=True)
        local_P = local_RK[row_P, k_P]
        order_P = torch.argsort(local_P * max(ids_RK.shape[0], 1) + row_P, stable=True)
        meta = HierDispatchMeta(
            placement=placement, num_tokens=T, token_of_row=token_of_row, steps=tuple(steps),
            expand_row=row_P[order_P], expand_k=k_P[order_P],
            tokens_per_local_expert=tuple(torch.bincount(local_P, minlength=El).tolist()),
            final_rows=ids_RK.shape[0])
        return rows, probs_RK, meta

    def token_dispatch(self, rows, probs, meta: HierDispatchMeta):
        for st in meta.steps:
            rows = all_to_all_autograd(self.comm, rows.index_select(0, st.send_idx), st.send_splits,
                                       st.recv_splits, st.group)
            probs = all_to_all_autograd(self.comm, probs.index_select(0, st.send_idx), st.send_splits,
                                        st.recv_splits, st.group, category="meta")
        return rows, probs

    def dispatch_postprocess(self, rows, probs, meta: HierDispatchMeta):
        return DispatchedTokens(rows.index_select(0, meta.expand_row), probs[meta.expand_row, meta.expand_k],
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
        d = choose_dimension(self.comm, routing.routing_map_TE, placement, x_TM.shape[-1], v, self.profile)
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
