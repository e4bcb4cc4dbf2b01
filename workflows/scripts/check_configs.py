"""Resolve every experiment config of a workflow run with the experiment's own checks (models,
topologies, systems, hardware classes, cell by cell), in one process, before any experiment job.

The workflow parses without torch (a Slurm login node's Snakemake need not have it), so while it
parses it checks only the config schema and the configs it needs to name outputs; the deep checks
import the experiments and run here, started by the workflow's `onstart:` handler
(workflows/rules/checks.smk) before any job, or by hand:

    python workflows/scripts/check_configs.py --checks JSON

JSON: a list of {"name": where the config sits in the workflow config, "kind": one of KINDS,
"config": experiment YAML or null, "set": ["key=value", ...]}. A bad config prints one line
naming it and exits 2; when all are good it prints how many it resolved and exits 0.
"""

import argparse
import json
import sys


def _hiermoe_sim(path, overrides):
    from impl.common.config import build_config
    from impl.experiments.hiermoe import sim
    sim.resolve(build_config(sim.SimExperimentConfig, path, overrides))


def _hiermoe_swap_gap(path, overrides):
    from impl.common.config import build_config
    from impl.experiments.hiermoe import swap_gap
    swap_gap.check(build_config(swap_gap.SwapGapConfig, path, overrides))


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


PROG = "check_configs"
KINDS = {"hiermoe_sim": _hiermoe_sim, "hiermoe_swap_gap": _hiermoe_swap_gap, "scheinfer_sim": _scheinfer_sim, "emu_validation": _emu_validation,
         "layer_bench": _layer_bench, "fsmoe_results": _fsmoe_results, "fsmoe_emu": _fsmoe_emu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--checks", required=True, help="JSON list of the configs to check (module doc)")
    return check(p.parse_args(argv).checks)


def _cannot_import(error: ImportError) -> str:
    return (f"{sys.executable} cannot import the experiments ({error}); run Snakemake from the project's "
            "environment (make run), or dry-run (-n), which skips these checks")


def check(checks_json: str) -> int:
    """Run the checks; the outcome goes to stderr (a bad config, or a Python that cannot import
    the experiments: one line, exit 2)."""
    try:
        from impl.common.cli import INPUT_ERRORS, fail
    except ImportError as e:                   # not even the project: the line cli.fail would print
        print(f"{PROG}: error: {_cannot_import(e)}", file=sys.stderr)
        return 2

    try:
        checks = json.loads(checks_json)
        if not isinstance(checks, list) or not all(isinstance(c, dict) and c.get("kind") in KINDS
                                                    and isinstance(c.get("set", []), list) for c in checks):
            raise ValueError(f"expected a list of {{name, kind, config, set}} with kind in {', '.join(KINDS)} "
                             "and set a list of key=value")
    except ValueError as e:
        return fail(PROG, f"--checks: {e}")
    for check in checks:
        try:
            KINDS[check["kind"]](check.get("config"), list(check.get("set", [])))
        except INPUT_ERRORS as e:
            return fail(PROG, f"{check.get('name', check['kind'])}: {e}")
        except ImportError as e:
            return fail(PROG, _cannot_import(e))
    print(f"{len(checks)} experiment configs resolved", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
