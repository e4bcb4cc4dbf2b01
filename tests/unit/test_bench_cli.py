"""The layer bench CLI: bad input fails before any rank starts, with one line and exit code 2;
a good config runs on SimComm and writes a valid record whose bytes equal the ranks' counters."""
import subprocess
import sys

import pytest

from impl.experiments.layer_bench import main
from impl.common.records import read_records


@pytest.mark.parametrize("override,message", [
    ("model=gpt5", "model: unknown model 'gpt5'; allowed: deepseek-v3,"),
    ("topology=3y3", "topology: unknown topology '3y3'; allowed:"),
    ("colour=red", "unknown key 'colour'; allowed:"),
    ("num_experts=6", "num_experts E=6 is not divisible by the expert-parallel size 4"),
    ("top_k=40", "top_k: 40 is not allowed with num_experts=32; allowed: 1..32"),
    ("world_size=8", "world_size: 8 does not match topology '2x2'; allowed: 4"),
    ("system=nope", "system: unknown 'nope'; allowed: "),
    ("tier=cloud", "tier"),
    ("model=llama2-7b-tiny", "is dense"),
])
def test_bad_input_is_one_line_and_exit_2(override, message, capsys):
    assert main(["--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_runs_in_sim_tier_and_writes_record(tmp_path):
    out = tmp_path / "rec.json"
    assert main(["--set", "system=hd2", "--set", "topology=2x2", "--set", "tokens_per_rank=16",
                 "--set", "repeats=2", "--set", "warmup=0", "--out-record", str(out)]) == 0
    (record,) = read_records(out)
    assert record["tier"] == "sim" and record["system"] == "hd2"
    assert set(record["bytes_by_level"]) == {"node", "gpu"}
    assert record["metrics"]["step_time_ms"]["n"] == 2


@pytest.mark.slow
def test_exit_code_from_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "impl.experiments.layer_bench", "--set", "top_k=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "top_k: 0 is not allowed" in proc.stderr
