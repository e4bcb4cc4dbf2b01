"""ScheInfer's cost model and CC / CG / GG partition optimiser (scheinfer.md 2.2, 3.2-3.3).

Every FFN / expert weight is cut along its intermediate dimension F into three row bands
(`Split`): CC = rows [0, cc) computed by the CPU, CG = rows [cc, cc+cg) copied host->GPU and
computed there, GG = rows [F-gg, F) resident on the GPU. What is the paper's and what is ours:

* Paper [S/V]: the three groups, their concurrent execution, an optimisation model that sizes them
  from CPU / GPU / PCIe capability and GPU memory, different ratios in prefill and decode.
* Reconstruction [R] (the paper's formulas are not public): formulation (A) of the digest: GG is
  static, sized by the memory budget (`resident_rows`: 'uniform' fraction per FFN, or whole experts
  by 'popularity' as Fiddler does); the CC/CG split of the remaining rows is re-solved at run time
  for each (phase, expert) from its token count n (`optimal_split`); slices are whole kernel tiles
  (the last tile of F may be partial). The lanes' times are linear models (`CostModel`); the
  makespan of one FFN is max(T_cpu(cc), T_gpu(gg) + T_gpu(cg), T_h2d(cg) + T_gpu(cg)): the CG
  compute cannot start before its copy lands, and the GPU runs GG and CG one after the other.
* The optimiser is exact for this model: T_cpu grows with cc and the GPU/PCIe path shrinks with it,
  so the makespan's minimum over whole tiles sits at their crossing, found by bisection in
  O(log(F/tile)); `brute_force_split` is the grid search it is tested against.
"""
from __future__ import annotations

import bisect
import heapq
import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping

from impl.common.config import ConfigError

__all__ = ["PerRowLinear", "CostModel", "Split", "LaneTimes", "lane_times", "optimal_split",
           "brute_force_split", "tile_candidates", "resident_rows", "GG_MODES", "REFERENCE_COST"]

GG_MODES = ("uniform", "popularity")


@dataclass(frozen=True)
class PerRowLinear:
    """t(n, macs) = alpha_s + s_per_mac(n) * macs for one call on n rows (tokens).

    s_per_mac is measured at a few row counts (`rows`), clamped at the ends: GEMV-like calls (few
    rows) are memory bound, so their time per MAC is higher. In between, the time per MAC and
    per weight row, n * s_per_mac(n), is interpolated linearly in n: then both pure regimes are
    exact, a memory-bound term (s_per_mac ~ 1/n: the weights are read once per call) and a
    compute-bound one (s_per_mac constant); interpolating s_per_mac itself would overstate the
    memory-bound time between grid points (by 12.5 % at n = 3 between 2 and 4)."""

    rows: tuple[int, ...]
    s_per_mac: tuple[float, ...]
    alpha_s: float = 0.0

    def __post_init__(self):
        if not self.rows or len(self.rows) != len(self.s_per_mac):
            raise ConfigError(f"PerRowLinear: rows={self.rows!r} and s_per_mac={self.s_per_mac!r} must "
                              "be non-empty and of equal length")
        if list(self.rows) != sorted(set(self.rows)) or self.rows[0] < 1:
            raise ConfigError(f"PerRowLinear: rows={self.rows!r} must be strictly increasing integers >= 1")
        if any(not (math.isfinite(v) and v >= 0) for v in (*self.s_per_mac, self.alpha_s)):
            raise ConfigError(f"PerRowLinear: s_per_mac={self.s_per_mac!r}, alpha_s={self.alpha_s!r} "
                              "must be finite numbers >= 0")

    def per_mac(self, n: int) -> float:
        r, v = self.rows, self.s_per_mac
        if n <= r[0]:
            return v[0]
        if n >= r[-1]:
            return v[-1]
        j = bisect.bisect_right(r, n)
        a, b = r[j - 1], r[j]
        ga, gb = a * v[j - 1], b * v[j]
        return (ga + (gb - ga) * (n - a) / (b - a)) / n

    def time(self, n: int, macs: float) -> float:
        return 0.0 if macs <= 0 else self.alpha_s + self.per_mac(n) * macs


@dataclass(frozen=True)
class CostModel:
    """Linear time models of the three lanes: CPU GEMM/GEMV, GPU GEMM, host->device copy."""

    cpu: PerRowLinear
    gpu: PerRowLinear
    h2d_bytes_per_s: float
    h2d_alpha_s: float = 0.0
    source: str = "given"               # 'calibrated:<device>' or 'reference' (never silently mixed)

    def __post_init__(self):
        if not (math.isfinite(self.h2d_bytes_per_s) and self.h2d_bytes_per_s > 0):
            raise ConfigError(f"CostModel: h2d_bytes_per_s={self.h2d_bytes_per_s!r}; expected a number > 0")
        if not (math.isfinite(self.h2d_alpha_s) and self.h2d_alpha_s >= 0):
            raise ConfigError(f"CostModel: h2d_alpha_s={self.h2d_alpha_s!r}; expected a number >= 0")

    def h2d_time(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.h2d_alpha_s + nbytes / self.h2d_bytes_per_s

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CostModel":
        try:
            return cls(cpu=PerRowLinear(tuple(d["cpu"]["rows"]), tuple(d["cpu"]["s_per_mac"]), d["cpu"]["alpha_s"]),
                       gpu=PerRowLinear(tuple(d["gpu"]["rows"]), tuple(d["gpu"]["s_per_mac"]), d["gpu"]["alpha_s"]),
                       h2d_bytes_per_s=d["h2d_bytes_per_s"], h2d_alpha_s=d.get("h2d_alpha_s", 0.0),
                       source=d.get("source", "given"))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"CostModel: bad cost description ({e!r}); expected keys cpu{{rows,s_per_mac,alpha_s}}, "
                              "gpu{rows,s_per_mac,alpha_s}, h2d_bytes_per_s[, h2d_alpha_s]") from None

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """The cost model of a JSON file: a `calibrate --out` output (the model under 'cost') or a
        bare cost description; ConfigError naming the file and what is wrong otherwise."""
        path = Path(path)
        try:
            d = json.loads(path.read_bytes())
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if isinstance(d, dict) and isinstance(d.get("cost"), dict):
            d = d["cost"]
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object (a 'calibrate --out' file), got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# The digest's example hardware [D] (scheinfer.md 3.4): CPU 1 TFLOP/s compute / 100 GB/s DRAM in
# bf16, GPU ~100 TFLOP/s, PCIe 4.0 25 GB/s. For documentation and tests; runs use calibrate.py.
def _reference() -> CostModel:
    b, fc, bc, fg = 2, 1e12, 100e9, 100e12
    rows = (1, 4, 16, 64, 256)
    cpu = tuple(max(2 / fc, b / (n * bc)) for n in rows)        # a MAC reads b/n weight bytes
    gpu = tuple(max(2 / fg, b / (n * 2e12)) for n in rows)
    return CostModel(PerRowLinear(rows, cpu, 5e-6), PerRowLinear(rows, gpu, 5e-6), 25e9, 5e-6, "reference")


REFERENCE_COST = _reference()


# ----------------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class Split:
    """Row counts of the three bands of one FFN of width cc + cg + gg (layout in module doc)."""

    cc: int
    cg: int
    gg: int

    def __post_init__(self):
        if min(self.cc, self.cg, self.gg) < 0:
            raise ValueError(f"Split{(self.cc, self.cg, self.gg)}: row counts must be >= 0")

    @property
    def width(self) -> int:
        return self.cc + self.cg + self.gg

    def bands(self) -> dict[str, tuple[int, int]]:
        """name -> [start, stop) rows of F."""
        return {"cc": (0, self.cc), "cg": (self.cc, self.cc + self.cg), "gg": (self.cc + self.cg, self.width)}


@dataclass(frozen=True)
class LaneTimes:
    cpu: float
    h2d: float
    gpu: float           # GG then CG compute
    offload: float       # the GPU/PCIe path: max(GG + CG compute, CG copy + CG compute)
    makespan: float


def lane_times(cost: CostModel, n: int, hidden: int, split: Split, dtype_bytes: int) -> LaneTimes:
    """Predicted lane times of one FFN (3 matrices of [rows, hidden]) on n tokens."""
    macs = lambda rows: 3.0 * n * hidden * rows  # noqa: E731
    t_cpu = cost.cpu.time(n, macs(split.cc))
    t_h2d = cost.h2d_time(3.0 * hidden * split.cg * dtype_bytes)
    t_gg, t_cgc = cost.gpu.time(n, macs(split.gg)), cost.gpu.time(n, macs(split.cg))
    offload = max(t_gg, t_h2d) + t_cgc
    return LaneTimes(t_cpu, t_h2d, t_gg + t_cgc, offload, max(t_cpu, offload))


def tile_candidates(rows: int, tile: int) -> list[int]:
    """Tile-snapped sizes 0, tile, 2*tile, ..., rows (the last tile may be partial)."""
    if tile < 1:
        raise ConfigError(f"tile={tile!r} is not allowed; expected an integer >= 1")
    return [min(k * tile, rows) for k in range(-(-rows // tile) + 1)] if rows > 0 else [0]


def _check(n: int, width: int, gg: int, cg_max: int | None):
    if n < 0:
        raise ValueError(f"n={n} tokens; expected >= 0")
    if not 0 <= gg <= width:
        raise ValueError(f"gg={gg} rows is outside 0..{width}")
    if cg_max is not None and cg_max < 0:
        raise ValueError(f"cg_max={cg_max}; expected >= 0 or None")


def optimal_split(cost: CostModel, n: int, hidden: int, width: int, gg: int, tile: int, dtype_bytes: int,
                  cg_max: int | None = None) -> Split:
    """The tile-snapped CC/CG split of the width - gg off-GPU rows that minimises the makespan
    (ties: the fewest CC rows). cg_max bounds CG by the staging buffers (None: no bound)."""
    _check(n, width, gg, cg_max)
    cands = tile_candidates(width - gg, tile)
    r = width - gg
    if cg_max is not None:
        cands = [c for c in cands if r - c <= cg_max] or [r]
    span = lambda c: lane_times(cost, n, hidden, Split(c, r - c, gg), dtype_bytes)  # noqa: E731
    # f(c) = T_cpu is non-decreasing in c, g(c) = GPU/PCIe path is non-increasing: min of max(f, g)
    # lies at the first candidate with f >= g or just before it.
    lo, hi = 0, len(cands) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        t = span(cands[mid])
        if t.cpu >= t.offload:
            hi = mid
        else:
            lo = mid + 1
    best = min((j for j in (lo - 1, lo) if 0 <= j < len(cands)), key=lambda j: (span(cands[j]).makespan, j))
    c = cands[best]
    return Split(c, r - c, gg)


def brute_force_split(cost: CostModel, n: int, hidden: int, width: int, gg: int, tile: int, dtype_bytes: int,
                      cg_max: int | None = None) -> Split:
    """Grid search over every tile-snapped split: the reference `optimal_split` must equal."""
    _check(n, width, gg, cg_max)
    r = width - gg
    best = None
    for c in tile_candidates(r, tile):
        if cg_max is not None and r - c > cg_max and c != r:
            continue
        t = lane_times(cost, n, hidden, Split(c, r - c, gg), dtype_bytes).makespan
        if best is None or t < best[0]:
            best = (t, c)
    return Split(best[1], r - best[1], gg)


# ----------------------------------------------------------------------------------- GG sizing

def resident_rows(ffns: Mapping[tuple[int, int | str], int], hidden: int, dtype_bytes: int, budget_bytes: int,
                  tile: int, mode: str = "uniform", popularity: Mapping[tuple[int, int | str], float] | None = None,
                  ) -> dict[tuple[int, int | str], int]:
    """GG rows per FFN key (layer, expert) -> width, for a GPU budget in bytes (already net of
    non-FFN weights, KV cache and staging buffers). Rows are always a suffix of F (module doc).

    'uniform' [R, digest 3.3 step 1]: the same tile-snapped FRACTION f of every FFN,
    rows(w, f) = w if f >= 1 else floor(f * w / tile) * tile, with f the largest that fits
    (bisection over the fractions where some rows(w, f) steps); then what is left of the budget
    is filled one tile at a time (min(tile, w - rows) rows), always to the FFN with the smallest
    resident fraction rows / w that still takes its next tile (ties: key order). Guarantee: either
    every FFN is wholly resident, or the unused budget is smaller than the next tile of every FFN
    not wholly resident (so smaller than tile rows); no FFN's fraction falls below f.
    'popularity' [Fiddler]: whole FFNs in decreasing popularity (ties: key order) while they fit."""
    if mode not in GG_MODES:
        raise ConfigError(f"gg mode={mode!r} is not allowed; expected one of {', '.join(GG_MODES)}")
    if budget_bytes < 0:
        raise ConfigError(f"GPU budget={budget_bytes!r} bytes is not allowed; expected >= 0")
    if tile < 1:
        raise ConfigError(f"tile={tile!r} is not allowed; expected an integer >= 1")
    row_bytes = 3 * hidden * dtype_bytes
    keys = sorted(ffns, key=str)
    if mode == "popularity":
        pop = popularity or {}
        out = {k: 0 for k in keys}
        left = budget_bytes
        for k in sorted(keys, key=lambda k: -pop.get(k, 0.0)):
            if ffns[k] * row_bytes <= left:
                out[k], left = ffns[k], left - ffns[k] * row_bytes
        return out

    def rows(f: Fraction) -> dict:
        return {k: ffns[k] if f >= 1 else math.floor(f * ffns[k] / tile) * tile for k in keys}

    def used(r: Mapping) -> int:
        return sum(r.values()) * row_bytes
    steps = sorted({Fraction(j * tile, w) for w in set(ffns.values()) if w > 0
                    for j in range(1, -(-w // tile)) if j * tile < w} | {Fraction(0), Fraction(1)})
    lo, hi = 0, len(steps) - 1                   # largest step f with used(rows(f)) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if used(rows(steps[mid])) <= budget_bytes else (lo, mid - 1)
    out = rows(steps[lo])
    left = budget_bytes - used(out)
    order = {k: j for j, k in enumerate(keys)}
    heap = [(Fraction(out[k], ffns[k]), order[k], k) for k in keys if out[k] < ffns[k]]
    heapq.heapify(heap)
    while heap:
        _, j, k = heapq.heappop(heap)
        more = min(tile, ffns[k] - out[k])
        if more * row_bytes > left:             # never fits later either: the budget only shrinks
            continue
        out[k] += more
        left -= more * row_bytes
        if out[k] < ffns[k]:
            heapq.heappush(heap, (Fraction(out[k], ffns[k]), j, k))
    return out
