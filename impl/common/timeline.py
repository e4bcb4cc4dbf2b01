"""The sim tier's clock: an event-timeline simulator of a schedule of tasks on lanes.

A `Schedule` is a list of `Task`s in issue order. Each task runs on one lane (a CUDA stream, a
network link, a pipeline stage: anything that does one thing at a time), takes `duration` ms
(from a cost model) and may depend on other tasks. A lane runs its tasks strictly in issue order
(FIFO), each starting when the lane is free and all its dependencies have ended:

    start(t) = max(end of the previous task on t's lane, max over d in deps(t) of end(d))

`simulate` returns a `Timeline`: every task's start and end, the makespan and the busy time per
lane. The same `Schedule` drives the real executor (`impl.common.executor`), which fills a
`Timeline` with measured times, so a prediction and a measurement of one schedule compare task by
task (`compare`). Issue order matters exactly as on a GPU: a task that waits for a dependency
blocks every later task of its lane, which is why FSMoE launches all dispatches before the
experts. A schedule whose lane heads wait on each other forever is rejected, naming them.
Lanes that share a resource can be given a contention (`simulate(schedule, contention)`): while
tasks run on two contending lanes at once, each progresses more slowly (`_run_contended`).
"""
from __future__ import annotations

import heapq
import math
import random
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable, Iterable, Mapping

__all__ = ["Task", "Schedule", "Timeline", "ScheduleError", "simulate", "lower_bound", "search_order", "compare"]


class ScheduleError(ValueError):
    """A schedule that cannot run: duplicate or unknown task names, bad durations, a deadlock."""


@dataclass(frozen=True)
class Task:
    """One unit of work. `kind` says what it does ('a2a', 'ag', 'exp', 'F', 'B', ...) and `chunk`
    which piece of the work (pipeline chunk, micro-batch); `size` is what the cost model charged
    for (bytes or work units), kept for reports."""

    name: str
    lane: str
    duration: float = 0.0
    deps: tuple[str, ...] = ()
    kind: str = ""
    chunk: int | None = None
    size: float = 0.0


@dataclass(frozen=True)
class Schedule:
    tasks: tuple[Task, ...]

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        names: set[str] = set()
        for t in self.tasks:
            if t.name in names:
                raise ScheduleError(f"task name {t.name!r} appears twice")
            names.add(t.name)
            if not (isinstance(t.duration, (int, float)) and math.isfinite(t.duration) and t.duration >= 0):
                raise ScheduleError(f"task {t.name!r}: duration {t.duration!r} is not allowed; allowed: a finite "
                                    "number >= 0")
        for t in self.tasks:
            missing = [d for d in t.deps if d not in names]
            if missing:
                raise ScheduleError(f"task {t.name!r} depends on unknown task {missing[0]!r}")

    @cached_property
    def _timeline(self) -> "Timeline":
        """`simulate`'s result, computed once: a schedule is immutable, so asking again (a search
        and its caller reading the same schedule's makespan) costs nothing."""
        return _run(self)

    @property
    def lanes(self) -> tuple[str, ...]:
        """Lanes in order of first use."""
        return tuple(dict.fromkeys(t.lane for t in self.tasks))

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def with_durations(self, duration: Callable[[Task], float]) -> "Schedule":
        """The same schedule with every duration recomputed, e.g. from another hardware profile."""
        return Schedule(tuple(replace(t, duration=float(duration(t))) for t in self.tasks))

    def on_lanes(self, lane_of: Mapping[str, str]) -> "Schedule":
        """The same tasks with lanes renamed (e.g. 'inter' and 'intra' -> one shared 'comm' lane)."""
        return Schedule(tuple(replace(t, lane=lane_of.get(t.lane, t.lane)) for t in self.tasks))


@dataclass(frozen=True)
class Timeline:
    """Start and end (ms) of every task of a schedule, predicted or measured."""

    schedule: Schedule
    start: Mapping[str, float]
    end: Mapping[str, float]
    source: str = "simulated"          # or 'measured on ...'

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0) - min(self.start.values(), default=0.0)

    def busy(self, lane: str | None = None) -> dict[str, float] | float:
        """Busy ms per lane (a dict), or of one lane."""
        out: dict[str, float] = defaultdict(float)
        for t in self.schedule.tasks:
            out[t.lane] += self.end[t.name] - self.start[t.name]
        return dict(out) if lane is None else out.get(lane, 0.0)

    def idle(self, lane: str) -> float:
        """Time the lane is not busy within the makespan."""
        return self.makespan - self.busy(lane)

    def rows(self) -> list[dict]:
        """One dict per task: name, lane, kind, chunk, start, end, duration (for CSVs and plots)."""
        return [{"task": t.name, "lane": t.lane, "kind": t.kind, "chunk": t.chunk, "start_ms": self.start[t.name],
                 "end_ms": self.end[t.name], "duration_ms": self.end[t.name] - self.start[t.name]}
                for t in self.schedule.tasks]


def simulate(schedule: Schedule, contention: Mapping[tuple[str, str], float] | None = None) -> Timeline:
    """Run the schedule on its lanes (FIFO per lane in issue order, dependencies respected); once
    per schedule, the same Timeline returned every time. `contention` {(lane, lane): c}: two lanes
    that share a resource (an intra-node and an inter-node collective on one GPU's copy engines,
    SMs and PCIe): while both run a task, each task progresses at 1 / (1 + c) of its speed, c
    summed over the busy lanes it contends with (`_run_contended`); a lane 'name@group' contends
    by its name with the lanes of its own group only (a pipeline stage's GPUs)."""
    pair = {k: c for k, c in _contention_pairs(contention or {}).items() if c > 0}
    between = {x: {y: c for y in schedule.lanes if (c := _shared(x, y, pair))} for x in schedule.lanes} if pair else {}
    if not any(between.values()):
        return schedule._timeline            # no two lanes contend: the same timeline, to the bit
    return _run_contended(schedule, between)


def _contention_pairs(contention: Mapping[tuple[str, str], float]) -> dict[frozenset, float]:
    for (a, b), c in contention.items():
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ScheduleError(f"contention[{a!r}, {b!r}] = {c!r} is not allowed; allowed: a finite number >= 0")
    return {frozenset(k): float(c) for k, c in contention.items()}


def _shared(x: str, y: str, pair: Mapping[frozenset, float]) -> float:
    """The contention c between lanes x and y: their names' pair's, if both are in one group."""
    (nx, _, gx), (ny, _, gy) = x.partition("@"), y.partition("@")
    return pair.get(frozenset((nx, ny)), 0.0) if gx == gy and nx != ny else 0.0


def _run(schedule: Schedule) -> Timeline:
    queues: dict[str, deque[Task]] = defaultdict(deque)
    for t in schedule.tasks:
        queues[t.lane].append(t)
    free = {lane: 0.0 for lane in queues}
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    remaining = len(schedule.tasks)
    while remaining:
        progressed = False
        for lane, q in queues.items():
            while q and all(d in end for d in q[0].deps):
                t = q.popleft()
                start[t.name] = max([free[lane]] + [end[d] for d in t.deps])
                end[t.name] = start[t.name] + t.duration
                free[lane] = end[t.name]
                remaining -= 1
                progressed = True
        if not progressed:
            heads = [f"{q[0].name!r} on {lane!r} waits for {[d for d in q[0].deps if d not in end]}"
                     for lane, q in queues.items() if q]
            raise ScheduleError("deadlock: every lane's next task waits for a task queued behind another: "
                                + "; ".join(heads))
    return Timeline(schedule, start, end)


def _run_contended(schedule: Schedule, between: Mapping[str, Mapping[str, float]]) -> Timeline:
    """`_run` with contending lanes, as a fluid model: a task starts as in `_run` (its lane free,
    its dependencies ended) and then runs at rate 1 / (1 + sum of c over the other lanes busy
    with it that it contends with: `between[lane][other]`), the rates changing whenever a task
    starts or ends. Two tasks
    of a <= b ms starting together on lanes with contention c end at a (1 + c) and b + c a; with
    no contention every task keeps its `_run` times, to rounding (tests/unit/test_timeline.py)."""
    queues: dict[str, deque[Task]] = defaultdict(deque)
    for t in schedule.tasks:
        queues[t.lane].append(t)
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    running: dict[str, list] = {}            # lane -> [task, remaining ms of its work]
    now, remaining = 0.0, len(schedule.tasks)
    while remaining:
        for lane, q in queues.items():
            if lane not in running and q and all(d in end for d in q[0].deps):
                t = q.popleft()
                start[t.name] = now
                running[lane] = [t, t.duration]
        if not running:
            heads = [f"{q[0].name!r} on {lane!r} waits for {[d for d in q[0].deps if d not in end]}"
                     for lane, q in queues.items() if q]
            raise ScheduleError("deadlock: every lane's next task waits for a task queued behind another: "
                                + "; ".join(heads))
        rate = {lane: 1.0 / (1.0 + sum(between.get(lane, {}).get(other, 0.0) for other in running))
                for lane in running}
        step = min(work / rate[lane] for lane, (_, work) in running.items())
        now += step
        for lane in list(running):
            t, work = running[lane]
            work -= step * rate[lane]
            if work <= 1e-12 * max(1.0, t.duration):
                end[t.name] = now
                del running[lane]
                remaining -= 1
            else:
                running[lane][1] = work
    return Timeline(schedule, start, end)


def lower_bound(schedule: Schedule) -> float:
    """A bound no order of the tasks on their lanes can beat. Every task needs its longest
    dependency chain before it (`head`: it cannot start earlier) and after it (`tail`: something
    still runs that long after it ends), so the longest chain through any task is a bound; and per
    lane, its tasks with those heads and tails on one machine that may even interrupt a task
    (Jackson's rule: the released task with the longest tail runs; optimal for that relaxation),
    whose latest completion plus tail is a bound too. That lane bound is at least the lane's work
    plus its smallest head and smallest tail, and also sees a lane that must sit idle between tasks
    released far apart (a forward pass's second block waits for the first one's attention)."""
    by_name = {t.name: t for t in schedule.tasks}
    users: dict[str, list[str]] = defaultdict(list)
    for t in schedule.tasks:
        for d in t.deps:
            users[d].append(t.name)
    order = _dependency_order(schedule, users)
    head = {}
    for n in order:
        head[n] = max((head[d] + by_name[d].duration for d in by_name[n].deps), default=0.0)
    tail = {}
    for n in reversed(order):
        tail[n] = max((by_name[u].duration + tail[u] for u in users[n]), default=0.0)
    bound = max((head[n] + by_name[n].duration + tail[n] for n in order), default=0.0)
    lanes: dict[str, list[Task]] = defaultdict(list)
    for t in schedule.tasks:
        lanes[t.lane].append(t)
    for tasks in lanes.values():
        bound = max(bound, _preemptive_lane_bound([(head[t.name], t.duration, tail[t.name]) for t in tasks]))
    return bound


def _preemptive_lane_bound(jobs: list[tuple[float, float, float]]) -> float:
    """max(completion + tail) of (head, duration, tail) jobs on one machine under Jackson's
    preemptive rule: the optimum of the preemptive relaxation, so a bound for any order."""
    jobs = sorted(jobs)
    left = [d for _, d, _ in jobs]
    ready: list[tuple[float, int]] = []           # (-tail, job)
    now, i, bound = 0.0, 0, 0.0
    while i < len(jobs) or ready:
        if not ready:
            now = max(now, jobs[i][0])
        while i < len(jobs) and jobs[i][0] <= now:
            heapq.heappush(ready, (-jobs[i][2], i))
            i += 1
        neg_tail, j = ready[0]
        run = min(left[j], (jobs[i][0] if i < len(jobs) else math.inf) - now)
        now += run
        left[j] -= run
        if left[j] <= 0.0:
            heapq.heappop(ready)
            bound = max(bound, now - neg_tail)
    return bound


def search_order(schedule: Schedule, tries: int, seed: int = 0) -> Schedule:
    """The same tasks, lanes and dependencies in the lane orders a local search finds best: `tries`
    times, one task moves to another place in its lane's issue order (seeded), and the move stays
    when the makespan does not grow (an order that deadlocks is skipped). An upper estimate of the
    best any issue order reaches, to read a schedule's gap over `lower_bound` as what its order
    leaves (schedule over searched) and what the bound cannot see (searched over bound). The input
    is simulated once, here; the schedule returned (the input itself when no move stays) keeps its
    timeline, so `simulate` of either afterwards does not run them again."""
    rng = random.Random(seed)
    found = schedule
    positions = _lane_positions(found.tasks)
    movable = [lane for lane, where in positions.items() if len(where) > 1]
    best = simulate(schedule).makespan
    for _ in range(tries if movable else 0):
        where = positions[rng.choice(movable)]
        a, b = rng.sample(where, 2)
        candidate = list(found.tasks)
        candidate.insert(b, candidate.pop(a))        # the lane's other tasks keep their slots' order
        try:
            moved = Schedule(tuple(candidate))
            makespan = simulate(moved).makespan
        except ScheduleError:
            continue
        if makespan <= best:
            best, found = makespan, moved
            positions = _lane_positions(found.tasks)
    return found


def _lane_positions(tasks: "tuple[Task, ...] | list[Task]") -> dict[str, list[int]]:
    """Per lane, the indices of its tasks in `tasks` (its issue order)."""
    positions: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        positions[t.lane].append(i)
    return positions


def _dependency_order(schedule: Schedule, users: Mapping[str, list[str]]) -> list[str]:
    """Task names with every dependency before its users (Kahn); a cycle is a ScheduleError."""
    waiting = {t.name: len(set(t.deps)) for t in schedule.tasks}
    ready = deque(n for n, k in waiting.items() if k == 0)
    order = []
    while ready:
        n = ready.popleft()
        order.append(n)
        for u in dict.fromkeys(users[n]):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(waiting):
        raise ScheduleError("the dependencies form a cycle: " + ", ".join(n for n, k in waiting.items() if k > 0))
    return order


@dataclass(frozen=True)
class TaskError:
    name: str
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured; inf when the measurement is 0."""
        return (self.predicted_ms - self.measured_ms) / self.measured_ms if self.measured_ms else math.inf


def compare(predicted: Timeline, measured: Timeline, names: Iterable[str] | None = None) -> list[TaskError]:
    """Task-by-task durations of two timelines of the same schedule."""
    if [t.name for t in predicted.schedule.tasks] != [t.name for t in measured.schedule.tasks]:
        raise ScheduleError("the two timelines are of different schedules")
    names = list(names) if names is not None else [t.name for t in predicted.schedule.tasks]
    return [TaskError(n, predicted.end[n] - predicted.start[n], measured.end[n] - measured.start[n]) for n in names]
