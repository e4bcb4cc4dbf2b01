"""`RoutingResult`: the routing of T tokens over E experts, as every gate returns it and every
dispatcher takes it (Megatron-core's convention: a boolean routing map and a probability matrix,
both [T, E]).

It is the contract between gates, dispatchers and traces, owned by none of them, so it has a
module of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingResult:
    """Routing of T tokens over E experts.

    routing_map_TE: bool, True where token t is sent to expert e (after capacity drops).
    probs_TE:       float, the combine weight of (t, e); zero where routing_map_TE is False.
                    Differentiable with respect to the gate's parameters and input.
    aux_loss:       scalar load-balancing loss of the gate, or None when the gate defines none.
    z_loss:         scalar router z-loss, or None.
    num_dropped:    (token, expert) assignments removed by the capacity limit.
    """

    routing_map_TE: torch.Tensor
    probs_TE: torch.Tensor
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    num_dropped: int = 0

    @property
    def num_tokens(self) -> int:
        return self.routing_map_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.routing_map_TE.shape[1]

    def tokens_per_expert(self) -> torch.Tensor:
        return self.routing_map_TE.sum(dim=0)
