"""Resolve every experiment config of a workflow run with the experiment's own checks (models,
topologies, systems, hardware classes, cell by cell), in one process, before any experiment job.

The workflow parses without torch (a Slurm login node's Snakemake need not have it), so while it
parses it checks only the config schema and the configs it needs to name outputs; the deep checks
import the experiments and run here, as the first job every experiment job waits for.

    python workflows/scripts/check_configs.py --checks JSON --out checked.json

(or as the `check_configs` rule's script, with the list as its `checks` param). JSON: a list of {"name": where the config sits in the workflow config, "kind": one of KINDS,
"config": experiment YAML or null, "set": ["key=value", ...]}. A bad config prints one line
naming it and exits 2; every good one is listed in --out.
"""

import argparse
import json
import sys
from pathlib import Path


def _hiermoe_sim(path, overrides):
    from impl.common.config import build_config
    from impl.experiments.hiermoe import sim
    sim.resolve(build_config(sim.SimExperimentConfig, path, overrides))


def _scheinfer_sim(path, overrides):
    from impl.common.config import build_config
    from impl.experiments.scheinfer import sim
    sim.resolve(build_config(sim.SimConfig, path, overrides))


def _emu_validation(path, overrides):
    from impl.experiments import emu_validation
    emu_validation.load(path, overrides)


def _layer_bench(path, overrides):
    from impl.common.config import build_config
    from impl.experiments import layer_bench
    layer_bench.validate(build_config(layer_bench.LayerBenchConfig, path, overrides), with_profile=False)


def _fsmoe_results(path, overrides):
    from impl.common.config import build_config
    from impl.experiments.fsmoe import results
    cfg = build_config(results.ResultsConfig, path, overrides)
    for part in results.PARTS:
        results.validate(cfg, part)


def _fsmoe_emu(path, overrides):
    from impl.common.config import build_config
    from impl.experiments.fsmoe import emu
    emu.check(build_config(emu.EmuConfig, path, overrides))


KINDS = {"hiermoe_sim": _hiermoe_sim, "scheinfer_sim": _scheinfer_sim, "emu_validation": _emu_validation,
         "layer_bench": _layer_bench, "fsmoe_results": _fsmoe_results, "fsmoe_emu": _fsmoe_emu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_configs", description=__doc__.split("\n")[0])
    p.add_argument("--checks", required=True, help="JSON list of the configs to check (module doc)")
    p.add_argument("--out", required=True, help="JSON file listing the configs checked")
    args = p.parse_args(argv)
    return check(args.checks, args.out)


def check(checks_json: str, out: str, log: str | None = None) -> int:
    """Run the checks; the outcome goes to stderr (and to `log`, the rule's log)."""

    def say(line: str) -> None:
        print(line, file=sys.stderr)
        if log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                print(line, file=f)

    try:
        checks = json.loads(checks_json)
        if not isinstance(checks, list) or not all(isinstance(c, dict) and c.get("kind") in KINDS
                                                    and isinstance(c.get("set", []), list) for c in checks):
            raise ValueError(f"expected a list of {{name, kind, config, set}} with kind in {', '.join(KINDS)} "
                             "and set a list of key=value")
    except ValueError as e:
        say(f"check_configs: error: --checks: {e}")
        return 2
    from impl.common.cli import INPUT_ERRORS

    for check in checks:
        try:
            KINDS[check["kind"]](check.get("config"), list(check.get("set", [])))
        except INPUT_ERRORS as e:
            say(f"check_configs: error: {check.get('name', check['kind'])}: {e}")
            return 2
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(checks, indent=1) + "\n")
    say(f"{len(checks)} experiment configs resolved")
    return 0


if "snakemake" in globals():           # run by the rule's `script:` directive
    sys.exit(check(snakemake.params.checks, snakemake.output[0], snakemake.log[0]))  # noqa: F821
elif __name__ == "__main__":
    sys.exit(main())
