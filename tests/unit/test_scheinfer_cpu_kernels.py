"""ScheInfer's native CPU kernels (every instruction set this host runs) against torch, the
kernel choice (option, environment, measurement, errors), the fallback without a compiler, and
the host / bandwidth facts the CPU bench records."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from impl.common.config import ConfigError
from impl.scheinfer import cpu_kernels
from impl.scheinfer.fast_decode import (KERNEL_ENV, KERNELS, NAMED_MAX_TOKENS, KernelChoice, ProbeShape,
                                        _eager_decode_seconds, _measured_choice, choose_kernel, fast_ffn, fast_ffns,
                                        named_kernel, product)
from impl.scheinfer.layers import ExpertWeights, ffn

ISAS = [name for name in cpu_kernels.ISAS if name in cpu_kernels.supported_isas()]
needs_native = pytest.mark.skipif(not ISAS, reason=f"native kernels unavailable: {cpu_kernels.load_error()}")


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _clear_choice_caches():
    _measured_choice.cache_clear()
    _eager_decode_seconds.cache_clear()


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["rows", "transposed", "row-slice", "column-slice"])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 37), (64, 1024), (1030, 515)])
def test_linear_equals_f_linear(isa, layout, N, K, threads):
    """x @ w^T for 1..9 tokens, both weight layouts and views with a row stride, ragged sizes (no
    multiple of the vector width or of the row block), with and without bias."""
    w = {"rows": _randn(N, K), "transposed": _randn(K, N).t(), "row-slice": _randn(N, K + 5)[:, 2:K + 2],
         "column-slice": _randn(K + 3, N)[1:K + 1].t()}[layout]
    b = _randn(N, seed=1)
    for T in (1, 2, 3, 9):
        x = _randn(T, K, seed=T)
        for bias in (None, b):
            _close(torch.ops.scheinfer.linear(x, w, bias, cpu_kernels.ISAS[isa]), F.linear(x, w, bias))
    x3 = _randn(2, 1, K, seed=5)                               # leading batch dims
    assert torch.ops.scheinfer.linear(x3, w, None, cpu_kernels.ISAS[isa]).shape == (2, 1, N)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("down", ["rows", "transposed"])
def test_ffn_and_slices_equal_reference(isa, down, threads):
    """A SwiGLU FFN (down as [M, F] rows or stored [F, M], the engine's layout) and slices of it
    along F, for a few tokens, equal `layers.ffn`; large |gate| values exercise the exp's range."""
    M, Fw = 70, 45
    gate, up = _randn(Fw, M, seed=1) * 3, _randn(Fw, M, seed=2)
    down_MF = _randn(M, Fw, seed=3) if down == "rows" else _randn(Fw, M, seed=3).t()
    w = ExpertWeights(gate, up, down_MF)
    for T in (1, 2, 5):
        x = _randn(T, M, seed=T) * 4
        for a, b in ((0, Fw), (0, 17), (17, Fw), (3, 4)):
            _close(torch.ops.scheinfer.ffn(x, *(t for t in (w.slice(a, b).gate_FM, w.slice(a, b).up_FM,
                                                               w.slice(a, b).down_MF)), cpu_kernels.ISAS[isa]),
                   ffn(w.slice(a, b), x))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layouts", ["rows", "transposed", "mixed"])
def test_ffn_many_equals_each_ffn(isa, layouts, threads):
    """Several FFNs of different widths, each on its own tokens (none, too), in one op: each
    output equals `layers.ffn`; row-major downs, stored-transposed ones, or both in one call."""
    M = 36
    ws, xs = [], []
    for i, (Fw, T) in enumerate([(45, 1), (8, 3), (130, 0), (17, 2)]):
        transposed = layouts == "transposed" or (layouts == "mixed" and i % 2)
        down = _randn(Fw, M, seed=10 + i).t() if transposed else _randn(M, Fw, seed=10 + i)
        ws.append(ExpertWeights(_randn(Fw, M, seed=i), _randn(Fw, M, seed=20 + i), down))
        xs.append(_randn(T, M, seed=30 + i))
    ys = torch.ops.scheinfer.ffn_many(xs, [w.gate_FM for w in ws], [w.up_FM for w in ws], [w.down_MF for w in ws],
                                      cpu_kernels.ISAS[isa])
    assert [tuple(y.shape) for y in ys] == [(x.shape[0], M) for x in xs]
    for y, w, x in zip(ys, ws, xs):
        if x.shape[0]:
            _close(y, ffn(w, x))
    with pytest.raises(RuntimeError, match="expected as many of each"):
        torch.ops.scheinfer.ffn_many(xs, [w.gate_FM for w in ws], [], [], cpu_kernels.ISAS[isa])


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_moe_token_equals_weighted_experts(isa, threads):
    """A decoded token's routed experts over stacked weights: the weighted sum of each expert's
    `ffn`, whatever the order of the ids."""
    E, M, Fw = 6, 40, 33
    gu, down = _randn(E, 2 * Fw, M, seed=1), _randn(E, M, Fw, seed=2)
    x = _randn(1, M, seed=3)
    for ids in ([4, 1], [0, 5, 2], [3]):
        wts = torch.rand(len(ids), generator=torch.Generator().manual_seed(len(ids)))
        want = sum(wt * ffn(ExpertWeights(gu[e, :Fw], gu[e, Fw:], down[e]), x) for e, wt in zip(ids, wts))
        _close(torch.ops.scheinfer.moe_token(x, gu, down, torch.tensor(ids), wts, cpu_kernels.ISAS[isa]), want)
    with pytest.raises(RuntimeError, match="expert id 6 outside 0..5"):
        torch.ops.scheinfer.moe_token(x, gu, down, torch.tensor([6]), torch.ones(1), cpu_kernels.ISAS[isa])


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tokens", [1, 2, 5, 19])
def test_products_do_not_depend_on_the_thread_count(isa, tokens):
    """Each unit of a product is one call on one thread, so 1 or several threads give the same bits."""
    g = torch.Generator().manual_seed(tokens)
    M, F_ = 256, 1536
    x = torch.randn(tokens, M, generator=g)
    gate, up, down = (torch.randn(F_, M, generator=g), torch.randn(F_, M, generator=g),
                      torch.randn(M, F_, generator=g))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(torch.ops.scheinfer.ffn(x, gate, up, down, cpu_kernels.ISAS[isa]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


@needs_native
def test_a_forked_child_runs_products_on_threads_of_its_own():
    """The parent's helper threads do not exist in a forked child: the child starts a fresh pool
    (pthread_atfork) and its 2-thread products give the parent's bits, without hanging."""
    import os
    import time
    g = torch.Generator().manual_seed(7)
    x, gate, up, down = (torch.randn(1, 256, generator=g), torch.randn(1536, 256, generator=g),
                         torch.randn(1536, 256, generator=g), torch.randn(256, 1536, generator=g))
    isa = cpu_kernels.ISAS[ISAS[0]]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = torch.ops.scheinfer.ffn(x, gate, up, down, isa)        # the pool's helpers now exist
        pid = os.fork()
        if pid == 0:
            ok = all(torch.equal(torch.ops.scheinfer.ffn(x, gate, up, down, isa), want) for _ in range(3))
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's product hung")
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert torch.equal(torch.ops.scheinfer.ffn(x, gate, up, down, isa), want)    # and the parent's pool still works
    finally:
        torch.set_num_threads(before)


def test_ops_reject_bad_inputs_and_unsupported_isas():
    w = _randn(8, 4)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        torch.ops.scheinfer.linear(_randn(1, 4).double(), w.double(), None, cpu_kernels.ISAS[ISAS[-1]])
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.scheinfer.linear(_randn(1, 5), w, None, cpu_kernels.ISAS[ISAS[-1]])
    with pytest.raises(RuntimeError, match="rows or columns contiguous"):
        torch.ops.scheinfer.linear(_randn(1, 4), _randn(16, 8)[::2, ::2], None, cpu_kernels.ISAS[ISAS[-1]])
    missing = [n for n in cpu_kernels.ISAS if n not in ISAS]
    for name in missing:
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            torch.ops.scheinfer.linear(_randn(1, 4), w, None, cpu_kernels.ISAS[name])


@pytest.mark.parametrize("kernel", ["torch", *ISAS])
def test_product_and_fast_ffn_equal_torch_for_every_kernel(kernel):
    """The dispatching functions the decoders call: native for float32 up to the choice's
    max_tokens, torch's products beyond and for other dtypes."""
    isa = choose_kernel(kernel)
    assert isa.max_tokens == (0 if kernel == "torch" else NAMED_MAX_TOKENS)
    w = ExpertWeights(_randn(48, 32, seed=1), _randn(48, 32, seed=2), _randn(48, 32, seed=3).t())
    for T in (1, 4, NAMED_MAX_TOKENS + 1):
        x = _randn(T, 32, seed=T)
        _close(product(x, w.gate_FM, None, isa), F.linear(x, w.gate_FM))
        _close(fast_ffn(w, x, isa), ffn(w, x))
        for got in fast_ffns([(w, x), (w.slice(5, 30), x[:1])], isa):
            assert got.shape[1] == 32
        _close(fast_ffns([(w, x), (w.slice(5, 30), x[:1])], isa)[1], ffn(w.slice(5, 30), x[:1]))
        wd = ExpertWeights(*(t.double() for t in (w.gate_FM, w.up_FM, w.down_MF)))
        torch.testing.assert_close(fast_ffn(wd, x.double(), isa), ffn(wd, x.double()))


# ------------------------------------------------------------------------- the choice

def test_kernel_choice_splits_decode_and_batched_products():
    choice = KernelChoice("sse", "option", max_tokens=16, batched="avx512")
    assert [choice.native(t) for t in (1, 2, 3, 16, 17)] == [0, 0, 2, 2, None]
    assert KernelChoice("torch", "measured", 64, "avx2").native(1) is None
    assert KernelChoice("avx2", "option", 16).native(16) == 1 and KernelChoice("avx2", "option", 16).as_dict()["batched"] == "avx2"


def test_choose_kernel_option_env_and_errors(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert choose_kernel("torch") == KernelChoice("torch", "option")
    monkeypatch.setenv(KERNEL_ENV, "torch")
    assert choose_kernel() == KernelChoice("torch", "env")
    monkeypatch.setenv(KERNEL_ENV, "avx3")
    with pytest.raises(ConfigError, match=r"cpu kernel='avx3' is not allowed; expected one of auto, torch"):
        choose_kernel()
    monkeypatch.delenv(KERNEL_ENV)
    for name in ISAS:
        assert choose_kernel(name) == KernelChoice(name, "option", NAMED_MAX_TOKENS)
    assert choose_kernel(choose_kernel("torch")) == KernelChoice("torch", "option")
    for name in set(cpu_kernels.ISAS) - set(ISAS):
        with pytest.raises(ConfigError, match=f"cpu kernel='{name}' is not available on this host"):
            choose_kernel(name)
    # the same checks without measuring: 'auto' is left to the caller
    assert named_kernel("torch") == KernelChoice("torch", "option") and (named_kernel() is None) == bool(ISAS)
    with pytest.raises(ConfigError, match=r"cpu kernel='avx3' is not allowed"):
        named_kernel("avx3")


@needs_native
def test_auto_measures_every_candidate_and_records_its_decisions(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(cpu_kernels, "last_level_cache_bytes", lambda: 1 << 20)   # a small, quick probe
    _clear_choice_caches()
    try:
        choice = choose_kernel()
    finally:
        _clear_choice_caches()
    assert choice.how == "measured" and set(choice.rates_gb_s) == {"torch", *ISAS}
    assert choice.name == choice.basis["decode"]["pick"] and choice.basis["decode"]["default"] == ISAS[0]
    assert set(choice.basis) == {"decode", "batched", "torch@16"} | ({"torch@64"} if choice.max_tokens != 8 else set())
    assert choice.basis["batched"]["pick"] == choice.batched and choice.as_dict()["basis"] == choice.basis
    assert set(choice.batched_gflop_s) == {f"{k}@{T}" for k in ("torch", *ISAS) for T in (16, 64)}
    assert choice.batched in ISAS and choice.max_tokens in (8, 16, 64)
    assert choice.native(1) == cpu_kernels.ISAS.get(choice.name)
    assert choice.native(3) == cpu_kernels.ISAS[choice.batched] and choice.native(choice.max_tokens + 1) is None
    assert choice.as_dict()["kernel"] == choice.name and choice.isa == cpu_kernels.ISAS.get(choice.name)
    assert KERNELS == ("auto", "torch", *cpu_kernels.ISAS)


def test_auto_ranks_the_candidates_as_the_callers_mode_runs_them_at_its_shape(monkeypatch):
    """Injected timings (no kernel runs): the eager decoder takes the kernel fastest eagerly, the
    compiled one the kernel fastest as compiled token steps, whose candidates are torch's loops and
    the eagerly fastest native kernel (the eager timings measured once for both), the engine's
    lane the one fastest FFN by FFN; each at the shape it asks for, recorded with the rankings."""
    from impl.scheinfer import fast_decode
    seconds = {"eager": {"torch": 2.0, "avx512": 1.0, "avx2": 1.5}, "compiled": {"torch": 1.0, "avx512": 3.0},
               "ffns": {"torch": 2.0, "avx512": 1.5, "avx2": 1.0}}
    asked, built = [], []

    def decode_seconds(candidates, layers, rounds, mode, shape):
        asked.append((candidates, mode, shape.width))
        return {n: [seconds[mode][n]] * rounds for n in candidates}

    def probe_layers(shape, separate):
        built.append((shape.width, separate))
        return [None]                  # one layer: rates from the timings

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(cpu_kernels, "supported_isas", lambda: ("avx512", "avx2"))
    monkeypatch.setattr(fast_decode, "_probe_layers", probe_layers)
    monkeypatch.setattr(fast_decode, "_decode_seconds", decode_seconds)
    monkeypatch.setattr(fast_decode, "_batched_seconds",
                        lambda candidates, layers, rounds: {f"{n}@{T}": [1.0] * rounds for n in candidates for T in (16, 64)})
    small = ProbeShape(512, 1536, 2)
    _clear_choice_caches()
    try:
        eager, compiled = choose_kernel(shape=small), choose_kernel(mode="compiled", shape=small)
        lane = choose_kernel(mode="ffns", shape=small)
        default = choose_kernel()
    finally:
        _clear_choice_caches()
    assert (eager.name, eager.decode_mode) == ("avx512", "eager")
    assert (compiled.name, compiled.decode_mode) == ("torch", "compiled")
    assert (lane.name, lane.decode_mode) == ("avx2", "ffns")
    assert asked == [(("torch", "avx512", "avx2"), "eager", 1536), (("torch", "avx512"), "compiled", 1536),
                     (("torch", "avx512", "avx2"), "ffns", 1536), (("torch", "avx512", "avx2"), "eager", 3584)]
    assert (1536, True) in built and (1536, False) in built and (3584, False) in built
    assert eager.probe == {"hidden": 512, "width": 1536, "top_k": 2, "router": "softmax",
                           "decode_timed": "probe experts"} == eager.as_dict()["probe"]
    assert default.probe["width"] == 3584 == ProbeShape().width
    assert set(compiled.rates_gb_s) == {"torch", "avx512", "avx2", "torch, compiled", "avx512, compiled"}
    assert compiled.as_dict()["decode_mode"] == "compiled" and set(eager.rates_gb_s) == {"torch", "avx512", "avx2"}
    assert choose_kernel("avx2", mode="compiled") == KernelChoice("avx2", "option", NAMED_MAX_TOKENS)
    with pytest.raises(ValueError, match="mode='lazy' is not allowed; expected one of eager, compiled, ffns"):
        choose_kernel(mode="lazy")


def test_the_probe_shape_of_a_model_and_its_cap():
    """The probe streams the model's routed experts (top_k of them, its router), a dense model's
    FFN; experts too large for a quick probe are narrowed to at most 256 MiB a layer."""
    from impl.scheinfer.generate_models import tiny_config
    moe, dense = tiny_config("mixtral", hidden=96, moe_ffn_hidden=160), tiny_config("llama", hidden=64)
    assert ProbeShape.of(moe) == ProbeShape(96, 160, moe.top_k, moe.router, moe.normalize_topk, moe.router_jitter_eps)
    assert ProbeShape.of(dense) == ProbeShape(64, dense.ffn_hidden, 1)
    assert ProbeShape.at_hidden(1024) == ProbeShape() and ProbeShape.at_hidden(8).width == 64
    mixtral = ProbeShape(4096, 14336, 2)
    probed = mixtral.probed()
    assert (probed.hidden, probed.top_k) == (4096, 2) and probed.width % 64 == 0 and probed.width < 14336
    assert probed.layer_bytes <= 256 << 20 < probed.layer_bytes + 2 * 3 * 4096 * 64 * 4
    assert ProbeShape(512, 1536).probed() == ProbeShape(512, 1536)


@needs_native
@pytest.mark.parametrize("mode", ["eager", "compiled", "ffns"])
def test_every_decode_mode_probes_the_same_experts(mode):
    """The probe step of each mode computes the same MoE halves (its kernels' summation orders
    apart) over stacked or separate probe layers with random weights: each mode times real work
    on the experts it says, not a shortcut."""
    from impl.scheinfer import fast_decode
    shape = ProbeShape(64, 96, 2)
    layers = fast_decode._probe_layers(shape, separate=mode == "ffns")[:2]
    for w in layers:               # random values in place (the probe's are ones)
        for e in w.experts:
            for t in (e.gate_FM, e.up_FM, e.down_MF):
                t.copy_(_randn(*t.shape, seed=t.numel()) * 0.1)
    x = _randn(1, 64)
    want = x
    for w in layers:
        h = torch.rms_norm(want, (64,))
        want = want + 0.5 * (ffn(w.experts[0], h) + ffn(w.experts[1], h))
    step = fast_decode._probe_step
    if mode == "compiled":
        step = fast_decode._compiled_region(step, True)
    got = step(x, tuple(layers), shape, KernelChoice(ISAS[0], "probe"), mode)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# Injected per-round seconds: a load factor per round (a burst in rounds 1 and 3) slows every
# candidate timed in that round alike.
_LOAD = [1.0, 1.6, 1.0, 1.4, 1.0]


def _rounds(factor, noise=(1.0,) * 5):
    return [factor * load * n for load, n in zip(_LOAD, noise)]


def test_a_noisy_torch_that_wins_single_runs_keeps_the_native_default(monkeypatch):
    """torch's fastest run beats every native one (the old rule's pick), but round by round it is
    slower than the widest native kernel: the paired median keeps the default, and the record
    says why."""
    from impl.scheinfer import fast_decode
    seconds = {"torch": _rounds(1.0, (0.8, 1.0625, 1.05, 1.07, 1.02)), "avx512": _rounds(1.0), "avx2": _rounds(1.05)}
    assert min(seconds["torch"]) < min(min(seconds["avx512"]), min(seconds["avx2"]))
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(cpu_kernels, "supported_isas", lambda: ("avx512", "avx2"))
    monkeypatch.setattr(fast_decode, "_probe_layers", lambda shape, separate: [None])
    monkeypatch.setattr(fast_decode, "_decode_seconds", lambda candidates, layers, rounds, mode, shape: seconds)
    monkeypatch.setattr(fast_decode, "_batched_seconds",
                        lambda candidates, layers, rounds: {f"{n}@{T}": _rounds(1.0) for n in candidates for T in (16, 64)})
    _clear_choice_caches()
    try:
        choice = choose_kernel()
    finally:
        _clear_choice_caches()
    assert max(choice.rates_gb_s, key=choice.rates_gb_s.get) == "torch" and choice.name == "avx512"
    assert choice.basis["decode"] == {"default": "avx512", "time_ratios": {"avx2": 1.05, "torch": 1.05},
                                      "margin": fast_decode.KERNEL_MARGIN, "steps": {}, "pick": "avx512"}
    assert (choice.batched, choice.max_tokens) == ("avx512", 64) and choice.basis["torch@64"]["pick"] == "avx512@64"


def test_a_clearly_faster_candidate_replaces_the_default_and_a_close_one_does_not():
    from impl.scheinfer.fast_decode import KERNEL_MARGIN, _preferred
    order = ("avx512", "avx2", "sse", "torch")
    clear = _preferred({"avx512": _rounds(1.0), "avx2": _rounds(1.0), "sse": _rounds(1.0), "torch": _rounds(0.8)}, order)
    assert (clear["pick"], clear["steps"]) == ("torch", {"torch": 0.8})
    close = _preferred({"avx512": _rounds(1.0), "avx2": _rounds(0.93), "sse": _rounds(0.95), "torch": _rounds(1.2)}, order)
    assert (close["pick"], close["time_ratios"]) == ("avx512", {"avx2": 0.93, "sse": 0.95, "torch": 1.2})
    # two narrower kernels clearly beat the default and tie with each other: the wider of them
    both = _preferred({"avx512": _rounds(1.0), "avx2": _rounds(0.75), "sse": _rounds(0.74), "torch": _rounds(1.5)}, order)
    assert (both["pick"], both["steps"]) == ("avx2", {"avx2": 0.75})
    # then a candidate must beat the new pick by the margin, not only the default
    chain = _preferred({"avx512": _rounds(1.0), "avx2": _rounds(0.8), "sse": _rounds(0.8), "torch": _rounds(0.6)}, order)
    assert (chain["pick"], chain["steps"]) == ("torch", {"avx2": 0.8, "torch": 0.75})
    assert _preferred({"avx512": _rounds(1.0), "torch": _rounds(1.0 - KERNEL_MARGIN)}, ("avx512", "torch"))["pick"] == "torch"
    # noise makes paired medians intransitive: torch beats avx2 round by round but not the default
    odd = _preferred({"avx512": [1, 1, 1, 1, 1], "avx2": [0.7, 0.7, 0.7, 2, 2], "torch": [0.5, 0.5, 1.2, 1.3, 1.3]},
                     ("avx512", "avx2", "torch"))
    assert (odd["pick"], odd["time_ratios"]) == ("avx2", {"avx2": 0.7, "torch": 1.2})


def test_ties_and_a_single_candidate_keep_the_default(monkeypatch):
    from impl.scheinfer import fast_decode
    tie = fast_decode._preferred({n: _rounds(1.0) for n in ("avx512", "avx2", "torch")}, ("avx512", "avx2", "torch"))
    assert (tie["pick"], tie["time_ratios"], tie["steps"]) == ("avx512", {"avx2": 1.0, "torch": 1.0}, {})
    assert fast_decode._preferred({"sse": _rounds(1.0)}, ("sse",)) == {
        "default": "sse", "time_ratios": {}, "margin": fast_decode.KERNEL_MARGIN, "steps": {}, "pick": "sse"}

    def never(*args, **kwargs):
        raise AssertionError("nothing to measure")

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(cpu_kernels, "supported_isas", lambda: ())   # no native kernels: torch's, unmeasured
    monkeypatch.setattr(fast_decode, "_decode_seconds", never)
    assert choose_kernel() == KernelChoice("torch", "only", note=cpu_kernels.load_error() or "")


def test_candidates_are_timed_round_robin_in_a_rotating_order():
    from impl.scheinfer.fast_decode import _round_seconds
    ran = []
    seconds = _round_seconds({key: (lambda key=key: ran.append(key)) for key in "abc"}, rounds=4)
    assert [ran[i:i + 3] for i in range(0, len(ran), 3)] == [list("abc"), list("bca"), list("cab"), list("abc"),
                                                                list("bca")]
    assert {key: len(ts) for key, ts in seconds.items()} == {"a": 4, "b": 4, "c": 4}   # the warm-up round dropped



def test_short_rounds_repeat_until_the_time_budget(monkeypatch):
    """Each run takes 2^-10 s on a fake clock (exact sums): 10 timed rounds of two fill a budget of
    10 * 2^-9 s, `rounds` is the least and `max_rounds` the most."""
    from impl.scheinfer import fast_decode
    clock = iter(i * 2.0 ** -10 for i in itertools.count())
    monkeypatch.setattr(fast_decode.time, "perf_counter", lambda: next(clock))
    runs = {"a": lambda: None, "b": lambda: None}
    assert {k: len(ts) for k, ts in fast_decode._round_seconds(runs, rounds=3, budget_s=10 * 2.0 ** -9).items()} == {"a": 10, "b": 10}
    assert len(fast_decode._round_seconds(runs, rounds=3, budget_s=10, max_rounds=7)["a"]) == 7
    assert len(fast_decode._round_seconds(runs, rounds=3, budget_s=0.001)["a"]) == 3


def test_no_compiler_falls_back_to_torch_with_one_clear_warning(monkeypatch):
    """Where the extension cannot be built, `available()` is False with one warning naming what is
    needed, the native kernels are not offered, and 'auto' is torch's kernel."""
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'scheinfer_cpu_kernels'\nc++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    for fn in (cpu_kernels.available, cpu_kernels.supported_isas):
        fn.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"native CPU kernels are unavailable .*c\+\+: command not found.*"
                                                r"need a C\+\+ compiler"):
            assert not cpu_kernels.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_kernels.supported_isas() == ()
            assert choose_kernel() == KernelChoice("torch", "only", note=cpu_kernels.load_error())
        with pytest.raises(ConfigError, match="not available on this host .*command not found"):
            choose_kernel("avx2")
    finally:
        monkeypatch.undo()
        for fn in (cpu_kernels.available, cpu_kernels.supported_isas):
            fn.cache_clear()
        cpu_kernels._error = None
        cpu_kernels.available()


def _threads_override() -> int:
    before = torch.ops.scheinfer.set_threads(0)
    torch.ops.scheinfer.set_threads(before)
    return before


@needs_native
def test_torch_ops_on_one_thread_keeps_the_native_loops_on_the_callers_count(threads):
    """Inside the context torch runs on one thread and the native ops on the count before it (the
    thread's override), with the same results; after it, also after an error, both are restored.
    One thread: nothing changes."""
    w, x = _randn(512, 256), _randn(2, 256, seed=1)
    want = torch.ops.scheinfer.linear(x, w, None, cpu_kernels.ISAS[ISAS[0]])
    assert _threads_override() == 0
    with pytest.raises(KeyError):
        with cpu_kernels.torch_ops_on_one_thread():
            assert torch.get_num_threads() == 1 and _threads_override() == (threads if threads > 1 else 0)
            torch.testing.assert_close(torch.ops.scheinfer.linear(x, w, None, cpu_kernels.ISAS[ISAS[0]]), want,
                                       rtol=0, atol=0)
            raise KeyError("inside")
    assert torch.get_num_threads() == threads and _threads_override() == 0
    with pytest.raises(RuntimeError, match=r"set_threads\(-1\): expected an integer >= 0"):
        torch.ops.scheinfer.set_threads(-1)


# ------------------------------------------------------------------------- the host

def test_host_info_and_read_bandwidth():
    info = cpu_kernels.host_info()
    assert info["cores"] >= 1 and info["llc_bytes"] > 0 and isinstance(info["vector_extensions"], list)
    bw = cpu_kernels.read_bandwidth(threads=1, nbytes=8 << 20, repeats=2)
    assert bw["threads"] == 1 and bw["buffer_bytes"] == 8 << 20 and bw["gb_s"] > 0
    assert ("native_read_gb_s" in bw) == bool(ISAS)


def test_native_kernels_off_builds_nothing_and_decodes_with_torch():
    """$SCHEINFER_NATIVE_KERNELS=off: no build is tried, the reason is reported, `auto` is torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    code = ("from impl.scheinfer import cpu_kernels as k\n"
            "from impl.scheinfer.fast_decode import choose_kernel\n"
            "assert not k.available() and k.supported_isas() == (), k.load_error()\n"
            "choice = choose_kernel('auto')\n"
            "print(k.load_error(), '|', choice.name, choice.how)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "SCHEINFER_NATIVE_KERNELS": "off",
                                                      "TORCH_EXTENSIONS_DIR": "/nonexistent/never-built"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "not built ($SCHEINFER_NATIVE_KERNELS=off) | torch only"


# ------------------------------------------------------------------------- the build's lock

def test_a_lock_left_by_a_killed_build_is_removed_and_the_build_runs(tmp_path):
    """torch's `lock` file outlives a killed build; under our flock it is stale and goes."""
    (tmp_path / "lock").write_text("")
    ran = []
    cpu_kernels.locked_build(tmp_path, lambda: ran.append(sorted(p.name for p in tmp_path.iterdir())))
    assert ran == [["build.flock"]]


def test_a_live_build_elsewhere_is_waited_for_then_refused(tmp_path):
    """While another process holds the flock (a build in progress) the build waits, and gives up
    with a message naming the folder instead of hanging; the other's `lock` is left alone."""
    import subprocess
    import sys
    (tmp_path / "lock").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(tmp_path / 'build.flock')!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=f"another process has been building {tmp_path}"):
            cpu_kernels.locked_build(tmp_path, lambda: pytest.fail("built while another build held the lock"),
                                     wait_s=0.5)
        assert (tmp_path / "lock").exists()
    finally:
        holder.kill()
        holder.wait()
    ran = []                                 # the holder died: its flock went with it
    cpu_kernels.locked_build(tmp_path, lambda: ran.append(True), wait_s=5)
    assert ran == [True] and not (tmp_path / "lock").exists()


def test_the_build_folder_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = cpu_kernels.build_directory()
    assert build.parent == tmp_path and build.name.startswith("scheinfer_cpu_kernels-py")
