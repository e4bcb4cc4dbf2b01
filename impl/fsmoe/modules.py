"""FSMoE's replaceable sub-modules around the pipelined core: Gate, Order / I-Order, and the six
hooks (the Dispatch / Combine algorithm is `impl.common.equal_slice`'s, chosen by name; the
Expert is `experts.ShardedExperts`).

* Gates: GShard (noisy top-k), Sigmoid, X-MoE and Expert Choice are the substrate's gates
  (`impl.common.routing`); SoftMoE's router is too, with its slots as its own Order / I-Order.
* Orders: `TokenOrder` lays tokens into the [E, C, M] capacity layout by either of the
  substrate's orderings (Tutel's index, GShard's one-hot einsum) and combines back with the gate
  weights; `SlotOrder` mixes every token into SoftMoE's E x S slots and back.
* `CallbackBase`: the six hooks, each returning the (possibly replaced) tensor. The MoE start
  and end hooks run in autograd; the dispatch and combine hooks run on every message of the
  pipelined core, in both passes (see the package docstring).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impl.common.ordering import ORDERS, CapacityPlan, plan_capacity
from impl.common.routing import GateConfig, RoutingResult, SoftMoERouter, SoftMoEWeights, build_gate

from .config import MoELayerConfig

__all__ = ["CallbackBase", "build_gate_module", "TokenOrder", "SlotOrder", "build_order", "OrderContext"]


class CallbackBase:
    """No-op hooks; subclass and override the ones you need. `phase` is 'fwd' or 'bwd' and `chunk`
    the pipeline chunk for the message hooks."""

    def before_moe_start(self, x_TM: torch.Tensor) -> torch.Tensor:
        return x_TM

    def before_moe_end(self, y_TM: torch.Tensor) -> torch.Tensor:
        return y_TM

    def before_dispatch(self, rows: torch.Tensor, chunk: int, phase: str) -> torch.Tensor:
        return rows

    def after_dispatch(self, rows: torch.Tensor, chunk: int, phase: str) -> torch.Tensor:
        return rows

    def before_combine(self, rows: torch.Tensor, chunk: int, phase: str) -> torch.Tensor:
        return rows

    def after_combine(self, rows: torch.Tensor, chunk: int, phase: str) -> torch.Tensor:
        return rows


def build_gate_module(cfg: MoELayerConfig) -> nn.Module:
    """The gate of `cfg`: a substrate gate (no capacity: FSMoE's Order applies it), or SoftMoE."""
    if cfg.gate == "softmoe":
        return SoftMoERouter(cfg.hidden, cfg.num_experts, cfg.slots_per_expert)
    capacity_factor = cfg.capacity_factor if cfg.gate == "expert_choice" else None
    gate_cfg = GateConfig(kind=cfg.gate, top_k=cfg.top_k, capacity_factor=capacity_factor, **cfg.gate_options)
    return build_gate(gate_cfg, cfg.hidden, cfg.num_experts)


@dataclass(frozen=True)
class OrderContext:
    """What I-Order needs from Order: the capacity plan and gate weights, or SoftMoE's weights."""

    plan: CapacityPlan | None = None
    probs_TE: torch.Tensor | None = None
    soft: SoftMoEWeights | None = None


class TokenOrder:
    """Discrete routing -> [E * C, M] rows by `impl.common.ordering` ('tutel' or 'gshard')."""

    def __init__(self, kind: str):
        self.ordering = ORDERS[kind]()

    @staticmethod
    def counts(gate_out: RoutingResult) -> torch.Tensor:
        """Rows each expert would receive without a capacity limit."""
        return gate_out.routing_map_TE.sum(0)

    def order(self, x_TM: torch.Tensor, gate_out: RoutingResult, capacity: int) -> tuple[torch.Tensor, OrderContext]:
        plan = plan_capacity(gate_out.routing_map_TE, capacity)
        return self.ordering.order(x_TM, plan), OrderContext(plan=plan, probs_TE=gate_out.probs_TE)

    def iorder(self, y_RM: torch.Tensor, ctx: OrderContext) -> torch.Tensor:
        return self.ordering.iorder(y_RM, ctx.plan, ctx.probs_TE)


class SlotOrder:
    """SoftMoE: every slot's input is a convex mix of all tokens; outputs mix back per token."""

    @staticmethod
    def counts(gate_out: SoftMoEWeights) -> None:
        return None

    def order(self, x_TM: torch.Tensor, gate_out: SoftMoEWeights, capacity: int) -> tuple[torch.Tensor, OrderContext]:
        return gate_out.slots_from_tokens(x_TM), OrderContext(soft=gate_out)

    def iorder(self, y_RM: torch.Tensor, ctx: OrderContext) -> torch.Tensor:
        return ctx.soft.tokens_from_slots(y_RM)


def build_order(cfg: MoELayerConfig) -> Any:
    return SlotOrder() if cfg.gate == "softmoe" else TokenOrder(cfg.order)
