"""Cluster tier: the launch script starts torchrun under srun inside a Slurm allocation and
standalone outside one (checked against fake srun / torchrun / scontrol / sbatch that record their
arguments); the Slurm profile's dry run lists the cluster jobs with the plugin's multi-node
resources (and the emulated-cluster jobs of `make emu`); a real run with the profile's
placeholders, or with a bad config, stops before anything is submitted."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "workflows/scripts/launch_cluster.sh"
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"

_RECORDER = '#!/bin/sh\necho "$(basename "$0") $*" >> "$RECORD"\n'
_SCONTROL = '#!/bin/sh\necho "scontrol $*" >> "$RECORD"\nprintf "gpu01\\ngpu02\\n"\n'


@pytest.fixture
def fakes(tmp_path):
    """A directory of fake srun, torchrun, sbatch and scontrol first on PATH; (env, record file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", _RECORDER), ("torchrun", _RECORDER), ("sbatch", _RECORDER), ("scontrol", _SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "calls.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RECORD=str(record))
    return env, record


def _launch(env, *args):
    return subprocess.run(["bash", str(LAUNCH), *args], env=env, capture_output=True, text=True, timeout=60)


def test_standalone_torchrun_outside_slurm(fakes):
    env, record = fakes
    proc = _launch(env, "--gpus-per-node", "4", "--", "-m", "impl.experiments.layer_bench", "--set", "tier=cluster")
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == [
        "torchrun --standalone --nproc-per-node=4 -m impl.experiments.layer_bench --set tier=cluster"]


def test_torchrun_per_node_under_srun_inside_an_allocation(fakes):
    env, record = fakes
    env.update(SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[01-02]")
    proc = _launch(env, "--srun", "srun --mpi=pmix", "--gpus-per-node", "8", "--port", "29555",
                   "--", "-m", "impl.experiments.layer_bench", "--set", "tier=cluster")
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == [
        "scontrol show hostnames gpu[01-02]",
        "srun --mpi=pmix --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes=2 "
        "--nproc-per-node=8 --rdzv-id=42 --rdzv-backend=c10d --rdzv-endpoint=gpu01:29555 "
        "-m impl.experiments.layer_bench --set tier=cluster"]


@pytest.mark.parametrize("args,message", [
    (["--", "-m", "x"], "--gpus-per-node '' is not allowed"),
    (["--gpus-per-node", "0", "--", "-m", "x"], "--gpus-per-node '0' is not allowed"),
    (["--gpus-per-node", "2"], "nothing to run"),
    (["--nodes", "2"], "unknown option '--nodes'"),
])
def test_bad_arguments_are_one_line_and_exit_2(fakes, args, message):
    env, record = fakes
    proc = _launch(env, *args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
    assert not record.exists()


def _snakemake(env, workdir, *args):
    return subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                           "--workflow-profile", str(REPO / "workflows/profiles/slurm"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _jobs(out: str, rule: str) -> list[str]:
    """The resources line of every job of `rule` in a dry run's output."""
    blocks = re.split(r"\n(?=\[)|\nrule ", out)
    return [re.search(r"resources: (.*)", b)[1] for b in blocks if b.startswith(f"{rule}:") and "resources:" in b]


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed in this environment")
def test_slurm_dry_run_lists_cluster_and_emu_jobs_with_their_resources(fakes, tmp_path):
    env, record = fakes
    proc = _snakemake(env, tmp_path, "-n", "cluster", "emu_validation")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    benches = _jobs(out, "cluster_layer_bench")
    assert len(benches) == 8                      # HierMoE 5 variants, FSMoE's 3 baselines
    for nodes, gpus in ((4, 8), (6, 8)):
        mine = [r for r in benches if f"nodes={nodes}," in r]
        assert mine, benches
        for r in mine:
            for key in (f"tasks={nodes}", "mpi=srun", f"gres=gpu:{gpus}", "tasks_per_gpu=0", "runtime=60",
                        "mem_mb=200000", "slurm_partition=REPLACE_WITH_PARTITION"):
                assert key in r, (key, r)
            assert "cpus_per_task" not in r       # the plugin asks for the rule's threads
    assert "launch_cluster.sh --srun 'srun' --gpus-per-node 8 -- -m impl.experiments.layer_bench" in out
    (scheinfer,) = _jobs(out, "cluster_scheinfer_bench")
    assert "gres=gpu:1" in scheinfer and "tasks_per_gpu=0" in scheinfer
    assert len(_jobs(out, "emu_layer_bench")) == 72 and len(_jobs(out, "emu_calibration")) == 2   # 3 runs per cell
    assert not record.exists()                    # a dry run submits nothing


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed in this environment")
def test_real_run_with_placeholders_stops_before_submitting(fakes, tmp_path):
    env, record = fakes
    proc = _snakemake(env, tmp_path, "results/raw/cluster/layer_bench/hiermoe/hd2.json")
    assert proc.returncode != 0
    assert "slurm_partition = REPLACE_WITH_PARTITION" in proc.stderr
    assert "workflows/profiles/slurm/config.yaml" in proc.stderr
    assert not record.exists() or "sbatch" not in record.read_text()


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed in this environment")
def test_slurm_run_with_a_bad_config_stops_before_submitting(fakes, tmp_path):
    """The deep config checks run in the submitting Snakemake (workflows/rules/checks.smk)."""
    env, record = fakes
    proc = _snakemake(env, tmp_path, "--default-resources", "slurm_partition=p", "slurm_account=a",
                      "--config", "scheinfer_sim={set: {hardware: [a100]}}", "--", "results/raw/scheinfer_sim/sim.csv")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "check_configs: error: scheinfer_sim: hardware: 'a100' is not allowed" in proc.stderr
    assert not record.exists() or "sbatch" not in record.read_text()
