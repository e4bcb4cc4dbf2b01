"""The reference decoder against the real llama.cpp (llama-cpp-python) on generated GGUF files.

Observed on the development machine (40-token prompt, 24 greedy steps, logits of scale ~4):
F32 files differ by <= 2.2e-6 (5e-7 of the largest logit) with an F32 KV cache; F16 files by
~1.9e-3 and BF16 by ~1.5e-2, because llama.cpp rounds the activations to the weight type
inside its matmuls while the decoder computes in F32. Greedy tokens agreed in every case.
"""
import dataclasses

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from baselines.llamacpp.runner import LlamaCppRunner, LlamaCppSettings, measure_speed  # noqa: E402
from impl.scheinfer import cpu_kernels  # noqa: E402
from impl.scheinfer.decoder import Decoder  # noqa: E402
from impl.scheinfer.fast_decode import FastDecoder  # noqa: E402
from impl.scheinfer.generate_models import generate, random_source, tiny_config, write_gguf  # noqa: E402
from impl.scheinfer.weights import DictWeights, load_weights, materialize  # noqa: E402

# max |ours - llama.cpp| allowed, relative to the largest |logit| of llama.cpp
REL_TOL = {"f32": 1e-4, "f16": 1e-2}
SETTINGS = LlamaCppSettings(n_ctx=256, n_threads=2)
PROMPT = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
N_NEW = 24


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("llamacpp_parity")


def _model(gguf_dir, kind, dtype):
    path = gguf_dir / f"{kind}-{dtype}.gguf"
    if not path.exists():
        generate(kind, path, dtype, seed=1)
    return path


def assert_step_logits_close(ours_tokens, ours_logits, ref_tokens, ref_logits, tol):
    """Step logits agree for every step computed from the same prefix (up to the first divergence)."""
    k = 0
    while k < min(len(ours_tokens), len(ref_tokens)) and ours_tokens[k] == ref_tokens[k]:
        k += 1
    rows = min(k + 1, len(ours_tokens), len(ref_tokens))
    assert np.abs(np.asarray(ours_logits)[:rows] - ref_logits[:rows]).max() <= tol


def assert_greedy_match(ours_tokens, ours_logits, ref_tokens, tol):
    """Equal greedy sequences, except that a divergence is accepted at a step whose two candidate
    tokens are within 2*tol in our logits (a near-tie that rounding may break either way)."""
    for i, (a, b) in enumerate(zip(ours_tokens, ref_tokens)):
        if a != b:
            margin = float(ours_logits[i][a] - ours_logits[i][b])
            assert margin <= 2 * tol, f"step {i}: ours {a} vs llama.cpp {b}, margin {margin:.3g} > {2 * tol:.3g}"
            return
    assert len(ours_tokens) == len(ref_tokens)


@pytest.mark.parametrize("dtype", ["f32", pytest.param("f16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["llama", "mixtral", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_logits_and_greedy_tokens_match_llamacpp(gguf_dir, kind, dtype):
    path = _model(gguf_dir, kind, dtype)
    dec = Decoder(load_weights(path))
    with LlamaCppRunner(path, SETTINGS) as runner:
        ref = runner.logits(PROMPT)
        ref_greedy = runner.greedy(PROMPT, N_NEW)
    tol = REL_TOL[dtype] * float(np.abs(ref).max())
    ours = dec.logits(PROMPT).numpy()
    assert ours.shape == ref.shape == (len(PROMPT), dec.config.vocab_size)
    assert np.abs(ours - ref).max() <= tol
    out = dec.generate([PROMPT], N_NEW, return_logits=True)
    assert_step_logits_close(out.tokens[0], out.step_logits[0], ref_greedy.tokens, ref_greedy.step_logits, tol)
    assert_greedy_match(out.tokens[0], out.step_logits[0], ref_greedy.tokens, tol)


@pytest.mark.parametrize("kernel", ["torch", *cpu_kernels.supported_isas()])
@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2_moe"])
def test_fast_decoder_matches_llamacpp_with_every_kernel(gguf_dir, kind, kernel):
    """The fast decoder, eager, with each CPU kernel: prompt logits and greedy steps as the
    reference decoder's against llama.cpp (F32)."""
    path = _model(gguf_dir, kind, "f32")
    dec = FastDecoder(load_weights(path), kernel=kernel)
    with LlamaCppRunner(path, SETTINGS) as runner:
        ref = runner.logits(PROMPT)
        ref_greedy = runner.greedy(PROMPT, N_NEW)
    tol = REL_TOL["f32"] * float(np.abs(ref).max())
    assert np.abs(dec.logits(PROMPT).numpy() - ref).max() <= tol
    out = dec.generate([PROMPT], N_NEW, return_logits=True)
    assert_step_logits_close(out.tokens[0], out.step_logits[0], ref_greedy.tokens, ref_greedy.step_logits, tol)
    assert_greedy_match(out.tokens[0], out.step_logits[0], ref_greedy.tokens, tol)


def test_left_padded_batch_matches_llamacpp_per_prompt(gguf_dir):
    path = _model(gguf_dir, "mixtral", "f32")
    dec = Decoder(load_weights(path))
    prompts = [PROMPT[:5], PROMPT[3:30], PROMPT[10:12]]
    out = dec.generate(prompts, 8, return_logits=True)
    with LlamaCppRunner(path, SETTINGS) as runner:
        for b, p in enumerate(prompts):
            ref = runner.greedy(p, 8)
            tol = REL_TOL["f32"] * float(np.abs(ref.step_logits).max())
            assert_greedy_match(out.tokens[b], out.step_logits[b], ref.tokens, tol)
            assert_step_logits_close(out.tokens[b], out.step_logits[b], ref.tokens, ref.step_logits, tol)


class TorchTopkDecoder(Decoder):
    """The decoder with torch.topk's order for equal router probabilities instead of llama.cpp's."""

    def route(self, i, w, x_TM):
        probs_TE = torch.softmax(torch.nn.functional.linear(x_TM, w.router_EM).float(), dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.config.top_k, dim=-1)
        return ids_TK, weights_TK / weights_TK.sum(dim=-1, keepdim=True)


def test_router_ties_are_broken_as_llamacpp_does(gguf_dir):
    """A router of zeros: all 8 experts tie for every token. llama.cpp takes experts 0 and 1 and
    so does the decoder (logits agree); torch.topk's order takes others, and its logits do not."""
    cfg = tiny_config("mixtral")
    tensors = materialize(random_source(cfg, seed=1)).tensors
    tensors.update({n: torch.zeros_like(t) for n, t in tensors.items() if n.endswith("moe.router.weight")})
    path = write_gguf(DictWeights(cfg, tensors), gguf_dir / "mixtral-router-tie.gguf", "f32")
    seen = []
    dec = Decoder(load_weights(path), route_observer=lambda layer, ids, w: seen.append(ids))
    with LlamaCppRunner(path, SETTINGS) as runner:
        ref = runner.logits(PROMPT)
    tol = REL_TOL["f32"] * float(np.abs(ref).max())
    assert np.abs(dec.logits(PROMPT).numpy() - ref).max() <= tol
    assert all((ids == torch.tensor([0, 1])).all() for ids in seen)
    assert np.abs(TorchTopkDecoder(load_weights(path)).logits(PROMPT).numpy() - ref).max() > 100 * tol


def test_llamacpp_phimoe_is_rmsnorm_plus_bias_and_softmax_top2(gguf_dir):
    """llama.cpp runs a 'phimoe' GGUF with RMSNorm + bias and renormalised softmax top-2, where
    Phi-3.5-MoE (and this decoder) use LayerNorm and SparseMixer: the outputs differ, and making
    exactly those two substitutions in the decoder reproduces llama.cpp."""
    path = _model(gguf_dir, "phimoe", "f32")
    src = load_weights(path)
    with LlamaCppRunner(path, SETTINGS) as runner:
        ref = runner.logits(PROMPT)
    tol = REL_TOL["f32"] * float(np.abs(ref).max())
    assert np.abs(Decoder(src).logits(PROMPT).numpy() - ref).max() > 100 * tol

    src.config = dataclasses.replace(src.config, router="softmax_topk", normalize_topk=True)
    dec = Decoder(src)
    rms = lambda n: dataclasses.replace(n, kind="rmsnorm")  # noqa: E731  (Norm adds its bias after RMS)
    dec._layers = [dataclasses.replace(w, attn_norm=rms(w.attn_norm), ffn_norm=rms(w.ffn_norm)) for w in dec._layers]
    dec.final_norm = rms(dec.final_norm)
    assert np.abs(dec.logits(PROMPT).numpy() - ref).max() <= tol


def test_runner_errors_and_speed_helper(gguf_dir):
    path = _model(gguf_dir, "llama", "f32")
    with LlamaCppRunner(path, SETTINGS) as runner:
        with pytest.raises(ValueError, match="token ids must lie in 0..511"):
            runner.logits([1, 512])
        with pytest.raises(ValueError, match="exceed n_ctx=256"):
            runner.greedy(list(range(250)), 10)
    with pytest.raises(FileNotFoundError):
        LlamaCppRunner(gguf_dir / "missing.gguf")
    res = measure_speed(path, PROMPT[:16], n_decode=4, settings=SETTINGS, repeats=2, warmup=0)
    assert len(res.prefill_tok_s) == len(res.decode_tok_s) == 2
    assert res.prefill_median > 0 and res.decode_median > 0
    d = res.as_dict()
    assert "-ctk f32 -ctv f32" in d["command_line"] and d["info"]["llama_cpp_python"] == llama_cpp.__version__


def test_speed_in_a_separate_process_and_a_dead_one_named(gguf_dir):
    """`SeparateProcess` measures in one spawned child, reused across calls, not in this process;
    a child killed meanwhile is one RuntimeError naming the model, and the next call starts a
    fresh one."""
    import os
    import signal
    from baselines.llamacpp.runner import SeparateProcess
    path = _model(gguf_dir, "llama", "f32")
    with SeparateProcess() as proc:
        res = proc.measure_speed(path, PROMPT[:16], n_decode=4, settings=SETTINGS, repeats=2, warmup=0)
        assert len(res.decode_tok_s) == 2 and res.decode_median > 0 and res.device_bytes_used is None
        (pid,) = proc._pool._processes
        assert pid != os.getpid()
        assert proc.measure_speed(path, PROMPT[:8], n_decode=2, settings=SETTINGS, repeats=1).prefill_median > 0
        assert list(proc._pool._processes) == [pid]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=f"llama.cpp's process died measuring {path}"):
            proc.measure_speed(path, PROMPT[:8], n_decode=2, settings=SETTINGS, repeats=1)
        assert proc.measure_speed(path, PROMPT[:8], n_decode=2, settings=SETTINGS, repeats=1).decode_median > 0
    assert proc._pool is None

