"""FSMoE's adaptive gradient partitioning (digest §4), and the gradient placements of the
schedules it is compared with.

The dense parameters' gradients of block b exist once block b's dense backward has run (blocks
are processed last to first in the backward). Their AllReduce uses the inter-node link, which the
MoE layers' AlltoAlls use too, but which idles in two windows of every later-processed block b':
inside its MoE backward (t_olp,moe, from Algorithm 1 with t_gar = 0) and during its dense backward
(t_olp,dense). FSMoE:

1. **Step 1** (greedy carry-over, Eqs. 3-4): walking the blocks in backward order, the gradients
   waiting (those produced so far and not yet placed) fill block b's MoE window, then its dense
   window, first produced first (ours: the released code's LIFO stack is not reproduced); what
   does not fit is carried to the next block. What is left after the last block is the leftover.
2. **Step 2** (Eq. 5): amounts x_b of the leftover are pushed *into* MoE backward passes beyond
   their windows, which raises their t_gar and may change their best degree r_bwd; the objective
   is sum_b f_moe^b(t_ar(window_b + x_b)) + t_ar(leftover - sum_b x_b) (the exposed tail), under
   the causal constraint that a block can take only gradients produced before it (prefix sums).
   Solved by scipy's differential evolution over a grid of `grid` steps per block (integrality;
   a population of 15 per variable, at most `maxiter` = 100 generations; the variables are the
   `max_push_blocks` = 8 last-processed blocks with leftover available), kept only if it beats
   pushing nothing. The pushes are then carried out in backward order, which realises every x_b
   the constraint admits.

`partition` returns the resulting `GradTask`s and per-block r_bwd; the planner
(`planner.best_of`) compares the simulated iteration with the plan against the no-partitioning
placement (every block's gradient all-reduced whole as soon as it exists) and keeps the faster, so
the plan is never slower than not partitioning. The baselines' placements are `whole_after` (Tutel, DeepSpeed-MoE),
`dense_windows` (Tutel-Improved: only non-MoE windows) and `fixed_chunks` (Lina's 30 MB chunks into
whichever window is next, no re-optimisation of r).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, differential_evolution

from .costs import BlockCosts, PassModel
from .degree import DOMAINS, integer_optimum, olp_moe
from .schedules import GradTask

__all__ = ["GradientPlan", "moe_times", "partition", "whole_after", "dense_windows", "fixed_chunks",
           "objective", "step1"]


@dataclass(frozen=True)
class GradientPlan:
    tasks: tuple[GradTask, ...]
    r_bwd: tuple[int, ...]                  # per block (forward order)
    pushed: tuple[float, ...] = ()          # Step 2's x_b per block (bytes)
    objective_ms: float = 0.0               # Step 2's objective at the plan
    method: str = ""


def moe_times(model: PassModel, t_gar: np.ndarray, domain=DOMAINS["1..8"]) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised Algorithm 1 over an array of t_gar: (best case time, its r) per entry."""
    t_gar = np.asarray(t_gar, dtype=float)
    best_t = np.full(t_gar.shape, np.inf)
    best_r = np.ones(t_gar.shape, dtype=int)
    for r in domain:
        a2a, ag, rs, exp = model.a2a.at(r), model.ag.at(r), model.rs.at(r), model.exp.at(r)
        surplus = r * exp - 2 * (r - 1) * a2a
        q1, q2, q3 = a2a > ag, r * exp > 2 * (r - 1) * a2a, r * exp > (r - 1) * (ag + rs)
        q4, q5 = t_gar > ag + rs, t_gar > surplus + ag + rs
        q6, q7 = t_gar > r * ag + r * rs - 2 * (r - 1) * a2a, t_gar > ag + rs + surplus
        case1 = 2 * r * a2a + t_gar
        case2 = 2 * a2a + ag + rs + r * exp
        case3 = 2 * r * a2a + ag + rs
        case4 = 2 * a2a + r * ag + r * rs
        if q1:
            t = np.where(q5, case1, case2) if q2 else np.where(q4, case1, case3)
        else:
            t = np.where(q7, case1, case2) if q3 else np.where(q6, case1, case4)
        better = t < best_t - 1e-12
        best_t, best_r = np.where(better, t, best_t), np.where(better, r, best_r)
    return best_t, best_r


@dataclass(frozen=True)
class _Step1:
    moe: list[list[tuple[float, int]]]       # per block: (bytes, producer) in its MoE window
    dense: list[list[tuple[float, int]]]     # per block: in its dense window
    leftover: list[tuple[float, int]]        # not hidden: (bytes, producer), production order
    window_r: list[int]                      # the r whose MoE window Step 1 used


def _fill(queue: list[list], capacity: float) -> list[tuple[float, int]]:
    """Take up to `capacity` bytes from the front of the queue [[bytes, producer], ...]."""
    taken = []
    while queue and capacity > 1e-9:
        amount = min(queue[0][0], capacity)
        taken.append((amount, queue[0][1]))
        queue[0][0] -= amount
        capacity -= amount
        if queue[0][0] <= 1e-9:
            queue.pop(0)
    return taken


def step1(blocks: list[BlockCosts], model_of=lambda bc: bc.bwd, domain=DOMAINS["1..8"]) -> _Step1:
    n = len(blocks)
    moe, dense = [[] for _ in range(n)], [[] for _ in range(n)]
    window_r = [1] * n
    queue: list[list] = []
    for b in reversed(range(n)):
        bc = blocks[b]
        choice = integer_optimum(model_of(bc).with_gar(0.0), domain)
        window_r[b] = choice.r
        if queue:
            moe[b] = _fill(queue, bc.ar_bytes(olp_moe(model_of(bc), choice.r)))
            dense[b] = _fill(queue, bc.ar_bytes(bc.t_olp_dense))
        queue.append([float(bc.grad_bytes), b])       # this block's gradients exist from now on
    return _Step1(moe, dense, [(q[0], q[1]) for q in queue], window_r)


def objective(blocks: list[BlockCosts], s1: _Step1, x: np.ndarray, model_of=lambda bc: bc.bwd,
              domain=DOMAINS["1..8"]) -> np.ndarray:
    """Step 2's objective for pushes x [..., n] (bytes per block): MoE backward times with their
    gradient slices plus the exposed tail. Vectorised over leading axes."""
    x = np.asarray(x, dtype=float)
    window = np.array([sum(a for a, _ in s1.moe[b]) for b in range(len(blocks))])
    nbytes = window + x
    total = np.zeros(x.shape[:-1])
    groups: dict[int, list[int]] = {}                 # blocks with one model are evaluated together
    models = {}
    for b, bc in enumerate(blocks):
        m = model_of(bc)
        key = next((k for k, other in models.items() if other == m and blocks[groups[k][0]].allreduce == bc.allreduce),
                   len(models))
        models.setdefault(key, m)
        groups.setdefault(key, []).append(b)
    for key, idx in groups.items():
        ar = blocks[idx[0]].allreduce
        sub = nbytes[..., idx]
        t_gar = np.where(sub > 0, ar.alpha_ms + ar.beta_ms * sub, 0.0)
        total = total + moe_times(models[key], t_gar, domain)[0].sum(-1)
    tail = sum(a for a, _ in s1.leftover) - x.sum(-1)
    ref = blocks[0]
    return total + np.where(tail > 1e-9, ref.allreduce.alpha_ms + ref.allreduce.beta_ms * np.maximum(tail, 0), 0.0)


def _available(s1: _Step1, n: int) -> np.ndarray:
    """avail[b]: leftover bytes produced before block b's backward (by blocks after b)."""
    return np.array([sum(a for a, p in s1.leftover if p > b) for b in range(n)])


def partition(blocks: list[BlockCosts], *, grid: int = 16, seed: int = 0, model_of=lambda bc: bc.bwd,
              domain=DOMAINS["1..8"], maxiter: int = 100, max_push_blocks: int = 8) -> GradientPlan:
    """FSMoE's plan: Step 1, then Step 2 on a grid of `grid` steps of each block's available
    leftover, kept only if better than pushing nothing (see the module docstring). Step 2's
    variables are the `max_push_blocks` last-processed blocks that have leftover available
    (ours: they see the most of it; deeper stacks keep the search small)."""
    n = len(blocks)
    s1 = step1(blocks, model_of, domain)
    avail = _available(s1, n)
    none = float(objective(blocks, s1, np.zeros(n), model_of, domain))
    pushed = np.zeros(n)
    best = none
    free = [b for b in range(n) if avail[b] > 0][:max_push_blocks]
    if free:
        step = avail.max() / grid
        units = np.floor(avail[free] / step + 1e-9)
        k = len(free)
        # causal prefix constraint in backward order: sum_{b' >= b} x_b' <= avail[b] (in units)
        A = np.array([[1.0 if free[j2] >= free[j] else 0.0 for j2 in range(k)] for j in range(k)])

        def full(u: np.ndarray) -> np.ndarray:
            x = np.zeros(u.shape[:-1] + (n,))
            x[..., free] = u * step
            return x

        result = differential_evolution(
            lambda u: objective(blocks, s1, full(np.asarray(u).T), model_of, domain),
            Bounds(np.zeros(k), np.maximum(units, 0)), constraints=LinearConstraint(A, -np.inf, units),
            integrality=np.ones(k, dtype=bool), seed=seed, maxiter=maxiter, tol=1e-10, polish=False,
            popsize=15, vectorized=True, updating="deferred", init="sobol")
        candidate = float(objective(blocks, s1, full(result.x), model_of, domain))
        if candidate < none - 1e-9 and np.all(A @ result.x <= units + 1e-9):
            pushed, best = full(result.x), candidate
    return _plan(blocks, s1, pushed, best, model_of, domain)


def _plan(blocks, s1: _Step1, pushed: np.ndarray, value: float, model_of, domain) -> GradientPlan:
    n = len(blocks)
    queue = [[a, p] for a, p in s1.leftover]
    # Pushes are carried out in backward order: block b may take gradients of blocks p > b only,
    # so the later-processed blocks (fewer eligible producers) take theirs first; any eligible
    # producer then serves, and the causal constraint of Step 2 is exactly what makes every x_b fit.
    extra: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    for b in reversed(range(n)):
        if pushed[b] > 0:
            extra[b] = _fill([q for q in queue if q[1] > b], float(pushed[b]))
            queue = [q for q in queue if q[0] > 1e-9]
    tasks: list[GradTask] = []
    r_bwd = []
    for b in range(n):
        bc = blocks[b]
        moe = s1.moe[b] + extra[b]
        nbytes = sum(a for a, _ in moe)
        r_bwd.append(int(moe_times(model_of(bc), np.array(bc.t_ar(nbytes)), domain)[1]))
        if nbytes > 0:
            tasks.append(GradTask(nbytes, ("moe", b), tuple(sorted({p for _, p in moe}))))
        if s1.dense[b]:
            tasks.append(GradTask(sum(a for a, _ in s1.dense[b]), ("dense", b), tuple(sorted({p for _, p in s1.dense[b]}))))
    rest = [(a, p) for a, p in queue if a > 1e-9]
    if rest:
        tasks.append(GradTask(sum(a for a, _ in rest), ("tail",), tuple(sorted({p for _, p in rest}))))
    return GradientPlan(tuple(tasks), tuple(r_bwd), tuple(float(x) for x in pushed), value, "fsmoe")


def whole_after(blocks: list[BlockCosts]) -> tuple[GradTask, ...]:
    """Every block's gradient all-reduced whole right after its dense backward (no partitioning)."""
    return tuple(GradTask(float(bc.grad_bytes), ("after", b), (b,)) for b, bc in enumerate(blocks))


def dense_windows(blocks: list[BlockCosts]) -> tuple[GradTask, ...]:
    """Tutel-Improved: block b's gradient during the next-processed block's dense backward (after
    that block's MoE backward); the first block's at the end."""
    out = [GradTask(float(bc.grad_bytes), ("dense", b - 1), (b,)) for b, bc in enumerate(blocks) if b > 0]
    return tuple(out + [GradTask(float(blocks[0].grad_bytes), ("tail",), (0,))])


def fixed_chunks(blocks: list[BlockCosts], r_bwd: list[int], chunk_bytes: float = 30e6,
                 model_of=lambda bc: bc.bwd) -> tuple[GradTask, ...]:
    """PipeMoE+Lina: gradients cut into fixed chunks, each issued into the next window that has
    room left (a chunk may overrun it: Lina does not resize chunks or re-plan the degree). Block
    b's MoE window is its backward's idle link time at the degree it runs, `r_bwd[b]`."""
    tasks = []
    pending: list[tuple[float, int]] = []
    for b in reversed(range(len(blocks))):
        bc = blocks[b]
        for where, window in ((("moe", b), olp_moe(model_of(bc), r_bwd[b])), (("dense", b), bc.t_olp_dense)):
            used = 0.0
            while pending and used < window - 1e-9:
                nbytes, producer = pending.pop(0)
                tasks.append(GradTask(nbytes, where, (producer,)))
                used += bc.t_ar(nbytes)
        full, rest = divmod(float(bc.grad_bytes), chunk_bytes)
        pending += [(chunk_bytes, b)] * int(full) + ([(rest, b)] if rest > 0 else [])
    tasks += [GradTask(nbytes, ("tail",), (p,)) for nbytes, p in pending]
    return tuple(tasks)
