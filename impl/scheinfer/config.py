"""The runtime configuration of a ScheInfer decoder and the one naming scheme of its weights.

Why a module of its own: the weight formats (weights.py), the model generator and the decoders
all need the config and the canonical weight names, and none of them needs the others' code.
`DecoderConfig` is read from a weights file or derived from an `impl.common.models.ModelConfig`
(random weights at real shapes); `weight_shapes` lists every tensor a decoder reads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields as dataclass_fields, replace
from typing import TYPE_CHECKING, Literal

from impl.common.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from impl.common.models import ModelConfig

__all__ = ["KINDS", "tiny_config", "ARCHS", "ROUTERS", "NORMS", "EXPERT_PARTS", "LongRope", "DecoderConfig", "weight_shapes",
           "decode_weight_bytes", "expert_weight_names", "config_error"]

ARCHS = ("llama", "mixtral", "qwen2_moe", "phimoe")
ROUTERS = ("softmax_topk", "sparsemixer")
NORMS = ("rmsnorm", "layernorm")
EXPERT_PARTS = ("gate", "up", "down")

# ModelConfig.family -> architecture; runtime constants that ModelConfig (shapes only) lacks, used
# when a config is built from a ModelConfig (random init at real shapes). Values are those of the
# published HF configs (rms_norm_eps, rope_theta, max_position_embeddings).
_FAMILY_ARCH = {"llama2": "llama", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "phimoe": "phimoe"}
_ARCH_RUNTIME_DEFAULTS = {
    "llama": dict(norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096),
    "mixtral": dict(norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768),
    "qwen2_moe": dict(norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=8192),
    "phimoe": dict(norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096),
}


def config_error(owner: str, key: str, value, allowed: str) -> ConfigError:
    """The one-line error for a bad value: the owner, the key and value, what is allowed."""
    return ConfigError(f"{owner}: {key}={value!r} is not allowed; expected {allowed}")


# ----------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class LongRope:
    """Phi-3.5's 'longrope' RoPE scaling: per-frequency divisors and a cos/sin scale, 'short'
    while the sequence is within original_max_position_embeddings, 'long' beyond (HF semantics:
    the switch is decided per forward call from the largest position in it)."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    short_mscale: float
    long_mscale: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class DecoderConfig:
    """Runtime configuration of one decoder, read from a weights file (or derived from a
    `impl.common.models.ModelConfig` for random weights at real shapes)."""

    arch: Literal["llama", "mixtral", "qwen2_moe", "phimoe"]
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden: int                      # width of dense FFN layers (0 if every layer is MoE)
    # --- MoE ---
    num_experts: int = 0
    top_k: int = 0
    moe_ffn_hidden: int = 0
    shared_expert_ffn_hidden: int = 0    # 0: no shared expert (Qwen fuses its shared experts in one)
    shared_expert_gate: bool = False     # sigmoid(x . w) scale on the shared expert (Qwen)
    router: Literal["softmax_topk", "sparsemixer"] = "softmax_topk"
    normalize_topk: bool = True          # renormalise the top-k softmax weights (Mixtral: yes, Qwen: no)
    router_jitter_eps: float = 0.01      # SparseMixer's threshold (Phi-3.5 router_jitter_noise)
    moe_layer_freq: int = 1              # layer i is MoE iff (i + 1) % freq == 0 (Qwen decoder_sparse_step)
    mlp_only_layers: tuple[int, ...] = ()
    # --- norms, biases, positions ---
    norm_kind: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    out_proj_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: LongRope | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        owner = f"DecoderConfig(arch={self.arch!r})"
        bad = lambda key, value, allowed: config_error(owner, key, value, allowed)  # noqa: E731
        if self.arch not in ARCHS:
            raise bad("arch", self.arch, "one of " + ", ".join(map(repr, ARCHS)))
        for f in ("vocab_size", "hidden", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, f) < 1:
                raise bad(f, getattr(self, f), "an integer >= 1")
        for f in ("ffn_hidden", "num_experts", "top_k", "moe_ffn_hidden", "shared_expert_ffn_hidden"):
            if getattr(self, f) < 0:
                raise bad(f, getattr(self, f), "an integer >= 0")
        if self.head_dim % 2:
            raise bad("head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", self.num_kv_heads, f"a divisor of num_heads={self.num_heads}")
        if self.router not in ROUTERS:
            raise bad("router", self.router, "one of " + ", ".join(map(repr, ROUTERS)))
        if self.norm_kind not in NORMS:
            raise bad("norm_kind", self.norm_kind, "one of " + ", ".join(map(repr, NORMS)))
        if self.moe_layer_freq < 1:
            raise bad("moe_layer_freq", self.moe_layer_freq, "an integer >= 1")
        if self.num_experts:
            if not 1 <= self.top_k <= self.num_experts:
                raise bad("top_k", self.top_k, f"an integer in 1..num_experts={self.num_experts}")
            if self.moe_ffn_hidden < 1:
                raise bad("moe_ffn_hidden", self.moe_ffn_hidden, "an integer >= 1 for an MoE model")
            if self.router == "sparsemixer" and self.top_k != 2:
                raise bad("top_k", self.top_k, "2 with router 'sparsemixer' (SparseMixer picks two experts)")
        else:
            if self.top_k or self.shared_expert_ffn_hidden:
                raise bad("top_k" if self.top_k else "shared_expert_ffn_hidden",
                          self.top_k or self.shared_expert_ffn_hidden, "0 for a dense model (num_experts=0)")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden:
            raise bad("shared_expert_gate", True, "False without a shared expert")
        if any(not 0 <= i < self.num_layers for i in self.mlp_only_layers):
            raise bad("mlp_only_layers", self.mlp_only_layers, f"layer indices in 0..{self.num_layers - 1}")
        if self.num_dense_layers and self.ffn_hidden < 1:
            raise bad("ffn_hidden", self.ffn_hidden, f"an integer >= 1 ({self.num_dense_layers} layers are dense)")
        if self.rope_scaling is not None:
            half = self.head_dim // 2
            for f in ("short_factor", "long_factor"):
                if len(getattr(self.rope_scaling, f)) != half:
                    raise bad(f"rope_scaling.{f}", f"<{len(getattr(self.rope_scaling, f))} values>",
                          f"head_dim/2 = {half} values")

    # ------------------------------------------------------------------ structure

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.moe_layer_freq == 0)

    @property
    def num_dense_layers(self) -> int:
        """Layers that are not MoE, counted without a loop over the layers (a config read from a
        damaged header may claim a billion of them; the reader then refuses it by name)."""
        if not self.is_moe:
            return self.num_layers
        freq = self.moe_layer_freq
        moe = self.num_layers // freq - sum((i + 1) % freq == 0 for i in set(self.mlp_only_layers))
        return self.num_layers - moe

    def as_dict(self) -> dict:
        """Every field as JSON values (a run record's model); `from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        """The config `as_dict` wrote (lists back to tuples); an unknown or missing key is a ConfigError."""
        names = {f.name for f in dataclass_fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise ConfigError(f"decoder config: keys {sorted(set(d) - names) if isinstance(d, dict) else d!r} "
                              f"are not allowed; allowed: {', '.join(sorted(names))}")
        d = dict(d)
        d["mlp_only_layers"] = tuple(d.get("mlp_only_layers", ()))
        if d.get("rope_scaling") is not None:
            rs = dict(d["rope_scaling"])
            d["rope_scaling"] = LongRope(**{**rs, "short_factor": tuple(rs["short_factor"]),
                                            "long_factor": tuple(rs["long_factor"])})
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"decoder config: {e}") from None

    @classmethod
    def from_model_config(cls, mc: "ModelConfig | str", **overrides) -> "DecoderConfig":
        """The runtime config of a `impl.common.models` model (name or ModelConfig) for random
        weights at its real shapes; runtime constants missing from ModelConfig (norm eps, RoPE
        base, context length) take the published values of the architecture. `overrides` set
        any field."""
        if isinstance(mc, str):
            from impl.common.models import get_model
            mc = get_model(mc)
        owner = f"ModelConfig {mc.name!r}"
        bad = lambda key, value, allowed: config_error(owner, key, value, allowed)  # noqa: E731
        if mc.family not in _FAMILY_ARCH:
            raise bad("family", mc.family, "one of " + ", ".join(map(repr, sorted(_FAMILY_ARCH))))
        if mc.ffn_kind != "swiglu" or mc.is_mla:
            raise bad("ffn_kind/kv_lora_rank", (mc.ffn_kind, mc.kv_lora_rank), "('swiglu', 0)")
        arch = _FAMILY_ARCH[mc.family]
        kw = dict(
            arch=arch, vocab_size=mc.vocab_size, hidden=mc.hidden, num_layers=mc.num_layers,
            num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            ffn_hidden=mc.ffn_hidden, num_experts=mc.num_experts, top_k=mc.top_k,
            moe_ffn_hidden=mc.moe_ffn_hidden,
            shared_expert_ffn_hidden=mc.num_shared_experts * mc.shared_ffn_hidden if mc.num_shared_experts else 0,
            shared_expert_gate=mc.shared_expert_gate,
            router="sparsemixer" if arch == "phimoe" else "softmax_topk",
            normalize_topk=True if mc.normalize_topk is None else mc.normalize_topk,
            moe_layer_freq=mc.moe_layer_freq, mlp_only_layers=tuple(range(mc.first_k_dense_layers)),
            norm_kind=mc.norm_kind, qkv_bias=mc.qkv_bias, out_proj_bias=mc.out_proj_bias,
            lm_head_bias=arch == "phimoe", tie_word_embeddings=mc.tie_word_embeddings,
            bos_token_id=1, eos_token_id=2,
            **_ARCH_RUNTIME_DEFAULTS[arch])
        kw.update(overrides)
        return cls(**kw).without_unused_ffn()

    def without_unused_ffn(self) -> "DecoderConfig":
        """ffn_hidden set to 0 when no layer is dense (HF and ModelConfig still carry a width
        there), so one model has one config whichever file or description it came from."""
        return self if self.num_dense_layers or not self.ffn_hidden else replace(self, ffn_hidden=0)



# ----------------------------------------------------------------------------------- weight names

def expert_weight_names(prefix: str) -> dict[str, str]:
    """Canonical names of one FFN's three matrices under `prefix` (e.g. 'layers.0.moe.experts.3')."""
    return {p: f"{prefix}.{p}.weight" for p in EXPERT_PARTS}


def weight_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical weight name the decoder reads, with its shape. The one naming scheme
    all weight formats map to:

        embed.weight [V, M]; norm.{weight,bias} [M]; lm_head.{weight [V, M], bias [V]}
        layers.{i}.{attn_norm,ffn_norm}.{weight,bias} [M]
        layers.{i}.attn.{q,k,v,o}.{weight,bias}   q [H*D, M], k/v [G*D, M], o [M, H*D]
        layers.{i}.ffn.{gate,up,down}.weight      dense FFN: [F, M], [F, M], [M, F]
        layers.{i}.moe.router.weight [E, M]; layers.{i}.moe.experts.{e}.{gate,up,down}.weight
        layers.{i}.moe.shared.{gate,up,down}.weight; layers.{i}.moe.shared_gate.weight [1, M]
    """
    M, V = cfg.hidden, cfg.vocab_size
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layernorm = cfg.norm_kind == "layernorm"
    out: dict[str, tuple[int, ...]] = {"embed.weight": (V, M)}

    def norm(prefix: str):
        out[f"{prefix}.weight"] = (M,)
        if layernorm:
            out[f"{prefix}.bias"] = (M,)

    def expert(prefix: str, width: int):
        names = expert_weight_names(prefix)
        out[names["gate"]] = (width, M)
        out[names["up"]] = (width, M)
        out[names["down"]] = (M, width)

    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        norm(f"{p}.attn_norm")
        for proj, shape in (("q", (qd, M)), ("k", (kvd, M)), ("v", (kvd, M))):
            out[f"{p}.attn.{proj}.weight"] = shape
            if cfg.qkv_bias:
                out[f"{p}.attn.{proj}.bias"] = (shape[0],)
        out[f"{p}.attn.o.weight"] = (M, qd)
        if cfg.out_proj_bias:
            out[f"{p}.attn.o.bias"] = (M,)
        norm(f"{p}.ffn_norm")
        if cfg.is_moe_layer(i):
            out[f"{p}.moe.router.weight"] = (cfg.num_experts, M)
            for e in range(cfg.num_experts):
                expert(f"{p}.moe.experts.{e}", cfg.moe_ffn_hidden)
            if cfg.shared_expert_ffn_hidden:
                expert(f"{p}.moe.shared", cfg.shared_expert_ffn_hidden)
                if cfg.shared_expert_gate:
                    out[f"{p}.moe.shared_gate.weight"] = (1, M)
        else:
            expert(f"{p}.ffn", cfg.ffn_hidden)
    norm("norm")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, M)
    if cfg.lm_head_bias:
        out["lm_head.bias"] = (V,)
    return out


def decode_weight_bytes(cfg: DecoderConfig, dtype_bytes: int = 4) -> int:
    """Bytes of weights one decoded token reads: every weight once, except that a MoE layer reads
    top_k of its num_experts routed experts and the embedding table one row. A decode step's
    memory roofline is this over the DRAM bandwidth (the KV cache, a few kB here, aside)."""
    dense = routed = 0
    for name, shape in weight_shapes(cfg).items():
        n = cfg.hidden if name == "embed.weight" else math.prod(shape)
        if ".moe.experts." in name:
            routed += n
        else:
            dense += n
    return (dense + (routed * cfg.top_k // cfg.num_experts if routed else 0)) * dtype_bytes


# kind -> the model whose tiny variant it is (workflows/config/models)
KINDS = {
    "llama": "llama2-7b-tiny",
    "mixtral": "mixtral-8x7b-tiny",
    "qwen2_moe": "qwen1.5-moe-a2.7b-tiny",
    "phimoe": "phi-3.5-moe-tiny",
}


def tiny_config(kind: str, **overrides) -> DecoderConfig:
    """DecoderConfig of a test model: `kind` is a key of KINDS or any model name of get_model."""
    fields = {f.name for f in dataclass_fields(DecoderConfig)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"model field {key!r} is not allowed; allowed: {', '.join(sorted(fields))}")
    try:
        return DecoderConfig.from_model_config(KINDS.get(kind, kind), **overrides)
    except ConfigError as e:
        if kind in KINDS or not str(e).startswith("unknown model"):
            raise
        raise ConfigError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}, or a model name ({e})") from None
