"""Planning cost of HierD-ES and SmartMoE at the paper's scale, on one CPU core, against the modeled
time of the MoE layer it plans for and of the training step.

Scale: the HierMoE testbed (32 GPUs, 4 levels), 1024 tokens per GPU, E = 256, K = 8, hidden 3584
(DeepSeek-V3 halved) in bf16; routing is a skewed (Zipf 1.0) synthetic top-8 trace shared by all
ranks' popularity order. What one rank computes per layer and step: its four-case tables
(`local_swap_stats`) and, after the all-reduce, its share of the decision (`decide_swap` with the
rank's rows; the whole decision in one process, as the sim tier runs it, is reported beside).
Not timed: the all-reduce of the tables (its bytes and a modeled estimate are reported) and the
three scalar collectives of the split decision.

Denominators (modeled). The MoE layer: the four HierD-AlltoAll phases at d* (dispatch, combine and
their backward twins, every collective, `impl.hiermoe.dimension.iteration_times` on the testbed
profile) plus the expert GEMMs of the
busiest GPU, forward (3 per expert) and backward (6), from the GEMM model of FSMoE's Testbed A, the
same A6000 hardware class (the HierMoE profile has no compute model); a lower bound of the layer's
share of a step. The step: the sim tier's DeepSeek-V3 experiment (`hiermoe_deepseek.yaml`: 6 layers,
3 of them MoE), every MoE layer as above plus the dense compute (`simulate.dense_compute_ms`);
planning runs once per MoE layer, so its share of the step is layers x planning / step.

    .venv/bin/python -m pytest tests/bench/test_bench_expert_swap.py --benchmark-enable \
        --benchmark-timer time.process_time -s
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baselines.smartmoe import smartmoe_placement
from impl.common.costmodel import load_profile
from impl.common.dispatcher import ExpertPlacement
from impl.common.models import get_model
from impl.common.topology import get_topology
from impl.common.traces import synthetic_topk
from impl.hiermoe.dimension import allreduce_time, iteration_times, select_dimension
from impl.common.config import build_config
from impl.hiermoe.expert_swap import MAX_FNS, _unflatten, decide_swap, local_swap_stats
from impl.experiments.hiermoe.sim import SimExperimentConfig, dense_compute_ms, resolve
from tests.support.rank_view import RankView

pytestmark = pytest.mark.bench

G_TOPOLOGY, TOKENS, BYTES_PER_ELEM = "hiermoe-testbed", 1024, 2
EXPERIMENT = Path(__file__).resolve().parents[2] / "workflows/config/experiments/hiermoe_deepseek.yaml"


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
    flat_sum = sum(local_swap_stats(m, topo, placement, r) for r, m in enumerate(maps))
    stats = _unflatten(flat_sum.clone(), topo, E, "factored")
    flat = local_swap_stats(maps[0], topo, placement, 0)
    row_bytes = M * BYTES_PER_ELEM
    times = iteration_times(stats.dispatch_counts, profile, row_bytes)      # a layer's four AlltoAll phases
    d = select_dimension(times)
    gemm = load_profile("fsmoe-testbed-a").compute_model("gemm")
    rows_per_expert = sum(m.sum(0) for m in maps).view(topo.G, -1)              # [G, E_local]
    busiest = max(range(topo.G), key=lambda g: int(rows_per_expert[g].sum()))
    gemm_ms = sum(9 * gemm.time_ms(int(rows) * M * H) for rows in rows_per_expert[busiest].tolist())
    layer_ms = times[d] + gemm_ms
    # the modeled training step of the sim tier's DeepSeek-V3 experiment (same model, topology,
    # profiles): every MoE layer as above plus the dense compute (attention, dense FFN layers, head)
    rz = resolve(build_config(SimExperimentConfig, EXPERIMENT))
    moe_layers = sum(1 for i in range(rz.model.num_layers) if rz.model.is_moe_layer(i))
    step_ms = dense_compute_ms(rz) + moe_layers * layer_ms
    table_bytes = flat.numel() * flat.element_size()
    # the tables' all-reduce, estimated as the sim tier charges it (modeled, not measured)
    allreduce_ms = allreduce_time(profile, table_bytes)
    info = {"G": topo.G, "E": E, "K": K, "tokens_per_gpu": TOKENS, "hidden": M, "d_star": d,
            "t_dstar_ms": times[d], "expert_gemm_ms": gemm_ms, "modeled_moe_layer_ms": layer_ms,
            "allreduce_bytes": table_bytes, "allreduce_estimated_ms": allreduce_ms,
            "moe_layers": moe_layers, "modeled_step_ms": step_ms}
    yield {"topo": topo, "profile": profile, "maps": maps, "placement": placement, "stats": stats,
           "flat_sum": flat_sum, "row_bytes": row_bytes, "info": info}
    torch.set_num_threads(threads)


def _report(benchmark, scale, what: str):
    benchmark.extra_info.update(scale["info"])
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        info = scale["info"]
        median_ms = stats.stats.median * 1e3
        share = median_ms / info["modeled_moe_layer_ms"]
        step_share = info["moe_layers"] * median_ms / info["modeled_step_ms"]
        benchmark.extra_info.update(median_ms=median_ms, share_of_modeled_layer=share,
                                    share_of_modeled_step=step_share)
        print(f"\n{what}: {median_ms:.2f} ms per layer = {100 * share:.2f}% of the modeled MoE layer "
              f"({info['modeled_moe_layer_ms']:.1f} ms: AlltoAlls {info['t_dstar_ms']:.2f} ms at d*={info['d_star']} "
              f"+ expert GEMMs {info['expert_gemm_ms']:.1f} ms); x {info['moe_layers']} MoE layers = "
              f"{100 * step_share:.2f}% of the modeled step ({info['modeled_step_ms']:.0f} ms)")


def test_bench_local_tables(benchmark, scale):
    """One rank's four-case tables of all levels (before the all-reduce)."""
    benchmark(local_swap_stats, scale["maps"][0], scale["topo"], scale["placement"], 0)
    _report(benchmark, scale, "local tables")


@pytest.mark.parametrize("max_fn", MAX_FNS)
@pytest.mark.parametrize("split", ["rank", "whole"])
def test_bench_decision(benchmark, scale, max_fn, split):
    """Theorem 1 from the global tables: one rank's share of the pairs ('rank': its 8 x 256 rows,
    as `HierDExpertSwap` runs it) or all 32,640 pairs in one process ('whole': the sim tier)."""
    comm = RankView(scale["topo"]) if split == "rank" else None
    dec = benchmark(decide_swap, scale["stats"], scale["placement"], scale["profile"], scale["row_bytes"],
                    max_fn=max_fn, comm=comm)
    assert dec.pair is not None or split == "rank"
    _report(benchmark, scale, f"decision ({max_fn}, {split})")


def test_bench_planning_per_rank(benchmark, scale):
    """Everything one rank computes for one layer and step: its tables, then (the all-reduce
    aside; the clone stands for its fresh output) the global tables read and its share of the
    decision (default smooth-max, d*)."""
    reduced = scale["flat_sum"]
    comm = RankView(scale["topo"])

    def plan():
        local_swap_stats(scale["maps"][0], scale["topo"], scale["placement"], 0)
        stats = _unflatten(reduced.clone(), scale["topo"], scale["placement"].num_experts, "factored")
        return decide_swap(stats, scale["placement"], scale["profile"], scale["row_bytes"], comm=comm)
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
