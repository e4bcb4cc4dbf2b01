"""The GPU evidence script's rehearsal: `workflows/scripts/gpu_check.sh --dry-run` runs every stage
without a GPU (the engine's device lanes emulated on the CPU) and writes the same result files the
GPU run writes, each readable by what consumes it, so the script cannot rot between GPU runs."""
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from impl.common.costmodel import load_profile
from impl.common.records import validate_record
from impl.experiments.scheinfer.sim import load_hardware

REPO = Path(__file__).resolve().parents[2]
FILES = ["a_device.json", "b_pytest.xml", "c_bench.csv", "c_bench.json", "d_profile.yaml",
         "d_scheinfer_hardware.yaml", "e_record.json", "gpu_check.log"]


@pytest.mark.slow
def test_dry_run_writes_every_result_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "LLAMA_CPP_LIB_PATH")}
    r = subprocess.run(["bash", "workflows/scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                       env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)      # at most 8 files come back

    assert json.loads((tmp_path / "a_device.json").read_text())["emulated"] is True
    suite = ET.parse(tmp_path / "b_pytest.xml").getroot()
    assert int((suite.find("testsuite") if suite.tag != "testsuite" else suite).get("tests")) > 0
    bench = pd.read_csv(tmp_path / "c_bench.csv")
    assert {"scheinfer", "fiddler"} <= set(bench["system"])
    assert (bench[["prefill_tok_s", "decode_tok_s"]] > 0).all().all()
    bench_record = json.loads((tmp_path / "c_bench.json").read_text())
    validate_record(bench_record)
    assert bench_record["extra"]["budget"]["gpu_mem_bytes"] == 5000000
    assert bench_record["extra"]["weights_file_type"] == "ALL_F32"
    assert "fiddler" in bench_record["extra"]["ratios"]["decode"]["prompt=8"]
    assert bench_record["extra"]["popularity"]["used_by"] == ["fiddler"]      # Fiddler got its profile
    assert load_profile(tmp_path / "d_profile.yaml").compute["gemm"].work_unit == "mac"
    assert len(load_hardware(tmp_path / "d_scheinfer_hardware.yaml")) == 1

    record = json.loads((tmp_path / "e_record.json").read_text())
    validate_record(record)
    assert record["tier"] == "emu" and record["extra"]["dry_run"] is True
    stages = {s["stage"]: s["exit_status"] for s in record["extra"]["stages"]}
    assert set(stages) == {"setup", "a-device", "b-pytest", "c-model", "c-cost", "c-bench", "d-profile"}
    assert set(stages.values()) == {0}
    assert record["extra"]["tok_s_medians"] and record["extra"]["gpu_tests"]["failures"] == 0

    # committed into a reference folder (README rows from the records; a dry run only when allowed),
    # then what the ScheInfer report makes of the files there
    sys.path.insert(0, str(REPO / "workflows" / "scripts"))
    from commit_gpu_evidence import commit
    ref = tmp_path / "reference"
    with pytest.raises(ValueError, match="tier 'emu', not 'cluster'"):
        commit(tmp_path, "h100", ref)
    assert commit(tmp_path, "h100", ref, allow_dry_run=True) == 0
    assert commit(tmp_path, "h100", ref, allow_dry_run=True) == 0          # again: rows replaced, not added
    readme = (ref / "README.md").read_text()
    assert readme.count("| `scheinfer_gpu_bench.csv` |") == 1 and "gpu_profile_h100.yaml" in readme
    committed = json.loads((ref / "scheinfer_gpu_bench.json").read_text())
    assert committed["outputs"] == {"scheinfer_gpu_bench.csv": bench_record["outputs"]["c_bench.csv"]}
    assert {k: v for k, v in committed.items() if k != "outputs"} == {
        k: v for k, v in bench_record.items() if k != "outputs"}
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path, changed, ignore=shutil.ignore_patterns("reference"))
    text = (changed / "c_bench.csv").read_text()
    (changed / "c_bench.csv").write_text(text + text.splitlines()[-1] + "\n")     # a row twice
    with pytest.raises(ValueError, match="c_bench.csv: not the file the run wrote"):
        commit(changed, "h100", tmp_path / "reference2", allow_dry_run=True)
    assert not (tmp_path / "reference2").exists()
    from figures.scheinfer_sim import gpu_section
    section = gpu_section(str(ref / "scheinfer_gpu_bench.csv"), str(ref / "scheinfer_gpu_bench.json"),
                          str(ref / "scheinfer_gpu_hardware.yaml"))
    assert section.startswith("\n## Measured on cpu (tier emu)")
    rows = [line for line in section.splitlines() if line.startswith("| 8 |") or line.startswith("| 16 |")]
    assert len(rows) == 4 and all("1.69x-6.33x" in r or "1.11x-1.80x" in r for r in rows)
    assert "predicted" in section and "python -m impl.experiments.scheinfer bench" in section
    assert "Fiddler's resident experts: the most popular on a calibration prompt of 64 tokens" in section


def test_bad_arguments_exit_2(tmp_path):
    for args, msg in ((["--budget", "2GB", "--out", str(tmp_path)], "--budget=2GB"), (["--frobnicate"], "unknown"),
                      ([], "no result folder"), (["--out"], "--out needs a value"),
                      (["--out", "--dry-run"], "--out needs a value"),
                      (["--repeats", "abc", "--out", str(tmp_path)], "--repeats=abc"),
                      (["--n-predict", "0", "--out", str(tmp_path)], "--n-predict=0"),
                      (["--prompt-tokens", "3,,4", "--out", str(tmp_path)], "--prompt-tokens=3,,4"),
                      (["--prompt-tokens", "0,8", "--out", str(tmp_path)], "--prompt-tokens=0,8"),
                      (["--repeats", "00", "--out", str(tmp_path)], "--repeats=00")):
        env = {k: v for k, v in os.environ.items() if k != "OUT"}
        r = subprocess.run(["bash", "workflows/scripts/gpu_check.sh", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(["bash", "workflows/scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "run")], cwd=REPO,
                       env={**os.environ, "PYTHON": "/bin/false"}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot import torch" in r.stderr and not (tmp_path / "run").exists()


def test_committing_evidence_refuses_bad_arguments_naming_them(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "workflows" / "scripts"))
    from commit_gpu_evidence import main
    (tmp_path / "run").mkdir()
    (tmp_path / "afile").write_text("x")
    for argv, named in ((["--from", str(tmp_path / "run"), "--card", "H100!"], "--card='H100!'"),
                        (["--from", str(tmp_path / "nope"), "--card", "h100"], "--from"),
                        (["--from", str(tmp_path / "run"), "--card", "h100"], "missing c_bench.csv"),
                        (["--from", str(tmp_path / "run"), "--card", "h100", "--to", str(tmp_path / "afile")], "--to")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "reference").exists()


def test_the_gpu_stage_runs_every_gpu_test_file_its_priority_ones_first():
    """The files stage b names first exist, and with the rest (found by their gpu mark) they are
    every file that has GPU tests."""
    import re
    script = (REPO / "workflows/scripts/gpu_check.sh").read_text()
    first = re.search(r"local first=\(([^)]*)\)", script).group(1).split()
    assert first and all((REPO / f).is_file() for f in first), first
    marked = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", p.read_text())}
    assert set(first) <= marked and len(marked) >= len(first)
