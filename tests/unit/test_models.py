"""Model configurations: names, published parameter totals, tiny variants keep the routing
structure, gates build from the configs, and bad configs fail naming the field."""
import dataclasses

import pytest
import torch

from impl.common.config import ConfigError
from impl.common.models import MODELS_DIR, ModelConfig, get_model, list_models, load_model_file
from impl.common.routing import GateConfig, build_gate

BASE_NAMES = ["deepseek-v3", "deepseek-v3-half6", "qwen3-30b-a3b", "qwen3-30b-a3b-32l", "mixtral-8x7b",
              "mixtral-8x22b", "gpt2-xl-moe", "llama2-7b", "llama2-13b", "llama2-70b",
              "qwen1.5-moe-a2.7b", "qwen2-57b-a14b", "phi-3.5-moe"]

# Published (total, active) parameters, main model only. Sources: Mixtral paper (arXiv 2401.04088);
# mistral.ai Mixtral-8x22B announcement; DeepSeek-V3 report (arXiv 2412.19437, without the MTP
# module); the Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B and Phi-3.5-MoE model cards;
# LLaMA-2 (HF safetensors totals 6.74B / 13.0B / 69.0B, as in scheinfer.md 6.2).
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "mixtral-8x22b": (141e9, 39e9),
    "deepseek-v3": (671e9, 37e9),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9),
    "qwen2-57b-a14b": (57e9, 14e9),
    "phi-3.5-moe": (41.9e9, 6.6e9),
    "llama2-7b": (6.74e9, 6.74e9),
    "llama2-13b": (13.0e9, 13.0e9),
    "llama2-70b": (69.0e9, 69.0e9),
}
TOLERANCE = 0.03  # published figures are rounded and count e.g. the LM head inconsistently

# Exact totals of the HF checkpoints (sum of tensor sizes) where the architecture is fully modelled.
EXACT_TOTALS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "mixtral-8x7b": 46_702_792_704,
}


def test_all_names_and_tiny_variants_exist():
    names = set(list_models())
    for n in BASE_NAMES:
        assert n in names and n + "-tiny" in names
        assert get_model(n).name == n


def test_unknown_name_is_value_error_listing_allowed():
    with pytest.raises(ValueError) as e:
        get_model("mixtral-8x9b")
    msg = str(e.value)
    assert "'mixtral-8x9b'" in msg and "mixtral-8x7b" in msg and "llama2-70b-tiny" in msg


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    total, active = get_model(name).param_counts()
    pub_total, pub_active = PUBLISHED[name]
    assert abs(total / pub_total - 1) < TOLERANCE, (total, pub_total)
    assert abs(active / pub_active - 1) < TOLERANCE, (active, pub_active)


@pytest.mark.parametrize("name", sorted(EXACT_TOTALS))
def test_param_counts_exact_for_hf_checkpoints(name):
    assert get_model(name).param_counts()[0] == EXACT_TOTALS[name]


def test_gpt2_xl_dense_equivalent_is_gpt2_xl():
    dense = dataclasses.replace(get_model("gpt2-xl-moe"), num_experts=0, top_k=0, capacity_factor=None)
    total, active = dense.param_counts()
    assert total == active == 1_557_611_200  # openai-community/gpt2-xl


def test_param_breakdown_sums_and_dense_models_have_total_equal_active():
    for name in list_models():
        m = get_model(name)
        total, active = m.param_counts()
        assert sum(m.param_breakdown().values()) == total
        assert 0 < active <= total
        assert (active == total) == (not m.is_moe)


def test_paper_variants():
    full, half = get_model("deepseek-v3"), get_model("deepseek-v3-half6")
    assert (half.hidden, half.ffn_hidden, half.moe_ffn_hidden, half.num_layers) == (3584, 9216, 1024, 6)
    assert (half.num_experts, half.top_k, half.num_shared_experts) == (256, 8, 1)
    assert full.moe_layers == tuple(range(3, 61)) and full.num_dense_layers == 3
    q, q32 = get_model("qwen3-30b-a3b"), get_model("qwen3-30b-a3b-32l")
    assert q32.num_layers == 32 and dataclasses.replace(q32, name=q.name, num_layers=48, source=q.source) == q
    assert (q.hidden, q.num_experts, q.top_k, q.moe_ffn_hidden) == (2048, 128, 8, 768)


STRUCTURE = ("top_k", "num_shared_experts", "shared_expert_gate", "gate_kind", "normalize_topk", "ffn_kind",
             "activation", "mlp_bias", "n_group", "topk_group", "routed_scaling_factor", "capacity_factor",
             "family", "norm_kind", "tie_word_embeddings")


@pytest.mark.parametrize("name", BASE_NAMES)
def test_tiny_keeps_structure(name):
    m, t = get_model(name), get_model(name + "-tiny")
    for f in STRUCTURE:
        assert getattr(t, f) == getattr(m, f), f
    assert t.is_mla == m.is_mla and (t.num_kv_heads < t.num_heads) == (m.num_kv_heads < m.num_heads)
    assert t.num_layers == 2 and t.hidden <= 64 and t.vocab_size <= 1024
    assert (t.num_dense_layers > 0) == (m.num_dense_layers > 0) and (t.num_moe_layers > 0) == m.is_moe
    if m.num_experts <= 64:
        assert t.num_experts == m.num_experts
    else:
        assert t.top_k <= t.num_experts < m.num_experts
    assert t.param_counts()[0] < 2_000_000


@pytest.mark.parametrize("name", [n for n in BASE_NAMES if get_model(n).is_moe])
def test_tiny_gate_and_experts_build_and_route(name):
    from impl.common.experts import GroupedExperts

    t = get_model(name + "-tiny")
    cfg = t.gate_config()
    assert isinstance(cfg, GateConfig) and cfg.kind == t.gate_kind and cfg.top_k == t.top_k
    gate = build_gate(cfg, t.hidden, t.num_experts).eval()
    r = gate(torch.randn(16, t.hidden, generator=torch.Generator().manual_seed(0)))
    assert r.routing_map_TE.shape == (16, t.num_experts)
    if t.capacity_factor is None:
        assert (r.routing_map_TE.sum(dim=1) == t.top_k).all()
    experts = GroupedExperts(2, **t.expert_kwargs())
    assert experts(torch.randn(5, t.hidden), [3, 2]).shape == (5, t.hidden)


def test_gate_config_fields_and_overrides():
    d = get_model("deepseek-v3").gate_config()
    assert (d.kind, d.top_k, d.n_group, d.topk_group, d.routed_scaling_factor, d.normalize_topk) == \
        ("deepseek_v3", 8, 8, 4, 2.5, True)
    g = get_model("gpt2-xl-moe").gate_config(aux_loss_coeff=0.01)
    assert (g.kind, g.capacity_factor, g.aux_loss_coeff) == ("gshard", 1.2, 0.01)
    assert get_model("qwen1.5-moe-a2.7b").gate_config().normalize_topk is False
    with pytest.raises(ValueError, match="dense"):
        get_model("llama2-7b").gate_config()


def test_every_yaml_cites_a_source():
    for name in list_models():
        assert len(get_model(name).source) > 20, name
    for f in MODELS_DIR.glob("*.yaml"):
        assert "huggingface.co" in f.read_text() or "arXiv" in f.read_text(), f


def _mixtral(**kw):
    base = dataclasses.asdict(get_model("mixtral-8x7b-tiny"))
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw, field", [
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(hidden=0), "hidden"),
    (dict(moe_ffn_hidden=0), "moe_ffn_hidden"),
    (dict(ffn_kind="geglu"), "ffn_kind"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(gate_kind="nope"), "gate_kind"),
    (dict(activation="gelu"), "activation"),
    (dict(first_k_dense_layers=3), "first_k_dense_layers"),
    (dict(n_group=2), "n_group"),
    (dict(num_experts=0), "top_k"),
])
def test_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        _mixtral(**kw)


def test_deepseek_group_checks():
    base = dataclasses.asdict(get_model("deepseek-v3-tiny"))
    with pytest.raises(ConfigError, match="n_group"):
        ModelConfig(**{**base, "n_group": 5})
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig(**{**base, "topk_group": 1})  # 1 group of 4 experts cannot hold top-8


def test_switch_gate_needs_top1():
    with pytest.raises(ConfigError, match="top_k"):
        _mixtral(gate_kind="switch", normalize_topk=None)
    assert _mixtral(gate_kind="switch", normalize_topk=None, top_k=1).gate_config().kind == "switch"


def test_yaml_errors(tmp_path):
    src = (MODELS_DIR / "mixtral-8x7b.yaml").read_text()
    bad = tmp_path / "other-name.yaml"
    bad.write_text(src)
    with pytest.raises(ConfigError, match="file name"):
        load_model_file(bad)
    typo = tmp_path / "mixtral-8x7b.yaml"
    typo.write_text(src.replace("top_k: 2", "topk: 2"))
    with pytest.raises(ConfigError, match="unknown key 'topk'"):
        load_model_file(typo)
    typo.write_text(src.replace("ffn_kind: swiglu", "ffn_kind: moe"))
    with pytest.raises(ConfigError, match="ffn_kind"):
        load_model_file(typo)
    no_tiny = src[:src.index("tiny:")]
    typo.write_text(no_tiny)
    with pytest.raises(ConfigError, match="tiny"):
        load_model_file(typo)
    good = tmp_path / "good"
    good.mkdir()
    (good / "mixtral-8x7b.yaml").write_text(src)
    assert get_model("mixtral-8x7b-tiny", models_dir=good) == get_model("mixtral-8x7b-tiny")
    assert list_models(good) == ["mixtral-8x7b", "mixtral-8x7b-tiny"]
