"""ScheInfer three-lane engine: exact outputs under every partition and policy, real lane overlap,
determinism under injected delays, placement within the GPU budget, a failing lane surfacing in
the caller without hanging, calibration."""
import os
import random
import threading
import time

import pytest
import torch

import baselines.fiddler  # noqa: F401  (registers the engine policy 'fiddler')
from baselines.llamacpp.policy import LayersPolicy
from impl.common.config import ConfigError
from impl.common.registry import names
from impl.scheinfer import cpu_kernels
from impl.scheinfer.decoder import Decoder
from impl.scheinfer.engine import HybridDecoder, HybridEngine
from impl.scheinfer.generate_models import generate
from impl.scheinfer.partition import REFERENCE_COST
from impl.scheinfer.policy import POLICY_KIND, FixedPolicy, ffn_widths, make_policy, policy_ranks_by_popularity
from impl.scheinfer.weights import GGUFWeights

KINDS = ("llama", "mixtral", "qwen2_moe", "phimoe")
PROMPT = [1, 5, 9, 33, 100, 7, 8, 200, 17, 3]
N_NEW = 5
BIG = 1 << 30                       # a budget that holds everything
CPU_KERNELS = ["torch", *cpu_kernels.supported_isas()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("scheinfer_models")
    out = {}
    for k in KINDS:
        src = GGUFWeights(generate(k, d / f"{k}.gguf", dtype="f32", seed=5))
        ref = Decoder(src).generate([PROMPT], N_NEW, return_logits=True)
        out[k] = (src, ref)
    return out


def _run(src, policy, gpu_mem=BIG, **kw):
    eng = HybridEngine(policy, src.config.hidden, gpu_mem_bytes=gpu_mem, **kw)
    try:
        out = HybridDecoder(src, eng).generate([PROMPT], N_NEW, return_logits=True)
    finally:
        eng.close()
    return out, eng


def _assert_same(out, ref):
    assert out.tokens == ref.tokens
    torch.testing.assert_close(out.step_logits[0], ref.step_logits[0], rtol=0, atol=1e-4)


FRACTIONS = {"cc_only": (1, 0, 0), "cg_only": (0, 1, 0), "gg_only": (0, 0, 1), "mixed": (0.3, 0.3, 0.4),
             "cc_gg": (0.5, 0, 0.5)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frac", FRACTIONS, ids=list(FRACTIONS))
def test_fixed_partitions_match_reference(models, kind, frac):
    src, ref = models[kind]
    out, eng = _run(src, FixedPolicy(*FRACTIONS[frac]))
    _assert_same(out, ref)
    bands = {e.band for e in eng.events}
    assert bands == {b for b, f in zip(("cc", "cg", "gg"), FRACTIONS[frac]) if f}
    assert {e.phase for e in eng.events} == {"prefill", "decode"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy,opts", [("scheinfer", {}), ("scheinfer", {"assign": "threshold"}),
                                         ("scheinfer", {"assign": "makespan"}),
                                         ("scheinfer", {"gg_mode": "popularity"}), ("fiddler", {}),
                                         ("layers", {}), ("layers", {"order": "first"})])
def test_policies_match_reference(models, kind, policy, opts):
    src, ref = models[kind]
    cfg = src.config
    ffn_bytes = sum(ffn_widths(cfg).values()) * 3 * cfg.hidden * 4
    p = make_policy(policy, cost=REFERENCE_COST, hidden=cfg.hidden, num_layers=cfg.num_layers, dtype_bytes=4,
                    tile=16, **opts)
    max_ffn = max(ffn_widths(cfg).values()) * 3 * cfg.hidden * 4
    budget = 2 * max_ffn + ffn_bytes // 2              # staging + half of the FFN weights
    out, eng = _run(src, p, gpu_mem=budget)
    _assert_same(out, ref)
    staging = p.staging_buffers * max_ffn if eng.cg_max else 0
    assert 0 < eng.resident_bytes and eng.resident_bytes + staging <= budget


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("frac", ["cc_only", "mixed"])
def test_every_cpu_kernel_matches_reference(models, kernel, frac):
    """The CPU lane (and the emulated GPU lane) with each CPU kernel; the decoder around the
    engine uses the engine's kernel."""
    src, ref = models["mixtral"]
    eng = HybridEngine(FixedPolicy(*FRACTIONS[frac]), src.config.hidden, gpu_mem_bytes=BIG, kernel=kernel)
    try:
        dec = HybridDecoder(src, eng)
        _assert_same(dec.generate([PROMPT], N_NEW, return_logits=True), ref)
    finally:
        eng.close()
    assert eng.kernel.name == kernel and dec.kernel is eng.kernel


@pytest.mark.skipif(len(CPU_KERNELS) < 2, reason="no native kernels: 'auto' is torch's, unmeasured")
def test_auto_is_measured_for_the_engines_model_as_its_cpu_lane_runs_products(models, monkeypatch):
    """'auto': nothing measured when the engine is made; its decoder has it measured at the
    model's expert shape, FFN by FFN (mode 'ffns', the CPU lane's products), and uses the engine's
    choice; a bad kernel name fails when the engine is made, before its lane threads start."""
    from impl.scheinfer import fast_decode
    from impl.scheinfer.fast_decode import KERNEL_ENV, KernelChoice, ProbeShape
    asked = []

    def measured(native, threads, mode, shape, rounds=5):
        asked.append((mode, shape))
        return KernelChoice(native[0], "measured")

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(fast_decode, "_measured_choice", measured)
    src, _ = models["qwen2_moe"]
    eng = HybridEngine(FixedPolicy(1.0, 0.0, 0.0), src.config.hidden, gpu_mem_bytes=BIG)
    try:
        assert not asked
        dec = HybridDecoder(src, eng)
        assert asked == [("ffns", ProbeShape.of(src.config).probed())] and dec.kernel is eng.kernel
        assert ProbeShape.of(src.config).top_k == src.config.top_k and eng.kernel.name == CPU_KERNELS[1]
    finally:
        eng.close()
    before = set(threading.enumerate())
    with pytest.raises(ConfigError, match="cpu kernel='avx3' is not allowed"):
        HybridEngine(FixedPolicy(1.0, 0.0, 0.0), src.config.hidden, kernel="avx3")
    assert set(threading.enumerate()) <= before        # failed before any lane thread started


def test_switching_the_decoders_kernel_switches_the_engines_lanes(models):
    """`HybridDecoder.use_kernel`: the decoder's products and the engine's CPU lane keep one kernel,
    and the outputs stay the reference's with each."""
    src, ref = models["mixtral"]
    eng = HybridEngine(FixedPolicy(*FRACTIONS["mixed"]), src.config.hidden, gpu_mem_bytes=BIG, kernel="torch")
    try:
        dec = HybridDecoder(src, eng)
        for kernel in reversed(CPU_KERNELS):
            assert dec.use_kernel(kernel) is eng.kernel and eng.kernel.name == kernel and dec.kernel is eng.kernel
            _assert_same(dec.generate([PROMPT], N_NEW, return_logits=True), ref)
        with pytest.raises(ConfigError, match="cpu kernel='avx3' is not allowed"):
            dec.use_kernel("avx3")
        assert eng.kernel.name == CPU_KERNELS[0] and dec.kernel is eng.kernel      # unchanged by the error
    finally:
        eng.close()


def test_lane_threads_and_cpu_only_layers_in_the_callers_thread(models):
    """Threads per lane (OpenMP's count is per thread): the CPU lane all of the engine's, the copy
    lane one, the emulated GPU lane the CPU lane's. A layer with CC parts only runs in the
    caller's thread (nothing to overlap); a mixed one on the lane threads."""
    src, _ = models["mixtral"]
    seen = {}

    def hook(lane, band):
        seen.setdefault((lane, band), set()).add(threading.current_thread().name)
    for frac in ("cc_only", "mixed"):
        _, eng = _run(src, FixedPolicy(*FRACTIONS[frac]), lane_hook=hook, threads=2)
        assert eng.lane_threads == {"cpu": 2, "h2d": 1, "gpu": 2}
        assert torch.get_num_threads() == 2          # the process-wide count is the caller's again
        if frac == "cc_only":
            assert seen.pop(("cpu", "cc")) == {threading.current_thread().name}
    assert seen == {("cpu", "cc"): {"scheinfer-cpu"}, ("h2d", "cg"): {"scheinfer-h2d"},
                    ("gpu", "cg"): {"scheinfer-gpu"}, ("gpu", "gg"): {"scheinfer-gpu"}}


def _mkl_threads() -> int | None:
    info = [line for line in torch.__config__.parallel_info().splitlines() if "mkl_get_max_threads()" in line]
    return int(info[0].split(":")[1]) if info else None


def test_thread_counts_are_per_thread():
    """What the engine and `cpu_kernels.torch_ops_on_one_thread` rest on: a thread that sets
    torch's count (OpenMP's, and MKL's where torch has it) leaves every other thread's as it was."""
    before = (torch.get_num_threads(), _mkl_threads())
    seen = []

    def lane():
        torch.set_num_threads(1)
        seen.append((torch.get_num_threads(), _mkl_threads()))
    t = threading.Thread(target=lane)
    t.start()
    t.join()
    assert seen == [(1, None if before[1] is None else 1)]
    assert (torch.get_num_threads(), _mkl_threads()) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads in /proc/self/task")
@pytest.mark.parametrize("threads", [1, 3])
def test_lanes_start_without_an_openmp_team(models, threads):
    """An engine's lanes start no OpenMP workers: the threads an engine adds are its lanes and
    nothing else, whatever its thread count (each lane's set-up product runs on one thread, its own
    count set after; libgomp waits only briefly once it manages more threads than CPUs, idle workers
    counted: tests/bench/README.md), and each lane keeps its own count. Thread ids are compared as
    sets, so a thread elsewhere in the process ending meanwhile does not count."""
    src, _ = models["mixtral"]
    before = set(os.listdir("/proc/self/task"))
    eng = HybridEngine(FixedPolicy(1.0, 0.0, 0.0), src.config.hidden, torch.float32, 0, device="cpu",
                       threads=threads, kernel="torch")
    try:
        added = set(os.listdir("/proc/self/task")) - before
        lane_ids = {str(lane.submit(threading.get_native_id).result()) for lane in eng._lanes.values()}
        assert added == lane_ids and len(lane_ids) == len(eng.lane_threads), (added, lane_ids)
        counts = {name: lane.submit(torch.get_num_threads).result() for name, lane in eng._lanes.items()}
        assert counts == eng.lane_threads == {"cpu": threads, "h2d": 1, "gpu": threads}
    finally:
        eng.close()


def test_scheinfer_split_differs_by_phase(models):
    """Compute-bound CPU, a copy as fast as one token's CPU work: decode (n = 1) splits the
    off-GPU rows about evenly, prefill (n = 10) streams most of them."""
    from impl.scheinfer.partition import CostModel, PerRowLinear
    cost = CostModel(PerRowLinear((1,), (1e-9,)), PerRowLinear((1,), (1e-12,)), 4e9)
    src, _ = models["llama"]
    p = make_policy("scheinfer", cost=cost, hidden=64, num_layers=2, dtype_bytes=4, tile=4)
    row_bytes = 3 * 64 * 4
    _, eng = _run(src, p, gpu_mem=2 * 172 * row_bytes + 2 * 84 * row_bytes)   # staging + 84 GG rows each
    cc = {ph: [e.rows for e in eng.events if e.band == "cc" and e.phase == ph] for ph in ("prefill", "decode")}
    cg = {ph: [e.rows for e in eng.events if e.band == "cg" and e.phase == ph] for ph in ("prefill", "decode")}
    assert set(cc["decode"]) == {44} and set(cc["prefill"]) == {8}      # of 88 off-GPU rows (tile 4)
    assert set(cg["decode"]) == {44} and set(cg["prefill"]) == {80}


def test_lanes_overlap(models):
    """Each lane blocks at a 3-party barrier inside its band: only concurrent lanes get through,
    and every layer's three bands then share a common instant in the recorded events."""
    src, ref = models["llama"]
    barrier = threading.Barrier(3)

    def hook(lane, band):
        if (lane, band) in (("cpu", "cc"), ("h2d", "cg"), ("gpu", "gg")):
            barrier.wait(timeout=30)
    out, eng = _run(src, FixedPolicy(0.25, 0.25, 0.5), lane_hook=hook)
    _assert_same(out, ref)
    calls = {}
    for e in eng.events:
        if (e.lane, e.band) in (("cpu", "cc"), ("h2d", "cg"), ("gpu", "gg")):
            calls.setdefault((e.layer, e.lane), []).append(e)
    for layer in range(src.config.num_layers):
        runs = [calls[(layer, lane)] for lane in ("cpu", "h2d", "gpu")]
        assert len({len(r) for r in runs}) == 1
        for trio in zip(*runs):
            assert max(e.start for e in trio) < min(e.end for e in trio)


def test_serial_policies_do_not_overlap(models):
    """One band at a time; a layer's CC slices are one call (their events share one interval)."""
    src, ref = models["mixtral"]
    out, eng = _run(src, FixedPolicy(0.25, 0.25, 0.5, concurrent=False))
    _assert_same(out, ref)
    spans = sorted({(e.start, e.end, e.lane) for e in eng.events})
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    cc = [e for e in eng.events if e.band == "cc"]
    assert len(cc) > len({(e.start, e.end) for e in cc})          # several FFNs' CC slices per call


def test_deterministic_under_injected_delays(models):
    src, _ = models["mixtral"]
    first, _ = _run(src, FixedPolicy(0.3, 0.3, 0.4))
    rng = random.Random(0)
    for _ in range(2):
        out, _ = _run(src, FixedPolicy(0.3, 0.3, 0.4), lane_hook=lambda lane, band: time.sleep(rng.random() * 2e-3))
        assert out.tokens == first.tokens
        assert torch.equal(out.step_logits[0], first.step_logits[0])


def test_plain_decoder_expert_fn(models):
    src, ref = models["mixtral"]
    eng = HybridEngine(FixedPolicy(0.5, 0.25, 0.25), src.config.hidden, gpu_mem_bytes=BIG)
    out = Decoder(src, expert_fn=eng.expert_fn).generate([PROMPT], N_NEW, return_logits=True)
    eng.close()
    _assert_same(out, ref)


def test_fiddler_and_layers_placement(models):
    src, _ = models["mixtral"]
    cfg = src.config
    e_bytes = cfg.moe_ffn_hidden * 3 * cfg.hidden * 4
    pop = {(1, 3): 9.0, (0, 6): 5.0, (0, 2): 1.0}
    p = make_policy("fiddler", cost=REFERENCE_COST, hidden=cfg.hidden, num_layers=2, dtype_bytes=4, popularity=pop)
    eng = HybridEngine(p, cfg.hidden, gpu_mem_bytes=e_bytes * 3)          # 1 staging + 2 resident
    gg = eng.place(ffn_widths(cfg))
    assert {k for k, v in gg.items() if v} == {(1, 3), (0, 6)} and set(gg.values()) == {0, cfg.moe_ffn_hidden}
    assert p.plan(0, [], "decode", 1, None) == []
    eng.close()
    lp = LayersPolicy(2)
    eng = HybridEngine(lp, cfg.hidden, gpu_mem_bytes=e_bytes * (1 + 8))
    gg = eng.place(ffn_widths(cfg))
    assert lp.gpu_layers(ffn_widths(cfg), cfg.hidden, 4, e_bytes * 8) == [1]
    assert all(v == (cfg.moe_ffn_hidden if k[0] == 1 else 0) for k, v in gg.items())
    eng.close()
    # with 2 experts' bytes besides each layer's FFNs (layer_bytes: its attention, say) layer 1 no longer fits
    assert LayersPolicy(2, layer_bytes={1: 2 * e_bytes}).gpu_layers(ffn_widths(cfg), cfg.hidden, 4, e_bytes * 8) == []



@pytest.mark.parametrize("n_layer", [1, 3])
def test_layers_policy_puts_the_head_first_as_ngl_does(n_layer):
    """With head_bytes, llama.cpp's policy holds at every budget what -ngl N holds by
    `runner.ngl_layers`, N the most that fit: the output head (any N >= 1) before any layer, then
    the last N - 1 layers; a budget short of the head holds nothing (N = 0)."""
    from baselines.llamacpp.runner import ngl_layers
    widths = {(i, "dense"): 4 for i in range(n_layer)}          # 4 rows of 3 bytes: 12 bytes per layer
    head, layer = 5, 12 + 2
    policy = LayersPolicy(n_layer, layer_bytes=dict.fromkeys(range(n_layer), 2), head_bytes=head)
    for budget in range(head + n_layer * layer + 3):
        on_gpu, left = policy.place_head(budget)
        layers = sorted(policy.gpu_layers(widths, 1, 1, left))
        N = 1 + len(layers) if on_gpu else 0
        first, output = ngl_layers(n_layer, N)
        assert (layers, on_gpu) == (list(range(first, n_layer)), output), budget
        assert N == n_layer + 1 or budget < head + N * layer, budget       # -ngl N + 1 does not fit
    assert LayersPolicy(n_layer).place_head(7) == (True, 7)       # the head outside the budget
    with pytest.raises(ConfigError, match="head_bytes=-1"):
        LayersPolicy(n_layer, head_bytes=-1)


def test_which_policies_rank_ffns_by_popularity():
    """`uses_popularity`: Fiddler always, ScheInfer with GG rows by popularity, no other."""
    common = dict(cost=REFERENCE_COST, hidden=8, num_layers=2, dtype_bytes=4)
    assert make_policy("fiddler", **common).uses_popularity
    assert make_policy("scheinfer", **common, gg_mode="popularity").uses_popularity
    assert not make_policy("scheinfer", **common, gg_mode="uniform").uses_popularity
    assert not make_policy("layers", **common).uses_popularity
    assert not make_policy("fixed", **common, cc=0.5, cg=0.5, gg=0.0).uses_popularity


@pytest.mark.parametrize("name", names(POLICY_KIND))
@pytest.mark.parametrize("gg_mode", [None, "uniform", "popularity"])
def test_every_policy_says_whether_it_profiles_before_it_is_built(name, gg_mode):
    """`policy_ranks_by_popularity(name, **options)` (what the CLI asks before it has a cost model)
    equals the built policy's `uses_popularity`, for every registered policy and option."""
    options = dict(POLICY_OPTIONS.get(name, {}), **({} if gg_mode is None or name != "scheinfer" else {"gg_mode": gg_mode}))
    built = make_policy(name, cost=REFERENCE_COST, hidden=8, num_layers=2, dtype_bytes=4, **options)
    assert policy_ranks_by_popularity(name, **options) == built.uses_popularity


# every registered policy, with the options it needs
POLICY_OPTIONS = {"fixed": {"cc": 0.3, "cg": 0.3, "gg": 0.4}}


@pytest.mark.parametrize("name", names(POLICY_KIND))
@pytest.mark.parametrize("path", ["whole_model", "expert_fn"])
def test_every_policy_stays_within_the_budget(models, name, path):
    """Resident rows plus staging never exceed the engine's budget, whether the placement is made
    for the whole model up front (HybridDecoder) or FFN by FFN as a plain Decoder meets them
    (expert_fn: the first layer's FFNs placed on first use, the others at run time); with no
    budget at all every FFN runs whole on the CPU, unplanned."""
    for kind in KINDS:
        src, ref = models[kind]
        cfg = src.config
        row_bytes = 3 * cfg.hidden * 4
        widths = ffn_widths(cfg)
        layer0 = sum(w for (i, _), w in widths.items() if i == 0) * row_bytes
        for budget in (2 * max(widths.values()) * row_bytes + layer0, sum(widths.values()) * row_bytes // 2, 0):
            p = make_policy(name, cost=REFERENCE_COST, hidden=cfg.hidden, num_layers=cfg.num_layers, dtype_bytes=4,
                            tile=16, **POLICY_OPTIONS.get(name, {}))
            with HybridEngine(p, cfg.hidden, gpu_mem_bytes=budget) as eng:
                if path == "whole_model":
                    out = HybridDecoder(src, eng).generate([PROMPT], N_NEW, return_logits=True)
                else:
                    out = Decoder(src, expert_fn=eng.expert_fn).generate([PROMPT], N_NEW, return_logits=True)
            _assert_same(out, ref)
            assert eng.resident_bytes + eng.placement.staging_bytes <= budget, (kind, budget)
            if not budget:
                assert {(e.band, e.rows) for e in eng.events} == {("cc", w) for w in widths.values()}


def test_budget_below_staging_disables_cg(models):
    src, ref = models["llama"]
    p = make_policy("scheinfer", cost=REFERENCE_COST, hidden=64, num_layers=2, dtype_bytes=4, tile=16)
    out, eng = _run(src, p, gpu_mem=1000)
    _assert_same(out, ref)
    assert eng.cg_max == 0 and eng.resident_bytes == 0 and {e.band for e in eng.events} == {"cc"}


def test_a_layer_without_a_gpu_part_is_not_planned_and_runs_the_serial_path(models, monkeypatch):
    """No staging buffer and no resident row: the policy is not asked for a plan (its one valid
    answer is every FFN whole on the CPU), and the layer runs the serial path all the same."""
    src, ref = models["mixtral"]
    policy = FixedPolicy(0.3, 0.3, 0.4)
    monkeypatch.setattr(policy, "plan", lambda *a: pytest.fail("planned a layer with no GPU part"))
    serial, run_serial = [], HybridEngine._run_serial
    monkeypatch.setattr(HybridEngine, "_run_serial", lambda self, work: serial.append(len(work)) or run_serial(self, work))
    out, eng = _run(src, policy, gpu_mem=0)
    _assert_same(out, ref)
    assert eng.cg_max == 0 and eng.resident_bytes == 0 and serial
    assert {e.band for e in eng.events} == {"cc"}


def test_bad_options():
    with pytest.raises(ConfigError, match=r"policy='magic' is not allowed; expected one of fiddler, fixed, layers"):
        make_policy("magic", cost=REFERENCE_COST, hidden=8, num_layers=1, dtype_bytes=4)
    for name in ("scheinfer", "fiddler"):
        with pytest.raises(ConfigError, match=f"policy='{name}' needs a cost model"):
            make_policy(name, cost=None, hidden=8, num_layers=1, dtype_bytes=4)
    with pytest.raises(ConfigError, match="fixed fractions"):
        FixedPolicy(0.5, 0.6, 0)
    with pytest.raises(ConfigError, match="gpu_mem_bytes"):
        HybridEngine(FixedPolicy(1, 0, 0), 8, gpu_mem_bytes=-1)
    with pytest.raises(ConfigError, match="assign"):
        make_policy("scheinfer", cost=REFERENCE_COST, hidden=8, num_layers=1, dtype_bytes=4, assign="x")


def test_calibrate_fits_a_usable_cost_model():
    from impl.scheinfer.calibrate import calibrate
    from impl.scheinfer.partition import optimal_split
    c = calibrate(hidden=32, widths=(32, 64, 128), rows=(1, 8), reps=2, copy_sizes=(1 << 12, 1 << 14, 1 << 16))
    assert set(c.fits) >= {"cpu_n1", "cpu_n8", "gpu_n1", "h2d"}
    assert all(f.n == 3 and f.r2 <= 1 for f in c.fits.values())
    assert c.cost.h2d_bytes_per_s > 0 and c.mem_bytes_per_s > 0
    assert c.gpu_emulated == (not torch.cuda.is_available())
    assert c.cost.source.startswith("calibrated:")
    s = optimal_split(c.cost, 4, 32, 128, 32, 16, 4)
    assert s.width == 128 and s.gg == 32
    assert "cost" in c.as_dict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lanes_match_reference(models):
    src, ref = models["mixtral"]
    out, eng = _run(src, FixedPolicy(0.3, 0.3, 0.4))
    assert eng.cuda
    _assert_same(out, ref)


def test_switch_interval_short_while_any_engine_is_open_and_restored_after():
    import sys
    from impl.scheinfer.engine import LANE_SWITCH_INTERVAL_S
    before = sys.getswitchinterval()
    a = HybridEngine(FixedPolicy(1, 0, 0), 8, device="cpu")
    b = HybridEngine(FixedPolicy(1, 0, 0), 8, device="cpu")
    try:
        assert sys.getswitchinterval() == pytest.approx(min(before, LANE_SWITCH_INTERVAL_S))
        a.close()
        a.close()                                   # idempotent: b still open
        assert sys.getswitchinterval() == pytest.approx(min(before, LANE_SWITCH_INTERVAL_S))
    finally:
        b.close()
    assert sys.getswitchinterval() == before


# ------------------------------------------------------------------------- a failing lane

class InjectedFault(RuntimeError):
    """Stands for a lane's real failure, e.g. CUDA running out of memory."""


def _generate_in_thread(engine, src, prompt, timeout=60):
    """Generate and close in a thread joined with a timeout: a hang fails the test instead of
    blocking it. Returns (outcome, thread)."""
    outcome = {}

    def body():
        try:
            outcome["out"] = HybridDecoder(src, engine).generate([prompt], N_NEW, return_logits=True)
        except BaseException as e:
            outcome["error"] = e
        finally:
            engine.close()
            outcome["closed"] = True

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    return outcome, t


# (lane, band) that fails first, in the first prefill layer. Prefill routes the 10 prompt tokens
# to more experts than there are staging buffers, so the copy lane waits for a buffer the GPU lane
# would give back, and the GPU lane waits for copies: a failure of either must free the other.
FAULTS = [("cpu", "cc"), ("h2d", "cg"), ("gpu", "gg"), ("gpu", "cg")]


@pytest.mark.parametrize("lane,band", FAULTS, ids=[f"{l}-{b}" for l, b in FAULTS])
def test_failing_lane_surfaces_once_in_the_caller_and_engine_closes(models, monkeypatch, lane, band):
    src, _ = models["mixtral"]
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", lambda args: uncaught.append(args))
    failures = []

    def hook(l, b):
        if (l, b) == (lane, band) and not failures:
            failures.append(InjectedFault(f"injected on the {l} lane ({b})"))
            raise failures[0]
    engine = HybridEngine(FixedPolicy(0.3, 0.3, 0.4), src.config.hidden, gpu_mem_bytes=BIG, lane_hook=hook)
    outcome, t = _generate_in_thread(engine, src, PROMPT)
    assert not t.is_alive(), "generation or close() hung after a lane failed"
    assert outcome["closed"] and outcome["error"] is failures[0]      # the lane's own error, once
    assert not uncaught                                                  # nothing left to a lane thread
    assert not any(lane._thread.is_alive() for lane in engine._lanes.values())


@pytest.mark.parametrize("lane,band", [("gpu", "gg"), ("h2d", "cg")])
def test_engine_runs_on_after_a_failed_layer(models, lane, band):
    """A failed layer gives its staging buffers back: the same engine then generates the
    reference's tokens (with leaked buffers the copy lane would wait forever)."""
    src, ref = models["mixtral"]
    armed = [True]

    def hook(l, b):
        if armed[0] and (l, b) == (lane, band):
            armed[0] = False
            raise InjectedFault("once")
    engine = HybridEngine(FixedPolicy(0.3, 0.3, 0.4), src.config.hidden, gpu_mem_bytes=BIG, lane_hook=hook)
    dec = HybridDecoder(src, engine)
    with pytest.raises(InjectedFault):
        dec.generate([PROMPT], N_NEW)
    outcome, t = _generate_in_thread(engine, src, PROMPT)
    assert not t.is_alive()
    _assert_same(outcome["out"], ref)


def test_close_is_idempotent_and_cancels_a_running_layer(models):
    """close() from another thread while a lane waits: the caller gets a LaneCancelled error
    promptly, and further calls fail with one clear line."""
    from impl.scheinfer.engine import LaneCancelled
    src, _ = models["mixtral"]
    entered, release = threading.Event(), threading.Event()

    def hook(l, b):
        if (l, b) == ("gpu", "gg") and not entered.is_set():
            entered.set()
            release.wait(30)                   # the GPU lane is busy; the copy lane fills the buffers
    engine = HybridEngine(FixedPolicy(0.3, 0.3, 0.4), src.config.hidden, gpu_mem_bytes=BIG, lane_hook=hook)
    dec = HybridDecoder(src, engine)
    outcome = {}

    def body():
        try:
            dec.generate([PROMPT], N_NEW)
        except BaseException as e:
            outcome["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    assert entered.wait(30)
    run = engine._active_run
    closer = threading.Thread(target=engine.close, daemon=True)
    closer.start()
    deadline = time.monotonic() + 30
    while run.error is None and time.monotonic() < deadline:    # close() has cancelled the layer
        time.sleep(0.01)
    release.set()
    closer.join(30)
    t.join(30)
    assert not closer.is_alive() and not t.is_alive()
    assert isinstance(outcome["error"], LaneCancelled)
    engine.close()                                   # idempotent
    with pytest.raises(RuntimeError, match="HybridEngine is closed"):
        engine.run_layer(0, [], 0)
