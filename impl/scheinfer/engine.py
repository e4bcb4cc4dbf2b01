"""ScheInfer's three-lane executor: every FFN / expert runs as CC, CG and GG slices on a CPU lane,
a host->device copy lane and a GPU compute lane at the same time (scheinfer.md 2.3-2.4).

* `HybridEngine.run_layer(layer, items)` executes one layer's active FFNs under a `Policy`
  (policy.py; baselines register theirs): the CPU lane computes every CC slice (torch's intra-op
  pool, `threads` threads, the fast decoder's kernels: `fast_decode.fast_ffn` with the engine's
  `kernel`); the copy lane copies every CG slice into one of the staging buffers (double
  buffering: the copy of FFN j+1 overlaps the GPU compute of FFN j); the GPU lane computes every
  GG slice (resident copies) and then each CG slice once its copy has landed, and gives the
  buffer back. Outputs are summed in the fixed order CC + CG + GG, so results never depend on
  timing. Concurrency is a property of the policy: Fiddler and llama.cpp run their parts one
  after another, in the caller's thread, as does any layer whose parts are all CC (nothing to
  overlap, so no hand-off to a lane thread). A layer with no GPU part at all (no staging buffer,
  no resident row: every FFN can only run whole on the CPU) skips only the policy's plan, whose
  one valid answer is known, and runs the same serial path, so an engine with everything on the
  CPU costs about what the fast decoder alone does.
* With CUDA: the GPU lane issues on a compute stream, the copy lane on a copy stream from pinned
  host memory (non_blocking), with CUDA events between them; a lane synchronises its own stream
  before it stamps an end time. Without CUDA both GPU lanes run on CPU tensors (a real memcpy
  into the staging buffers and a real compute on it), so every code path runs and is tested on
  CPU; the timeline is then one of emulated lanes sharing the CPU.
* Failures: an error on any lane (a CUDA out-of-memory, say) cancels the layer's other lanes,
  which stop at their next band or wait, and is raised once, in the caller of `run_layer`. Every
  wait between lanes wakes on cancellation and staging buffers are lent per layer, so no lane
  waits forever for a partner that stopped and a failed layer leaves no buffer behind. Lane
  threads are daemons and `close()` waits a bounded time, so neither it nor interpreter exit can
  hang on a lane.
* Every band records a `LaneEvent` (lane, layer, FFN, phase, start/end, rows, tokens): the
  timeline of diagram (a) in scheinfer.md 2.5, in host time. With CUDA and
  `device_events=True` the copy and GPU bands also record CUDA events on their streams, so
  `device_timeline()` gives when the device itself ran each copy and each product (host stamps
  include the issue and the wait, not only the device work).
* `HybridDecoder` is the eager `fast_decode.FastDecoder` with the engine underneath: non-FFN
  weights on the engine's device, FFN / expert weights in (pinned) host memory with `down` stored as [F, M] rows so every
  slice is one contiguous block, a layer's routed experts handed to the engine together, and the
  phase (prefill / decode) known per forward call.
"""
from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from impl.common.config import ConfigError

from .assign import ExpertLoad
from .config import DecoderConfig
from .decoder import Decoder, FFNItem
from .fast_decode import (FastDecoder, KernelChoice, ProbeShape, choose_kernel, fast_ffn, fast_ffns,
                          named_kernel)
from .layers import ExpertWeights
from .partition import Split
from .policy import FFNKey, Placement, Policy, ffn_widths, place

__all__ = ["LANES", "LaneEvent", "LaneCancelled", "HybridEngine", "HybridDecoder"]

LANES = ("cpu", "h2d", "gpu")
LANE_SWITCH_INTERVAL_S = 1e-4     # GIL switch interval while an engine is open (see _short_switch_interval)
LANE_STOP_TIMEOUT_S = 30.0        # how long a failed layer, or close(), waits for lanes to stop
Slot = tuple[torch.Tensor, torch.Tensor, torch.Tensor]       # staging gate, up, down^T rows [cg_max, M]


@dataclass(frozen=True)
class LaneEvent:
    lane: str            # 'cpu' | 'h2d' | 'gpu'
    band: str            # 'cc' | 'cg' | 'gg'
    layer: int
    expert: Hashable
    phase: str
    start: float         # perf_counter seconds
    end: float
    rows: int
    tokens: int


class LaneCancelled(Exception):
    """A lane stopped because another lane of its layer failed (or the engine was closed)."""


# ----------------------------------------------------------------------------------- lanes

class _LaneThread:
    """One lane's worker thread, running the jobs submitted to it in order, in inference mode
    (thread-local: the caller's does not reach it; the lanes only read weights and activations
    and write their own buffers). A daemon thread: a lane stuck in foreign code never blocks
    interpreter exit."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"scheinfer-{name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    with torch.inference_mode():
                        result = fn()
                    future.set_result(result)
                except BaseException as e:    # handed to the caller through the future
                    future.set_exception(e)

    def submit(self, fn: Callable) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: float) -> bool:
        """True when the thread has ended within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


class _LayerRun:
    """The coordination of one layer's concurrent lanes: the staging slots lent to it, the CG
    copies the copy lane hands to the GPU lane, and the first error. Every wait also ends when a
    lane fails, so no lane waits forever for a partner that has stopped."""

    def __init__(self, slots: Sequence[Slot]):
        self._cond = threading.Condition()
        self._free = list(slots)
        self._landed: dict[int, Slot] = {}
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Record the first error and wake every waiting lane."""
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise LaneCancelled(f"cancelled: another lane failed with {type(self.error).__name__}")

    def _wait_for(self, ready: Callable[[], bool]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.error is not None or ready())
        self.check()

    def take_free_slot(self) -> Slot:
        self._wait_for(lambda: bool(self._free))
        with self._cond:
            return self._free.pop()

    def land(self, j: int, slot: Slot) -> None:
        with self._cond:
            self._landed[j] = slot
            self._cond.notify_all()

    def take_landed(self, j: int) -> Slot:
        self._wait_for(lambda: j in self._landed)
        with self._cond:
            return self._landed.pop(j)

    def give_back(self, slot: Slot) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()


_switch = {"open": 0, "saved": None}
_switch_lock = threading.Lock()


def _short_switch_interval(delta: int) -> None:
    """While any engine is open the GIL switch interval is LANE_SWITCH_INTERVAL_S; the first open
    engine saves the old one, the last to close restores it. Why: the lanes are Python threads whose
    work is many short GIL-free torch calls; with the default 5 ms interval one lane re-takes the
    GIL after each call while another waits for it (a convoy), which serialises the lanes."""
    with _switch_lock:
        if delta > 0 and _switch["open"] == 0:
            _switch["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch["saved"], LANE_SWITCH_INTERVAL_S))
        _switch["open"] += delta
        if delta < 0 and _switch["open"] == 0:
            sys.setswitchinterval(_switch["saved"])


def _start_lane_thread(threads: int) -> None:
    """A lane thread's one-off set-up (its first torch call), on one thread, then its own count:
    a lane holds no OpenMP team until one of its products needs one. Why: libgomp waits only
    briefly before sleeping once it manages more threads than there are CPUs (idle teams' workers
    counted), which slows every parallel loop in the process (tests/bench/README.md). torch sets a
    thread up on its first parallel call from a process-wide default that every
    `torch.set_num_threads` writes, lanes starting together included, so that comes first."""
    torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.ones(4, 64)
    F.linear(x, x)
    torch.set_num_threads(threads)


def _wait_blocking(stream) -> None:
    """Wait for a CUDA stream's work so far on a blocking-sync event: the thread sleeps rather than
    spinning (stream.synchronize() spins, taking a core from the CPU lane)."""
    event = torch.cuda.Event(blocking=True)
    event.record(stream)
    event.synchronize()


def _contiguous_rows(w: ExpertWeights, a: int, b: int) -> Slot:
    """gate, up, down^T rows [a, b) (each [b-a, M]; contiguous when down is stored as [F, M])."""
    return w.gate_FM[a:b], w.up_FM[a:b], w.down_MF[:, a:b].t()


# ----------------------------------------------------------------------------------- engine

class HybridEngine:
    """Three lanes (module doc). `expert_fn` plugs into `decoder.Decoder` directly; `HybridDecoder`
    hands whole layers to `run_layer`. Use as a context manager, or call `close()`."""

    def __init__(self, policy: Policy, hidden: int, dtype: torch.dtype = torch.float32,
                 gpu_mem_bytes: int = 0, device: str | torch.device | None = None, threads: int | None = None,
                 lane_hook: Callable[[str, str], None] | None = None, kernel: str | KernelChoice | None = None,
                 device_events: bool = False):
        if gpu_mem_bytes < 0:
            raise ConfigError(f"gpu_mem_bytes={gpu_mem_bytes!r} is not allowed; expected an integer >= 0")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads={threads!r} is not allowed; expected an integer >= 1")
        # The CPU bands' kernel (`kernel`): named now (a bad name fails here, before any thread
        # starts), or measured on first use
        self.dtype = dtype
        self._probe_shape = ProbeShape.at_hidden(hidden)
        self.use_kernel(kernel)
        if threads is not None:
            torch.set_num_threads(threads)
        self.policy, self.hidden = policy, hidden
        self.dtype_bytes = torch.empty((), dtype=dtype).element_size()
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.gpu_mem_bytes = gpu_mem_bytes
        self.lane_hook = lane_hook
        self.phase = "prefill"
        self.events: list[LaneEvent] = []
        self._lock = threading.Lock()
        self.placement: Placement | None = None
        self._gg: dict[FFNKey, int] = {}
        self._resident: dict[FFNKey, ExpertWeights] = {}
        self._widths: dict[FFNKey, int] | None = None
        self.cg_max: int = 0
        self._staging: list[Slot] = []
        self._active_run: _LayerRun | None = None
        self._stuck_lanes: list[str] = []
        self._lanes = {lane: _LaneThread(lane) for lane in LANES}
        _short_switch_interval(+1)
        self._open = True
        self._close_lock = threading.Lock()
        # Start every lane's thread now, with one small product: a thread's first torch call pays
        # one-off set-up (milliseconds) that would otherwise land in the first layer's timeline.
        # torch's thread count is per thread (OpenMP): the CPU lane gets this thread's (all the
        # cores the caller gave torch); the copy lane one thread, so a host-side copy never runs
        # multi-threaded beside the CPU lane's products; the GPU lane one thread when it only issues
        # CUDA work, else (emulated on the CPU) the CPU lane's count. With CUDA both GPU lanes wait
        # on blocking events (they sleep instead of spinning on a core the CPU lane needs).
        self.threads = torch.get_num_threads()
        self.lane_threads = {"cpu": self.threads, "h2d": 1, "gpu": 1 if self.cuda else self.threads}
        for f in [lane.submit(lambda n=self.lane_threads[name]: _start_lane_thread(n))
                  for name, lane in self._lanes.items()]:
            f.result()
        # each thread's count is its own (OpenMP's and MKL's: tests/unit/test_scheinfer_engine.py);
        # the caller's set again for a build that keeps either process-wide
        torch.set_num_threads(self.threads)
        if self.cuda:
            self._compute_stream = torch.cuda.Stream(self.device)
            self._copy_stream = torch.cuda.Stream(self.device)
        self.device_events = device_events and self.cuda
        self._device_marks: list[tuple[LaneEvent, torch.cuda.Event, torch.cuda.Event]] = []

    @property
    def kernel(self) -> KernelChoice:
        """The CPU lane's kernel for float32 products (fast_decode.choose_kernel): the one named,
        else 'auto' measured on first use as the lane runs a token's experts (FFN by FFN, mode
        'ffns') at the shape of the model given to `use_model` (before it: Mixtral's width ratio
        at the engine's hidden size)."""
        if self._kernel is None:
            self._kernel = choose_kernel(self._kernel_request, mode="ffns", shape=self._probe_shape)
        return self._kernel

    def use_kernel(self, kernel: "str | KernelChoice | None") -> None:
        """The CPU lane's kernel from now on (as the constructor's `kernel`): a named one checked
        now, 'auto' measured on first use."""
        named = named_kernel(kernel) if self.dtype == torch.float32 else KernelChoice("torch", "only", note="not float32")
        self._kernel_request, self._kernel, self._auto_kernel = kernel, named, named is None

    def use_model(self, cfg: DecoderConfig) -> KernelChoice:
        """Measure 'auto' (again, where it was measured for another shape) at this model's expert
        shape; the kernel (`kernel`)."""
        shape = ProbeShape.of(cfg)
        if self._auto_kernel and shape != self._probe_shape:
            self._kernel, self._probe_shape = None, shape
        return self.kernel

    def __enter__(self) -> "HybridEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- placement

    def place(self, widths: dict[FFNKey, int]) -> dict[FFNKey, int]:
        """Size staging buffers and resident rows for these FFNs (once, before running):
        `policy.place` under the engine's budget, then the staging buffers allocated."""
        self.placement = place(self.policy, widths, self.hidden, self.dtype_bytes, self.gpu_mem_bytes)
        self.cg_max = self.placement.cg_max
        self._staging = [tuple(torch.empty(self.cg_max, self.hidden, dtype=self.dtype, device=self.device)
                               for _ in range(3)) for _ in range(self.placement.staging_buffers)]
        self._widths = dict(widths)
        self._gg = dict(self.placement.gg)
        return dict(self._gg)

    @property
    def resident_bytes(self) -> int:
        return sum(self._gg.values()) * 3 * self.hidden * self.dtype_bytes

    def resident_slice(self, key: FFNKey, w: ExpertWeights) -> ExpertWeights:
        """The GPU copy of FFN key's resident (GG) rows, made on first use."""
        r = self._resident.get(key)
        if r is None:
            width, g = w.ffn_hidden, self._gg.get(key, 0)
            rows = _contiguous_rows(w, width - g, width)
            gate, up, down_FM = (t.to(self.device, copy=True).contiguous() for t in rows)
            r = self._resident[key] = ExpertWeights(gate, up, down_FM.t())
        return r

    # -------------------------------------------------------------- running

    def expert_fn(self, layer: int, expert, w: ExpertWeights, x_TM: torch.Tensor) -> torch.Tensor:
        """`decoder.ExpertFn`: one FFN through the lanes (placement is made on first use)."""
        return self.run_layer(layer, [(expert, w, x_TM)], x_TM.shape[0])[0]

    def _stamp(self, lane, band, key, start, rows, tokens, end: float | None = None, marks=None):
        end = time.perf_counter() if end is None else end
        event = LaneEvent(lane, band, key[0], key[1], self.phase, start, end, rows, tokens)
        with self._lock:
            self.events.append(event)
            if marks is not None:
                self._device_marks.append((event, *marks))

    def _marks(self, stream):
        """A (begin, end) pair of timing events, begin recorded on `stream` now (device_events)."""
        if not self.device_events:
            return None
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        return begin, end

    def device_timeline(self) -> list[dict]:
        """The copy and GPU bands as the device ran them (device_events=True): each LaneEvent's
        fields with start_ms / end_ms read from its CUDA events, relative to the earliest."""
        if not self._device_marks:
            return []
        torch.cuda.synchronize(self.device)
        ref = self._device_marks[0][1]
        spans = [(ev, ref.elapsed_time(b), ref.elapsed_time(e)) for ev, b, e in self._device_marks]
        t0 = min(start for _, start, _ in spans)
        return [{**dataclasses.asdict(ev), "start_ms": start - t0, "end_ms": end - t0} for ev, start, end in spans]

    def run_layer(self, layer: int, items: Sequence[FFNItem], layer_tokens: int) -> list[torch.Tensor]:
        """Outputs y_TM of the FFNs items = [(expert, weights, x_TM)] of one layer. A lane's error
        is raised here, once, after the other lanes have stopped."""
        if not self._open:
            raise RuntimeError("HybridEngine is closed; create a new engine to run more layers")
        if self._stuck_lanes:
            raise RuntimeError(f"HybridEngine lanes {self._stuck_lanes} did not stop after an earlier error; "
                               "create a new engine")
        if self._widths is None:
            self.place({(layer, e): w.ffn_hidden for e, w, _ in items})
        for e, w, _ in items:
            if (layer, e) not in self._widths:          # FFNs met only at run time (expert_fn use)
                self._widths[(layer, e)] = w.ffn_hidden
                self._gg.update(self.policy.resident({(layer, e): w.ffn_hidden}, self.hidden, self.dtype_bytes, 0))
        if not self.cg_max and not any(self._gg.get((layer, e)) for e, _, _ in items):
            # no GPU part (no staging buffer, no resident row): every policy's only valid plan
            # is each FFN whole on the CPU, so none is asked for
            splits = [Split(w.ffn_hidden, 0, 0) for _, w, _ in items]
        else:
            splits = self._plan(layer, items, layer_tokens)
        work = [((layer, e), w, x, s) for (e, w, x), s in zip(items, splits)]
        if self.cuda:       # GPU lanes start after the caller's stream has produced x
            self._main_stream = torch.cuda.current_stream(self.device)
            self._compute_stream.wait_stream(self._main_stream)
        cpu_only = all(not s.cg and not s.gg for *_, s in work)
        parts = self._run_concurrent(work) if self.policy.concurrent and not cpu_only else self._run_serial(work)
        out = []
        for (key, w, x, s), p in zip(work, parts):
            ys = [p[b] for b in ("cc", "cg", "gg") if b in p]
            y = ys[0] if ys else torch.zeros_like(x)
            for t in ys[1:]:
                y = y + t
            out.append(y)
        return out

    def _plan(self, layer: int, items: Sequence[FFNItem], layer_tokens: int) -> list[Split]:
        """The policy's splits of the layer's FFNs, checked against the engine's resident rows and
        staging buffer."""
        loads = [ExpertLoad((layer, e), x.shape[0], w.ffn_hidden, self._gg.get((layer, e), 0)) for e, w, x in items]
        splits = self.policy.plan(layer, loads, self.phase, layer_tokens, self.cg_max)
        for ld, s in zip(loads, splits):
            if s.width != ld.width or s.gg != ld.gg or s.cg > self.cg_max:
                raise RuntimeError(f"policy {self.policy.name!r} planned {s} for {ld}; expected width "
                                   f"{ld.width}, gg {ld.gg}, cg <= {self.cg_max}")
        return splits

    # lane bodies -------------------------------------------------------------

    def _hook(self, lane, band):
        if self.lane_hook is not None:
            self.lane_hook(lane, band)

    def _cpu_bands(self, work, run: _LayerRun | None = None) -> dict[int, torch.Tensor]:
        """The CC slices of a layer's FFNs (work item j -> y), `_cpu_ffns`."""
        jobs = [(j, key, w if s.cc == w.ffn_hidden else w.slice(0, s.cc), x)
                for j, (key, w, x, s) in enumerate(work) if s.cc]
        if not jobs:
            return {}
        ys = self._cpu_ffns([(key, w, x) for _, key, w, x in jobs], run)
        return {j: y for (j, *_), y in zip(jobs, ys)}

    def _cpu_ffns(self, jobs: Sequence[tuple[FFNKey, ExpertWeights, torch.Tensor]],
                  run: _LayerRun | None = None) -> list[torch.Tensor]:
        """y_TM (on the host) of CC slices [(key, rows' weights, x_TM)] as one call (`fast_ffns`:
        one native op for all of them, whose events therefore share start and end)."""
        if run is not None:
            run.check()
        t0 = time.perf_counter()
        for _ in jobs:
            self._hook("cpu", "cc")
        xs = [self._to_host(x) for _, _, x in jobs]
        ys = fast_ffns([(w, x) for (_, w, _), x in zip(jobs, xs)], self.kernel)
        t1 = time.perf_counter()
        for (key, w, _), x in zip(jobs, xs):
            self._stamp("cpu", "cc", key, t0, w.ffn_hidden, x.shape[0], t1)
        return ys

    def _copy_band(self, key, w, s, slot: Slot) -> Slot:
        t0 = time.perf_counter()
        self._hook("h2d", "cg")
        src = _contiguous_rows(w, s.cc, s.cc + s.cg)
        marks = None
        if self.cuda:
            marks = self._marks(self._copy_stream)
            with torch.cuda.stream(self._copy_stream):
                for dst, t in zip(slot, src):
                    dst[:s.cg].copy_(t, non_blocking=True)
            if marks:
                marks[1].record(self._copy_stream)
            _wait_blocking(self._copy_stream)
        else:
            for dst, t in zip(slot, src):
                dst[:s.cg].copy_(t)
        self._stamp("h2d", "cg", key, t0, s.cg, 0, marks=marks)
        return slot

    def _gpu_band(self, band, key, w_dev: ExpertWeights, x_dev, rows) -> torch.Tensor:
        t0 = time.perf_counter()
        self._hook("gpu", band)
        marks = None
        if self.cuda:
            marks = self._marks(self._compute_stream)
            with torch.cuda.stream(self._compute_stream):
                y = fast_ffn(w_dev, x_dev)
            if marks:
                marks[1].record(self._compute_stream)
            _wait_blocking(self._compute_stream)
            y.record_stream(self._main_stream)      # freed later on the caller's stream
        else:
            y = fast_ffn(w_dev, x_dev, self.kernel)
        self._stamp("gpu", band, key, t0, rows, x_dev.shape[0], marks=marks)
        return y

    def _staged(self, slot: Slot, rows: int) -> ExpertWeights:
        gate, up, down_FM = slot
        return ExpertWeights(gate[:rows], up[:rows], down_FM[:rows].t())

    def _to_host(self, x):
        return x.to("cpu") if self.cuda else x

    def _to_dev(self, y):
        return y.to(self.device, non_blocking=False) if self.cuda else y

    def _run_concurrent(self, work):
        parts: list[dict[str, torch.Tensor]] = [{} for _ in work]
        run = _LayerRun(self._staging)

        def cpu_lane():
            for j, y in self._cpu_bands(work, run).items():
                parts[j]["cc"] = y

        def copy_lane():
            for j, (key, w, x, s) in enumerate(work):
                if s.cg:
                    run.land(j, self._copy_band(key, w, s, run.take_free_slot()))

        def gpu_lane():
            for j, (key, w, x, s) in enumerate(work):
                if s.gg:
                    run.check()
                    parts[j]["gg"] = self._gpu_band("gg", key, self.resident_slice(key, w), x, s.gg)
            for j, (key, w, x, s) in enumerate(work):
                if s.cg:
                    slot = run.take_landed(j)
                    parts[j]["cg"] = self._gpu_band("cg", key, self._staged(slot, s.cg), x, s.cg)
                    run.give_back(slot)

        def guarded(body):
            def lane():
                try:
                    body()
                except LaneCancelled:
                    raise
                except BaseException as e:
                    run.fail(e)
                    raise
            return lane

        self._active_run = run
        try:
            futures = [self._lanes[name].submit(guarded(body))
                       for name, body in (("gpu", gpu_lane), ("h2d", copy_lane), ("cpu", cpu_lane))]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException as e:       # the caller interrupted (KeyboardInterrupt, say)
                run.fail(e)
                raise
            finally:
                if run.error is not None:
                    self._await_stop(futures)
        finally:
            self._active_run = None
        if run.error is not None:
            raise run.error
        for f in futures:
            f.result()
        for p in parts:
            if "cc" in p:
                p["cc"] = self._to_dev(p["cc"])
        return parts

    def _await_stop(self, futures: Sequence[Future]) -> None:
        """Wait for cancelled lanes to stop, at most LANE_STOP_TIMEOUT_S; a lane still running
        after that (blocked in foreign code) makes the engine refuse further layers, since it may
        still write to a staging buffer."""
        _, pending = wait(futures, timeout=LANE_STOP_TIMEOUT_S)
        lanes = dict(zip(futures, ("gpu", "h2d", "cpu")))
        self._stuck_lanes = sorted(lanes[f] for f in pending)

    def _run_serial(self, work):
        """GPU parts first, then CPU parts, one at a time in the caller's thread (Fiddler's and
        llama.cpp's order; any policy's layer with CPU parts only, which has nothing to overlap)."""
        parts: list[dict[str, torch.Tensor]] = [{} for _ in work]
        for j, (key, w, x, s) in enumerate(work):
            if s.gg:
                parts[j]["gg"] = self._gpu_band("gg", key, self.resident_slice(key, w), x, s.gg)
            if s.cg:
                slot = self._copy_band(key, w, s, self._staging[0])
                parts[j]["cg"] = self._gpu_band("cg", key, self._staged(slot, s.cg), x, s.cg)
        for j, y in self._cpu_bands(work).items():
            parts[j]["cc"] = self._to_dev(y)
        return parts

    def close(self, timeout: float = LANE_STOP_TIMEOUT_S) -> None:
        """Stop the lanes: a layer running in another thread is cancelled, and each lane thread is
        waited for at most `timeout` seconds in all. Idempotent."""
        with self._close_lock:
            if not self._open:
                return
            self._open = False
        run = self._active_run
        if run is not None:
            run.fail(LaneCancelled("the engine was closed while a layer was running"))
        for lane in self._lanes.values():
            lane.stop()
        deadline = time.monotonic() + timeout
        for lane in self._lanes.values():
            lane.join(max(0.0, deadline - time.monotonic()))
        _short_switch_interval(-1)


# ----------------------------------------------------------------------------------- decoder

class HybridDecoder(FastDecoder):
    """The eager `fast_decode.FastDecoder` (its kernel the engine's) running its FFNs through a
    `HybridEngine` (module doc): a layer's routed experts and shared expert go to the engine in
    one `run_layer` call. `on_forward(S)` is called after every forward call with its number of
    new positions (progress displays)."""

    def __init__(self, source, engine: HybridEngine, *, on_forward: Callable[[int], None] | None = None,
                 pin_memory: bool | None = None):
        self.engine = engine
        self._pin = engine.cuda if pin_memory is None else pin_memory
        self.on_forward = on_forward
        super().__init__(source, dtype=engine.dtype, device=engine.device, cache_weights=True,
                         kernel=engine.use_model(source.config))      # (then `use_kernel`: the same choice)
        if self.config.hidden != engine.hidden:
            raise ConfigError(f"engine hidden={engine.hidden} but the model's hidden={self.config.hidden}")
        engine.place(ffn_widths(self.config))
        for i in range(self.config.num_layers):             # resident slices up front
            lw = self.layer_weights(i)
            ffns = {"dense": lw.dense} if lw.dense is not None else {
                **dict(enumerate(lw.moe.experts)), **({"shared": lw.moe.shared} if lw.moe.shared else {})}
            for e, w in ffns.items():
                engine.resident_slice((i, e), w)

    def use_kernel(self, kernel: "str | KernelChoice | None") -> KernelChoice:
        """The engine's CPU lane and this decoder's own products switch together (the engine's
        `use_kernel`; 'auto' measured as the lane runs products, at this model's shape)."""
        self.engine.use_kernel(kernel)
        self.kernel = self.engine.use_model(self.config)
        return self.kernel

    def _expert(self, prefix: str) -> ExpertWeights:
        # FFN weights stay in host memory (pinned with CUDA); down kept as [F, M] rows.
        host = lambda part: self.source.load(f"{prefix}.{part}.weight").to(dtype=self.dtype, copy=True)  # noqa: E731
        gate, up, down_FM = host("gate"), host("up"), host("down").t().contiguous()
        if self._pin:
            gate, up, down_FM = gate.pin_memory(), up.pin_memory(), down_FM.pin_memory()
        return ExpertWeights(gate, up, down_FM.t())

    def _moe_weights(self, i: int):
        return Decoder._moe_weights(self, i)           # each expert in host memory, not stacked

    def run_ffns(self, i: int, items: Sequence[FFNItem], layer_tokens: int) -> list[torch.Tensor]:
        return self.engine.run_layer(i, items, layer_tokens)

    @torch.no_grad()
    def forward(self, tokens_BS, cache, valid_BS=None, last_only=False):
        S = torch.as_tensor(tokens_BS).shape[1]
        self.engine.phase = "prefill" if S > 1 or cache.length == 0 else "decode"
        out = super().forward(tokens_BS, cache, valid_BS, last_only)
        if self.on_forward is not None:
            self.on_forward(S)
        return out
