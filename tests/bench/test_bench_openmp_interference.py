"""Why llama.cpp is measured in a process of its own: the real llama.cpp's decode speed (and a
compiled torch decoder's, with --benchmark-enable) in one process, alone, with an idle
`HybridEngine` open beside it, after the engine closed, beside one idle thread that once ran a
torch product on all threads (its own OpenMP team, no engine), and beside one whose product ran on
one thread (no team: the control). torch and llama.cpp share one OpenMP runtime (torch's
libgomp.so.1), which waits only very briefly before sleeping (about 100 spins instead of about
300,000) once it manages more threads than there are CPUs, idle teams' workers counted; every
parallel loop in the process then pays a futex wake-up per region (tests/bench/README.md has the
measured tables). That is why `baselines.llamacpp.runner.SeparateProcess` exists and the CPU bench
opens its engine last.

    .venv/bin/python -m pytest tests/bench/test_bench_openmp_interference.py --benchmark-enable -s

Each condition: medians of `rounds` runs (5 with --benchmark-enable; 1 at a tiny size without, a
smoke test), a 64-token prompt and 32 decoded tokens on the CPU bench's small Mixtral-style F32 GGUF
(hidden 512, experts 1536 wide, 4 layers). The conditions run in the order listed, one process,
so that the last two show the effect coming and going; the ratios to the first are reported, not
asserted.
"""
from __future__ import annotations

import os
import queue
import statistics
import threading

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("llama_cpp")

from baselines.llamacpp.runner import LlamaCppSettings, measure_speed  # noqa: E402
from impl.scheinfer.engine import HybridEngine  # noqa: E402
from impl.scheinfer.fast_decode import FastDecoder  # noqa: E402
from impl.scheinfer.generate_models import random_source, tiny_config, write_gguf  # noqa: E402
from impl.scheinfer.policy import FixedPolicy  # noqa: E402
from impl.scheinfer.weights import load_weights  # noqa: E402

pytestmark = pytest.mark.bench


def _idle_openmp_thread(team: int) -> tuple[threading.Thread, queue.SimpleQueue]:
    """A thread that runs one product on `team` threads (creating its OpenMP team of that size;
    1: none), then waits until told to end."""
    stop: queue.SimpleQueue = queue.SimpleQueue()
    threads, ready = torch.get_num_threads(), threading.Event()

    def run():
        torch.set_num_threads(team)
        x = torch.ones(256, 256)
        F.linear(x, x)
        ready.set()
        stop.get()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait()
    torch.set_num_threads(threads)          # the process-wide counts back to this thread's
    return t, stop


def test_idle_openmp_teams_slow_llamacpp_in_the_same_process(tmp_path, request, benchmark):
    full = request.config.getoption("benchmark_enable", default=False)
    hidden, ffn, layers = (512, 1536, 4) if full else (128, 256, 2)
    cfg = tiny_config("mixtral", hidden=hidden, moe_ffn_hidden=ffn, num_layers=layers)
    path = write_gguf(random_source(cfg, seed=0), tmp_path / "bench.gguf", "f32")
    prompt, n_decode, rounds = list(range(3, 67 if full else 11)), 32 if full else 4, 5 if full else 1
    threads = torch.get_num_threads()
    compiled = FastDecoder(load_weights(path), compile_decode=True, kernel="torch") if full else None

    def speeds() -> dict[str, float]:
        out = {"llama.cpp": statistics.median(
            measure_speed(path, prompt, n_decode, LlamaCppSettings(n_threads=threads), repeats=1).decode_median
            for _ in range(rounds))}
        if compiled is not None:
            runs = []
            for _ in range(rounds):
                gen = compiled.generate([prompt], n_decode + 1)
                runs.append(gen.decode_steps / gen.decode_s)
            out["compiled decoder [torch]"] = statistics.median(runs)
        return out

    def run() -> dict[str, dict[str, float]]:
        if compiled is not None:
            compiled.generate([prompt], 2)                  # compile once, untimed
        table = {"alone": speeds()}
        engine = HybridEngine(FixedPolicy(1.0, 0.0, 0.0), cfg.hidden, torch.float32, 0, device="cpu", kernel="torch")
        try:
            table["an engine open, idle"] = speeds()
        finally:
            engine.close()
        table["the engine closed"] = speeds()
        for team, condition in ((threads, "one idle thread with its own OpenMP team"),
                                (1, "one idle thread whose product ran on one thread")):
            thread, stop = _idle_openmp_thread(team)
            try:
                table[condition] = speeds()
            finally:
                stop.put(None)
                thread.join(timeout=10)
        return table

    table = benchmark.pedantic(run, rounds=1, iterations=1)
    base = table["alone"]
    benchmark.extra_info.update({"threads": threads, "rounds": rounds, "hidden": hidden, "ffn": ffn,
                                 "layers": layers, "decode_tok_s": table, "load": list(os.getloadavg())})
    print(f"\nOpenMP interference, {threads} threads, {rounds} runs per cell (medians, decode tok/s, ratio to alone):")
    for condition, row in table.items():
        print(f"  {condition:48s} " + "  ".join(f"{k} {v:8.1f} ({v / base[k]:.2f}x)" for k, v in row.items()))
    assert all(v > 0 for row in table.values() for v in row.values())
