"""The decoders: the reference decoder (slicing algebra, routing, KV cache, batching, sampling, hooks,
configs) and the fast decode path, equal to it on every architecture."""
import math

import pytest
import torch

from impl.common.config import ConfigError
from impl.common.models import get_model
from impl.scheinfer.config import DecoderConfig, LongRope, decode_weight_bytes, weight_shapes
from impl.scheinfer.decoder import Decoder
from impl.scheinfer import cpu_kernels
from impl.scheinfer.fast_decode import FastDecoder, paired_ffn, split_linear
from impl.scheinfer.generate_models import KINDS, tiny_config
from impl.scheinfer.layers import ExpertWeights, ffn, route
from impl.scheinfer.sampling import SamplingConfig, sample_next
from impl.scheinfer.weights import DictWeights, RandomWeights, materialize

ALL_KINDS = list(KINDS)
# every kernel this host offers the fast decoder: torch's and each native instruction set
CPU_KERNELS = ["torch", *cpu_kernels.supported_isas()]


@pytest.fixture(scope="module")
def decoders():
    return {k: Decoder(RandomWeights(tiny_config(k), seed=11, dtype=torch.float32)) for k in ALL_KINDS}


@pytest.fixture(scope="module")
def fast_decoders(decoders):
    return {k: FastDecoder(d.source) for k, d in decoders.items()}


def assert_same_generation(got, want, atol=2e-5):
    """The fast path's contract: the same tokens, logits within rounding."""
    assert got.tokens == want.tokens
    for g, w in zip(got.step_logits, want.step_logits):
        torch.testing.assert_close(g, w, rtol=0, atol=atol)


# ------------------------------------------------------------------------- FFN slicing

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_ffn_is_exact_sum_of_intermediate_slices(dtype, tol):
    g = torch.Generator().manual_seed(0)
    M, Fw = 24, 37                                  # F not a multiple of any tile
    w = ExpertWeights(*(torch.randn(s, generator=g, dtype=dtype) for s in ((Fw, M), (Fw, M), (M, Fw))))
    x = torch.randn(5, M, generator=g, dtype=dtype)
    whole = ffn(w, x)
    for cuts in ([0, 0, 37], [0, 37, 37], [0, 1, 36], [0, 12, 25], [0, 3, 3], [0, 36, 37]):
        parts = [ffn(w.slice(a, b), x) for a, b in zip(cuts, cuts[1:] + [Fw])]
        torch.testing.assert_close(sum(parts), whole, rtol=tol, atol=tol * whole.abs().max().item())
    assert w.slice(3, 9).gate_FM.data_ptr() == w.gate_FM[3:9].data_ptr()     # a view, no copy
    with pytest.raises(ValueError, match="outside"):
        w.slice(5, 38)
    with pytest.raises(ValueError, match=r"\[F, M\]"):
        ExpertWeights(w.gate_FM, w.up_FM, w.gate_FM)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["rows", "transposed", "narrow"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_split_linear_equals_f_linear(threads, layout, tokens):
    """split_linear's core-split paths (blocks of output rows, blocks of the reduction) and its
    fallback equal F.linear, with bias and leading batch dims."""
    g = torch.Generator().manual_seed(tokens)
    N, K = (512, 384) if layout != "narrow" else (6, 8)
    w_NK = torch.randn(N, K, generator=g, dtype=torch.float64)
    if layout == "transposed":
        w_NK = w_NK.t().contiguous().t()
    x = torch.randn(2, tokens, K, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            got = split_linear(x, w_NK, bias)
            assert got.shape == (2, tokens, N)
            torch.testing.assert_close(got, torch.nn.functional.linear(x, w_NK, bias), rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(before)


def test_ffn_hand_formula():
    w = ExpertWeights(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0], [1.0]]))
    x = torch.tensor([[1.0, 1.0]])
    h = torch.nn.functional.silu(torch.tensor(1.0)) * 2.0
    torch.testing.assert_close(ffn(w, x), torch.tensor([[3.0 * h, h]]))


# ------------------------------------------------------------------------- routing

def _sparsemixer_by_hand(s, eps):
    """Straight per-token transcription of SparseMixer's inference path, for comparison."""
    ids, ws = [], []
    E = len(s)
    allowed = list(range(E))
    for _ in range(2):
        best = max(allowed, key=lambda e: (s[e], -e))
        keep = [e for e in allowed if (s[best] - s[e]) / max(abs(s[e]), s[best]) <= 2 * eps]
        z = sum(math.exp(s[e] - s[best]) for e in keep)
        ids.append(best)
        ws.append(1.0 / z)
        allowed.remove(best)
    return ids, ws


def test_sparsemixer_matches_hand_transcription():
    cfg = tiny_config("phimoe")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, cfg.num_experts, generator=g, dtype=torch.float64) * 0.05 + 1.0   # many near-ties
    ids, w = route(cfg, logits)
    for t in range(64):
        eids, ew = _sparsemixer_by_hand(logits[t].tolist(), cfg.router_jitter_eps)
        assert ids[t].tolist() == eids
        torch.testing.assert_close(w[t].double(), torch.tensor(ew, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert (w < 1).any() and (w == 1).any()        # both near-tie groups and lone winners occurred


def test_softmax_topk_normalised_and_not():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)[0]
    mix = DecoderConfig(arch="mixtral", vocab_size=8, hidden=4, num_layers=1, num_heads=1, num_kv_heads=1,
                        head_dim=4, ffn_hidden=0, num_experts=4, top_k=2, moe_ffn_hidden=4)
    ids, w = route(mix, logits)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w[0], p[:2] / p[:2].sum())
    ids, w = route(DecoderConfig(**{**mix.__dict__, "normalize_topk": False}), logits)
    torch.testing.assert_close(w[0], p[:2])


def test_router_orders_ties_as_llamacpp_lowest_expert_first():
    """Equal probabilities are taken in ascending expert order (llama.cpp's stable descending
    argsort), at the top-k boundary too; torch.topk would pick others."""
    mix = DecoderConfig(arch="mixtral", vocab_size=8, hidden=4, num_layers=1, num_heads=1, num_kv_heads=1,
                        head_dim=4, ffn_hidden=0, num_experts=4, top_k=2, moe_ffn_hidden=4)
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0],       # a tie for the second place
                           [0.0, 0.0, 0.0, 0.0],       # all equal
                           [0.0, 5.0, 5.0, 9.0],       # a tie inside the top-k, behind the leader
                           [1.0, 2.0, 2.0, 0.0]])
    ids, w = route(mix, logits)
    assert ids.tolist() == [[0, 1], [0, 1], [3, 1], [1, 2]]
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5]))
    assert route(mix, logits.flip(-1))[0].tolist() == [[3, 0], [0, 1], [0, 1], [1, 2]]
    phi = tiny_config("phimoe")                        # SparseMixer: equal maxima, lowest id first
    ids, _ = route(phi, torch.zeros(1, phi.num_experts))
    assert ids.tolist() == [[0, 1]]


def test_decoders_route_a_tie_alike():
    """A router of zeros makes every expert tie for every token: both decoders pick experts 0
    and 1 (the prefill's several tokens and each decoded token alike)."""
    cfg = tiny_config("mixtral")
    tensors = materialize(RandomWeights(cfg, seed=4, dtype=torch.float32)).tensors
    tensors.update({n: torch.zeros_like(t) for n, t in tensors.items() if n.endswith("moe.router.weight")})
    src = DictWeights(cfg, tensors)
    for cls in (Decoder, FastDecoder):
        seen = []
        cls(src, route_observer=lambda l, ids, w: seen.append(ids)).generate([[1, 17, 300, 42]], 3)
        assert seen and all((ids == torch.tensor([0, 1])).all() for ids in seen), cls.__name__


# ------------------------------------------------------------------------- KV cache, batching

@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_incremental_decode_equals_full_forward(decoders, fast_decoders, kind, fast):
    dec = (fast_decoders if fast else decoders)[kind]
    toks = [1, 17, 300, 42, 8, 255, 77, 3, 90, 400]
    full = dec.logits(toks)
    cache = dec.new_cache(1, len(toks))
    steps = [dec.forward(torch.tensor([toks[:4]]), cache)[0]]
    for t in toks[4:]:
        steps.append(dec.forward(torch.tensor([[t]]), cache)[0])
    torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------- the fast decode path

@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fast_decoder_equals_reference(decoders, kind, kernel):
    """Eager fast path against the reference, with every kernel: one prompt, a left-padded batch,
    an unpadded batch; at one thread (paired experts with torch's kernel) and at four (core-split
    products), routing observed alike."""
    ref, fast = decoders[kind], FastDecoder(decoders[kind].source, kernel=kernel)
    assert fast.kernel.name == kernel
    before = torch.get_num_threads()
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            for prompts in ([[1, 17, 300, 42]], [[1, 5, 9], [2, 300, 22, 41, 7]], [[1, 5, 9, 4], [2, 300, 22, 41]]):
                assert_same_generation(fast.generate(prompts, 6, return_logits=True),
                                       ref.generate(prompts, 6, return_logits=True))
    finally:
        torch.set_num_threads(before)
    seen = {"ref": [], "fast": []}
    for name, make in (("ref", Decoder), ("fast", lambda src, **kw: FastDecoder(src, kernel=kernel, **kw))):
        make(ref.source, route_observer=lambda l, ids, w, name=name: seen[name].append((l, ids, w))).generate(
            [[1, 17, 300, 42]], 4)
    assert len(seen["ref"]) == len(seen["fast"]) == (4 * ref.config.num_layers if ref.config.is_moe else 0)
    for (la, ia, wa), (lb, ib, wb) in zip(seen["ref"], seen["fast"]):
        assert la == lb and torch.equal(ia, ib)
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "phimoe"])
def test_a_moe_layer_of_no_tokens_gives_no_rows(decoders, fast_decoders, kind):
    """A layer handed zero tokens (every position padding) returns an empty block, as the reference."""
    i = next(i for i in range(decoders[kind].config.num_layers) if decoders[kind].config.is_moe_layer(i))
    x = torch.zeros(0, decoders[kind].config.hidden)
    for dec in (decoders[kind], fast_decoders[kind]):
        y = dec.moe(i, dec.layer_weights(i).moe, x)
        assert y.shape == (0, decoders[kind].config.hidden)


def test_paired_experts_equal_each_expert_alone(fast_decoders):
    """Any two experts of a stacked layer as one batched product give each expert's own `ffn`."""
    moe = fast_decoders["mixtral"].layer_weights(0).moe
    x = torch.randn(1, moe.gate_up_E2FM.shape[2], generator=torch.Generator().manual_seed(3))
    E = len(moe.experts)
    for a, b in ((0, 1), (0, E - 1), (2, 5)):
        for y, e in zip(paired_ffn(moe, a, b, x), (a, b)):
            torch.testing.assert_close(y, ffn(moe.experts[e], x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(len(CPU_KERNELS) < 2, reason="no native kernels: 'auto' is torch's, unmeasured")
def test_auto_times_the_decoders_own_steps_and_leaves_nothing_behind(decoders, monkeypatch):
    """'auto' on a FastDecoder times its own decode steps (OWN_STEPS with each candidate, the route
    observer off) and picks by those timings (injected: torch's twice as fast); afterwards the
    observer and cache are the decoder's own again. With a plugged-in expert function it times
    the probe's experts instead, not the function."""
    from collections import Counter
    from impl.scheinfer import fast_decode
    speed = {"torch": 0.5}
    calls = []

    def fake_round(runs, rounds, budget_s=0.0, max_rounds=200):
        for run in runs.values():
            run()
        return {key: [speed.get(key, 1.0)] * rounds for key in runs}

    real_forward = FastDecoder.forward

    def forward(self, *args, **kwargs):
        calls.append((self.kernel.name, self.route_observer))
        return real_forward(self, *args, **kwargs)

    def clear():
        for fn in (fast_decode._measured_choice, fast_decode._eager_decode_seconds, fast_decode._batched_decision):
            fn.cache_clear()

    monkeypatch.delenv("SCHEINFER_CPU_KERNEL", raising=False)
    monkeypatch.setattr(fast_decode, "_round_seconds", fake_round)
    monkeypatch.setattr(FastDecoder, "forward", forward)
    observed = []
    observer = lambda layer, ids, weights: observed.append(layer)  # noqa: E731
    clear()
    try:
        dec = FastDecoder(decoders["mixtral"].source, route_observer=observer)
        assert (dec.kernel.name, dec.kernel.how, dec.kernel.probe["decode_timed"]) == ("torch", "measured", "own steps")
        assert Counter(name for name, _ in calls) == {k: fast_decode.OWN_STEPS for k in CPU_KERNELS}
        assert all(obs is None for _, obs in calls) and not observed
        assert dec.route_observer is observer and dec.kernel.basis["decode"]["time_ratios"]["torch"] == 0.5
        dec.generate([[1, 17, 300]], 2)
        assert observed
        calls.clear()
        plugged = FastDecoder(decoders["mixtral"].source, expert_fn=lambda layer, e, w, x: ffn(w, x))
        assert plugged.kernel.probe["decode_timed"] == "probe experts" and not calls
    finally:
        clear()


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_eager_decode_steps_with_native_products_run_torch_on_one_thread(decoders, monkeypatch, kernel):
    """Each eager decode step (not the prompt) whose products are native ops runs in
    `torch_ops_on_one_thread`; with torch's kernel none does. The engine's decoder too (each
    thread's count is its own: the lanes keep theirs)."""
    from contextlib import contextmanager
    from impl.scheinfer.engine import HybridDecoder, HybridEngine
    from impl.scheinfer.policy import FixedPolicy
    entered = []

    @contextmanager
    def recording():
        entered.append(torch.get_num_threads())
        yield

    monkeypatch.setattr(cpu_kernels, "torch_ops_on_one_thread", recording)
    src = decoders["mixtral"].source
    fast = FastDecoder(src, kernel=kernel)
    out = fast.generate([[1, 17, 300, 42]], 4)
    assert len(entered) == (out.decode_steps if kernel != "torch" else 0)
    entered.clear()
    with HybridEngine(FixedPolicy(0.5, 0.25, 0.25), src.config.hidden, gpu_mem_bytes=1 << 30, device="cpu",
                      kernel=kernel) as engine:
        out = HybridDecoder(src, engine).generate([[1, 17, 300, 42]], 4)
    assert len(entered) == (out.decode_steps if kernel != "torch" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind,kernel", [(kind, None) for kind in ALL_KINDS]
                         + [("mixtral", kernel) for kernel in CPU_KERNELS])
def test_compiled_decode_equals_reference(decoders, kind, kernel):
    """compile_decode=True (the compiled one-token layer region, and the compiled attention block
    for an unpadded batch): the same tokens as the reference decoder, logits within rounding,
    routing observed alike; every architecture with the chosen kernel, and every kernel (native
    ops inside the region, or Inductor's loops with torch's) on one."""
    ref = decoders[kind]
    seen = []
    compiled = FastDecoder(ref.source, compile_decode=True, kernel=kernel,
                           route_observer=lambda l, ids, w: seen.append(ids))
    for prompts in ([[1, 17, 300, 42]], [[1, 5, 9, 4], [2, 300, 22, 41]]):
        assert_same_generation(compiled.generate(prompts, 6, return_logits=True),
                               ref.generate(prompts, 6, return_logits=True))
    if ref.config.is_moe:
        assert seen and all(ids.shape[-1] == ref.config.top_k for ids in seen)


def test_compiled_decode_rejects_expert_fn_other_devices_and_no_compiler(monkeypatch):
    src = RandomWeights(tiny_config("mixtral"), seed=11, dtype=torch.float32)
    with pytest.raises(ValueError, match="compile_decode=True needs device 'cpu' and no expert_fn"):
        FastDecoder(src, compile_decode=True, expert_fn=lambda layer, e, w, x: ffn(w, x))
    with pytest.raises(ValueError, match="got device 'meta'"):
        FastDecoder(src, compile_decode=True, device="meta")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler"):
        FastDecoder(src, compile_decode=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe", "phimoe"])
def test_left_padded_batch_equals_single_prompts(decoders, kind):
    dec = decoders[kind]
    prompts = [[1, 5, 9], [1, 300, 22, 41, 7, 8, 100], [2], [1, 17, 17, 17, 17]]
    batch = dec.generate(prompts, 6, return_logits=True)
    for b, p in enumerate(prompts):
        one = dec.generate([p], 6, return_logits=True)
        assert batch.tokens[b] == one.tokens[0]
        torch.testing.assert_close(batch.step_logits[b], one.step_logits[0], rtol=0, atol=2e-5)
    assert batch.prompt_tokens == sum(map(len, prompts))


def test_generate_greedy_follows_logits_and_stops_at_eos(decoders):
    dec = decoders["mixtral"]
    prompt = [1, 44, 9, 310]
    out = dec.generate([prompt], 5, return_logits=True)
    seq = list(prompt)
    for t in out.tokens[0]:
        assert t == int(dec.logits(seq)[-1].argmax())
        seq.append(t)
    eos = out.tokens[0][2]
    stopped = dec.generate([prompt], 5, eos_token_id=eos)
    assert stopped.tokens[0] == out.tokens[0][: out.tokens[0].index(eos) + 1]


# ------------------------------------------------------------------------- sampling

def test_sampling_is_seeded_and_respects_top_k_top_p(decoders):
    dec = decoders["llama"]
    prompts = [[1, 2, 3], [1, 9]]
    s = SamplingConfig(temperature=1.5, top_k=5, seed=7)
    a, b = dec.generate(prompts, 8, s), dec.generate(prompts, 8, s)
    assert a.tokens == b.tokens
    assert dec.generate(prompts, 8, SamplingConfig(temperature=1.5, top_k=5, seed=8)).tokens != a.tokens
    # sequence b of a batch draws with seed + b: alone with that seed it gives the same tokens
    assert dec.generate([prompts[1]], 8, SamplingConfig(temperature=1.5, top_k=5, seed=8)).tokens[0] == a.tokens[1]
    greedy = dec.generate(prompts, 8).tokens
    assert dec.generate(prompts, 8, SamplingConfig(temperature=0.7, top_k=1, seed=3)).tokens == greedy
    assert dec.generate(prompts, 8, SamplingConfig(temperature=0.7, top_p=1e-6, seed=3)).tokens == greedy

    logits = torch.tensor([[5.0, 4.0, 3.0, -2.0, -3.0]])
    gens = [torch.Generator().manual_seed(0)]
    seen = {int(sample_next(logits, SamplingConfig(temperature=2.0, top_k=3), gens)) for _ in range(300)}
    assert seen == {0, 1, 2}
    p = torch.softmax(logits / 2.0, -1)[0]           # top_p just above p0 + p1 keeps exactly {0, 1}
    seen = {int(sample_next(logits, SamplingConfig(temperature=2.0, top_p=float(p[0] + p[1]) + 1e-4), gens))
            for _ in range(300)}
    assert seen == {0, 1, 2}
    seen = {int(sample_next(logits, SamplingConfig(temperature=2.0, top_p=float(p[0] + p[1]) - 1e-4), gens))
            for _ in range(300)}
    assert seen == {0, 1}


@pytest.mark.parametrize("kw,key", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
                                    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_sampling_config_errors(kw, key):
    with pytest.raises(ConfigError, match=key):
        SamplingConfig(**kw)


# ------------------------------------------------------------------------- hooks, lazy weights

def test_sliced_expert_fn_gives_same_logits_and_observer_sees_real_tokens():
    src = RandomWeights(tiny_config("qwen2_moe"), seed=3, dtype=torch.float32)
    plain = Decoder(src)
    calls = []

    def three_way(layer, expert, w, x):             # CC | CG | GG-style split of every FFN
        f = w.ffn_hidden
        cuts = [0, f // 3, (2 * f) // 3, f]
        calls.append((layer, expert))
        return sum(ffn(w.slice(a, b), x) for a, b in zip(cuts, cuts[1:]))

    routed = []
    sliced = Decoder(src, expert_fn=three_way, route_observer=lambda l, ids, w: routed.append((l, ids.shape)))
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    a = plain.generate(prompts, 3, return_logits=True)
    b = sliced.generate(prompts, 3, return_logits=True)
    assert a.tokens == b.tokens
    for x, y in zip(a.step_logits, b.step_logits):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    assert {e for _, e in calls} >= {"shared"} and any(isinstance(e, int) for _, e in calls)
    cfg = src.config
    assert routed[0] == (0, (7, cfg.top_k))         # prefill: the 7 real tokens, padding excluded
    assert routed[cfg.num_layers] == (0, (2, cfg.top_k))


def test_lazy_weights_equal_cached():
    src = RandomWeights(tiny_config("mixtral"), seed=5, dtype=torch.float32)
    toks = [1, 9, 33, 250]
    assert torch.equal(Decoder(src, cache_weights=False).logits(toks), Decoder(src).logits(toks))


def test_dense_layers_inside_moe_model():
    cfg = tiny_config("qwen2_moe", mlp_only_layers=(0,))
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)
    names = weight_shapes(cfg)
    assert "layers.0.ffn.gate.weight" in names and "layers.1.moe.router.weight" in names
    dec = Decoder(RandomWeights(cfg, dtype=torch.float32))
    assert dec.logits([1, 2, 3]).shape == (3, cfg.vocab_size)


def test_longrope_unit_factors_equal_plain_rope():
    base = tiny_config("phimoe")
    half = base.head_dim // 2
    src = RandomWeights(base, seed=2, dtype=torch.float32)
    plain = Decoder(src).logits([1, 2, 3, 4])
    unit = LongRope((1.0,) * half, (1.0,) * half, 1.0, 1.0, 4096)
    src_u = RandomWeights(DecoderConfig(**{**base.__dict__, "rope_scaling": unit}), seed=2, dtype=torch.float32)
    assert torch.equal(Decoder(src_u).logits([1, 2, 3, 4]), plain)
    # 'long' factors apply only once the sequence passes original_max_position_embeddings
    switch = LongRope((1.0,) * half, (4.0,) * half, 1.0, 1.3, 4)
    src_s = RandomWeights(DecoderConfig(**{**base.__dict__, "rope_scaling": switch}), seed=2, dtype=torch.float32)
    dec_s = Decoder(src_s)
    assert torch.equal(dec_s.logits([1, 2, 3, 4]), plain)
    assert not torch.allclose(dec_s.logits([1, 2, 3, 4, 5])[:4], plain)
    fast_s = FastDecoder(src_s)                       # its cached tables switch alike
    for toks in ([1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 2, 3]):
        torch.testing.assert_close(fast_s.logits(toks), dec_s.logits(toks), rtol=0, atol=2e-5)


# ------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name,uncounted", [("llama2-7b", 0), ("mixtral-8x7b", 0), ("qwen2-57b-a14b", 0),
                                            ("qwen1.5-moe-a2.7b", 0), ("phi-3.5-moe", 32064)])
def test_real_shapes_match_published_parameter_counts(name, uncounted):
    cfg = DecoderConfig.from_model_config(name)
    total = sum(math.prod(s) for s in weight_shapes(cfg).values())
    assert total - uncounted == get_model(name).param_counts()[0]   # phi: lm_head bias not counted there


def test_decode_weight_bytes_counts_the_chosen_experts_and_one_embedding_row():
    """Mixtral-8x7B: 46.7 B parameters, 12.9 B active per token (the published count, with the
    32000 x 4096 embedding table, of which one row is read); F32: 4 bytes each."""
    cfg = DecoderConfig.from_model_config("mixtral-8x7b")
    M, V, L, Fw = cfg.hidden, cfg.vocab_size, cfg.num_layers, cfg.moe_ffn_hidden
    attention = L * (2 * M * M + 2 * M * 1024 + 2 * M)             # q, o; k, v (8 KV heads of 128); norms
    experts = L * (cfg.top_k * 3 * M * Fw + cfg.num_experts * M)   # two experts, the router
    assert decode_weight_bytes(cfg, 4) == 4 * (attention + experts + M + V * M + M)   # final norm, lm_head, a row
    assert 12.8e9 < decode_weight_bytes(cfg, 1) + (V - 1) * M < 13.0e9
    dense = tiny_config("llama")
    assert decode_weight_bytes(dense, 2) == 2 * (sum(math.prod(s) for s in weight_shapes(dense).values())
                                                 - (dense.vocab_size - 1) * dense.hidden)


def test_random_weights_at_real_shape_are_lazy_and_deterministic():
    src = RandomWeights("mixtral-8x7b", seed=1)
    r = src.load("layers.31.moe.router.weight")
    assert r.shape == (8, 4096) and r.dtype == torch.bfloat16
    assert torch.equal(r, src.load("layers.31.moe.router.weight"))
    assert not torch.equal(r, RandomWeights("mixtral-8x7b", seed=2).load("layers.31.moe.router.weight"))
    with pytest.raises(KeyError, match="layers.32"):
        src.load("layers.32.moe.router.weight")


@pytest.mark.parametrize("kw,key", [
    ({"top_k": 9}, "top_k"), ({"num_kv_heads": 3}, "num_kv_heads"), ({"arch": "gpt2"}, "arch"),
    ({"router": "sparsemixer"}, "top_k"), ({"head_dim": 15}, "head_dim"), ({"norm_kind": "batchnorm"}, "norm_kind"),
    ({"mlp_only_layers": (5,)}, "mlp_only_layers")])
def test_config_errors_name_key(kw, key):
    base = tiny_config("mixtral").__dict__
    if kw.get("router") == "sparsemixer":
        kw = {**kw, "top_k": 3}
    with pytest.raises(ConfigError, match=key):
        DecoderConfig(**{**base, **kw})


def test_from_model_config_rejects_other_families():
    with pytest.raises(ConfigError, match="family"):
        DecoderConfig.from_model_config("deepseek-v3")


def test_bad_tokens_and_cache_overflow(decoders):
    dec = decoders["llama"]
    with pytest.raises(ValueError, match="token ids"):
        dec.logits([1, dec.config.vocab_size])
    cache = dec.new_cache(1, 2)
    with pytest.raises(ValueError, match="exceeds"):
        dec.forward(torch.tensor([[1, 2, 3]]), cache)


@pytest.mark.parametrize("kind", ["mixtral", "phimoe", "qwen2_moe", "llama"])
def test_decoder_config_round_trips_through_a_record(kind):
    """A bench record's model (`as_dict`, JSON) reads back as the same config; a stray key is refused."""
    import json
    cfg = tiny_config(kind)
    assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.as_dict()))) == cfg
    with pytest.raises(ConfigError, match="'hiden'"):
        DecoderConfig.from_dict({**cfg.as_dict(), "hiden": 4})
