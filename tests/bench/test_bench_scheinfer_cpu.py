"""CPU-only decode and prefill speed of our decoder (plain, and ScheInfer's engine with every
slice on the CPU) against the real llama.cpp on the same F32 GGUF, in the same job.

    pytest tests/bench/test_bench_scheinfer_cpu.py --benchmark-enable -s

Prints tokens per second (median of repeats) and the ratios ours / llama.cpp; the target is at
least 0.8x on decode. Skipped without llama-cpp-python (optional extra `llamacpp`). With
--benchmark-disable (the default) it still runs once at a reduced size, as a smoke test.
"""
import statistics
import time

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from baselines.llamacpp.runner import LlamaCppSettings, measure_speed  # noqa: E402
from impl.scheinfer.generate_models import random_source, tiny_config, write_gguf  # noqa: E402
from impl.scheinfer.weights import load_weights  # noqa: E402
from impl.scheinfer.model import Decoder  # noqa: E402

pytestmark = pytest.mark.bench


def _ours_speed(decoder, prompt, n_decode, repeats):
    prefill, decode = [], []
    for _ in range(repeats + 1):
        out = decoder.generate([prompt], n_decode + 1)
        prefill.append(out.prompt_tokens / out.prefill_s)
        decode.append(out.decode_steps / out.decode_s)
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def test_cpu_speed_against_llamacpp(tmp_path, request):
    full = request.config.getoption("benchmark_enable", default=False)
    cfg = tiny_config("mixtral", hidden=512 if full else 128, moe_ffn_hidden=1536 if full else 256,
                      num_layers=4 if full else 2)
    path = write_gguf(random_source(cfg, seed=0), tmp_path / "bench.gguf", "f32")
    prompt, n_decode, repeats = list(range(3, 3 + (64 if full else 8))), 32 if full else 4, 3 if full else 1
    threads = torch.get_num_threads()
    ref = measure_speed(path, prompt, n_decode, LlamaCppSettings(n_threads=threads), repeats=repeats)
    ours = _ours_speed(Decoder(load_weights(path), dtype=torch.float32), prompt, n_decode, repeats)
    ratio_prefill, ratio_decode = ours[0] / ref.prefill_median, ours[1] / ref.decode_median
    print(f"\n{cfg.num_experts} experts, hidden {cfg.hidden}, ffn {cfg.moe_ffn_hidden}, {cfg.num_layers} layers, "
          f"{threads} threads, F32 | llama.cpp: prefill {ref.prefill_median:.1f} tok/s, decode "
          f"{ref.decode_median:.1f} tok/s | ours (CPU): prefill {ours[0]:.1f}, decode {ours[1]:.1f} | "
          f"ratio prefill {ratio_prefill:.2f}x, decode {ratio_decode:.2f}x (target decode >= 0.8x)")
    assert ref.decode_median > 0 and ours[1] > 0
