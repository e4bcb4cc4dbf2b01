"""A calibration fit that explains little of the measured times is flagged in the profile and on
screen, never written silently; a good fit carries no flag."""
import random

from impl.common.calibrate import R2_THRESHOLD, CalibrationPlan, build_profile, poor_fits


def _series(times):
    return {"nbytes": [4096 * (i + 1) for i in range(len(times))], "times_ms": [[[t] for t in times]]}


def test_poor_fit_is_flagged_and_good_fit_is_not():
    rng = random.Random(0)
    plan = CalibrationPlan.build("1x2", [4096 * (i + 1) for i in range(8)], 1, 0, ["a2a", "allreduce"], progress=False)
    noisy = [rng.uniform(1.0, 2.0) for _ in range(8)]                   # no dependence on size
    linear = [0.1 + 0.01 * (i + 1) for i in range(8)]
    profile = build_profile("p", plan, {"a2a/flat": _series(noisy), "allreduce/flat": _series(linear)},
                            {"work": [1, 2, 3, 4], "median_ms": [5.0, 1.0, 4.0, 2.0]}, "note",
                            {"source": "test", "host": "h", "backend": "gloo"})
    flagged = poor_fits(profile)
    assert len(flagged) == 2 and any("a2a/flat" in f for f in flagged) and any("gemm" in f for f in flagged)
    assert all(f"< {R2_THRESHOLD}" in f for f in flagged)
    assert profile.comm[("allreduce", "flat")].note == ""


def test_a_preset_fills_what_the_command_line_leaves_out():
    """--preset replaces the defaults; a flag given explicitly, in either spelling, keeps its value."""
    from impl.common.calibrate import PRESETS, parse_args

    base = ["--topology", "1x2", "--out", "p.yaml", "--preset", "fsmoe"]
    args = parse_args(base)
    for key, value in PRESETS["fsmoe"].items():
        assert getattr(args, key) == value, key
    for given in (["--repeats", "3"], ["--repeats=3"]):
        args = parse_args(base + given)
        assert args.repeats == 3 and args.gemm_dim == PRESETS["fsmoe"]["gemm_dim"]
    assert parse_args(base[:4]).repeats == 5 and parse_args(base[:4]).gemm_dim == 512
