"""d* of HierD-AlltoAll: counts, holders, volumes and the modeled times equal a slow loop-based
reference that follows every token copy; the volumes equal the traffic the real dispatcher
counts on SimComm; every rank agrees on d*."""
from collections import defaultdict
import math
import random

import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.costmodel import HardwareProfile, LinearModel, load_profile, topology_steps
from impl.common.dispatcher import ExpertPlacement
from impl.common.routing import routing_from_topk
from impl.common.topology import get_topology
from impl.common.traces import synthetic_topk
from impl.hiermoe.dedup_a2a import HierarchicalDispatcher
from impl.hiermoe.dimension import (RouteCounts, choose_dimension, choose_from_counts, local_counts,
                                    modeled_time, modeled_times, route_counts, route_volumes, select_dimension,
                                    volumes)

TOPOLOGIES = ["2x4", "hier:node=2,socket=2,gpu=2", "hier:a=3,b=2,c=2",
              pytest.param("hiermoe-testbed", marks=pytest.mark.slow)]


# ---- slow references: follow every copy with Python loops -------------------------------------

def random_maps(topo, E, K, T, distribution, seed, drop=0.0):
    """Per-rank routing maps (logical ids); `drop` empties a share of the top-k slots."""
    maps, g = [], torch.Generator().manual_seed(seed)
    for r in range(topo.G):
        ids = synthetic_topk(T, E, K, distribution=distribution, skew=1.2, seed=seed * 1000 + r,
                             popularity_seed=seed)
        if drop:
            ids = torch.where(torch.rand(ids.shape, generator=g) < drop, torch.full_like(ids, -1), ids)
        maps.append(routing_from_topk(ids, torch.ones(ids.shape), E).routing_map_TE)
    return maps


def loop_counts(routing_map, topo, slot_of_expert, dedup):
    E = routing_map.shape[1]
    out = []
    for L in range(1, topo.D + 1):
        per = E // topo.U[L]
        q = [0] * topo.U[L]
        for t in range(routing_map.shape[0]):
            groups = [slot_of_expert[e] // per for e in range(E) if routing_map[t, e]]
            for j in (set(groups) if dedup else groups):
                q[j] += 1
        out += q
    return out


def loop_route(maps, topo, slot_of_expert, dim, dedup):
    """[{(holder, peer): rows}] per step of the route, self-splits included."""
    E = maps[0].shape[1]
    splits = [defaultdict(int) for _ in range(dim)]
    for src, m in enumerate(maps):
        for t in range(m.shape[0]):
            slots = {slot_of_expert[e] for e in range(E) if m[t, e]}
            for start in ([slots] if dedup else [{s} for s in slots]):
                if not start:
                    continue
                copies = [(src, start)]
                for i in range(1, dim):
                    per, nxt = E // topo.U[i], []
                    for h, carried in copies:
                        group = topo.group_of("inter", i, h)
                        for child in sorted({s // per for s in carried}):
                            (peer,) = [r for r in group if topo.group_index(r, i) == child]
                            splits[i - 1][(h, peer)] += 1
                            nxt.append((peer, {s for s in carried if s // per == child}))
                    copies = nxt
                for h, carried in copies:
                    for gpu in sorted({s // (E // topo.G) for s in carried}):
                        assert gpu in topo.group_of("intra", dim - 1, h)
                        splits[dim - 1][(h, gpu)] += 1
    return splits


def loop_time(maps, topo, slot_of_expert, dim, dedup, profile, row_bytes):
    total = 0.0
    for k, split in enumerate(loop_route(maps, topo, slot_of_expert, dim, dedup)):
        if k < dim - 1:
            name, fan = f"inter-{k + 1}", len(topo.group_of("inter", k + 1, 0))
        else:
            name, fan = ("flat" if dim == 1 else f"intra-{dim - 1}"), len(topo.group_of("intra", dim - 1, 0))
        model = profile.comm_model("a2a", name)
        total += model.alpha_ms + model.beta_ms * fan * max(split.values(), default=0) * row_bytes
    return total


def loop_choice(times):
    best = None
    for d in range(2, len(times) + 1):
        if best is None or times[d] < times[best]:
            best = d
    return 1 if best is None or times[1] < times[best] else best


def loop_traffic(maps, topo, slot_of_expert, dim, dedup, row_bytes):
    rows = {n: 0 for n in topo.level_names}
    msgs = dict(rows)
    for split in loop_route(maps, topo, slot_of_expert, dim, dedup):
        for (a, b), n in split.items():
            if a != b and n:
                rows[topo.link_name(a, b)] += n
                msgs[topo.link_name(a, b)] += 1
    return rows, {k: v * row_bytes for k, v in rows.items()}, msgs


def random_profile(topo, rng):
    """Random alpha-beta per step, links getting faster towards the finer levels (as on real
    clusters), so that every dimension has a chance to win."""
    beta = {"flat": 10 ** rng.uniform(-7, -5.5)}
    beta["inter-1"] = beta["flat"] * rng.uniform(0.7, 1.1)
    for level in range(1, topo.D):
        beta[f"intra-{level}"] = beta[f"inter-{level}"] * 10 ** -rng.uniform(0.2, 1.2)
        if level + 1 < topo.D:
            beta[f"inter-{level + 1}"] = beta[f"intra-{level}"] * rng.uniform(0.7, 1.3)
    comm = {("a2a", s): LinearModel(rng.uniform(0.01, 0.4), beta[s]) for s in topology_steps(topo)}
    return HardwareProfile(name="random", topology=topo.name, source="test", comm=comm)


def random_placement(E, seed):
    return ExpertPlacement(tuple(torch.randperm(E, generator=torch.Generator().manual_seed(seed)).tolist()))


# ---- counts ------------------------------------------------------------------------------

@pytest.mark.parametrize("topo_name,E,K", [("2x4", 16, 3), ("hier:a=3,b=2,c=2", 24, 5), pytest.param("hiermoe-testbed", 64, 8, marks=pytest.mark.slow)])
def test_counts_equal_loop_count(topo_name, E, K):
    topo = get_topology(topo_name)
    placement = random_placement(E, 5)
    maps = random_maps(topo, E, K, 9, "zipf", seed=2, drop=0.2)
    for dedup in (True, False):
        for m in maps[:4]:
            assert local_counts(m, topo, placement, dedup).tolist() == \
                loop_counts(m, topo, placement.slot_of_expert, dedup)


def test_counts_by_hand():
    topo = get_topology("2x2")          # 4 GPUs, E = 8: GPU blocks {0,1} {2,3} {4,5} {6,7}
    m = torch.zeros(3, 8, dtype=torch.bool)
    m[0, [0, 1, 2]] = True              # node 0 only; GPUs 0, 1
    m[1, [0, 7]] = True                 # nodes 0 and 1; GPUs 0, 3
    m[2, [4, 5]] = True                 # node 1; GPU 2
    # level 1 (2 nodes) then level 2 (4 GPUs)
    assert local_counts(m, topo).tolist() == [2, 2] + [2, 1, 1, 1]
    assert local_counts(m, topo, dedup=False).tolist() == [4, 3] + [3, 1, 2, 1]


# ---- volumes against the loop reference and the real dispatcher -------------------------------

@pytest.mark.parametrize("topo_name,E,K", [("2x4", 16, 4), ("hier:a=3,b=2,c=2", 24, 6), pytest.param("hiermoe-testbed", 64, 8, marks=pytest.mark.slow)])
def test_volumes_equal_loop_route(topo_name, E, K):
    topo = get_topology(topo_name)
    placement = random_placement(E, 11)
    maps = random_maps(topo, E, K, 6, "uniform", seed=4, drop=0.1)
    for dedup in (True, False):
        counts = route_counts(maps, topo, placement, dedup)
        for d in range(1, topo.D + 1):
            vol = route_volumes(counts, d, row_bytes=10)
            rows, bytes_, msgs = loop_traffic(maps, topo, placement.slot_of_expert, d, dedup, 10)
            assert (vol.rows_by_level, vol.bytes_by_level, vol.messages_by_level) == (rows, bytes_, msgs)
            ref = loop_route(maps, topo, placement.slot_of_expert, d, dedup)
            assert [s.max_rows for s in vol.steps] == [max(r.values(), default=0) for r in ref]


def _dispatch_rank(comm, ids_by_rank, E, placement, dim, dedup):
    ids = ids_by_rank[comm.rank]
    routing = routing_from_topk(ids, torch.ones(ids.shape), E)
    dispatcher = HierarchicalDispatcher(comm, E, dim=dim, dedup=dedup)
    dispatcher.dispatch(torch.randn(ids.shape[0], 3), routing, placement)
    return routing.routing_map_TE


@pytest.mark.parametrize("topo_name,E,K", [("2x4", 16, 4), ("hier:a=3,b=2,c=2", 24, 4), pytest.param("hiermoe-testbed", 64, 8, marks=pytest.mark.slow)])
def test_volumes_equal_dispatcher_traffic(topo_name, E, K):
    """Forward 'tokens' rows, bytes and messages per level of the real HDd / Hd dispatch."""
    topo = get_topology(topo_name)
    placement = random_placement(E, 3)
    g = torch.Generator().manual_seed(9)
    ids_by_rank = []
    for r in range(topo.G):
        T = [0, 3, 8][r % 3]           # uneven, one rank in three routes nothing
        ids = synthetic_topk(T, E, K, distribution="zipf", seed=r)
        ids_by_rank.append(torch.where(torch.rand(ids.shape, generator=g) < 0.15, torch.full_like(ids, -1), ids))
    for dim in range(1, topo.D + 1):
        for dedup in (True, False):
            world = SimWorld(topo)
            maps = world.run(_dispatch_rank, ids_by_rank, E, placement, dim, dedup)
            total = world.total_traffic()
            vol = volumes(maps, topo, placement, dim, dedup, row_bytes=3 * 4)
            label = vol.variant
            assert total.by_level("bytes", "tokens", "fwd") == vol.bytes_by_level, label
            assert total.by_level("rows", "tokens", "fwd") == vol.rows_by_level, label
            assert total.by_level("messages", "tokens", "fwd") == vol.messages_by_level, label


# ---- the model and d* ----------------------------------------------------------------------

@pytest.mark.parametrize("topo_name", TOPOLOGIES)
def test_choice_equals_brute_force_argmin(topo_name):
    topo = get_topology(topo_name)
    rng = random.Random(topo_name)
    E_choices = [e for e in (16, 24, 32, 48, 64) if e % topo.G == 0]
    chosen = set()
    for case in range(8 if topo.G < 32 else 4):
        E = rng.choice(E_choices)
        K = rng.randint(1, min(8, E))
        dist = rng.choice(["uniform", "zipf"])
        placement = random_placement(E, case)
        maps = random_maps(topo, E, K, rng.randint(4, 12), dist, seed=case)
        profile = random_profile(topo, rng)
        row_bytes = 2 ** rng.randint(10, 17)
        counts = route_counts(maps, topo, placement)
        times = modeled_times(counts, profile, row_bytes)
        ref = {d: loop_time(maps, topo, placement.slot_of_expert, d, True, profile, row_bytes)
               for d in range(1, topo.D + 1)}
        assert times == pytest.approx(ref, rel=1e-12)
        assert choose_from_counts(counts, profile, row_bytes) == loop_choice(ref)
        chosen.add(loop_choice(ref))
        # the no-dedup routes H1..HD under the same model
        flat = route_counts(maps, topo, placement, dedup=False)
        d = rng.randint(1, topo.D)
        assert modeled_time(flat, d, profile, row_bytes) == pytest.approx(
            loop_time(maps, topo, placement.slot_of_expert, d, False, profile, row_bytes), rel=1e-12)
    assert len(chosen) > 1, f"every case chose d={chosen}: the cases do not discriminate"


def test_select_dimension_rule_of_eq6():
    assert select_dimension({1: 0.9, 2: 1.0, 3: 1.2}) == 1
    assert select_dimension({1: 1.0, 2: 1.0}) == 2            # t_1 must be strictly smaller
    assert select_dimension({1: 2.0, 2: 1.0, 3: 1.0}) == 2    # first deeper argmin on a tie
    assert select_dimension({1: 2.0, 2: 1.5, 3: 1.0}) == 3
    assert select_dimension({1: 3.0}) == 1


def _expected_counts(topo, E, K, T, dedup):
    """Counts under uniform routing with every split at its mean (digest section 3.7's setting)."""
    levels = []
    for L in range(1, topo.D + 1):
        g = E // topo.U[L]
        mean = T * (1 - math.comb(E - g, K) / math.comb(E, K)) if dedup else T * K / topo.U[L]
        levels.append(torch.full((topo.G, topo.U[L]), round(mean), dtype=torch.int64))
    return RouteCounts(topo, dedup, tuple(levels))


@pytest.mark.parametrize("E,K,M,megatron,hd", [
    (128, 8, 2048, 19.85, [18.32, 13.04, 12.40, 12.90]),    # Qwen3-30B-A3B
    (256, 8, 3584, 34.19, [31.12, 21.88, 20.90, 21.59]),    # DeepSeek-V3, half width
    (128, 10, 2048, 24.63, [22.19, 14.29, 13.28, 13.82])])
def test_model_reproduces_testbed_illustration(E, K, M, megatron, hd):
    """Fig. 9 constants, T = 1024 tokens per GPU, bf16: the predicted times of digest section 3.7
    (rounding the mean counts to whole tokens moves them by < 0.1 ms) and d* = 3."""
    topo, profile = get_topology("hiermoe-testbed"), load_profile("hiermoe-testbed")
    assert modeled_time(_expected_counts(topo, E, K, 1024, False), 1, profile, 2 * M) == pytest.approx(megatron, abs=0.1)
    counts = _expected_counts(topo, E, K, 1024, True)
    assert list(modeled_times(counts, profile, 2 * M).values()) == pytest.approx(hd, abs=0.1)
    assert choose_from_counts(counts, profile, 2 * M) == 3


def _choose_rank(comm, maps, profile):
    m = maps[comm.rank]
    alone_GX = torch.zeros(comm.world_size, sum(comm.topology.U[1:]), dtype=torch.int64)
    alone_GX[comm.rank] = local_counts(m, comm.topology)     # all a rank knows without communicating
    local_choice = choose_from_counts(RouteCounts.from_table(comm.topology, alone_GX, True), profile, 4096)
    return choose_dimension(comm, m, None, 2048, 2, profile), local_choice


def test_every_rank_agrees_even_when_local_choices_differ():
    topo, profile = get_topology("hiermoe-testbed"), load_profile("hiermoe-testbed")
    E, K = 64, 8
    heavy = random_maps(topo, E, K, 256, "uniform", seed=1)
    maps = [m if r % 4 == 0 else m[:0] for r, m in enumerate(heavy)]   # 3 of 4 ranks route nothing
    results = SimWorld(topo).run(_choose_rank, maps, profile)
    global_choice = choose_from_counts(route_counts(maps, topo), profile, 4096)
    assert {d for d, _ in results} == {global_choice}
    assert len({local for _, local in results}) > 1       # alone, the ranks would disagree


@pytest.mark.dist
def test_every_rank_agrees_on_gloo():
    """The same choice over real torch.distributed collectives (4 gloo processes)."""
    from impl.common.launcher import launch
    topo = get_topology("2x2")
    # the flat AlltoAll starts fastest but moves bytes slowest: ranks with few tokens prefer it
    comm = {("a2a", "flat"): LinearModel(0.1, 1e-6), ("a2a", "inter-1"): LinearModel(0.3, 1e-6)}
    comm[("a2a", "intra-1")] = LinearModel(0.3, 1e-8)
    profile = HardwareProfile(name="start-up-bound", topology=topo.name, source="test", comm=comm)
    heavy = random_maps(topo, 16, 6, 512, "zipf", seed=2)
    maps = [m if r == 2 else m[:2] for r, m in enumerate(heavy)]
    results = launch(_choose_rank, topo.G, args=(maps, profile), topology=topo, timeout_s=60, deadline_s=120)
    assert {d for d, _ in results} == {choose_from_counts(route_counts(maps, topo), profile, 4096)}
    assert len({local for _, local in results}) > 1


def test_errors_name_the_values():
    topo = get_topology("2x4")
    with pytest.raises(ValueError, match="E=12 is not divisible by the expert-parallel size 8"):
        local_counts(torch.zeros(2, 12, dtype=torch.bool), topo)
    with pytest.raises(ValueError, match="2-D bool tensor"):
        local_counts(torch.zeros(2, 16), topo)
    with pytest.raises(ValueError, match="routing maps of 3 ranks; topology '2x4' has G = 8"):
        route_counts([torch.zeros(1, 16, dtype=torch.bool)] * 3, topo)
    counts = route_counts([torch.zeros(1, 16, dtype=torch.bool)] * 8, topo)
    with pytest.raises(ValueError, match=r"d=3 not available on topology '2x4'; allowed: 1..2"):
        route_volumes(counts, 3, 2)
    with pytest.raises(ValueError, match="models topology 'hiermoe-testbed'.*not '2x4'"):
        choose_from_counts(counts, load_profile("hiermoe-testbed"), 2)
    with pytest.raises(ValueError, match="pass dedup counts"):
        choose_from_counts(route_counts([torch.zeros(1, 16, dtype=torch.bool)] * 8, topo, dedup=False),
                           random_profile(topo, random.Random(0)), 2)
