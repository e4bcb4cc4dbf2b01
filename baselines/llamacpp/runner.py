"""llama.cpp as a baseline, through llama-cpp-python, on token ids.

Why: ScheInfer's headline numbers are speed-ups over llama.cpp (scheinfer.md 8.2), and a speed-up
only counts if both engines compute the same model. This module runs the real llama.cpp on a GGUF
file and returns (a) float32 logits for every position and greedy continuations, to compare with
`impl.scheinfer.decoder.Decoder` token by token, and (b) prefill and decode speed measured the way
llama.cpp users report them (prompt tokens/s, generated tokens/s), with the settings recorded.

Inputs are token ids, never text, so the comparison does not depend on any tokenizer.

Settings that matter for exactness (`LlamaCppSettings`):
* f32_kv_cache (default True): llama.cpp stores K/V in F16 by default, which rounds every cached
  key and value; F32 keeps it comparable with an F32 reference. The benchmarks
  (`python -m impl.experiments.scheinfer bench`) use this default too: an F32 KV cache, as the
  F32 engine they are compared with has; their records carry it in `command_line`
  ("-ctk f32 -ctv f32"). f32_kv_cache=False is llama.cpp's own default (F16 K/V).
* flash_attn off; n_batch/n_ubatch as given (llama.cpp processes a prompt in ubatch chunks).
* n_gpu_layers: -ngl N, the output layer and the last N - 1 layers on the GPU (`ngl_layers`);
  needs a CUDA build of llama.cpp (a CUDA
  build of llama-cpp-python, or the libraries of `make llamacpp-cuda` named by LLAMA_CPP_LIB_PATH).
  The CPU build ignores it.
* n_cpu_moe: the expert tensors of the first K layers kept in CPU memory (llama.cpp's
  `--n-cpu-moe K`, how users fit a MoE model into a small GPU with `-ngl` set to all layers).
  llama.cpp's command line implements it as tensor buffer-type overrides (common/arg.cpp), which
  llama-cpp-python's `Llama` does not expose; `open_llama` passes the same overrides (same regular
  expressions, CPU buffer type) through `llama_model_params.tensor_buft_overrides`.

`gpu_weight_bytes` says which weights of a GGUF file a setting puts on the GPU (llama.cpp's
rules: the output layer first, then the last N - 1 repeating layers, never the token
embeddings; overridden expert tensors on the CPU), so a benchmark can hold llama.cpp to the same
GPU budget as the other systems and say so.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = ["LlamaCppSettings", "LlamaCppRunner", "GreedyResult", "SpeedResult", "measure_speed", "SeparateProcess",
           "llama_cpp_info", "open_llama", "cpu_moe_patterns", "gpu_weight_bytes", "load_backends",
           "settings_within_budget", "tokenize"]

GGML_TYPE_F32 = 0
# llama.cpp common/common.h LLM_FFN_EXPS_REGEX and llm_ffn_block_regex: what --n-cpu-moe keeps on the CPU
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
# FFN and expert weights (what the engine's GPU budget counts): dense, routed and shared experts
_FFN_WEIGHT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)(_exps|_chexps|_shexp)?\.weight$")
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class LlamaCppSettings:
    n_ctx: int = 512
    n_threads: int | None = None          # None: every CPU core this process may use
    n_gpu_layers: int = 0
    n_batch: int = 512
    n_ubatch: int = 512
    seed: int = 0
    f32_kv_cache: bool = True
    flash_attn: bool = False
    use_mmap: bool = True
    n_cpu_moe: int = 0                    # expert tensors of the first K layers on the CPU (--n-cpu-moe)

    def __post_init__(self):
        for f in ("n_ctx", "n_batch", "n_ubatch"):
            if getattr(self, f) < 1:
                raise ValueError(f"LlamaCppSettings: {f}={getattr(self, f)!r} is not allowed; expected an integer >= 1")
        for f in ("n_gpu_layers", "n_cpu_moe"):
            if getattr(self, f) < 0:
                raise ValueError(f"LlamaCppSettings: {f}={getattr(self, f)} is not allowed; expected >= 0")

    @property
    def threads(self) -> int:
        return self.n_threads or len(os.sched_getaffinity(0))

    def llama_kwargs(self, logits_all: bool) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            n_ctx=self.n_ctx, n_threads=self.threads, n_threads_batch=self.threads,
            n_gpu_layers=self.n_gpu_layers, n_batch=self.n_batch, n_ubatch=self.n_ubatch, seed=self.seed,
            logits_all=logits_all, flash_attn=self.flash_attn, use_mmap=self.use_mmap, verbose=False)
        if self.f32_kv_cache:
            kw.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        return kw

    def command_line(self, model_path: str | Path) -> str:
        """The llama.cpp CLI flags equivalent to these settings (provenance for records)."""
        cmd = (f"-m {model_path} -c {self.n_ctx} -t {self.threads} -ngl {self.n_gpu_layers} "
               f"-b {self.n_batch} -ub {self.n_ubatch} -fa {'on' if self.flash_attn else 'off'}")
        if self.f32_kv_cache:
            cmd += " -ctk f32 -ctv f32"
        if self.n_cpu_moe:
            cmd += f" --n-cpu-moe {self.n_cpu_moe}"
        return cmd


def cpu_moe_patterns(n_cpu_moe: int) -> list[str]:
    """The tensor-name patterns `--n-cpu-moe K` keeps in CPU memory (llama.cpp common.h)."""
    return [rf"blk\.{i}{FFN_EXPS_REGEX}" for i in range(n_cpu_moe)]


def ngl_layers(n_layer: int, n_gpu_layers: int) -> tuple[int, bool]:
    """What `-ngl N` offloads (llama.cpp's load_tensors: i_gpu_start = max(n_layer + 1 - N, 0),
    the output layer counted as layer n_layer): the first repeating layer on the GPU (layers
    first..n_layer-1 are), and whether the output layer is (any N >= 1: it goes first, so
    -ngl N holds N - 1 repeating layers until N > n_layer)."""
    return min(max(n_layer + 1 - n_gpu_layers, 0), n_layer), n_gpu_layers >= 1


def gpu_weight_bytes(model_path: str | Path, settings: LlamaCppSettings) -> dict[str, Any]:
    """Bytes of the GGUF's weights that `settings` place on the GPU: 'ffn' (FFN and expert
    matrices, what the engine's GPU budget counts) and 'other' (attention, norms, routers, output),
    by llama.cpp's rules (module doc). Assumes a GPU backend is present; the KV cache and compute
    buffers come on top."""
    stat = Path(model_path).stat()
    n_layer, tensors = _gguf_tensors(str(model_path), stat.st_mtime_ns, stat.st_size)
    first_gpu, output_on_gpu = ngl_layers(n_layer, settings.n_gpu_layers)
    cpu_moe = [re.compile(p) for p in cpu_moe_patterns(settings.n_cpu_moe)]
    out = {"ffn": 0, "other": 0, "n_layer": n_layer, "gpu_layers": list(range(first_gpu, n_layer)),
           "output_on_gpu": output_on_gpu, "cpu_moe_layers": list(range(min(settings.n_cpu_moe, n_layer)))}
    for name, n_bytes in tensors:
        m = _LAYER.match(name)
        if m:
            on_gpu = int(m[1]) >= first_gpu and not any(p.search(name) for p in cpu_moe)
        else:           # the output layer (output_norm, output); never token_embd
            on_gpu = output_on_gpu and name.startswith("output")
        if on_gpu:
            out["ffn" if _FFN_WEIGHT.match(name) else "other"] += n_bytes
    return out


@functools.lru_cache(maxsize=8)
def _gguf_tensors(path: str, mtime_ns: int, size: int) -> tuple[int, tuple[tuple[str, int], ...]]:
    """A GGUF's layer count and (tensor name, bytes), read once per file version (the offload
    search asks for every setting of one file)."""
    from impl.scheinfer.weights import gguf_field, open_gguf

    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture", str, where=path)
    n_layer = gguf_field(reader, f"{arch}.block_count", int, where=path)
    return n_layer, tuple((t.name, int(t.n_bytes)) for t in reader.tensors)


def settings_within_budget(model_path: str | Path, budget_bytes: int, base: LlamaCppSettings) -> list[LlamaCppSettings]:
    """How users fit a MoE model into a GPU whose FFN / expert budget is `budget_bytes`, each
    within it: `-ngl N` with N the most whole layers that fit (the classic way; the attention of
    the other layers stays on the CPU too), and `-ngl all --n-cpu-moe K` (every non-expert weight
    on the GPU) for the smallest K that fits, K + 1, and all layers (`--cpu-moe`)."""
    from dataclasses import replace

    n_layer = gpu_weight_bytes(model_path, base)["n_layer"]
    fits = lambda s: gpu_weight_bytes(model_path, s)["ffn"] <= budget_bytes      # noqa: E731
    ngl = next(n for n in range(n_layer + 1, -1, -1) if fits(replace(base, n_gpu_layers=n, n_cpu_moe=0)))
    every = n_layer + 1                                   # the output layer too, as -ngl 99 does
    k_min = next(k for k in range(n_layer + 1) if fits(replace(base, n_gpu_layers=every, n_cpu_moe=k)))
    out = [replace(base, n_gpu_layers=ngl, n_cpu_moe=0)]
    for k in dict.fromkeys((k_min, min(k_min + 1, n_layer), n_layer)):
        out.append(replace(base, n_gpu_layers=every, n_cpu_moe=k))
    return out


_backends_loaded = False


def load_backends() -> str | None:
    """With a llama.cpp built as run-time loaded backends (GGML_BACKEND_DL, as `make llamacpp-cuda`
    builds it) and named by LLAMA_CPP_LIB_PATH, load its backends (CUDA, the best CPU variant)
    from that folder before the first model: ggml would otherwise search only the Python
    executable's folder and the working directory. Returns the folder, or None when there is
    nothing to load (a build with its backends linked in). Idempotent."""
    global _backends_loaded
    path = os.environ.get("LLAMA_CPP_LIB_PATH")
    if _backends_loaded or not path or not list(Path(path).glob("libggml-cpu*.so")):
        return None
    import llama_cpp

    lib = llama_cpp.llama_cpp._lib              # its dependencies (libggml) resolve through it
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    if lib.ggml_backend_reg_count() == 0:
        lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        lib.ggml_backend_load_all_from_path(os.fsencode(path))
    _backends_loaded = True
    return path


class _BuftOverride(ctypes.Structure):
    """llama.h `struct llama_model_tensor_buft_override` (not defined by llama-cpp-python)."""
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@contextlib.contextmanager
def _tensor_overrides(patterns: Sequence[str]) -> Iterator[None]:
    """While a `Llama` is built, give its model parameters these CPU buffer-type overrides (a
    subclass of llama-cpp-python's internal model wrapper sets the field it leaves empty)."""
    if not patterns:
        yield
        return
    import llama_cpp
    import llama_cpp._internals as internals

    lib = llama_cpp.llama_cpp._lib
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_cpu_buffer_type.argtypes = []
    cpu = lib.ggml_backend_cpu_buffer_type()
    encoded = [p.encode() for p in patterns]             # kept alive until the model is loaded
    table = (_BuftOverride * (len(encoded) + 1))(*[_BuftOverride(p, cpu) for p in encoded])
    original = internals.LlamaModel

    class _WithOverrides(original):
        def __init__(self, *args, params, **kwargs):
            params.tensor_buft_overrides = ctypes.cast(table, ctypes.c_void_p).value
            super().__init__(*args, params=params, **kwargs)

    internals.LlamaModel = _WithOverrides
    try:
        yield
    finally:
        internals.LlamaModel = original


def open_llama(model_path: str | Path, settings: LlamaCppSettings, logits_all: bool, verbose: bool = False):
    """A `llama_cpp.Llama` on `model_path` with every setting applied (--n-cpu-moe included)."""
    import llama_cpp

    load_backends()
    with _tensor_overrides(cpu_moe_patterns(settings.n_cpu_moe)):
        return llama_cpp.Llama(str(model_path), **{**settings.llama_kwargs(logits_all), "verbose": verbose})


def llama_cpp_info() -> dict[str, str]:
    """llama-cpp-python version, llama.cpp's system info line (CPU features, backends), whether
    it can offload to a GPU, and which libraries it loaded."""
    import llama_cpp

    load_backends()
    info = llama_cpp.llama_print_system_info()
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": info.decode() if isinstance(info, bytes) else str(info),
            "gpu_offload": str(bool(llama_cpp.llama_supports_gpu_offload())),
            "lib_path": os.environ.get("LLAMA_CPP_LIB_PATH", "(the package's own)")}


def tokenize(model_path: str | Path, text: str) -> list[int]:
    """`text` as llama.cpp tokenizes it for this GGUF file: the model's own tokenizer, built from
    its tokenizer.ggml.* metadata, BOS first where the model adds one. Loads the vocabulary only
    (no weights, no context). ValueError where llama.cpp cannot load it."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    load_backends()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(model_path), params=params, verbose=False)
    try:
        return model.tokenize(text.encode("utf-8"), model.add_bos_token(), False)
    finally:
        model.close()


@dataclass
class GreedyResult:
    tokens: list[int]                      # new ids (ending with eos if produced)
    step_logits: np.ndarray                # [n_new, V] float32: the logits each token was chosen from


class LlamaCppRunner:
    """One llama.cpp context over a GGUF file, keeping logits of every evaluated position."""

    def __init__(self, model_path: str | Path, settings: LlamaCppSettings | None = None):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF file {self.model_path} does not exist")
        self.settings = settings or LlamaCppSettings()
        self.llm = open_llama(self.model_path, self.settings, logits_all=True)
        self.n_vocab = self.llm.n_vocab()

    def _check(self, tokens: Sequence[int], extra: int = 0) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("need at least one token")
        if min(tokens) < 0 or max(tokens) >= self.n_vocab:
            raise ValueError(f"token ids must lie in 0..{self.n_vocab - 1}; got {min(tokens)}..{max(tokens)}")
        if len(tokens) + extra > self.settings.n_ctx:
            raise ValueError(f"{len(tokens)} prompt + {extra} new tokens exceed n_ctx={self.settings.n_ctx}")
        return tokens

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Float32 logits [S, V] of every position of `tokens` (fresh context)."""
        tokens = self._check(tokens)
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None) -> GreedyResult:
        """Greedy continuation: arg-max of llama.cpp's logits at each step (no sampler settings such
        as repeat penalties are involved)."""
        prompt = self._check(prompt, max_new_tokens)
        self.llm.reset()
        self.llm.eval(prompt)
        out, rows = [], []
        while True:
            row = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            tok = int(row.argmax())
            out.append(tok)
            rows.append(row)
            if len(out) >= max_new_tokens or tok == eos_token_id:
                break
            self.llm.eval([tok])
        return GreedyResult(out, np.stack(rows))

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class SpeedResult:
    """Per-repeat prefill and decode speeds; medians as properties."""

    prompt_tokens: int
    decode_tokens: int
    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    command_line: str = ""
    info: dict[str, str] = field(default_factory=dict)
    device_bytes_used: int | None = None   # device memory the loaded model and context took (device_free)

    @property
    def prefill_median(self) -> float:
        return statistics.median(self.prefill_tok_s)

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tok_s)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(prefill_tok_s_median=self.prefill_median, decode_tok_s_median=self.decode_median)
        return d


class SeparateProcess:
    """`measure_speed` in a process of its own (spawned on first use, reused, ended on `close`).
    Why: the caller's process shares one OpenMP runtime with llama.cpp (torch's libgomp), and a
    thread there that once ran a parallel torch operation (an engine's lane that ran torch
    products, say) holds an OpenMP team; once the runtime manages more threads than CPUs it
    barely spins before sleeping, which slowed llama.cpp by about 40% on a 2-core host even with
    the team idle (tests/bench/README.md), so a comparison in one process would favour the other
    system. `device_free=True` reads the device's
    free bytes in the child (torch.cuda.mem_get_info: device-wide, so it counts llama.cpp's own
    allocations). A child that dies is a RuntimeError naming the model."""

    def __init__(self):
        self._pool = None

    def measure_speed(self, model_path: str | Path, prompt: Sequence[int], n_decode: int,
                      settings: "LlamaCppSettings | None" = None, repeats: int = 3, warmup: int = 1,
                      device_free: bool = False) -> "SpeedResult":
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        import multiprocessing
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._pool.submit(_measure_speed_in_child, str(model_path), [int(t) for t in prompt], n_decode,
                                     settings, repeats, warmup, device_free).result()
        except BrokenProcessPool:
            self.close()
            raise RuntimeError(f"llama.cpp's process died measuring {model_path}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "SeparateProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _measure_speed_in_child(model_path: str, prompt: list[int], n_decode: int, settings, repeats: int, warmup: int,
                            device_free: bool) -> "SpeedResult":
    free = None
    if device_free:
        import torch
        free = lambda: torch.cuda.mem_get_info()[0]  # noqa: E731
    return measure_speed(model_path, prompt, n_decode, settings, repeats, warmup, free)


def measure_speed(model_path: str | Path, prompt: Sequence[int], n_decode: int,
                  settings: LlamaCppSettings | None = None, repeats: int = 3, warmup: int = 1,
                  device_free: Callable[[], int] | None = None) -> SpeedResult:
    """Prefill speed = len(prompt) / time to evaluate the prompt; decode speed = n_decode / time of
    n_decode single-token steps after it (each feeding the arg-max of the last logits), as
    llama-bench's pp / tg. Uses a context that keeps only the last position's logits, as serving
    does. Returns every repeat; warm-up repeats are discarded. `device_free()` (free device bytes,
    e.g. from torch.cuda.mem_get_info) read before loading and after the first evaluation gives
    `device_bytes_used`."""
    import llama_cpp

    settings = settings or LlamaCppSettings()
    prompt = [int(t) for t in prompt]
    if n_decode < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"n_decode={n_decode}, repeats={repeats}, warmup={warmup}: expected >= 1, >= 1, >= 0")
    if len(prompt) + n_decode > settings.n_ctx:
        raise ValueError(f"{len(prompt)} prompt + {n_decode} decode tokens exceed n_ctx={settings.n_ctx}")
    free_before = device_free() if device_free is not None else None
    llm = open_llama(model_path, settings, logits_all=False)
    n_vocab = llm.n_vocab()
    result = SpeedResult(len(prompt), n_decode, settings=asdict(settings),
                         command_line=settings.command_line(model_path), info=llama_cpp_info())
    try:
        for r in range(warmup + repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for _ in range(n_decode):
                last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
                llm.eval([int(last.argmax())])
            t2 = time.perf_counter()
            if r >= warmup:
                result.prefill_tok_s.append(len(prompt) / (t1 - t0))
                result.decode_tok_s.append(n_decode / (t2 - t1))
            if r == 0 and free_before is not None:
                result.device_bytes_used = free_before - device_free()
    finally:
        llm.close()
    return result
