"""Cost model: least squares against hand-computed and brute-force truth, step naming, the shipped
profiles against the papers' published constants, YAML round trips and error messages."""
import math

import numpy as np
import pytest
import yaml

from impl.common.costmodel import (COMM_KINDS, HardwareProfile, LinearFit, LinearModel, fit_linear, list_profiles,
                                   load_profile, parse_step, save_profile, shift_step, step_name, sub_topology_profile,
                                   topology_steps)
from impl.common.topology import get_topology


# ---- fit_linear -----------------------------------------------------------------------------
def test_fit_hand_computed():
    # mean x = 1, mean y = 7/3, Sxy = 3, Sxx = 2 -> beta = 3/2, alpha = 5/6;
    # residuals (1/6, -1/3, 1/6): SS_res = 1/6, SS_tot = 14/3 -> r2 = 27/28
    fit = fit_linear([0, 1, 2], [1, 2, 4])
    assert fit.beta == pytest.approx(1.5, rel=1e-15)
    assert fit.alpha == pytest.approx(5 / 6, rel=1e-15)
    assert fit.r2 == pytest.approx(27 / 28, rel=1e-15)
    assert fit.n == 3
    assert fit.predict(4) == pytest.approx(5 / 6 + 6, rel=1e-15)


def test_fit_exact_line_at_byte_scale():
    xs = [2**18 * k * 4 for k in range(1, 25)]  # FSMoE's sweep, in bytes
    ys = [0.287 + 5.8e-7 * x for x in xs]
    fit = fit_linear(xs, ys)
    assert fit.alpha == pytest.approx(0.287, rel=1e-9)
    assert fit.beta == pytest.approx(5.8e-7, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_noisy_matches_lstsq_and_recovers_truth():
    rng = np.random.default_rng(7)
    alpha, beta, sigma = 0.5, 2e-6, 0.02
    xs = np.repeat(np.linspace(1e5, 5e6, 20), 5)
    ys = alpha + beta * xs + rng.normal(0, sigma, xs.size)
    fit = fit_linear(xs, ys)
    # equal to the normal-equations solution of numpy's least squares
    A = np.stack([np.ones_like(xs), xs], axis=1)
    (ref_alpha, ref_beta), *_ = np.linalg.lstsq(A, ys, rcond=None)
    assert fit.alpha == pytest.approx(ref_alpha, rel=1e-10)
    assert fit.beta == pytest.approx(ref_beta, rel=1e-10)
    # r2 by brute force, and (OLS with intercept) the squared Pearson correlation
    pred = ref_alpha + ref_beta * xs
    brute_r2 = 1 - np.sum((ys - pred) ** 2) / np.sum((ys - ys.mean()) ** 2)
    assert fit.r2 == pytest.approx(brute_r2, rel=1e-12)
    assert fit.r2 == pytest.approx(np.corrcoef(xs, ys)[0, 1] ** 2, rel=1e-10)
    # the truth lies within 4 standard errors of the estimate
    se_beta = sigma / math.sqrt(np.sum((xs - xs.mean()) ** 2))
    se_alpha = sigma * math.sqrt(1 / xs.size + xs.mean() ** 2 / np.sum((xs - xs.mean()) ** 2))
    assert abs(fit.beta - beta) < 4 * se_beta
    assert abs(fit.alpha - alpha) < 4 * se_alpha
    assert 0.99 < fit.r2 < 1.0
    assert fit.n == 100


def test_fit_keeps_the_start_up_non_negative():
    """A super-linear curve (contention at large sizes) gives OLS a negative intercept; the fit is
    then the least-squares line through the origin, checked against a brute-force search."""
    xs = np.array([2.0, 8.0, 16.0, 32.0, 64.0])
    ys = np.array([0.2, 0.9, 1.6, 3.5, 8.2])
    assert np.polyfit(xs, ys, 1)[1] < 0
    fit = fit_linear(xs, ys)
    grid = np.linspace(0.05, 0.2, 150001)
    best = grid[np.argmin([np.sum((ys - b * xs) ** 2) for b in grid])]
    assert fit.alpha == 0.0 and fit.beta == pytest.approx(best, abs=2e-6)
    assert fit.r2 == pytest.approx(1 - np.sum((ys - fit.beta * xs) ** 2) / np.sum((ys - ys.mean()) ** 2), rel=1e-12)
    assert all(fit.predict(x) >= 0 for x in (0.0, 1.0))


def test_fit_constant_ys_is_exact():
    fit = fit_linear([1, 2, 3], [4.0, 4.0, 4.0])
    assert fit == LinearFit(4.0, 0.0, 1.0, 3)


@pytest.mark.parametrize("xs, ys, match", [
    ([1, 2, 3], [1, 2], "3 xs but 2 ys"),
    ([5, 5, 5], [1, 2, 3], "at least 2 distinct x"),
    ([1], [1], "at least 2 distinct x"),
    ([1, 2, float("nan")], [1, 2, 3], "finite"),
    ([1, 2, 3], [1, float("inf"), 3], "finite"),
])
def test_fit_rejects_bad_input(xs, ys, match):
    with pytest.raises(ValueError, match=match):
        fit_linear(xs, ys)


# ---- step names -----------------------------------------------------------------------------
def test_step_names_truth_table():
    assert [step_name("intra", 0), step_name("inter", 1), step_name("intra", 1), step_name("inter", 3)] == \
        ["flat", "inter-1", "intra-1", "inter-3"]
    assert [parse_step(s) for s in ("flat", "intra-0", "inter-2", "intra-3")] == \
        [("intra", 0), ("intra", 0), ("inter", 2), ("intra", 3)]
    assert [shift_step(s, 1) for s in ("flat", "inter-1", "intra-2")] == ["intra-1", "inter-2", "intra-3"]
    for bad in ("inter-0", "intra", "level-1", "inter-x", ""):
        with pytest.raises(ValueError, match="allowed"):
            parse_step(bad)
    with pytest.raises(ValueError, match="'inter', 'intra'"):
        step_name("outer", 1)


def test_topology_steps_are_hiermoes_seven_and_match_the_groups():
    topo = get_topology("hiermoe-testbed")
    steps = topology_steps(topo)
    assert steps == ["flat", "inter-1", "intra-1", "inter-2", "intra-2", "inter-3", "intra-3"]
    assert set(steps) == {step_name(kind, level) for kind, level, _ in topo.all_step_groups()}
    assert topology_steps(get_topology("2x1")) == ["flat"]


# ---- shipped profiles -----------------------------------------------------------------------
HIERMOE_FIG9 = {  # step: (alpha ms, beta ms/byte, r2), HierMoE Fig. 9
    "flat": (7.22e-1, 5.70e-7, 0.999997), "inter-1": (4.97e-1, 5.29e-7, 0.999991),
    "intra-1": (5.71e-1, 1.27e-7, 0.998922), "inter-2": (3.01e-1, 1.17e-7, 0.998682),
    "intra-2": (1.14e-1, 2.63e-8, 0.999051), "inter-3": (1.49e-1, 2.06e-8, 0.999031),
    "intra-3": (2.04e-1, 1.64e-8, 0.997245),
}
FSMOE = {  # (alpha ms, beta as printed, r2) per testbed, FSMoE Fig. 5 with corrected A betas
    "fsmoe-testbed-a": {("a2a", "inter-1"): (2.87e-1, 2.32e-6, 0.9999), ("allgather", "intra-1"): (3.37e-1, 2.35e-7, 0.9999653),
                        ("reducescatter", "intra-1"): (3.95e-1, 2.22e-7, 0.9999599),
                        ("allreduce", "inter-1"): (5.11e-1, 4.95e-6, 0.9999896)},
    "fsmoe-testbed-b": {("a2a", "inter-1"): (1.75e-1, 3.06e-7, None), ("allgather", "intra-1"): (3.20e-2, 1.68e-7, None),
                        ("reducescatter", "intra-1"): (3.91e-2, 1.67e-7, None),
                        ("allreduce", "inter-1"): (8.37e-2, 5.99e-7, None)},
}
FSMOE_GEMM = {"fsmoe-testbed-a": (4.26e-2, 2.29e-11, 0.9987), "fsmoe-testbed-b": (9.24e-2, 4.42e-11, None)}
# the unit each testbed's communication betas are read in (B per byte: per element its links would
# beat their line rates; see the profile's notes): (name, bytes per unit)
FSMOE_COMM_UNIT = {"fsmoe-testbed-a": ("float32 element", 4.0), "fsmoe-testbed-b": ("byte", 1.0)}


def test_shipped_profiles_are_listed_and_load():
    names = list_profiles()
    assert {"hiermoe-testbed", "hiermoe-node", "fsmoe-testbed-a", "fsmoe-testbed-b"} <= set(names)
    for name in names:
        prof = load_profile(name)
        assert prof.name == name and prof.source and prof.notes
        assert prof.get_topology().name == prof.topology


def test_hiermoe_testbed_reproduces_fig9():
    prof = load_profile("hiermoe-testbed")
    assert prof.topology == "hiermoe-testbed"
    assert [step for _, step in prof.comm] == list(HIERMOE_FIG9)
    for step, (alpha, beta, r2) in HIERMOE_FIG9.items():
        model = prof.comm_model("a2a", step)
        assert (model.alpha_ms, model.beta_ms, model.r2) == (alpha, beta, r2)
        assert prof.comm_time("a2a", step, 2**20) == pytest.approx(alpha + beta * 2**20, rel=1e-15)
    assert prof.comm_time("a2a", "intra-0", 10**6) == pytest.approx(0.722 + 0.57, rel=1e-12)


def test_hiermoe_node_is_the_testbed_subtree():
    node = load_profile("hiermoe-node")
    derived = sub_topology_profile(load_profile("hiermoe-testbed"), "hiermoe-node", "hiermoe-node")
    assert node.comm == derived.comm
    assert node.comm_model("a2a", "flat") == load_profile("hiermoe-testbed").comm_model("a2a", "intra-1")
    assert [s for _, s in node.comm] == topology_steps(get_topology("hiermoe-node"))


@pytest.mark.parametrize("name", sorted(FSMOE))
def test_fsmoe_profiles_reproduce_the_published_constants_in_their_unit(name):
    prof = load_profile(name)
    assert prof.topology == name
    n_elements = 24 * 2**18  # the largest point of the paper's sweep
    unit, size = FSMOE_COMM_UNIT[name]
    for (kind, step), (alpha, beta, r2) in FSMOE[name].items():
        model = prof.comm_model(kind, step)
        assert model.beta_ms == pytest.approx(beta / size, rel=1e-15)  # per byte
        assert model.published == {"beta": beta, "beta_unit": unit, "beta_unit_size": size}
        assert model.r2 == r2
        assert prof.comm_time(kind, step, 4 * n_elements) == pytest.approx(alpha + beta * 4 / size * n_elements,
                                                                           rel=1e-12)
    alpha, beta_per_4mnk, r2 = FSMOE_GEMM[name]
    gemm = prof.compute_model("gemm")
    assert gemm.work_unit == "mac" and gemm.r2 == r2
    tokens, M, H = 6144, 1024, 1024  # Fig. 5a's largest point
    assert prof.compute_time("gemm", tokens * M * H) == pytest.approx(alpha + beta_per_4mnk * tokens * M * H * 4, rel=1e-12)


def test_fsmoe_a_corrected_betas_order_the_links():
    """With the corrected betas an 8x larger intra-node AllGather beats the inter-node AlltoAll
    (the paper's Table 2 ordering); the caption's permuted values would reverse it."""
    prof = load_profile("fsmoe-testbed-a")
    nbytes = 4 * 2**22
    assert prof.comm_time("allgather", "intra-1", 8 * nbytes) < prof.comm_time("a2a", "inter-1", nbytes)


# ---- YAML round trip ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hiermoe-testbed", "hiermoe-node", "fsmoe-testbed-a", "fsmoe-testbed-b"])
def test_shipped_profile_round_trip(tmp_path, name):
    prof = load_profile(name)
    path = save_profile(prof, tmp_path / f"{name}.yaml")
    again = load_profile(path)
    assert again == prof
    assert save_profile(again, tmp_path / "second.yaml").read_text() == path.read_text()
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode == plain.stat().st_mode   # readable like any file the user writes (not 0600)


def _synthetic_profile() -> HardwareProfile:
    fit = fit_linear([1e3, 1e4, 1e5], [0.11, 0.2, 1.13])
    return HardwareProfile(
        name="calibrated-2x2", topology="2x2", source="python -m impl.common.calibrate --topology 2x2",
        description="two virtual nodes", notes="line one\nline two",
        comm={("a2a", "flat"): LinearModel.from_fit(fit), ("a2a", "inter-1"): LinearModel(0.1, 1e-7, 0.99, 4),
              ("allreduce", "intra-1"): LinearModel(0.05, 3e-9)},
        compute={"gemm": LinearModel(0.01, 2.5e-10, 0.9, 6, work_unit="mac", note="torch.matmul fp32")},
        provenance={"host": "h", "torch": "2.13.0", "backend": "gloo", "date": "2026-01-01T00:00:00"},
        measurements={"a2a/flat": {"nbytes": [1000, 10000, 100000], "median_ms": [0.11, 0.2, 1.13]}})


def test_synthetic_profile_round_trip(tmp_path):
    prof = _synthetic_profile()
    again = load_profile(save_profile(prof, tmp_path / "p.yml"))
    assert again == prof
    assert again.comm_time("a2a", "flat", 5e4) == prof.comm_model("a2a", "flat").time_ms(5e4)
    text = (tmp_path / "p.yml").read_text()
    assert yaml.safe_load(text)["units"] == {"time": "ms", "size": "byte"}


def test_integers_and_dotless_exponents_read_as_numbers():
    data = {"name": "x", "topology": "1x2", "source": "s",
            "comm": {"a2a": {"flat": {"alpha": 1, "beta": "1e-7", "r2": "1"}}}}
    model = HardwareProfile.from_dict(data).comm_model("a2a", "flat")
    assert (model.alpha_ms, model.beta_ms, model.r2) == (1.0, 1e-7, 1.0)


# ---- errors ---------------------------------------------------------------------------------
def test_unknown_profile_lists_available():
    with pytest.raises(ValueError, match=r"unknown hardware profile 'nope'; available: .*hiermoe-testbed"):
        load_profile("nope")
    with pytest.raises(ValueError, match="does not exist"):
        load_profile("/nonexistent/dir/p.yaml")


def test_unknown_kind_step_and_compute_name():
    prof = load_profile("fsmoe-testbed-a")
    with pytest.raises(ValueError, match="kind 'alltoall' is not allowed; allowed: " + ", ".join(COMM_KINDS)):
        prof.comm_time("alltoall", "inter-1", 10)
    with pytest.raises(ValueError, match=r"no model for a2a/flat; it has: a2a/inter-1, allgather/intra-1"):
        prof.comm_time("a2a", "flat", 10)
    with pytest.raises(ValueError, match="step 'node' is not allowed"):
        prof.comm_time("a2a", "node", 10)
    with pytest.raises(ValueError, match="no compute model 'attention'; it has: gemm"):
        prof.compute_time("attention", 10)
    with pytest.raises(ValueError, match=">= 0"):
        prof.comm_time("a2a", "inter-1", -1)


def _data(**changes):
    data = {"name": "x", "topology": "2x4", "source": "s", "comm": {"a2a": {"flat": {"alpha": 0.1, "beta": 1e-7}}}}
    data.update(changes)
    return data


@pytest.mark.parametrize("data, match", [
    (_data(colour="red"), "unknown key 'colour'; allowed: name, topology"),
    (_data(source=""), "missing 'source'"),
    (_data(topology="3y3"), "unknown topology '3y3'"),
    (_data(units={"time": "s", "size": "byte"}), "units must be"),
    (_data(comm={"a2a": {"inter-2": {"alpha": 0.1, "beta": 1e-7}}}), r"step 'inter-2' does not exist in topology '2x4' \(D = 2\); its steps: flat, inter-1, intra-1"),
    (_data(comm={"bcast": {"flat": {"alpha": 0.1, "beta": 1e-7}}}), "kind 'bcast' is not allowed"),
    (_data(comm={"a2a": {"flat": {"alpha": 0.1}}}), "missing 'beta'"),
    (_data(comm={"a2a": {"flat": {"alpha": 0.1, "beta": "fast"}}}), r"comm.a2a.flat.beta: expected a number, got 'fast'"),
    (_data(comm={"a2a": {"flat": {"alpha": 0.1, "beta": 1e-7, "beta_unit": "element"}}}), "go together"),
    (_data(comm={"a2a": {"flat": {"alpha": 0.1, "beta": 1e-7, "beta_unit": "element", "beta_unit_size": 0}}}), "must be > 0"),
    (_data(comm={"a2a": {"flat": {"alpha": 0.1, "beta": 1e-7, "slope": 1}}}), "unknown key 'slope'"),
    (_data(comm={"a2a": {"flat": {"alpha": 0.1, "beta": 1e-7}, "intra-0": {"alpha": 0.1, "beta": 1e-7}}}), "given twice"),
    (_data(comm={"a2a": {"flat": {"alpha": 0.1, "beta": 1e-7, "work_unit": "mac"}}}), "per 'byte'"),
    (_data(comm={"a2a": {"flat": {"alpha": 0.1, "beta": 1e-7, "r2": 1.5}}}), "r2 must be <= 1"),
    (_data(compute={"gemm": {"alpha": 0.1, "beta": 1e-9}}), "compute.gemm: give its work_unit"),
])
def test_bad_profile_data(data, match):
    with pytest.raises(ValueError, match=match):
        HardwareProfile.from_dict(data)


def test_sub_topology_must_be_the_lower_levels():
    with pytest.raises(ValueError, match="is not the lower part of 'hiermoe-testbed'"):
        sub_topology_profile(load_profile("hiermoe-testbed"), "x", "1x8")
