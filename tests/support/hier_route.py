"""Brute-force count of the traffic of an HDd / Hd route, by following every token copy.

Independent of impl.hiermoe.dedup_a2a: the route is rebuilt from the topology's group
definitions with Python sets. A copy held by rank h carries a set of expert slots; at
Inter-level-i it goes once to the member of h's inter-i group inside each level-i group that
hosts some of its slots; at the final Intra-level-(d-1) step once to every GPU hosting some of
them. With dedup a token starts as one copy with all its slots; without, as one copy per slot.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from impl.common.dispatcher import ExpertPlacement
from impl.common.topology import Topology


def route_hops(topo: Topology, src: int, slots: frozenset[int], dim: int, num_experts: int):
    """(step, from rank, to rank) of every copy of one starting copy, self-hops included."""
    holders = {src: set(slots)}
    hops = []
    for i in range(1, dim):
        per_child = num_experts // topo.U[i]
        nxt: dict[int, set[int]] = defaultdict(set)
        for h, carried in holders.items():
            group = topo.group_of("inter", i, h)
            for child in sorted({s // per_child for s in carried}):
                (dst,) = [r for r in group if topo.group_index(r, i) == child]
                hops.append((i, h, dst))
                nxt[dst] |= {s for s in carried if s // per_child == child}
        holders = nxt
    per_gpu = num_experts // topo.G
    for h, carried in holders.items():
        for gpu in sorted({s // per_gpu for s in carried}):
            assert gpu in topo.group_of("intra", dim - 1, h), "a copy left its level-(d-1) group"
            hops.append((dim, h, gpu))
    return hops


def brute_force_hier_traffic(routing_maps: list[torch.Tensor], topo: Topology, placement: ExpertPlacement,
                             dim: int, dedup: bool, row_bytes: int) -> tuple[dict, dict]:
    """Token bytes and messages per level of the dispatch (one direction)."""
    E = placement.num_experts
    bytes_ = {n: 0 for n in topo.level_names}
    pairs = set()
    for src, rmap in enumerate(routing_maps):
        for t in range(rmap.shape[0]):
            slots = [placement.slot_of_expert[e] for e in rmap[t].nonzero().flatten().tolist()]
            starts = [frozenset(slots)] if dedup else [frozenset([s]) for s in slots]
            for start in starts:
                if not start:
                    continue
                for step, a, b in route_hops(topo, src, start, dim, E):
                    if a != b:
                        bytes_[topo.link_name(a, b)] += row_bytes
                        pairs.add((step, a, b))
    msgs = {n: 0 for n in topo.level_names}
    for _, a, b in pairs:
        msgs[topo.link_name(a, b)] += 1
    return bytes_, msgs


def information_minimum_node_bytes(routing_maps: list[torch.Tensor], topo: Topology,
                                   placement: ExpertPlacement, row_bytes: int) -> int:
    """Unique (token, remote node) pairs x row bytes: no scheme can send less across nodes."""
    E, nodes = placement.num_experts, topo.U[1] if topo.D > 1 else 1
    per_node = E // nodes
    total = 0
    for src, rmap in enumerate(routing_maps):
        src_node = topo.group_index(src, 1) if topo.D > 1 else 0
        for t in range(rmap.shape[0]):
            dest = {placement.slot_of_expert[e] // per_node for e in rmap[t].nonzero().flatten().tolist()}
            total += len(dest - {src_node})
    return total * row_bytes
