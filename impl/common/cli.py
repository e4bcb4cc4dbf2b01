"""The skeleton every command-line entry point shares: `--config FILE` and repeatable `--set
KEY=VALUE` filling a typed config dataclass, the usual output flags, and one error line with
exit code 2 for bad input (checked before any work starts), so all CLIs behave alike.

    parser = cli.parser("python -m impl.experiments.hiermoe.sim", __doc__, config=SimExperimentConfig,
                        outputs=("csv", "record"), progress=True)
    args = parser.parse_args(argv)
    try:
        resolved = resolve(cli.load_config(args, SimExperimentConfig))
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, build_config

__all__ = ["INPUT_ERRORS", "parser", "load_config", "fail", "write_csv_and_record"]

# What bad input raises while a CLI checks it (config keys and values, files, names).
INPUT_ERRORS = (ConfigError, ValueError, OSError)


def parser(prog: str, doc: str | None, *, config: type | None = None, outputs: tuple[str, ...] = (),
           progress: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared flags: `--config`/`--set` for a config dataclass,
    `--out-csv` / `--out-record` (required) for the outputs named, `--no-progress`."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().split("\n")[0])
    if config is not None:
        p.add_argument("--config", help=f"YAML file with {config.__name__} keys; defaults apply without it")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key (value parsed as YAML, nested keys dotted), repeatable")
    if "csv" in outputs:
        p.add_argument("--out-csv", required=True, help="tidy CSV of the results")
    if "record" in outputs:
        p.add_argument("--out-record", required=True, help="JSON run record")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    return p


def load_config(args: argparse.Namespace, cls: type):
    """The config dataclass from `--config` and `--set` (ConfigError names a bad key or value)."""
    return build_config(cls, args.config, args.overrides)


def fail(p: argparse.ArgumentParser | str, error: BaseException | str) -> int:
    """Print one `prog: error: ...` line on stderr and return the exit code for bad input."""
    prog = p.prog if isinstance(p, argparse.ArgumentParser) else p
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def write_csv_and_record(frame, csv_path: str, record: dict, record_path: str) -> None:
    """Both outputs atomically: the tidy CSV, then the run record describing it."""
    from .records import atomic_output, write_record

    with atomic_output(csv_path) as tmp:
        frame.to_csv(tmp, index=False)
    write_record(record_path, record)
