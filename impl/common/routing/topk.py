"""Top-k lists <-> dense routing: per-token (expert id, weight) slots and a `RoutingResult`.

Gates select with `_topk_stable` (ties to the lower index, so routing is reproducible bit for bit)
and scatter their choice with `_dense_from_topk`; traces store and replay routing as top-k lists
through `routing_from_topk` / `topk_ids_from_routing`.
"""
from __future__ import annotations

import math

import torch

from .result import RoutingResult


def _topk_stable(scores: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest along `dim`, ties to the lower index (torch.topk leaves
    the order of ties unspecified, which would make routing differ between runs and devices)."""
    order = torch.sort(scores, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return scores.gather(dim, order), order


def _dense_from_topk(ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                     num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter top-k ids / weights into (routing_map_TE, probs_TE); ids of -1 are padding. The
    weights keep their autograd graph. An extra column E collects the padding and is cut off."""
    T = ids_TK.shape[0]
    valid_TK = ids_TK >= 0
    columns_TK = torch.where(valid_TK, ids_TK, num_experts)
    map_TE = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=ids_TK.device)
    map_TE = map_TE.scatter(1, columns_TK, valid_TK)[:, :num_experts]
    weights_TK = torch.where(valid_TK, weights_TK, torch.zeros_like(weights_TK))
    probs_TE = weights_TK.new_zeros(T, num_experts + 1).scatter(1, columns_TK, weights_TK)[:, :num_experts]
    return map_TE, probs_TE


def routing_from_topk(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int) -> RoutingResult:
    """A `RoutingResult` from per-token expert ids and weights (trace replay, tests). An id of -1
    marks an empty slot (a token with fewer than K experts); ids must be distinct per token."""
    if ids_TK.dim() != 2 or ids_TK.shape != weights_TK.shape:
        raise ValueError(f"ids_TK and weights_TK must both be [T, K]; got {tuple(ids_TK.shape)} and "
                         f"{tuple(weights_TK.shape)}")
    if ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
        raise ValueError(f"ids_TK must be an integer tensor, got {ids_TK.dtype}")
    if not weights_TK.dtype.is_floating_point:
        raise ValueError(f"weights_TK must be a floating-point tensor, got {weights_TK.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    ids_TK = ids_TK.long()
    if ids_TK.numel():
        low, high = int(ids_TK.min()), int(ids_TK.max())
        if low < -1 or high >= num_experts:
            bad = low if low < -1 else high
            raise ValueError(f"expert id {bad} out of range; allowed: 0..{num_experts - 1}, or -1 for none")
        sorted_TK = ids_TK.sort(dim=1).values
        repeated = (sorted_TK[:, 1:] == sorted_TK[:, :-1]) & (sorted_TK[:, 1:] >= 0)
        if repeated.any():
            t = int(repeated.any(dim=1).nonzero()[0])
            raise ValueError(f"token {t} lists an expert more than once: {ids_TK[t].tolist()}")
    routing_map_TE, probs_TE = _dense_from_topk(ids_TK, weights_TK, num_experts)
    return RoutingResult(routing_map_TE, probs_TE)


def topk_ids_from_routing(result: RoutingResult, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK, weights_TK): each token's experts by weight, descending (equal weights by expert
    id), padded with id -1 and weight 0 where a token has fewer than k experts. Raises when a
    token has more than k experts (expert choice can give a token up to E)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    routing_map_TE, probs_TE = result.routing_map_TE, result.probs_TE
    T, E = routing_map_TE.shape
    counts_T = routing_map_TE.sum(dim=1)
    if T and int(counts_T.max()) > k:
        t = int(counts_T.argmax())
        raise ValueError(f"token {t} is routed to {int(counts_T[t])} experts, more than k={k}")
    key_TE = torch.where(routing_map_TE, probs_TE.detach(), torch.full_like(probs_TE, -math.inf))
    order_TE = torch.sort(key_TE, dim=1, descending=True, stable=True).indices
    width = min(k, E)
    ids_TW = order_TE[:, :width]
    valid_TW = routing_map_TE.gather(1, ids_TW)
    ids_TW = torch.where(valid_TW, ids_TW, torch.full_like(ids_TW, -1))
    gathered_TW = probs_TE.gather(1, ids_TW.clamp(min=0))
    weights_TW = torch.where(valid_TW, gathered_TW, torch.zeros_like(gathered_TW))
    if width < k:  # more slots than experts: pad the missing columns
        ids_TW = torch.cat([ids_TW, ids_TW.new_full((T, k - width), -1)], dim=1)
        weights_TW = torch.cat([weights_TW, weights_TW.new_zeros(T, k - width)], dim=1)
    return ids_TW, weights_TW
