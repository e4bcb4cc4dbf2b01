"""FSMoE's pipeline-degree optimiser (Algorithm 1, digest §3.2-3.5), three ways side by side.

For a pass of one MoE layer with per-chunk times t_x(r) (`costs.PassModel`) and a gradient slice
t_gar, predicates Q1..Q7 choose one of four closed-form makespans:

    Case 1 (inter-node bound):  2 r t_a2a + t_gar
    Case 2 (compute bound):     2 t_a2a + t_ag + t_rs + r t_exp
    Case 3 (AlltoAll bound):    2 r t_a2a + t_ag + t_rs
    Case 4 (intra-node bound):  2 t_a2a + r t_ag + r t_rs

At any r exactly one case holds (the predicates partition the space), so `case_time(model, r)` is
a function of r, and:

* `integer_optimum(model, domain)`: the r of the domain (1..8, or {1, 2, 4, 8}) with the smallest
  case time: our choice, exact for the model, microseconds per configuration;
* `slsqp_degree(model)`: the paper's method: each case's makespan minimised over real r >= 1 under
  that case's predicates with scipy's SLSQP, then rounded as the released solver does (ceil up to
  the next power of two, floor down to the previous one, both capped at 8, each re-checked against
  the case's constraints with tolerance 1e-5, the feasible one with the lower time kept); the
  released solver's extra rules are options: a single un-pipelined AlltoAll under 1 ms gives r = 1;
* `timeline_optimum(model, domain, schedule)`: the r whose schedule has the smallest simulated
  makespan, the ground truth the case formulas relax (digest §8.5: Cases 3 and 4 leave out the
  last chunk's expert time).

Forward passes use t_gar = 0; backward passes the 2x expert model (`costs`) and the layer's t_gar.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from scipy.optimize import minimize

from impl.common.timeline import Schedule, simulate

from .costs import PassModel

__all__ = ["DOMAINS", "predicates", "case_of", "case_time", "case_times", "integer_optimum", "slsqp_degree",
           "timeline_optimum", "timeline_time", "DegreeChoice", "olp_moe"]

DOMAINS = {"1..8": tuple(range(1, 9)), "pow2": (1, 2, 4, 8)}


def _parts(m: PassModel, r: float) -> tuple[float, float, float, float]:
    return m.a2a.at(r), m.ag.at(r), m.rs.at(r), m.exp.at(r)


def predicates(m: PassModel, r: float) -> dict[str, bool]:
    a2a, ag, rs, exp = _parts(m, r)
    surplus = r * exp - 2 * (r - 1) * a2a          # expert work beyond the AlltoAlls it can hide
    return {
        "Q1": a2a > ag,
        "Q2": r * exp > 2 * (r - 1) * a2a,
        "Q3": r * exp > (r - 1) * (ag + rs),
        "Q4": m.t_gar > ag + rs,
        "Q5": m.t_gar > surplus + ag + rs,
        "Q6": m.t_gar > r * ag + r * rs - 2 * (r - 1) * a2a,
        "Q7": m.t_gar > ag + rs + surplus,
    }


def case_of(m: PassModel, r: float) -> int:
    q = predicates(m, r)
    if q["Q1"]:
        if q["Q2"]:
            return 1 if q["Q5"] else 2
        return 1 if q["Q4"] else 3
    if q["Q3"]:
        return 1 if q["Q7"] else 2
    return 1 if q["Q6"] else 4


def case_times(m: PassModel, r: float) -> dict[int, float]:
    """All four closed forms at r (only `case_of` is the model's prediction)."""
    a2a, ag, rs, exp = _parts(m, r)
    return {1: 2 * r * a2a + m.t_gar, 2: 2 * a2a + ag + rs + r * exp, 3: 2 * r * a2a + ag + rs,
            4: 2 * a2a + r * ag + r * rs}


def case_time(m: PassModel, r: float) -> float:
    return case_times(m, r)[case_of(m, r)]


def olp_moe(m: PassModel, r: float) -> float:
    """t_olp,moe(r): the MoE layer's idle inter-node window with t_gar = 0 (digest §4.2; only
    Cases 2-4 occur without a gradient slice)."""
    a2a, ag, rs, exp = _parts(m, r)
    case = case_of(m.with_gar(0.0), r)
    if case == 2:
        return r * exp + ag + rs - 2 * (r - 1) * a2a
    if case == 3:
        return ag + rs
    return r * ag + r * rs - 2 * (r - 1) * a2a


@dataclass(frozen=True)
class DegreeChoice:
    r: int
    time: float            # the method's own estimate of the pass (ms)
    case: int | None = None
    method: str = ""


def integer_optimum(m: PassModel, domain: Iterable[int] = DOMAINS["1..8"]) -> DegreeChoice:
    """argmin over the domain of the case time (ties: the smaller r)."""
    best = min(domain, key=lambda r: (case_time(m, r), r))
    return DegreeChoice(best, case_time(m, best), case_of(m, best), "enumeration")


# ---- the paper's solver: SLSQP per case, rounded to powers of two -----------------------------
_TOL = 1e-5


def _constraints(m: PassModel, case: int) -> list[list[Callable[[float], float]]]:
    """Each case as a union of conjunctions (digest §3.3); each term g(r) >= 0 must hold."""
    def a2a(r): return m.a2a.at(r)
    def ag(r): return m.ag.at(r)
    def rs(r): return m.rs.at(r)
    def exp(r): return m.exp.at(r)
    q1 = lambda r: a2a(r) - ag(r)                                          # noqa: E731
    q2 = lambda r: r * exp(r) - 2 * (r - 1) * a2a(r)                       # noqa: E731
    q3 = lambda r: r * exp(r) - (r - 1) * (ag(r) + rs(r))                  # noqa: E731
    q4 = lambda r: m.t_gar - ag(r) - rs(r)                                 # noqa: E731
    q5 = lambda r: m.t_gar - q2(r) - ag(r) - rs(r)                         # noqa: E731
    q6 = lambda r: m.t_gar - r * ag(r) - r * rs(r) + 2 * (r - 1) * a2a(r)  # noqa: E731
    q7 = lambda r: m.t_gar - ag(r) - rs(r) - q2(r)                         # noqa: E731
    neg = lambda f: (lambda r: -f(r))                                      # noqa: E731
    table = {
        1: [[q1, neg(q2), q4], [q1, q2, q5], [neg(q1), neg(q3), q6], [neg(q1), q3, q7]],
        2: [[q1, q2, neg(q5)], [neg(q1), q3, neg(q7)]],
        3: [[q1, neg(q2), neg(q4)]],
        4: [[neg(q1), neg(q3), neg(q6)]],
    }
    return table[case]


def _feasible(terms: list[Callable[[float], float]], r: float) -> bool:
    return all(g(r) >= -_TOL for g in terms)


def _round_pow2(r: float) -> tuple[int, int]:
    up = min(8, 1 << max(0, math.ceil(math.log2(max(1.0, math.ceil(r - 1e-12))))))
    down = min(8, 1 << max(0, math.floor(math.log2(max(1.0, math.floor(r + 1e-12))))))
    return down, up


def slsqp_degree(m: PassModel, *, one_ms_rule: bool = False) -> DegreeChoice:
    """Every case's sub-problems solved by SLSQP from r = 1 and r = 8, rounded to {1, 2, 4, 8} and
    re-checked; the lowest feasible time wins. With `one_ms_rule`, an un-pipelined AlltoAll under
    1 ms gives r = 1 (the released solver's heuristic)."""
    if one_ms_rule and m.a2a.at(1) < 1.0:
        return DegreeChoice(1, case_time(m, 1), case_of(m, 1), "slsqp")
    best: DegreeChoice | None = None
    for case in (1, 2, 3, 4):
        objective = lambda x, c=case: case_times(m, float(x[0]))[c]        # noqa: E731
        for terms in _constraints(m, case):
            cons = [{"type": "ineq", "fun": (lambda x, g=g: g(float(x[0])))} for g in terms]
            for start in (1.0, 8.0):
                res = minimize(objective, np.array([start]), method="SLSQP", bounds=[(1.0, 8.0)],
                               constraints=cons, options={"ftol": 1e-9, "maxiter": 100})
                if not res.success and not _feasible(terms, float(res.x[0])):
                    continue
                for r in set(_round_pow2(float(res.x[0]))):
                    if _feasible(terms, float(r)):
                        t = case_times(m, float(r))[case]
                        if best is None or (t, r) < (best.time, best.r):
                            best = DegreeChoice(r, t, case, "slsqp")
    if best is None:     # no sub-problem had a feasible rounded point: the model's own case at r = 1
        return DegreeChoice(1, case_time(m, 1), case_of(m, 1), "slsqp")
    return best


# ---- the ground truth: simulate the schedule of every candidate -------------------------------
def timeline_time(m: PassModel, r: int, schedule: Callable[[int], Schedule]) -> float:
    """Simulated makespan of the pass at degree r (durations from the model)."""
    return simulate(schedule(r).with_durations(lambda t: m.duration(t.kind, r))).makespan


def timeline_optimum(m: PassModel, schedule: Callable[[int], Schedule],
                     domain: Iterable[int] = DOMAINS["1..8"]) -> DegreeChoice:
    times = {r: timeline_time(m, r, schedule) for r in domain}
    best = min(times, key=lambda r: (times[r], r))
    return DegreeChoice(best, times[best], None, "timeline")
