"""Run records: one JSON document per experiment run.

A record is everything needed to trust, compare and re-run one result: what was run (experiment,
system, variant, tier, topology, model, seed, trace), what came out (per-repeat metrics with their
median / p5 / p95, bytes and messages per topology level), under which exact configuration
(the resolved config and its hash) and where (versions, host, git sha, command line, time).

Speedups are never stored here: they are computed when records are aggregated, as baseline median
over system median on the same workload.

Records are validated against `RECORD_SCHEMA` (JSON Schema draft 2020-12) on write and on read,
and every output is written atomically (temporary file in the same directory, then rename), so an
interrupted run never leaves a truncated file that a later step would take for a finished one.
"""
from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from impl.common.config import config_hash, to_dict

__all__ = [
    "RECORD_SCHEMA", "SCHEMA_VERSION", "TIERS", "summarize", "collect_env", "git_info", "make_record",
    "validate_record", "write_record", "read_record", "read_records", "record_path", "atomic_output",
    "atomic_write_text", "describe_output",
]

SCHEMA_VERSION = 1
TIERS = ("sim", "emu", "cluster")
REPO_ROOT = Path(__file__).resolve().parents[2]

# Environment variables that change how collectives and kernels behave, or say where a job ran.
_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "CUDA_", "OMP_", "MKL_",
                 "SLURM_JOB_", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_CPUS_")
_ENV_NAMES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
# Never copy anything that looks like a credential into a record, whatever its prefix.
_ENV_SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")

_NUMBER = {"type": "number"}
_COUNTS_BY_LEVEL = {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}
_SUMMARY = {
    "type": "object",
    "required": ["values", "median", "p5", "p95", "n"],
    "additionalProperties": False,
    "properties": {
        "values": {"type": "array", "items": _NUMBER, "minItems": 1},
        "median": _NUMBER,
        "p5": _NUMBER,
        "p95": _NUMBER,
        "n": {"type": "integer", "minimum": 1},
    },
}

RECORD_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "run record",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema_version", "experiment", "system", "variant", "tier", "topology", "model",
                 "seed", "trace_id", "metrics", "bytes_by_level", "messages_by_level", "config",
                 "config_hash", "env", "git", "command", "timestamp"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "experiment": {"type": "string", "minLength": 1},
        "system": {"type": "string", "minLength": 1},
        "variant": {"type": "string", "minLength": 1},
        "tier": {"enum": list(TIERS)},
        "topology": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "model": {"type": "object"},
        "seed": {"type": "integer"},
        "trace_id": {"type": ["string", "null"]},
        "metrics": {"type": "object", "additionalProperties": _SUMMARY},
        "bytes_by_level": _COUNTS_BY_LEVEL,
        "messages_by_level": _COUNTS_BY_LEVEL,
        "config": {"type": "object"},
        "config_hash": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
        "env": {
            "type": "object",
            "required": ["python", "torch", "numpy", "platform", "cpu_model", "hostname", "cuda",
                         "gpus", "env_vars"],
            "properties": {
                "python": {"type": "string"},
                "torch": {"type": "string"},
                "numpy": {"type": "string"},
                "platform": {"type": "string"},
                "cpu_model": {"type": "string"},
                "hostname": {"type": "string"},
                "cuda": {"type": ["string", "null"]},
                "gpus": {"type": "array", "items": {"type": "string"}},
                "env_vars": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "git": {
            "type": "object",
            "required": ["sha", "dirty"],
            "additionalProperties": False,
            "properties": {
                "sha": {"type": ["string", "null"], "pattern": "^[0-9a-f]{40}$"},
                "dirty": {"type": ["boolean", "null"]},
            },
        },
        "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "timestamp": {"type": "string",
                      "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?\+00:00$"},
        "outputs": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["rows", "sha256"], "additionalProperties": False,
            "properties": {"rows": {"type": "integer", "minimum": 0},
                           "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}},
        "extra": {"type": "object"},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(RECORD_SCHEMA)
_SUMMARY_VALIDATOR = jsonschema.Draft202012Validator(_SUMMARY)


def summarize(samples: Iterable[float]) -> dict:
    """Per-repeat values with their median, 5th and 95th percentile (linear interpolation
    between order statistics, numpy's default) and count. Repeats are kept, not only the
    summary, so a later aggregation can pool or re-summarize them."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("summarize: no samples; need at least one repeat")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"summarize: non-finite sample {bad[0]!r}; all samples must be finite numbers")
    arr = np.asarray(values, dtype=np.float64)
    p5, median, p95 = np.percentile(arr, [5.0, 50.0, 95.0])
    return {"values": values, "median": float(median), "p5": float(p5), "p95": float(p95),
            "n": len(values)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _relevant_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name, value in environ.items():
        if any(marker in name.upper() for marker in _ENV_SECRET_MARKERS):
            continue
        if name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES:
            out[name] = value
    return dict(sorted(out.items()))


def collect_env(environ: Mapping[str, str] | None = None) -> dict:
    """Versions, host and accelerator of this process, plus the environment variables that
    change communication behaviour (NCCL_*, GLOO_*, ...)."""
    import torch  # imported here so that reading and validating records does not load torch

    cuda_available = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_available else []
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "hostname": socket.gethostname(),
        "cuda": torch.version.cuda if cuda_available else None,
        "gpus": gpus,
        "env_vars": _relevant_env_vars(os.environ if environ is None else environ),
        "cwd": os.getcwd(),
    }


def git_info(repo: str | Path = REPO_ROOT) -> dict:
    """Commit of the code that produced a result, and whether the checkout differed from it
    (modified tracked files, or untracked files git does not ignore: an untracked module may have
    been imported). Both are None outside a git checkout (e.g. an installed wheel)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"sha": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"sha": sha.strip(), "dirty": None if status is None else bool(status.strip())}


def _as_summary(name: str, value: Any) -> dict:
    if isinstance(value, Mapping):
        summary = dict(value)
        errors = sorted(_SUMMARY_VALIDATOR.iter_errors(summary), key=str)
        if errors:
            raise ValueError(f"metric {name!r}: {errors[0].message}")
        return summary
    return summarize(value)


def make_record(*, experiment: str, system: str, tier: str, topology, model: Mapping, config,
                metrics: Mapping[str, Any], seed: int, trace_id: str | None = None,
                variant: str = "default", bytes_by_level: Mapping[str, float] | None = None,
                messages_by_level: Mapping[str, float] | None = None,
                command: list[str] | None = None, extra: Mapping | None = None) -> dict:
    """Assemble and validate a complete record.

    topology: a `Topology` (anything with `to_dict()`) or a mapping with at least a "name".
    config:   the resolved config (dataclass or mapping); stored in full with its config_hash.
    metrics:  name -> per-repeat samples (summarized here) or an existing `summarize` result.
    command:  defaults to this process's interpreter and argv.
    """
    if tier not in TIERS:
        raise ValueError(f"tier {tier!r} is not allowed; allowed: {', '.join(TIERS)}")
    topo = topology.to_dict() if hasattr(topology, "to_dict") else dict(topology)
    record = {
        "schema_version": SCHEMA_VERSION,
        "experiment": experiment,
        "system": system,
        "variant": variant,
        "tier": tier,
        "topology": topo,
        "model": to_dict(dict(model)),
        "seed": seed,
        "trace_id": trace_id,
        "metrics": {name: _as_summary(name, value) for name, value in metrics.items()},
        "bytes_by_level": dict(bytes_by_level or {}),
        "messages_by_level": dict(messages_by_level or {}),
        "config": to_dict(config),
        "config_hash": config_hash(config),
        "env": collect_env(),
        "git": git_info(),
        "command": list(command) if command is not None else [sys.executable, *sys.argv],
        "timestamp": datetime.now(timezone.utc).isoformat(),
    }
    if extra is not None:
        record["extra"] = to_dict(dict(extra))
    validate_record(record)
    return record


def validate_record(record: Mapping) -> None:
    """Raise ValueError with a one-line message naming the first offending field."""
    errors = list(_VALIDATOR.iter_errors(record))
    if errors:
        error = min(errors, key=lambda e: (len(e.absolute_path), str(list(e.absolute_path))))
        where = "/".join(str(p) for p in error.absolute_path) or "<record>"
        raise ValueError(f"invalid record at {where}: {error.message}")


def record_path(root: str | Path, experiment: str, system: str, topology_name: str, hash_: str) -> Path:
    """Canonical location results/raw/<experiment>/<system>/<topology>/<config_hash>.json: the
    topology is part of the directory, never only of the file name."""
    return Path(root) / "raw" / experiment / system / topology_name / f"{hash_}.json"


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that infer the format from
    the extension still work); on success it is renamed over `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (flushed to disk before the rename); creates parents."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def describe_output(path: str | Path, rows: int) -> dict:
    """What a record says of a data file it describes (its `outputs` entry): the row count and the
    sha256 of the bytes, so a reader can tell a file cut short at a line end, or edited, from the
    one the run wrote."""
    return {"rows": int(rows), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def write_record(path: str | Path, record: Mapping) -> Path:
    """Validate `record` and write it as JSON, atomically; creates parent directories."""
    validate_record(record)
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_record(path: str | Path, validate: bool = True) -> dict:
    """The record at exactly `path` (no glob: a `*` in it is a character of the name), validated;
    ValueError naming the file where it is no record, OSError where it cannot be read."""
    if Path(path).is_dir():
        raise ValueError(f"{path}: a directory; expected a run record (a JSON file)")
    with open(path, "rb") as f:
        try:
            record = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if validate:
        try:
            validate_record(record)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return record


def read_records(pattern: str | Path, validate: bool = True) -> list[dict]:
    """All records matching a glob (`**` recurses), in path order, each read by `read_record`."""
    return [read_record(name, validate) for name in sorted(globlib.glob(str(pattern), recursive=True))]
