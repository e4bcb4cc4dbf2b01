"""Every command line answers a bad option value with one clear line, before any work.

For every CLI (each module under impl/ with a `main` run as a script, found by scanning, plus the
figure scripts and workflows/scripts/compare_results.py) a valid, cheap command line is spoiled
in one place at a time: each flag with bad values of its kind (negative, zero where not allowed,
not a number, NaN / inf, huge, empty, unknown names, missing or directory paths), each `--set`
key of its config dataclass with values of the wrong type or outside the range the field declares
(`impl.common.config.bounded`), unknown `--set` keys and malformed `--set` items. `main(argv)` runs
in this process; each case must end with a non-zero exit status, at most three lines on stderr,
no traceback, the flag or key named, and within a few seconds (a case that starts the real work
has slipped past validation). Hypothesis adds out-of-range numbers, arbitrary text and unknown
keys with a fixed seed (`derandomize=True`).

Guards that keep it so: a CLI without cases here, a flag of a CLI's parser without bad values
here, or a numeric config field without a declared range fails a test.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import re
import signal
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impl.common.config import MAX_EXPERTS, MAX_REPEATS, MAX_TOKENS, MAX_WIDTH, SEED_MAX, bounds_of

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
CASE_LIMIT_S = 20          # a bad value must be refused long before this
FUZZ = settings(derandomize=True, max_examples=6, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


# ==========================================================================================
# finding the CLIs
# ==========================================================================================
def cli_modules() -> list[str]:
    """Every module under impl/ that defines `main` and runs as a script (`__main__.py`, or an
    `if __name__ == "__main__":` block)."""
    found = []
    for path in sorted((ROOT / "impl").rglob("*.py")):
        text = path.read_text()
        if re.search(r"^def main\(", text, re.M) and (path.name == "__main__.py"
                                                       or re.search(r"^if __name__ == .__main__.:", text, re.M)):
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


# ==========================================================================================
# running one command line
# ==========================================================================================
class _TooSlow(BaseException):
    """Raised in the main thread when a case outlives CASE_LIMIT_S (BaseException: no handler
    for Exception swallows it)."""


@contextlib.contextmanager
def _watchdog(seconds: float):
    def alarm(signum, frame):
        raise _TooSlow()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    code: Any
    err: str
    raised: str | None = None


_SCRIPTS: dict[str, types.ModuleType] = {}


def load(module: str) -> types.ModuleType:
    """A module by dotted name, or a script outside the packages by its path."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    if module not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(Path(module).stem, ROOT / module)
        _SCRIPTS[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_SCRIPTS[module])
    return _SCRIPTS[module]


def run_main(module: str, argv: list[str]) -> Outcome:
    """`module.main(argv)` in this process, stdout and stderr captured."""
    main = load(module).main
    out, err = io.StringIO(), io.StringIO()
    raised, code = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with _watchdog(CASE_LIMIT_S):
                code = main(list(argv))
        except SystemExit as e:
            code = e.code
            if isinstance(code, str):          # sys.exit("message"): Python prints it, status 1
                print(code, file=err)
                code = 1
        except _TooSlow:
            raised = f"still running after {CASE_LIMIT_S} s: the bad value was not refused before the work"
        except Exception as e:  # noqa: BLE001 - an escaping exception is what the test reports
            raised = f"raised {type(e).__name__}: {e}"
    return Outcome(code, err.getvalue(), raised)


def problems(o: Outcome, names: list[str]) -> list[str]:
    """What is wrong with how a bad value was answered (empty: answered well). A flag counts as
    named also without its dashes ('profile: ...' for --profile)."""
    names = names + [n.lstrip("-").replace("-", "_") for n in names if n.startswith("--")] + \
        [n.lstrip("-") for n in names if n.startswith("--")]
    if o.raised:
        return [o.raised]
    out = []
    if o.code in (0, None):
        out.append("exit status 0")
    lines = o.err.strip().splitlines()
    if len(lines) > 3:
        out.append(f"{len(lines)} lines on stderr")
    if "Traceback" in o.err:
        out.append("a traceback on stderr")
    if not any(n in o.err for n in names):
        out.append(f"the error does not name {' or '.join(names)}")
    return out


def check_cases(module: str, cases: list[tuple[list[str], list[str]]]) -> None:
    """Run every (argv, names that must appear) case; fail listing every bad answer."""
    failures = []
    for argv, names in cases:
        o = run_main(module, argv)
        if p := problems(o, names):
            failures.append(f"{module} {' '.join(map(repr, argv))}\n    -> {'; '.join(p)}\n    stderr: "
                            f"{o.err.strip()[-600:]!r}")
    assert not failures, f"{len(failures)} bad answer(s):\n" + "\n".join(failures)


# ==========================================================================================
# bad values by kind
# ==========================================================================================
NOT_A_NUMBER = ["abc", "", "nan", "inf", "-inf", "1" + "0" * 30]


def ints(ge: int | None = None, le: int | None = None) -> list[str]:
    """Bad values of an integer flag allowed in [ge, le]."""
    bad = NOT_A_NUMBER + ["1.5"]
    if ge is not None:
        bad += [str(ge - 1), str(ge - 1000)]
    if le is not None:
        bad += [str(le + 1)]
    return bad


def floats(gt: float | None = None, ge: float | None = None) -> list[str]:
    bad = NOT_A_NUMBER[:-1]
    if gt is not None:
        bad += [repr(float(gt)), repr(float(gt) - 1.5)]
    if ge is not None:
        bad += [repr(float(ge) - 0.5)]
    return bad


NAME = ["no-such-name", ""]                 # a name that must exist (topology, model, policy ...)
OUT = ["{dir}", ""]                         # a file to write
IN = ["{missing}", "{dir}", ""]             # a file to read


@dataclass(frozen=True)
class Cli:
    """One command line: a valid base (placeholders filled from the `files` fixture), bad values
    per flag, and the config dataclass its `--set` fills."""

    module: str
    base: tuple[str, ...]
    flags: dict[str, list[str]]
    config: type | None = None
    free: frozenset[str] = frozenset()      # --set keys of free text (any string is a valid value)
    id: str = ""
    unchecked: dict[str, str] = field(default_factory=dict)   # flag -> why it takes any value

    @property
    def name(self) -> str:
        return self.id or self.module


# ==========================================================================================
# the CLIs
# ==========================================================================================
def _ev_config() -> str:
    return str(ROOT / "workflows/config/experiments/emu_validation.yaml")


# the emulated-cluster validation's workload, small (its table's record is made with it)
EV_BENCH = ("--set", "bench.tokens_per_rank=16", "--set", "bench.hidden=16", "--set", "bench.ffn_hidden=8",
            "--set", "bench.repeats=1", "--set", "bench.warmup=0")


CLIS: list[Cli] = [
    Cli("impl.common.calibrate",
        ("--topology", "1x2", "--out", "{tmp}/cal.yaml", "--sizes", "4K,8K", "--repeats", "1", "--warmup", "0",
         "--iters", "1", "--gemm-tokens", "", "--quiet", "--timeout", "30", "--deadline", "60"),
        {"--topology": NAME + ["0x2", "2x0", "-1x2"], "--preset": NAME, "--backend": NAME + ["nccl"],
         "--launcher": NAME + ["env"], "--sizes": ["abc", "0", "-4K", "1M:0:1M", "1M:2M:0", "4K", ""],
         "--repeats": ints(1), "--warmup": ints(0), "--iters": ints(1),
         "--collectives": ["bcast", "a2a,bogus", ""], "--steps": ["inter-9", "bogus", "intra-1x"],
         "--gemm-tokens": ["x", "0", "256", "-256:512:256", "1G:2G:1G"], "--gemm-dim": ints(1, MAX_WIDTH),
         "--gemm-threads": ints(0, 4096), "--out": OUT + ["{tmp}/cal.txt"], "--timeout": floats(gt=0),
         "--deadline": floats(gt=0), "--emulate-rate": ["fast", "", "-1mbit"], "--emulate-burst": ["big", ""],
         "--emulate-latency": ["soon", ""], "--emulate-intra-rate": ["fast", ""]},
        unchecked={"--name": "the profile's name: any text"}),
    Cli("impl.common.emu_cluster", ("run", "--topology", "1x2", "--probe-bytes", "4096", "--repeats", "1",
                                    "--timeout", "30"),
        {"--topology": NAME, "--rate": ["fast", ""], "--burst": ["big", ""], "--latency": ["soon", ""],
         "--intra-rate": ["fast", ""], "--probe-bytes": ints(1, 1 << 34), "--repeats": ints(1, MAX_REPEATS),
         "--timeout": floats(gt=0)}, id="emu_cluster run",
        unchecked={"command": "the command run per rank: any program"}),
    Cli("impl.experiments.layer_bench",
        ("--set", "topology=1x2", "--set", "tokens_per_rank=8", "--set", "repeats=1", "--set", "warmup=0",
         "--set", "hidden=16", "--set", "ffn_hidden=16"),
        {"--out-record": OUT, "--config": IN}, config="layer_bench"),
    Cli("impl.experiments.emu_validation",
        ("overrides", "--config", _ev_config(), "--topology", "2x4", "--routing", "zipf", "--variant", "flat"),
        {"--topology": NAME, "--routing": NAME, "--variant": NAME, "--config": IN, "--profile": IN},
        config="emu_validation", id="emu_validation overrides"),
    Cli("impl.experiments.emu_validation",
        ("table", "--config", _ev_config(), *EV_BENCH, "--record", "{ev_record}", "--profile", "2x4={profile_2x4}",
         "--out-csv", "{tmp}/ev.csv"),
        {"--record": IN + ["{garbage}"], "--profile": ["x", "2x4", "2x4={missing}", "2x4={garbage}", "=x"],
         "--out-csv": OUT, "--config": IN}, config="emu_validation", id="emu_validation table"),
    Cli("impl.experiments.gpu_check", ("device", "--out", "{tmp}/a.json", "--dry-run", "--mib", "1"),
        {"--out": OUT, "--mib": ints(1, 1 << 16)}, id="gpu_check device"),
    Cli("impl.experiments.gpu_check", ("profile", "--out", "{tmp}/d.yaml", "--hardware-out", "{tmp}/h.yaml",
                                       "--dry-run"),
        {"--out": OUT, "--hardware-out": OUT}, id="gpu_check profile"),
    Cli("impl.experiments.gpu_check", ("record", "--dir", "{tmp}", "--out", "{tmp}/e.json", "--dry-run"),
        {"--dir": ["{missing}", "{garbage}", ""], "--stages": IN + ["{garbage}"], "--out": OUT,
         "--command": ["'unbalanced", ""]}, id="gpu_check record"),
    Cli("impl.experiments.fsmoe.degrees",
        ("--set", "samples=2", "--set", "slsqp_samples=0", "--out-csv", "{tmp}/d.csv", "--out-record", "{tmp}/d.json",
         "--no-progress"),
        {"--out-csv": OUT, "--out-record": OUT, "--config": IN}, config="fsmoe_degrees"),
    Cli("impl.experiments.fsmoe.emu",
        ("--profile", "{profile_2x2}", "--set", "tokens_per_rank=8", "--set", "hidden=16", "--set", "ffn_hidden=16",
         "--set", "repeats=1", "--set", "warmup=0", "--set", "r_fwd=1", "--set", "r_bwd=1",
         "--out-csv", "{tmp}/e.csv", "--out-record", "{tmp}/e.json"),
        {"--profile": IN + ["{garbage}", "{profile_1x2}"], "--out-csv": OUT, "--out-record": OUT, "--config": IN},
        config="fsmoe_emu"),
    Cli("impl.experiments.fsmoe.plan", ("--set", "layers=1", "--set", "systems=[DS-MoE]"), {"--config": IN},
        config="fsmoe_plan"),
    Cli("impl.experiments.fsmoe.results",
        ("--part", "table2", "--out-csv", "{tmp}/r.csv", "--out-record", "{tmp}/r.json", "--no-progress"),
        {"--part": NAME, "--out-csv": OUT, "--out-record": OUT, "--config": IN}, config="fsmoe_results"),
    Cli("impl.experiments.hiermoe.scaleout",
        ("--set", "gpus=[32]", "--set", "depths=[2]", "--set", "seeds=1", "--set", "tokens_per_rank=8",
         "--out-csv", "{tmp}/s.csv", "--out-record", "{tmp}/s.json", "--no-progress"),
        {"--out-csv": OUT, "--out-record": OUT, "--config": IN}, config="hiermoe_scaleout"),
    Cli("impl.experiments.hiermoe.sim",
        ("--set", "model=deepseek-v3-tiny", "--set", "topology=2x2", "--set", "profile={profile_2x2}",
         "--set", "tokens_per_rank=256", "--set", "layers=1", "--set", "iterations=1", "--set", "warmup=0",
         "--set", "systems=[Megatron-LM]", "--out-csv", "{tmp}/h.csv", "--out-record", "{tmp}/h.json",
         "--no-progress"),
        {"--out-csv": OUT, "--out-record": OUT, "--config": IN,
         "--variant": ["x", "=a=1", "v=bogus=1", "v=iterations=-1", "v=iterations=1,v=2"]},
        config="hiermoe_sim", free=frozenset({"experiment"})),
    Cli("impl.experiments.hiermoe.swap_measure",
        ("--set", "profile={profile_2x2}", "--set", "model=deepseek-v3-tiny", "--set", "repeats=1", "--set", "warmup=0",
         "--out-csv", "{tmp}/w.csv", "--out-record", "{tmp}/w.json"),
        {"--profile": IN + ["{garbage}", "{profile_1x2}"], "--out-csv": OUT, "--out-record": OUT, "--config": IN},
        config="hiermoe_swap"),
    Cli("impl.experiments.hiermoe.swap_gap",
        ("--set", "sim.model=deepseek-v3-tiny", "--set", "sim.topology=2x2", "--set", "sim.profile={profile_2x2}",
         "--set", "sim.tokens_per_rank=256", "--set", "skews=[0.0]", "--set", "max_swaps=1", "--set", "checkpoints=[1]",
         "--out-csv", "{tmp}/g.csv", "--out-record", "{tmp}/g.json", "--no-progress"),
        {"--out-csv": OUT, "--out-record": OUT, "--config": IN},
        config="hiermoe_swap_gap", free=frozenset({"experiment", "sim.experiment"})),
    Cli("impl.experiments.hiermoe.table2",
        ("--set", "num_experts=8", "--set", "top_ks=[2]", "--set", "group_counts=[2]", "--set", "tokens_per_sample=8",
         "--set", "repeats=1", "--out-csv", "{tmp}/t.csv", "--out-record", "{tmp}/t.json", "--no-progress"),
        {"--out-csv": OUT, "--out-record": OUT, "--config": IN}, config="hiermoe_table2"),
    Cli("impl.experiments.scheinfer.__main__",
        ("generate", "--model", "{gguf}", "--tokens", "1,2", "--n-predict", "1", "--cost", "{cost}", "--threads", "1",
         "--tile", "16", "--gg-mode", "popularity", "--no-progress"),     # a policy that profiles: --calibration-text is read
        {"--model": IN + ["{garbage}"], "--tokens": ["x", "", "-1", "1,,x", "99999999"],
         "--n-predict": ints(1, 1 << 20), "--gpu-mem": ints(0), "--policy": NAME, "--assign": NAME, "--gg-mode": NAME,
         "--threads": ints(1, 4096), "--tile": ints(1, 1 << 20), "--cost": IN + ["{garbage}"],
         "--cpu-kernel": NAME, "--popularity-tokens": ints(0, 1 << 20), "--calibration-text": IN + ["{garbage}"],
         "--timeline": OUT,
         "--out-record": ["{tmp}/g.record.json", "{dir}", ""]},
        id="scheinfer generate", unchecked={"--prompt": "any text (exclusive with --tokens, which the base uses)"}),
    Cli("impl.experiments.scheinfer.__main__",
        ("bench", "--model", "{gguf}", "--prompt-tokens", "2", "--n-predict", "1", "--policies", "fiddler",
         "--cost", "{cost}", "--repeats", "1", "--threads", "1", "--tile", "16", "--out-csv", "{tmp}/b.csv",
         "--out-record", "{tmp}/b.json", "--no-progress"),
        {"--model": IN + ["{garbage}"], "--prompt-tokens": ["x", "", "0", "2,-1", "1" + "0" * 30],
         "--n-predict": ints(1, 1 << 20), "--policies": ["bogus", "", ",", "scheinfer,bogus"],
         "--llamacpp-offload": ["auto", "ngl=x", "bogus"], "--gpu-mem": ints(0), "--assign": NAME, "--gg-mode": NAME,
         "--threads": ints(1, 4096), "--tile": ints(1, 1 << 20), "--cost": IN + ["{garbage}"], "--cpu-kernel": NAME,
         "--gpu-matmul": NAME + ["fp16"], "--repeats": ints(1, MAX_REPEATS), "--deadline-s": floats(gt=0),
         "--popularity-tokens": ints(0, 1 << 20), "--calibration-text": IN + ["{garbage}"],
         "--out-csv": OUT, "--out-record": OUT},
        id="scheinfer bench"),
    Cli("impl.experiments.scheinfer.__main__", ("calibrate", "--quick", "--out", "{tmp}/cost.json"),
        {"--out": OUT, "--hidden": ints(1, 1 << 16), "--widths": ["x", "", "0", "64,-1"],
         "--rows": ["x", "", "0", "1,-1"]}, id="scheinfer calibrate"),
    Cli("impl.experiments.scheinfer.sim",
        ("--set", "models=[llama2-7b]", "--set", "hardware=[rtx3090-pcie3-8core]", "--set", "policies=[layers]",
         "--set", "prompt_tokens=4", "--set", "decode_tokens=2", "--out-csv", "{tmp}/si.csv",
         "--out-record", "{tmp}/si.json"),
        {"--out-csv": OUT, "--out-record": OUT, "--config": IN}, config="scheinfer_sim",
        free=frozenset({"experiment"})),
    Cli("impl.hiermoe.plan",
        ("--topology", "2x2", "--synthetic", "uniform", "--num-experts", "8", "--top-k", "2", "--tokens-per-rank", "8"),
        {"--topology": NAME, "--trace": IN + ["{garbage}"], "--synthetic": NAME,
         "--num-experts": ints(1, MAX_EXPERTS) + ["6"], "--top-k": ints(1, MAX_EXPERTS) + ["9"],
         "--tokens-per-rank": ints(1, MAX_TOKENS), "--seed": ints(0, SEED_MAX), "--skew": floats(ge=0),
         "--step": ints(0), "--layer": ints(0), "--hidden": ints(1, MAX_WIDTH),
         "--dtype": NAME, "--profile": NAME + ["{garbage}", "{profile_1x2}"]}),
    Cli("impl.scheinfer.generate_models", ("--kind", "llama", "--out", "{tmp}/gm.gguf"),
        {"--kind": NAME, "--out": ["", "{garbage}"], "--dtype": NAME, "--seed": ints(0, SEED_MAX),
         "--set": ["hidden", "hidden=x", "hidden=-8", "hidden=0", "bogus=4", "=4", "hidden=100000000000",
                   "num_layers=100000000", "vocab_size=-1"]}),
    # figure scripts and the result comparison: their inputs are files
    Cli("figures.emu_validation", ("--csv", "{garbage}", "--out", "{tmp}/f.pdf", "--out-md", "{tmp}/f.md"),
        {"--csv": IN, "--out": OUT, "--out-md": OUT, "--notes": IN},
        unchecked={"--baseline": "a variant of the CSV, checked when the CSV is read"}),
    Cli("figures.fsmoe", ("--grid", "{garbage}", "--statistic", "{garbage}", "--table2", "{garbage}", "--models",
                          "{garbage}", "--out-dir", "{tmp}/fs"),
        {"--grid": IN, "--statistic": IN, "--table2": IN, "--models": IN, "--ablation-grids": IN,
         "--ablation-models": IN, "--ablation-table2": IN, "--links": IN, "--order": IN, "--degrees": IN, "--emu": IN,
         "--profile": IN,
         "--out-dir": ["{garbage}", ""]}),
    Cli("figures.hiermoe_fig9", ("--profile", "{garbage}", "--out", "{tmp}/f9", "--out-md", "{tmp}/f9.md"),
        {"--profile": IN, "--out": OUT, "--out-md": OUT}),
    Cli("figures.hiermoe_scaleout", ("--csv", "{garbage}", "--out", "{tmp}/fs", "--out-md", "{tmp}/fs.md"),
        {"--csv": IN, "--out": OUT, "--out-md": OUT}),
    Cli("figures.hiermoe_sim", tuple(x for k in ("--qwen3", "--deepseek", "--deepseek-ablation", "--node", "--table4", "--ablation",
                                                 "--ablation-persistent", "--ablation-long", "--ablation-long-persistent", "--skew", "--swap", "--swap-gap")
                                     for x in (k, "{garbage}")) + ("--out-dir", "{tmp}/hs"),
        {k: IN for k in ("--qwen3", "--deepseek", "--deepseek-ablation", "--node", "--table4", "--ablation", "--ablation-persistent",
                         "--ablation-long", "--ablation-long-persistent", "--skew", "--swap", "--swap-gap", "--table2-csv", "--table2-md", "--fig9-md",
                         "--emu-md")}
        | {"--out-dir": ["{garbage}", ""]}),
    Cli("figures.hiermoe_table2", ("--csv", "{garbage}", "--out-pdf", "{tmp}/t.pdf", "--out-png", "{tmp}/t.png",
                                   "--out-md", "{tmp}/t.md"),
        {"--csv": IN, "--out-pdf": OUT, "--out-png": OUT, "--out-md": OUT}),
    Cli("figures.scheinfer_sim", ("--sim", "{garbage}", "--timeline", "{garbage}", "--out-dir", "{tmp}/ss"),
        {"--sim": IN, "--timeline": IN, "--timeline-log": IN, "--gpu-bench": IN, "--gpu-bench-record": IN,
         "--gpu-hardware": IN, "--out-dir": ["{garbage}", ""]},
        unchecked={"--timeline-model": "a caption's words"}),
    Cli("workflows/scripts/compare_results.py", ("{dir}", "{dir}"),
        {"old": ["{missing}", "{garbage}", ""], "new": ["{missing}", "{garbage}", ""], "--rtol": floats(ge=0)},
        unchecked={"--ignore": "column names; unknown ones are ignored"}),
]


def _config_classes() -> dict[str, type]:
    from impl.experiments.emu_validation import EmuValidationConfig
    from impl.experiments.fsmoe.degrees import DegreeStudyConfig
    from impl.experiments.fsmoe.emu import EmuConfig
    from impl.experiments.fsmoe.plan import PlanConfig
    from impl.experiments.fsmoe.results import ResultsConfig
    from impl.experiments.hiermoe.scaleout import ScaleoutConfig
    from impl.experiments.hiermoe.sim import SimExperimentConfig
    from impl.experiments.hiermoe.swap_gap import SwapGapConfig
    from impl.experiments.hiermoe.swap_measure import SwapMeasureConfig
    from impl.experiments.hiermoe.table2 import Table2Config
    from impl.experiments.layer_bench import LayerBenchConfig
    from impl.experiments.scheinfer.sim import SimConfig

    return {"layer_bench": LayerBenchConfig, "emu_validation": EmuValidationConfig, "fsmoe_degrees": DegreeStudyConfig,
            "fsmoe_emu": EmuConfig, "fsmoe_plan": PlanConfig, "fsmoe_results": ResultsConfig,
            "hiermoe_scaleout": ScaleoutConfig, "hiermoe_sim": SimExperimentConfig, "hiermoe_swap": SwapMeasureConfig,
            "hiermoe_swap_gap": SwapGapConfig,
            "hiermoe_table2": Table2Config, "scheinfer_sim": SimConfig}


def config_of(c: Cli) -> type | None:
    return _config_classes()[c.config] if c.config else None


# ==========================================================================================
# fixtures: no emulated network, the files the valid command lines need
# ==========================================================================================
@pytest.fixture(autouse=True, scope="module")
def contained(tmp_path_factory):
    """A case that slips past validation runs on loopback ranks, never on network namespaces, and
    writes what it writes into a scratch working directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("impl.common.emu_cluster.unavailable_reason", lambda: "network namespaces are off in these tests")
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from impl.common.costmodel import HardwareProfile, LinearModel, save_profile
    from impl.scheinfer.generate_models import generate
    from impl.scheinfer.partition import REFERENCE_COST

    d = tmp_path_factory.mktemp("fuzz_cli")
    (d / "dir").mkdir()
    garbage = d / "garbage.txt"
    garbage.write_text("\x00\x01 not what any reader expects {[\n")
    cost = d / "cost.json"
    cost.write_text(json.dumps({"cost": json.loads(REFERENCE_COST.to_json())}))
    models = {(kind, step): LinearModel(0.05, 1e-6) for kind in ("a2a", "allgather", "reducescatter", "allreduce")
              for step in ("flat", "inter-1", "intra-1")}
    profiles = {}
    for topo in ("2x2", "2x4", "1x2"):
        comm = {k: m for k, m in models.items() if topo != "1x2" or k[1] == "flat"}
        profiles[topo] = save_profile(HardwareProfile(f"fuzz-{topo}", topo, "test constants", comm=comm,
                                                      compute={"gemm": LinearModel(0.01, 1e-9, work_unit="mac")}),
                                      d / f"profile-{topo}.yaml")
    return {"tmp": str(d), "dir": str(d / "dir"), "missing": str(d / "missing" / "nothing.yaml"),
            "garbage": str(garbage), "cost": str(cost), "gguf": str(generate("mixtral", d / "m.gguf", seed=2)),
            "profile_2x2": str(profiles["2x2"]), "profile_2x4": str(profiles["2x4"]),
            "profile_1x2": str(profiles["1x2"]), "ev_record": str(_emu_validation_record(d / "ev-record.json"))}


def _emu_validation_record(path: Path) -> Path:
    """A layer bench record of one cell of the emulated-cluster validation (flat on 2x4, zipf),
    measured on SimComm ranks for speed and labelled as the matrix's emu run, so that the table's
    command line is valid."""
    from impl.common.config import to_dict
    from impl.common.emu_cluster import NetworkConfig
    from impl.common.records import write_record
    from impl.experiments import emu_validation as ev
    from impl.experiments import layer_bench as lb

    cfg = ev.load(_ev_config(), [item for item in EV_BENCH if item != "--set"])
    cell = ev.bench_config(cfg, "2x4", "zipf", "flat", None)
    rb = lb.validate(dataclasses.replace(cell, tier="sim", network=NetworkConfig()), with_profile=False)
    per_rank, where = lb.run(rb)
    record = lb.make_bench_record(rb, per_rank, where)
    return write_record(path, {**record, "tier": "emu", "config": to_dict(cell)})


def fill(items, files: dict[str, str]) -> list[str]:
    return [s.format(**files) for s in items]


def with_flag(c: Cli, files: dict, flag: str, value: str) -> list[str]:
    """The base command line with `flag` set to `value` (replacing the base's value, or added)."""
    argv = fill(c.base, files)
    value = value.format(**files)
    if not flag.startswith("-"):                          # a positional: replace the first that takes it
        positions = {"old": 0, "new": 1}
        argv[positions[flag]] = value
        return argv
    if flag in argv:
        i = argv.index(flag)
        argv[i + 1] = value
        return argv
    return argv + [flag, value]


# ==========================================================================================
# the guards
# ==========================================================================================
def test_every_cli_has_fuzz_cases():
    covered = {c.module for c in CLIS}
    missing = [m for m in cli_modules() if m not in covered]
    assert not missing, f"CLIs without fuzz cases in {Path(__file__).name}: {', '.join(missing)}"
    assert len(cli_modules()) >= 17


def _parsers_of(c: Cli) -> list[argparse.ArgumentParser]:
    """The parsers `main` builds, caught while it answers --help."""
    made: list[argparse.ArgumentParser] = []
    plain = argparse.ArgumentParser.__init__

    def init(self, *args, **kwargs):
        plain(self, *args, **kwargs)
        made.append(self)

    sub = [a for a in c.base[:1] if not a.startswith("-") and "{" not in a]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "__init__", init)
        run_main(c.module, sub + ["--help"])
    prog = " ".join(["python -m", c.module.removesuffix(".__main__"), *sub])
    chosen = [p for p in made if p.prog == prog or (sub and p.prog.endswith(" " + sub[0]))]
    return chosen or made[:1]


def _value_flags(p: argparse.ArgumentParser) -> set[str]:
    out = set()
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.nargs == 0:
            continue
        out.add(max(a.option_strings, key=len) if a.option_strings else a.dest)
    return out


@pytest.mark.parametrize("c", CLIS, ids=lambda c: c.name)
def test_every_flag_has_bad_values(c):
    flags = set().union(*(_value_flags(p) for p in _parsers_of(c)))
    known = set(c.flags) | set(c.unchecked) | ({"--set"} if c.config else set())
    assert flags - known == set(), f"{c.name}: flags without bad values here: {sorted(flags - known)}"
    assert set(c.flags) - flags == set(), f"{c.name}: no such flags: {sorted(set(c.flags) - flags)}"


def _fields(cls: type, prefix: str = ""):
    """(dotted key, annotation, Field) of every field of a config dataclass, nested ones too."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = prefix + f.name, hints[f.name]
        yield key, tp, f
        inner = _base_type(tp)
        if dataclasses.is_dataclass(inner):
            yield from _fields(inner, key + ".")


def _base_type(tp):
    """The annotation without `| None`."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _numeric(tp) -> bool:
    tp = _base_type(tp)
    if tp in (int, float):
        return True
    if get_origin(tp) in (tuple, list):
        return any(_numeric(a) for a in get_args(tp) if a is not Ellipsis)
    if get_origin(tp) is dict:
        return _numeric(get_args(tp)[1])
    return False


@pytest.mark.parametrize("name", sorted(_config_classes()))
def test_every_numeric_config_field_declares_its_range(name):
    cls = _config_classes()[name]
    undeclared = [key for key, tp, f in _fields(cls) if _numeric(tp) and bounds_of(f) is None]
    assert not undeclared, (f"{cls.__name__}: numeric fields without a range (declare it with "
                            f"impl.common.config.bounded): {', '.join(undeclared)}")


# ==========================================================================================
# bad flag values
# ==========================================================================================
FLAG_CASES = [(c, flag) for c in CLIS for flag in sorted(c.flags) if c.flags[flag]]


@pytest.mark.parametrize("c,flag", FLAG_CASES, ids=lambda x: x.name if isinstance(x, Cli) else x)
def test_bad_flag_value(c, flag, files):
    names = [flag] if flag.startswith("-") else [flag, "{missing}", "{garbage}"]
    # a `--set FIELD=VALUE` flag may name the field instead
    check_cases(c.module, [(with_flag(c, files, flag, v), [n.format(**files) for n in names]
                            + ([v.split("=")[0]] if flag == "--set" and "=" in v[1:] else []))
                           for v in c.flags[flag]])


def _int_flags():
    for c, flag in FLAG_CASES:
        if c.flags[flag] and "1.5" in c.flags[flag]:
            yield c, flag


@pytest.mark.parametrize("c,flag", list(_int_flags()), ids=lambda x: x.name if isinstance(x, Cli) else x)
def test_random_out_of_range_integers(c, flag, files):
    """Integers below the smallest bad value listed, above the largest, and arbitrary text."""
    listed = [int(v) for v in c.flags[flag] if re.fullmatch(r"-?\d{1,20}", v)]
    below = min(listed) if listed else None
    above = max((v for v in listed if v > 0), default=None)
    parts = [st.text(max_size=8).filter(lambda s: not re.fullmatch(r"\s*[+-]?\d+\s*", s) and not s.startswith("-"))]
    if below is not None and below < 0:
        parts.append(st.integers(max_value=below))
    if above is not None:
        parts.append(st.integers(min_value=above))

    @FUZZ
    @given(st.one_of(parts))
    def bad_value(value):
        check_cases(c.module, [(with_flag(c, files, flag, str(value)), [flag])])

    bad_value()


# ==========================================================================================
# bad --set values
# ==========================================================================================
def _outside(b, step: float) -> list[float]:
    """Numbers just outside a declared range, and one far below it."""
    if b is None:
        return []
    out = []
    if b.ge is not None or b.gt is not None:
        low = b.ge - step if b.ge is not None else b.gt
        out += [low, low - 1000]
    if b.le is not None or b.lt is not None:
        out.append(b.le + step if b.le is not None else b.lt)
    return out


def _yaml_number(v: float, tp) -> str:
    return str(int(v)) if tp is int else repr(float(v))


def set_values(tp, f: dataclasses.Field, is_name: bool) -> list[str]:
    """YAML texts that are not a valid value of a field of annotation `tp`."""
    tp = _base_type(tp)
    origin = get_origin(tp)
    b = bounds_of(f)
    if tp is int or tp is float:
        bad = ["abc", "true", "[1]", "{a: 1}"]
        bad += ["1.5", str(10**30)] if tp is int else [".nan", ".inf", "-.inf", "1.0e+400"]
        return bad + [_yaml_number(v, tp) for v in _outside(b, 1 if tp is int else 0.5)]
    if tp is bool:
        return ["maybe", "2"]
    if tp is str:
        return ["[1, 2]", "{a: 1}"] + (["no-such-name"] if is_name else [])
    if origin is Literal:
        return ["no-such-choice", "5"]
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        item = _base_type(args[0]) if args else Any
        bad = ["5", "{a: 1}"]
        if item in (int, float):
            bad += ["[abc]"] + [f"[{_yaml_number(v, item)}]" for v in _outside(b, 1 if item is int else 0.5)]
        elif item is str:
            bad += ["[[1]]"] + (["[no-such-name]"] if is_name else [])
        return bad
    if origin is dict or dataclasses.is_dataclass(tp):
        return ["5", "[1, 2]"]
    return []


SET_CASES = [(c, key) for c in CLIS if c.config for key, _, _ in _fields(config_of(c))]


@pytest.mark.parametrize("c,key", SET_CASES, ids=lambda x: x.name if isinstance(x, Cli) else x)
def test_bad_set_value(c, key, files):
    tp, f = next((tp, f) for k, tp, f in _fields(config_of(c)) if k == key)
    values = set_values(tp, f, is_name=key not in c.free)
    names = [key, key.rsplit(".", 1)[-1]]
    check_cases(c.module, [(fill(c.base, files) + ["--set", f"{key}={v}"], names) for v in values])


def _outside_strategy(tp, b):
    """Hypothesis: numbers of annotation `tp` outside range `b`, as YAML numbers."""
    kind = _base_type(tp)
    parts = []
    low = b.ge if b.ge is not None else b.gt
    high = b.le if b.le is not None else b.lt
    if kind is int:
        if low is not None:
            parts.append(st.integers(max_value=int(low) - 1 if b.ge is not None else int(low)))
        if high is not None:
            parts.append(st.integers(min_value=int(high) + 1 if b.le is not None else int(high)))
        return st.one_of(parts).map(str)
    if low is not None:
        parts.append(st.floats(max_value=low, exclude_max=b.ge is not None, allow_nan=False, allow_infinity=False))
    if high is not None:
        parts.append(st.floats(min_value=high, exclude_min=b.le is not None, allow_nan=False, allow_infinity=False))
    return st.one_of(parts).map(lambda v: f"{v:.17e}")      # YAML reads a float only with a dot


@pytest.mark.parametrize("c", [c for c in CLIS if c.config], ids=lambda c: c.name)
def test_random_out_of_range_set_values(c, files):
    """Random numbers outside each numeric field's declared range (one field per example)."""
    cases = [(key, _outside_strategy(tp, bounds_of(f))) for key, tp, f in _fields(config_of(c))
             if _base_type(tp) in (int, float) and bounds_of(f) is not None]
    base = fill(c.base, files)

    @FUZZ
    @given(st.sampled_from(cases).flatmap(lambda kv: st.tuples(st.just(kv[0]), kv[1])))
    def bad_value(item):
        key, value = item
        check_cases(c.module, [(base + ["--set", f"{key}={value}"], [key, key.rsplit(".", 1)[-1]])])

    bad_value()


def _system_option_cases() -> list[tuple[str, list[str]]]:
    """`NAME[key=value]` system options: every option of the HierMoE systems with bad values of
    its type and range, unknown options and malformed names (and what the error must name)."""
    from impl.experiments.hiermoe.spec import HierMoEOptions

    cases = []
    for key, tp, f in _fields(HierMoEOptions):
        for value in set_values(tp, f, is_name=True):
            if not any(ch in value for ch in ",[]{}"):        # the NAME[...] syntax cannot hold these
                cases.append((f"HierMoE[{key}={value}]", [key]))
    cases += [("HierMoE[gamma]", ["gamma"]), ("HierMoE[=1]", ["HierMoE"]), ("HierMoE[", ["HierMoE"]),
              ("HierMoE[nope=1]", ["nope"]), ("Megatron-LM[gamma=abc]", ["gamma"])]
    return cases


@pytest.mark.parametrize("system,names", _system_option_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_system_option_value(system, names, files):
    c = next(c for c in CLIS if c.module == "impl.experiments.hiermoe.sim")
    check_cases(c.module, [(fill(c.base, files) + ["--set", f"systems=[{json.dumps(system)}]"], names)])


@pytest.mark.parametrize("c", [c for c in CLIS if c.config], ids=lambda c: c.name)
def test_unknown_and_malformed_set_items(c, files):
    cls = config_of(c)
    keys = {k for k, _, _ in _fields(cls)}
    sections = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    base = fill(c.base, files)
    cases = [(base + ["--set", item], [item.split("=")[0] or item, "--set"])
             for item in ["novalue", "=5", "a..b=1", ".a=1"]]
    cases += [(base + ["--set", f"{s}.no_such_key=1"], ["no_such_key"]) for s in sections]
    check_cases(c.module, cases)

    @FUZZ
    @given(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True).filter(lambda k: k not in keys))
    def unknown_key(key):
        check_cases(c.module, [(base + ["--set", f"{key}=1"], [key])])

    unknown_key()


# ==========================================================================================
# the cases that were once answered with a traceback, a wrong reason or not at all
# ==========================================================================================
@pytest.mark.parametrize("module,argv,names", [
    ("impl.experiments.layer_bench", ["--set", "hidden=-8"], ["hidden"]),
    ("impl.experiments.layer_bench", ["--set", "hidden=0"], ["hidden"]),
    ("impl.experiments.layer_bench", ["--set", "ffn_hidden=0"], ["ffn_hidden"]),
    ("impl.experiments.layer_bench", ["--set", "timeout_s=0"], ["timeout_s"]),
    ("impl.experiments.layer_bench", ["--set", "num_experts=-4"], ["num_experts"]),
    ("impl.experiments.layer_bench", ["--set", "tier=cluster"], ["RANK", "torchrun"]),
    ("impl.common.calibrate", ["--topology", "1x2", "--launcher", "env", "--out", "p.yaml"], ["RANK", "torchrun"]),
    ("impl.common.calibrate", ["--topology", "9x9", "--out", "p.yaml"], ["--topology", "G <= 64"]),
    ("impl.common.calibrate", ["--topology", "1x2", "--emulate-burst", "32kb", "--out", "p.yaml"],
     ["--emulate-burst", "--emulate-rate"]),
    ("impl.common.calibrate", ["--topology", "1x2", "--emulate-lat", "5ms", "--out", "p.yaml"], ["--emulate-lat"]),
    ("impl.experiments.layer_bench", ["--out-record", "/proc/r.json"], ["--out-record", "not writable"]),
    ("impl.experiments.hiermoe.sim", ["--set", 'systems=["HierMoE[gamma=abc]"]', "--out-csv", "x.csv",
                                      "--out-record", "x.json"], ["gamma"]),
    ("impl.experiments.hiermoe.sim", ["--set", 'systems=["HierMoE[gamma=-1]"]', "--out-csv", "x.csv",
                                      "--out-record", "x.json"], ["gamma"]),
    ("impl.experiments.hiermoe.sim", ["--set", 'systems=["HierMoE[every=0]"]', "--out-csv", "x.csv",
                                      "--out-record", "x.json"], ["every"]),
    ("impl.experiments.hiermoe.sim", ["--set", 'systems=["HierMoE[bogus=1]"]', "--out-csv", "x.csv",
                                      "--out-record", "x.json"], ["bogus"]),
    ("impl.experiments.hiermoe.sim", ["--set", 'systems=["NoSuchSystem"]', "--out-csv", "x.csv",
                                      "--out-record", "x.json"], ["NoSuchSystem"]),
], ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_known_bad_cases(module, argv, names, monkeypatch):
    for var in JOB_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    check_cases(module, [(argv, names)])


JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID")


@pytest.mark.parametrize("env,names", [
    ({"RANK": "0"}, ["WORLD_SIZE"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["MASTER_ADDR"]),
    ({"RANK": "0", "WORLD_SIZE": "x", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, ["WORLD_SIZE"]),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, ["WORLD_SIZE", "G = 2"]),
], ids=lambda x: ",".join(x) if isinstance(x, dict) else "")
@pytest.mark.parametrize("module,argv", [
    ("impl.common.calibrate", ["--topology", "1x2", "--launcher", "env", "--out", "p.yaml"]),
    ("impl.experiments.layer_bench", ["--set", "tier=cluster", "--set", "topology=1x2"]),
], ids=["calibrate", "layer_bench"])
def test_job_environment_is_checked_before_joining(module, argv, env, names, monkeypatch):
    """A job environment that is incomplete or does not match the topology: one line naming the
    variable, before anything tries to rendezvous (which would wait for ranks that never come)."""
    for var in JOB_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    check_cases(module, [(argv, names)])


@pytest.mark.slow
@pytest.mark.parametrize("c", [c for c in CLIS if not c.module.startswith("figures.")], ids=lambda c: c.name)
def test_every_base_command_line_is_valid(c, files, monkeypatch):
    """What the cases spoil is a command line that works: a case fails for its own bad value, not
    for another (the figure scripts' bases read placeholder files and are left out)."""
    import torch

    monkeypatch.setattr(sys.modules[__name__], "CASE_LIMIT_S", 300)
    threads = torch.get_num_threads()            # --threads 1 of a base sets it for the process
    try:
        o = run_main(c.module, fill(c.base, files))
    finally:
        torch.set_num_threads(threads)
    assert o.code == 0 and not o.raised, (o.raised, o.err[-800:])
