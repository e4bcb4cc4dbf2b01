"""Calibration CLI: size parsing and rounding, plan validation before any rank starts, the
slowest-rank / median aggregation, and real gloo runs whose written profile carries a fit with r^2
for every measured kind, consistent with the measured points it records."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from impl.common.calibrate import (CalibrationPlan, aggregate_repeats, calibrate, main, message_nbytes, parse_size,
                                   parse_sizes, step_group_size)
from impl.common.costmodel import fit_linear, load_profile, topology_steps
from impl.common.topology import get_topology

REPO = Path(__file__).resolve().parents[2]


# ---- helpers (no processes) -----------------------------------------------------------------
def test_parse_sizes_truth_table():
    assert [parse_size(s) for s in ("4096", "64K", "2m", "1G")] == [4096, 65536, 2 * 2**20, 2**30]
    assert parse_sizes(["1M:4M:1M"]) == [2**20, 2 * 2**20, 3 * 2**20, 4 * 2**20]
    assert parse_sizes(["64K,16K", "16K", "32K"]) == [16384, 32768, 65536]
    for bad, match in ((["1.5M"], "not allowed"), (["1M:4M"], "START:STOP:STEP"), (["4M:1M:1M"], "STOP >= START"),
                       (["0"], "> 0"), ([","], "no sizes")):
        with pytest.raises(ValueError, match=match):
            parse_sizes(bad)


def test_step_group_sizes_match_the_topology_groups():
    topo = get_topology("hiermoe-testbed")
    for step in topology_steps(topo):
        kind, _, level = step.partition("-")
        groups = topo.intra_groups(0) if step == "flat" else (
            topo.inter_groups(int(level)) if kind == "inter" else topo.intra_groups(int(level)))
        assert step_group_size(topo, step) == len(groups[0])
    assert [step_group_size(topo, s) for s in topology_steps(topo)] == [32, 4, 8, 2, 4, 2, 2]
    with pytest.raises(ValueError, match="does not exist in topology '2x4'"):
        step_group_size(get_topology("2x4"), "intra-2")


def test_message_rounding():
    # 1000 bytes over 3 peers: 83 float32 per peer -> 249 elements, 996 bytes
    assert message_nbytes("a2a", 1000, 3) == (249, 996)
    assert message_nbytes("allgather", 1000, 3) == (83, 996)  # input per rank, output size
    assert message_nbytes("allreduce", 1002, 3) == (250, 1000)
    assert message_nbytes("a2a", 1, 4) == (4, 16)  # at least one element per peer
    with pytest.raises(ValueError, match="'bcast' is not allowed"):
        message_nbytes("bcast", 8, 2)


def test_aggregate_takes_slowest_rank_then_median():
    # [rank][size][repeat]
    times = [[[1.0, 5.0, 2.0], [10.0, 10.0, 10.0]],
             [[3.0, 1.0, 2.5], [9.0, 11.0, 12.0]]]
    agg = aggregate_repeats(times)
    assert agg == {"median_ms": [3.0, 11.0], "min_ms": [2.5, 10.0], "max_ms": [5.0, 12.0]}


def test_plan_validation():
    plan = CalibrationPlan.build("1x2", [8192, 16384], 2, 1, ["a2a"])
    assert plan.tasks == (("a2a", "flat"), ("a2a", "intra-1")) and plan.skipped == ("inter-1",)
    assert CalibrationPlan.build("2x2", [8192, 16384], 1, 0, ["a2a", "allreduce"], ["intra-0", "inter-1"]).tasks == \
        (("a2a", "flat"), ("allreduce", "flat"), ("a2a", "inter-1"), ("allreduce", "inter-1"))
    for args, match in (
        (("3y3", [8, 16], 1, 0, ["a2a"]), "unknown topology '3y3'"),
        (("1x2", [8, 16], 0, 0, ["a2a"]), "--repeats must be >= 1"),
        (("1x2", [8, 16], 1, -1, ["a2a"]), "--warmup must be >= 0"),
        (("1x2", [8, 16], 1, 0, ["bcast"]), "'bcast' is not allowed; allowed: a2a, allgather, reducescatter, allreduce"),
        (("1x2", [8, 12], 1, 0, ["a2a"]), ">= 2 distinct sizes after rounding"),
        (("2x1", [8, 16], 1, 0, ["a2a"], ["inter-1"]), "does not exist in topology '2x1'"),
        (("1x2", [8, 16], 1, 0, ["a2a"], ["inter-1"]), "nothing to measure"),
    ):
        with pytest.raises(ValueError, match=match):
            CalibrationPlan.build(*args)


@pytest.mark.parametrize("argv, message", [
    (["--topology", "1x2", "--out", "p.json"], "must end in .yaml"),
    (["--topology", "1x2", "--backend", "nccl", "--out", "p.yaml"], "needs --launcher env"),
    (["--topology", "1x2", "--sizes", "1X", "--out", "p.yaml"], "--sizes: size '1X' is not allowed"),
    (["--topology", "1x2", "--gemm-tokens", "64", "--out", "p.yaml"], "--gemm-tokens: needs >= 2"),
    (["--topology", "1x2", "--gemm-tokens", "64,x", "--out", "p.yaml"], "--gemm-tokens: size 'x' is not allowed"),
    (["--topology", "1x2", "--iters", "0", "--out", "p.yaml"], "argument --iters: 0 is not allowed; allowed: 1..100000"),
    (["--topology", "1x2", "--timeout", "nan", "--out", "p.yaml"], "argument --timeout: 'nan' is not allowed"),
    (["--topology", "1x2", "--launcher", "env", "--out", "p.yaml"], "--launcher env: neither torchrun's RANK"),
    (["--topology", "1x2", "--steps", "inter-3", "--out", "p.yaml"], "does not exist in topology '1x2'"),
])
def test_cli_rejects_bad_arguments_before_launching(argv, message, capsys, tmp_path, monkeypatch):
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    argv = [a if a not in ("p.json", "p.yaml") else str(tmp_path / a) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:             # argparse's own checks (flag types)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("python -m impl.common.calibrate: error:") and message in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


# ---- real runs on gloo ----------------------------------------------------------------------
@pytest.mark.dist
def test_cli_on_two_gloo_ranks_writes_fitted_profile(tmp_path):
    out = tmp_path / "profiles" / "local.yaml"
    cmd = [sys.executable, "-m", "impl.common.calibrate", "--topology", "1x2", "--backend", "gloo",
           "--sizes", "8K:64K:8K", "--repeats", "3", "--warmup", "1", "--iters", "2", "--gemm-tokens", "32:128:32",
           "--gemm-dim", "64", "--gemm-threads", "1", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout

    prof = load_profile(out)
    assert prof.name == "calibrated-1x2-gloo" and prof.topology == "1x2"
    assert list(prof.comm) == [("a2a", "flat"), ("a2a", "intra-1")]  # inter-1 has 1-rank groups
    assert "inter-1" in prof.notes
    sizes = [8192 * k for k in range(1, 9)]
    for (kind, step), model in prof.comm.items():
        assert model.r2 is not None and 0.0 <= model.r2 <= 1.0 and model.n == 8
        points = prof.measurements[f"{kind}/{step}"]
        assert points["nbytes"] == sizes
        assert all(lo <= med <= hi for lo, med, hi in zip(points["min_ms"], points["median_ms"], points["max_ms"]))
        refit = fit_linear(points["nbytes"], points["median_ms"])
        assert (model.alpha_ms, model.beta_ms, model.r2) == pytest.approx((refit.alpha, refit.beta, refit.r2), rel=1e-12)
    gemm = prof.compute_model("gemm")
    assert gemm.work_unit == "mac" and gemm.r2 is not None and gemm.n == 4
    assert prof.measurements["gemm"]["work"] == [t * 64 * 64 for t in (32, 64, 96, 128)]
    assert prof.provenance["backend"] == "gloo" and prof.provenance["world_size"] == 2
    assert (prof.provenance["repeats"], prof.provenance["warmup"], prof.provenance["iters"]) == (3, 1, 2)
    assert prof.provenance["command"].startswith("python -m impl.common.calibrate --topology 1x2")
    assert {"host", "torch", "date", "platform", "python"} <= set(prof.provenance)


@pytest.mark.dist
def test_calibrate_api_two_nodes_all_collectives():
    plan = CalibrationPlan.build("2x1", [4096, 8192, 12288], 2, 1, ["a2a", "allgather", "reducescatter", "allreduce"],
                                 progress=False)
    series, where = calibrate(plan)
    assert where["emulated"] is False
    assert sorted(series) == ["a2a/flat", "allgather/flat", "allreduce/flat", "reducescatter/flat"]
    for key, s in series.items():
        assert s["nbytes"] == [4096, 8192, 12288]
        assert len(s["times_ms"]) == 2  # ranks
        assert all(len(reps) == 2 and min(reps) > 0 for rank in s["times_ms"] for reps in rank)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_rejects_nccl_without_cuda(capsys, tmp_path):
    assert main(["--topology", "2x1", "--launcher", "env", "--backend", "nccl", "--out", str(tmp_path / "p.yaml")]) == 2
    assert "--backend nccl: a torchrun / srun job on this machine uses 'gloo'" in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.is_available(), reason="torchrun would initialise nccl")
def test_cli_joins_a_torchrun_job(tmp_path):
    out = tmp_path / "env.yaml"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "impl.common.calibrate", "--topology", "1x2",
           "--launcher", "env", "--sizes", "8K,16K,24K", "--repeats", "2", "--gemm-tokens", "", "--out", str(out),
           "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prof = load_profile(out)
    assert list(prof.comm) == [("a2a", "flat"), ("a2a", "intra-1")] and prof.comm_model("a2a", "flat").r2 is not None
    assert prof.compute == {} and prof.provenance["world_size"] == 2
