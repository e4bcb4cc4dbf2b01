"""The Snakemake workflow: dry run, lint, profiles, a reduced run of the default target, and
config errors. Each run uses its own working directory (--directory), so results and
.snakemake state never touch the repository."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from impl.common.records import validate_record

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
CHECK_LOG = "results/logs/check_configs.log"
# Makes torch unimportable in a Python that loads it (as sitecustomize, from PYTHONPATH).
NO_TORCH = ("import sys\n"
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch is unimportable here')\n"
            "sys.meta_path.insert(0, _NoTorch())\n")
REDUCED = ["hiermoe_table2={set: {tokens_per_sample: 512, repeats: 2, top_ks: [2, 8], group_counts: [8, 4]}}",
           "hiermoe_calibration={topology: 1x2, args: '--sizes 64K,128K,256K --repeats 2 --warmup 1 --iters 1'}",
           "hiermoe_sim={set: {iterations: 3, warmup: 1, layers: 1, tokens_per_rank: 256}}",
           "hiermoe_swap_measure={set: {repeats: 1, warmup: 0, model: qwen3-30b-a3b-32l-tiny}}",
           "hiermoe_swap_gap={set: {skews: [0.0, 1.0], max_swaps: 4, checkpoints: [1], sim: {tokens_per_rank: 256}}}",
           "scheinfer_sim={set: {decode_tokens: 4, hardware: [rtx4090-pcie4-16core, rtx3090-pcie3-8core]}}",
           "fsmoe={set: {grid_sample: 6, order_sample: 2, order_tries: 50}, ablation_sample: 4, emu: {hidden: 32, ffn_hidden: 64, tokens_per_rank: 64, "
           "repeats: 1, warmup: 0, gradient_elements: 1024}, calibration_args: '--sizes 64K,128K,256K --repeats 2 "
           "--warmup 1 --iters 1 --gemm-tokens 32:128:32 --gemm-dim 64'}"]
DEFAULT_OUTPUTS = tuple(f"results/figures/{name}.{ext}" for name in ("hiermoe_table2", "hiermoe_fig9", "hiermoe_fig10",
                                                   "hiermoe_fig11", "hiermoe_fig12", "hiermoe_fig13",
                                                   "hiermoe_table4", "hiermoe_skew")
                        for ext in ("pdf", "png")) + ("results/figures/hiermoe_report.md",) + tuple(
    f"results/figures/scheinfer_{name}.{ext}" for name in ("speedup", "partition", "timeline") for ext in ("pdf", "png")
) + ("results/figures/scheinfer_report.md",) + tuple(
    f"results/figures/fsmoe_{name}.{ext}" for name in ("fig5", "table2", "table5", "fig6", "fig7", "fig8", "table6", "contention")
    for ext in ("pdf", "png")) + ("results/figures/fsmoe_report.md",)

# Every test here starts snakemake in a subprocess (seconds each): the quick subset leaves them out.
pytestmark = [pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed in this environment"),
              pytest.mark.slow]


def snakemake(workdir, *args, timeout=120):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_plans_the_default_target(tmp_path):
    proc = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for rule in ("hiermoe_table2", "plot_hiermoe_table2", "all"):
        assert rule in out
    for rule in ("emu_layer_bench", "emu_calibration", "cluster_layer_bench", "cluster_scheinfer_bench"):
        assert rule not in out        # `make emu` and the cluster target only


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_dry_run_with_each_profile(tmp_path, profile):
    proc = snakemake(tmp_path, "-n", "--workflow-profile", str(REPO / "workflows/profiles" / profile))
    assert proc.returncode == 0, proc.stderr
    assert "hiermoe_table2" in proc.stdout + proc.stderr


# The workflow runs in the one project environment (README: `make setup` or environment.yml), so
# rules declare no per-rule conda environment; that is the only lint allowed.
ALLOWED_LINT = "Specify a conda environment or container for each rule."


def test_hiermoe_report_includes_the_folders_own_emu_table_else_the_reference(tmp_path):
    """`make emu` writes results/figures/emu_validation.md; the report then takes it (a parameter,
    so the report is rebuilt) without planning the emu jobs again, and the committed reference
    without it."""
    def emu_flag():
        proc = snakemake(tmp_path, "-n", "-p", "results/figures/hiermoe_report.md")
        assert proc.returncode == 0, proc.stderr
        [line] = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "python -m figures.hiermoe_sim" in ln]
        return line.split("--emu-md ")[1].split()[0]

    assert emu_flag() == str(REPO / "figures/reference/emu_validation.md")
    (tmp_path / "results/figures").mkdir(parents=True)
    (tmp_path / "results/figures/emu_validation.md").write_text("# measured\n")
    assert emu_flag() == "results/figures/emu_validation.md"
    proc = snakemake(tmp_path, "-n", "results/figures/hiermoe_report.md", "--quiet", "rules")
    assert proc.returncode == 0 and "emu_layer_bench" not in proc.stdout + proc.stderr


def test_no_rule_declares_its_own_environment():
    """`--sdm conda` would otherwise build a second copy of the one environment for such rules."""
    declaring = [f"{path.name}:{n}" for path in sorted((REPO / "workflows/rules").glob("*.smk"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if line.strip() in ("conda:", "container:")]
    assert not declaring, declaring


def test_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint")
    out = proc.stdout + proc.stderr
    findings = [line.strip()[2:].rstrip(":") for line in out.splitlines() if line.strip().startswith("* ")]
    assert findings and all(f == ALLOWED_LINT.rstrip(".") + "." or f == ALLOWED_LINT for f in findings), out


@pytest.mark.timeout(1500)
def test_default_target_on_reduced_config(tmp_path):
    proc = snakemake(tmp_path, "--cores", "2", "--config", *REDUCED, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    for name in DEFAULT_OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0, name
    pdf = (tmp_path / "results/figures/hiermoe_table2.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/Type3" not in pdf  # TrueType (Type 42), never Type 3
    assert (tmp_path / "results/figures/hiermoe_table2.png").read_bytes().startswith(b"\x89PNG")
    [record_file] = (tmp_path / "results/raw/hiermoe_table2/dedup-analysis/expert-groups").glob("*.json")
    record = json.loads(record_file.read_text())
    validate_record(record)
    assert record_file.stem == record["config_hash"]  # the workflow's name agrees with the run's hash
    assert record["config"]["top_ks"] == [2, 8] and record["tier"] == "sim"
    frame = pd.read_csv(record_file.with_suffix(".csv"))
    assert len(frame) == 2 * 2 * 2 and set(frame["tokens"]) == {512}
    table = (tmp_path / "results/figures/hiermoe_table2.md").read_text()
    assert table.count("\n| 8 |") + table.count("\n| 4 |") == 4
    assert (tmp_path / "results/logs/hiermoe_table2/dedup-analysis/expert-groups" / f"{record_file.stem}.log").exists()
    sim_record = json.loads((tmp_path / "results/raw/scheinfer_sim/sim.json").read_text())
    validate_record(sim_record)
    assert sim_record["tier"] == "sim" and sim_record["config"]["decode_tokens"] == 4
    # everything is up to date afterwards: a second dry run has nothing to do
    again = snakemake(tmp_path, "-n", "--config", *REDUCED)
    out = again.stdout + again.stderr
    assert again.returncode == 0 and "Nothing to be done" in out, out[out.find("Job stats"):]


@pytest.mark.parametrize("override, message", [
    ("hiermoe_table2={set: {top_ks: [2, 300]}}", "top_ks: K=300 is not allowed with num_experts=256; allowed: 1..256"),
    ("hiermoe_table2={set: {group_counts: [3]}}", "group_counts: R=3 does not divide num_experts=256"),
    ("hiermoe_table2={sett: {repeats: 2}}", "Additional properties are not allowed ('sett' was unexpected)"),
    ("hiermoe_table2={set: {repeats: 0}}", "repeats: 0 is not allowed; allowed: 1..100000"),
    ("hiermoe_calibration={backend: mpi}", "'mpi' is not one of ['gloo']"),
    ("scheinfer_sim={set: {routing: random}}", "routing"),
    ("fsmoe={ablation_readings: [per-flop]}", "'per-flop' is not one of ['gemm-per-byte', 'comm-other-unit', 'paper-table2']"),
])
def test_bad_config_fails_while_parsing_with_a_clear_message(tmp_path, override, message):
    """What the workflow needs to plan (schema, the configs that name outputs) fails the parse."""
    proc = snakemake(tmp_path, "-n", "--config", override)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("override, message", [
    ("hiermoe_sim={set: {top_k: 999}}", "top_k: 999 is not allowed with num_experts=128; allowed: 1..128"),
    ("hiermoe_sim={set: {systems: [Megatron-LM, HD5]}}", "HD5 needs d=5 but topology 'hiermoe-testbed' has D = 4"),
    ("hiermoe_sim={set: {systems: ['HierMoE[gamma=abc]']}}", "gamma: expected a number, got 'abc'"),
    ("scheinfer_sim={set: {policies: [layers, vllm]}}", "policies: 'vllm' is not allowed; allowed: layers, fiddler"),
    ("scheinfer_sim={set: {hardware: [a100]}}", "hardware: 'a100' is not allowed; allowed: rtx4090-pcie4-16core"),
    ("fsmoe={set: {fig6: [[A, gpt5]]}}", "fsmoe: fig6: model 'gpt5' is not allowed; allowed: gpt2-xl"),
    ("fsmoe={emu: {num_experts: 3}}", "fsmoe.emu: num_experts: 3 is not divisible by the expert-parallel size 2"),
    ("hiermoe_swap_gap={set: {skews: []}}", "hiermoe_swap_gap.runs.qwen3: skews: the list is empty"),
    ("hiermoe_swap_gap={runs: {deepseek: {set: {sim: {n_group: 3}}}}}",
     "hiermoe_swap_gap.runs.deepseek: ModelConfig 'deepseek-v3-half6': n_group=3 is not allowed"),
])
def test_bad_config_stops_the_run_before_any_job_with_a_clear_message(tmp_path, override, message):
    """The deep checks (models, topologies, systems) run before the first job (the workflow's
    `onstart:` handler, workflows/rules/checks.smk): the run stops there with one line naming
    the config and exit code 2, with no job started and nothing left behind."""
    proc = snakemake(tmp_path, "--cores", "1", "--config", override)
    assert_checks_stopped_the_run(proc, tmp_path, message, BIN / "python")


def assert_checks_stopped_the_run(proc, workdir, message, python):
    """Exit 2 with one line naming the bad input, no job started, and nothing left behind but the
    checks' log, which names the Python they ran with and holds the same line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    [line] = [line for line in out.splitlines() if line.startswith("check_configs: error:")]
    assert message in line
    assert not re.search(r"^(local)?rule \w+:", out, re.M), out[-3000:]          # no job started
    assert [str(p.relative_to(workdir)) for p in (workdir / "results").rglob("*") if p.is_file()] == [CHECK_LOG]
    assert (workdir / CHECK_LOG).read_text().splitlines() == [f"check_configs with {python}", line]
    assert not list((workdir / ".snakemake").glob("locks/*"))


def test_the_checks_run_with_the_python_the_jobs_run(tmp_path):
    """The jobs' commands start `python` from PATH, and so do the checks: with another `python`
    first on PATH (one that cannot import torch), the checks fail in it, in one line, though
    Snakemake's own Python has torch."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker/sitecustomize.py").write_text(NO_TORCH)
    other = tmp_path / "other-bin"
    other.mkdir()
    (other / "python").write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "blocker"}:$PYTHONPATH" exec "{BIN / "python"}" "$@"\n')
    (other / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{other}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path / "run"),
                           "--cores", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert_checks_stopped_the_run(proc, tmp_path / "run", "cannot import the experiments", other / "python")


def test_a_changed_config_reruns_its_experiment_in_the_same_call(tmp_path):
    """After a finished run (faked: the outputs written, then recorded with --touch), a changed
    config value plans the experiment it feeds in that very call, for its changed params: no job
    in front of the experiments reruns for the change and leaves them for the next call
    (workflows/rules/checks.smk)."""
    target = "results/raw/scheinfer_sim/sim.csv"
    for name in (target, "results/raw/scheinfer_sim/sim.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    proc = snakemake(tmp_path, "--touch", "--cores", "1", "--forceall", target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / CHECK_LOG).read_text().splitlines()        # the checks ran first, with PATH's python
    assert log[0] == f"check_configs with {BIN / 'python'}" and log[-1].endswith("experiment configs resolved")

    def planned(*args):
        """{rule: its job's reason} of a dry run."""
        proc = snakemake(tmp_path, "-n", target, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(re.findall(r"^rule (\w+):\n(?:.*\n)*?\s+reason: (.*)$", proc.stdout + proc.stderr, re.M))

    assert planned() == {}
    reasons = planned("--config", "scheinfer_sim={set: {decode_tokens: 7}}")
    assert set(reasons) == {"scheinfer_sim"}, reasons
    assert reasons["scheinfer_sim"].startswith("Params have changed") and "decode_tokens=7" in reasons[
        "scheinfer_sim"], reasons


def test_parsing_the_workflow_imports_no_torch(tmp_path):
    """A dry run of every target with torch made unimportable: the workflow plans without it."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])))
    for target in ("all", "emu_validation", "cluster"):
        proc = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory",
                               str(tmp_path / "run"), "-n", target], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
