"""DeepEP-style dispatch (DeepSeek-V3, arXiv 2412.19437 section 3.2.2, and deepseek-ai/DeepEP, as
summarised in the project's anchors): each token crosses the network at most once per node it
needs, to the GPU with its own local index on that node, which forwards it inside the node to
every GPU hosting one of its experts; with node-limited routing a token needs at most M nodes.
Clean-room on our substrate: DeepEP's kernels (NVSHMEM / IPC, RDMA and NVLink forwarding fused and
pipelined in one kernel) are not reproduced; what is, is its route, its deduplication and its
one-round notify.

Route: HierMoE's HD2 (node-level dedup, then per-GPU dedup inside the node) on the topology's
first level (the node) and everything below it as one level, so on a deeper topology (the HierMoE
testbed: socket > PCIe pair > GPU inside a node) the forwarding step is one intra-node AlltoAll,
whatever the fabric inside the node. On a one-level topology it is HD1.

What differs from HD2:
* One notify: before any data moves, every rank tells every rank, in ONE flat AlltoAll of
  (2 + GPUs per node) int64 per peer, how many of its tokens need that GPU, that GPU's node (when
  the GPU is its forwarder there) and each GPU of that node; every split count of both levels
  follows from it (DeepEP's notify_dispatch). HD2 exchanges counts once per level.
* Node limit: `max_nodes` = M; a token whose experts span more nodes is refused (ValueError on
  every rank), as DeepEP relies on the gate's node-limited (group-limited) routing to bound the
  number of RDMA sends per token. None: no limit.
* The rest (bitmask ids of the destination unit, gate weights of its experts, exact combine by
  partial sums, autograd backward) is HD2's (`impl.hiermoe.dedup_a2a`).

Model (`deepep_collectives`): the notify, then HD2's collectives without the per-step counts.
`overlap=True` in `deepep_time` charges each stage's forwarding as running under its network
step (max of the two levels instead of their sum): what DeepEP's pipelined kernel aims for, an
assumption of the sim tier (our collectives run one after another).
"""
from __future__ import annotations

from typing import Sequence

import torch

from impl.common.comm import Comm
from impl.common.costmodel import HardwareProfile
from impl.common.registry import register
from impl.hiermoe.dedup_a2a import HierarchicalDispatcher
from impl.hiermoe.dimension import (COUNT_BYTES, Collective, DispatchCounts, a2a_collective, check_profile,
                                    collective_time, route_collectives, route_time)

__all__ = ["DeepEPDispatcher", "notify_bytes", "deepep_collectives", "deepep_time"]


def _dim(topology) -> int:
    return min(2, topology.D)


def notify_bytes(topology) -> int:
    """Bytes of one notify message (per peer), int64: tokens needing the peer's GPU; then, on a
    two-level route, tokens needing its node, the sender's largest node count per token (the
    node-limit check) and tokens needing each GPU of its node."""
    return (1 if _dim(topology) == 1 else 3 + topology.gpus_per_node) * COUNT_BYTES


@register("dispatcher", "deepep")
class DeepEPDispatcher(HierarchicalDispatcher):
    """Node-level dedup to the same-index GPU, then forwarding inside the node; one notify."""

    def __init__(self, comm: Comm, num_experts: int, *, max_nodes: int | None = None):
        super().__init__(comm, num_experts, dim=_dim(comm.topology), dedup=True)
        if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1):
            raise ValueError(f"deepep max_nodes: {max_nodes!r} is not allowed; expected None or an integer >= 1")
        self.max_nodes = max_nodes

    @property
    def name(self) -> str:
        return "DeepEP"

    def recv_splits_of(self, routing_map_TS: torch.Tensor):
        comm, topo = self.comm, self.comm.topology
        G, El, T = topo.G, self.num_local_experts, routing_map_TS.shape[0]
        need_TG = routing_map_TS.view(T, G, El).any(2)             # the notify is built where the routing lives
        gpu_count = need_TG.sum(0)
        payload = torch.zeros(G, notify_bytes(topo) // COUNT_BYTES, dtype=torch.int64, device=need_TG.device)
        payload[:, 0] = gpu_count
        if self.dim == 2:
            N, Gn = topo.num_nodes, topo.gpus_per_node
            need_TN = need_TG.view(T, N, Gn).any(2)
            payload[:, 2] = int(need_TN.sum(1).max()) if T else 0
            forwarders = list(comm.group("inter", 1).ranks)      # my forwarder on every node, node order
            payload[forwarders, 1] = need_TN.sum(0)
            payload[forwarders, 3:] = gpu_count.view(N, Gn)
        got = comm.all_to_all_on_host(payload, [1] * G, [1] * G)         # row s: what rank s told me
        if self.dim == 2 and self.max_nodes is not None and int(got[:, 2].max()) > self.max_nodes:
            # every rank sees every rank's largest node count: all of them refuse together
            raise ValueError(f"deepep: a token needs experts on {int(got[:, 2].max())} nodes, more than "
                             f"max_nodes={self.max_nodes}; route with a node-limited gate (at most that many "
                             "nodes per token) or raise max_nodes")

        def recv_splits(k: int, group, send_splits: Sequence[int]) -> list[int]:
            if self.dim == 1:
                return got[:, 0].tolist()
            if k == 0:                                          # node step: from each source of my index
                return [int(got[s, 1]) for s in group.ranks]
            # forwarding step: from each GPU F of my node, the rows of the sources of F's index
            return [int(sum(got[s, 0] for s in topo.group_of("inter", 1, f))) for f in group.ranks]

        return recv_splits


def deepep_collectives(counts: DispatchCounts, row_bytes: int, weight_bytes: int = 4, *,
                       with_levels: bool = True, totals: bool = True) -> tuple[Collective, ...]:
    """Every collective of one layer's DeepEP-style dispatch and combine in one iteration: the
    notify (flat), then HD2's collectives without per-step counts."""
    topo = counts.topology
    notify = a2a_collective(topo, topo.D, 0, torch.ones(topo.G, topo.G, dtype=torch.int64), notify_bytes(topo),
                            with_levels=with_levels, totals=totals, stage="dispatch", phase="fwd", what="notify",
                            category="meta")
    return (notify,) + route_collectives(counts, _dim(topo), True, row_bytes, weight_bytes, notify=True,
                                         with_levels=with_levels, totals=totals)


def deepep_time(counts: DispatchCounts, profile: HardwareProfile, row_bytes: int, weight_bytes: int = 4, *,
                overlap: bool = False, buffer: str = "padded") -> float:
    """Modeled ms of one layer's DeepEP-style AlltoAlls in one iteration; `overlap`: each stage's
    node step and forwarding step run concurrently (max instead of sum, module docstring);
    `buffer`: as in `impl.hiermoe.dimension.route_time`."""
    check_profile(profile, counts.topology)
    topo = counts.topology
    if not overlap and buffer == "padded":      # the closed form of HD2's collectives, plus the notify
        notify = profile.comm_time("a2a", "flat", topo.G * notify_bytes(topo))
        return notify + route_time(counts, _dim(topo), True, profile, row_bytes, weight_bytes, notify=True)
    cs = deepep_collectives(counts, row_bytes, weight_bytes, with_levels=False, totals=buffer == "total")
    if not overlap or _dim(topo) == 1:
        return sum(collective_time(c, profile, buffer) for c in cs)
    total = 0.0
    stages: dict[tuple[str, str], dict[str, float]] = {}
    for c in cs:
        if c.what == "notify":
            total += collective_time(c, profile, buffer)
            continue
        level = "node" if c.step.startswith("inter") else "inside"
        per = stages.setdefault((c.stage, c.phase), {"node": 0.0, "inside": 0.0})
        per[level] += collective_time(c, profile, buffer)
    return total + sum(max(v.values()) for v in stages.values())
