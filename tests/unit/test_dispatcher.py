"""Flat (Megatron-semantics) dispatcher on simulated ranks: round trip, dense-reference equality
of outputs and all gradients, bytes and messages per level against a brute-force count."""
import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.dispatcher import (ExpertPlacement, FlatAlltoAllDispatcher, chunk_transpose_index,
                                    check_expert_parallel)
from impl.common.routing import RoutingResult
from impl.common.topology import get_topology
from tests.support.ep_case import EPCase, identity_round_trip, assert_matches_reference, brute_force_flat_bytes, reference, run_rank


@pytest.mark.parametrize("topo_name,E,K", [("1x1", 4, 2), ("1x2", 4, 2), ("2x2", 8, 2), ("2x4", 16, 4),
                                           ("hier:node=2,socket=2,gpu=2", 16, 3), pytest.param("hiermoe-testbed", 64, 8, marks=pytest.mark.slow)])
def test_flat_matches_dense_reference(topo_name, E, K):
    topo = get_topology(topo_name)
    case = EPCase(num_experts=E, top_k=K, tokens_per_rank=10 if topo.G < 32 else 6)
    results = SimWorld(topo).run(run_rank, case)
    assert_matches_reference(results, reference(case, topo.G))


def test_flat_with_permuted_placement_matches_reference():
    topo = get_topology("2x2")
    perm = tuple(torch.randperm(8, generator=torch.Generator().manual_seed(3)).tolist())
    case = EPCase(num_experts=8, top_k=3, slot_of_expert=perm)
    results = SimWorld(topo).run(run_rank, case)
    assert_matches_reference(results, reference(case, topo.G))


@pytest.mark.parametrize("topo_name", ["2x2", "hier:node=2,socket=2,gpu=2", "hiermoe-testbed"])
def test_flat_bytes_per_level_equal_brute_force(topo_name):
    topo = get_topology(topo_name)
    E = 2 * topo.G
    perm = tuple(torch.randperm(E, generator=torch.Generator().manual_seed(1)).tolist())
    case = EPCase(num_experts=E, top_k=4, tokens_per_rank=7, slot_of_expert=perm)
    world = SimWorld(topo)
    results = world.run(run_rank, case)
    expected_bytes, expected_msgs = brute_force_flat_bytes(
        [r["routing_map"] for r in results], topo, ExpertPlacement(perm), case.hidden * 8)
    total = world.total_traffic()
    for phase in ("fwd", "bwd"):  # dispatch+combine forward, their twins backward: 2 copies each
        assert total.by_level("bytes", "tokens", phase) == {k: 2 * v for k, v in expected_bytes.items()}
        assert total.by_level("messages", "tokens", phase) == {k: 2 * v for k, v in expected_msgs.items()}


def test_round_trip_identity_experts_returns_input():
    """dispatch then combine with identity experts and probs summing to 1 returns the input
    (Megatron's core dispatcher invariant), and so does the gradient."""
    identity_round_trip(get_topology("2x2"), FlatAlltoAllDispatcher)


def test_rows_arrive_grouped_by_local_expert():
    topo = get_topology("1x2")
    E, T = 4, 6

    def body(comm):
        ids = torch.tensor([[0, 3], [1, 2], [3, 1], [2, 0], [0, 1], [2, 3]])
        x = (torch.arange(T, dtype=torch.float64) + 100 * comm.rank)[:, None]
        rmap = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True)
        tokens, _ = FlatAlltoAllDispatcher(comm, E).dispatch(x, RoutingResult(rmap, rmap.double()))
        return tokens.x_RM.squeeze(1).tolist(), tokens.tokens_per_local_expert

    r0, r1 = SimWorld(topo).run(body)
    # rank 0 hosts experts 0 and 1: expert 0's rows from rank 0 then rank 1, then expert 1's
    assert r0 == ([0, 3, 4, 100, 103, 104, 1, 2, 4, 101, 102, 104], (6, 6))
    assert r1 == ([1, 3, 5, 101, 103, 105, 0, 2, 5, 100, 102, 105], (6, 6))


def test_chunk_transpose_index():
    counts = torch.tensor([[1, 2], [0, 3]])
    # rows: a0b0:[0], a0b1:[1,2], a1b0:[], a1b1:[3,4,5]  ->  b0: [0], b1: [1,2,3,4,5]
    assert chunk_transpose_index(counts).tolist() == [0, 1, 2, 3, 4, 5]
    counts = torch.tensor([[2, 1], [1, 2]])
    assert chunk_transpose_index(counts).tolist() == [0, 1, 3, 2, 4, 5]


def test_expert_parallel_divisibility_error():
    with pytest.raises(ValueError, match=r"E=6 is not divisible by the expert-parallel size 4"):
        check_expert_parallel(6, 4)


def test_placement_swap_and_owner():
    p = ExpertPlacement.identity(4).swap(0, 3)
    assert p.slot_of_expert == (3, 1, 2, 0) and p.expert_of_slot == (3, 1, 2, 0)
    assert p.owner_rank(0, 2) == 1 and p.owner_rank(3, 2) == 0
    with pytest.raises(ValueError, match="permutation"):
        ExpertPlacement((0, 0, 1))
