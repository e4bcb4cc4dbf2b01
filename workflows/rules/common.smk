# Shared helpers of the workflow: config validation and the paths and overrides every rule
# needs. Functions only; rules live in the per-paper files.
import importlib.util
import json
import shlex
from pathlib import Path

import yaml
from snakemake.utils import validate

from impl.common.config import build_config
from impl.common.topology import get_topology
from impl.experiments import emu_validation_config as emu_val
from impl.experiments.layer_bench_config import LayerBenchConfig


def _numbers_typed(value):
    """`--config` delivers nested values as strings ('4', not 4): strings that read as a number
    or a boolean become one before the schema checks the config; other strings stay strings."""
    if isinstance(value, dict):
        return {key: _numbers_typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers_typed(item) for item in value]
    if isinstance(value, str):
        try:
            read = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return read if isinstance(read, (bool, int, float)) else value
    return value


config.update(_numbers_typed(dict(config)))
validate(config, schema="../schemas/config.schema.yaml")

# The repository: where the shipped inputs (experiment configs, papers' numbers) live.
REPO = Path(workflow.basedir)


def repo_path(relative):
    """A path from the config, relative to the repository unless it is absolute."""
    path = Path(relative)
    return str(path if path.is_absolute() else REPO / path)


def _load_code_inputs():
    """workflows/scripts/code_inputs.py, loaded by path (the workflows folder is no package)."""
    spec = importlib.util.spec_from_file_location("code_inputs", REPO / "workflows/scripts/code_inputs.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded.CodeInputs(REPO)


# code_inputs("impl.experiments.scheinfer.sim", ...): the repository's Python files a job runs,
# the modules it names and every project module they import (workflows/scripts/code_inputs.py).
# Every rule that runs our code lists them as its input `code`, so the job reruns when the code
# changes (like any other input: by time, and by content once a run has recorded it); Snakemake's
# own `code` trigger sees only the rule's shell text.
code_inputs = _load_code_inputs()


def experiment_config(name):
    """The experiment YAML of one experiment entry of the config."""
    return repo_path(config[name]["config"])


def typed(value):
    """`--config` delivers nested values as strings ('2', not 2): re-read every string as YAML,
    which is also how the experiment CLIs read `--set` values, so both routes agree."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    if isinstance(value, list):
        return [typed(item) for item in value]
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    return value


def overrides_of(mapping):
    """A `set:` mapping as `key=value` strings (nested keys dotted, values as JSON, which parses
    as YAML), in the form the experiment CLIs take after --set."""

    def flatten(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from flatten(f"{prefix}{key}.", item)
        else:
            yield f"{prefix[:-1]}={json.dumps(typed(value))}"

    return list(flatten("", mapping or {}))


def experiment_overrides(name):
    """The overrides of one experiment entry of the config."""
    return overrides_of(config[name].get("set", {}))


def as_flags(items):
    """Overrides as shell-quoted `--set key=value` flags."""
    return " ".join(f"--set {shlex.quote(item)}" for item in items)


def set_flags(name):
    return as_flags(experiment_overrides(name))


def paper_csv(name):
    """The papers' reported numbers for one figure or table (figures/paper/<name>.csv)."""
    return repo_path(f"figures/paper/{name}.csv")


def calibration_profile():
    """The profile our calibration rule writes for the configured topology and backend."""
    entry = config["hiermoe_calibration"]
    return f"resources/calibration/{entry['topology']}-{entry['backend']}.yaml"


def run_overrides(name, run):
    """One run of an experiment entry with `runs`: the run's own overrides, then the ones for every run."""
    entry = config[name]
    return overrides_of(entry["runs"][run].get("set", {})) + overrides_of(entry.get("set", {}))


SIM_RUNS = config["hiermoe_sim"]["runs"]


def sim_overrides(run):
    return run_overrides("hiermoe_sim", run)


# The swap-gap sweeps (one per model): results/raw/hiermoe_swap_gap/<run>.csv.
SWAP_GAP_RUNS = config["hiermoe_swap_gap"]["runs"]


def swap_gap_checks():
    """The deep checks of every swap-gap sweep (part of `config_checks`)."""
    return [{"name": f"hiermoe_swap_gap.runs.{run}", "kind": "hiermoe_swap_gap",
             "config": repo_path(SWAP_GAP_RUNS[run]["config"]), "set": run_overrides("hiermoe_swap_gap", run)}
            for run in SWAP_GAP_RUNS]


def sim_variants(run):
    """(name, overrides) of every variant of a run (a sweep run in one process), or [] for a plain run."""
    return [(name, overrides_of(mapping)) for name, mapping in (SIM_RUNS[run].get("variants") or {}).items()]


def sim_variant_flags(run):
    """--variant NAME=MAPPING flags of a run, shell-quoted (the mapping as JSON)."""
    flags = []
    for name, mapping in (SIM_RUNS[run].get("variants") or {}).items():
        flags += ["--variant", shlex.quote(f"{name}={json.dumps(typed(mapping))}")]
    return " ".join(flags)


def sim_run_checks():
    """The deep checks of every sim run, each variant's too (part of `config_checks`)."""
    return [{"name": f"hiermoe_sim.runs.{run}" + (f".variants.{name}" if name else ""), "kind": "hiermoe_sim",
             "config": repo_path(SIM_RUNS[run]["config"]), "set": variant + sim_overrides(run)}
            for run in SIM_RUNS for name, variant in sim_variants(run) or [("", [])]]


# ScheInfer ------------------------------------------------------------------------------------

SCHEINFER_TIMELINE = config["scheinfer_timeline"]


# A ScheInfer bench measured on a GPU (workflows/scripts/GPU_RUN.md), once committed: the report
# shows it beside the paper and the sim tier's prediction.
SCHEINFER_GPU_EVIDENCE = ("figures/reference/scheinfer_gpu_bench.csv", "figures/reference/scheinfer_gpu_bench.json",
                          "figures/reference/scheinfer_gpu_hardware.yaml")


def scheinfer_gpu_evidence():
    """The committed GPU bench's three files, or none while any is missing."""
    paths = [repo_path(p) for p in SCHEINFER_GPU_EVIDENCE]
    return paths if all(Path(p).is_file() for p in paths) else []


# The emulated-cluster table the HierMoE report includes: this results folder's own (`make emu`)
# when it has one, else the committed reference run. A parameter of the report's rule, so the
# choice changing rebuilds the report (and `make emu` rebuilds it at once).
EMU_TABLE = "results/figures/emu_validation.md"
EMU_REFERENCE_TABLE = "figures/reference/emu_validation.md"


def emu_table():
    return EMU_TABLE if Path(EMU_TABLE).is_file() else repo_path(EMU_REFERENCE_TABLE)


def scheinfer_sim_config():
    """The ScheInfer sim config (keys and types; its models, hardware and policies are resolved
    before any job starts, checks.smk)."""
    from impl.experiments.scheinfer.sim_config import SimConfig

    return build_config(SimConfig, experiment_config("scheinfer_sim"), experiment_overrides("scheinfer_sim"))


def scheinfer_tiny_hidden():
    """Hidden size of the small generated model the timeline runs (the calibration's width)."""
    from impl.scheinfer.config import tiny_config

    return tiny_config(SCHEINFER_TIMELINE["kind"], **SCHEINFER_TIMELINE["model_set"]).hidden


def scheinfer_timeline_model():
    """Caption of the timeline's model: its kind and widths."""
    cfg = SCHEINFER_TIMELINE
    widths = ", ".join(f"{k} {v}" for k, v in cfg["model_set"].items())
    return f"small generated {cfg['kind']}-structured ({widths})" if widths else f"small generated {cfg['kind']}-structured"


def scheinfer_model_flags():
    """--set flags of generate_models for the timeline's model."""
    return " ".join(f"--set {k}={v}" for k, v in SCHEINFER_TIMELINE["model_set"].items())


def scheinfer_prompt_ids():
    """Token ids 1..prompt_tokens: the timeline's prompt (ids only matter for timing)."""
    return ",".join(str(i) for i in range(1, SCHEINFER_TIMELINE["prompt_tokens"] + 1))


# Emulated cluster (workflows/rules/emu.smk) ----------------------------------------------------

# The matrix's config now (its keys and types); every run's bench config before any job (checks.smk).
EMU = emu_val.load_config(experiment_config("emu_validation"), experiment_overrides("emu_validation"))
EMU_DIR = "results/raw/emu_validation"
EMU_RUNS = [(t, r, v, i) for t in EMU.topologies for r in EMU.routings for v in EMU.variants for i in range(EMU.runs)]


def emu_profile(topology):
    """The emulated cluster's own calibration, from which the model predicts and d* is chosen."""
    return f"{EMU_DIR}/calibration/{topology}.yaml"


def emu_calibration_flags():
    net, c = EMU.network, EMU.calibration
    flags = [f"--emulate-rate {net.rate}", f"--emulate-burst {net.burst}", f"--emulate-latency {net.latency}",
             f"--sizes {c.sizes}", f"--repeats {c.repeats}", f"--warmup {c.warmup}", f"--iters {c.iters}"]
    if net.intra_rate:
        flags.append(f"--emulate-intra-rate {net.intra_rate}")
    return " ".join(flags)


# Cluster tier (workflows/rules/cluster.smk) -----------------------------------------------------

CLUSTER = config["cluster"]
CLUSTER_BENCH = CLUSTER["layer_bench"]
LAUNCH = repo_path("workflows/scripts/launch_cluster.sh")


def cluster_bench_settings(paper, variant):
    """The layer bench keys of one cluster run: the paper's workload, the tier and the variant."""
    entry = CLUSTER_BENCH[paper]
    return {**typed(entry.get("set", {})), "tier": "cluster", "topology": entry["topology"],
            **typed(entry["variants"][variant])}


def cluster_bench_config(paper, variant):
    """The layer bench config of one cluster run (keys and types; resolved before any job, checks.smk)."""
    return build_config(LayerBenchConfig, None, [], base=cluster_bench_settings(paper, variant))


def cluster_run_checks():
    """The deep checks of every cluster run's layer bench config (part of `config_checks`)."""
    return [{"name": f"cluster.layer_bench.{paper}.variants.{variant}", "kind": "layer_bench", "config": None,
             "set": overrides_of(cluster_bench_settings(paper, variant))}
            for paper, entry in CLUSTER_BENCH.items() for variant in entry["variants"]]


def cluster_topology(wc):
    return get_topology(CLUSTER_BENCH[wc.paper]["topology"])


def slurm_placeholders():
    """Profile values still set to the shipped placeholders (REPLACE_WITH_...)."""
    found = []
    settings = workflow.resource_settings
    for where, resources in [("default-resources", settings.default_resources or {})] + [
            (f"set-resources {rule}", res) for rule, res in (settings.overwrite_resources or {}).items()]:
        for name in resources:
            raw = getattr(resources[name], "raw", resources[name])
            if "REPLACE_WITH" in str(raw):
                found.append(f"{where}: {name} = {raw}")
    return found


def scheinfer_cluster_model():
    """The GGUF of the ScheInfer cluster bench: the configured one, or the generated model."""
    model = CLUSTER["scheinfer"].get("model")
    return repo_path(model) if model else rules.scheinfer_tiny_model.output.gguf


# FSMoE ----------------------------------------------------------------------------------------

FSMOE = config["fsmoe"]
FSMOE_TESTBEDS = ["A", "B"]


def fsmoe_overrides(*extra):
    """Overrides of impl.experiments.fsmoe.results: the config's, then `extra`."""
    return experiment_overrides("fsmoe") + list(extra)


def fsmoe_flags(*extra):
    """--set flags of impl.experiments.fsmoe.results: the config's overrides, then `extra`."""
    return as_flags(fsmoe_overrides(*extra))


def fsmoe_checks():
    """The deep checks of the FSMoE results (every part, every ablation reading) and of its emu run."""
    results = [{"name": "fsmoe", "kind": "fsmoe_results", "config": experiment_config("fsmoe"),
                "set": fsmoe_overrides()}]
    results += [{"name": f"fsmoe.ablation_readings.{reading}", "kind": "fsmoe_results",
                 "config": experiment_config("fsmoe"),
                 "set": fsmoe_overrides(f"reading={reading}", f"grid_sample={FSMOE['ablation_sample']}")}
                for reading in FSMOE["ablation_readings"]]
    return results + [{"name": "fsmoe.emu", "kind": "fsmoe_emu", "config": None, "set": overrides_of(FSMOE["emu"])}]


# The deep config checks (run before any job by checks.smk) -----------------------------------------


def config_checks():
    """Every experiment config the deep checks resolve (those of `make emu` and the cluster
    target too, as before they were moved out of the parse), as the check script takes them."""
    return sim_run_checks() + swap_gap_checks() + [
        {"name": "scheinfer_sim", "kind": "scheinfer_sim", "config": experiment_config("scheinfer_sim"),
         "set": experiment_overrides("scheinfer_sim")},
        {"name": "emu_validation", "kind": "emu_validation", "config": experiment_config("emu_validation"),
         "set": experiment_overrides("emu_validation")},
    ] + fsmoe_checks() + cluster_run_checks()
