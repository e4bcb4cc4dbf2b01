"""The swap-gap sweep (swaps accumulated on a routing that stays): each row's placement is the one
the planner reached, re-evaluated with the sim's model; the objective never rises along the path;
the report's table and the skew needed for a target gain follow from the rows."""
import pandas as pd
import pytest

from impl.common.config import ConfigError, build_config
from impl.common.dispatcher import ExpertPlacement
from impl.experiments.hiermoe import sim as simulate
from impl.experiments.hiermoe import swap_gap
from impl.experiments.hiermoe.workload import RoutingStream
from impl.hiermoe.dimension import holder_rows, route_steps
from impl.hiermoe.expert_swap import decide_swap

SMALL = ["sim.model=qwen3-30b-a3b-32l-tiny", "sim.topology=hiermoe-node", "sim.profile=hiermoe-node",
         "sim.tokens_per_rank=256"]


def config(*extra):
    return build_config(swap_gap.SwapGapConfig, None, SMALL + list(extra))


def test_path_rows_are_the_planners_placements_evaluated_by_the_sim_model():
    frame = swap_gap.run_sweep(config("skews=[1.0]", "max_swaps=4", "checkpoints=[1, 3]"))
    assert list(frame["swaps"]) == [0, 1, 3, 4] and not frame["converged"].any()
    assert (frame["q_ms"].diff().dropna() <= 1e-12).all()          # a swap is made only when Q falls
    # replay: the same plans from the identity placement, the last row's time re-evaluated directly
    rz = simulate.resolve(build_config(simulate.SimExperimentConfig, None,
                                       [s.removeprefix("sim.") for s in SMALL] + ["layers=1", "stream.skew=1.0"]))
    stream = RoutingStream(rz.model, 1, rz.topology.G, rz.config.tokens_per_rank, rz.config.stream, 0,
                           num_experts=rz.num_experts, top_k=rz.top_k)
    first, second = (simulate.LayerRouting(stream.next_iteration()[0], rz) for _ in range(2))
    hd = simulate.parse_system("HD-MoE", {})
    placement = ExpertPlacement.identity(rz.num_experts)
    last = frame[frame["swaps"] == 3].iloc[0]
    for _ in range(3):
        d = simulate.a2a_time(hd, first.of(placement)[0], None, rz)[1]
        placement = placement.swap(*decide_swap(first.swap_stats(placement), placement, rz.profile, rz.row_bytes,
                                                dim=d).pair)
    assert last["a2a_ms_same"] == pytest.approx(simulate.a2a_time(hd, first.of(placement)[0], None, rz)[0])
    assert last["a2a_ms_next"] == pytest.approx(simulate.a2a_time(hd, second.of(placement)[0], None, rz)[0])
    d = simulate.a2a_time(hd, first.of(placement)[0], None, rz)[1]        # the route planned with
    rows = holder_rows(second.of(placement)[0].copies, *route_steps(rz.topology, d)[0]).double()
    assert (last["first_step_rows_mean"], last["first_step_rows_max"]) == pytest.approx(
        (float(rows.mean()), float(rows.max())))


@pytest.mark.slow
def test_a_path_ends_where_the_planner_keeps_the_placement():
    frame = swap_gap.run_sweep(config("skews=[1.0]", "max_swaps=500", "checkpoints=[1]"))
    assert bool(frame.iloc[-1]["converged"]) and frame.iloc[-1]["swaps"] < 500
    assert (frame["q_ms"].diff().dropna() <= 1e-12).all()


@pytest.mark.parametrize("override,message", [("skews=[-1]", "skews"), ("max_swaps=0", "max_swaps"),
                                              ("sim.model=gpt5", "model: unknown model")])
def test_bad_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg = config(override)
        simulate.resolve(cfg.sim)


def _rows(skew, maxvio, times):
    return [{"skew": skew, "swaps": k, "checkpoint": k == 1, "converged": k == max(times), "maxvio": maxvio, "max_split_ratio": 1.0,
             "q_ms": t, "a2a_ms_same": t, "a2a_ms_next": t, "a2a_ms_same_tokens": t, "a2a_ms_next_tokens": t,
             "first_step_rows_mean": t, "first_step_rows_max": 1.5 * t}
            for k, t in times.items()]


def test_report_table_and_the_skew_needed_for_a_gain():
    from figures import hiermoe_sim as rep

    gap = pd.DataFrame(_rows(0.0, 0.1, {0: 100.0, 1: 99.0, 50: 95.0}) + _rows(1.0, 2.1, {0: 100.0, 1: 98.0, 70: 85.0}))
    table = rep.swap_gap_table(gap)
    assert [c for c in table.columns if c.startswith("after")] == ["after 1 swaps"]
    assert list(table["final, next routing"]) == pytest.approx([100 / 95, 100 / 85])
    assert list(table["after 1 swaps"]) == pytest.approx([100 / 99, 100 / 98])
    assert list(table["swaps made"]) == ["50", "70"]
    assert list(table[rep.FIRST_MEAN]) == pytest.approx([0.95, 0.85])
    assert list(table[rep.FIRST_SPREAD]) == ["1.500 -> 1.500"] * 2
    target = (100 / 95 + 100 / 85) / 2                          # half way between the two points
    assert rep.skew_needed(table, target) == pytest.approx({"skew": 0.5, "MaxVio": 1.1})
    assert rep.skew_needed(table, 1.01) == pytest.approx({"skew": 0.0, "MaxVio": 0.1})
    assert rep.skew_needed(table, 1.5) is None
