"""HierD-ES planning: Z by the four-case rule equals a recount for every pair, the chosen swap equals
an exhaustive search under the same objective, all ranks agree, and training with swaps is exact."""
import math

import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.dispatcher import ExpertPlacement
from impl.common.registry import get
from impl.common.topology import get_topology
from impl.common.traces import synthetic_topk
from impl.hiermoe.dimension import choose_from_counts, dispatch_counts, local_counts, route_steps
from impl.hiermoe.expert_swap import (MAX_FNS, REL_TOL, HierDExpertSwap, apply_max_fn, decide_swap, global_swap_stats,
                                     pair_objectives,
                                      _real_columns, _unflatten, level_stats, local_swap_stats, selected_slots,
                                      swap_objective, z_four_case)
from tests.support.expert_training import TrainCase, profile_for_topology, train_rank


def routing_map(T, E, K, seed, distribution="zipf", drop=0.0):
    """bool [T, E] from a seeded top-K trace; `drop` removes a share of the (token, expert) pairs
    (capacity drops), so tokens select between 0 and K experts."""
    ids = synthetic_topk(T, E, K, distribution, seed=seed, popularity_seed=7) if distribution != "uniform" else \
        synthetic_topk(T, E, K, "uniform", seed=seed)
    m = torch.zeros(T, E, dtype=torch.bool)
    m[torch.arange(T).unsqueeze(1), ids] = True
    if drop:
        g = torch.Generator().manual_seed(seed + 99)
        m &= torch.rand(T, E, generator=g) >= drop
    return m


def stats_of(map_TS, U):
    return level_stats(*selected_slots(map_TS), map_TS.shape[1], [U])[0]


def z_recount(map_TS, U):
    """Z [E, E, U] from scratch: swap the two columns, OR over each group, count."""
    T, E = map_TS.shape
    Z = torch.zeros(E, E, U, dtype=torch.long)
    for a in range(E):
        for b in range(E):
            perm = list(range(E))
            perm[a], perm[b] = b, a
            Z[a, b] = map_TS[:, perm].view(T, U, E // U).any(2).sum(0)
    return Z


CASES = [  # E, K, T, U, distribution, drop
    (4, 2, 9, 2, "uniform", 0.0),
    (8, 2, 20, 2, "zipf", 0.0),
    (8, 3, 15, 4, "correlated", 0.0),
    (12, 5, 17, 3, "zipf", 0.0),
    (16, 4, 30, 4, "zipf", 0.3),
    (16, 3, 25, 8, "correlated", 0.0),
    (16, 6, 11, 16, "uniform", 0.2),
    (16, 2, 0, 4, "uniform", 0.0),
]


@pytest.mark.parametrize("E,K,T,U,dist,drop", CASES)
def test_four_case_and_factored_z_equal_recount(E, K, T, U, dist, drop):
    m = routing_map(T, E, K, seed=E + K + T, distribution=dist, drop=drop)
    Z = z_recount(m, U)
    assert torch.equal(z_four_case(m, U), Z)
    assert torch.equal(stats_of(m, U).z_tensor(), Z)


@pytest.mark.parametrize("groups", [(2, 4, 8, 16), (4, 16), (1, 2), (16,)])
def test_all_levels_at_once_equal_each_level_alone_and_the_recount(groups):
    m = routing_map(21, 16, 5, seed=4, distribution="correlated", drop=0.25)
    ids, valid = selected_slots(m)
    together = level_stats(ids, valid, 16, groups)
    for U, st in zip(groups, together):
        alone = level_stats(ids, valid, 16, [U])[0]
        for name in ("z0", "x", "solo", "w"):
            assert torch.equal(getattr(st, name), getattr(alone, name)), (U, name)
        assert torch.equal(st.z_tensor(), z_recount(m, U))
    with pytest.raises(ValueError, match="do not nest"):
        level_stats(ids, valid, 16, [4, 8, 2])


@pytest.mark.parametrize("E,K,T,U,dist,drop", CASES[1:6])
@pytest.mark.parametrize("max_fn", MAX_FNS)
def test_vectorised_pair_values_equal_max_fn_of_recount(E, K, T, U, dist, drop, max_fn):
    m = routing_map(T, E, K, seed=3, distribution=dist, drop=drop)
    ref = apply_max_fn(z_recount(m, U).view(E * E, U).double() * 0.37, max_fn, 10.0).view(E, E)
    torch.testing.assert_close(stats_of(m, U).pair_values(0.37, max_fn, 10.0), ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(stats_of(m, U).pair_values(0.37, max_fn, 10.0, torch.float32), ref.float(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("max_fn", MAX_FNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_values_of_any_rows_are_the_rows_of_the_whole_and_symmetric(max_fn, dtype):
    m = routing_map(23, 16, 4, seed=5, distribution="correlated", drop=0.1)
    st = stats_of(m, 4)
    whole = st.pair_values(0.37, max_fn, 10.0, dtype)
    assert torch.equal(whole, whole.t())                      # bit for bit: any rank's rows agree
    for first, end in ((0, 2), (6, 8), (4, 12), (3, 5), (15, 16)):
        assert torch.equal(st.pair_values(0.37, max_fn, 10.0, dtype, rows=(first, end)), whole[first:end])
    with pytest.raises(ValueError, match="rows"):
        st.pair_values(0.37, max_fn, 10.0, dtype, rows=(8, 8))


def test_four_cases_of_fig8_by_hand():
    """8 experts in 4 groups {0,1} {2,3} {4,5} {6,7}; one token selects 0, 1, 4, 6 (z0 = [1,0,1,1])."""
    m = torch.zeros(1, 8, dtype=torch.bool)
    m[0, [0, 1, 4, 6]] = True
    expected = {
        (0, 2): [1, 1, 1, 1],  # case 1: B's group was empty (+1), A's group keeps expert 1
        (4, 2): [1, 1, 0, 1],  # case 2: B's group +1, A was alone in its group (-1)
        (0, 5): [1, 0, 1, 1],  # case 3: B's group already touched, A's group keeps expert 1
        (4, 7): [1, 0, 0, 1],  # case 4: B's group already touched, A alone (-1)
        (0, 1): [1, 0, 1, 1],  # same group: nothing changes
        (0, 4): [1, 0, 1, 1],  # both selected: nothing changes
        (3, 5): [1, 0, 1, 1],  # neither selected
    }
    for Z in (z_four_case(m, 4), stats_of(m, 4).z_tensor()):
        for (a, b), z in expected.items():
            assert Z[a, b].tolist() == z and Z[b, a].tolist() == z, (a, b)


def test_max_functions():
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    assert apply_max_fn(x, "max").tolist() == [4.0, 0.0, 2.0]
    smooth = apply_max_fn(x, "smooth", 2.0)
    torch.testing.assert_close(smooth, torch.tensor([5.0, 0.0, 2 * math.sqrt(3)], dtype=torch.float64))
    # smooth-max is the l_gamma norm: between max and n^(1/gamma) max
    y = torch.rand(50, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    s10 = apply_max_fn(y, "smooth", 10.0)
    assert torch.all(s10 >= y.max(1).values) and torch.all(s10 <= y.max(1).values * 32 ** 0.1 + 1e-9)
    torch.testing.assert_close(apply_max_fn(y, "lse"), torch.logsumexp(y, 1))


# ------------------------------------------------------------------------------------------
# the choice equals an exhaustive search
# ------------------------------------------------------------------------------------------
def exhaustive_swap(maps, topo, placement, profile, row_bytes, max_fn, gamma, dim):
    """Try every pair of experts on different GPUs: recount the global dedup counts of every level
    the route uses after the swap, evaluate Q with the same objective, apply the same tie rule."""
    E, G = placement.num_experts, topo.G
    d = dim or choose_from_counts(dispatch_counts(maps, topo, placement), profile, row_bytes)
    levels = [L for L, _ in route_steps(topo, d)]

    def q_of(pl):
        full = torch.cat([pl.to_slots(m) for m in maps])
        counts = {L: full.view(full.shape[0], topo.U[L], -1).any(2).sum(0, keepdim=True) for L in levels}
        return float(swap_objective(counts, topo, d, profile, row_bytes, max_fn, gamma)[0])

    q_now = q_of(placement)
    pairs = [(r, c) for r in range(E) for c in range(r + 1, E)
             if placement.owner_rank(r, G) != placement.owner_rank(c, G)]
    if not pairs:
        return d, None, q_now
    qs = [q_of(placement.swap(r, c)) for r, c in pairs]
    q_min = min(qs)
    best = min(p for p, q in zip(pairs, qs) if q <= q_min + REL_TOL * max(1.0, abs(q_min)))
    if q_min < q_now - REL_TOL * max(1.0, abs(q_now)):
        return d, best, q_now
    return d, None, q_now


TOPOLOGIES = [("2x2", 8), ("4x2", 16), ("hier:node=2,socket=2,gpu=2", 16), ("1x4", 16), ("hier:gpu=4", 8),
              ("2x4", 16)]


@pytest.mark.parametrize("topo_name,E", TOPOLOGIES)
@pytest.mark.parametrize("K,T", [(2, 12), (4, 20)])
@pytest.mark.parametrize("max_fn", MAX_FNS)
def test_choice_equals_exhaustive_search(topo_name, E, K, T, max_fn):
    topo = get_topology(topo_name)
    profile = profile_for_topology(topo)
    maps = [routing_map(T, E, K, seed=10 * r + K, distribution="zipf") for r in range(topo.G)]
    g = torch.Generator().manual_seed(E + K)
    placement = ExpertPlacement(tuple(torch.randperm(E, generator=g).tolist()))
    for row_bytes, dim in ((4096, None), (1 << 20, None), (1 << 20, topo.D)):
        stats = global_swap_stats(maps, topo, placement)
        d, pair, q_now = exhaustive_swap(maps, topo, placement, profile, row_bytes, max_fn, 10.0, dim)
        for screen in (torch.float32, torch.float64):
            got = decide_swap(stats, placement, profile, row_bytes, max_fn=max_fn, gamma=10.0, dim=dim,
                              screen_dtype=screen)
            assert (got.dim, got.pair) == (d, pair)
            assert got.q_current == pytest.approx(q_now, rel=1e-12)
        split = SimWorld(topo).run(_decide_rank, stats, placement, profile, row_bytes, max_fn, dim)
        assert all(s == got for s in split)                   # rows split over the ranks: the same decision


@pytest.mark.parametrize("topo_name,E", TOPOLOGIES)
@pytest.mark.parametrize("z_method", ["factored", "four_case"])
def test_pair_objectives_equal_the_recount_of_every_swap(topo_name, E, z_method):
    """Q of every slot pair (what the planner screens, and what tells which swaps lower Q) is the
    objective of the recounted swapped placement; pairs on one GPU are inf; any rows are the rows
    of the whole."""
    topo = get_topology(topo_name)
    profile = profile_for_topology(topo)
    maps = [routing_map(12, E, 3, seed=r, distribution="zipf") for r in range(topo.G)]
    placement = ExpertPlacement(tuple(torch.randperm(E, generator=torch.Generator().manual_seed(E)).tolist()))
    stats = global_swap_stats(maps, topo, placement, z_method)
    El = E // topo.G
    for dim, max_fn in ((1, "smooth"), (topo.D, "max"), (topo.D, "lse")):
        levels = [L for L, _ in route_steps(topo, dim)]

        def q_of(pl):
            full = torch.cat([pl.to_slots(m) for m in maps])
            counts = {L: full.view(full.shape[0], topo.U[L], -1).any(2).sum(0, keepdim=True) for L in levels}
            return float(swap_objective(counts, topo, dim, profile, 1 << 16, max_fn, 10.0)[0])

        q = pair_objectives(stats, profile, 1 << 16, dim, max_fn=max_fn)
        of_slot = placement.expert_of_slot
        for s1 in range(E):
            for s2 in range(E):
                if s1 // El == s2 // El:
                    assert q[s1, s2] == math.inf
                else:
                    assert float(q[s1, s2]) == pytest.approx(q_of(placement.swap(of_slot[s1], of_slot[s2])),
                                                             rel=1e-12), (s1, s2)
        torch.testing.assert_close(pair_objectives(stats, profile, 1 << 16, dim, max_fn=max_fn, rows=(El, 3 * El)),
                                   q[El:3 * El], rtol=0, atol=0)


def _decide_rank(comm, stats, placement, profile, row_bytes, max_fn, dim):
    return decide_swap(stats, placement, profile, row_bytes, max_fn=max_fn, dim=dim, comm=comm)


@pytest.mark.parametrize("max_fn", ["max", "smooth"])
def test_split_decision_breaks_ties_like_the_whole(max_fn):
    """Two tokens per rank, one expert each: many tied pairs spread over the ranks' rows. The split
    decision picks the same smallest (r, c) and counts the same ties as one process and as the
    exhaustive search."""
    topo = get_topology("4x2")
    profile = profile_for_topology(topo)
    seen_ties = 0
    for seed in range(6):
        maps = [routing_map(2, 16, 1, seed=seed * 10 + r, distribution="uniform") for r in range(topo.G)]
        placement = ExpertPlacement.identity(16)
        stats = global_swap_stats(maps, topo, placement)
        whole = decide_swap(stats, placement, profile, 1 << 20, max_fn=max_fn)
        split = SimWorld(topo).run(_decide_rank, stats, placement, profile, 1 << 20, max_fn, None)
        assert all(s == whole for s in split)
        assert whole.pair == exhaustive_swap(maps, topo, placement, profile, 1 << 20, max_fn, 10.0, None)[1]
        seen_ties = max(seen_ties, whole.ties if whole.pair else 0)
    assert seen_ties > 4


@pytest.mark.parametrize("topo_name,E", [("2x2", 8), ("hier:node=2,socket=2,gpu=2", 16)])
def test_four_case_method_decides_the_same(topo_name, E):
    topo = get_topology(topo_name)
    profile = profile_for_topology(topo)
    maps = [routing_map(16, E, 3, seed=r, distribution="correlated") for r in range(topo.G)]
    placement = ExpertPlacement.identity(E)
    for max_fn in MAX_FNS:
        a = decide_swap(global_swap_stats(maps, topo, placement), placement, profile, 1 << 20, max_fn=max_fn)
        b = decide_swap(global_swap_stats(maps, topo, placement, "four_case"), placement, profile, 1 << 20,
                        max_fn=max_fn)
        assert (a.dim, a.pair) == (b.dim, b.pair)
        assert a.q_best == pytest.approx(b.q_best, rel=1e-12)


def test_repeated_swaps_lower_q_until_no_pair_helps():
    """Swapping until the planner declines: Q drops strictly each time, and at the end the
    exhaustive search agrees that no pair beats the placement (the no-op case)."""
    topo = get_topology("hier:node=2,socket=2,gpu=2")
    profile = profile_for_topology(topo)
    maps = [routing_map(24, 16, 4, seed=r, distribution="zipf") for r in range(topo.G)]
    placement, last = ExpertPlacement.identity(16), math.inf
    for _ in range(60):
        dec = decide_swap(global_swap_stats(maps, topo, placement), placement, profile, 1 << 20, dim=3)
        assert dec.q_current < last
        if dec.pair is None:
            break
        assert dec.q_best < dec.q_current
        last = dec.q_current
        placement = placement.swap(*dec.pair)
    else:
        pytest.fail("HierD-ES did not converge in 60 swaps")
    assert exhaustive_swap(maps, topo, placement, profile, 1 << 20, "smooth", 10.0, 3)[1] is None


def test_no_swap_when_every_swap_is_neutral():
    topo = get_topology("2x2")
    maps = [torch.ones(5, 8, dtype=torch.bool) for _ in range(4)]  # every token needs every expert
    dec = decide_swap(global_swap_stats(maps, topo, None), ExpertPlacement.identity(8), profile_for_topology(topo),
                      4096)
    assert dec.pair is None and dec.q_best == dec.q_current


# ------------------------------------------------------------------------------------------
# the planner on simulated ranks
# ------------------------------------------------------------------------------------------
def _plan_rank(comm, maps, placement, kwargs, iterations):
    planner = HierDExpertSwap(profile_for_topology(comm.topology), hidden=2048, **kwargs)
    out = []
    for it in range(iterations):
        placement = planner.step(comm, it, placement, maps[comm.rank])
        out.append((placement.slot_of_expert, planner.last_decision))
    return out


@pytest.mark.parametrize("kwargs", [{}, {"max_fn": "max", "dim": 2}, {"max_fn": "lse", "z_method": "four_case"}])
def test_planner_ranks_agree_with_the_sim_tier(kwargs):
    topo = get_topology("2x4")
    maps = [routing_map(16, 16, 4, seed=r) for r in range(topo.G)]
    start = ExpertPlacement.identity(16)
    results = SimWorld(topo).run(_plan_rank, maps, start, kwargs, 1)
    assert all(r == results[0] for r in results)
    dec = decide_swap(global_swap_stats(maps, topo, start), start, profile_for_topology(topo), 2048 * 2,
                      max_fn=kwargs.get("max_fn", "smooth"), dim=kwargs.get("dim"))
    assert results[0][0][1] == dec
    assert results[0][0][0] == (start.swap(*dec.pair) if dec.pair else start).slot_of_expert


def test_update_frequency():
    topo = get_topology("2x2")
    maps = [routing_map(16, 8, 2, seed=r) for r in range(topo.G)]
    out = SimWorld(topo).run(_plan_rank, maps, ExpertPlacement.identity(8), {"every": 3}, 7)[0]
    planned = [it for it, (_, dec) in enumerate(out) if dec is not None and (it == 0 or dec is not out[it - 1][1])]
    assert planned == [0, 3, 6]
    assert out[1][0] == out[0][0] and out[2][0] == out[0][0]  # nothing moves between planning steps


def test_local_stats_add_up_and_follow_the_placement():
    topo = get_topology("2x2")
    maps = [routing_map(10, 8, 3, seed=r, drop=0.2) for r in range(topo.G)]
    both = _unflatten(sum(local_swap_stats(m, topo, None, r) for r, m in enumerate(maps)), topo, 8, "factored")
    whole = _unflatten(local_swap_stats(torch.cat(maps), topo, None, 0), topo, 8, "factored")
    at_once = global_swap_stats(maps, topo, None)             # the sim tier's path: all tokens at once
    for L in range(1, topo.D + 1):                            # the four-case tables are sums over tokens
        for name in ("z0", "x", "solo", "w"):
            assert torch.equal(getattr(both.level(L), name), getattr(whole.level(L), name)), (L, name)
            assert torch.equal(getattr(both.level(L), name), getattr(at_once.level(L), name)), (L, name)
        assert torch.equal(both.counts.level(L), at_once.counts.level(L))
        assert torch.equal(both.pairs.level(L), at_once.pairs.level(L))
    placement = ExpertPlacement((3, 6, 0, 7, 1, 5, 2, 4))
    m = maps[1]
    sparse = local_swap_stats(m, topo, placement, 1)          # slots looked up per selected expert
    dense = local_swap_stats(placement.to_slots(m), topo, None, 1)
    assert torch.equal(sparse, dense)
    counts = _unflatten(sparse, topo, 8, "factored").counts
    assert torch.equal(torch.cat([counts.level(L)[1] for L in range(1, topo.D + 1)]),
                       local_counts(m, topo, placement))


# ------------------------------------------------------------------------------------------
# training with HierD-ES is exact
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dispatcher", ["flat", "hd2"])
def test_training_with_hierd_es_swaps_is_exact(dispatcher):
    topo = get_topology("2x2")
    base = SimWorld(topo).run(train_rank, TrainCase(dispatcher=dispatcher))[0]
    run = SimWorld(topo).run(train_rank, TrainCase(dispatcher=dispatcher, policy="hierd-es",
                                                   planner_kwargs=(("max_fn", "max"),)))[0]
    assert run["moves"] > 0
    assert run["losses"] == base["losses"]
    for e, entries in base["experts"]["experts"].items():
        for label, value in entries.items():
            assert torch.equal(run["experts"]["experts"][e][label], value), (e, label)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_registered_and_bad_options_fail_clearly():
    assert get("placement_planner", "hierd-es") is HierDExpertSwap
    profile = profile_for_topology(get_topology("2x2"))
    with pytest.raises(ValueError, match="max_fn: 'softmax' is not allowed; allowed: max, smooth, lse"):
        HierDExpertSwap(profile, 16, max_fn="softmax")
    with pytest.raises(ValueError, match="gamma"):
        HierDExpertSwap(profile, 16, gamma=0)
    with pytest.raises(ValueError, match="z_method"):
        HierDExpertSwap(profile, 16, z_method="naive")
    with pytest.raises(ValueError, match="every"):
        HierDExpertSwap(profile, 16, every=0)
    with pytest.raises(ValueError, match="hidden"):
        HierDExpertSwap(profile, 0)
    maps = [routing_map(4, 8, 2, seed=r) for r in range(8)]
    with pytest.raises(ValueError, match="pick a profile of the same shape"):
        decide_swap(global_swap_stats(maps, get_topology("2x4"), None), ExpertPlacement.identity(8), profile, 64)


def test_stats_bytes_is_the_all_reduced_vector():
    """What the sim charges for the planner's all-reduce is the vector every rank sends."""
    from impl.hiermoe.expert_swap import stats_bytes
    for topo_name, E in (("2x2", 8), ("hiermoe-testbed", 64)):
        topo = get_topology(topo_name)
        m = routing_map(6, E, 2, seed=1)
        flat = local_swap_stats(m, topo, None, 0)
        assert stats_bytes(topo, E) == flat.numel() * flat.element_size()


def test_real_columns_are_made_once_per_hierarchy_and_device():
    """The spare column after each level's groups is dropped; the indices are kept per (groups,
    device), a different hierarchy or device getting its own."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert _real_columns((2, 4), cpu).tolist() == [0, 1, 3, 4, 5, 6]
    assert _real_columns((2, 4, 8), cpu).tolist() == [0, 1, 3, 4, 5, 6, *range(8, 16)]
    assert _real_columns((2, 4), cpu) is _real_columns((2, 4), cpu)
    on_meta = _real_columns((2, 4), meta)
    assert on_meta.device == meta and on_meta.dtype == torch.int64 and on_meta is _real_columns((2, 4), meta)
