"""The skeleton every command-line entry point shares: `--config FILE` and repeatable `--set
KEY=VALUE` filling a typed config dataclass, the usual output flags, and one error line with
exit code 2 for bad input (checked before any work starts), so all CLIs behave alike.

`ArgumentParser` reports a usage error as that one line too (no usage block), and `number`,
`output_path`, `output_dir` and `input_file` are argparse `type`s that check a flag's value as it
is parsed.

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
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .config import INT64_MAX, Bounds, ConfigError, build_config

__all__ = ["INPUT_ERRORS", "USAGE_EXIT", "ArgumentParser", "number", "output_path", "output_dir", "input_file", "parser",
           "load_config", "fail", "write_csv_and_record"]

# What bad input raises while a CLI checks it (config keys and values, files, names).
INPUT_ERRORS = (ConfigError, ValueError, OSError)
USAGE_EXIT = 2


def describe(doc: str | None) -> str:
    """A CLI's --help description: the first paragraph of its module docstring, on one line."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the suite's convention for bad input: one `prog: error: ...` line on stderr
    and exit code 2 (argparse's usage block would bury the line; `--help` shows the usage).
    Flags are never abbreviated (`--emulate-lat` is not `--emulate-latency`: checks that read the
    command line would miss it). Subcommand parsers made by `add_subparsers` are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")


def number(kind: type = int, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Callable[[str], int | float]:
    """An argparse `type`: a finite int (or float) in a range, else argparse's one-line error
    naming the flag (`argument --repeats: 0 is not allowed; allowed: >= 1`)."""
    bounds = Bounds(ge, gt, le, lt)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: "
                                             f"{'an integer' if kind is int else 'a number'} "
                                             f"{bounds.describe()}".rstrip()) from None
        if not math.isfinite(value) or abs(value) > INT64_MAX:
            what = "a finite number" if kind is float else "a 64-bit integer"
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {what} {bounds.describe()}".rstrip())
        if not bounds.admits(value):
            raise argparse.ArgumentTypeError(f"{value!r} is not allowed; allowed: {bounds.describe()}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _check_can_create(text: str, what: str) -> None:
    """The nearest existing folder above `text` is a writable folder, so the run's outputs (written
    last, their missing folders made) can be created: checked before any work starts."""
    above = Path(text).absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {str(above)!r} is a file, not a folder; allowed: {what}")
    _check_writable(above, f"{text!r}: folder {str(above)!r}", what)


def _check_writable(folder: Path, named: str, what: str) -> None:
    """A file can be made in `folder` (tried: permission bits do not tell for root or /proc)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{named} is not writable ({e.strerror}); allowed: {what} "
                                         "in a writable folder") from None


def output_path(text: str) -> str:
    """An argparse `type` for a file to write: a non-empty path that is not a directory, in a
    folder that is (or can be made) writable."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not allowed; allowed: a file path")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; allowed: a file path")
    _check_can_create(text, "a file path")
    return text


def output_dir(text: str) -> str:
    """An argparse `type` for a folder to write into (made if missing): not empty, not a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not allowed; allowed: a folder path")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; allowed: a folder path")
    if not Path(text).exists():
        _check_can_create(text, "a folder path")
    else:
        _check_writable(Path(text), f"folder {text!r}", "a folder path")
    return text


def input_file(text: str) -> str:
    """An argparse `type` for a file to read: it must exist and be a file."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing file" if not Path(text).is_dir()
                                         else f"{text!r} is a directory; allowed: a file")
    return text


def parser(prog: str, doc: str | None, *, config: type | None = None, outputs: tuple[str, ...] = (),
           progress: bool = False) -> ArgumentParser:
    """An ArgumentParser with the shared flags: `--config`/`--set` for a config dataclass,
    `--out-csv` / `--out-record` (required) for the outputs named, `--no-progress`."""
    p = ArgumentParser(prog=prog, description=describe(doc))
    if config is not None:
        p.add_argument("--config", type=input_file,
                       help=f"YAML file with {config.__name__} keys; defaults apply without it")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key (value parsed as YAML, nested keys dotted), repeatable")
    if "csv" in outputs:
        p.add_argument("--out-csv", required=True, type=output_path, help="tidy CSV of the results")
    if "record" in outputs:
        p.add_argument("--out-record", required=True, type=output_path, help="JSON run record")
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
    return USAGE_EXIT


def write_csv_and_record(frame, csv_path: str, record: dict, record_path: str) -> None:
    """Both outputs atomically: the tidy CSV, then the run record describing it, its `outputs`
    naming the CSV (path relative to the record, rows, sha256) so a reader can refuse a CSV that
    is not the one this run wrote (`figures.inputs.read_results`)."""
    from .records import atomic_output, describe_output, write_record

    with atomic_output(csv_path) as tmp:
        frame.to_csv(tmp, index=False)
        described = describe_output(tmp, len(frame))
    name = os.path.relpath(os.path.abspath(csv_path), os.path.dirname(os.path.abspath(record_path)))
    write_record(record_path, {**record, "outputs": {**record.get("outputs", {}), name: described}})
