"""The equal-slice AlltoAll algorithms (flat, 1DH, 2DH) are interchangeable: the same result as a
flat exchange on every topology, gradients through the autograd twin, and bytes and messages per
level equal to a brute-force count of each route."""
import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.equal_slice import (A2A_ALGORITHMS, equal_slice_all_to_all, equal_slice_all_to_all_autograd,
                                     is_hierarchical)
from impl.common.topology import get_topology

B, M = 3, 2


def _rows(rank: int, G: int) -> torch.Tensor:
    return torch.arange(G * B * M, dtype=torch.float64).reshape(-1, M) + 1000 * rank


def _expected(rank: int, G: int) -> torch.Tensor:
    return torch.cat([_rows(src, G)[rank * B:(rank + 1) * B] for src in range(G)])


def brute_force(topology, algorithm: str, slice_bytes: int) -> tuple[dict, dict]:
    """Bytes and messages per level of each route, hop by hop."""
    G, N, Gn = topology.G, topology.num_nodes, topology.gpus_per_node
    hops: dict[tuple, int] = {}        # (stage, src, dst) -> slices

    def send(stage, a, b, n=1):
        if a != b:
            hops[(stage, a, b)] = hops.get((stage, a, b), 0) + n

    for src in range(G):
        node, local = divmod(src, Gn)
        for dst in range(G):
            d_node, d_local = divmod(dst, Gn)
            if algorithm == "flat" or N == 1 or Gn == 1:
                send(0, src, dst)
            elif algorithm == "2dh":
                via = node * Gn + d_local
                send(0, src, via)
                send(1, via, dst)
            else:   # 1dh: to my leader, leader to the dest leader, dest leader to dest
                leader, d_leader = node * Gn, d_node * Gn
                send(0, src, leader)
                send(1, leader, d_leader)
                send(2, d_leader, dst)
    bytes_ = {n: 0 for n in topology.level_names}
    msgs = {n: 0 for n in topology.level_names}
    for (_, a, b), n in hops.items():
        bytes_[topology.link_name(a, b)] += n * slice_bytes
        msgs[topology.link_name(a, b)] += 1
    return bytes_, msgs


@pytest.mark.parametrize("topo_name", ["2x2", "4x2", "2x4", "1x4", "4x1", "hier:node=3,socket=2,gpu=2"])
@pytest.mark.parametrize("algorithm", A2A_ALGORITHMS)
def test_every_algorithm_is_a_flat_exchange_with_its_own_traffic(topo_name, algorithm):
    topo = get_topology(topo_name)
    world = SimWorld(topo)
    out = world.run(lambda comm: equal_slice_all_to_all(comm, _rows(comm.rank, comm.world_size), algorithm))
    for rank, got in enumerate(out):
        assert torch.equal(got, _expected(rank, topo.G))
    expected_bytes, expected_msgs = brute_force(topo, algorithm, B * M * 8)
    total = world.total_traffic()
    assert total.by_level("bytes") == expected_bytes
    assert total.by_level("messages") == expected_msgs


@pytest.mark.parametrize("algorithm", A2A_ALGORITHMS)
def test_autograd_twin_routes_gradients_back(algorithm):
    topo = get_topology("2x2")

    def body(comm):
        x = _rows(comm.rank, comm.world_size).requires_grad_(True)
        y = equal_slice_all_to_all_autograd(comm, x, algorithm)
        (y * (comm.rank + 1)).sum().backward()
        return x.grad, comm.traffic.by_level("bytes", phase="bwd") == comm.traffic.by_level("bytes", phase="fwd")

    for rank, (grad, same_volume) in enumerate(SimWorld(topo).run(body)):
        # slice j of rank r's rows landed on rank j, which weighs it by j + 1
        assert torch.equal(grad, torch.cat([torch.full((B, M), float(j + 1), dtype=torch.float64) for j in range(4)]))
        assert same_volume


def test_hierarchical_algorithms_need_the_whole_world():
    def body(comm):
        assert not is_hierarchical(comm, "flat", comm.group("inter", 1))
        with pytest.raises(ValueError, match="needs the group to be every GPU"):
            is_hierarchical(comm, "2dh", comm.group("inter", 1))
        with pytest.raises(ValueError, match="'3dh' is not allowed"):
            is_hierarchical(comm, "3dh")
        # flat over a sub-group: the inter-node expert-parallel group
        g = comm.group("inter", 1)
        return equal_slice_all_to_all(comm, torch.full((g.size, 1), float(comm.rank)), "flat", g)

    out = SimWorld(get_topology("2x2")).run(body)
    assert out[0].flatten().tolist() == [0.0, 2.0] and out[3].flatten().tolist() == [1.0, 3.0]
