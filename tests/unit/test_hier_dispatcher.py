"""HierD-AlltoAll (HDd) and its no-dedup twin (Hd) on SimComm: forward and every gradient equal
the dense single-process reference, bytes and messages per level equal a brute-force route
count, and the inter-node bytes of HD2 and deeper are the information minimum."""
import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.dispatcher import ExpertPlacement
from impl.common.topology import get_topology
from baselines.deepep import DeepEPDispatcher
from impl.hiermoe.dedup_a2a import HierarchicalDispatcher, _bit_values, pack_bits, unpack_bits
from tests.support.ep_case import EPCase, assert_matches_reference, identity_round_trip, reference, run_rank
from tests.support.hier_route import brute_force_hier_traffic, information_minimum_node_bytes


def variants(D):
    return [f"{p}{d}" for d in range(1, D + 1) for p in ("hd", "h")] + ["deepep"]


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
    for name in ("hd2", "hd4", "h3", "deepep"):
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
    # the DeepEP-style route: node-level dedup, then forwarding inside the node (HD2's rows)
    case = EPCase(num_experts=E, top_k=K, tokens_per_rank=7, dispatcher="deepep", slot_of_expert=perm)
    world = SimWorld(topo)
    results = world.run(run_rank, case)
    exp_bytes, exp_msgs = brute_force_hier_traffic([r["routing_map"] for r in results], topo, ExpertPlacement(perm),
                                                   min(2, topo.D), True, case.hidden * 8)
    assert world.total_traffic().by_level("bytes", "tokens", "fwd") == {k: 2 * v for k, v in exp_bytes.items()}
    assert world.total_traffic().by_level("messages", "tokens", "fwd") == {k: 2 * v for k, v in exp_msgs.items()}


def test_inter_node_bytes_are_the_information_minimum():
    """HD2+ sends each token at most once per remote node; metadata is counted separately."""
    topo = get_topology("hiermoe-testbed")
    case_kw = dict(num_experts=64, top_k=8, tokens_per_rank=16, slot_of_expert=_perm(64, 2))
    ratios = {}
    for name in ("h1", "hd1", "hd2", "hd3", "hd4", "deepep"):
        world = SimWorld(topo)
        results = world.run(run_rank, EPCase(dispatcher=name, **case_kw))
        minimum = information_minimum_node_bytes([r["routing_map"] for r in results], topo,
                                                 ExpertPlacement(case_kw["slot_of_expert"]), 6 * 8)
        dispatch_node_bytes = world.total_traffic().by_level("bytes", "tokens", "fwd")["node"] / 2
        ratios[name] = dispatch_node_bytes / minimum
        assert world.total_traffic().by_level("bytes", "meta", "fwd")["node"] > 0
    assert ratios["hd2"] == ratios["hd3"] == ratios["hd4"] == ratios["deepep"] == 1.0
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


def _node_limited_rank(comm, max_nodes, nodes_per_token):
    """Tokens whose experts span `nodes_per_token` nodes of the 2x4 topology (E = 16: 8 per node)."""
    from impl.common.routing import RoutingResult
    g = torch.Generator().manual_seed(comm.rank)
    T, E = 6, 16
    rmap = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        nodes = torch.randperm(2, generator=g)[:nodes_per_token].tolist()
        for n in nodes:
            rmap[t, n * 8 + int(torch.randint(8, (1,), generator=g))] = True
    x = torch.randn(T, 3, generator=g, dtype=torch.float64, requires_grad=True)
    disp = DeepEPDispatcher(comm, E, max_nodes=max_nodes)
    tokens, meta = disp.dispatch(x, RoutingResult(rmap, rmap.double() / rmap.sum(1, keepdim=True)))
    y = disp.combine(tokens.x_RM * tokens.probs_R[:, None], meta)
    return torch.allclose(y, x)


def test_deepep_node_limit():
    """Node-limited routing passes; a token over the limit is refused on every rank (one line)."""
    topo = get_topology("2x4")
    assert all(SimWorld(topo).run(_node_limited_rank, 1, 1))
    with pytest.raises(Exception, match="a token needs experts on 2 nodes, more than max_nodes=1"):
        SimWorld(topo).run(_node_limited_rank, 1, 2)
    with pytest.raises(Exception, match="max_nodes: 0 is not allowed; expected None or an integer >= 1"):
        SimWorld(topo).run(lambda comm: DeepEPDispatcher(comm, 16, max_nodes=0))


def test_packed_ids_equal_brute_force_with_the_bit_table_made_once_per_device():
    mask = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_bits(mask)
    brute = [[sum(1 << (b % 8) for b in range(13) if mask[r, b] and b // 8 == n) for n in range(2)] for r in range(5)]
    assert packed.dtype == torch.uint8 and packed.tolist() == brute
    assert torch.equal(unpack_bits(packed, 13), mask)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert _bit_values(cpu) is _bit_values(cpu)
    # another device gets its own table: nothing is copied from the CPU one
    assert _bit_values(meta).device == meta and _bit_values(meta) is _bit_values(meta)
    assert pack_bits(mask.to(meta)).device == meta and unpack_bits(packed.to(meta), 13).device == meta
