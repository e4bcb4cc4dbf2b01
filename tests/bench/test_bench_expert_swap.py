"""Planning cost of HierD-ES and SmartMoE at the paper's scale, on one CPU core, against the modeled
time of the MoE layer it plans for.

Scale: the HierMoE testbed (32 GPUs, 4 levels), 1024 tokens per GPU, E = 256, K = 8, hidden 3584
(DeepSeek-V3 halved) in bf16; routing is a skewed (Zipf 1.0) synthetic top-8 trace shared by all
ranks' popularity order. What one rank computes per layer and step: its four-case tables
(`local_swap_stats`) and, after the all-reduce, the decision (`decide_swap`).

Modeled MoE-layer time (the denominator; a lower bound of the layer's share of a training step,
which also holds attention, dense layers and the optimizer): the four HierD-AlltoAll phases at d*
(dispatch, combine and their backward twins, `impl.hiermoe.dimension` on the testbed profile) plus
the expert GEMMs of the busiest GPU, forward (3 per expert) and backward (6), from the GEMM model of
FSMoE's Testbed A, the same A6000 hardware class (the HierMoE profile has no compute model).

    .venv/bin/python -m pytest tests/bench/test_bench_expert_swap.py --benchmark-enable \
        --benchmark-timer time.process_time -s
"""
from __future__ import annotations

import pytest
import torch

from baselines.smartmoe import smartmoe_placement
from impl.common.costmodel import load_profile
from impl.common.dispatcher import ExpertPlacement
from impl.common.models import get_model
from impl.common.topology import get_topology
from impl.common.traces import synthetic_topk
from impl.hiermoe.dimension import modeled_times, select_dimension
from impl.hiermoe.expert_swap import MAX_FNS, decide_swap, global_swap_stats, local_swap_stats

pytestmark = pytest.mark.bench

G_TOPOLOGY, TOKENS, BYTES_PER_ELEM = "hiermoe-testbed", 1024, 2


@pytest.fixture(scope="module")
def scale():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    topo, profile = get_topology(G_TOPOLOGY), load_profile(G_TOPOLOGY)
    model = get_model("deepseek-v3-half6")
    E, K, M, H = model.num_experts, model.top_k, model.hidden, model.moe_ffn_hidden
    maps = []
    for r in range(topo.G):
        ids = synthetic_topk(TOKENS, E, K, "zipf", skew=1.0, seed=r, popularity_seed=1)
        m = torch.zeros(TOKENS, E, dtype=torch.bool)
        m[torch.arange(TOKENS).unsqueeze(1), ids] = True
        maps.append(m)
    placement = ExpertPlacement.identity(E)
    stats = global_swap_stats(maps, topo, placement)
    flat = local_swap_stats(maps[0], topo, placement, 0)
    row_bytes = M * BYTES_PER_ELEM
    times = modeled_times(stats.counts, profile, row_bytes)
    d = select_dimension(times)
    gemm = load_profile("fsmoe-testbed-a").compute_model("gemm")
    rows_per_expert = sum(m.sum(0) for m in maps).view(topo.G, -1)              # [G, E_local]
    busiest = max(range(topo.G), key=lambda g: int(rows_per_expert[g].sum()))
    gemm_ms = sum(9 * gemm.time_ms(int(rows) * M * H) for rows in rows_per_expert[busiest].tolist())
    layer_ms = 4 * times[d] + gemm_ms
    info = {"G": topo.G, "E": E, "K": K, "tokens_per_gpu": TOKENS, "hidden": M, "d_star": d,
            "t_dstar_ms": times[d], "expert_gemm_ms": gemm_ms, "modeled_moe_layer_ms": layer_ms,
            "allreduce_bytes": flat.numel() * flat.element_size()}
    yield {"topo": topo, "profile": profile, "maps": maps, "placement": placement, "stats": stats,
           "row_bytes": row_bytes, "info": info}
    torch.set_num_threads(threads)


def _report(benchmark, scale, what: str):
    benchmark.extra_info.update(scale["info"])
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        median_ms = stats.stats.median * 1e3
        share = median_ms / scale["info"]["modeled_moe_layer_ms"]
        benchmark.extra_info.update(median_ms=median_ms, share_of_modeled_layer=share)
        print(f"\n{what}: {median_ms:.2f} ms = {100 * share:.2f}% of the modeled MoE layer "
              f"({scale['info']['modeled_moe_layer_ms']:.1f} ms: 4 x t_d*={scale['info']['t_dstar_ms']:.2f} ms "
              f"at d*={scale['info']['d_star']} + expert GEMMs {scale['info']['expert_gemm_ms']:.1f} ms)")


def test_bench_local_tables(benchmark, scale):
    """One rank's four-case tables of all levels (before the all-reduce)."""
    benchmark(local_swap_stats, scale["maps"][0], scale["topo"], scale["placement"], 0)
    _report(benchmark, scale, "local tables")


@pytest.mark.parametrize("max_fn", MAX_FNS)
def test_bench_decision(benchmark, scale, max_fn):
    """Theorem 1 over all 32,640 pairs from the global tables (every rank)."""
    dec = benchmark(decide_swap, scale["stats"], scale["placement"], scale["profile"], scale["row_bytes"],
                    max_fn=max_fn)
    assert dec.pair is not None
    _report(benchmark, scale, f"decision ({max_fn})")


def test_bench_planning_per_rank(benchmark, scale):
    """Everything one rank computes for one layer and step (the all-reduce of the tables aside)."""
    def plan():
        local_swap_stats(scale["maps"][0], scale["topo"], scale["placement"], 0)
        return decide_swap(scale["stats"], scale["placement"], scale["profile"], scale["row_bytes"])
    benchmark(plan)
    _report(benchmark, scale, "HierD-ES planning per rank")


def test_bench_four_case_reference(benchmark, scale):
    """The literal four-case update (O(T*K*E) per level) for one rank: the reference the
    factored tables are tested against."""
    benchmark.pedantic(local_swap_stats, args=(scale["maps"][0], scale["topo"], scale["placement"], 0, "four_case"),
                       rounds=1, iterations=1)
    _report(benchmark, scale, "four-case reference tables")


def test_bench_smartmoe(benchmark, scale):
    """SmartMoE: raw per-expert counts and the greedy swap plan from the global loads."""
    load = sum(m.sum(0) for m in scale["maps"])

    def plan():
        scale["maps"][0].sum(0)
        return smartmoe_placement(load, scale["placement"], scale["topo"].G)
    benchmark(plan)
    _report(benchmark, scale, "SmartMoE planning")
