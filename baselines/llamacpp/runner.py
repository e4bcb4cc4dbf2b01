"""llama.cpp as a baseline, through llama-cpp-python, on token ids.

Why: ScheInfer's headline numbers are speed-ups over llama.cpp (scheinfer.md 8.2), and a speed-up
only counts if both engines compute the same model. This module runs the real llama.cpp on a GGUF
file and returns (a) float32 logits for every position and greedy continuations, to compare with
`impl.scheinfer.decoder.Decoder` token by token, and (b) prefill and decode speed measured the way
llama.cpp users report them (prompt tokens/s, generated tokens/s), with the settings recorded.

Inputs are token ids, never text, so the comparison does not depend on any tokenizer.

Settings that matter for exactness (`LlamaCppSettings`):
* f32_kv_cache (default True): llama.cpp stores K/V in F16 by default, which rounds every cached
  key and value; F32 keeps it comparable with an F32 reference. Benchmarks of the paper's
  setting keep llama.cpp's default (f32_kv_cache=False) and say so in their records.
* flash_attn off; n_batch/n_ubatch as given (llama.cpp processes a prompt in ubatch chunks).
* n_gpu_layers: the last N layers on the GPU (-ngl); needs a CUDA build of llama-cpp-python
  (CMAKE_ARGS="-DGGML_CUDA=on"). The CPU build ignores it.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["LlamaCppSettings", "LlamaCppRunner", "GreedyResult", "SpeedResult", "measure_speed",
           "llama_cpp_info"]

GGML_TYPE_F32 = 0


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

    def __post_init__(self):
        for f in ("n_ctx", "n_batch", "n_ubatch"):
            if getattr(self, f) < 1:
                raise ValueError(f"LlamaCppSettings: {f}={getattr(self, f)!r} is not allowed; expected an integer >= 1")
        if self.n_gpu_layers < 0:
            raise ValueError(f"LlamaCppSettings: n_gpu_layers={self.n_gpu_layers} is not allowed; expected >= 0")

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
        return cmd


def llama_cpp_info() -> dict[str, str]:
    """llama-cpp-python version and llama.cpp's system info line (CPU features, backends)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": info.decode() if isinstance(info, bytes) else str(info)}


@dataclass
class GreedyResult:
    tokens: list[int]                      # new ids (ending with eos if produced)
    step_logits: np.ndarray                # [n_new, V] float32: the logits each token was chosen from


class LlamaCppRunner:
    """One llama.cpp context over a GGUF file, keeping logits of every evaluated position."""

    def __init__(self, model_path: str | Path, settings: LlamaCppSettings | None = None):
        import llama_cpp

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF file {self.model_path} does not exist")
        self.settings = settings or LlamaCppSettings()
        self.llm = llama_cpp.Llama(str(self.model_path), **self.settings.llama_kwargs(logits_all=True))
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


def measure_speed(model_path: str | Path, prompt: Sequence[int], n_decode: int,
                  settings: LlamaCppSettings | None = None, repeats: int = 3, warmup: int = 1) -> SpeedResult:
    """Prefill speed = len(prompt) / time to evaluate the prompt; decode speed = n_decode / time of
    n_decode single-token steps after it (each feeding the arg-max of the last logits), as
    llama-bench's pp / tg. Uses a context that keeps only the last position's logits, as serving
    does. Returns every repeat; warm-up repeats are discarded."""
    import llama_cpp

    settings = settings or LlamaCppSettings()
    prompt = [int(t) for t in prompt]
    if n_decode < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"n_decode={n_decode}, repeats={repeats}, warmup={warmup}: expected >= 1, >= 1, >= 0")
    if len(prompt) + n_decode > settings.n_ctx:
        raise ValueError(f"{len(prompt)} prompt + {n_decode} decode tokens exceed n_ctx={settings.n_ctx}")
    llm = llama_cpp.Llama(str(model_path), **settings.llama_kwargs(logits_all=False))
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
    finally:
        llm.close()
    return result
