"""SoftMoE (Puigcerver et al. 2023): soft mixing of all tokens into expert slots.

Not a discrete routing (no `RoutingResult`, no token dispatcher can serve it), so it shares
nothing with the gates and lives apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SoftMoEWeights:
    """Soft MoE mixing weights over S = E * slots_per_expert slots; slot s belongs to expert
    s // slots_per_expert.

    dispatch_TS: softmax over tokens for each slot (each column sums to 1): slot inputs are
                 convex combinations of all tokens.
    combine_TS:  softmax over slots for each token (each row sums to 1)."""

    dispatch_TS: torch.Tensor
    combine_TS: torch.Tensor
    slots_per_expert: int

    def slots_from_tokens(self, x_TM: torch.Tensor) -> torch.Tensor:
        """x_SM: the input of every slot."""
        return self.dispatch_TS.transpose(0, 1) @ x_TM

    def tokens_from_slots(self, y_SM: torch.Tensor) -> torch.Tensor:
        """y_TM: each token's output, mixed from all slot outputs."""
        return self.combine_TS @ y_SM


class SoftMoERouter(nn.Module):
    """SoftMoE (Puigcerver et al. 2023), one of FSMoE's gates. Not a discrete routing: every slot
    sees a weighted mix of every token, so there is no RoutingResult and token dispatchers
    cannot serve it; the experts run on `slots_from_tokens(x)` (slots_per_expert rows each) and
    `tokens_from_slots` mixes their outputs back. logits_TS = x phi with learnable slot
    parameters `slot_embed_SM`; the T tokens passed in are the group the softmax over tokens runs
    over (one sequence in the paper). The paper's optional l2-normalisation of x and phi is not
    included."""

    def __init__(self, hidden: int, num_experts: int, slots_per_expert: int = 1, init_std: float = 0.02):
        super().__init__()
        sizes = (("hidden", hidden), ("num_experts", num_experts), ("slots_per_expert", slots_per_expert))
        for name, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.hidden = hidden
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.slot_embed_SM = nn.Parameter(torch.randn(num_experts * slots_per_expert, hidden) * init_std)

    def forward(self, x_TM: torch.Tensor) -> SoftMoEWeights:
        if x_TM.dim() != 2 or x_TM.shape[1] != self.hidden or x_TM.shape[0] == 0:
            raise ValueError(f"x_TM must be [T >= 1, {self.hidden}] (hidden={self.hidden}), "
                             f"got shape {tuple(x_TM.shape)}")
        logits_TS = F.linear(x_TM.to(self.slot_embed_SM.dtype), self.slot_embed_SM)
        return SoftMoEWeights(torch.softmax(logits_TS, dim=0), torch.softmax(logits_TS, dim=1),
                              self.slots_per_expert)
