"""Alpha-beta communication models, linear compute models and named hardware profiles.

Every task the papers model is linear with an intercept, t(n) = alpha + beta * n: alpha is the
start-up cost, beta the cost per byte (communication) or per work unit (computation). Fitted by
least squares from micro-benchmarks with the intercept kept >= 0 (`fit_linear`), the goodness of
fit reported as r^2.

Units, everywhere in memory: **times in milliseconds, sizes in bytes**. A communication model's
`nbytes` follows nccl-tests: the per-rank send buffer for AlltoAll and ReduceScatter (all
destinations together, the part a rank keeps for itself included), the per-rank receive buffer
for AllGather, the buffer for AllReduce. A compute model names its own work unit (`work_unit`);
the GEMM model's unit is 'mac', the m*n*k multiply-accumulates of one GEMM.

Published constants often come in other units (FSMoE's betas are per float element, its GEMM beta
per "byte" of 4*m*n*k). A profile file may give such a beta as published with `beta_unit` and
`beta_unit_size` (how many bytes / work units one published unit is); it is converted on load,
beta_per_byte = beta / beta_unit_size, and the published value is kept beside it as provenance.

Communication models are keyed by (kind, step):
* kind: 'a2a' (AlltoAll), 'allgather', 'reducescatter', 'allreduce';
* step: the sub-group of a hierarchical topology the collective runs over (`Topology`):
  'flat' = all G ranks (Intra-level-0; 'intra-0' is accepted as an alias), 'inter-i' for
  1 <= i < D (Inter-level-i) and 'intra-i' for 1 <= i < D (Intra-level-i). These are HierMoE's
  seven AlltoAll kinds on a D = 4 topology, and the names `CommGroup.name` gives.

A `HardwareProfile` bundles the models of one machine, the topology preset it belongs to, a
citation and notes; profiles live as YAML in workflows/config/profiles/ (`load_profile`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import yaml

from .config import load_yaml
from .records import atomic_write_text
from .topology import Topology, TopologyError, get_topology

__all__ = ["LinearFit", "LinearModel", "HardwareProfile", "fit_linear", "load_profile", "save_profile",
           "list_profiles", "step_name", "parse_step", "topology_steps", "shift_step", "sub_topology_profile",
           "profile_summary", "COMM_KINDS", "PROFILES_DIR", "TIME_UNIT", "SIZE_UNIT"]

COMM_KINDS = ("a2a", "allgather", "reducescatter", "allreduce")
TIME_UNIT = "ms"
SIZE_UNIT = "byte"
PROFILES_DIR = Path(__file__).resolve().parents[2] / "workflows" / "config" / "profiles"

_STEP_RE = re.compile(r"^(inter|intra)-(\d+)$")


# ==========================================================================================
# least squares
# ==========================================================================================
@dataclass(frozen=True)
class LinearFit:
    """Result of an ordinary least-squares fit y = alpha + beta * x over n points."""

    alpha: float
    beta: float
    r2: float
    n: int

    def predict(self, x: float) -> float:
        return self.alpha + self.beta * x


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Least squares with a non-negative intercept: ordinary least squares (scipy's linregress),
    and, when its intercept comes out below zero, the best line through the origin instead. A
    start-up time cannot be negative; a negative intercept is what noise or a super-linear curve
    gives when every size lies far above the start-up, and it would price small messages (split
    counts, ids) at less than nothing. r^2 = 1 - SS_res / SS_tot of the line returned; when every
    y is equal (SS_tot = 0) the fit is exact and r^2 = 1."""
    x = np.asarray(xs, dtype=np.float64).ravel()
    y = np.asarray(ys, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"fit_linear: {x.size} xs but {y.size} ys; they must pair up")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("fit_linear: xs and ys must be finite numbers")
    if np.unique(x).size < 2:
        raise ValueError(f"fit_linear: needs at least 2 distinct x values, got {np.unique(x).tolist()}")
    if np.ptp(y) == 0.0:
        return LinearFit(float(y[0]), 0.0, 1.0, int(x.size))
    import scipy.stats  # here, not at module level: a second of start-up every process would pay

    fit = scipy.stats.linregress(x, y)
    if fit.intercept >= 0.0:
        return LinearFit(float(fit.intercept), float(fit.slope), float(fit.rvalue) ** 2, int(x.size))
    beta = float(np.dot(x, y) / np.dot(x, x))
    ss_res, ss_tot = float(np.sum((y - beta * x) ** 2)), float(np.sum((y - y.mean()) ** 2))
    return LinearFit(0.0, beta, 1.0 - ss_res / ss_tot, int(x.size))


# ==========================================================================================
# models
# ==========================================================================================
def _number(value: Any, where: str) -> float:
    """A finite float from YAML (which reads '1e-7', without a dot, as a string)."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return out


@dataclass(frozen=True)
class LinearModel:
    """t = alpha_ms + beta_ms * x, x in bytes (communication) or in `work_unit`s (computation).

    `published` keeps a constant's original form when it was converted on load:
    {'beta': value as printed, 'beta_unit': its unit, 'beta_unit_size': bytes or work units per
    published unit}."""

    alpha_ms: float
    beta_ms: float
    r2: float | None = None
    n: int | None = None
    work_unit: str = SIZE_UNIT
    published: Mapping[str, Any] | None = None
    note: str = ""

    def __post_init__(self):
        for name in ("alpha_ms", "beta_ms"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"LinearModel.{name} must be finite, got {getattr(self, name)!r}")
        if self.r2 is not None and not (self.r2 <= 1.0 + 1e-12):
            raise ValueError(f"LinearModel.r2 must be <= 1, got {self.r2!r}")

    def time_ms(self, x: float) -> float:
        if x < 0:
            raise ValueError(f"size / work must be >= 0, got {x!r}")
        return self.alpha_ms + self.beta_ms * x

    @classmethod
    def from_fit(cls, fit: LinearFit, work_unit: str = SIZE_UNIT, note: str = "") -> "LinearModel":
        return cls(fit.alpha, fit.beta, fit.r2, fit.n, work_unit, None, note)

    # ---- YAML form -----------------------------------------------------------------------
    _KEYS = ("alpha", "beta", "r2", "n", "work_unit", "beta_unit", "beta_unit_size", "published", "note")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str, *, is_comm: bool) -> "LinearModel":
        """Read `{alpha, beta, r2?, n?, work_unit, beta_unit?, beta_unit_size?, note?}`; a beta
        given per `beta_unit` (size `beta_unit_size` bytes / work units) is converted here.
        Communication models are per byte; compute models must name their work_unit."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping with alpha and beta, got {data!r}")
        unknown = sorted(set(data) - set(cls._KEYS), key=str)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(cls._KEYS)}")
        for key in ("alpha", "beta"):
            if key not in data:
                raise ValueError(f"{where}: missing {key!r} (alpha in ms, beta in ms per "
                                 f"{SIZE_UNIT if is_comm else 'work unit'})")
        if is_comm:
            work_unit = str(data.get("work_unit", SIZE_UNIT))
            if work_unit != SIZE_UNIT:
                raise ValueError(f"{where}: communication models are per {SIZE_UNIT!r}, got work_unit {work_unit!r}")
        elif not data.get("work_unit"):
            raise ValueError(f"{where}: give its work_unit (e.g. mac, flop)")
        else:
            work_unit = str(data["work_unit"])
        beta = _number(data["beta"], f"{where}.beta")
        if not isinstance(data.get("published") or {}, Mapping):
            raise ValueError(f"{where}.published: expected a mapping, got {data['published']!r}")
        published = dict(data["published"]) if data.get("published") is not None else None
        if "beta_unit_size" in data or "beta_unit" in data:
            if published is not None:
                raise ValueError(f"{where}: give either beta_unit/beta_unit_size (converted on load) "
                                 f"or an already converted beta with 'published', not both")
            if "beta_unit_size" not in data or "beta_unit" not in data:
                raise ValueError(f"{where}: beta_unit and beta_unit_size go together "
                                 f"(e.g. beta_unit: element, beta_unit_size: 4 bytes)")
            size = _number(data["beta_unit_size"], f"{where}.beta_unit_size")
            if size <= 0:
                raise ValueError(f"{where}.beta_unit_size must be > 0, got {size!r}")
            published = {"beta": beta, "beta_unit": str(data["beta_unit"]), "beta_unit_size": size}
            beta = beta / size
        r2 = _number(data["r2"], f"{where}.r2") if data.get("r2") is not None else None
        n = int(_number(data["n"], f"{where}.n")) if data.get("n") is not None else None
        alpha = _number(data["alpha"], f"{where}.alpha")
        try:
            return cls(alpha, beta, r2, n, work_unit, published, str(data.get("note", "")))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_dict(self, *, is_comm: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": float(self.alpha_ms), "beta": float(self.beta_ms)}
        if self.r2 is not None:
            out["r2"] = float(self.r2)
        if self.n is not None:
            out["n"] = int(self.n)
        if not is_comm:
            out["work_unit"] = self.work_unit
        if self.published is not None:
            out["published"] = dict(self.published)
        if self.note:
            out["note"] = self.note
        return out


# ==========================================================================================
# step names
# ==========================================================================================
def step_name(kind: str, level: int) -> str:
    """('intra', 0) -> 'flat', ('inter', 2) -> 'inter-2', ('intra', 1) -> 'intra-1'."""
    if kind not in ("inter", "intra"):
        raise ValueError(f"step kind {kind!r} is not allowed; allowed: 'inter', 'intra'")
    if level < (1 if kind == "inter" else 0):
        raise ValueError(f"{kind} level must be >= {1 if kind == 'inter' else 0}, got {level}")
    return "flat" if (kind, level) == ("intra", 0) else f"{kind}-{level}"


def parse_step(step: str) -> tuple[str, int]:
    """'flat' / 'intra-0' -> ('intra', 0); 'inter-1' -> ('inter', 1)."""
    if step == "flat":
        return "intra", 0
    m = _STEP_RE.match(step) if isinstance(step, str) else None
    if not m or (m[1], int(m[2])) == ("inter", 0):
        raise ValueError(f"step {step!r} is not allowed; allowed: 'flat', 'inter-<i>' (i >= 1), 'intra-<i>' (i >= 0)")
    return m[1], int(m[2])


def _canonical_step(step: str) -> str:
    return step_name(*parse_step(step))


def topology_steps(topology: Topology) -> list[str]:
    """Every communication step of a topology in HierMoE's order:
    flat, inter-1, intra-1, ..., inter-(D-1), intra-(D-1)."""
    out = ["flat"]
    for level in range(1, topology.D):
        out += [step_name("inter", level), step_name("intra", level)]
    return out


def shift_step(step: str, levels: int) -> str:
    """The same step seen from a topology with `levels` more levels above it: every index grows
    by `levels`, and 'flat' (the whole of the smaller topology) becomes 'intra-<levels>'."""
    kind, level = parse_step(step)
    return step_name(kind, level + levels)


# ==========================================================================================
# hardware profile
# ==========================================================================================
@dataclass(frozen=True)
class HardwareProfile:
    """The cost models of one machine (or cluster) of a named topology.

    comm: {(kind, step): LinearModel over bytes}; compute: {name: LinearModel over work units}.
    `provenance` records how a calibrated profile was made (host, versions, backend, date,
    command); `measurements` optionally keeps the measured points behind each fit."""

    name: str
    topology: str
    source: str
    description: str = ""
    notes: str = ""
    comm: Mapping[tuple[str, str], LinearModel] = field(default_factory=dict)
    compute: Mapping[str, LinearModel] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    measurements: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.name:
            raise ValueError("HardwareProfile.name must not be empty")
        if not self.source:
            raise ValueError(f"profile {self.name!r}: 'source' (a citation or the calibration command) is required")
        try:
            topo = get_topology(self.topology)
        except TopologyError as e:
            raise ValueError(f"profile {self.name!r}: topology: {e}") from None
        allowed_steps = topology_steps(topo)
        canonical: dict[tuple[str, str], LinearModel] = {}
        for (kind, step), model in self.comm.items():
            if kind not in COMM_KINDS:
                raise ValueError(f"profile {self.name!r}: communication kind {kind!r} is not allowed; "
                                 f"allowed: {', '.join(COMM_KINDS)}")
            step_c = _canonical_step(step)
            if step_c not in allowed_steps:
                raise ValueError(f"profile {self.name!r}: step {step!r} does not exist in topology "
                                 f"{topo.name!r} (D = {topo.D}); its steps: {', '.join(allowed_steps)}")
            if model.work_unit != SIZE_UNIT:
                raise ValueError(f"profile {self.name!r}: {kind}/{step} must be per {SIZE_UNIT!r}, got {model.work_unit!r}")
            if (kind, step_c) in canonical:
                raise ValueError(f"profile {self.name!r}: {kind}/{step} given twice ('intra-0' is 'flat')")
            canonical[(kind, step_c)] = model
        object.__setattr__(self, "comm", dict(sorted(canonical.items(), key=lambda kv: self._comm_order(kv[0], allowed_steps))))
        object.__setattr__(self, "compute", dict(self.compute))

    @staticmethod
    def _comm_order(key: tuple[str, str], steps: list[str]) -> tuple[int, int]:
        return COMM_KINDS.index(key[0]), steps.index(key[1])

    def get_topology(self) -> Topology:
        return get_topology(self.topology)

    # ---- lookups -------------------------------------------------------------------------
    def comm_model(self, kind: str, step: str) -> LinearModel:
        if kind not in COMM_KINDS:
            raise ValueError(f"communication kind {kind!r} is not allowed; allowed: {', '.join(COMM_KINDS)}")
        key = (kind, _canonical_step(step))
        if key not in self.comm:
            have = ", ".join(f"{k}/{s}" for k, s in self.comm) or "none"
            raise ValueError(f"profile {self.name!r} has no model for {kind}/{step}; it has: {have}")
        return self.comm[key]

    def compute_model(self, name: str) -> LinearModel:
        if name not in self.compute:
            have = ", ".join(self.compute) or "none"
            raise ValueError(f"profile {self.name!r} has no compute model {name!r}; it has: {have}")
        return self.compute[name]

    def comm_time(self, kind: str, step: str, nbytes: float) -> float:
        """Predicted time (ms) of one `kind` collective over the `step` groups moving `nbytes`
        per rank (nccl-tests size convention, see the module docstring)."""
        return self.comm_model(kind, step).time_ms(nbytes)

    def compute_time(self, name: str, work: float) -> float:
        """Predicted time (ms) of compute task `name` doing `work` units (its model's work_unit)."""
        return self.compute_model(name).time_ms(work)

    def has_comm(self, kind: str, step: str) -> bool:
        return (kind, _canonical_step(step)) in self.comm

    # ---- YAML form -----------------------------------------------------------------------
    _KEYS = ("name", "topology", "source", "description", "notes", "units", "comm", "compute", "provenance",
             "measurements")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "profile") -> "HardwareProfile":
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: top level must be a mapping")
        unknown = sorted(set(data) - set(cls._KEYS), key=str)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(cls._KEYS)}")
        for key in ("name", "topology", "source"):
            if not data.get(key):
                raise ValueError(f"{where}: missing {key!r}")
            if not isinstance(data[key], str):
                raise ValueError(f"{where}.{key}: expected a string, got {data[key]!r}")
        for key in ("comm", "compute", "provenance", "measurements"):
            if not isinstance(data.get(key) or {}, Mapping):
                raise ValueError(f"{where}.{key}: expected a mapping, got {data[key]!r}")
        units = data.get("units", {"time": TIME_UNIT, "size": SIZE_UNIT})
        if units != {"time": TIME_UNIT, "size": SIZE_UNIT}:
            raise ValueError(f"{where}.units must be {{time: {TIME_UNIT}, size: {SIZE_UNIT}}} (convert "
                             f"per-element betas with beta_unit / beta_unit_size), got {units!r}")
        comm: dict[tuple[str, str], LinearModel] = {}
        for kind, steps in (data.get("comm") or {}).items():
            if not isinstance(steps, Mapping):
                raise ValueError(f"{where}.comm.{kind}: expected a mapping step -> {{alpha, beta}}")
            for step, model in steps.items():
                comm[(str(kind), str(step))] = LinearModel.from_dict(model, f"{where}.comm.{kind}.{step}", is_comm=True)
        compute = {str(name): LinearModel.from_dict(model, f"{where}.compute.{name}", is_comm=False)
                   for name, model in (data.get("compute") or {}).items()}
        return cls(name=str(data["name"]), topology=str(data["topology"]), source=str(data["source"]).strip(),
                   description=str(data.get("description", "")).strip(), notes=str(data.get("notes", "")).strip(),
                   comm=comm, compute=compute, provenance=dict(data.get("provenance") or {}),
                   measurements=dict(data.get("measurements") or {}))

    def to_dict(self) -> dict[str, Any]:
        comm: dict[str, dict[str, Any]] = {}
        for (kind, step), model in self.comm.items():
            comm.setdefault(kind, {})[step] = model.to_dict(is_comm=True)
        out: dict[str, Any] = {"name": self.name, "description": self.description, "topology": self.topology,
                               "source": self.source, "notes": self.notes,
                               "units": {"time": TIME_UNIT, "size": SIZE_UNIT}, "comm": comm,
                               "compute": {n: m.to_dict(is_comm=False) for n, m in self.compute.items()}}
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        if self.measurements:
            out["measurements"] = dict(self.measurements)
        return out


# ==========================================================================================
# files
# ==========================================================================================
def list_profiles(directory: str | Path = PROFILES_DIR) -> list[str]:
    """Names of the profiles shipped in `directory` (file stems of *.yaml)."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def load_profile(name_or_path: str | Path, directory: str | Path = PROFILES_DIR) -> HardwareProfile:
    """A shipped profile by name ('hiermoe-testbed') or any profile YAML by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(directory) / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown hardware profile {str(name_or_path)!r}; available: "
                             f"{', '.join(list_profiles(directory)) or 'none'} (or a path to a .yaml file)")
    elif not path.is_file():
        raise ValueError(f"hardware profile file {str(path)!r} does not exist")
    return HardwareProfile.from_dict(load_yaml(path), where=str(path))


class _ProfileDumper(yaml.SafeDumper):
    """Block style, keys in insertion order, multi-line strings as literal blocks."""


def _str_presenter(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _list_presenter(dumper, value: list):
    """Lists of numbers on one line (measured points), anything else as a block."""
    flow = all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow or None)


_ProfileDumper.add_representer(str, _str_presenter)
_ProfileDumper.add_multi_representer(str, _str_presenter)  # str subclasses too (torch versions)
_ProfileDumper.add_representer(list, _list_presenter)


def save_profile(profile: HardwareProfile, path: str | Path) -> Path:
    """Write `profile` as YAML, atomically (a temporary file renamed into place)."""
    text = yaml.dump(profile.to_dict(), Dumper=_ProfileDumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)
    return atomic_write_text(path, text)


def sub_topology_profile(profile: HardwareProfile, name: str, topology: str, source: str | None = None,
                         notes: str = "") -> HardwareProfile:
    """The profile of a sub-tree of `profile`'s topology: `topology` must equal its lower levels
    (e.g. one node of the HierMoE testbed). Each step of the sub-tree takes the model of the
    same ranks' step in the full topology (`shift_step`); compute models carry over."""
    full, sub = profile.get_topology(), get_topology(topology)
    dropped = full.D - sub.D
    if dropped < 0 or [(lv.name, lv.fanout) for lv in full.levels[dropped:]] != [(lv.name, lv.fanout) for lv in sub.levels]:
        raise ValueError(f"topology {topology!r} ({sub.describe()}) is not the lower part of "
                         f"{full.name!r} ({full.describe()})")
    comm = {}
    for step in topology_steps(sub):
        for kind in COMM_KINDS:
            outer = shift_step(step, dropped)
            if profile.has_comm(kind, outer):
                comm[(kind, step)] = profile.comm_model(kind, outer)
    return dataclasses.replace(profile, name=name, topology=topology, source=source or profile.source,
                               notes=notes or profile.notes, comm=comm, provenance={}, measurements={})


def profile_summary(profile: HardwareProfile) -> Iterable[str]:
    """Human-readable lines: one per model with alpha, beta and r^2."""
    yield f"{profile.name}  (topology {profile.topology})"
    for (kind, step), m in profile.comm.items():
        r2 = "" if m.r2 is None else f"  r2={m.r2:.6f}"
        yield f"  {kind:<13} {step:<8} alpha={m.alpha_ms:.4g} ms  beta={m.beta_ms:.4g} ms/byte{r2}"
    for name, m in profile.compute.items():
        r2 = "" if m.r2 is None else f"  r2={m.r2:.6f}"
        yield f"  compute {name:<13} alpha={m.alpha_ms:.4g} ms  beta={m.beta_ms:.4g} ms/{m.work_unit}{r2}"
