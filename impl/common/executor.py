"""The real executor of a timeline `Schedule`: every lane runs its tasks in issue order, each
task after its dependencies, and the measured start and end of every task come back as a
`Timeline` comparable task by task with the simulator's prediction.

* CPU (gloo, the emu tier): one thread per lane. A lane that communicates uses its own process
  groups (`Comm.lane`), so concurrent collectives never share a gloo group; overlap is real:
  gloo and GEMMs release the GIL.
* GPU: one CUDA stream per lane; dependencies are CUDA events, tasks are issued from one host
  thread in the schedule's order (the launch order), and times are read from CUDA events.

`action(task)` does the work of one task (the caller maps task kinds and chunks to closures). The
first failing task stops every lane: lanes waiting on dependencies return at once, the error is
re-raised once in the caller naming the task; a lane blocked inside a collective returns when
the collective's timeout fires. A schedule that would deadlock is rejected before any work.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from .timeline import Schedule, Timeline, simulate

__all__ = ["ExecutionError", "execute"]


class ExecutionError(RuntimeError):
    """A task of an executed schedule failed; the message names it."""


def execute(schedule: Schedule, action: Callable, *, device: torch.device | str = "cpu",
            timeout_s: float = 600.0) -> Timeline:
    """Run `schedule`, calling `action(task)` for each task on its lane; returns measured times (ms)."""
    simulate(schedule)  # rejects unknown dependencies and deadlocking issue orders up front
    device = torch.device(device)
    if device.type == "cuda":
        return _execute_streams(schedule, action, device)
    return _execute_threads(schedule, action, timeout_s)


def _execute_threads(schedule: Schedule, action: Callable, timeout_s: float) -> Timeline:
    done = {t.name: threading.Event() for t in schedule.tasks}
    stop = threading.Event()
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    failures: list[tuple[str, BaseException]] = []
    t0 = time.perf_counter()
    deadline = t0 + timeout_s

    def wait_for(name: str) -> bool:
        while not done[name].wait(0.02):
            if stop.is_set():
                return False
            if time.perf_counter() > deadline:
                failures.append((name, TimeoutError(f"task {name!r} did not finish within {timeout_s:.0f} s")))
                stop.set()
                return False
        return True

    def run_lane(lane: str) -> None:
        for task in (t for t in schedule.tasks if t.lane == lane):
            if not all(wait_for(d) for d in task.deps) or stop.is_set():
                return
            start[task.name] = (time.perf_counter() - t0) * 1e3
            try:
                action(task)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller below
                failures.append((task.name, e))
                stop.set()
                return
            end[task.name] = (time.perf_counter() - t0) * 1e3
            done[task.name].set()

    threads = [threading.Thread(target=run_lane, args=(lane,), name=f"lane-{lane}", daemon=True)
               for lane in schedule.lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        name, error = failures[0]
        raise ExecutionError(f"task {name!r} failed: {type(error).__name__}: {error}") from error
    return Timeline(schedule, start, end, source="measured (threads)")


def _execute_streams(schedule: Schedule, action: Callable, device: torch.device) -> Timeline:
    streams = {lane: torch.cuda.Stream(device=device) for lane in schedule.lanes}
    begin = {t.name: torch.cuda.Event(enable_timing=True) for t in schedule.tasks}
    finish = {t.name: torch.cuda.Event(enable_timing=True) for t in schedule.tasks}
    origin = torch.cuda.Event(enable_timing=True)
    origin.record(torch.cuda.current_stream(device))
    for s in streams.values():
        s.wait_event(origin)
    for task in schedule.tasks:
        stream = streams[task.lane]
        with torch.cuda.stream(stream):
            for d in task.deps:
                stream.wait_event(finish[d])
            begin[task.name].record(stream)
            try:
                action(task)
            except BaseException as e:  # noqa: BLE001
                raise ExecutionError(f"task {task.name!r} failed: {type(e).__name__}: {e}") from e
            finish[task.name].record(stream)
    current = torch.cuda.current_stream(device)
    for s in streams.values():
        current.wait_stream(s)
    torch.cuda.synchronize(device)
    start = {n: origin.elapsed_time(e) for n, e in begin.items()}
    end = {n: origin.elapsed_time(e) for n, e in finish.items()}
    return Timeline(schedule, start, end, source=f"measured (CUDA streams on {torch.cuda.get_device_name(device)})")
