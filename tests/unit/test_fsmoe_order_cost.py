"""GShard einsum ordering's cost (`impl.fsmoe.costs.gshard_order`) against DeepSpeed-MoE's own
gate and einsum at tiny sizes: the [S, E, C] tensors its top-2 gate builds have our capacity, and
torch's flop counter on DeepSpeed's `einsum` helper (dispatch and combine, forward and backward)
counts exactly the multiply-accumulates we price; and the DS-MoE ablation rows the FSMoE results
run beside every model row, each the headline DS-MoE plus exactly the costs it changes."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from impl.common.config import ConfigError
from impl.common.costmodel import load_profile
from impl.experiments.fsmoe.results import DS_MOE_ABLATIONS, ResultsConfig, run_models
from impl.fsmoe.costs import EINSUM_ORDER_GEMMS, ORDER_TOKENS, BlockShape, block_costs, gshard_order

sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")


def _tiny_block():
    # Testbed B: 8 nodes x 4 GPUs, one expert per node; 32 tokens per MP group
    shape = BlockShape(batch=1, seq=32, hidden=8, ffn_hidden=16, heads=2, num_experts=8, top_k=2,
                       capacity_factor=1.2)
    return block_costs(shape, load_profile("fsmoe-testbed-b"))


def _deepspeed_order_flops(S: int, E: int, M: int, capacity_factor: float) -> tuple[tuple[int, int, int], int]:
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
def test_order_cost_counts_deepspeeds_einsum_multiply_accumulates(monkeypatch, tokens, use_einsum):
    monkeypatch.setattr(sharded_moe, "USE_EINSUM", use_einsum)
    bc = _tiny_block()
    order = gshard_order(bc, tokens)
    sec, flops = _deepspeed_order_flops(order.tokens, bc.shape.num_experts, bc.shape.hidden, bc.shape.capacity_factor)
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
    cfg = ResultsConfig(fig6=(("A", "mixtral-7b"), ("B", "mixtral-7b")), fig7_seq=(512,),
                        fig7_profiles={48: "fsmoe-testbed-a"}, gates=("gshard",))
    return run_models(cfg, progress=False)


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


@pytest.mark.parametrize("figure", ["fig6", "fig8"])
def test_contention_slows_only_plans_with_a_separate_intra_node_lane(models, figure):
    """Every `CONTENTION_ABLATIONS` entry times every paper system's plan on Figs. 6 and 8: plans
    with FSMoE's three lanes lose time (FSMoE's own always, more with more contention), every
    other plan keeps its time to the bit (nothing of it overlaps on contending lanes)."""
    from impl.experiments.fsmoe.results import CONTENTION, CONTENTION_ABLATIONS
    from impl.experiments.systems import paper_systems

    systems = {s.name for s in paper_systems("fsmoe")}
    keys = ["testbed", "model", "system"]
    head = models[(models.figure == figure) & models.system.isin(systems)].set_index(keys)["iteration_ms"]
    for name in CONTENTION_ABLATIONS:
        alt = models[models.figure == f"{figure}:{name}"].set_index(keys)["iteration_ms"]
        assert set(alt.index.get_level_values("system")) == systems and len(alt) == len(head), name
        for system in systems:
            got = alt.xs(system, level="system")
            want = head.xs(system, level="system").loc[got.index]
            if {"intra", "inter"} <= _plan_lanes(system):
                assert (got >= want).all() and (system != "FSMoE" or (got > want).all()), (name, system)
            else:
                assert (got == want).all(), (name, system)
    fsmoe = [models[models.figure == f"{figure}:contention-{c:g}"].set_index(keys)["iteration_ms"]
             .xs("FSMoE", level="system") for c in CONTENTION]
    for lower, higher in zip(fsmoe, fsmoe[1:]):
        assert (higher >= lower - 1e-9).all()      # more contention, never faster


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
