"""Pipeline-parallel schedules as timeline `Schedule`s: one lane per pipeline stage.

* `gpipe`: every forward micro-batch, then every backward (FSMoE's PP = 2 runs, Fig. 8).
* `one_f_one_b`: PipeDream-flush 1F1B: PP - s - 1 warm-up forwards on stage s, then alternate.
* `dualpipe`: DeepSeek-V3's bidirectional DualPipe, two model chunks per rank fed from both ends,
  built from the eight phases of its published schedule (nF0, nF0F1, nB1W1F1, nF0B1F1B0,
  nB1F1B0, nB1B0, nWB0, nW), with zero-bubble splitting of backward into input (B - W) and
  weight (W) parts where the schedule defers weights, and overlapped forward-backward pairs
  taking `fb` ms. A reconstruction from the paper's description and figure; the schedule, not
  the kernels.

The durations are per micro-batch chunk: `f` forward, `b` full backward, `w` its weight part,
`fb` an overlapped forward + backward pair. Communication between stages is not modeled (the
published bubble formulas leave it out too): (PP - 1)(F + B) for 1F1B and GPipe, and
(PP/2 - 1)(F&B + B - 3W) for DualPipe, the largest idle time of any rank, under the zero-bubble
papers' assumption that a forward, an input-backward and a weight-backward take equal time
(F = B - W = W); the timeline reproduces both exactly (tests/unit/test_timeline.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace

from .timeline import Schedule, ScheduleError, Task

__all__ = ["gpipe", "one_f_one_b", "dualpipe"]


def _check(stages: int, micro_batches: int) -> None:
    for key, v in (("stages", stages), ("micro_batches", micro_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ScheduleError(f"{key}: {v!r} is not allowed; allowed: an integer >= 1")


def _fwd(s: int, m: int, f: float) -> Task:
    return Task(f"F{m}@s{s}", f"stage{s}", f, (f"F{m}@s{s - 1}",) if s else (), "F", m)


def _bwd(s: int, m: int, b: float, stages: int) -> Task:
    upstream = f"B{m}@s{s + 1}" if s + 1 < stages else f"F{m}@s{s}"
    return Task(f"B{m}@s{s}", f"stage{s}", b, (upstream,), "B", m)


def gpipe(stages: int, micro_batches: int, f: float, b: float) -> Schedule:
    """All forwards, then all backwards in reverse micro-batch order, on every stage."""
    _check(stages, micro_batches)
    tasks = [_fwd(s, m, f) for s in range(stages) for m in range(micro_batches)]
    tasks += [_bwd(s, m, b, stages) for s in range(stages) for m in reversed(range(micro_batches))]
    return Schedule(tuple(tasks))


def one_f_one_b(stages: int, micro_batches: int, f: float, b: float) -> Schedule:
    """1F1B with flush: stage s runs min(PP - s - 1, M) forwards, then one forward and one
    backward in turn, then the remaining backwards."""
    _check(stages, micro_batches)
    tasks = []
    for s in range(stages):
        warm = min(stages - s - 1, micro_batches)
        order = [("F", m) for m in range(warm)]
        for i in range(micro_batches - warm):
            order += [("F", warm + i), ("B", i)]
        order += [("B", m) for m in range(micro_batches - warm, micro_batches)]
        tasks += [_fwd(s, m, f) if op == "F" else _bwd(s, m, b, stages) for op, m in order]
    return Schedule(tuple(tasks))


def dualpipe(stages: int, micro_batches: int, f: float, b: float, w: float, fb: float) -> Schedule:
    """DualPipe on `stages` ranks (even) with `micro_batches` (even, >= 2 x stages), half fed
    into each end. Task names: 'F{dir}.{m}@r{rank}', 'B..', 'W..', and 'FB..' for an overlapped
    pair; direction 0 flows rank 0 -> PP-1, direction 1 the other way."""
    _check(stages, micro_batches)
    if stages % 2 or micro_batches % 2 or micro_batches < 2 * stages:
        raise ScheduleError(f"dualpipe needs an even number of stages and an even number of micro-batches "
                            f">= 2 x stages; got stages={stages}, micro_batches={micro_batches}")
    if not 0 <= w <= b:
        raise ScheduleError(f"dualpipe: the weight part w={w} must lie within the backward b={b}")
    half, per_dir = stages // 2, micro_batches // 2

    def position(rank: int, direction: int) -> int:
        return rank if direction == 0 else stages - 1 - rank

    def rank_at(direction: int, pos: int) -> int:
        return pos if direction == 0 else stages - 1 - pos

    def fname(d: int, m: int, rank: int) -> str:
        return f"F{d}.{m}@r{rank}"

    def bname(d: int, m: int, rank: int) -> str:
        return f"B{d}.{m}@r{rank}"

    tasks: list[Task] = []
    for rank in range(stages):
        h = min(rank, stages - 1 - rank)
        middle = h == half - 1
        # the op sequence of this rank: ('F', phase), ('B', phase, zero_bubble), ('W',), ('FB', pf, pb)
        ops: list[tuple] = [("F", 0)] * ((half - h - 1) * 2)
        ops += [("F", 0), ("F", 1)] * (h + 1)
        ops += [("B", 1, True), ("W",), ("F", 1)] * (half - h - 1)
        for i in range(per_dir - stages + h + 1):
            ops += [("F", 0), ("B", 1, False)] if (i == 0 and middle) else [("FB", 0, 1)]
            ops.append(("FB", 1, 0))
        ops += [("B", 1, False), ("FB", 1, 0)] * (half - h - 1)
        zb = False
        for i in range(h + 1):
            if i == (h + 1) // 2 and h % 2 == 1:
                zb = True
            ops.append(("B", 1, zb))
            if i == (h + 1) // 2 and h % 2 == 0:
                zb = True
            ops.append(("B", 0, zb))
        ops += [("W",), ("B", 0, True)] * (half - h - 1)
        ops += [("W",)] * (h + 1)

        next_f, next_b = [0, 0], [0, 0]          # next micro-batch per phase
        weights: deque[str] = deque()            # deferred weight parts, in order

        def forward(phase: int) -> tuple[str, tuple[str, ...]]:
            d = phase ^ (rank >= half)
            m, next_f[phase] = next_f[phase], next_f[phase] + 1
            pos = position(rank, d)
            deps = (fname(d, m, rank_at(d, pos - 1)),) if pos else ()
            return fname(d, m, rank), deps

        def backward(phase: int) -> tuple[str, tuple[str, ...]]:
            d = phase ^ (rank >= half)
            m, next_b[phase] = next_b[phase], next_b[phase] + 1
            pos = position(rank, d)
            upstream = bname(d, m, rank_at(d, pos + 1)) if pos + 1 < stages else fname(d, m, rank)
            return bname(d, m, rank), (upstream,)

        lane = f"rank{rank}"
        for op in ops:
            if op[0] == "F":
                name, deps = forward(op[1])
                tasks.append(Task(name, lane, f, deps, "F"))
            elif op[0] == "B":
                name, deps = backward(op[1])
                tasks.append(Task(name, lane, b - w if op[2] else b, deps, "B"))
                if op[2]:
                    weights.append(name)
            elif op[0] == "W":
                if not weights:
                    raise ScheduleError(f"dualpipe: rank {rank} has no deferred weight gradient to run")
                deferred = weights.popleft()      # a weight gradient needs its backward's input gradient
                tasks.append(Task(f"W:{deferred}", lane, w, (deferred,), "W"))
            else:
                fn, fdeps = forward(op[1])
                bn, bdeps = backward(op[2])
                # one task finishes both: later tasks may depend on either name
                tasks.append(Task(f"{fn}+{bn}", lane, fb, fdeps + bdeps, "FB"))
        if weights:
            raise ScheduleError(f"dualpipe: rank {rank} leaves {len(weights)} weight gradients unrun")
    return _resolve_pairs(tasks)


def _resolve_pairs(tasks: list[Task]) -> Schedule:
    """Dependencies on a forward or backward that ran inside an overlapped pair point at the pair."""
    alias = {}
    for t in tasks:
        if t.kind == "FB":
            for part in t.name.split("+"):
                alias[part] = t.name
    return Schedule(tuple(replace(t, deps=tuple(alias.get(d, d) for d in t.deps)) for t in tasks))
