"""Model configurations (shapes only, no weights) of the models the reproduced papers train or serve.

Why: every experiment (routing traces, AlltoAll sizes, cost models, expert placement, offloading)
needs the same few numbers per model - hidden size, expert count, top-k, expert FFN width, gate
kind - and they must come from one checked place with a cited source rather than be retyped.

One YAML per base model lives in `workflows/config/models/<name>.yaml`:

    name: mixtral-8x7b            # == the file stem
    source: ...                   # where the numbers come from (HF config.json URL / paper section)
    <ModelConfig fields>
    variants:                     # optional: reduced models a paper trains, '<name>-<suffix>'
      <suffix>: {<field>: <value>, ..., source: ..., notes: ...}
    tiny: {<field>: <value>, ...} # required: '<name>-tiny' (and '<name>-<suffix>-tiny')

A tiny model keeps the structure that routing and dispatch depend on (E and K where E <= 64,
shared experts, gate kind and its options, FFN kind, dense-then-MoE layer layout) with tiny widths,
2 layers and a small vocabulary, so tests run the real code paths in milliseconds.

`get_model(name)` returns the validated, frozen `ModelConfig`; `list_models()` the names.
`ModelConfig.param_counts()` gives (total, active) parameters, checked in the tests against the
published totals; `ModelConfig.gate_config()` the `routing.GateConfig` of the model's gate.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, from_dict, load_yaml
from .routing.config import GATE_KINDS, GateConfig

__all__ = ["ModelConfig", "MODELS_DIR", "get_model", "list_models", "load_model_file", "FFN_KINDS"]

MODELS_DIR = Path(__file__).resolve().parents[2] / "workflows" / "config" / "models"
FFN_KINDS = ("gpt", "swiglu")
TINY_SUFFIX = "-tiny"

FfnKind = Literal["gpt", "swiglu"]
Activation = Literal["gelu", "relu", "silu"]
NormKind = Literal["rmsnorm", "layernorm"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of one decoder-only transformer, dense (num_experts = 0) or MoE.

    Attention: GQA/MHA with num_heads x head_dim queries and num_kv_heads x head_dim keys/values,
    or DeepSeek's MLA when kv_lora_rank > 0 (then q_lora_rank, qk_nope_head_dim, qk_rope_head_dim
    and v_head_dim describe it and head_dim = qk_nope_head_dim + qk_rope_head_dim).

    Layers: layer i (0-based) is an MoE layer iff num_experts > 0, i >= first_k_dense_layers and
    (i + 1) % moe_layer_freq == 0 (HF's decoder_sparse_step convention); other layers use a dense
    FFN of width ffn_hidden.

    MoE: num_experts routed experts of width moe_ffn_hidden, top_k per token, plus
    num_shared_experts always-on experts of width shared_expert_ffn_hidden (0 = moe_ffn_hidden;
    HF Qwen2-MoE fuses its shared experts into one wide expert, which is how it is written here),
    optionally scaled by a sigmoid shared_expert_gate. Gate options mirror routing.GateConfig.

    Bias / norm / embedding flags exist only so that parameter counts match the published totals.
    """

    name: str
    family: str
    source: str
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    ffn_hidden: int
    ffn_kind: FfnKind = "swiglu"
    activation: Activation = "silu"
    # --- MoE ---
    num_experts: int = 0
    top_k: int = 0
    moe_ffn_hidden: int = 0
    num_shared_experts: int = 0
    shared_expert_ffn_hidden: int = 0
    shared_expert_gate: bool = False
    first_k_dense_layers: int = 0
    moe_layer_freq: int = 1
    # --- gate (see routing.GateConfig) ---
    gate_kind: str = "softmax_topk"
    normalize_topk: bool | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = None
    # --- MLA (DeepSeek-V2/V3); kv_lora_rank = 0 means ordinary GQA/MHA ---
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # --- details that only affect parameter counts ---
    qkv_bias: bool = False
    out_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_kind: NormKind = "rmsnorm"
    tie_word_embeddings: bool = False
    learned_pos_embeddings: int = 0
    notes: str = ""

    def __post_init__(self):
        def fail(field: str, value, expected: str):
            raise ConfigError(f"ModelConfig {self.name!r}: {field}={value!r} is not allowed; expected {expected}")

        for f in ("hidden", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, f) < 1:
                fail(f, getattr(self, f), "an integer >= 1")
        for f in ("ffn_hidden", "moe_ffn_hidden", "num_shared_experts", "shared_expert_ffn_hidden",
                  "first_k_dense_layers", "learned_pos_embeddings", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_experts", "top_k"):
            if getattr(self, f) < 0:
                fail(f, getattr(self, f), "an integer >= 0")
        if self.ffn_kind not in FFN_KINDS:
            fail("ffn_kind", self.ffn_kind, "one of " + ", ".join(repr(k) for k in FFN_KINDS))
        if self.ffn_kind == "swiglu" and self.activation != "silu":
            fail("activation", self.activation, "'silu' for ffn_kind 'swiglu' (SwiGLU fixes its activation)")
        if self.ffn_kind == "swiglu" and self.mlp_bias:
            fail("mlp_bias", self.mlp_bias, "False for ffn_kind 'swiglu' (the expert FFNs have no bias)")
        if self.num_heads % self.num_kv_heads:
            fail("num_kv_heads", self.num_kv_heads, f"a divisor of num_heads={self.num_heads}")
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", self.moe_layer_freq, "an integer >= 1")
        if self.first_k_dense_layers > self.num_layers:
            fail("first_k_dense_layers", self.first_k_dense_layers, f"<= num_layers={self.num_layers}")
        if self.is_mla:
            for f in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, f) < 1:
                    fail(f, getattr(self, f), "an integer >= 1 when kv_lora_rank > 0 (MLA)")
            if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
                fail("head_dim", self.head_dim, f"qk_nope_head_dim + qk_rope_head_dim = "
                     f"{self.qk_nope_head_dim + self.qk_rope_head_dim} for MLA")
        elif self.q_lora_rank:
            fail("q_lora_rank", self.q_lora_rank, "0 unless kv_lora_rank > 0 (MLA)")
        if self.num_dense_layers and self.ffn_hidden < 1:
            fail("ffn_hidden", self.ffn_hidden, f"an integer >= 1 ({self.num_dense_layers} layers are dense)")
        if self.num_experts == 0:
            if self.top_k or self.num_shared_experts:
                fail("top_k" if self.top_k else "num_shared_experts",
                     self.top_k or self.num_shared_experts, "0 for a dense model (num_experts=0)")
            return
        if not 1 <= self.top_k <= self.num_experts:
            fail("top_k", self.top_k, f"an integer in 1..num_experts={self.num_experts}")
        if self.moe_ffn_hidden < 1:
            fail("moe_ffn_hidden", self.moe_ffn_hidden, "an integer >= 1 for an MoE model")
        if self.shared_expert_gate and not self.num_shared_experts:
            fail("shared_expert_gate", True, "False without shared experts")
        if self.gate_kind not in GATE_KINDS:
            fail("gate_kind", self.gate_kind, "one of " + ", ".join(repr(k) for k in sorted(GATE_KINDS)))
        if self.gate_kind == "deepseek_v3":
            if self.num_experts % self.n_group:
                fail("n_group", self.n_group, f"a divisor of num_experts={self.num_experts}")
            if self.top_k > self.topk_group * (self.num_experts // self.n_group):
                fail("topk_group", self.topk_group, f"enough groups of {self.num_experts // self.n_group} "
                     f"experts to hold top_k={self.top_k}")
        try:
            self.gate_config()
        except ConfigError as e:  # misplaced gate option, e.g. n_group on a softmax gate
            raise ConfigError(f"ModelConfig {self.name!r}: gate options do not fit gate_kind "
                              f"{self.gate_kind!r}: {e}") from None

    # ---------------------------------------------------------------- structure

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, layer: int) -> bool:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return (self.is_moe and layer >= self.first_k_dense_layers
                and (layer + 1) % self.moe_layer_freq == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def shared_ffn_hidden(self) -> int:
        """Width of each shared expert."""
        return self.shared_expert_ffn_hidden or self.moe_ffn_hidden

    def gate_config(self, **overrides: Any) -> GateConfig:
        """The routing.GateConfig of this model's gate; `overrides` set run options such as
        aux_loss_coeff or capacity_factor (papers state those per experiment, not per model)."""
        if not self.is_moe:
            raise ValueError(f"model {self.name!r} is dense (num_experts=0) and has no gate")
        kw: dict[str, Any] = dict(kind=self.gate_kind, top_k=self.top_k, capacity_factor=self.capacity_factor)
        if self.normalize_topk is not None:
            kw["normalize_topk"] = self.normalize_topk
        if self.gate_kind == "deepseek_v3":
            kw.update(n_group=self.n_group, topk_group=self.topk_group,
                      routed_scaling_factor=self.routed_scaling_factor)
        else:
            for f, default in (("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0)):
                if getattr(self, f) != default:
                    kw[f] = getattr(self, f)  # GateConfig rejects it with a message naming the kind
        kw.update(overrides)
        return GateConfig(**kw)

    def expert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of experts.GroupedExperts (besides num_local_experts) for the routed experts."""
        return dict(hidden=self.hidden, ffn_hidden=self.moe_ffn_hidden, kind=self.ffn_kind,
                    bias=self.mlp_bias, activation=self.activation)

    # ---------------------------------------------------------------- parameter counts

    def _ffn_params(self, width: int) -> int:
        M = self.hidden
        if self.ffn_kind == "swiglu":
            return 3 * M * width
        return 2 * M * width + ((width + M) if self.mlp_bias else 0)

    def _norm_params(self) -> int:
        return self.hidden * (2 if self.norm_kind == "layernorm" else 1)

    def _attention_params(self) -> int:
        M, H, Hk, D = self.hidden, self.num_heads, self.num_kv_heads, self.head_dim
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = M * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk  # down, norm, up
            else:
                q = M * H * qk
            kv = (M * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + H * self.v_head_dim * M
        q_out, kv_out = H * D, 2 * Hk * D
        p = M * (q_out + kv_out) + q_out * M
        if self.qkv_bias:
            p += q_out + kv_out
        if self.out_proj_bias:
            p += M
        if self.qk_norm:
            p += 2 * D
        return p

    def _gate_params(self) -> int:
        p = self.num_experts * self.hidden
        if self.gate_kind == "deepseek_v3":
            p += self.num_experts  # e_score_correction_bias, stored with the weights
        return p

    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts by part (whole model; MTP / vision heads excluded)."""
        L = self.num_layers
        moe_L, dense_L = self.num_moe_layers, self.num_dense_layers
        shared = self.num_shared_experts * self._ffn_params(self.shared_ffn_hidden)
        if self.shared_expert_gate:
            shared += self.hidden
        return {
            "embedding": self.vocab_size * self.hidden + self.learned_pos_embeddings * self.hidden,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * self.hidden,
            "attention": L * self._attention_params(),
            "norms": (2 * L + 1) * self._norm_params(),
            "dense_ffn": dense_L * self._ffn_params(self.ffn_hidden),
            "routed_experts": moe_L * self.num_experts * self._ffn_params(self.moe_ffn_hidden),
            "shared_experts": moe_L * shared,
            "gates": moe_L * self._gate_params() if self.is_moe else 0,
        }

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token). Active counts every parameter but the routed experts a token
        does not visit (top_k of num_experts), embeddings and LM head included, which is how the
        published 'activated parameters' figures (Mixtral 12.9B, DeepSeek-V3 37B) are stated."""
        b = self.param_breakdown()
        total = sum(b.values())
        inactive = 0
        if self.is_moe:
            inactive = self.num_moe_layers * (self.num_experts - self.top_k) * self._ffn_params(self.moe_ffn_hidden)
        return total, total - inactive


# -------------------------------------------------------------------- loading

def _tiny_name(name: str) -> str:
    return name + TINY_SUFFIX


def load_model_file(path: str | Path) -> dict[str, ModelConfig]:
    """All models one YAML defines: the base, each '<base>-<variant>', and a '-tiny' of each."""
    path = Path(path)
    data = load_yaml(path)
    variants = data.pop("variants", None) or {}
    tiny = data.pop("tiny", None)
    base_name = data.get("name")
    if base_name != path.stem:
        raise ConfigError(f"{path}: name {base_name!r} must equal the file name {path.stem!r}")
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ConfigError(f"{path}: 'variants' must map a suffix to a mapping of ModelConfig fields")
    if not isinstance(tiny, dict):
        raise ConfigError(f"{path}: a 'tiny' mapping of ModelConfig fields is required (the test variant)")
    full: dict[str, dict] = {base_name: data}
    for suffix, over in variants.items():
        if "name" in over:
            raise ConfigError(f"{path}: variants.{suffix}: 'name' is derived ({base_name}-{suffix}); remove it")
        full[f"{base_name}-{suffix}"] = {**data, **over, "name": f"{base_name}-{suffix}"}
    if "name" in tiny:
        raise ConfigError(f"{path}: tiny: 'name' is derived (<name>-tiny); remove it")
    out: dict[str, ModelConfig] = {}
    for name, d in full.items():
        out[name] = from_dict(ModelConfig, d, f"{path.name}:{name}")
        tname = _tiny_name(name)
        out[tname] = from_dict(ModelConfig, {**d, **tiny, "name": tname}, f"{path.name}:{tname}")
    return out


@functools.lru_cache(maxsize=None)
def _registry(models_dir: str) -> dict[str, ModelConfig]:
    models: dict[str, ModelConfig] = {}
    files = sorted(Path(models_dir).glob("*.yaml"))
    if not files:
        raise ConfigError(f"no model YAMLs found in {models_dir}")
    for f in files:
        for name, cfg in load_model_file(f).items():
            if name in models:
                raise ConfigError(f"{f}: model {name!r} is defined twice")
            models[name] = cfg
    return models


def list_models(models_dir: str | Path = MODELS_DIR) -> list[str]:
    """Every model name, sorted."""
    return sorted(_registry(str(models_dir)))


def get_model(name: str, models_dir: str | Path = MODELS_DIR) -> ModelConfig:
    """The ModelConfig called `name`; ValueError (ConfigError) naming it and the allowed names if unknown."""
    models = _registry(str(models_dir))
    if name not in models:
        raise ConfigError(f"unknown model {name!r}; allowed: {', '.join(sorted(models))}")
    return models[name]

