"""Token duplication under expert grouping (HierMoE, Section II-C.1 and Table II).

When the E experts are split into R equal groups of contiguous experts (a group is a GPU, an
NVLink pair, a socket, a node, ...), a token whose top-K experts include several of one group is
sent to that group several times by a naive AlltoAll, once per (token, expert) copy. A
deduplicating dispatcher sends it once per distinct group. The duplication rate is the share of
copies that deduplication removes:

    rate = 1 - (sum over tokens of distinct groups touched) / (number of (token, expert) copies)

`expected_duplication_rate` is the closed form under uniform top-K routing without replacement.
The paper reports only measured rates (Table II); the formula is a reconstruction:
P(token touches a given group of g = E/R experts) = 1 - C(E-g, K)/C(E, K), so a token touches
R * (1 - C(E-g, K)/C(E, K)) groups on average against K copies sent without deduplication.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

__all__ = ["group_mask", "duplication_counts", "duplication_rate", "expected_distinct_groups",
           "expected_duplication_rate"]


def _check_groups(num_experts: int, num_groups: int) -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if num_experts % num_groups != 0:
        raise ValueError(f"num_groups R={num_groups} does not divide num_experts E={num_experts}; "
                         f"R must be a divisor of E")


def group_mask(routing_map_TE: torch.Tensor, num_groups: int) -> torch.Tensor:
    """bool [T, R]: True where token t selects at least one expert of group r, the groups being
    R contiguous blocks of E/R experts (the hierarchical rank order places a group's experts
    on consecutive ranks)."""
    if routing_map_TE.dim() != 2 or routing_map_TE.dtype != torch.bool:
        raise ValueError(f"routing_map_TE must be a 2-D bool tensor [T, E], got dtype "
                         f"{routing_map_TE.dtype} and shape {tuple(routing_map_TE.shape)}")
    num_tokens, num_experts = routing_map_TE.shape
    _check_groups(num_experts, num_groups)
    return routing_map_TE.reshape(num_tokens, num_groups, num_experts // num_groups).any(dim=2)


def duplication_counts(routing_map_TE: torch.Tensor, num_groups: int) -> tuple[int, int]:
    """(copies, distinct): (token, expert) copies a naive dispatcher sends, and (token, group)
    copies a deduplicating one sends."""
    distinct = int(group_mask(routing_map_TE, num_groups).sum())
    copies = int(routing_map_TE.sum())
    return copies, distinct


def duplication_rate(routing_map_TE: torch.Tensor, num_groups: int) -> float:
    """Share of (token, expert) copies that are redundant when experts form `num_groups` groups."""
    copies, distinct = duplication_counts(routing_map_TE, num_groups)
    if copies == 0:
        raise ValueError("routing_map_TE selects no experts; the duplication rate is undefined")
    return 1.0 - distinct / copies


def _check_closed_form_args(num_experts: int, top_k: int, num_groups: int) -> None:
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k K={top_k} exceeds num_experts E={num_experts}; allowed: 1..{num_experts}")
    _check_groups(num_experts, num_groups)


def expected_distinct_groups(num_experts: int, top_k: int, num_groups: int) -> Fraction:
    """Exact expected number of distinct groups a token touches under uniform top-K routing
    without replacement: R * (1 - C(E - E/R, K) / C(E, K))."""
    _check_closed_form_args(num_experts, top_k, num_groups)
    group_size = num_experts // num_groups
    miss = Fraction(math.comb(num_experts - group_size, top_k), math.comb(num_experts, top_k))
    return num_groups * (1 - miss)


def expected_duplication_rate(num_experts: int, top_k: int, num_groups: int) -> float:
    """Closed-form duplication rate under uniform top-K routing: 1 - E[distinct groups] / K."""
    return float(1 - expected_distinct_groups(num_experts, top_k, num_groups) / top_k)
