"""The cluster tier end to end on this machine: workflows/scripts/launch_cluster.sh outside Slurm
starts standalone torchrun, whose ranks place themselves with `init_from_env` (gloo without
CUDA), run the layer bench and rank 0 writes the record."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from impl.common.records import read_records

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.skipif(not (BIN / "torchrun").exists() and shutil.which("torchrun") is None, reason="no torchrun")
def test_layer_bench_under_standalone_torchrun(tmp_path):
    out = tmp_path / "rec.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "workflows/scripts/launch_cluster.sh"), "--gpus-per-node", "2", "--",
                           "-m", "impl.experiments.layer_bench", "--set", "tier=cluster", "--set", "topology=1x2",
                           "--set", "system=hd2", "--set", "tokens_per_rank=16", "--set", "repeats=2",
                           "--set", "timeout_s=30", "--out-record", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = read_records(out)
    assert record["tier"] == "cluster" and record["system"] == "hd2"
    assert record["extra"]["network"]["backend"] == "gloo"
    assert record["metrics"]["step_time_ms"]["n"] == 2
