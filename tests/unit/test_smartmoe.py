"""SmartMoE placement planner: hand-computed outcomes, invariants on random loads, the planner on
simulated ranks (global raw counts, history window, frequency) and exact training with its swaps."""
import pytest
import torch

from baselines.smartmoe import SMARTMOE_METHODS, SmartMoEPlanner, rank_loads, smartmoe_placement
from impl.common.comm import SimWorld
from impl.common.dispatcher import ExpertPlacement
from impl.common.registry import get
from impl.common.topology import get_topology
from tests.support.expert_training import TrainCase, train_rank

IDENTITY4, IDENTITY6 = ExpertPlacement.identity(4), ExpertPlacement.identity(6)


@pytest.mark.parametrize("method,loads,G,start,expected", [
    # ranks {5,4}=9 | {1,0}=1: e0<->e3 (max 6), then e2<->e3 (max 5), then nothing helps
    ("greedy-swap", [5, 4, 1, 0], 2, IDENTITY4, (3, 1, 0, 2)),
    # {9,1}=10 | {2,2}=4 | {3,0}=3: moving e0 would overload rank 2; e1<->e5 gives max 9 (optimal)
    ("greedy-swap", [9, 1, 2, 2, 3, 0], 3, IDENTITY6, (0, 5, 2, 3, 4, 1)),
    # LPT: e0->r0, e1->r1, e2->r1, e3->r0 (loads 5, 5 < 9); e0, e2 keep their slots
    ("lpt", [5, 4, 1, 0], 2, IDENTITY4, (0, 3, 2, 1)),
    # LPT: r0 {e0, e4}=7, r1 {e2, e5}=7, r2 {e1, e3}=8 < 10; arrivals fill freed slots in id order
    ("lpt", [6, 4, 6, 4, 1, 1], 3, IDENTITY6, (0, 4, 2, 5, 1, 3)),
    # greedy-swap stops at a tie of two most-loaded ranks (the max cannot drop in one swap)
    ("greedy-swap", [6, 4, 6, 4, 1, 1], 3, IDENTITY6, (0, 1, 2, 3, 4, 5)),
    # balanced already / one expert per rank: nothing to do
    ("greedy-swap", [3, 3, 3, 3], 2, IDENTITY4, (0, 1, 2, 3)),
    ("lpt", [3, 3, 3, 3], 2, IDENTITY4, (0, 1, 2, 3)),
    ("greedy-swap", [7, 0, 1, 2], 4, IDENTITY4, (0, 1, 2, 3)),
    ("lpt", [7, 0, 1, 2], 4, IDENTITY4, (0, 1, 2, 3)),
    # a non-identity start: rank 0 = slots {0, 1} holds e0 (8) and e3 (1), rank 1 e1 (2) and e2 (0);
    # e3 <-> e2 (rank loads 8 | 3), then moving e0 would overload rank 1
    ("greedy-swap", [8, 2, 0, 1], 2, ExpertPlacement((0, 2, 3, 1)), (0, 2, 1, 3)),
])
def test_hand_computed_outcomes(method, loads, G, start, expected):
    assert smartmoe_placement(loads, start, G, method).slot_of_expert == expected


def test_default_is_smartmoes_lpt_and_balances_ties():
    """SmartMoE's published planner balances four hot experts on four ranks; the earlier
    greedy-swap reconstruction (an option now) stops at the tie of two most-loaded ranks."""
    loads, start = [10, 10, 10, 10, 1, 1, 1, 1], ExpertPlacement.identity(8)
    assert SmartMoEPlanner().method == "lpt"
    assert rank_loads(loads, smartmoe_placement(loads, start, 4), 4) == [11, 11, 11, 11]
    assert rank_loads(loads, smartmoe_placement(loads, start, 4, "greedy-swap"), 4) == [20, 20, 2, 2]


@pytest.mark.parametrize("method", SMARTMOE_METHODS)
@pytest.mark.parametrize("G,El", [(2, 2), (4, 2), (4, 4), (8, 2), (3, 5)])
def test_invariants_on_random_loads(method, G, El):
    g = torch.Generator().manual_seed(G * 31 + El)
    E = G * El
    for trial in range(40):
        loads = (torch.rand(E, generator=g) ** 3 * 100).long().tolist()
        start = ExpertPlacement(tuple(torch.randperm(E, generator=g).tolist()))
        new = smartmoe_placement(loads, start, G, method)
        before, after = max(rank_loads(loads, start, G)), max(rank_loads(loads, new, G))
        assert after <= before                                        # never increases the max load
        if new != start:
            assert after < before                                     # moves only for a strict drop
        assert smartmoe_placement(loads, new, G, method) == new       # stops when no move helps
        if method == "greedy-swap":                                   # ... no single swap of its rule helps
            loads_r = rank_loads(loads, new, G)
            dst = min(range(G), key=lambda r: (loads_r[r], r))
            f = min((e for e in range(E) if new.owner_rank(e, G) == dst), key=lambda e: (loads[e], e))
            for e in range(E):
                if new.owner_rank(e, G) != dst and loads[e] > loads[f]:
                    assert max(rank_loads(loads, new.swap(e, f), G)) >= after


# ------------------------------------------------------------------------------------------
# the planner on simulated ranks
# ------------------------------------------------------------------------------------------
def _maps(G, E, iterations, T=12, K=2):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(iterations):
        per_rank = []
        for _ in range(G):
            probs = torch.linspace(3.0, 0.2, E)  # skewed: low ids popular
            ids = torch.multinomial(probs.expand(T, E), K, replacement=False, generator=g)
            m = torch.zeros(T, E, dtype=torch.bool)
            m[torch.arange(T).unsqueeze(1), ids] = True
            per_rank.append(m)
        out.append(per_rank)
    return out


def _run_planner(comm, maps, kwargs):
    planner = SmartMoEPlanner(**kwargs)
    placement = ExpertPlacement.identity(maps[0][0].shape[1])
    out = []
    for it, per_rank in enumerate(maps):
        placement = planner.step(comm, it, placement, per_rank[comm.rank])
        out.append((placement.slot_of_expert, planner.last_loads))
    return out


@pytest.mark.parametrize("method", SMARTMOE_METHODS)
def test_planner_uses_global_raw_counts_of_its_window(method):
    topo = get_topology("2x2")
    maps = _maps(topo.G, 8, 5)
    results = SimWorld(topo).run(_run_planner, maps, {"every": 2, "history": 2, "method": method})
    assert all(r == results[0] for r in results)
    placement = ExpertPlacement.identity(8)
    for it, (slots, loads) in enumerate(results[0]):
        if it % 2 == 0:
            window = maps[max(0, it - 1): it + 1]
            expected = sum(m.sum(0) for per_rank in window for m in per_rank)   # raw, not deduplicated
            assert loads == expected.tolist()
            placement = smartmoe_placement(expected, placement, topo.G, method)
        assert slots == placement.slot_of_expert


@pytest.mark.parametrize("dispatcher", ["flat", "hd2"])
def test_training_with_smartmoe_swaps_is_exact(dispatcher):
    """SmartMoE, and HD2-MoE-Smart (the hd2 dispatcher with this planner): moving experts by raw
    loads leaves the losses and every logical expert's state bit-identical."""
    topo = get_topology("2x2")
    base = SimWorld(topo).run(train_rank, TrainCase(dispatcher=dispatcher, num_experts=16, tokens_per_rank=24))[0]
    for kwargs in ((("history", 1),), (("method", "lpt"),)):
        run = SimWorld(topo).run(train_rank, TrainCase(dispatcher=dispatcher, num_experts=16, tokens_per_rank=24,
                                                       policy="smartmoe", planner_kwargs=kwargs))[0]
        assert run["moves"] > 0
        assert run["losses"] == base["losses"]
        for e, entries in base["experts"]["experts"].items():
            for label, value in entries.items():
                assert torch.equal(run["experts"]["experts"][e][label], value), (e, label)


def test_registered_and_bad_input_fails_clearly():
    assert get("placement_planner", "smartmoe") is SmartMoEPlanner
    with pytest.raises(ValueError, match="method: 'optimal' is not allowed; allowed: lpt, greedy-swap"):
        SmartMoEPlanner(method="optimal")
    with pytest.raises(ValueError, match="history"):
        SmartMoEPlanner(history=0)
    with pytest.raises(ValueError, match="every"):
        SmartMoEPlanner(every=-1)
    with pytest.raises(ValueError, match="load has 3 entries for 4 experts"):
        smartmoe_placement([1, 2, 3], IDENTITY4, 2)
    with pytest.raises(ValueError, match="not divisible"):
        smartmoe_placement([1, 2, 3, 4], IDENTITY4, 3)
