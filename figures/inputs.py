"""The results a figure reads, checked before any plotting: a CSV that lacks a column the figure
uses (an older run, the wrong file, another experiment's output) stops the figure with one line
naming the file, the missing columns and what writes the right one, instead of a KeyError
somewhere inside a plot. A CSV whose run record lies beside it (same name, `.json`) must be the
file that record describes: one cut short at a line end, or edited, parses cleanly but is not the
run's result."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from impl.common.records import describe_output

__all__ = ["read_results"]


def read_results(path: str, columns: Iterable[str], writer: str, *, comment: str | None = None,
                 allow_empty: bool = False) -> pd.DataFrame:
    """The CSV at `path` with at least `columns`; ValueError otherwise. `writer`: the command
    (or module) that writes such a CSV, named in the message. A file that ends mid-line was cut
    short (a writer ends every row with a newline): pandas would fill its last row's missing
    fields with NaN, so it is refused here."""
    _check_complete(path, writer)
    try:
        frame = pd.read_csv(path, comment=comment)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a CSV of {writer} ({str(e).strip().splitlines()[0]})") from None
    _check_against_record(path, len(frame), writer)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                         f"is it a CSV of {writer}, or one an older version of it wrote (delete it, and "
                         "the workflow makes it again)?")
    if frame.empty and not allow_empty:
        raise ValueError(f"{path}: no rows; expected the results of {writer}")
    return frame


def _check_complete(path: str, writer: str) -> None:
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return                      # empty: pandas' own message below
        f.seek(-1, 2)
        if f.read(1) != b"\n":
            raise ValueError(f"{path}: ends mid-line, so it was cut short; run {writer} again to write it whole")


def _check_against_record(path: str, rows: int, writer: str) -> None:
    """The CSV against the `outputs` entry of its run record, when one lies beside it and names
    it (records of older runs name none: nothing to check)."""
    record_path = Path(path).with_suffix(".json")
    try:
        expected = json.loads(record_path.read_text()).get("outputs", {}).get(Path(path).name)
    except (OSError, ValueError, AttributeError):
        return                          # no record beside it (or none of ours)
    if not isinstance(expected, dict):
        return
    if expected.get("rows") != rows:
        raise ValueError(f"{path}: {rows} rows, but its run record {record_path} says {expected.get('rows')}: cut "
                         f"short or edited; run {writer} again to write it whole")
    if describe_output(path, rows)["sha256"] != expected.get("sha256"):
        raise ValueError(f"{path}: not the file its run record {record_path} describes (sha256 differs): edited, "
                         f"or another run's; run {writer} again")
