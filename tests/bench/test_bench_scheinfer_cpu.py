"""CPU-only decode and prefill speed of our decoder against the real llama.cpp on the same F32
GGUF, in the same job, at two widths of a Mixtral-style model (8 experts, top-2, 4 layers):

* 'small': hidden 512, experts 1536 wide: 75 MB of weights per decoded token, so the fixed
  per-token cost of eager PyTorch (about 45 tensor operations per layer, ~1.6 ms per token for the
  4 layers on a 2-core VM) is a large share of the step;
* 'mixtral-shaped': hidden 1024, experts 3584 wide (Mixtral's 3.5 ratio): 350 MB per token, so
  the step is bound by memory bandwidth, as in real MoE models.

    pytest tests/bench/test_bench_scheinfer_cpu.py --benchmark-enable -s

The two engines run in alternating rounds (llama.cpp, then ours, each with a warm-up generation)
so that the machine's noise hits both alike. The bench prints tokens per second (median over
rounds) and the median of the per-round ratios ours / llama.cpp; the target is at least 0.8x on
decode. Skipped without llama-cpp-python (optional extra `llamacpp`). With --benchmark-disable
(the default) only the small width runs, once, at a reduced size, as a smoke test.
"""
import statistics

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from baselines.llamacpp.runner import LlamaCppSettings, measure_speed  # noqa: E402
from impl.scheinfer.generate_models import random_source, tiny_config, write_gguf  # noqa: E402
from impl.scheinfer.weights import load_weights  # noqa: E402
from impl.scheinfer.model import Decoder  # noqa: E402

pytestmark = pytest.mark.bench


def _ours_speed(decoder, prompt, n_decode):
    """(prefill, decode) tok/s of one generation after a warm-up one."""
    for _ in range(2):
        out = decoder.generate([prompt], n_decode + 1)
    return out.prompt_tokens / out.prefill_s, out.decode_steps / out.decode_s


WIDTHS = {"small": (512, 1536), "mixtral-shaped": (1024, 3584)}   # hidden, expert width


@pytest.mark.parametrize("width", list(WIDTHS))
def test_cpu_speed_against_llamacpp(tmp_path, request, width):
    full = request.config.getoption("benchmark_enable", default=False)
    if not full and width != "small":
        pytest.skip("full-size widths run with --benchmark-enable")
    hidden, ffn = WIDTHS[width] if full else (128, 256)
    cfg = tiny_config("mixtral", hidden=hidden, moe_ffn_hidden=ffn, num_layers=4 if full else 2)
    path = write_gguf(random_source(cfg, seed=0), tmp_path / "bench.gguf", "f32")
    prompt, n_decode, rounds = list(range(3, 3 + (64 if full else 8))), 32 if full else 4, 7 if full else 1
    threads = torch.get_num_threads()
    decoder = Decoder(load_weights(path), dtype=torch.float32)
    ref, ours = [], []
    for _ in range(rounds):
        r = measure_speed(path, prompt, n_decode, LlamaCppSettings(n_threads=threads), repeats=1)
        ref.append((r.prefill_median, r.decode_median))
        ours.append(_ours_speed(decoder, prompt, n_decode))
    med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
    ratio = [statistics.median(o[i] / r[i] for o, r in zip(ours, ref)) for i in (0, 1)]
    print(f"\n{width}: {cfg.num_experts} experts, hidden {cfg.hidden}, ffn {cfg.moe_ffn_hidden}, {cfg.num_layers} layers, "
          f"{threads} threads, F32, {rounds} alternating rounds | llama.cpp: prefill {med(ref, 0):.1f} tok/s, "
          f"decode {med(ref, 1):.1f} tok/s | ours (CPU): prefill {med(ours, 0):.1f}, decode {med(ours, 1):.1f} | "
          f"median ratio prefill {ratio[0]:.2f}x, decode {ratio[1]:.2f}x (target decode >= 0.8x)")
    assert all(r[1] > 0 for r in ref) and all(o[1] > 0 for o in ours)
