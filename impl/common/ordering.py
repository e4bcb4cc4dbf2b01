"""Ordering and its inverse: tokens [T, M] <-> the capacity layout [E, C, M] that capacity-padded
systems (Tutel, DeepSpeed-MoE, FSMoE) exchange, C rows per expert whether used or not.

Capacity: C = ceil(k * f * T / E) (FSMoE's T = k f B L / E), rounded up to a multiple of
`multiple` so a pipeline can split the capacity axis evenly in forward and backward (FSMoE pads to
lcm(r_fwd, r_bwd)); `capacity_factor=None` is the no-drop mode: C = the largest per-expert count
(rounded up the same way). Which pairs a full expert drops is ours where the papers differ: the
(token, expert) pairs of each expert keep token order and those at position >= C are dropped
(Megatron's 'position' policy; Tutel fills first choices before second ones). Dropped pairs
contribute nothing to the output.

Two implementations of the same map, tested equal:
* `IndexOrder` (Tutel-style): the kept pairs' buffer rows e * C + position, one index_select to
  lay out and one index_add to combine;
* `EinsumOrder` (GShard-style): a one-hot dispatch mask [T, E, C]; lay out by einsum
  'tec,tm->ecm', combine by einsum 'tec,ecm->tm' with the gate weights folded into the mask.
Both are differentiable in x and in the gate weights (I-Order multiplies each expert output row by
its pair's weight and sums a token's rows).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

__all__ = ["capacity", "no_drop_capacity", "CapacityPlan", "plan_capacity", "Order", "IndexOrder", "EinsumOrder",
           "ORDERS"]


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, multiple: int = 1) -> int:
    """C = ceil(top_k * capacity_factor * T / E), rounded up to `multiple` (at least `multiple`)."""
    if not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor: {capacity_factor!r} is not allowed; allowed: a number > 0 "
                         "(or no-drop mode)")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"capacity multiple: {multiple!r} is not allowed; allowed: an integer >= 1")
    return _round_up(math.ceil(top_k * capacity_factor * num_tokens / num_experts - 1e-9), multiple)


def no_drop_capacity(max_count: int, multiple: int = 1) -> int:
    """The no-drop capacity: the largest per-expert count, rounded up to `multiple`."""
    return _round_up(int(max_count), multiple)


@dataclass(frozen=True)
class CapacityPlan:
    """Where every kept (token, expert) pair sits in the [E, C] layout."""

    num_tokens: int
    num_experts: int
    capacity: int
    token_P: torch.Tensor      # token of each kept pair (token-major order)
    expert_P: torch.Tensor     # its expert (column of the routing map)
    row_P: torch.Tensor        # its buffer row: expert * C + position
    dropped: int               # (token, expert) pairs beyond capacity

    @property
    def rows(self) -> int:
        return self.num_experts * self.capacity


def plan_capacity(routing_map_TE: torch.Tensor, capacity_rows: int) -> CapacityPlan:
    """Positions in token order per expert; pairs at position >= C are dropped."""
    T, E = routing_map_TE.shape
    position_TE = routing_map_TE.long().cumsum(0) - 1
    keep_TE = routing_map_TE & (position_TE < capacity_rows)
    token_P, expert_P = keep_TE.nonzero(as_tuple=True)
    row_P = expert_P * capacity_rows + position_TE[token_P, expert_P]
    dropped = int(routing_map_TE.sum()) - int(token_P.numel())
    return CapacityPlan(T, E, capacity_rows, token_P, expert_P, row_P, dropped)


class Order(ABC):
    """Order: tokens -> [E * C, M] rows (expert-major, C per expert); I-Order: back, weighted."""

    name = "order"

    @abstractmethod
    def order(self, x_TM: torch.Tensor, plan: CapacityPlan) -> torch.Tensor: ...

    @abstractmethod
    def iorder(self, y_RM: torch.Tensor, plan: CapacityPlan, probs_TE: torch.Tensor) -> torch.Tensor:
        """y[t] = sum over t's kept pairs (t, e) of probs[t, e] * y_rows[row of (t, e)]."""


class IndexOrder(Order):
    """Tutel-style sparse index ordering."""

    name = "tutel"

    def order(self, x_TM, plan):
        source_R = torch.full((plan.rows,), plan.num_tokens, dtype=torch.long, device=x_TM.device)
        source_R[plan.row_P] = plan.token_P                           # padding rows read a zero row
        x_pad = torch.cat([x_TM, x_TM.new_zeros((1,) + tuple(x_TM.shape[1:]))])
        return x_pad.index_select(0, source_R)

    def iorder(self, y_RM, plan, probs_TE):
        weighted = (y_RM.index_select(0, plan.row_P) * probs_TE[plan.token_P, plan.expert_P].unsqueeze(-1))
        out = y_RM.new_zeros((plan.num_tokens,) + tuple(y_RM.shape[1:]))
        return out.index_add(0, plan.token_P, weighted.to(y_RM.dtype))


class EinsumOrder(Order):
    """GShard-style one-hot einsum ordering."""

    name = "gshard"

    @staticmethod
    def _mask(plan: CapacityPlan, dtype, device) -> torch.Tensor:
        mask = torch.zeros(plan.num_tokens, plan.rows, dtype=dtype, device=device)
        mask[plan.token_P, plan.row_P] = 1
        return mask.view(plan.num_tokens, plan.num_experts, plan.capacity)

    def order(self, x_TM, plan):
        mask_TEC = self._mask(plan, x_TM.dtype, x_TM.device)
        return torch.einsum("tec,tm->ecm", mask_TEC, x_TM).reshape(plan.rows, -1)

    def iorder(self, y_RM, plan, probs_TE):
        mask_TEC = self._mask(plan, y_RM.dtype, y_RM.device)
        combine_TEC = mask_TEC * probs_TE.to(y_RM.dtype).unsqueeze(-1)
        return torch.einsum("tec,ecm->tm", combine_TEC, y_RM.view(plan.num_experts, plan.capacity, -1))


ORDERS: dict[str, type[Order]] = {"tutel": IndexOrder, "gshard": EinsumOrder}
