"""Expert capacity: how many assignments an expert may take, and which ones an overfull expert drops.

Token-choice gates share `expert_capacity` and `apply_capacity` (Megatron-core's drop policies
'probs' and 'position'); expert choice sizes its per-expert picks with `expert_choice_capacity`.
"""
from __future__ import annotations

import math
from typing import get_args

import torch

from .config import DropPolicy


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments an expert may take: ceil(T * k * capacity_factor / E) (Megatron-core's
    get_capacity, without a minimum)."""
    return math.ceil(num_tokens * top_k * capacity_factor / num_experts)


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert picks in expert choice: C = ceil(T * capacity_factor * k / E), capped at
    T. With capacity_factor 1 the experts take T * k assignments in all, k per token on average
    (Zhou et al. 2022 write C = T * c / E with c the mean experts per token, here c = k * cf)."""
    return min(num_tokens, math.ceil(num_tokens * capacity_factor * top_k / num_experts))


def apply_capacity(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, capacity: int,
                   drop_policy: DropPolicy) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep at most `capacity` tokens per expert. 'probs' keeps the highest probs (equal probs:
    the earlier token), 'position' the earliest tokens. Returns (map, probs, num_dropped); kept
    weights are not renormalised (as in Megatron-core and DeepSpeed)."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if drop_policy == "position":
        rank_TE = routing_map_TE.long().cumsum(dim=0) - 1
    elif drop_policy == "probs":
        key_TE = torch.where(routing_map_TE, probs_TE.detach(), torch.full_like(probs_TE, -math.inf))
        order_TE = torch.sort(key_TE, dim=0, descending=True, stable=True).indices
        positions_TE = torch.arange(key_TE.shape[0], device=key_TE.device).unsqueeze(1).expand_as(order_TE)
        rank_TE = torch.empty_like(order_TE).scatter_(0, order_TE, positions_TE)
    else:
        raise ValueError(f"drop_policy {drop_policy!r} is not allowed; allowed: "
                         + ", ".join(repr(p) for p in get_args(DropPolicy)))
    kept_TE = routing_map_TE & (rank_TE < capacity)
    num_dropped = int(routing_map_TE.sum() - kept_TE.sum())
    return kept_TE, probs_TE * kept_TE, num_dropped
