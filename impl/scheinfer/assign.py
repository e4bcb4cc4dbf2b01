"""ScheInfer's token assignment: which resource processes how many tokens of each FFN / expert in
prefill and in decode (scheinfer.md 4).

Paper [V/S]: a strategy that treats prompt and generation work differently and changes how many
tokens each resource processes, to cut the CPU's load. Its rule is not public; the modes below are
the digest's interpretations [R] (4.2), all behind `mode`:

* 'split' - no extra rule: each active expert gets `optimal_split` for its own token count n_e,
  so large n_e drive the CC share down by themselves (per phase: prefill n_e large, decode n_e = 1).
* 'threshold' - the CPU only ever sees few tokens: an expert with n_e > n_star (the break-even
  token count of one tile, `break_even_tokens`, or a given one) sends its CC rows to CG.
* 'makespan' - per layer, whole-expert decisions (Fiddler's generalisation): each active expert's
  off-GPU rows go entirely to the CPU or entirely to the copy+GPU path, chosen to minimise
  max(sum of CPU times, sum of GPU-path times); experts sorted by n_e and the CPU takes the k
  smallest (O(E log E) sweep), or `exhaustive=True` enumerates all 2^E subsets (E <= 16).
* `token_split` - for rows present on both sides, the number of tokens n_c the CPU should take so
  that T_cpu(n_c) and T_gpu(n - n_c) balance (the digest's option 3; a planning helper).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Hashable, Sequence

from impl.common.config import ConfigError

from .partition import CostModel, Split, lane_times, optimal_split

__all__ = ["ASSIGN_MODES", "ExpertLoad", "break_even_tokens", "assign_layer", "layer_makespan", "token_split"]

ASSIGN_MODES = ("split", "threshold", "makespan")
MAX_EXHAUSTIVE = 16


@dataclass(frozen=True)
class ExpertLoad:
    """One active FFN in a layer: its key, token count, width F and resident (GG) rows."""

    key: Hashable
    n: int
    width: int
    gg: int


def break_even_tokens(cost: CostModel, hidden: int, tile: int, dtype_bytes: int, limit: int = 1 << 16) -> int:
    """n*: the largest token count at which one tile is no slower on the CPU than copied + run on
    the GPU (0 if the GPU path always wins; `limit` if the CPU always does)."""
    def cpu_wins(n: int) -> bool:
        t_cpu = lane_times(cost, n, hidden, Split(tile, 0, 0), dtype_bytes).cpu
        return t_cpu <= lane_times(cost, n, hidden, Split(0, tile, 0), dtype_bytes).offload
    if not cpu_wins(1):
        return 0
    lo, hi = 1, limit                     # CPU time per tile grows faster in n than the GPU path's
    if cpu_wins(hi):
        return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cpu_wins(mid) else (lo, mid)
    return lo


def layer_makespan(cost: CostModel, loads: Sequence[ExpertLoad], splits: Sequence[Split], hidden: int,
                   dtype_bytes: int) -> float:
    """Predicted time of a layer's FFNs run on the three lanes: max(CPU total, GPU-path total),
    the GPU path being max(GG+CG compute, CG copies + the last CG compute) [R]."""
    ts = [lane_times(cost, ld.n, hidden, s, dtype_bytes) for ld, s in zip(loads, splits)]
    cpu = sum(t.cpu for t in ts)
    gpu = sum(t.gpu for t in ts)
    h2d = sum(t.h2d for t in ts)
    last_cg = next((t.gpu - lane_times(cost, ld.n, hidden, Split(0, 0, s.gg), dtype_bytes).gpu
                    for ld, s, t in zip(reversed(loads), reversed(splits), reversed(ts)) if s.cg), 0.0)
    return max(cpu, gpu, h2d + last_cg)


def assign_layer(cost: CostModel, loads: Sequence[ExpertLoad], hidden: int, tile: int, dtype_bytes: int,
                 mode: str = "split", cg_max: int | None = None, n_star: int | None = None,
                 exhaustive: bool = False) -> list[Split]:
    """Splits for the active FFNs of one layer (module doc for the modes)."""
    if mode not in ASSIGN_MODES:
        raise ConfigError(f"assign mode={mode!r} is not allowed; expected one of {', '.join(ASSIGN_MODES)}")
    opt = lambda ld: optimal_split(cost, ld.n, hidden, ld.width, ld.gg, tile, dtype_bytes, cg_max)  # noqa: E731
    if mode == "split":
        return [opt(ld) for ld in loads]
    if mode == "threshold":
        star = break_even_tokens(cost, hidden, tile, dtype_bytes) if n_star is None else n_star
        out = []
        for ld in loads:
            r = ld.width - ld.gg
            big = ld.n > star and (cg_max is None or r <= cg_max)
            out.append(Split(0, r, ld.gg) if big else opt(ld))
        return out
    # 'makespan': whole-expert CPU / GPU choices for the off-GPU rows
    def splits_for(on_cpu: set[int]) -> list[Split]:
        out = []
        for j, ld in enumerate(loads):
            r = ld.width - ld.gg
            fits = cg_max is None or r <= cg_max
            out.append(Split(r, 0, ld.gg) if (j in on_cpu or not fits) else Split(0, r, ld.gg))
        return out
    idx = list(range(len(loads)))
    if exhaustive:
        if len(loads) > MAX_EXHAUSTIVE:
            raise ConfigError(f"exhaustive assignment over {len(loads)} experts is not allowed; "
                              f"expected <= {MAX_EXHAUSTIVE}")
        subsets = (set(c) for k in range(len(idx) + 1) for c in itertools.combinations(idx, k))
    else:
        order = sorted(idx, key=lambda j: (loads[j].n, j))
        subsets = (set(order[:k]) for k in range(len(idx) + 1))
    best = None
    for s in subsets:
        sp = splits_for(s)
        t = layer_makespan(cost, loads, sp, hidden, dtype_bytes)
        if best is None or t < best[0]:
            best = (t, sp)
    return best[1]


def token_split(cost: CostModel, n: int, hidden: int, rows: int) -> int:
    """Tokens n_c (of n) the CPU should compute on `rows` rows present on both sides, the GPU
    taking the other n - n_c: argmin of max(T_cpu(n_c), T_gpu(n - n_c)) (ties: fewest on CPU)."""
    if n < 0 or rows < 0:
        raise ValueError(f"token_split: n={n}, rows={rows}; expected >= 0")
    macs = lambda m: 3.0 * m * hidden * rows  # noqa: E731
    return min(range(n + 1), key=lambda c: (max(cost.cpu.time(c, macs(c)), cost.gpu.time(n - c, macs(n - c))), c))
