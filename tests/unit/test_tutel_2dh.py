"""Tutel-2DH dispatcher on simulated ranks: outputs and every gradient equal the dense reference
and the flat dispatcher, bytes and messages per level equal a brute-force count of the 2DH
route (padding included), and the capacity rules and errors behave as documented."""
from dataclasses import replace

import pytest
import torch

from baselines.tutel_2dh.dispatcher import Tutel2DHDispatcher, tutel_capacity
from impl.common.comm import SimWorld
from impl.common.registry import get
from impl.common.routing import RoutingResult
from impl.common.topology import get_topology
from tests.support.ep_case import EPCase, assert_matches_reference, identity_round_trip, reference, run_rank

TOPOLOGIES = ["2x2", "2x4", "4x2", "hiermoe-testbed", "1x4", "4x1"]

# capacity modes: (dispatcher kwargs, gate kwargs); K = 2, T = 12 tokens, E = 2 per rank
MODES = {
    "dropless": ({"capacity_factor": 0.0}, {}),
    "fixed-no-drop": ({"capacity_factor": 6.0, "top_k": 2}, {}),   # C >= T: never full
    "gate-drops": ({"capacity_factor": 1.0, "top_k": 2}, {"capacity_factor": 1.0, "drop_policy": "position"}),
    "bounded-dynamic": ({"capacity_factor": -1.0, "top_k": 2}, {"capacity_factor": 0.5, "drop_policy": "probs"}),
}


def _case(topo, mode, **kw):
    dispatcher_kwargs, gate_kwargs = MODES[mode]
    return EPCase(num_experts=2 * topo.G, top_k=2, tokens_per_rank=kw.pop("tokens_per_rank", 12),
                  dispatcher="tutel-2dh", dispatcher_kwargs=dispatcher_kwargs, gate_kwargs=gate_kwargs, **kw)


@pytest.mark.parametrize("topo_name", TOPOLOGIES)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_matches_dense_reference_and_flat(topo_name, mode):
    topo = get_topology(topo_name)
    if topo.G == 32 and mode in ("fixed-no-drop", "bounded-dynamic"):
        pytest.skip("covered on the small topologies")
    case = _case(topo, mode)
    results = SimWorld(topo).run(run_rank, case)
    assert_matches_reference(results, reference(case, topo.G))
    flat = SimWorld(topo).run(run_rank, replace(case, dispatcher="flat", dispatcher_kwargs={}))
    for mine, theirs in zip(results, flat):
        assert torch.equal(mine["routing_map"], theirs["routing_map"])
        torch.testing.assert_close(mine["y"], theirs["y"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine["x_grad"], theirs["x_grad"], rtol=1e-12, atol=1e-12)
    if case.gate_kwargs:  # the gate really dropped pairs, and what it kept fits Tutel's capacity
        assert sum(int(r["routing_map"].sum()) for r in results) < topo.G * case.tokens_per_rank * case.top_k
        bound = tutel_capacity(case.tokens_per_rank, case.num_experts, 2, case.dispatcher_kwargs["capacity_factor"])
        assert max(int(r["routing_map"].sum(0).max()) for r in results) <= bound


def test_permuted_placement_matches_reference():
    topo = get_topology("2x4")
    perm = tuple(torch.randperm(16, generator=torch.Generator().manual_seed(5)).tolist())
    case = _case(topo, "dropless", slot_of_expert=perm)
    assert_matches_reference(SimWorld(topo).run(run_rank, case), reference(case, topo.G))


def brute_force_2dh(topology, slice_rows: int, row_bytes: int) -> tuple[dict, dict]:
    """Bytes and messages per level of one equal-slice exchange, by routing every (src, dst)
    slice: with 2DH it goes src -> (src's node, dst's local index) in the intra-node stage, then
    on to dst in the inter-node stage; without, straight to dst. A hop to oneself is free."""
    G, N = topology.G, topology.num_nodes
    Gn = G // N
    two_dh = topology.D >= 2 and N > 1 and Gn > 1
    bytes_ = {n: 0 for n in topology.level_names}
    hops = set()
    for src in range(G):
        for dst in range(G):
            path = [(0, src, (src // Gn) * Gn + dst % Gn), (1, (src // Gn) * Gn + dst % Gn, dst)] if two_dh \
                else [(0, src, dst)]
            for stage, a, b in path:
                if a != b:
                    bytes_[topology.link_name(a, b)] += slice_rows * row_bytes
                    hops.add((stage, a, b))
    msgs = {n: 0 for n in topology.level_names}
    for _, a, b in hops:
        msgs[topology.link_name(a, b)] += 1
    return bytes_, msgs


@pytest.mark.parametrize("topo_name", TOPOLOGIES)
def test_bytes_and_messages_per_level_equal_brute_force(topo_name):
    topo = get_topology(topo_name)
    case = _case(topo, "dropless", tokens_per_rank=7)
    world = SimWorld(topo)
    results = world.run(run_rank, case)
    capacity = max(int(r["routing_map"].sum(0).max()) for r in results)      # dropless: the global max
    expected_bytes, expected_msgs = brute_force_2dh(topo, (case.num_experts // topo.G) * capacity, case.hidden * 8)
    total = world.total_traffic()
    for phase in ("fwd", "bwd"):  # dispatch + combine, and their backward twins
        assert total.by_level("bytes", "tokens", phase) == {k: 2 * v for k, v in expected_bytes.items()}
        assert total.by_level("messages", "tokens", phase) == {k: 2 * v for k, v in expected_msgs.items()}
    # nothing else crosses the network: no split counts, no gate weights (only the capacity
    # agreement, an all-reduce of three ints)
    assert sum(total.by_level("bytes", "meta", None, kind="a2a").values()) == 0
    assert sum(total.by_level("bytes", "meta", None, kind="ar").values()) <= topo.G * 2 * 3 * 8


def test_round_trip_identity_experts_returns_input_and_gradient():
    topo = get_topology("2x2")

    def check(tokens, meta):
        assert tokens.tokens_per_local_expert == (topo.G * meta.capacity,) * 2
        assert torch.equal(tokens.probs_R, torch.ones_like(tokens.probs_R))   # weights stay home

    identity_round_trip(topo, Tutel2DHDispatcher, check_dispatched=check)


def test_two_micro_batches_in_flight():
    """Stateless metadata: dispatch A, dispatch B, combine B, combine A equals A then B."""
    topo = get_topology("2x2")
    E, T, M = 4, 6, 3

    def body(comm):
        g = torch.Generator().manual_seed(comm.rank)
        d = Tutel2DHDispatcher(comm, E)
        batches = []
        for t in (T, T + 3):
            x = torch.randn(t, M, generator=g, dtype=torch.float64)
            rmap = torch.zeros(t, E, dtype=torch.bool).scatter_(1, torch.randint(0, E, (t, 1), generator=g), True)
            batches.append((x, RoutingResult(rmap, rmap.double())))
        (ta, ma), (tb, mb) = (d.dispatch(x, r) for x, r in batches)
        yb = d.combine(2 * tb.x_RM, mb)
        ya = d.combine(2 * ta.x_RM, ma)
        return [torch.allclose(y, 2 * x) for y, (x, _) in zip((ya, yb), batches)]

    assert all(all(ok) for ok in SimWorld(topo).run(body))


def test_capacity_formula():
    assert tutel_capacity(12, 8, 2, 1.0) == 4          # 2 * int(1.0 * ceil(12/8))
    assert tutel_capacity(8, 8, 2, 1.25) == 2          # int(1.25 * 1) = 1: below ceil(8*2*1.25/8) = 3
    assert tutel_capacity(100, 16, 1, -1.5) == 10      # the bound of a negative factor uses |cf|


def test_overflow_is_a_clear_error_on_every_rank():
    topo = get_topology("2x2")
    case = EPCase(num_experts=8, top_k=2, tokens_per_rank=16, dispatcher="tutel-2dh",
                  dispatcher_kwargs={"capacity_factor": 0.5, "top_k": 2})   # C = 2, gate does not drop
    with pytest.raises(Exception, match=r"more than the capacity C=2"):
        SimWorld(topo).run(run_rank, case)


def test_unequal_tokens_per_rank_is_a_clear_error():
    topo = get_topology("1x2")

    def body(comm):
        T = 4 + 4 * comm.rank
        rmap = torch.zeros(T, 2, dtype=torch.bool)
        rmap[:, 0] = True
        Tutel2DHDispatcher(comm, 2, capacity_factor=1.0, top_k=1).dispatch(
            torch.zeros(T, 3), RoutingResult(rmap, rmap.float()))

    with pytest.raises(Exception, match="same T on every rank"):
        SimWorld(topo).run(body)


@pytest.mark.parametrize("kwargs,match", [({"capacity_factor": 1.0}, "top_k: None is not allowed"),
                                          ({"capacity_factor": 1.0, "top_k": 9}, r"1\.\.8"),
                                          ({"capacity_factor": float("nan")}, "finite number")])
def test_bad_arguments(kwargs, match):
    world = SimWorld(get_topology("1x2"))
    with pytest.raises(ValueError, match=match):
        get("dispatcher", "tutel-2dh")(world.comms[0], 8, **kwargs)
