"""CPU-only decode and prefill speed of our decoders against the real llama.cpp on the same F32
GGUF, in the same job, at two widths of a Mixtral-style model (8 experts, top-2, 4 layers), each
stated against the host's memory roofline:

* 'small': hidden 512, experts 1536 wide: 78 MB of weights per decoded token, so the fixed
  per-token cost is a large share of the step;
* 'mixtral-shaped': hidden 1024, experts 3584 wide (Mixtral's 3.5 ratio): 358 MB per token, so
  the step is bound by memory bandwidth, as in real MoE models.

    pytest tests/bench/test_bench_scheinfer_cpu.py --benchmark-enable -s [--benchmark-json OUT.json]

Rows: llama.cpp; the reference `Decoder`; the `FastDecoder` eager and with `compile_decode=True`
(each decoded token's layer one compiled region; compile time paid in an untimed first
generation), each with the CPU kernel chosen for its own mode (fast_decode.choose_kernel: 'auto'
times that decoder's own decode steps with each candidate, or $SCHEINFER_CPU_KERNEL) and with the
other candidates (torch's kernels: BLAS eagerly, Inductor's loops compiled; the widest native
kernel), so that a row shows what the choice gained or lost; and the engine (`HybridDecoder`)
with every FFN on its CPU lane, which should be no slower than the eager fast decoder alone.

Each of the 7 rounds (1 with --benchmark-disable, the default, where only the small width runs, at
a reduced size, as a smoke test) runs llama.cpp, every row of ours (a warm-up generation, then a
timed one) and the DRAM read probe (cpu_kernels.read_bandwidth, same thread count), one after
another, so that the machine's noise hits all alike; llama.cpp in a process of its own (as the
CLI's bench runs it). The engine's rows come after, in rounds of their own (llama.cpp, the fast
eager decoder, the engine): an open engine's lane threads slow torch's OpenMP loops in every other
row (tests/bench/README.md), so it opens only for them. Reported per row: medians of tok/s, the
median of the per-round ratios to llama.cpp, GB/s (weights read per decoded token, config.
decode_weight_bytes, times tok/s) and its fraction of the median DRAM read bandwidth; prefill as
tok/s and GFLOP/s of its products (2 FLOPs per weight read per token). The host (CPU, cores,
vector extensions), both kernel choices, the load average before and after, and every number go
to the printout and to the benchmark's extra_info (in --benchmark-json). Targets (decode >= 0.9x
of llama.cpp and >= 80% of the DRAM roofline, prefill >= 0.8x, engine >= 1.0x of the fast eager
decoder) are reported, not asserted: this is a benchmark, not a timed test. Measured tables,
with the machine, load, command and commit of each, are in tests/bench/README.md.
"""
import os
import statistics
import time

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from baselines.llamacpp.runner import LlamaCppSettings, SeparateProcess  # noqa: E402
from impl.scheinfer.config import decode_weight_bytes  # noqa: E402
from impl.scheinfer.cpu_kernels import host_info, read_bandwidth, supported_isas  # noqa: E402
from impl.scheinfer.decoder import Decoder  # noqa: E402
from impl.scheinfer.engine import HybridDecoder, HybridEngine  # noqa: E402
from impl.scheinfer.fast_decode import FastDecoder  # noqa: E402
from impl.scheinfer.generate_models import random_source, tiny_config, write_gguf  # noqa: E402
from impl.scheinfer.policy import FixedPolicy  # noqa: E402
from impl.scheinfer.weights import load_weights  # noqa: E402

pytestmark = pytest.mark.bench

WIDTHS = {"small": (512, 1536), "mixtral-shaped": (1024, 3584)}   # hidden, expert width


def _ours_speed(decoder, prompt, n_decode):
    """(prefill, decode) tok/s of one generation after a warm-up one."""
    for _ in range(2):
        out = decoder.generate([prompt], n_decode + 1)
    return out.prompt_tokens / out.prefill_s, out.decode_steps / out.decode_s


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


@pytest.mark.parametrize("width", list(WIDTHS))
def test_cpu_speed_against_llamacpp(tmp_path, request, width, benchmark):
    full = request.config.getoption("benchmark_enable", default=False)
    if not full and width != "small":
        pytest.skip("full-size widths run with --benchmark-enable")
    hidden, ffn = WIDTHS[width] if full else (128, 256)
    cfg = tiny_config("mixtral", hidden=hidden, moe_ffn_hidden=ffn, num_layers=4 if full else 2)
    path = write_gguf(random_source(cfg, seed=0), tmp_path / "bench.gguf", "f32")
    prompt, n_decode, rounds = list(range(3, 3 + (64 if full else 8))), 32 if full else 4, 7 if full else 1
    threads = torch.get_num_threads()
    source = load_weights(path)
    eager, compiled = FastDecoder(source), FastDecoder(source, compile_decode=True)
    kernel, compiled_kernel = eager.kernel, compiled.kernel       # each chosen for its decoder's mode
    # rows: name -> (decoder, kernel it runs with); the other candidates' rows share the weights
    rows = {"reference": (Decoder(source), None), f"fast eager [{kernel.name}]": (eager, kernel),
            f"compiled [{compiled_kernel.name}]": (compiled, compiled_kernel)}
    for label, dec, chosen in (("fast eager", eager, kernel), ("compiled", compiled, compiled_kernel)):
        rows.update({f"{label} [{k}]": (dec, k) for k in ("torch", *supported_isas()[:1]) if k != chosen.name})
    eager_name, engine_name = f"fast eager [{kernel.name}]", f"engine, all CPU [{kernel.name}]"
    load_before = _load()

    def measure(rows: dict) -> tuple[list, dict, list]:
        ref, ours, dram = [], {name: [] for name in rows}, []
        for _ in range(rounds):
            r = llama_process.measure_speed(path, prompt, n_decode, LlamaCppSettings(n_threads=threads), repeats=1)
            ref.append((r.prefill_median, r.decode_median))
            for name, (dec, k) in rows.items():
                if k is not None:
                    dec.use_kernel(k)
                ours[name].append(_ours_speed(dec, prompt, n_decode))
            dram.append(read_bandwidth(threads, repeats=3)["gb_s"])
        return ref, ours, dram

    def run():
        compile_s = {}
        for name, (dec, k) in rows.items():     # compile each region and kernel once, untimed
            if dec is compiled:
                dec.use_kernel(k)
                t0 = time.perf_counter()
                dec.generate([prompt], 2)
                compile_s[name] = time.perf_counter() - t0
        decoders = measure(rows)
        # the engine opens only now: its lane threads' own OpenMP teams slow torch's OpenMP loops
        # on the caller's thread even while they idle (tests/bench/README.md), which would tax
        # every other row; its rounds pair it with the fast eager decoder and llama.cpp again
        with HybridEngine(FixedPolicy(1.0, 0.0, 0.0), cfg.hidden, torch.float32, 0, device="cpu",
                          kernel=kernel) as engine:
            engines = measure({f"{eager_name}, engine open": (eager, kernel),
                               engine_name: (HybridDecoder(source, engine), None)})
        return decoders, engines, compile_s

    llama_process = SeparateProcess()        # llama.cpp apart from our threads, as the CLI's bench runs it
    try:
        decoders, engines, compile_s = benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        llama_process.close()
        eager.use_kernel(kernel)
        compiled.use_kernel(compiled_kernel)
    load_after = _load()

    token_bytes = decode_weight_bytes(cfg, 4)
    dram = decoders[2] + engines[2]
    dram_gb_s = statistics.median(dram)
    med = lambda rs, i: statistics.median(x[i] for x in rs)  # noqa: E731

    def summary(rs, ref=None):
        decode, prefill = med(rs, 1), med(rs, 0)
        out = {"decode_tok_s": decode, "prefill_tok_s": prefill, "decode_gb_s": decode * token_bytes / 1e9,
               "decode_of_dram": decode * token_bytes / 1e9 / dram_gb_s,
               "prefill_gflop_s": prefill * token_bytes / 4 * 2 / 1e9,
               "decode_tok_s_rounds": [x[1] for x in rs], "prefill_tok_s_rounds": [x[0] for x in rs]}
        if ref is not None:        # medians of the per-round ratios to llama.cpp in the same rounds
            out.update({f"{phase}_vs_llamacpp": statistics.median(o[i] / r[i] for o, r in zip(rs, ref))
                        for i, phase in ((1, "decode"), (0, "prefill"))})
        return out

    results = {"llama.cpp": summary(decoders[0]), **{name: summary(rs, decoders[0]) for name, rs in decoders[1].items()},
               "llama.cpp (engine rounds)": summary(engines[0]),
               **{name: summary(rs, engines[0]) for name, rs in engines[1].items()}}
    ours = {**decoders[1], **engines[1]}
    engine_vs_eager = statistics.median(e[1] / f[1] for e, f in
                                        zip(ours[engine_name], ours[f"{eager_name}, engine open"]))
    host = host_info()
    benchmark.extra_info.update({
        "width": width, "config": {"hidden": cfg.hidden, "moe_ffn_hidden": cfg.moe_ffn_hidden,
                                   "layers": cfg.num_layers, "experts": cfg.num_experts, "top_k": cfg.top_k},
        "threads": threads, "rounds": rounds, "host": host, "cpu_kernel": kernel.as_dict(),
        "compiled_cpu_kernel": compiled_kernel.as_dict(),
        "decode_weight_bytes": token_bytes, "dram_read_gb_s": dram_gb_s, "dram_read_gb_s_rounds": dram,
        "load_before": load_before, "load_after": load_after, "compile_s": compile_s, "results": results,
        "engine_decode_vs_fast_eager": engine_vs_eager})

    print(f"\n{width}: {cfg.num_experts} experts (top-{cfg.top_k}), hidden {cfg.hidden}, ffn {cfg.moe_ffn_hidden}, "
          f"{cfg.num_layers} layers, F32, {threads} threads, {rounds} alternating rounds")
    print(f"  host: {host['cpu']}, {host['cores']} cores, torch {host['torch_cpu_capability']}, vector extensions: "
          f"{' '.join(host['vector_extensions'])}; load average before {load_before}, after {load_after}")
    print(f"  DRAM read bandwidth ({threads} threads, median of rounds): {dram_gb_s:.1f} GB/s; weights read per "
          f"decoded token: {token_bytes / 1e6:.1f} MB, so the decode roofline is "
          f"{dram_gb_s * 1e9 / token_bytes:.1f} tok/s")
    for label, k in (("eager", kernel), ("compiled", compiled_kernel)):
        timed = {d: b["time_ratios"] for d, b in k.basis.items() if d.startswith("decode")}
        print(f"  cpu kernel, {label}: {k.name} ({k.how}" + (f"; decode timed on {k.probe.get('decode_timed')}, time "
              f"ratios to the default {timed}, GB/s {k.rates_gb_s}" if k.basis else "") + ")")
    print(f"  batched products of 3..{kernel.max_tokens} tokens: "
          f"{kernel.batched or kernel.name}"
          + (" (" + ", ".join(f"{k} {v:.0f}" for k, v in kernel.batched_gflop_s.items()) + " GFLOP/s)"
             if kernel.batched_gflop_s else ""))
    print(f"  {'':32s} {'decode tok/s':>12s} {'GB/s':>6s} {'of DRAM':>7s} {'x llama':>7s} | "
          f"{'prefill tok/s':>13s} {'GFLOP/s':>7s} {'x llama':>7s}")
    for name, s in results.items():
        x = lambda key: f"{s[key]:.2f}" if key in s else "1"  # noqa: E731
        print(f"  {name:32s} {s['decode_tok_s']:12.1f} {s['decode_gb_s']:6.1f} {s['decode_of_dram']:7.2f} "
              f"{x('decode_vs_llamacpp'):>7s} | {s['prefill_tok_s']:13.1f} {s['prefill_gflop_s']:7.1f} "
              f"{x('prefill_vs_llamacpp'):>7s}")
    print(f"  engine (all CPU) / fast eager decode: {engine_vs_eager:.2f}x; targets: decode >= 0.9x of llama.cpp "
          f"and >= 0.80 of DRAM, prefill >= 0.8x; compile (untimed): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))
    assert all(r[1] > 0 for r in decoders[0] + engines[0]) and all(o[1] > 0 for rs in ours.values() for o in rs)
