"""The FSMoE sweep against a closed-form recomputation written here (nothing from impl.fsmoe): for
a handful of configured layers, DeepSpeed-MoE's sequential iteration is the sum of every task,
each task computed from the profile's published constants and the digest's sizes; and every
FSMoE figure draws the paper's numbers beside ours, its modeled numbers labelled modeled."""
import math

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from impl.common.costmodel import PROFILES_DIR  # noqa: E402
from impl.experiments.fsmoe.results import ResultsConfig, run_grid  # noqa: E402


def _published(testbed: str) -> dict:
    with open(PROFILES_DIR / f"fsmoe-testbed-{testbed.lower()}.yaml") as f:
        return yaml.safe_load(f)


def _comm_ms(prof: dict, kind: str, step: str, elements: float) -> float:
    m = prof["comm"][kind][step]
    return m["alpha"] + m["beta"] / m["beta_unit_size"] * 4 * elements   # published beta per its unit, fp32


def _sequential_iteration_ms(testbed: str, row: pd.Series, blocks: int) -> float:
    """DS-MoE, one lane, r = 1: every task of every block, forward and backward, plus each block's
    dense gradient AllReduce; sizes of digest §1.5, GEMMs at 4x the published per-"byte" beta."""
    prof = _published(testbed)
    n_esp, nodes = (8, 6) if testbed == "A" else (4, 8)
    B, L, M, H, heads = int(row.B), int(row.L), int(row.M), int(row.H), int(row.heads)
    E, k = nodes, 1
    f = 1.0 if row.f == "*" else float(row.f)
    g = 3 if row.ffn == "mixtral" else 2
    C = max(1, math.ceil(k * f * (B * L // n_esp) / E - 1e-9))
    gemm = prof["compute"]["gemm"]
    mac = lambda w: gemm["alpha"] + gemm["beta"] * 4 * w  # noqa: E731
    a2a = _comm_ms(prof, "a2a", "inter-1", E * C * M)
    ag = _comm_ms(prof, "allgather", "intra-1", n_esp * E * C * M)
    rs = _comm_ms(prof, "reducescatter", "intra-1", n_esp * E * C * M)
    exp_fwd = g * gemm["alpha"] + gemm["beta"] * 4 * g * E * C * M * H
    d = M // heads
    proj = B * L * M * (M + 2 * heads * d + M) / n_esp
    core = 2 * B * L * L * d * heads / n_esp
    router = B * L / n_esp * 2 * M * E                # GShard: gate and noise projections
    dense_fwd = mac(proj / 2) * 2 + mac(core / 2) * 2 + mac(router)
    mp = _comm_ms(prof, "allgather", "intra-1", B * L * M) + _comm_ms(prof, "reducescatter", "intra-1", B * L * M)
    grad = 3 * M * M / n_esp + 3 * M / n_esp + M * M / n_esp + M if row.ffn == "gpt" else 2 * M * M / n_esp + M * M / n_esp
    ar = _comm_ms(prof, "allreduce", "inter-1", grad)
    per_block = (mp + dense_fwd + 2 * a2a + ag + exp_fwd + rs) + (mp + 2 * dense_fwd + 2 * a2a + ag + 2 * exp_fwd + rs) + ar
    return blocks * per_block


@pytest.mark.parametrize("testbed", ["A", "B"])
def test_sequential_iteration_equals_the_closed_form(testbed):
    cfg = ResultsConfig(testbeds={testbed: f"fsmoe-testbed-{testbed.lower()}"}, grid_sample=6, seed=3)
    grid = run_grid(cfg, progress=False)
    grid = grid[grid.figure == "grid"]                  # the headline rows (not those under lane contention)
    rows = grid[(grid.system == "DS-MoE") & (grid.ffn == "gpt")]
    assert len(rows) >= 1
    for _, row in rows.iterrows():
        assert row.iteration_ms == pytest.approx(_sequential_iteration_ms(testbed, row, cfg.grid_blocks), rel=1e-9)
    # every plan at least as fast as the sequential one on the same layer
    wide = grid.pivot_table(index="layer", columns="system", values="iteration_ms")
    assert (wide.min(axis=1) <= wide["DS-MoE"] + 1e-9).all()


def test_order_study_splits_each_plans_gap_at_a_searched_order():
    """Per sampled layer and plan: bound <= searched order <= the plan's own issue order, the
    one-lane plan (DS-MoE) left out; the same config gives the same rows."""
    from impl.experiments.fsmoe.results import run_order

    cfg = ResultsConfig(order_sample=2, order_tries=60)
    frame = run_order(cfg, progress=False)
    assert set(frame.testbed) == {"A", "B"} and set(frame.layer) == {0, 1}
    assert "DS-MoE" not in set(frame.system) and "FSMoE" in set(frame.system)
    assert (frame.lower_bound_ms <= frame.searched_order_ms * (1 + 1e-9)).all()
    assert (frame.searched_order_ms <= frame.iteration_ms).all()
    pd.testing.assert_frame_equal(frame, run_order(cfg, progress=False))


def test_the_testbeds_read_their_communication_betas_in_the_unit_their_links_allow():
    """Testbed A per float element, B per byte (the profiles' units); the 'comm-other-unit'
    reading flips each (A's links 4x slower, B's 4x faster). Read per byte, every B link stays
    under its line rate; per element its NICs would carry more than 3x theirs."""
    from impl.common.costmodel import load_profile
    from impl.experiments.fsmoe.results import comm_unit, read_profile, run_links

    for testbed, unit, factor in (("a", "float32 element", 4.0), ("b", "byte", 0.25)):
        prof = load_profile(f"fsmoe-testbed-{testbed}")
        other = read_profile(prof, "comm-other-unit")
        for key, m in prof.comm.items():
            assert comm_unit(m) == unit
            assert other.comm[key].beta_ms == pytest.approx(m.beta_ms * factor)
            assert comm_unit(other.comm[key]) != unit
            assert read_profile(other, "comm-other-unit").comm[key].beta_ms == pytest.approx(m.beta_ms)
    links = run_links(ResultsConfig()).set_index(["testbed", "reading", "kind"]).sort_index()
    # B's AlltoAll per byte, recomputed: 8 nodes, busbw factor 7/8, 4 GPUs of a node on one 100 Gb/s NIC
    per_gpu = 7 / 8 / 3.06e-7 * 1e3 * 8 / 1e9
    assert links.loc[("B", "published", "a2a"), "load_gbps"] == pytest.approx(4 * per_gpu)
    assert links.loc[("B", "published", "a2a"), "load_over_line"] == pytest.approx(4 * per_gpu / 100)
    assert (links.loc[("B", "published"), "load_over_line"] <= 1).all()
    assert (links.loc[("B", "comm-other-unit"), "load_over_line"].loc[["a2a", "allreduce"]] > 3).all()
    assert (links.loc[("A", "published"), "load_over_line"] <= 1).all()


def test_the_links_part_keeps_both_readings_in_its_csv(tmp_path):
    from impl.experiments.fsmoe.results import main

    out = tmp_path / "links.csv"
    assert main(["--part", "links", "--out-csv", str(out), "--out-record", str(tmp_path / "links.json")]) == 0
    frame = pd.read_csv(out, comment="#")
    assert set(frame.reading) == {"published", "comm-other-unit"}
    assert set(frame[frame.testbed == "B"].groupby("reading").unit.first().items()) == {
        ("published", "byte"), ("comm-other-unit", "float32 element")}


def test_a_part_reports_progress_exactly_when_its_runner_takes_it():
    """`Part.reports_progress` comes from the runner's signature: the parts with many cases take
    `progress` and get it; the others are called without it. The CLI's parts are the registry's."""
    from impl.experiments.fsmoe import results
    assert results.PARTS == tuple(results.RUNNERS) == ("grid", "statistic", "table2", "models", "order", "links")
    assert {name for name, part in results.RUNNERS.items() if part.reports_progress} == {"grid", "models", "order"}
    seen = []
    with_progress = results.Part(lambda cfg, progress=None: seen.append(progress))
    without = results.Part(lambda cfg: seen.append("called"))
    with_progress(None, progress=False)
    without(None, progress=False)
    assert (with_progress.reports_progress, without.reports_progress, seen) == (True, False, [False, "called"])


def test_the_grid_runs_no_ds_moe_ablation():
    """No result over DS-MoE is read from the configured layers, so the grid runs only the paper's plans."""
    from impl.experiments.fsmoe.results import DS_MOE_ABLATIONS
    from impl.experiments.systems import paper_systems

    grid = run_grid(ResultsConfig(testbeds={"B": "fsmoe-testbed-b"}, grid_sample=2), progress=False)
    assert set(grid.system) == {s.name for s in paper_systems("fsmoe")}
    assert not set(grid.system) & {a.system for a in DS_MOE_ABLATIONS.values()}


def test_the_paper_table2_reading_gives_table2_the_papers_times():
    """Each scaled operation's Table 2 times match the paper's in geometric mean (ratio 1 per
    testbed and operation); a profile of no Table 2 testbed is refused in one line."""
    from impl.common.config import ConfigError
    from impl.common.costmodel import load_profile
    from impl.common.paper import read_paper_csv
    from impl.experiments.fsmoe.results import TABLE2_SCALED, read_profile, run_table2

    t2 = run_table2(ResultsConfig(reading="paper-table2"))
    paper = read_paper_csv("fsmoe_table2")[0]
    both = t2.merge(paper, on=["testbed", "model", "phase", "op"])
    both = both[(both.value > 0) & both.op.isin(list(TABLE2_SCALED))]
    ratio = both.assign(log=lambda f: (f.ms / f.value).map(math.log)).groupby(["testbed", "op"]).log.mean()
    assert len(ratio) == 2 * len(TABLE2_SCALED)
    assert ratio.abs().max() < 1e-9
    subset = read_profile(load_profile("fsmoe-testbed-a-16"), "paper-table2")
    full = read_profile(load_profile("fsmoe-testbed-a"), "paper-table2")
    assert subset.comm_model("allgather", "intra-1") == full.comm_model("allgather", "intra-1")
    with pytest.raises(ConfigError, match=r"reading: 'paper-table2' is not allowed for profile 'hiermoe"):
        read_profile(load_profile("hiermoe-testbed"), "paper-table2")


def test_the_paper_table2_reading_refuses_a_profile_of_no_table2_testbed_before_running(tmp_path, capsys):
    from impl.experiments.fsmoe.results import main

    code = main(["--part", "models", "--set", "reading=paper-table2", "--set", "fig7_profiles={48: hiermoe-testbed}",
                 "--out-csv", str(tmp_path / "m.csv"), "--out-record", str(tmp_path / "m.json")])
    assert code == 2 and not (tmp_path / "m.csv").exists()
    assert "reading: 'paper-table2' is not allowed for profile 'hiermoe-testbed'" in capsys.readouterr().err
