"""ScheInfer's native CPU kernels (csrc/cpu_kernels.cpp) and what a run needs to know about the host.

Why native kernels: a decoded token's products are memory bound, so the CPU side's speed is how
close it streams the weights to the DRAM bandwidth. MKL's float32 GEMV and Inductor's generated
reduction loops (one row at a time, one accumulator) reach only part of it on some hosts; these
kernels read several rows at once with independent accumulators and split the rows over as many
threads as torch's intra-op count of the calling thread (so an engine lane's own count applies):
the extension's own helper threads, which the caller never waits for unless they took part (an
OpenMP barrier would wait for a thread the OS has not scheduled, a time slice on a shared host).
Ops, all float32 on the CPU, `isa` one of `ISAS`' numbers:

* `torch.ops.scheinfer.linear(x [..., K], w [N, K], b?, isa)`: x @ w^T, w with contiguous rows
  or stored transposed (the engine's down slices);
* `torch.ops.scheinfer.ffn(x [T, M], gate [F, M], up [F, M], down [M, F], isa)`: a SwiGLU FFN
  (down with rows contiguous, or stored [F, M] as the engine keeps it), and `ffn_many(xs, gates,
  ups, downs, isa)`: several, each on its own tokens, in the same two parallel regions;
* `torch.ops.scheinfer.moe_token(x [1, M], gate_up [E, 2F, M], down [E, M, F], ids [K], weights [K],
  isa)`: a decoded token's routed experts, weighted and summed in ascending expert order;
* `torch.ops.scheinfer.read_sum(buf, isa)`: one read of a buffer (the DRAM bandwidth probe).

They are built on first use with torch.utils.cpp_extension (the system C++ compiler and ninja,
about 20-40 s once, cached under ~/.cache/torch_extensions), one build for every x86 host: each
instruction set's kernels are compiled in and picked at run time. Without a compiler the build
fails with one clear warning and `available()` is False; callers then use torch's kernels.
$SCHEINFER_NATIVE_KERNELS=off skips the build (a run that must not spend its time compiling).
A build runs under a lock the kernel releases when its holder dies (`locked_build`): torch's own
lock file outlives a build that was killed, and every later build would wait on it forever.
Fake (meta) implementations let the ops sit inside torch.compile'd regions.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

__all__ = ["ISAS", "NATIVE_ENV", "available", "build_directory", "locked_build", "supported_isas", "load_error",
           "torch_ops_on_one_thread", "host_info", "read_bandwidth"]

ISAS = {"avx512": 2, "avx2": 1, "sse": 0}      # instruction set -> the ops' `isa` number
_CSRC = Path(__file__).with_name("csrc")
_EXTENSION = "scheinfer_cpu_kernels"
_error: str | None = None
BUILD_WAIT_S = 600.0                # seconds a build waits for another process's build to end
NATIVE_ENV = "SCHEINFER_NATIVE_KERNELS"     # 'off': never build; anything else (default): build on first use


@functools.cache
def available() -> bool:
    """True when the extension is built and loaded (building it now if needed)."""
    global _error
    if os.environ.get(NATIVE_ENV, "").lower() == "off":
        _error = f"not built (${NATIVE_ENV}=off)"
        return False
    try:
        from torch.utils import cpp_extension
        build = build_directory()
        locked_build(build, lambda: cpp_extension.load(
            name=_EXTENSION, sources=[str(_CSRC / "cpu_kernels.cpp")], extra_include_paths=[str(_CSRC)],
            extra_cflags=["-O3", "-ffp-contract=fast"], build_directory=str(build), is_python_module=False,
            verbose=False))
    except Exception as e:                # no compiler / ninja, a failed build: torch's kernels instead
        _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"ScheInfer's native CPU kernels are unavailable ({_error}); using torch's kernels. "
                      "They need a C++ compiler (c++/g++ on PATH, or CXX) and ninja.", RuntimeWarning, stacklevel=2)
        return False
    _register_fakes()
    return True


def build_directory() -> Path:
    """Where the extension is built: under torch's extensions root ($TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions), one folder per Python and torch version."""
    from torch.utils import cpp_extension
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / f"{_EXTENSION}-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"


def locked_build(build: Path, run_build, wait_s: float = BUILD_WAIT_S) -> None:
    """Run `run_build` (torch's build and load) holding an exclusive flock on `build`/build.flock.
    The kernel drops a flock when its holder exits, however it exits; torch's own `lock` file does
    not go away with a killed build, so one found while the flock is held was left by a dead build
    and is removed before torch would wait on it. Waiting for a live build ends after `wait_s`."""
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "build.flock", "w") as held:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building {build} for over {wait_s:.0f} s") from None
                time.sleep(0.2)
        (build / "lock").unlink(missing_ok=True)
        run_build()


@contextlib.contextmanager
def torch_ops_on_one_thread():
    """For the context, on the calling thread: torch's own operations on one thread, the native
    ops' loops on as many as torch's count before it (`set_threads`). Why: torch's OpenMP workers
    spin for a while after each parallel region, and between a decode step's native ops (norms,
    RoPE, attention over the cache, the router: microseconds each) they hold the cores that the
    native ops' helpers need, so a native op ran on its caller's thread alone (tests/bench/README.md
    has the measured effect). Other threads keep their counts (OpenMP's and MKL's are per thread
    once torch has set the thread up). Nothing changes with one thread or without the extension."""
    threads = torch.get_num_threads()
    if threads == 1 or not available():
        yield
        return
    before = torch.ops.scheinfer.set_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.ops.scheinfer.set_threads(before)


def load_error() -> str | None:
    """Why the extension is unavailable (None: available, or not tried yet)."""
    return _error


def _register_fakes() -> None:
    lib = "scheinfer::"
    torch.library.register_fake(lib + "linear")(lambda x, w, b, isa: x.new_empty(*x.shape[:-1], w.shape[0]))
    torch.library.register_fake(lib + "ffn")(lambda x, gate, up, down, isa: x.new_empty(x.shape[0], down.shape[0]))
    torch.library.register_fake(lib + "ffn_many")(
        lambda xs, gates, ups, downs, isa: [x.new_empty(x.shape[0], d.shape[0]) for x, d in zip(xs, downs)])
    torch.library.register_fake(lib + "moe_token")(
        lambda x, gate_up, down, ids, weights, isa: x.new_empty(1, gate_up.shape[2]))


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The instruction sets of `ISAS` this CPU runs, widest first (empty without the extension)."""
    if not available():
        return ()
    return tuple(name for name, isa in ISAS.items() if torch.ops.scheinfer.cpu_supports(isa))


# ----------------------------------------------------------------------------------- the host

_VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                 "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve", "sve2")


@functools.cache
def host_info() -> dict:
    """CPU model, cores this process may use, vector extensions (from /proc/cpuinfo's flags) and
    the last-level cache size: what a CPU measurement depends on, for run records."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "vector_extensions": [f for f in _VECTOR_FLAGS if f in flags], "llc_bytes": last_level_cache_bytes(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def last_level_cache_bytes() -> int:
    """Size of CPU 0's largest cache (sysfs), 32 MiB when unknown."""
    sizes = []
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def read_bandwidth(threads: int | None = None, nbytes: int | None = None, repeats: int = 5) -> dict:
    """The host's DRAM read bandwidth at `threads` threads (default: torch's): GB/s of one read
    of a buffer 8x the last-level cache (at least 256 MiB), the best of `repeats` passes, as torch's
    sum and as the native read kernel (when built); 'gb_s' is the larger, the roofline a
    memory-bound product can reach."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        nbytes = nbytes or max(8 * last_level_cache_bytes(), 256 << 20)
        buf = torch.ones(nbytes // 4)
        methods = {"torch_sum": lambda: float(buf.sum())}
        if supported_isas():
            isa = ISAS[supported_isas()[0]]
            methods["native_read"] = lambda: torch.ops.scheinfer.read_sum(buf, isa)
        out = {"threads": torch.get_num_threads(), "buffer_bytes": buf.numel() * 4}
        for name, fn in methods.items():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[f"{name}_gb_s"] = buf.numel() * 4 / min(times) / 1e9
            out[f"{name}_median_gb_s"] = buf.numel() * 4 / statistics.median(times) / 1e9
        out["gb_s"] = max(out[f"{m}_gb_s"] for m in methods)
        return out
    finally:
        torch.set_num_threads(before)
