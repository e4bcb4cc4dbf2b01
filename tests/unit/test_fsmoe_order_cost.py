"""GShard einsum ordering's cost (`impl.fsmoe.costs.gshard_order`) against DeepSpeed-MoE's own
gate and einsum at tiny sizes: the [S, E, C] tensors its top-2 gate builds have our capacity, and
torch's flop counter on DeepSpeed's `einsum` helper (dispatch and combine, forward and backward)
counts exactly the multiply-accumulates we price; the DS-MoE ablation rows the FSMoE results
run beside every model row, each the headline DS-MoE plus exactly the costs it changes; and the
figure ablations (GPipe assumptions on Fig. 8, lane contention on every figure) with the report
sections that read them."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from figures.fsmoe import FIGURES
from impl.common.config import ConfigError
from impl.common.costmodel import load_profile
from impl.experiments.fsmoe.results import DS_MOE_ABLATIONS, ResultsConfig, run_grid, run_models
from impl.experiments.systems import paper_systems
from impl.fsmoe.costs import EINSUM_ORDER_GEMMS, ORDER_TOKENS, BlockShape, block_costs, gshard_order


@pytest.fixture
def sharded_moe():
    return pytest.importorskip("deepspeed.moe.sharded_moe")


def _tiny_block():
    # Testbed B: 8 nodes x 4 GPUs, one expert per node; 32 tokens per MP group
    shape = BlockShape(batch=1, seq=32, hidden=8, ffn_hidden=16, heads=2, num_experts=8, top_k=2,
                       capacity_factor=1.2)
    return block_costs(shape, load_profile("fsmoe-testbed-b"))


def _deepspeed_order_flops(sharded_moe, S: int, E: int, M: int, capacity_factor: float
                           ) -> tuple[tuple[int, int, int], int]:
    """DeepSpeed's top-2 gate on S random tokens, then its dispatch and combine einsums forward and
    backward under torch's flop counter: ([S, E, C] shape, flops)."""
    torch.manual_seed(0)
    _, combine_weights, dispatch_mask, _ = sharded_moe.top2gating(torch.randn(S, E), capacity_factor, 1,
                                                                   top2_2nd_expert_sampling=False)
    x = torch.randn(S, M, requires_grad=True)
    weights = combine_weights.detach().requires_grad_(True)          # gates carry a gradient, the mask none
    expert_out = torch.randn(*combine_weights.shape[1:], M, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        dispatched = sharded_moe.einsum("sec,sm->ecm", dispatch_mask.type_as(x), x)
        combined = sharded_moe.einsum("sec,ecm->sm", weights, expert_out)
        (dispatched.sum() + combined.sum()).backward()
    return tuple(combine_weights.shape), counter.get_total_flops()


@pytest.mark.parametrize("use_einsum", [True, False], ids=["torch.einsum", "matmul"])
@pytest.mark.parametrize("tokens", ORDER_TOKENS)
def test_order_cost_counts_deepspeeds_einsum_multiply_accumulates(monkeypatch, sharded_moe, tokens, use_einsum):
    monkeypatch.setattr(sharded_moe, "USE_EINSUM", use_einsum)
    bc = _tiny_block()
    order = gshard_order(bc, tokens)
    sec, flops = _deepspeed_order_flops(sharded_moe, order.tokens, bc.shape.num_experts, bc.shape.hidden,
                                        bc.shape.capacity_factor)
    S, E, C = sec
    assert S == order.tokens == (32 // 4 if tokens == "sequence-parallel" else 32)
    assert E * C == order.slots                              # DeepSpeed's capacity is ours
    assert order.macs_per_gemm == S * E * C * bc.shape.hidden
    assert flops == 2 * order.macs_per_gemm * sum(EINSUM_ORDER_GEMMS.values())
    gemm = bc.gemm.time_ms(order.macs_per_gemm)
    assert order.fwd_ms == pytest.approx(2 * gemm) and order.bwd_ms == pytest.approx(3 * gemm)


def test_order_cost_refuses_an_unknown_token_layout():
    with pytest.raises(ConfigError, match=r"tokens: 'all' is not allowed; allowed: 'sequence-parallel', 'replicated'"):
        gshard_order(_tiny_block(), "all")


@pytest.fixture(scope="module")
def models():
    """Every figure at every setting the paper prints (so every paper number is computed), Fig. 6
    on its cheapest model alone."""
    return run_models(ResultsConfig(fig6=(("A", "mixtral-7b"), ("B", "mixtral-7b"))), progress=False)


@pytest.fixture(scope="module")
def grid():
    """Three configured layers per testbed."""
    return run_grid(ResultsConfig(grid_sample=3), progress=False)


def test_every_model_row_has_every_ds_moe_ablation(models):
    """Every figure's row, the PP ablations' Fig. 8 rows (`fig8:<name>`, every plan under one GPipe
    assumption) apart."""
    keys = ["figure", "testbed", "model", "L", "P", "gate"]
    headline = models[~models.figure.str.contains(":")]
    wide = headline.pivot(index=keys, columns="system", values="iteration_ms")
    assert {"fig6", "fig7-L", "fig7-P", "fig8", "table6"} <= set(wide.index.get_level_values("figure"))
    for ablation in DS_MOE_ABLATIONS.values():
        assert wide[ablation.system].notna().all(), ablation.system
        assert (wide[ablation.system] > wide["DS-MoE"]).all(), ablation.system   # each adds cost to a sequential plan
    assert (models[models.system.isin([a.system for a in DS_MOE_ABLATIONS.values()])].r_fwd == 1).all()


def test_the_harness_ablation_adds_exactly_the_replicated_tokens_ordering(models):
    """On one lane the makespan is the sum of its tasks: the harness's DS-MoE is the MP-AllReduce
    one plus each block's forward and backward ordering of the block's tokens; the einsum-order one
    the headline plus the sequence-parallel tokens' ordering."""
    from impl.experiments.fsmoe.results import MODELS, _model_shape

    rows = models[models.figure == "fig6"].set_index(["testbed", "model", "system"])["iteration_ms"]
    for testbed, model in {(t, m) for t, m, _ in rows.index}:
        profile = load_profile(f"fsmoe-testbed-{testbed.lower()}")
        spec = MODELS[model]
        bc = block_costs(_model_shape(spec, profile, 1024 if testbed == "A" else 256), profile)
        for system, base, tokens in (("ds-moe-harness", "ds-moe-mp-allreduce", "replicated"),
                                     ("ds-moe-einsum-order", None, "sequence-parallel")):
            order = gshard_order(bc, tokens)
            base_ms = rows[(testbed, model, DS_MOE_ABLATIONS[base].system if base else "DS-MoE")]
            assert rows[(testbed, model, DS_MOE_ABLATIONS[system].system)] == pytest.approx(
                base_ms + spec.layers * (order.fwd_ms + order.bwd_ms), rel=1e-9)


def test_the_report_section_names_every_ablation_and_table6s_times(models):
    from figures.fsmoe import ds_moe_section

    text = "\n".join(ds_moe_section(models))
    for name in DS_MOE_ABLATIONS:
        assert f"| {name} |" in text or f" {name} |" in text, name
    assert "Table 6 in absolute time" in text and "909.9-1064.0 ms" in text and "685.5-746.9 ms" in text
    assert "2 local experts" in text


def _plan_lanes(system: str) -> set[str]:
    """The lanes a paper system's plan runs its tasks on (one Testbed-A Mixtral block)."""
    from impl.experiments.fsmoe.results import MODELS, _model_shape
    from impl.experiments.fsmoe.systems import FSMOE_SYSTEMS
    profile = load_profile("fsmoe-testbed-a")
    block = block_costs(_model_shape(MODELS["mixtral-7b"], profile, 1024), profile)
    return set(FSMOE_SYSTEMS.get(system).factory()([block]).lanes.values())


def test_every_pp_ablation_runs_every_plan_on_fig8_and_moves_only_what_it_changes(models):
    """Each `PP_ABLATIONS` entry has Fig. 8's rows for every paper system; charged transfers only
    add time; with no gradients the plans whose degrees and placement ignore them (DS-MoE, Tutel)
    only lose time (lanes run in a fixed order: a task gone cannot delay another)."""
    from impl.experiments.fsmoe.results import PP_ABLATIONS
    from impl.experiments.systems import paper_systems

    systems = {s.name for s in paper_systems("fsmoe")}
    head = models[models.figure == "fig8"].set_index(["model", "system"])["iteration_ms"]
    for name in PP_ABLATIONS:
        rows = models[models.figure == f"fig8:{name}"]
        assert set(rows.system) == systems, name
        alt = rows.set_index(["model", "system"])["iteration_ms"]
        if name == "pp-send-recv":
            assert (alt >= head.loc[alt.index] - 1e-9).all()
        if name == "pp-no-gradients":
            for system in ("DS-MoE", "Tutel"):
                assert (alt.xs(system, level="system") < head.xs(system, level="system")).all()


PAPER_SYSTEMS = [s.name for s in paper_systems("fsmoe")]
FIGURE_KEYS = {"grid": ["testbed", "layer"]}            # every other figure: a models row's labels
MODEL_KEYS = ["testbed", "model", "L", "P", "gate"]


@pytest.mark.parametrize("figure", list(FIGURES))
def test_contention_slows_only_plans_with_a_separate_intra_node_lane(grid, models, figure):
    """Every `CONTENTION_ABLATIONS` entry on every figure: rows for exactly the plans with FSMoE's
    separate intra-node lane, each at least its headline time (FSMoE's always longer), longer
    with more contention; the figure as the report reads it (`figure_ablation`) has every row of
    the headline, every other plan at its headline time to the bit, and FSMoE's speedup over each
    plan without that lane never grows with c."""
    from figures.fsmoe import figure_ablation
    from impl.experiments.fsmoe.results import CONTENTION, CONTENTION_ABLATIONS

    runs = grid if figure == "grid" else models
    keys = [*FIGURE_KEYS.get(figure, MODEL_KEYS), "system"]
    contending = {s for s in PAPER_SYSTEMS if {"intra", "inter"} <= _plan_lanes(s)}
    assert "FSMoE" in contending and "Tutel" not in contending
    others = [s for s in PAPER_SYSTEMS if s not in contending]
    head = runs[(runs.figure == figure) & runs.system.isin(PAPER_SYSTEMS)].set_index(keys)["iteration_ms"]
    assert len(head) and set(head.index.get_level_values("system")) == set(PAPER_SYSTEMS)
    assert list(CONTENTION_ABLATIONS) == [f"contention-{c:g}" for c in CONTENTION]
    times = [head]
    for name in CONTENTION_ABLATIONS:
        assert set(runs[runs.figure == f"{figure}:{name}"].system) == contending, name
        alt = figure_ablation(runs, name)
        alt = alt[(alt.figure == figure) & alt.system.isin(PAPER_SYSTEMS)].set_index(keys)["iteration_ms"]
        assert sorted(alt.index) == sorted(head.index), name
        alt = alt.loc[head.index]
        for system in PAPER_SYSTEMS:
            got, want = alt.xs(system, level="system"), head.xs(system, level="system")
            if system in contending:
                assert (got >= want).all() and (system != "FSMoE" or (got > want).all()), (name, system)
            else:
                assert (got == want).all(), (name, system)
        times.append(alt)
    speedups = [t.unstack("system")[others].div(t.unstack("system")["FSMoE"], axis=0) for t in times]
    for lower, higher in zip(speedups, speedups[1:]):
        assert (higher <= lower + 1e-12).all().all()       # more contention, never a larger gain
    for lower, higher in zip(times, times[1:]):
        assert (higher.xs("FSMoE", level="system") >= lower.xs("FSMoE", level="system") - 1e-9).all()


@pytest.mark.parametrize("system", PAPER_SYSTEMS)
def test_a_plan_without_both_contending_lanes_keeps_its_timeline_under_contention(system):
    """Why the results write contention rows only for the plans `_contends` names: every other
    registered plan's schedule has the same timeline under any contention, to the bit; FSMoE's
    takes longer."""
    from impl.common.timeline import simulate
    from impl.experiments.fsmoe.results import _CONTENDING, MODELS, _contends, _model_shape
    from impl.experiments.fsmoe.systems import FSMOE_SYSTEMS

    profile = load_profile("fsmoe-testbed-b")
    blocks = [block_costs(_model_shape(MODELS["mixtral-7b"], profile, 256), profile)] * 2
    plan = FSMOE_SYSTEMS.get(system).factory()(blocks)
    schedule = plan.schedule(blocks)
    own, contended = simulate(schedule), simulate(schedule, {_CONTENDING: 1.0})
    assert _contends(plan) == ({"intra", "inter"} <= _plan_lanes(system))
    if _contends(plan):
        assert contended.makespan >= own.makespan and (system != "FSMoE" or contended.makespan > own.makespan)
    else:
        assert contended.end == own.end and contended.makespan == own.makespan


def test_the_fig8_section_reads_every_number_from_the_runs(models):
    from figures.fsmoe import FIG8_VARIANTS, _crossing, figure_ablation, fig8_section, fig8_speedups, model_speedups
    from impl.common.paper import read_paper_csv
    from impl.experiments.fsmoe.results import CONTENTION, CONTENTION_ABLATIONS, PP_ABLATIONS

    runs = {name: (None, figure_ablation(models, name)) for name in [*PP_ABLATIONS, *CONTENTION_ABLATIONS]}
    lines, cause = fig8_section(models, runs)
    text = "\n".join(lines)
    ours = fig8_speedups(models)
    no_grad = fig8_speedups(runs["pp-no-gradients"][1])
    most = fig8_speedups(runs[f"contention-{CONTENTION[-1]:g}"][1])
    for b in FIG8_VARIANTS:
        row = next(line for line in lines if line.startswith(f"| {b} |"))
        assert f"| {ours[b]:.2f} |" in row and f"| {no_grad[b]:.2f} |" in row
        assert row.rstrip(" |").endswith(f"{most[b]:.2f}")
    assert f"{no_grad['FSMoE-No-IIO']:.2f}x" in cause and "intra-node lane" in cause
    assert "| pp-one-micro-batch | pp-send-recv | pp-no-gradients | contention-0.25 |" in text
    # the contention the paper's numbers imply, interpolated on the runs' own curves, with PP and without
    paper8, _ = read_paper_csv("fsmoe_fig8")
    paper = dict(zip(paper8.baseline, paper8.value))
    levels = [0.0, *CONTENTION]
    curve = [ours["FSMoE-No-IIO"]] + [fig8_speedups(runs[f"contention-{c:g}"][1])["FSMoE-No-IIO"] for c in CONTENTION]
    implied = _crossing(levels, curve, paper["FSMoE-No-IIO"])
    assert ", ".join(f"{v:.2f}x at c = {c:g}" for c, v in zip(levels, curve)) + " with PP" in text
    if implied is not None:
        assert f"implies c = {implied:.2f}" in cause and f"{implied:.2f} over FSMoE-No-IIO" in text

    def no_pp(frame):
        a6 = model_speedups(frame[frame.testbed == "A"], "fig6", [])
        return float(a6[(a6.system == "FSMoE") & (a6.baseline == "FSMoE-No-IIO")]["mean"].iloc[0])

    assert ", ".join(f"{v:.2f}x" for v in [no_pp(models)] + [no_pp(runs[f"contention-{c:g}"][1]) for c in CONTENTION]) \
        + " without (Fig. 6, Testbed A" in text
    assert fig8_section(models[models.figure != "fig8:pp-send-recv"], runs) == ([], "")


def test_crossing_interpolates_the_first_segment_that_reaches_the_target():
    from figures.fsmoe import _crossing
    assert _crossing([0, 1, 2], [1.3, 1.1, 0.9], 1.2) == pytest.approx(0.5)
    assert _crossing([0, 1, 2], [1.3, 1.1, 0.9], 1.1) == pytest.approx(1.0)
    assert _crossing([0, 0.5], [1.3, 1.2], 1.05) is None and _crossing([0, 1], [1.0, 1.0], 1.0) == 0
    assert _crossing([0, 1, 2], [1.0, 2.0, 1.0], 1.5) == pytest.approx(0.5)


def test_the_contention_section_reads_every_figure_from_the_runs(grid, models):
    """FSMoE over each plan per figure and setting at every c (Table 5's recomputed here from the
    grid's own rows), every paper number contention moves with the c at which ours meets it
    (`_crossing`), and a conclusion over every figure that follows from those curves."""
    from figures.fsmoe import (IMPLIED_C_SPREAD, _crossing, contention_curves, contention_runs, contention_section,
                               fsmoe_speedups, reproduces)
    from impl.experiments.fsmoe.results import CONTENTION

    lines = contention_section(grid, models)
    levels = contention_runs(grid, models)
    assert list(levels) == [0.0, *CONTENTION]
    speed = {c: fsmoe_speedups(*frames).set_index(["figure", "setting", "baseline"])["speedup"]
             for c, frames in levels.items()}
    assert set(speed[0.0].index.get_level_values("figure")) == set(FIGURES)
    for (figure, setting, baseline) in speed[0.0].index:
        row = next(line for line in lines if line.startswith(f"| {FIGURES[figure]} | {setting} |"))
        assert " / ".join(f"{speed[c][(figure, setting, baseline)]:.2f}" for c in levels) in row
    # Table 5 under contention: FSMoE's rows of 'grid:<name>' against every baseline's own rows
    for c in CONTENTION:
        fsmoe = grid[grid.figure == f"grid:contention-{c:g}"].query("system == 'FSMoE'").set_index(["testbed", "layer"])
        tutel = grid[(grid.figure == "grid") & (grid.system == "Tutel")].set_index(["testbed", "layer"])
        ratio = (tutel.iteration_ms / fsmoe.iteration_ms).groupby(level="testbed").mean()
        for testbed, value in ratio.items():
            assert speed[c][("grid", f"Testbed {testbed}", "Tutel")] == pytest.approx(value, rel=1e-12)

    curves = contention_curves(levels)
    moving = [(check, curve, c) for check, curve, c in curves if max(curve) - min(curve) > 1e-9]
    assert {check.figure for check, _, _ in moving} == set(FIGURES)        # every figure has a paper number c moves
    for check, curve, c in moving:
        assert c == _crossing(list(levels), curve, check.paper)
        row = next(line for line in lines if line.startswith(f"| {check.what} |"))
        assert row.endswith(f"| c = {c:.2f} |" if c is not None else ") |") and (c is not None or "| none (" in row)
    conclusion = lines[-1]
    assert conclusion.startswith(f"Over every figure the paper prints {len(curves)} speedups; lane contention moves "
                                 f"{len(moving)} of them")
    met = [c for _, _, c in moving if c is not None]
    still_gaps = [check for check, curve, _ in curves if max(curve) - min(curve) <= 1e-9
                  and not reproduces(check.paper, check.ours)]
    single = len(met) == len(moving) and max(met) - min(met) <= IMPLIED_C_SPREAD and not still_gaps
    assert ("So no single c is consistent with every gap" in conclusion) == (not single)
    if met:
        assert f"from c = {min(met):.2f} (" in conclusion and f"to c = {max(met):.2f} (" in conclusion
