"""The sim tier's clock: hand-computed makespans, deadlocks found, and published pipeline-bubble
closed forms reproduced (1F1B / GPipe: (PP-1)(F+B); DualPipe: (PP/2-1)(F&B+B-3W))."""
import itertools
import random

import pytest

from impl.common.pipeline import dualpipe, gpipe, one_f_one_b
from impl.common.timeline import (Schedule, ScheduleError, Task, _run_contended, compare, lower_bound, search_order,
                                  simulate)


def test_fifo_lanes_and_dependencies_by_hand():
    # inter: D1(2) D2(2) C1(2); compute: E1(3, after D1) E2(3, after D2); C1 after E1
    s = Schedule((Task("D1", "inter", 2), Task("D2", "inter", 2, ()), Task("E1", "gpu", 3, ("D1",)),
                  Task("E2", "gpu", 3, ("D2",)), Task("C1", "inter", 2, ("E1",))))
    tl = simulate(s)
    assert (tl.start["E1"], tl.end["E1"]) == (2, 5)
    assert (tl.start["E2"], tl.end["E2"]) == (5, 8)        # the lane is busy until E1 ends
    assert (tl.start["C1"], tl.end["C1"]) == (5, 7)        # waits for E1, the link is free since 4
    assert tl.makespan == 8 and tl.busy() == {"inter": 6, "gpu": 6} and tl.idle("inter") == 2


def test_issue_order_blocks_a_lane():
    """A lane head waiting on a dependency holds back later tasks of its lane (FIFO)."""
    s = Schedule((Task("A", "x", 5), Task("B", "y", 1, ("A",)), Task("C", "y", 1)))
    tl = simulate(s)
    assert tl.start["C"] == 6 and tl.makespan == 7


def test_deadlock_is_named():
    s = Schedule((Task("A", "x", 1, ("D",)), Task("B", "y", 1), Task("D", "y", 1, ("C",)), Task("C", "x", 1)))
    with pytest.raises(ScheduleError, match="deadlock.*'A' on 'x' waits for \\['D'\\]"):
        simulate(s)


@pytest.mark.parametrize("tasks,message", [
    ((Task("A", "x", 1), Task("A", "y", 1)), "task name 'A' appears twice"),
    ((Task("A", "x", -1),), "duration -1 is not allowed"),
    ((Task("A", "x", 1, ("Z",)),), "depends on unknown task 'Z'"),
])
def test_bad_schedules_fail_with_one_line(tasks, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(tasks)


@pytest.mark.parametrize("build", [one_f_one_b, gpipe])
@pytest.mark.parametrize("stages,micro_batches", [(2, 2), (4, 8), (4, 3), (8, 16), (3, 7)])
@pytest.mark.parametrize("f,b", [(1.0, 2.0), (1.5, 1.0)])
def test_1f1b_and_gpipe_bubble_is_the_closed_form(build, stages, micro_batches, f, b):
    tl = simulate(build(stages, micro_batches, f, b))
    for lane in tl.schedule.lanes:
        assert tl.busy(lane) == pytest.approx(micro_batches * (f + b))
    assert tl.makespan - micro_batches * (f + b) == pytest.approx((stages - 1) * (f + b))


@pytest.mark.parametrize("stages,micro_batches", [(4, 8), (6, 12), (8, 16), (8, 32), (10, 20)])
@pytest.mark.parametrize("f,fb_factor", [(1.0, 2.0), (1.0, 2.5), (2.0, 3.0)])
def test_dualpipe_bubble_is_the_published_closed_form(stages, micro_batches, f, fb_factor):
    """DeepSeek-V3 Table 2 under the zero-bubble assumption F = B - W = W: the largest idle time
    of any rank is (PP/2 - 1)(F&B + B - 3W)."""
    b, w, fb = 2 * f, f, fb_factor * f
    tl = simulate(dualpipe(stages, micro_batches, f, b, w, fb))
    bubble = max(tl.idle(lane) for lane in tl.schedule.lanes)
    assert bubble == pytest.approx((stages / 2 - 1) * (fb + b - 3 * w))
    # every micro-batch passes every rank once forward and once backward (in its direction)
    kinds = [t.kind for t in tl.schedule.tasks]
    assert kinds.count("F") + kinds.count("FB") == stages * micro_batches
    assert kinds.count("B") + kinds.count("FB") == stages * micro_batches


def test_dualpipe_rejects_shapes_it_cannot_run():
    with pytest.raises(ScheduleError, match="even number of stages"):
        dualpipe(3, 12, 1, 2, 1, 2)
    with pytest.raises(ScheduleError, match=">= 2 x stages"):
        dualpipe(4, 6, 1, 2, 1, 2)


def test_compare_task_by_task():
    s = Schedule((Task("A", "x", 2), Task("B", "x", 4)))
    predicted = simulate(s)
    measured = simulate(s.with_durations(lambda t: {"A": 1.0, "B": 5.0}[t.name]))
    errors = {e.name: e.error for e in compare(predicted, measured)}
    assert errors == {"A": pytest.approx(1.0), "B": pytest.approx(-0.2)}
    merged = s.on_lanes({"x": "comm"})
    assert merged.lanes == ("comm",)


def _best_over_every_order(schedule: Schedule) -> float:
    """The shortest makespan over every issue order of each lane's tasks (brute force)."""
    lanes = {}
    for t in schedule.tasks:
        lanes.setdefault(t.lane, []).append(t)
    best = float("inf")
    for orders in itertools.product(*(itertools.permutations(ts) for ts in lanes.values())):
        try:
            best = min(best, simulate(Schedule(tuple(t for order in orders for t in order))).makespan)
        except ScheduleError:        # an order whose lane heads wait on each other
            continue
    return best


def _random_schedule(seed: int) -> Schedule:
    """A small random DAG of 2-7 tasks over 2-3 lanes, integer durations 0-9."""
    rng = random.Random(seed)
    n, lanes = rng.randint(2, 7), ["a", "b", "c"][:rng.randint(2, 3)]
    tasks = []
    for i in range(n):
        deps = tuple(f"t{j}" for j in range(i) if rng.random() < 0.35)
        tasks.append(Task(f"t{i}", rng.choice(lanes), float(rng.randint(0, 9)), deps))
    return Schedule(tuple(tasks))


@pytest.mark.parametrize("seed", range(40))
def test_lower_bound_is_never_above_the_best_order(seed):
    """On random small DAGs over 2-3 lanes: the bound lies between the busiest lane / longest chain
    and the best makespan any order of the tasks on their lanes reaches."""
    s = _random_schedule(seed)
    bound = lower_bound(s)
    busiest = max(sum(t.duration for t in s.tasks if t.lane == lane) for lane in s.lanes)
    assert busiest <= bound <= _best_over_every_order(s) + 1e-9


def test_lower_bound_counts_what_must_run_before_and_after_a_lane():
    """One chunk through dispatch -> expert -> combine: nothing overlaps, and the bound (the
    expert lane's work plus the dispatch before it and the combine after it) is the makespan; the
    busiest lane alone says 4."""
    s = Schedule((Task("D", "comm", 2), Task("E", "gpu", 4, ("D",)), Task("C", "comm", 3, ("E",))))
    assert lower_bound(s) == simulate(s).makespan == 9


def test_lower_bound_sees_a_lane_idle_between_tasks_released_apart():
    """Lane x has one task free at once and two that wait for a 10 ms task elsewhere: x must idle
    from 2 to 10, then run both (14). The longest chain says 12, x's work plus its smallest head
    and tail 6; the preemptive lane bound gives the makespan."""
    s = Schedule((Task("A1", "x", 2), Task("Y", "y", 10), Task("A2", "x", 2, ("Y",)), Task("A3", "x", 2, ("Y",))))
    assert lower_bound(s) == simulate(s).makespan == 14


def test_lower_bound_rejects_a_dependency_cycle():
    s = Schedule((Task("A", "x", 1, ("B",)), Task("B", "y", 1, ("A",))))
    with pytest.raises(ScheduleError, match="cycle"):
        lower_bound(s)


@pytest.mark.parametrize("seed", range(40))
def test_searched_order_keeps_the_tasks_and_lies_between_the_best_order_and_the_given_one(seed):
    s = _random_schedule(seed)
    found = search_order(s, tries=200, seed=seed)
    assert sorted(found.tasks, key=lambda t: t.name) == sorted(s.tasks, key=lambda t: t.name)
    assert _best_over_every_order(s) - 1e-9 <= simulate(found).makespan <= simulate(s).makespan
    assert search_order(s, tries=200, seed=seed) == found          # seeded: the same search


def test_searched_order_issues_a_dispatch_before_a_combine_that_blocks_it():
    """A combine issued between two dispatches holds the second dispatch until the first expert
    ends (13 ms); the search issues both dispatches first and reaches the bound (11 ms)."""
    s = Schedule((Task("D1", "comm", 1), Task("E1", "gpu", 5, ("D1",)), Task("C1", "comm", 1, ("E1",)),
                  Task("D2", "comm", 1), Task("E2", "gpu", 5, ("D2",))))
    assert simulate(s).makespan == 13
    found = search_order(s, tries=50)
    assert simulate(found).makespan == lower_bound(s) == 11
    assert [t.name for t in found.tasks if t.lane == "comm"][:2] == ["D1", "D2"]


def test_a_schedule_is_simulated_once_and_the_search_reuses_it(monkeypatch):
    """`simulate` runs a schedule once (it is immutable); `search_order` simulates its input and each
    candidate once, and the caller's `simulate` of the input and of the result runs nothing more."""
    import impl.common.timeline as timeline

    runs = []
    real = timeline._run
    monkeypatch.setattr(timeline, "_run", lambda s: runs.append(s) or real(s))
    s = _random_schedule(3)
    found = search_order(s, tries=30, seed=3)
    assert runs[0] is s and len(runs) <= 31
    before = len(runs)
    assert simulate(s) is simulate(s) and simulate(found) is simulate(found)
    assert len(runs) == before
    fresh = Schedule(s.tasks)                       # an equal schedule built anew is simulated anew
    assert simulate(fresh).end == simulate(s).end and len(runs) == before + 1


# ------------------------------------------------------------------------- contending lanes

def test_two_contending_tasks_end_at_the_closed_form():
    """a <= b ms starting together on lanes with contention c: both at 1 / (1 + c) until the
    shorter ends at a (1 + c), then the longer alone: b + c a."""
    for a, b, c in ((2.0, 5.0, 0.5), (3.0, 3.0, 1.0), (0.0, 4.0, 2.0), (1.0, 7.0, 0.0)):
        s = Schedule((Task("x", "intra", a), Task("y", "inter", b)))
        tl = simulate(s, {("inter", "intra"): c})
        assert tl.end["x"] == pytest.approx(a * (1 + c)) and tl.end["y"] == pytest.approx(b + c * a)
        assert tl.start == {"x": 0.0, "y": 0.0}


def _stepped(schedule: Schedule, contention: dict, dt: float = 1e-3) -> dict[str, float]:
    """Task ends by a fixed-step reference: every dt, start what may start, then advance each
    running task by dt at its contended rate (independent of the event-driven simulation)."""
    pair = {frozenset(k): c for k, c in contention.items()}
    queues = {lane: [t for t in schedule.tasks if t.lane == lane] for lane in schedule.lanes}
    running, end, now = {}, {}, 0.0
    while len(end) < len(schedule.tasks):
        changed = True
        while changed:                      # zero-length tasks end at once and may release others
            changed = False
            for lane, q in queues.items():
                if lane not in running and q and all(d in end for d in q[0].deps):
                    t = q.pop(0)
                    if t.duration == 0:
                        end[t.name] = now
                    else:
                        running[lane] = [t, t.duration]
                    changed = True
        rates = {lane: 1 / (1 + sum(pair.get(frozenset((lane, o)), 0.0) for o in running if o != lane))
                 for lane in running}
        now += dt
        for lane in list(running):
            running[lane][1] -= dt * rates[lane]
            if running[lane][1] <= 1e-9:
                end[running.pop(lane)[0].name] = now
    return end


@pytest.mark.parametrize("seed", range(12))
def test_contended_timeline_matches_a_fixed_step_reference_and_is_run_without_contention(seed):
    """Random DAGs over 2-3 lanes: with contention between lanes a and b (c = 0.7) and between b
    and c (c = 0.3) the event-driven ends equal a 1 us fixed-step simulation's (within the steps'
    rounding); with none, or with only lanes the schedule lacks, `simulate` gives the schedule's
    own timeline, and the event-driven model itself every start and end of it."""
    s = _random_schedule(seed)
    contention = {("a", "b"): 0.7, ("b", "c"): 0.3}
    got = simulate(s, contention)
    want = _stepped(s, contention)
    for name, t_end in want.items():
        assert got.end[name] == pytest.approx(t_end, abs=0.02)
    assert got.makespan >= simulate(s).makespan - 1e-9
    for none in ({}, {("a", "b"): 0.0}, {("x", "y"): 1.0}):
        assert simulate(s, none) is simulate(s)          # nothing contends: the schedule's own timeline
        fluid = _run_contended(s, {})
        assert fluid.start == pytest.approx(simulate(s).start) and fluid.end == pytest.approx(simulate(s).end)


def test_lanes_contend_within_their_group_only_and_bad_values_fail():
    s = Schedule((Task("x", "intra@s0", 2.0), Task("y", "inter@s0", 2.0), Task("z", "inter@s1", 2.0)))
    tl = simulate(s, {("inter", "intra"): 1.0})
    assert (tl.end["x"], tl.end["y"], tl.end["z"]) == pytest.approx((4.0, 4.0, 2.0))
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ScheduleError, match=r"contention\['inter', 'intra'\] = .* is not allowed; allowed: a finite "
                                                r"number >= 0"):
            simulate(s, {("inter", "intra"): bad})
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(Schedule((Task("p", "a", 1.0, ("q",)), Task("r", "a", 1.0), Task("q", "b", 1.0, ("r",)))),
                 {("a", "b"): 0.5})
