"""The real executor runs a timeline schedule: FIFO per lane, dependencies respected, lanes truly
concurrent (proved by a hand-off no sequential run could finish), one error stops every lane and
names its task; a deadlocking schedule is refused before any work."""
import threading

import pytest

from impl.common.executor import ExecutionError, execute
from impl.common.timeline import Schedule, ScheduleError, Task


def test_order_and_dependencies_are_kept():
    s = Schedule((Task("D1", "inter"), Task("D2", "inter"), Task("E1", "gpu", deps=("D1",)),
                  Task("E2", "gpu", deps=("D2",)), Task("C1", "inter", deps=("E1",)), Task("C2", "inter", deps=("E2",))))
    log, lock = [], threading.Lock()

    def action(task):
        with lock:
            log.append(task.name)

    tl = execute(s, action)
    for lane in s.lanes:                   # FIFO per lane
        names = [t.name for t in s.tasks if t.lane == lane]
        assert [n for n in log if n in names] == names
    for t in s.tasks:
        for d in t.deps:
            assert log.index(d) < log.index(t.name) and tl.end[d] <= tl.start[t.name]


def test_lanes_run_concurrently():
    """'wait' on one lane only returns once 'signal' on the other lane has run: a sequential
    executor would time out."""
    flag = threading.Event()
    s = Schedule((Task("wait", "a"), Task("signal", "b")))

    def action(task):
        if task.name == "wait":
            assert flag.wait(10), "the other lane never ran"
        else:
            flag.set()

    execute(s, action)


def test_a_failing_task_stops_every_lane_and_is_named():
    s = Schedule((Task("ok", "a"), Task("boom", "a", deps=("ok",)), Task("after", "b", deps=("boom",)),
                  Task("never", "a")))
    ran = []

    def action(task):
        ran.append(task.name)
        if task.name == "boom":
            raise RuntimeError("out of memory")

    with pytest.raises(ExecutionError, match="task 'boom' failed: RuntimeError: out of memory"):
        execute(s, action)
    assert ran == ["ok", "boom"]


def test_deadlocking_schedule_is_refused_before_work():
    s = Schedule((Task("A", "x", deps=("B",)), Task("C", "y"), Task("B", "x")))
    with pytest.raises(ScheduleError, match="deadlock"):
        execute(s, lambda t: pytest.fail("no task may run"))
