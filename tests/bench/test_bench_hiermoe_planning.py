"""Planning overheads of HierMoE at paper scale, against the modeled communication they plan.

    .venv/bin/python -m pytest tests/bench/test_bench_hiermoe_planning.py --benchmark-enable

Without --benchmark-enable (the default) each benchmark runs its function once, as a test.
"""
import pytest
import torch

from impl.common.costmodel import load_profile
from impl.common.dispatcher import ExpertPlacement
from impl.common.topology import get_topology
from impl.common.traces import synthetic_topk
from impl.hiermoe.dimension import (DispatchCounts, RouteCounts, choose_from_counts, dispatch_counts,
                                    iteration_times, local_counts, select_dimension)

pytestmark = pytest.mark.bench


@pytest.fixture
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- d* selection ----------------------------------------------------------------------------
# DeepSeek-V3 as trained in the paper: E = 256, K = 8, half width (M = 3584), 1024 tokens per
# GPU, bf16, on the 32-GPU testbed (D = 4); experts in a swapped (permuted) placement.
E, K, T, M, V = 256, 8, 1024, 3584, 2


@pytest.fixture(scope="module")
def paper_layer():
    topo, profile = get_topology("hiermoe-testbed"), load_profile("hiermoe-testbed")
    topk_ids_TK = synthetic_topk(topo.G * T, E, K, distribution="zipf", skew=1.0, seed=0)
    maps = torch.zeros(topo.G * T, E, dtype=torch.bool).scatter_(1, topk_ids_TK, True).split(T)
    placement = ExpertPlacement(tuple(torch.randperm(E, generator=torch.Generator().manual_seed(0)).tolist()))
    table_GX = torch.cat([torch.stack([local_counts(m, topo, placement, dedup) for m in maps])
                          for dedup in (True, False)], dim=1)                     # what the all-reduce returns
    return topo, profile, maps, placement, table_GX


def _counts(topo, table_GX) -> DispatchCounts:
    copies, pairs = table_GX.split(table_GX.shape[1] // 2, dim=1)
    return DispatchCounts(RouteCounts.from_table(topo, copies, True), RouteCounts.from_table(topo, pairs, False), E)


def _report(benchmark, counts, profile):
    times = iteration_times(counts, profile, M * V)
    d_star = select_dimension(times)
    benchmark.extra_info.update(
        d_star=d_star, modeled_layer_a2a_ms={d: round(t, 3) for d, t in times.items()})
    return d_star


def test_bench_choose_dimension_per_rank(benchmark, paper_layer, single_thread):
    """One rank, one layer: count its 1024 tokens (OR over the expert blocks of every level, and the
    pairs), then evaluate t_1..t_D on the all-reduced counts and pick d*. The all-reduce itself
    (30 KiB) is communication and not timed here."""
    topo, profile, maps, placement, table_GX = paper_layer

    def choose():
        local_counts(maps[0], topo, placement)
        local_counts(maps[0], topo, placement, dedup=False)
        return choose_from_counts(_counts(topo, table_GX), profile, M * V)

    d = benchmark(choose)
    assert d == _report(benchmark, _counts(topo, table_GX), profile)


def test_bench_choose_dimension_sim_tier(benchmark, paper_layer, single_thread):
    """The sim tier's cost per layer: the counts of all 32 ranks, then d*."""
    topo, profile, maps, placement, _ = paper_layer

    def choose():
        return choose_from_counts(dispatch_counts(maps, topo, placement), profile, M * V)

    d = benchmark(choose)
    assert d == _report(benchmark, dispatch_counts(maps, topo, placement), profile)
