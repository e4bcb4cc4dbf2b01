"""Tutel's 2-D hierarchical AlltoAll (2DH) as a token dispatcher, over capacity-padded equal slices.

Tutel (and DeepSpeed-MoE, `baselines.deepspeed_moe.sim`) does not send one row per routed
(token, expert) pair: every rank lays out a [E, C, M] buffer, C rows for every expert whether
used or not (unused rows are zeros), and exchanges equal slices of E/G * C rows. So the bytes on
the wire are fixed by C, not by the routing: **padding is sent and counted** by the
TrafficCounter like any other row.

Capacity C (`tutel_capacity`, Tutel's `capacity_factor` convention):
* cf > 0: C = top_k * int(cf * ceil(T / E)), fixed;
* cf = 0: dynamic, C = the largest per-expert row count of any rank, agreed by an all_reduce
  max (Tutel's dropless mode);
* cf < 0: dynamic, bounded: C = min(that global max, top_k * int(-cf * ceil(T / E))).
The dispatcher never drops: which (token, expert) pairs survive is the gate's capacity policy
(e.g. `GateConfig(capacity_factor=..., drop_policy='position')`). If the gate kept more rows
for one expert than C, every rank raises the same ValueError instead of corrupting the exchange.
For that, `dispatch_preprocess` runs one all_reduce(max) of three ints in every mode (Tutel
needs it only in the dynamic modes), counted as metadata.

The layout is `impl.common.ordering`'s (Tutel-style index ordering) and the exchange is
`impl.common.equal_slice`'s 2DH algorithm (level 0 of the topology is the node, everything below
it is "intra-node"): a stride copy, an intra-node AlltoAll, a stride copy back and an inter-node
AlltoAll among the GPUs with the same local index, so each rank sends N - 1 inter-node messages
of Gn slices instead of (N - 1) * Gn messages of one slice. The result is exactly a flat
AlltoAll's. The combine runs the same exchange on the returning buffer (an equal-slice AlltoAll
is its own inverse pattern), as Tutel does.

Gate weights are applied on the home rank in `combine_postprocess` (Tutel's decode / DeepSpeed's
combine), so no gate weights cross the network; the experts receive unit weights (`probs_R` = 1).
Inside one expert's slice rows are in token order (Tutel puts first choices before second
choices); positions inside a slice change neither the result nor the bytes.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch

from impl.common.comm import Comm
from impl.common.dispatcher import DispatchedTokens, ExpertPlacement, TokenDispatcher
from impl.common.equal_slice import equal_slice_all_to_all_autograd
from impl.common.ordering import CapacityPlan, IndexOrder, plan_capacity
from impl.common.registry import register
from impl.common.routing import RoutingResult
from impl.common.topology import Topology
from impl.hiermoe.dimension import COUNT_BYTES, Collective, a2a_collective, allreduce_collective

__all__ = ["PaddedDispatchMeta", "CapacityPaddedDispatcher", "Tutel2DHDispatcher", "tutel_capacity", "uses_2dh",
           "capacity_of", "tutel_2dh_collectives"]

_ORDER = IndexOrder()


def uses_2dh(comm: Comm | Topology) -> bool:
    """2DH needs at least two nodes with at least two GPUs each; otherwise it is a flat AlltoAll."""
    topo = comm if isinstance(comm, Topology) else comm.topology
    return topo.D >= 2 and topo.num_nodes > 1 and topo.gpus_per_node > 1


def tutel_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tutel's fixed capacity bound: top_k * int(|cf| * ceil(T / E))."""
    return top_k * int(abs(capacity_factor) * ((num_tokens + num_experts - 1) // num_experts))


@dataclass(frozen=True)
class PaddedDispatchMeta:
    """Everything the later stages need: the capacity layout of the slots (buffer row = slot * C +
    position in the slot's slice) and the gate weights in slot order (they keep the router's graph)."""

    placement: ExpertPlacement
    plan: CapacityPlan
    probs_TS: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.plan.capacity


class CapacityPaddedDispatcher(TokenDispatcher):
    """Equal-slice dispatcher: a [E, C, M] buffer per rank, exchanged flat or by 2DH.

    Subclasses give the capacity rule (`capacity_rule`); the six stages are shared."""

    hierarchical: bool = False

    @abstractmethod
    def capacity_rule(self, num_tokens: int) -> tuple[int | None, bool]:
        """(fixed bound or None, dynamic): dynamic means C = the global max per-expert count
        (capped by the bound when there is one); otherwise C = the bound."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def _agree_capacity(self, num_tokens: int, local_max: int) -> int:
        """One all_reduce(max) of three ints gives every rank the global max count and checks that
        all ranks computed the same fixed bound (equal slices need the same C everywhere)."""
        bound, dynamic = self.capacity_rule(num_tokens)
        b = -1 if bound is None else bound
        stats = self.comm.reduce_on_host(torch.tensor([local_max, b, -b], dtype=torch.int64), "max").tolist()
        global_max, b_max, b_min = stats[0], stats[1], -stats[2]
        if b_max != b_min:
            raise ValueError(f"{self.name}: capacity differs across ranks ({b_min}..{b_max}) because their "
                             "token counts differ; an equal-slice all-to-all needs the same T on every rank")
        capacity = (global_max if bound is None else min(global_max, bound)) if dynamic else bound
        if global_max > capacity:
            raise ValueError(f"{self.name}: the gate kept {global_max} (token, expert) pairs for one expert, more "
                             f"than the capacity C={capacity}; give the gate a capacity limit of at most {capacity} "
                             "per expert (it decides what is dropped) or use a dynamic capacity")
        return capacity

    # ---- the six stages -------------------------------------------------------------------
    def dispatch_preprocess(self, x_TM: torch.Tensor, routing: RoutingResult,
                            placement: ExpertPlacement | None = None):
        self.check_routing(routing)
        placement = self.placement_or_identity(placement)
        map_TS = placement.to_slots(routing.routing_map_TE)
        probs_TS = placement.to_slots(routing.probs_TE)
        T = map_TS.shape[0]
        local_max = int(map_TS.sum(0).max()) if T else 0
        plan = plan_capacity(map_TS, self._agree_capacity(T, local_max))   # drops nothing: C >= every count
        return _ORDER.order(x_TM, plan), None, PaddedDispatchMeta(placement, plan, probs_TS)

    def _exchange(self, rows):
        return equal_slice_all_to_all_autograd(self.comm, rows, "2dh" if self.hierarchical else "flat")

    def token_dispatch(self, rows, probs, meta: PaddedDispatchMeta):
        return self._exchange(rows), probs

    def dispatch_postprocess(self, rows, probs, meta: PaddedDispatchMeta):
        """[G source][E_local][C] -> [E_local][G source][C]: rows grouped by local expert."""
        G, El, C = self.comm.world_size, self.num_local_experts, meta.capacity
        rest = tuple(rows.shape[1:])
        x_RM = rows.reshape(G, El, C, *rest).transpose(0, 1).reshape(G * El * C, *rest)
        return DispatchedTokens(x_RM, x_RM.new_ones(x_RM.shape[0]), (G * C,) * El)

    def combine_preprocess(self, expert_out_RM, meta: PaddedDispatchMeta):
        G, El, C = self.comm.world_size, self.num_local_experts, meta.capacity
        rest = tuple(expert_out_RM.shape[1:])
        return expert_out_RM.reshape(El, G, C, *rest).transpose(0, 1).reshape(G * El * C, *rest)

    def token_combine(self, rows, meta: PaddedDispatchMeta):
        return self._exchange(rows)

    def combine_postprocess(self, rows, meta: PaddedDispatchMeta):
        """y[t] = sum over t's kept pairs of gate weight * expert output (padding rows are unread)."""
        return _ORDER.iorder(rows, meta.plan, meta.probs_TS)


@register("dispatcher", "tutel-2dh")
class Tutel2DHDispatcher(CapacityPaddedDispatcher):
    """Tutel's MoE exchange with `use_2dh=True`: capacity-padded equal slices, 2DH AlltoAll.

    capacity_factor: Tutel's convention (module docstring); 0 (default) = dropless dynamic.
    top_k: experts per token, needed by the fixed bound (cf != 0)."""

    hierarchical = True

    def __init__(self, comm: Comm, num_experts: int, *, capacity_factor: float = 0.0, top_k: int | None = None):
        super().__init__(comm, num_experts)
        if not isinstance(capacity_factor, (int, float)) or isinstance(capacity_factor, bool) \
                or not math.isfinite(capacity_factor):
            raise ValueError(f"tutel-2dh capacity_factor: {capacity_factor!r} is not allowed; expected a finite "
                             "number (> 0 fixed, 0 dropless, < 0 dynamic with a bound)")
        if capacity_factor != 0 and (top_k is None or isinstance(top_k, bool) or not isinstance(top_k, int)
                                     or not 1 <= top_k <= num_experts):
            raise ValueError(f"tutel-2dh top_k: {top_k!r} is not allowed with capacity_factor={capacity_factor}; "
                             f"expected an integer in 1..{num_experts} (the bound is top_k * int(|cf| * ceil(T/E)))")
        self.capacity_factor, self.top_k = float(capacity_factor), top_k

    @property
    def name(self) -> str:
        return "tutel-2dh"

    def capacity_rule(self, num_tokens):
        if self.capacity_factor == 0:
            return None, True
        bound = tutel_capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor)
        return bound, self.capacity_factor < 0


def capacity_of(counts_GE: torch.Tensor, num_tokens: int, top_k: int, capacity_factor: float) -> int:
    """The capacity C every rank agrees on (module docstring), from the [G, E] per-rank expert
    counts of the routing the dispatcher receives (after the gate's drops)."""
    largest = int(counts_GE.max()) if counts_GE.numel() else 0
    if capacity_factor == 0:
        return largest
    bound = tutel_capacity(num_tokens, counts_GE.shape[1], top_k, capacity_factor)
    return min(largest, bound) if capacity_factor < 0 else bound


def tutel_2dh_collectives(topology: Topology, num_experts: int, capacity: int, row_bytes: int, *,
                          with_levels: bool = True) -> tuple[Collective, ...]:
    """Every collective of `Tutel2DHDispatcher` for one layer in one iteration: the capacity
    all-reduce (three int64), then per exchange (dispatch, combine, and the backward twin of
    each) the intra-node AlltoAll of N * E/G * C rows per member and the inter-node AlltoAll of
    Gn * E/G * C rows per member; one flat AlltoAll of E/G * C rows per peer without 2DH. No
    metadata crosses the network (gate weights stay home)."""
    G, El = topology.G, num_experts // topology.G
    B = El * capacity

    def exchange(stage, phase):
        kw = dict(with_levels=with_levels, stage=stage, phase=phase, what="tokens", category="tokens")
        if not uses_2dh(topology):
            return [a2a_collective(topology, topology.D, 0, torch.full((G, G), B), row_bytes, **kw)]
        N, Gn = topology.num_nodes, topology.gpus_per_node
        intra = a2a_collective(topology, topology.D, 1, torch.full((Gn, G), N * B), row_bytes, **kw)
        inter = a2a_collective(topology, 1, 0, torch.full((G, N), Gn * B), row_bytes, **kw)
        return [intra, inter]

    agree = allreduce_collective(topology, 3, COUNT_BYTES)
    return (agree, *exchange("dispatch", "fwd"), *exchange("combine", "fwd"), *exchange("combine", "bwd"),
            *exchange("dispatch", "bwd"))
