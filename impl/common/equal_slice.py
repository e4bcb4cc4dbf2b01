"""AlltoAll of equal slices (the capacity layout's exchange), by three algorithms:

* `flat`: one AlltoAll over the group (NCCL's default; any group, also a sub-group such as the
  inter-node group that carries FSMoE's expert parallelism);
* `2dh` (Tutel, DeepSpeed-MoE), on N nodes of Gn GPUs over the whole world: the G destination
  slices, viewed [N][Gn], are transposed to [Gn][N] (a stride copy), an intra-node AlltoAll sends
  chunk g to local GPU g, a second stride copy restores [N][Gn], and an inter-node AlltoAll among
  the GPUs with this local index sends chunk n to node n: N - 1 inter-node messages of Gn slices
  per rank instead of (N - 1) * Gn messages of one slice;
* `1dh` (HetuMoE), over the whole world: every GPU sends its whole buffer to its node's first
  GPU (an intra-node gather), the node leaders exchange one message per node pair (an
  inter-node AlltoAll of Gn x Gn slices), and each leader scatters to its node's GPUs their rows
  (an intra-node scatter): one inter-node message per node pair, twice the intra-node volume.

Slice j of `rows` goes to member j of the group; the result holds member i's slice for this rank
in member order, whatever the algorithm, so the three are interchangeable and tested equal. With
one node or one GPU per node the hierarchical ones are the flat one. The exchange is its own
inverse pattern, so `equal_slice_all_to_all_autograd`'s backward runs the same algorithm on the
gradient (phase 'bwd').
"""
from __future__ import annotations

import torch

from .comm import Comm, CommGroup

__all__ = ["A2A_ALGORITHMS", "equal_slice_all_to_all", "equal_slice_all_to_all_autograd", "is_hierarchical"]

A2A_ALGORITHMS = ("flat", "1dh", "2dh")


def is_hierarchical(comm: Comm, algorithm: str, group: CommGroup | None = None) -> bool:
    """Whether `algorithm` takes its hierarchical route here: 1DH / 2DH over the whole world of a
    topology with several nodes of several GPUs; otherwise every algorithm is the flat one."""
    if algorithm not in A2A_ALGORITHMS:
        raise ValueError(f"all-to-all algorithm {algorithm!r} is not allowed; allowed: {', '.join(A2A_ALGORITHMS)}")
    topo = comm.topology
    whole_world = group is None or group.ranks == comm.world.ranks
    if algorithm != "flat" and not whole_world:
        raise ValueError(f"all-to-all algorithm {algorithm!r} needs the group to be every GPU (expert "
                         f"parallelism over all GPUs, N_ESP = 1); got a group of {group.size} ranks; allowed: 'flat'")
    return algorithm != "flat" and topo.D >= 2 and topo.num_nodes > 1 and topo.gpus_per_node > 1


def equal_slice_all_to_all(comm: Comm, rows: torch.Tensor, algorithm: str = "flat", group: CommGroup | None = None,
                           *, category: str = "tokens", phase: str = "fwd") -> torch.Tensor:
    """Slice j of `rows` to member j of `group` (default: all ranks); returns the slices received,
    in member order. Not differentiable (see the autograd twin)."""
    group = group or comm.world
    P = group.size
    if rows.shape[0] % P:
        raise ValueError(f"equal-slice all-to-all: {rows.shape[0]} rows do not split into {P} equal slices")
    B, rest = rows.shape[0] // P, tuple(rows.shape[1:])
    kw = dict(category=category, phase=phase)
    if not is_hierarchical(comm, algorithm, group):
        return comm.all_to_all(rows, [B] * P, [B] * P, group, **kw)
    N, Gn = comm.topology.num_nodes, comm.topology.gpus_per_node
    node, across = comm.group("intra", 1), comm.group("inter", 1)
    if algorithm == "2dh":
        by_local = rows.reshape(N, Gn, B, *rest).transpose(0, 1).reshape(P * B, *rest)
        got = comm.all_to_all(by_local, [N * B] * Gn, [N * B] * Gn, node, **kw)
        by_node = got.reshape(Gn, N, B, *rest).transpose(0, 1).reshape(P * B, *rest)
        return comm.all_to_all(by_node, [Gn * B] * N, [Gn * B] * N, across, **kw)
    # 1DH: gather to the node's first GPU, leaders exchange, leaders scatter
    local = node.index(comm.rank)
    leader = local == 0
    gathered = comm.all_to_all(rows, [P * B] + [0] * (Gn - 1), [P * B] * Gn if leader else [0] * Gn, node, **kw)
    if leader:
        # [Gn source local][N dest node][Gn dest local][B] -> per dest node [Gn dest local][Gn source local][B]
        send = gathered.reshape(Gn, N, Gn, B, *rest).permute(1, 2, 0, 3, *range(4, 4 + len(rest)))
        got = comm.all_to_all(send.reshape(P * Gn * B, *rest), [Gn * Gn * B] * N, [Gn * Gn * B] * N, across, **kw)
        # [N source node][Gn dest local][Gn source local][B] -> per dest local [N][Gn source local][B]
        out = got.reshape(N, Gn, Gn, B, *rest).transpose(0, 1).reshape(P * Gn * B, *rest)
        return comm.all_to_all(out, [P * B] * Gn, [P * B] + [0] * (Gn - 1), node, **kw)
    return comm.all_to_all(rows.new_empty((0,) + rest), [0] * Gn, [P * B] + [0] * (Gn - 1), node, **kw)


class _EqualSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, comm, algorithm, group, category):
        ctx.args = (comm, algorithm, group, category)
        return equal_slice_all_to_all(comm, rows.detach(), algorithm, group, category=category, phase="fwd")

    @staticmethod
    def backward(ctx, grad):
        comm, algorithm, group, category = ctx.args
        return (equal_slice_all_to_all(comm, grad.contiguous(), algorithm, group, category=category, phase="bwd"),
                None, None, None, None)


def equal_slice_all_to_all_autograd(comm: Comm, rows: torch.Tensor, algorithm: str = "flat",
                                    group: CommGroup | None = None, *, category: str = "tokens") -> torch.Tensor:
    """`equal_slice_all_to_all` with gradients: the backward is the same exchange of the gradient."""
    return _EqualSlice.apply(rows, comm, algorithm, group, category)
