"""Compare the tidy CSVs of two result trees (e.g. `results/` before and after a change that must
not change outputs): the same files, the same columns, the same rows, numbers equal to a relative
tolerance, ignoring columns that are measured wall-clock times of this machine.

    python workflows/scripts/compare_results.py OLD/results NEW/results [--ignore planning_ms ...]

Prints one line per file (equal, or what differs) and exits 1 if any file differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# Columns holding measured times of the machine that ran the job (they differ on every run).
MEASURED = ("planning_ms", "enum_ms_per_config", "slsqp_ms_per_config", "measured_ms", "wall_ms")


def _read_csv(path: Path) -> pd.DataFrame:
    """The CSV at `path`; ValueError naming the file when it is not readable as one."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable CSV ({reason})") from None


def compare(old: Path, new: Path, ignore: tuple[str, ...], rtol: float) -> list[str]:
    try:
        a, b = _read_csv(old), _read_csv(new)
    except ValueError as e:
        return [str(e)]
    problems = []
    if list(a.columns) != list(b.columns):
        problems.append(f"columns differ: {sorted(set(a.columns) ^ set(b.columns))}")
        return problems
    if len(a) != len(b):
        return [f"{len(a)} rows before, {len(b)} after"]
    for col in a.columns:
        if col in ignore:
            continue
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            bad = ~np.isclose(x.to_numpy(float), y.to_numpy(float), rtol=rtol, atol=0, equal_nan=True)
        else:
            bad = (x.astype(str) != y.astype(str)).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            problems.append(f"column {col!r}: {int(bad.sum())} rows differ (first: row {i}: {x.iloc[i]!r} -> {y.iloc[i]!r})")
    return problems


def _tree(text: str) -> Path:
    if not text.strip() or not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return Path(text)


def _rtol(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a finite number >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", type=_tree, help="result tree before")
    p.add_argument("new", type=_tree, help="result tree after")
    p.add_argument("--ignore", nargs="*", default=list(MEASURED), help="columns not compared")
    p.add_argument("--rtol", type=_rtol, default=1e-9, help="relative tolerance of numbers")
    args = p.parse_args(argv)
    old = {f.relative_to(args.old) for f in args.old.rglob("*.csv")}
    new = {f.relative_to(args.new) for f in args.new.rglob("*.csv")}
    failed = False
    for rel in sorted(old | new):
        if rel not in new or rel not in old:
            print(f"{rel}: only in {'old' if rel in old else 'new'}")
            failed = True
            continue
        problems = compare(args.old / rel, args.new / rel, tuple(args.ignore), args.rtol)
        print(f"{rel}: {'equal' if not problems else '; '.join(problems)}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
