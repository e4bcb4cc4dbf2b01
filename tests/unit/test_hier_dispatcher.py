"""HierD-AlltoAll (HDd) and its no-dedup twin (Hd) on SimComm: forward and every gradient equal
the dense single-process reference, bytes and messages per level equal a brute-force route
count, and the inter-node bytes of HD2 and deeper are the information minimum."""
import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.dispatcher import ExpertPlacement
from impl.common.topology import get_topology
from impl.hiermoe.dedup_a2a import HierarchicalDispatcher
from tests.support.ep_case import EPCase, assert_matches_reference, identity_round_trip, reference, run_rank
from tests.support.hier_route import brute_force_hier_traffic, information_minimum_node_bytes


def variants(D):
    return [f"{p}{d}" for d in range(1, D + 1) for p in ("hd", "h")]


def _perm(E, seed):
    return tuple(torch.randperm(E, generator=torch.Generator().manual_seed(seed)).tolist())


@pytest.mark.parametrize("topo_name,E,K", [
    ("2x2", 8, 3), ("hier:node=2,socket=2,gpu=2", 16, 4), pytest.param("hiermoe-testbed", 64, 8, marks=pytest.mark.slow)])
def test_every_variant_equals_dense_reference(topo_name, E, K):
    topo = get_topology(topo_name)
    for name in variants(topo.D):
        case = EPCase(num_experts=E, top_k=K, tokens_per_rank=6, dispatcher=name, seed=3)
        results = SimWorld(topo).run(run_rank, case)
        assert_matches_reference(results, reference(case, topo.G))


@pytest.mark.slow
def test_permuted_placement_equals_reference_at_32_ranks():
    """The logical-to-physical map expert swap changes: experts live in permuted slots."""
    topo = get_topology("hiermoe-testbed")
    for name in ("hd2", "hd4", "h3"):
        case = EPCase(num_experts=64, top_k=6, tokens_per_rank=5, dispatcher=name, slot_of_expert=_perm(64, 7))
        assert_matches_reference(SimWorld(topo).run(run_rank, case), reference(case, topo.G))


@pytest.mark.parametrize("topo_name,E,K", [("2x4", 16, 4), ("hier:node=2,socket=2,gpu=2", 16, 3),
                                           pytest.param("hiermoe-testbed", 64, 8, marks=pytest.mark.slow)])
def test_bytes_and_messages_equal_brute_force(topo_name, E, K):
    topo = get_topology(topo_name)
    perm = _perm(E, 1)
    for d in range(1, topo.D + 1):
        for dedup in (True, False):
            name = f"{'hd' if dedup else 'h'}{d}"
            case = EPCase(num_experts=E, top_k=K, tokens_per_rank=7, dispatcher=name, slot_of_expert=perm)
            world = SimWorld(topo)
            results = world.run(run_rank, case)
            exp_bytes, exp_msgs = brute_force_hier_traffic(
                [r["routing_map"] for r in results], topo, ExpertPlacement(perm), d, dedup, case.hidden * 8)
            total = world.total_traffic()
            # per phase: dispatch + combine (forward), their autograd twins (backward): equal volumes
            for phase in ("fwd", "bwd"):
                assert total.by_level("bytes", "tokens", phase) == {k: 2 * v for k, v in exp_bytes.items()}, name
                assert total.by_level("messages", "tokens", phase) == {k: 2 * v for k, v in exp_msgs.items()}, name


def test_inter_node_bytes_are_the_information_minimum():
    """HD2+ sends each token at most once per remote node; metadata is counted separately."""
    topo = get_topology("hiermoe-testbed")
    case_kw = dict(num_experts=64, top_k=8, tokens_per_rank=16, slot_of_expert=_perm(64, 2))
    ratios = {}
    for name in ("h1", "hd1", "hd2", "hd3", "hd4"):
        world = SimWorld(topo)
        results = world.run(run_rank, EPCase(dispatcher=name, **case_kw))
        minimum = information_minimum_node_bytes([r["routing_map"] for r in results], topo,
                                                 ExpertPlacement(case_kw["slot_of_expert"]), 6 * 8)
        dispatch_node_bytes = world.total_traffic().by_level("bytes", "tokens", "fwd")["node"] / 2
        ratios[name] = dispatch_node_bytes / minimum
        assert world.total_traffic().by_level("bytes", "meta", "fwd")["node"] > 0
    assert ratios["hd2"] == ratios["hd3"] == ratios["hd4"] == 1.0
    assert ratios["h1"] > ratios["hd1"] > 1.0


def test_identity_round_trip_and_gradient_of_ones():
    topo = get_topology("hier:node=2,socket=2,gpu=2")
    for d in (1, 2, 3):
        for dedup in (True, False):
            identity_round_trip(topo, lambda comm, E: HierarchicalDispatcher(comm, E, dim=d, dedup=dedup),
                                num_experts=16, top_k=4)


def test_dimension_out_of_range_is_rejected():
    topo = get_topology("2x2")

    def body(comm):
        with pytest.raises(ValueError, match=r"dimension d=3 not available on topology '2x2'; allowed: 1..2"):
            HierarchicalDispatcher(comm, 8, dim=3)

    SimWorld(topo).run(body)


def test_hierd_auto_dimension_equals_reference_and_agrees_on_all_ranks():
    """HD-MoE: d* per dispatch from the testbed profile; same d on every rank, exact results."""
    topo = get_topology("hiermoe-testbed")
    case = EPCase(num_experts=64, top_k=8, tokens_per_rank=6, dispatcher="hierd", seed=4)
    results = SimWorld(topo).run(run_rank, case)
    assert_matches_reference(results, reference(case, topo.G))

    def chosen(comm):
        from impl.hiermoe.dedup_a2a import HierDAlltoAllDispatcher
        from impl.common.routing import RoutingResult
        g = torch.Generator().manual_seed(comm.rank)
        ids = torch.stack([torch.randperm(64, generator=g)[:8] for _ in range(64)])
        rmap = torch.zeros(64, 64, dtype=torch.bool).scatter_(1, ids, True)
        disp = HierDAlltoAllDispatcher(comm, 64, bytes_per_elem=2)
        disp.dispatch(torch.zeros(64, 2048), RoutingResult(rmap, rmap.float() / 8))
        return disp.last_dim

    dims = SimWorld(topo).run(chosen)
    assert len(set(dims)) == 1 and dims[0] > 1
