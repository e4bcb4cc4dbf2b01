"""The papers' reported numbers: one CSV per figure or table in `figures/paper/` (convention in its
README.md). They are data, read by path from every layer that compares with them (experiments and
figures), so the reader sits at the bottom."""
from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

__all__ = ["PAPER_DIR", "REQUIRED_KEYS", "read_paper_csv"]

PAPER_DIR = Path(__file__).resolve().parents[2] / "figures" / "paper"
REQUIRED_KEYS = ("citation", "location", "quantity", "unit")


def read_paper_csv(name_or_path: str | Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """(table, header) of a paper CSV, given a path or a bare name like 'hiermoe_table2'.

    The header is the leading `# key: value` lines; a file missing a required key or the
    `value` column is refused, so no figure draws numbers without a citation. A file is parsed
    once per version (its modification time and size) and each caller gets its own copy, since figures
    read the same table from several places."""
    path = Path(name_or_path)
    if path.suffix != ".csv" and not path.exists():
        path = PAPER_DIR / f"{path.name}.csv"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PAPER_DIR.glob("*.csv")))
        raise ValueError(f"paper CSV {str(name_or_path)!r} not found; known: {known}")
    stat = path.stat()
    table, header = _parse(path.resolve(), stat.st_mtime_ns, stat.st_size)
    return table.copy(), dict(header)


@functools.lru_cache(maxsize=256)
def _parse(path: Path, mtime_ns: int, size: int) -> tuple[pd.DataFrame, dict[str, str]]:
    header: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            key, sep, value = line[1:].partition(":")
            if not sep:
                raise ValueError(f"{path}: header line {line.strip()!r} is not '# key: value'")
            header[key.strip()] = value.strip()
    missing = [k for k in REQUIRED_KEYS if k not in header]
    if missing:
        raise ValueError(f"{path}: header lacks {missing[0]!r}; required: {', '.join(REQUIRED_KEYS)}")
    table = pd.read_csv(path, comment="#")
    if "value" not in table.columns:
        raise ValueError(f"{path}: no 'value' column; columns: {', '.join(table.columns)}")
    if not pd.api.types.is_numeric_dtype(table["value"]):
        raise ValueError(f"{path}: column 'value' is not numeric")
    return table, header
