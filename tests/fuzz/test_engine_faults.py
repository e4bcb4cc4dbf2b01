"""Faults injected into the ScheInfer engine's lanes (CPU, host->device copy, GPU; emulated on the
CPU here) through its `lane_hook`, beyond tests/unit/test_scheinfer_engine.py (a fault on each
lane surfaces once, the engine runs on after a failed layer, close() cancels a running layer):

* the GPU lane fails exactly while the copy lane is blocked waiting for a staging slot;
* faults of other kinds (out of memory, KeyboardInterrupt), and in the serial policies;
* after any of them no engine thread is left (threading.enumerate) and close() returns at once,
  without relying on its stop timeout;
* a lane stuck in foreign code beside a failing one: the caller gets the failure after the
  bounded stop wait, and the engine refuses further layers;
* in a fresh interpreter, a fault (or a stuck lane) ends the process with a non-zero status
  within a timeout: nothing hangs at interpreter exit.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import baselines.fiddler  # noqa: F401  (registers the engine policy 'fiddler')
import baselines.llamacpp  # noqa: F401  (registers the engine policy 'layers')
from impl.scheinfer import engine as engine_module
from impl.scheinfer.engine import HybridDecoder, HybridEngine
from impl.scheinfer.generate_models import generate
from impl.scheinfer.partition import REFERENCE_COST
from impl.scheinfer.policy import FixedPolicy, ffn_widths, make_policy
from impl.scheinfer.weights import GGUFWeights

pytestmark = pytest.mark.fuzz

REPO = Path(__file__).resolve().parents[2]
PROMPT = [1, 5, 9, 33, 100, 7, 8, 200, 17, 3]     # prefill routes to more experts than staging slots
BIG = 1 << 30
PROMPT_CLOSE_S = 5.0       # "at once": far below LANE_STOP_TIMEOUT_S, so close() did not wait it out


def _engine(policy, src, hook, gpu_mem_bytes: int = BIG) -> HybridEngine:
    """An engine with torch's CPU kernel: the lanes' coordination is under test, not the kernels
    (the native ones cost a start-up measurement)."""
    return HybridEngine(policy, src.config.hidden, gpu_mem_bytes=gpu_mem_bytes, lane_hook=hook, kernel="torch")


class InjectedFault(RuntimeError):
    """Stands for a lane's real failure."""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return generate("mixtral", tmp_path_factory.mktemp("faults") / "mixtral.gguf", dtype="f32", seed=5)


@pytest.fixture(scope="module")
def src(model_path):
    return GGUFWeights(model_path)


def _engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("scheinfer-")}


def _stack(thread: threading.Thread) -> list[str]:
    """Function names on `thread`'s Python stack, innermost first."""
    frame, names = sys._current_frames().get(thread.ident), []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _generate_and_close(engine: HybridEngine, src, timeout: float = 60.0) -> dict:
    """Generate in a thread joined with a timeout (a hang fails instead of blocking), then close
    the engine in this thread, timed. Returns the error, whether generation hung, close's seconds."""
    outcome: dict = {}

    def body():
        try:
            HybridDecoder(src, engine).generate([PROMPT], 3)
        except BaseException as e:    # noqa: BLE001  (KeyboardInterrupt included: it is the injected fault)
            outcome["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    outcome["hung"] = t.is_alive()
    started = time.monotonic()
    engine.close()
    outcome["close_s"] = time.monotonic() - started
    return outcome


def _assert_clean_failure(outcome: dict, fault: BaseException, before: set[threading.Thread], uncaught: list) -> None:
    assert not outcome["hung"], "generation hung after a lane failed"
    assert outcome["error"] is fault                                   # the lane's own error, once
    assert outcome["close_s"] < PROMPT_CLOSE_S
    assert not uncaught                                                # nothing raised in a lane thread alone
    assert _engine_threads() <= before, "an engine thread outlived close()"


@pytest.fixture
def uncaught(monkeypatch) -> list:
    seen: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args))
    return seen


def test_gpu_lane_fails_while_the_copy_lane_waits_for_a_staging_slot(src, uncaught):
    """The GPU lane, before it gives any staging slot back, waits until the copy lane has filled
    every slot and is blocked in take_free_slot, then raises: the copy lane must wake and stop."""
    before = _engine_threads()
    fault = InjectedFault("injected on the GPU lane while the copy lane waits")
    state = {"armed": True, "copy_lane_was_waiting": False}
    engine: HybridEngine | None = None

    def hook(lane, band):
        if lane == "gpu" and state["armed"]:
            state["armed"] = False
            copy_thread = engine._lanes["h2d"]._thread
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stack = _stack(copy_thread)
                if "take_free_slot" in stack and stack[0] == "wait":
                    state["copy_lane_was_waiting"] = True
                    break
                time.sleep(0.001)
            raise fault
    engine = _engine(FixedPolicy(0.3, 0.3, 0.4), src, hook)
    outcome = _generate_and_close(engine, src)
    assert state["copy_lane_was_waiting"], "the copy lane never waited for a slot: the case did not happen"
    _assert_clean_failure(outcome, fault, before, uncaught)


FAULT_KINDS = {
    "runtime-error": lambda: InjectedFault("injected"),
    "out-of-memory": lambda: torch.OutOfMemoryError("injected: CUDA out of memory"),
    "keyboard-interrupt": lambda: KeyboardInterrupt(),
}
LANE_BANDS = [("cpu", "cc"), ("h2d", "cg"), ("gpu", "gg"), ("gpu", "cg")]


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("lane,band", LANE_BANDS, ids=[f"{lane}-{band}" for lane, band in LANE_BANDS])
def test_any_fault_on_any_lane_leaves_no_thread_and_closes_at_once(src, uncaught, lane, band, kind):
    before = _engine_threads()
    fault = FAULT_KINDS[kind]()
    armed = [True]

    def hook(l, b):
        if armed[0] and (l, b) == (lane, band):
            armed[0] = False
            raise fault
    engine = _engine(FixedPolicy(0.3, 0.3, 0.4), src, hook)
    _assert_clean_failure(_generate_and_close(engine, src), fault, before, uncaught)


@pytest.mark.parametrize("policy", ["fiddler", "layers"])
@pytest.mark.parametrize("lane", ["cpu", "gpu"])
def test_fault_in_a_serial_policy_surfaces_in_the_caller(src, uncaught, policy, lane):
    """Fiddler's and llama.cpp's parts run one after another in the caller's thread: a fault there
    is the caller's own exception, and the lanes still stop."""
    before = _engine_threads()
    fault = InjectedFault(f"injected on the {lane} band of {policy}")

    def hook(l, b):
        if l == lane:
            raise fault
    cfg = src.config
    serial = make_policy(policy, cost=REFERENCE_COST, hidden=cfg.hidden, num_layers=cfg.num_layers,
                         dtype_bytes=4, tile=16)
    assert not serial.concurrent
    ffn_bytes = sum(ffn_widths(cfg).values()) * 3 * cfg.hidden * 4
    engine = _engine(serial, src, hook, gpu_mem_bytes=ffn_bytes * 3 // 4)    # some FFNs / layers on the GPU lane
    _assert_clean_failure(_generate_and_close(engine, src), fault, before, uncaught)


def test_a_lane_stuck_in_foreign_code_beside_a_failing_one(src, uncaught, monkeypatch):
    """The GPU lane never returns from its band (a driver call that hangs, say) while the CPU lane
    fails: the caller gets the CPU lane's error once the bounded stop wait is over, the engine
    refuses further layers (the stuck lane may still write a staging buffer), close() returns."""
    monkeypatch.setattr(engine_module, "LANE_STOP_TIMEOUT_S", 0.5)
    release = threading.Event()
    fault = InjectedFault("injected on the CPU lane")
    gpu_entered = threading.Event()

    def hook(lane, band):
        if lane == "gpu" and not gpu_entered.is_set():
            gpu_entered.set()
            release.wait(60)                                  # stuck until the test lets it go
        elif lane == "cpu" and gpu_entered.wait(30):
            raise fault
    engine = _engine(FixedPolicy(0.3, 0.3, 0.4), src, hook)
    dec = HybridDecoder(src, engine)
    try:
        with pytest.raises(InjectedFault) as e:
            dec.generate([PROMPT], 3)
        assert e.value is fault
        assert engine._stuck_lanes == ["gpu"]
        with pytest.raises(RuntimeError, match=r"lanes \['gpu'\] did not stop"):
            dec.generate([PROMPT], 3)
        started = time.monotonic()
        engine.close(timeout=0.5)
        assert time.monotonic() - started < PROMPT_CLOSE_S
    finally:
        release.set()
    for t in _engine_threads():
        t.join(10)
    assert not _engine_threads()
    assert not uncaught


# ------------------------------------------------------------------------------------ a fresh interpreter

_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from impl.scheinfer import engine as engine_module
    from impl.scheinfer.engine import HybridDecoder, HybridEngine
    from impl.scheinfer.policy import FixedPolicy
    from impl.scheinfer.weights import GGUFWeights

    mode = sys.argv[2]
    engine_module.LANE_STOP_TIMEOUT_S = 0.5
    src = GGUFWeights(sys.argv[1])
    stuck = threading.Event()

    def hook(lane, band):
        if mode == "gpu-fails" and lane == "gpu":
            raise RuntimeError("injected on the GPU lane")
        if mode == "gpu-stuck-cpu-fails":
            if lane == "gpu":
                stuck.set()
                threading.Event().wait()            # never returns
            if lane == "cpu" and stuck.wait(30):
                raise RuntimeError("injected on the CPU lane")

    engine = HybridEngine(FixedPolicy(0.3, 0.3, 0.4), src.config.hidden, gpu_mem_bytes=1 << 30, lane_hook=hook,
                          kernel="torch")
    if mode == "gpu-stuck-no-close":
        def hook_stuck(lane, band):
            if lane == "gpu":
                threading.Event().wait()
        engine.lane_hook = hook_stuck
        threading.Thread(target=lambda: HybridDecoder(src, engine).generate([[1, 5, 9, 33, 100, 7]], 2),
                         daemon=True).start()
        time.sleep(1.0)
        raise SystemExit(3)                          # exits with the engine open and a lane stuck
    HybridDecoder(src, engine).generate([[1, 5, 9, 33, 100, 7, 8, 200]], 2)   # raises: not caught
""")


@pytest.mark.parametrize("mode,status", [("gpu-fails", 1), ("gpu-stuck-cpu-fails", 1), ("gpu-stuck-no-close", 3)])
def test_a_process_with_a_failing_or_stuck_lane_exits(model_path, mode, status):
    """Uncaught lane errors end the interpreter with a non-zero status; a lane stuck forever (lane
    threads are daemons) does not keep it alive, with or without close()."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(model_path), mode], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == status, proc.stderr[-2000:]
    if status == 1:
        assert "injected on the" in proc.stderr
