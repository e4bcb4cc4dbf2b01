"""The expert-parallel MoE layer (gate -> dispatcher -> local experts -> combine) and the
single-process dense reference every dispatcher is tested against.

Gate weights are applied on the expert side (to each expert's output row, before the combine),
as in Megatron-core, so they travel with the dispatched rows and the router gradient flows
through the dispatch. The layer itself is dispatcher-agnostic: any `TokenDispatcher` plugs in.

The layer, not the dispatcher, keeps the expert placement: the local expert weights are stored in
slot order, so the placement is part of the layer's state, and it is handed to every dispatch.
`impl.common.expert_migration` moves the weights and sets `layer.placement` together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dispatcher import ExpertPlacement, TokenDispatcher
from .routing import RoutingResult

__all__ = ["MoEOutput", "ExpertParallelMoE", "dense_moe_reference"]


@dataclass
class MoEOutput:
    y_TM: torch.Tensor
    routing: RoutingResult
    dispatch_meta: object


class ExpertParallelMoE(nn.Module):
    """One rank's MoE layer: a replicated gate, this rank's experts, a dispatcher.

    `experts(x_RM, tokens_per_local_expert)` computes the rows grouped by local expert (slot
    order), e.g. `impl.common.experts.GroupedExperts`; `placement` says which logical expert each
    slot holds (identity when omitted)."""

    def __init__(self, gate: nn.Module, experts: nn.Module, dispatcher: TokenDispatcher,
                 placement: ExpertPlacement | None = None):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.dispatcher = dispatcher
        self.placement = dispatcher.placement_or_identity(placement)

    def forward(self, x_TM: torch.Tensor, routing: RoutingResult | None = None) -> MoEOutput:
        routing = self.gate(x_TM) if routing is None else routing
        tokens, meta = self.dispatcher.dispatch(x_TM, routing, self.placement)
        out_RM = self.experts(tokens.x_RM, list(tokens.tokens_per_local_expert))
        out_RM = out_RM * tokens.probs_R.unsqueeze(-1).to(out_RM.dtype)
        return MoEOutput(self.dispatcher.combine(out_RM, meta), routing, meta)


def dense_moe_reference(x_TM: torch.Tensor, routing: RoutingResult, all_experts: nn.Module) -> torch.Tensor:
    """y[t] = sum over routed e of probs[t, e] * expert_e(x[t]), expert by expert, in one process.

    `all_experts` holds all E experts (local index = global id) with the grouped-forward
    signature; each expert is called on its own rows only, so no permutation logic is shared with
    the dispatchers under test."""
    E = routing.num_experts
    y_TM = torch.zeros_like(x_TM)
    for e in range(E):
        tokens = routing.routing_map_TE[:, e].nonzero().squeeze(1)
        if tokens.numel() == 0:
            continue
        counts = [0] * E
        counts[e] = tokens.numel()
        out = all_experts(x_TM.index_select(0, tokens), counts)
        y_TM = y_TM.index_add(0, tokens, out * routing.probs_TE[tokens, e].unsqueeze(-1))
    return y_TM
