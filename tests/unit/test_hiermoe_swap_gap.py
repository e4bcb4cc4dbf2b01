"""The swap-gap sweep (swaps accumulated on a routing that stays), on both models' settings: each
row's placement is the one the planner reached, re-evaluated with the sim's model; the objective
never rises along the path; each shipped sweep is its model's run setting; the report's table, the
skew needed for a target gain and its section on both models follow from the rows."""
from pathlib import Path

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
# DeepSeek-V3's structure: 32 experts in 8 groups, a token's in at most 4 (node-limited), bias balancing
DEEPSEEK_SMALL = ["sim.model=deepseek-v3-tiny"] + SMALL[1:]
EXPERIMENTS = Path(__file__).resolve().parents[2] / "workflows/config/experiments"


def config(*extra, small=SMALL):
    return build_config(swap_gap.SwapGapConfig, None, small + list(extra))


@pytest.mark.parametrize("small,skew,rows", [(SMALL, 1.0, {0: False, 1: False, 3: False, 4: False}),
                                              (DEEPSEEK_SMALL, 3.0, {0: False, 1: False, 3: True})],
                         ids=["qwen3", "deepseek"])
def test_path_rows_are_the_planners_placements_evaluated_by_the_sim_model(small, skew, rows):
    frame = swap_gap.run_sweep(config(f"skews=[{skew}]", "max_swaps=4", "checkpoints=[1, 3]", small=small))
    assert dict(zip(frame["swaps"], frame["converged"])) == rows    # the last row: the cap, or where the planner stopped
    assert (frame["q_ms"].diff().dropna() <= 1e-12).all()          # a swap is made only when Q falls
    # replay: the same plans from the identity placement, the last row's time re-evaluated directly
    rz = simulate.resolve(build_config(simulate.SimExperimentConfig, None,
                                       [s.removeprefix("sim.") for s in small] + ["layers=1", f"stream.skew={skew}"]))
    assert (frame["n_group"] == rz.model.n_group).all() and (frame["topk_group"] == rz.model.topk_group).all()
    stream = RoutingStream(rz.model, 1, rz.topology.G, rz.config.tokens_per_rank, rz.config.stream, 0,
                           num_experts=rz.num_experts, top_k=rz.top_k)
    first, second = (simulate.LayerRouting(stream.next_iteration()[0], rz) for _ in range(2))
    hd = simulate.parse_system("HD-MoE", {})
    placement = ExpertPlacement.identity(rz.num_experts)
    last = frame[frame["swaps"] == 3].iloc[0]
    cross = 0
    for _ in range(3):
        d = simulate.a2a_time(hd, first.of(placement)[0], None, rz)[1]
        a, b = decide_swap(first.swap_stats(placement), placement, rz.profile, rz.row_bytes, dim=d).pair
        per_node = rz.num_experts // rz.topology.num_nodes       # slots are node-major
        cross += placement.slot_of_expert[a] // per_node != placement.slot_of_expert[b] // per_node
        placement = placement.swap(a, b)
    assert last["a2a_ms_same"] == pytest.approx(simulate.a2a_time(hd, first.of(placement)[0], None, rz)[0])
    assert last["a2a_ms_next"] == pytest.approx(simulate.a2a_time(hd, second.of(placement)[0], None, rz)[0])
    assert last["cross_node_swaps"] == cross            # swaps whose two experts were on different nodes
    # the single swaps the last placement allows: the best across nodes or inside one is the planner's
    # choice (itself checked against an exhaustive search), and none lowers Q where the planner stopped
    d = simulate.a2a_time(hd, first.of(placement)[0], None, rz)[1]
    decision = decide_swap(first.swap_stats(placement), placement, rz.profile, rz.row_bytes, dim=d)
    best = {kind: last[f"{kind}_best_dq"] for kind in ("cross_node", "in_node")}
    if decision.pair is None:
        assert last["cross_node_lowering_share"] == last["in_node_lowering_share"] == 0
        assert min(best.values()) > -1e-9
    else:
        assert min(best.values()) == pytest.approx(decision.q_best / decision.q_current - 1, abs=1e-12)
        a, b = decision.pair
        kind = "cross_node" if placement.slot_of_expert[a] // per_node != placement.slot_of_expert[b] // per_node \
            else "in_node"
        assert best[kind] == min(best.values()) < 0 and last[f"{kind}_lowering_share"] > 0
    assert frame[["cross_node_lowering_share", "in_node_lowering_share"]].stack().between(0, 1).all()
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


@pytest.mark.parametrize("sweep,run", [("hiermoe_swap_gap.yaml", "hiermoe_ablation.yaml"),
                                       ("hiermoe_swap_gap_deepseek.yaml", "hiermoe_deepseek.yaml")])
def test_each_shipped_sweep_is_its_models_run_setting(sweep, run):
    """The sweep explains the swaps of a run: same model, topology, profiles, token rows and routing
    settings (DeepSeek-V3's node-limited groups as the model has them in the `deepseek` run)."""
    gap = build_config(swap_gap.SwapGapConfig, EXPERIMENTS / sweep, [])
    ran = build_config(simulate.SimExperimentConfig, EXPERIMENTS / run, [])
    swap_gap.check(gap)
    for key in ("model", "topology", "profile", "compute_profile", "tokens_per_rank", "bytes_per_elem",
                "weight_bytes", "num_experts", "top_k", "n_group", "topk_group", "max_fn", "gamma", "seed"):
        assert getattr(gap.sim, key) == getattr(ran, key), key
    assert gap.sim.stream.drift == 0 and ran.stream.skew in gap.skews
    model = simulate.resolve(gap.sim).model
    assert (model.n_group, model.topk_group) == ((8, 4) if "deepseek" in sweep else (1, 1))


@pytest.mark.parametrize("override,message", [
    ("sim.n_group=3", "n_group"), ("skews=[]", "skews: the list is empty"),
    ("sim.model=deepseek-v3-halfsix", "model: unknown model 'deepseek-v3-halfsix'")])
def test_bad_deepseek_input_is_one_line_before_any_work(tmp_path, capsys, override, message):
    out = tmp_path / "gap.csv"
    code = swap_gap.main(["--config", str(EXPERIMENTS / "hiermoe_swap_gap_deepseek.yaml"), "--set", override,
                          "--out-csv", str(out), "--out-record", str(tmp_path / "gap.json"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def _rows(skew, maxvio, times):
    return [{"skew": skew, "swaps": k, "checkpoint": k == 1, "converged": k == max(times), "maxvio": maxvio, "max_split_ratio": 1.0,
             "q_ms": t, "a2a_ms_same": t, "a2a_ms_next": t, "a2a_ms_same_tokens": t, "a2a_ms_next_tokens": t,
             "first_step_rows_mean": t, "first_step_rows_max": 1.5 * t, "cross_node_swaps": k // 2,
             "cross_node_best_dq": 0.002, "in_node_best_dq": -0.001 if k < max(times) else 0.0,
             "cross_node_lowering_share": 0.0, "in_node_lowering_share": 0.2 if k < max(times) else 0.0}
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


def _sweep(model, n_group, topk_group, points):
    """A sweep's rows for `model`: {skew: (MaxVio, {swaps: ms})}, the last point of each converged."""
    rows = [r for skew, (maxvio, times) in points.items() for r in _rows(skew, maxvio, times)]
    return pd.DataFrame(rows).assign(model=model, topology="hiermoe-testbed", E=256 if n_group > 1 else 128, K=8, G=32,
                                     n_group=n_group, topk_group=topk_group, drift=0.0)


def test_the_report_section_covers_each_models_sweep_against_its_run_and_paper_number():
    from figures import hiermoe_sim as rep
    from tests.unit.test_hiermoe_report import run as sim_rows

    def with_swaps(frame, n_group, topk_group):       # HierMoE swaps one pair per iteration
        frame = frame.assign(n_group=n_group, topk_group=topk_group)
        frame.loc[frame["system"] == "HierMoE", "moved_experts"] = 2
        return frame

    ablation = with_swaps(sim_rows({"Megatron-LM": 100, "HD-MoE": 60, "HierMoE": 60 / 1.02}), 1, 1)
    deepseek = with_swaps(sim_rows({"Megatron-LM": 100, "HD-MoE": 40, "HierMoE": 40 / 1.01}, model=rep.DEEPSEEK), 8, 4)
    ds_points = {0.0: (0.2, {0: 100.0, 1: 99.9, 40: 99.5}), 2.0: (5.0, {0: 100.0, 1: 99.0, 90: 85.0})}
    # DeepSeek-V3's own routing keeps every swap inside nodes; without expert groups, some cross
    ungrouped = _sweep(rep.DEEPSEEK, 1, 1, ds_points).assign(cross_node_lowering_share=0.3, cross_node_best_dq=-0.004)
    gaps = {rep.QWEN3: [_sweep(rep.QWEN3, 1, 1, {0.0: (0.1, {0: 100.0, 1: 99.0, 50: 95.0}),
                                                  2.0: (4.0, {0: 100.0, 1: 98.0, 70: 80.0})})],
            rep.DEEPSEEK: [ungrouped, _sweep(rep.DEEPSEEK, 8, 4, ds_points).assign(cross_node_swaps=0)]}
    runs = rep.Runs(ablation, deepseek, ablation, {}, ablation, ablation, ablation,
                    pd.DataFrame(columns=["system", "skew", "median"]), 0.0, False, pd.DataFrame(), swap_gap=gaps)
    sentence, section = rep.swap_gap_lines(gaps, runs)
    paper = (rep.paper_value("hiermoe_fig11", system="HierMoE", baseline=rep.BASE, model=rep.DEEPSEEK)
             / rep.paper_value("hiermoe_fig11", system="HD-MoE", baseline=rep.BASE, model=rep.DEEPSEEK))
    need = rep.skew_needed(rep.swap_gap_table(gaps[rep.DEEPSEEK][1]), paper)   # the sweep with the run's routing
    assert sentence.index("Qwen3-30B-A3B, at the fitted skew 0: the swap converges at 50 swaps to 1.05") < sentence.index(
        "DeepSeek-V3 (6L, half), at the `deepseek` run's skew 0: the swap converges at 40 swaps to 1.01")
    assert (f"under our model the paper's {rep.fmt(paper)} needs skew {need['skew']:.2f} (MaxVio "
            f"{need['MaxVio']:.2f}), converged.") in sentence
    lo, hi = rep.paper_range("hiermoe_ablation")
    assert f"the paper's {rep.fmt(lo)} needs skew" in sentence and ", both converged." in sentence
    assert "### Qwen3-30B-A3B" in section and "routing without expert groups, as in the `ablation` run" in section
    assert ("### DeepSeek-V3 (6L, half)" in section and "routing node-limited (n_group 8, topk_group 4: a token's "
            "experts lie in at most 4 of 8 expert groups), as in the `deepseek` run" in section)
    assert ("the `deepseek` run makes 5 swaps in its first layer over its 5 measured iterations (HierMoE over HD-MoE "
            "there 1.01)") in section
    assert f"against the paper's {rep.fmt(paper)} (Fig. 11: 2.72 / 2.55)" in section
    assert f"against the paper's {rep.fmt(lo)}-{rep.fmt(hi)} (Sec. V-E)" in section
    assert ("at 0 swaps 0.0% of the swaps across nodes would lower Q (the best across nodes +0.200%, the best inside "
            "a node -0.100%), at most 0.0% at any checkpoint of the path; 0 of its 40 swaps cross nodes.") in section
    assert ("* Ablation, the same sweep with routing without expert groups: at skew 0, 20 of its 40 swaps cross nodes "
            "(routing as above: 0 of 40); at 0 swaps 30.0% of the swaps across nodes would lower Q (as above: 0.0%), "
            "the best across nodes -0.400%. So the node-limited routing is what keeps the swaps inside nodes: with it "
            "no swap across nodes lowers Q at any checkpoint of the path, and none is made; under the identity placement the swaps start from, "
            "each of its 8 expert groups (32 consecutive experts) lies whole on one node (64 experts per node), so a "
            "swap across nodes splits a group that tokens select together.") in section
    assert section.count("* Ablation,") == 1                     # Qwen3 has one routing


def test_the_report_reads_one_sweep_per_model_in_its_order(tmp_path):
    from figures import hiermoe_sim as rep

    paths = {}
    for name, model in (("d", rep.DEEPSEEK), ("q", rep.QWEN3), ("q2", rep.QWEN3), ("x", "mixtral-8x7b")):
        paths[name] = tmp_path / f"{name}.csv"
        _sweep(model, 1, 1, {0.0: (0.1, {0: 100.0, 1: 99.0})}).to_csv(paths[name], index=False)
    _sweep(rep.DEEPSEEK, 8, 4, {0.0: (0.1, {0: 100.0, 1: 99.0})}).to_csv(tmp_path / "d8.csv", index=False)
    gaps = rep.read_swap_gaps([str(paths["d"]), str(paths["q"]), str(tmp_path / "d8.csv")])
    assert list(gaps) == [rep.QWEN3, rep.DEEPSEEK]
    assert [rep._grouping(g) for g in gaps[rep.DEEPSEEK]] == [(1, 1), (8, 4)]     # a second routing: an ablation
    with pytest.raises(ValueError, match="a second swap-gap sweep of qwen3-30b-a3b-32l with n_group 1, topk_group 1"):
        rep.read_swap_gaps([str(paths["q"]), str(paths["q2"])])
    both = pd.concat([pd.read_csv(paths["d"]), pd.read_csv(tmp_path / "d8.csv")])
    both.to_csv(tmp_path / "both.csv", index=False)
    with pytest.raises(ValueError, match="both.csv: a swap-gap sweep of several routings"):
        rep.read_swap_gaps([str(tmp_path / "both.csv")])
    with pytest.raises(ValueError, match="a swap-gap sweep of model mixtral-8x7b; the report reads one sweep of each"):
        rep.read_swap_gaps([str(paths["x"])])
