"""Typed configuration: frozen dataclasses are the source of truth; YAML files and
`--set a.b=v` overrides only fill them.

Every key is checked against the dataclass fields and every value against the field's type
(including `Literal[...]` choices) and its declared range (`bounded`) when the config is built,
so a typo fails at once with a message naming the key and what is allowed, before any expensive
work starts. Floats must be finite and integers fit in 64 bits wherever they appear.

    @dataclass(frozen=True)
    class BenchConfig:
        tokens_per_rank: int = bounded(128, ge=1, le=1 << 20)
        timeout_s: float = bounded(120.0, gt=0)
        hidden: int | None = bounded(None, ge=1)       # None passes; a number must be >= 1
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "Bounds", "bounded", "bounds_of", "check_bounds", "from_dict", "to_dict", "load_yaml",
           "apply_overrides", "parse_set", "config_hash", "build_config", "checked", "INT64_MAX", "SEED_MAX",
           "MAX_RANKS", "MAX_EXPERTS", "MAX_WIDTH", "MAX_TOKENS", "MAX_LAYERS", "MAX_REPEATS", "MAX_SECONDS",
           "DEFAULT_TIMEOUT_S", "MAX_LOCAL_RANKS",
           "host_memory_bytes", "check_host_memory"]

INT64_MAX = 2**63 - 1       # what torch, numpy and C code take as an integer
# Upper limits of the configs' values, far beyond any paper's setting: a value past one is a
# typo, refused at load rather than exhausting memory or time (or overflowing C code) mid-run.
SEED_MAX = 2**32 - 1        # numpy's seed range
MAX_RANKS = 1 << 16         # GPUs / ranks of a topology
MAX_EXPERTS = 1 << 16
MAX_WIDTH = 1 << 18         # hidden and FFN widths, heads
MAX_TOKENS = 1 << 22        # tokens per rank, per sample or per prompt
MAX_LAYERS = 1 << 12
MAX_REPEATS = 100_000       # repeats, warm-up steps, iterations, samples
MAX_SECONDS = 30 * 86400.0  # timeouts and deadlines
DEFAULT_TIMEOUT_S = 120.0   # a collective that takes longer than this is a failure (a dead or stuck rank)
# the most ranks one host runs as local processes (emu tier, calibration): one process each
MAX_LOCAL_RANKS = 64


class ConfigError(ValueError):
    """A configuration key or value that is not allowed. The message names both."""


@dataclass(frozen=True)
class Bounds:
    """The range a number must lie in (any of the four limits may be absent)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, value) -> bool:
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))

    def describe(self) -> str:
        """'>= 1', '> 0', '1..64', '>= 0 and < 1' (as `allowed:` says it)."""
        if self.ge is not None and self.le is not None:
            return f"{_number(self.ge)}..{_number(self.le)}"
        return " and ".join(f"{op} {_number(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                                               ("<", self.lt)) if v is not None)

    def check(self, value, where: str) -> None:
        """ConfigError naming `where` unless every number in `value` (itself, the items of a
        list, the values of a mapping; None passes) lies in the range."""
        if isinstance(value, dict):
            for k, v in value.items():
                self.check(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self.check(v, f"{where}[{i}]")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not self.admits(value):
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {self.describe()}")


def _number(v: float) -> str:
    """A limit as written: 1048576, not 1.04858e+06; 0.5 as 0.5."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e18 else f"{v:g}"


_BOUNDS = "bounds"


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose numbers must lie in a range, declared once where the field is:
    `from_dict` (every `--set` and YAML value) and `check_bounds` (a config built in code) check it."""
    meta = {_BOUNDS: Bounds(ge, gt, le, lt)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def bounds_of(f: dataclasses.Field) -> Bounds | None:
    """The declared range of a dataclass field (None: none declared)."""
    return f.metadata.get(_BOUNDS)


def check_bounds(obj, where: str = "") -> None:
    """Check every bounded field of a dataclass instance, nested configs included (ConfigError
    naming the first value out of range)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if (b := bounds_of(f)) is not None:
            b.check(value, key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_bounds(value, key)


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str):
    """Check (and minimally convert) `value` against annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed: "
                              + ", ".join(repr(a) for a in get_args(tp)))
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of "
                          + ", ".join(_type_name(a) for a in args))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int) and abs(value) > INT64_MAX or not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed: a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if abs(value) > INT64_MAX:
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed: a 64-bit integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrongly typed values raise
    ConfigError naming the key and the allowed keys or values. The dataclass's own
    `__post_init__` then checks cross-field constraints."""
    data = {} if data is None else data
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{label}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
        if (b := bounds_of(fields[name])) is not None:
            b.check(kwargs[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{label}: {e}") from None


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def parse_set(item: str) -> tuple[list[str], Any]:
    """'a.b=v' -> (['a', 'b'], v) with v parsed as YAML (so 8 -> int, true -> bool, [1,2] -> list)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model.top_k=4")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: malformed key {key!r}")
    return key.split("."), yaml.safe_load(raw)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=v` overrides to a plain mapping (deep-copied; values of any YAML type,
    dates say, are kept for the type checks to name)."""
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_set(item)
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[path[-1]] = value
    return out


def build_config(cls, path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None):
    """YAML file (optional) + base mapping + overrides -> validated dataclass."""
    data = dict(base or {})
    if path is not None:
        data.update(load_yaml(path))
    return from_dict(cls, apply_overrides(data, list(overrides)))


def config_hash(obj) -> str:
    """Stable short hash of a resolved config (dataclass or mapping)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_host_memory(nbytes: float, keys: str, who: str = "the run") -> None:
    """ConfigError naming `keys` when `who` would need more than this machine's memory: sizes
    that cannot fit are refused at load, not by an allocation failing mid-run."""
    total = host_memory_bytes()
    if nbytes > total:
        raise ConfigError(f"{keys}: {who} would need about {nbytes / 2**30:.3g} GiB of memory, this host has "
                          f"{total / 2**30:.3g} GiB; allowed: smaller sizes")


def checked(key: str, lookup, value):
    """`lookup(value)` (a model, topology or profile by name), its ValueError re-raised as a
    one-line ConfigError naming the config key."""
    try:
        return lookup(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
