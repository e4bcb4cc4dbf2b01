"""ScheInfer's sim tier: config errors before work, the sim's times equal the cost model evaluated
by hand, placement equals the engine's, and ScheInfer never loses to its own CC+GG / CG+GG
extremes."""
import dataclasses
import math

import pytest
import torch

from impl.common.config import ConfigError, build_config
from impl.experiments.scheinfer import sim
from impl.experiments.scheinfer.sim import SimConfig, resolve
from impl.scheinfer.engine import HybridEngine
from impl.scheinfer.generate_models import tiny_config
from impl.scheinfer.partition import REFERENCE_COST, Split, lane_times, optimal_split
from impl.common.registry import names
from impl.scheinfer.policy import POLICY_KIND, make_policy, place

HW = "rtx4090-pcie4-16core"


def _resolve(*overrides):
    return resolve(build_config(SimConfig, None, list(overrides)))


@pytest.mark.parametrize("override, message", [
    ("policies=[layers, vllm]", "policies: 'vllm' is not allowed; allowed: layers, fiddler, scheinfer"),
    ("hardware=[a100]", "hardware: 'a100' is not allowed; allowed: rtx4090-pcie4-16core"),
    ("prompt_tokens=0", "prompt_tokens: 0 is not allowed; allowed: 1..1048576"),
    ("routing=zipf", "routing: 'zipf' is not allowed; allowed: 'gate', 'uniform'"),
    ("promt_tokens=5", "promt_tokens"),
    ("models=[gpt5]", "models: 'gpt5'"),
    ("hardware_file=/nonexistent.yaml", "hardware_file: '/nonexistent.yaml' is not a file"),
])
def test_bad_config_is_one_line_error(override, message):
    with pytest.raises(ConfigError) as e:
        _resolve(override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_fails_before_work_with_exit_2(tmp_path, capsys):
    rc = sim.main(["--set", "decode_tokens=-1", "--out-csv", str(tmp_path / "a.csv"),
                        "--out-record", str(tmp_path / "a.json")])
    assert rc == 2 and "decode_tokens: -1 is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "a.csv").exists()


def test_bad_hardware_value(tmp_path):
    bad = tmp_path / "hw.yaml"
    bad.write_text("x: {gpu_mem_bytes: 1.0e+9, gpu_reserve_bytes: 0, gpu_flops: 0, gpu_bytes_per_s: 1, "
                   "cpu_flops: 1, cpu_bytes_per_s: 1, h2d_bytes_per_s: 1}\n")
    with pytest.raises(ConfigError, match=r"gpu_flops=0 is not allowed; expected a number > 0"):
        _resolve(f"hardware_file={bad}", "hardware=[x]")


def test_placement_equals_the_engine():
    """The sim's placement of every policy (at a GPU budget for half the FFN weights) is the
    engine's, buffers and resident rows alike."""
    cfg = tiny_config("mixtral")
    sc = SimConfig(models=("mixtral-8x7b-tiny",), hardware=(HW,), prompt_tokens=4, decode_tokens=1, tile=16,
                   dtype_bytes=4)
    hw = resolve(sc).hardware[HW]
    model = sim.setup_model(cfg, sim.make_routing(cfg, 4, 1, "uniform", 0))
    half = sum(sim.ffn_widths(cfg).values()) * 3 * cfg.hidden * 4 // 2
    for p in ("scheinfer", "fiddler", "layers"):
        overhead = hw.gpu_mem_bytes - sim.setup_case(model, hw, p, sc).budget_bytes
        st = sim.setup_case(model, dataclasses.replace(hw, gpu_mem_bytes=overhead + half), p, sc)
        assert st.budget_bytes == half
        policy = st.policy
        with HybridEngine(policy, cfg.hidden, torch.float32, st.budget_bytes, device="cpu") as engine:
            assert engine.place(st.widths) == st.gg and engine.cg_max == st.cg_max > 0, p
            assert 0 < engine.placement.resident_bytes + engine.placement.staging_bytes <= half
            assert engine.placement == place(policy, st.widths, cfg.hidden, 4, half)


# every registered policy and every system of the sim; a registered policy the sim does not run is
# built with these options
POLICY_OPTIONS = {"fixed": {"cc": 0.3, "cg": 0.3, "gg": 0.4}}


@pytest.mark.parametrize("name", sorted(set(names(POLICY_KIND)) | set(sim.SYSTEMS)))
def test_the_sims_placement_is_the_policys_own_plan_at_every_budget(name):
    """Whatever the policy, the sim places what the policy itself plans (`Policy.place_head`, then
    the engine's `place`), from a card with no memory to one that holds everything, and under a
    bench's FFN budget: the output head first where the policy counts it (llama.cpp's), whole
    layers, with the token embeddings on the CPU, where it holds whole layers (`whole_layers`)."""
    cfg = tiny_config("mixtral")
    sc = SimConfig(prompt_tokens=4, decode_tokens=2, dtype_bytes=4, tile=16)
    model = sim.setup_model(cfg, sim.make_routing(cfg, 4, 2, "gate", 0))
    hw0 = resolve(SimConfig(hardware=(HW,), models=("mixtral-8x7b-tiny",))).hardware[HW]

    def build(ffn_budget_bytes=None):
        if name in sim.SYSTEMS:
            return sim.case_policy(model, name, sim.cost_model(hw0, 4), sc, ffn_budget_bytes)
        return make_policy(name, cost=REFERENCE_COST, hidden=cfg.hidden, num_layers=cfg.num_layers, dtype_bytes=4,
                           tile=sc.tile, **POLICY_OPTIONS[name])

    widths, row_bytes = model.widths, 3 * cfg.hidden * 4
    ffn = sum(widths.values()) * row_bytes
    everything = (hw0.gpu_reserve_bytes + model.nonffn_params * 4 + ffn
                  + 2 * cfg.num_kv_heads * cfg.head_dim * 4 * 6 * cfg.num_layers + 2 * max(widths.values()) * row_bytes)
    cases = [(dataclasses.replace(hw0, gpu_mem_bytes=m), None) for m in (0, everything * 0.3, everything * 0.7, everything)]
    cases += [(hw0, b) for b in (0, ffn // 2, ffn + 2 * max(widths.values()) * row_bytes)]
    for hw, ffn_budget in cases:
        policy = build(ffn_budget)
        st = sim.setup_case(model, hw, policy, sc, ffn_budget)
        on_gpu, left = policy.place_head(st.budget_bytes)
        own = place(policy, widths, cfg.hidden, 4, left)
        assert (st.policy, st.head_on_gpu, st.gg, st.cg_max) == (policy, on_gpu, dict(own.gg), own.cg_max)
        if policy.whole_layers:
            assert st.gpu_layers == set(policy.gpu_layers(widths, cfg.hidden, 4, left - own.staging_bytes))
        assert st.gpu_layers == set(range(cfg.num_layers)) or policy.whole_layers
        assert st.embed_on_gpu != policy.whole_layers
        if name in sim.SYSTEMS:                        # by name, the sim builds the very same policy
            by_name = sim.setup_case(model, hw, name, sc, ffn_budget)
            assert (by_name.gg, by_name.cg_max, by_name.head_on_gpu, by_name.gpu_layers, by_name.budget_bytes) == \
                (st.gg, st.cg_max, st.head_on_gpu, st.gpu_layers, st.budget_bytes)
    policy = build()
    nothing = sim.setup_case(model, dataclasses.replace(hw0, gpu_mem_bytes=0), policy, sc)
    assert (nothing.budget_bytes, nothing.cg_max, sum(nothing.gg.values())) == (0, 0, 0)
    assert nothing.head_on_gpu != policy.whole_layers       # llama.cpp's -ngl 0: not even the head
    assert nothing.gpu_layers == (frozenset() if policy.whole_layers else set(range(cfg.num_layers)))
    fits = sim.setup_case(model, dataclasses.replace(hw0, gpu_mem_bytes=everything), policy, sc)
    assert fits.gg == policy.resident(widths, cfg.hidden, 4, 10 ** 15) and fits.cg_max == max(widths.values())
    assert fits.head_on_gpu and fits.gpu_layers == set(range(cfg.num_layers))


def test_predicting_a_bench_places_within_its_budget_and_runs_each_prompt():
    """`predict_bench`: the bench's FFN budget (not the card's) bounds the resident rows, as in the
    engine; every policy, prompt length and phase has a row; no budget leaves nothing resident."""
    cfg = tiny_config("mixtral")
    hw = resolve(SimConfig(hardware=(HW,), models=("mixtral-8x7b-tiny",))).hardware[HW]
    half = sum(sim.ffn_widths(cfg).values()) * 3 * cfg.hidden * 4 // 2
    frame = sim.predict_bench(cfg, hw, half, [4, 8], 2)
    assert len(frame) == 2 * 2 * 3 and set(frame.policy) == {"scheinfer", "fiddler"}
    assert (frame.tokens_per_s > 0).all() and (frame[frame.policy == "fiddler"].gg_frac > 0).all()
    model = sim.setup_model(cfg, sim.make_routing(cfg, 4, 2, "gate", 0))
    sc = SimConfig(prompt_tokens=4, decode_tokens=2, dtype_bytes=4)
    st = sim.setup_case(model, hw, "scheinfer", sc, ffn_budget_bytes=half)
    assert st.budget_bytes == half
    none = sim.predict_bench(cfg, hw, 0, [4], 2)
    assert (none.gg_frac == 0).all()


def _case(policy, model="mixtral-8x7b", **kw):
    sc = SimConfig(models=(model,), hardware=(HW,), policies=(policy,), prompt_tokens=64, decode_tokens=3,
                   routing="uniform", **kw)
    rz = resolve(sc)
    cfg = rz.models[model]
    routing = sim.make_routing(cfg, sc.prompt_tokens, sc.decode_tokens, sc.routing, sc.seed)
    st = sim.setup_case(sim.setup_model(cfg, routing, model), rz.hardware[HW], policy, sc)
    return sc, cfg, st, {r["phase"]: r for r in sim.simulate_case(st, sc)}


@pytest.mark.parametrize("policy", ["scheinfer", "layers", "fiddler"])
def test_sim_time_equals_cost_model_by_hand(policy):
    sc, cfg, st, rows = _case(policy)
    b, M, E, K, n = sc.dtype_bytes, cfg.hidden, cfg.num_experts, cfg.top_k, sc.prompt_tokens
    assert rows["prefill"]["tokens"] == n
    expected = 0.0
    for i in range(cfg.num_layers):               # uniform routing: n*K/E tokens for each expert
        keys = [(i, e) for e in range(E)]
        counts = [n * K // E] * E
        gg = [st.gg[k] for k in keys]
        width = cfg.moe_ffn_hidden
        if policy == "scheinfer":
            splits = [optimal_split(st.cost, c, M, width, g, sc.tile, b, st.cg_max) for c, g in zip(counts, gg)]
        elif policy == "layers":                  # n >= 32: CPU-resident layers are copied to the GPU
            splits = [Split(0, width - g, g) for g in gg]
        else:
            splits = [Split(0, 0, width) if g == width else
                      Split(width, 0, 0) if st.policy.on_cpu(c, width) else Split(0, width, 0)
                      for c, g in zip(counts, gg)]
        t = [lane_times(st.cost, c, M, s, b) for c, s in zip(counts, splits)]
        if policy == "scheinfer":                 # the three lanes overlap
            last_cg = next((lane_times(st.cost, c, M, Split(0, s.cg, 0), b).gpu
                            for c, s in zip(reversed(counts), reversed(splits)) if s.cg), 0.0)
            expected += max(sum(x.cpu for x in t), sum(x.gpu for x in t), sum(x.h2d for x in t) + last_cg)
        else:                                     # one part after another
            expected += sum(x.cpu + x.h2d + x.gpu for x in t)
    assert math.isclose(rows["prefill"]["ffn_s"], expected, rel_tol=1e-12)
    total = rows["prefill"]["ffn_s"] + rows["prefill"]["nonffn_s"] + rows["prefill"]["act_s"]
    assert math.isclose(rows["prefill"]["time_s"], total)
    assert math.isclose(rows["overall"]["time_s"], rows["prefill"]["time_s"] + rows["decode"]["time_s"])
    assert math.isclose(rows["decode"]["tokens_per_s"], 3 / rows["decode"]["time_s"])


@pytest.mark.parametrize("routing", ["uniform", "gate"])
def test_scheinfer_never_slower_than_its_extremes(routing):
    frame = sim.run(_resolve(f"routing={routing}", "prompt_tokens=48", "decode_tokens=2",
                                  "policies=[scheinfer, cc-only, cg-only]",
                                  "hardware=[rtx4090-pcie4-16core, rtx3090-pcie3-8core]"))
    wide = frame.pivot_table(index=["hardware", "model", "phase"], columns="policy", values="time_s")
    assert len(wide) == 5 * 2 * 3
    assert (wide["scheinfer"] <= wide["cc-only"] * (1 + 1e-12)).all()
    assert (wide["scheinfer"] <= wide["cg-only"] * (1 + 1e-12)).all()


def test_makespan_assignment_is_never_slower_per_layer():
    """With assign=makespan the extremes are among the candidates of every layer: a theorem."""
    _, _, st, _ = _case("scheinfer", "qwen1.5-moe-a2.7b", assign="makespan")
    for phase, n in (("prefill", 64), ("decode", 1)):
        for i in range(st.cfg.num_layers):
            loads = sim._loads(st, i, phase, n, 0)
            ours = sim.ffn_time(st.policy, st.cost, loads, st.policy.plan(i, loads, phase, n, st.cg_max),
                                     st.cfg.hidden, 2)
            for band in ("cc", "cg"):
                other = sim._BandOnlyPolicy(band, st.cost, st.cfg.hidden, 2, 128)
                t = sim.ffn_time(other, st.cost, loads, other.plan(i, loads, phase, n, st.cg_max),
                                      st.cfg.hidden, 2)
                assert ours <= t * (1 + 1e-12)


def test_popularity_counts_the_shared_expert_with_every_token():
    """A shared expert processes every token of its layer: its popularity is the layer's token
    count (prefill + decode), in the sim's routing and as a Decoder's route observer; Fiddler's
    residency (by popularity) then keeps it on the GPU first."""
    from impl.scheinfer.decoder import Decoder
    from impl.scheinfer.generate_models import random_source
    from impl.scheinfer.policy import PopularityCounter, make_policy, profile_popularity
    cfg = tiny_config("qwen2_moe")
    assert cfg.shared_expert_ffn_hidden
    routing = sim.make_routing(cfg, 6, 3, "gate", 0)
    pop = routing.popularity()
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    for i in moe_layers:
        assert pop[(i, "shared")] == 6 + 3
        assert sum(v for (j, e), v in pop.items() if j == i and e != "shared") == (6 + 3) * cfg.top_k
    counter = PopularityCounter.for_config(cfg)
    Decoder(random_source(cfg, seed=1), route_observer=counter).generate([[1, 5, 9, 33]], 3)
    for i in moe_layers:                      # 4 prompt tokens + 2 decode steps (the 3rd token needs none)
        assert counter.counts[(i, "shared")] == 6
        assert sum(v for (j, e), v in counter.counts.items() if j == i and e != "shared") == 6 * cfg.top_k
    assert not any(e == "shared" for _, e in PopularityCounter.for_config(tiny_config("mixtral")).counts)
    own = PopularityCounter.for_config(cfg)          # an offline profile: one prefill, the observer kept
    dec = Decoder(random_source(cfg, seed=1), route_observer=own)
    profiled = profile_popularity(dec, [1, 5, 9, 33])
    assert dec.route_observer is own and not own.counts
    assert all(profiled[(i, "shared")] == 4 for i in moe_layers)
    assert sum(profiled.values()) == len(moe_layers) * 4 * (cfg.top_k + 1)
    widths = sim.ffn_widths(cfg)
    row_bytes = 3 * cfg.hidden * 2
    fiddler = make_policy("fiddler", cost=REFERENCE_COST, hidden=cfg.hidden, num_layers=cfg.num_layers,
                          dtype_bytes=2, popularity=pop)
    gg = fiddler.resident(widths, cfg.hidden, 2, cfg.shared_expert_ffn_hidden * row_bytes * len(moe_layers))
    assert {k for k, v in gg.items() if v} == {(i, "shared") for i in moe_layers}


def test_layers_placement_is_llamacpp_ngl_rule(tmp_path):
    """llama.cpp in the card's memory: -ngl N with N the most that fit, as `runner.gpu_weight_bytes`
    counts them in a GGUF of the same shape (the output head first, then the FFN and other weights
    of the last N - 1 layers, never the token embeddings), plus their KV cache and the staging
    buffer; one byte less and the last layer placed drops."""
    from baselines.llamacpp.runner import LlamaCppSettings, gpu_weight_bytes
    from impl.scheinfer.generate_models import generate
    cfg = tiny_config("mixtral")
    path = generate("mixtral", tmp_path / "m.gguf", dtype="f32", seed=0)
    sc = SimConfig(prompt_tokens=4, decode_tokens=2, dtype_bytes=4, tile=16, policies=("layers",))
    model = sim.setup_model(cfg, sim.make_routing(cfg, 4, 2, "uniform", 0))
    hw0 = resolve(SimConfig(hardware=(HW,), models=("mixtral-8x7b-tiny",))).hardware[HW]
    L = cfg.num_layers
    kv = 2 * cfg.num_kv_heads * cfg.head_dim * 4 * (4 + 2)
    staging = max(sim.ffn_widths(cfg).values()) * 3 * cfg.hidden * 4

    def on_gpu(N):
        return gpu_weight_bytes(path, LlamaCppSettings(n_gpu_layers=N))

    def need(N):
        g = on_gpu(N)
        return g["ffn"] + g["other"] + len(g["gpu_layers"]) * kv + staging
    for N in range(1, L + 2):
        for less in (0, 1):
            hw = dataclasses.replace(hw0, gpu_mem_bytes=hw0.gpu_reserve_bytes + need(N) - less)
            st = sim.setup_case(model, hw, "layers", sc)
            g = on_gpu(N - less if N > 1 else N)     # -ngl 1 less a byte: the head, no staging buffer
            assert sorted(st.gpu_layers) == g["gpu_layers"], (N, less)
            assert st.head_on_gpu == g["output_on_gpu"] and st.head_on_gpu and not st.embed_on_gpu, (N, less)


def test_layers_cpu_layers_run_attention_and_head_on_the_cpu():
    """No GPU memory for llama.cpp: in decode every layer's attention and the LM head run on the
    CPU (its roofline), and the hidden state never crosses PCIe; the other policies keep
    attention on the GPU."""
    sc = SimConfig(models=("llama2-7b",), hardware=(HW,), policies=("layers",), prompt_tokens=8, decode_tokens=2)
    rz = resolve(sc)
    cfg, hw0 = rz.models["llama2-7b"], rz.hardware[HW]
    hw = dataclasses.replace(hw0, gpu_mem_bytes=hw0.gpu_reserve_bytes)
    model = sim.setup_model(cfg, sim.make_routing(cfg, 8, 2, "gate", 0))
    st = sim.setup_case(model, hw, "layers", sc)
    assert not st.gpu_layers and not st.head_on_gpu
    rows = {r["phase"]: r for r in sim.simulate_case(st, sc)}
    b, p = 2, st.attn_params
    expected = 0.0
    for ctx in (9, 10):
        kv = 2 * cfg.num_kv_heads * cfg.head_dim * b * ctx
        sdpa = 4 * ctx * cfg.num_heads * cfg.head_dim
        layer = hw.cpu_alpha_s + max(2 * p / hw.cpu_flops, b * p / hw.cpu_bytes_per_s) + kv / hw.cpu_bytes_per_s \
            + sdpa / hw.cpu_flops
        expected += cfg.num_layers * layer + hw.cpu_alpha_s + b * cfg.vocab_size * cfg.hidden / hw.cpu_bytes_per_s
    assert math.isclose(rows["decode"]["nonffn_s"], expected, rel_tol=1e-12)
    assert rows["decode"]["act_s"] == 0
    other = sim.setup_case(model, hw, "scheinfer", sc)
    assert other.gpu_layers == frozenset(range(cfg.num_layers)) and other.head_on_gpu


def test_gg_readings_run_beside_the_headline(tmp_path):
    """'gg-popularity' / 'gg-uniform' are ScheInfer with its GG rows by that reading whatever the
    config's gg_mode (the headline 'scheinfer' follows gg_mode): each equals the headline run
    under its own gg_mode exactly, 'gg-popularity' runs on MoE models only, and where every FFN
    fits on the card both readings give the same rows and times."""
    keys = ["hardware", "model", "phase"]
    both = "policies=[scheinfer, gg-uniform, gg-popularity]"
    over = ["models=[qwen1.5-moe-a2.7b, llama2-7b]", "prompt_tokens=40", "decode_tokens=3", f"hardware=[{HW}]"]
    frames = {mode: sim.run(_resolve(*over, both, f"gg_mode={mode}")).set_index(keys) for mode in ("uniform", "popularity")}
    for mode, frame in frames.items():
        assert set(frame["policy"]) == {"scheinfer", "gg-uniform", "gg-popularity"}
        assert set(frame[frame["policy"] == "gg-popularity"].index.get_level_values("model")) == {"qwen1.5-moe-a2.7b"}
        assert (frame[frame["policy"] == "gg-popularity"]["system"] == "ScheInfer[GG popularity]").all()
        head = frame[frame["policy"] == "scheinfer"]
        same = frame[frame["policy"] == f"gg-{mode}"]
        assert (head["gg_mode"] == mode).all() and (same["gg_mode"] == mode).all()
        assert (same["time_s"] == head.loc[same.index, "time_s"]).all()
    qwen = frames["uniform"].xs("qwen1.5-moe-a2.7b", level="model").set_index("policy", append=True)["time_s"]
    assert (qwen.xs("gg-popularity", level="policy") != qwen.xs("scheinfer", level="policy")).any()

    big = tmp_path / "hw.yaml"                       # a card that holds every FFN of the model
    big.write_text("big: {gpu_mem_bytes: 1.0e+12, gpu_reserve_bytes: 0, gpu_flops: 1.0e+14, gpu_bytes_per_s: 1.0e+12, "
                   "cpu_flops: 1.0e+12, cpu_bytes_per_s: 6.0e+10, h2d_bytes_per_s: 2.5e+10}\n")
    fits = sim.run(_resolve("models=[qwen1.5-moe-a2.7b]", "prompt_tokens=40", "decode_tokens=3", f"hardware_file={big}",
                            "hardware=[big]", "policies=[scheinfer, gg-popularity]")).set_index(["phase", "policy"])
    assert (fits["resident_frac"] == 1).all() and (fits["gg_frac"] == 1).all() and (fits["gg_work_frac"] == 1).all()
    for col in ("time_s", "ffn_s", "nonffn_s", "act_s"):
        assert (fits.xs("scheinfer", level="policy")[col] == fits.xs("gg-popularity", level="policy")[col]).all()


def test_a_models_routing_popularity_and_widths_are_computed_once(monkeypatch):
    """`setup_model` once per model: every (hardware, policy) case of it shares its popularity and
    FFN widths, which `run` does not recount."""
    calls = []
    counted = sim.Routing.popularity
    monkeypatch.setattr(sim.Routing, "popularity", lambda self: calls.append(1) or counted(self))
    frame = sim.run(_resolve("models=[mixtral-8x7b-tiny, llama2-7b-tiny]", "prompt_tokens=8", "decode_tokens=2",
                             "policies=[layers, fiddler, scheinfer]",
                             "hardware=[rtx4090-pcie4-16core, rtx3090-pcie3-8core]"))
    assert len(calls) == 2 and len(frame) == 3 * (2 * 3 + 2 * 2)       # Fiddler on the MoE model only
