"""One reference decoder for the models ScheInfer serves: LLaMA-2 (dense), Mixtral (MoE, softmax
top-2), Qwen-MoE (routed experts + a sigmoid-gated shared expert) and Phi-3.5-MoE (SparseMixer
top-2, LayerNorm, biased attention and LM head).

Why one model: ScheInfer only changes *where* each FFN / expert slice runs (CC / CG / GG,
scheinfer.md 2.2); everything else (attention, norms, routing, sampling) must be one exact code
path that the engine reuses and that is checked against llama.cpp and between weight formats.

Conventions
* Semantics are Hugging Face's for every architecture (the checkpoints' own reference code);
  RoPE is HF's rotate-half form on HF-layout q/k weights. GGUF 'llama' files store q/k rows
  permuted for llama.cpp's interleaved-pair RoPE; `weights.py` undoes that permutation on load,
  so one RoPE serves both formats.
* Every FFN and expert goes through `ffn(ExpertWeights, x_TM)`. `ExpertWeights` keeps
  gate/up as [F, M] and down as [M, F], so a slice of the intermediate dimension F is a row slice of
  gate/up plus a column slice of down (`ExpertWeights.slice`), and the slices' outputs sum to the
  whole: y = sum_s ffn(w.slice(s), x). The engine replaces `Decoder.expert_fn` to run slices
  on different devices; `Decoder.route_observer` sees every routing decision. Two exceptions, for
  speed, both with the plain expert function only: a decoded token's experts go in pairs through
  `_pair_ffn` (the same products, two experts per batched call; `Decoder._one_token`); and with
  `Decoder(compile_decode=True)` a decoded token's layer is one torch.compile'd region
  (`_token_layer`; its products, the routed experts' included, are multiply-reduces that stream
  the weights at close to the memory bandwidth, which MKL's f32 GEMV does not reach on AMD
  CPUs). Same math, other summation order.
* Weights come from a `WeightSource` (weights.py) by canonical name (`weight_shapes`). With
  `cache_weights=False` the decoder fetches each layer's tensors when it runs that layer and drops
  them afterwards, so a lazily generated real-size model never sits in memory whole.
* Batches of prompts are left-padded into one KV cache; padded slots are masked out of attention
  and skipped by the FFN / MoE (which therefore see only real tokens), and each sequence's RoPE
  positions count its own real tokens only, so a prompt's outputs do not depend on its batch.

Shape letters: B batch, S new positions, L cache slots, V vocab, M hidden, F FFN width, H query
heads, G key/value heads, D head dim, T tokens, E experts, K top-k.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from impl.common.config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from impl.common.models import ModelConfig
    from .weights import WeightSource

__all__ = [
    "ARCHS", "ROUTERS", "NORMS", "LongRope", "DecoderConfig", "ExpertWeights", "ffn", "Norm",
    "AttentionWeights", "MoEWeights", "LayerWeights", "weight_shapes", "expert_weight_names",
    "route", "KVCache", "SamplingConfig", "sample_next", "GenerationOutput", "Decoder",
]

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


def _fail(owner: str, key: str, value, allowed: str):
    raise ConfigError(f"{owner}: {key}={value!r} is not allowed; expected {allowed}")


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
        if self.arch not in ARCHS:
            _fail(owner, "arch", self.arch, "one of " + ", ".join(map(repr, ARCHS)))
        for f in ("vocab_size", "hidden", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, f) < 1:
                _fail(owner, f, getattr(self, f), "an integer >= 1")
        for f in ("ffn_hidden", "num_experts", "top_k", "moe_ffn_hidden", "shared_expert_ffn_hidden"):
            if getattr(self, f) < 0:
                _fail(owner, f, getattr(self, f), "an integer >= 0")
        if self.head_dim % 2:
            _fail(owner, "head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            _fail(owner, "num_kv_heads", self.num_kv_heads, f"a divisor of num_heads={self.num_heads}")
        if self.router not in ROUTERS:
            _fail(owner, "router", self.router, "one of " + ", ".join(map(repr, ROUTERS)))
        if self.norm_kind not in NORMS:
            _fail(owner, "norm_kind", self.norm_kind, "one of " + ", ".join(map(repr, NORMS)))
        if self.moe_layer_freq < 1:
            _fail(owner, "moe_layer_freq", self.moe_layer_freq, "an integer >= 1")
        if self.num_experts:
            if not 1 <= self.top_k <= self.num_experts:
                _fail(owner, "top_k", self.top_k, f"an integer in 1..num_experts={self.num_experts}")
            if self.moe_ffn_hidden < 1:
                _fail(owner, "moe_ffn_hidden", self.moe_ffn_hidden, "an integer >= 1 for an MoE model")
            if self.router == "sparsemixer" and self.top_k != 2:
                _fail(owner, "top_k", self.top_k, "2 with router 'sparsemixer' (SparseMixer picks two experts)")
        else:
            if self.top_k or self.shared_expert_ffn_hidden:
                _fail(owner, "top_k" if self.top_k else "shared_expert_ffn_hidden",
                      self.top_k or self.shared_expert_ffn_hidden, "0 for a dense model (num_experts=0)")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden:
            _fail(owner, "shared_expert_gate", True, "False without a shared expert")
        if any(not 0 <= i < self.num_layers for i in self.mlp_only_layers):
            _fail(owner, "mlp_only_layers", self.mlp_only_layers, f"layer indices in 0..{self.num_layers - 1}")
        if self.num_dense_layers and self.ffn_hidden < 1:
            _fail(owner, "ffn_hidden", self.ffn_hidden, f"an integer >= 1 ({self.num_dense_layers} layers are dense)")
        if self.rope_scaling is not None:
            half = self.head_dim // 2
            for f in ("short_factor", "long_factor"):
                if len(getattr(self.rope_scaling, f)) != half:
                    _fail(owner, f"rope_scaling.{f}", f"<{len(getattr(self.rope_scaling, f))} values>",
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
        return sum(not self.is_moe_layer(i) for i in range(self.num_layers))

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
        if mc.family not in _FAMILY_ARCH:
            _fail(owner, "family", mc.family, "one of " + ", ".join(map(repr, sorted(_FAMILY_ARCH))))
        if mc.ffn_kind != "swiglu" or mc.is_mla:
            _fail(owner, "ffn_kind/kv_lora_rank", (mc.ffn_kind, mc.kv_lora_rank), "('swiglu', 0)")
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


# ----------------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU FFN / expert: y = down_MF (silu(gate_FM x) * up_FM x)."""

    gate_FM: torch.Tensor
    up_FM: torch.Tensor
    down_MF: torch.Tensor

    def __post_init__(self):
        Fg, M = self.gate_FM.shape
        if self.up_FM.shape != (Fg, M) or self.down_MF.shape != (M, Fg):
            raise ValueError(f"ExpertWeights: gate {tuple(self.gate_FM.shape)}, up {tuple(self.up_FM.shape)}, "
                             f"down {tuple(self.down_MF.shape)}; expected [F, M], [F, M], [M, F]")

    @property
    def ffn_hidden(self) -> int:
        return self.gate_FM.shape[0]

    @cached_property
    def gate_up_2FM(self) -> torch.Tensor | None:
        """gate and up as one [2F, M] array when they are its two halves (see `_joined`), else None."""
        return _joined(self.gate_FM, self.up_FM)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_FM, self.up_FM, self.down_MF))

    def slice(self, start: int, stop: int) -> "ExpertWeights":
        """Intermediate units [start, stop): rows of gate/up, columns of down (views, no copy)."""
        if not 0 <= start <= stop <= self.ffn_hidden:
            raise ValueError(f"slice [{start}, {stop}) is outside 0..{self.ffn_hidden}")
        return ExpertWeights(self.gate_FM[start:stop], self.up_FM[start:stop], self.down_MF[:, start:stop])

    def to(self, *args, **kwargs) -> "ExpertWeights":
        return ExpertWeights(*(t.to(*args, **kwargs) for t in (self.gate_FM, self.up_FM, self.down_MF)))


# Few-token products x_TK @ w_NK^T are memory bound, and one BLAS call streams the weight on one
# core. So the weight is cut into one block per core and one batched call runs the blocks on all
# cores: along the output dimension N when w is stored row-major ([N, K] rows, the natural
# layout), else along the reduction dimension K when w^T is ([K, N] rows: the engine's down
# slices, see `engine.HybridDecoder._expert`), the partial products then summed. Row blocks are
# multiplied as x @ w^T (a row vector times the transposed block): that kernel streams the block
# 7-13% faster than w @ x^T on a 2-core EPYC VM (cold 29 MB weights, 27.2 vs 24.7 GB/s).
# Small weights (cache-resident, a few microseconds of work) are not split: the extra calls cost
# more than they save.
_SPLIT_MAX_TOKENS = 32
_SPLIT_MIN_WIDTH = 256
_SPLIT_MIN_BYTES = 1 << 20


def _linear(x: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w_NK, b_N) for x of shape [..., K], split across cores for few tokens."""
    K = x.shape[-1]
    T = x.numel() // K if K else 0
    if torch.compiler.is_compiling():   # one token: a multiply-reduce that Inductor fuses (see `_routed_experts`)
        if T != 1:
            return F.linear(x, w_NK, b_N)
        y = (x.unsqueeze(-2) * w_NK).sum(-1)
        return y if b_N is None else y + b_N
    n = torch.get_num_threads()
    if (n == 1 or not 0 < T <= _SPLIT_MAX_TOKENS or w_NK.numel() * w_NK.element_size() < _SPLIT_MIN_BYTES
            or x.device.type != "cpu" or x.dtype != w_NK.dtype):
        return F.linear(x, w_NK, b_N)
    x_TK, N = x.reshape(T, K), w_NK.shape[0]
    if N >= _SPLIT_MIN_WIDTH and N % n == 0 and w_NK.stride(1) == 1:       # blocks of output rows
        wt_nKX = w_NK.as_strided((n, K, N // n), (N // n * w_NK.stride(0), 1, w_NK.stride(0)))
        y_nTX = torch.bmm(x_TK.unsqueeze(0).expand(n, T, K), wt_nKX)      # x @ w^T: the faster kernel
        y_TN = y_nTX.view(T, N) if T == 1 else y_nTX.transpose(0, 1).reshape(T, N)
    elif K >= _SPLIT_MIN_WIDTH and K % n == 0 and w_NK.stride(0) == 1:     # blocks of the reduction
        wt_KN = w_NK.t()
        wt_nXN = wt_KN.as_strided((n, K // n, N), (K // n * wt_KN.stride(0), wt_KN.stride(0), 1))
        y_TN = torch.bmm(x_TK.view(T, n, K // n).transpose(0, 1), wt_nXN).sum(0)
    else:
        return F.linear(x, w_NK, b_N)
    if b_N is not None:
        y_TN = y_TN + b_N
    return y_TN.reshape(*x.shape[:-1], N)


def _joined(*parts: torch.Tensor, dim: int = 0) -> torch.Tensor | None:
    """The view whose consecutive blocks along dim are exactly these views (one product instead of
    several, see `Decoder._expert` / `layer_weights`), or None if they do not lie so in memory."""
    first = parts[0]
    rest_shape = first.shape[:dim] + first.shape[dim + 1:]
    ptr, step = first.data_ptr(), first.element_size() * first.stride(dim)
    for t in parts:
        if (t.dtype != first.dtype or t.device != first.device or t.stride() != first.stride()
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.data_ptr() != ptr or t.shape[:dim] + t.shape[dim + 1:] != rest_shape):
            return None
        ptr += t.shape[dim] * step
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in parts)
    return first.as_strided(shape, first.stride(), first.storage_offset())


def ffn(w: ExpertWeights, x_TM: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN; exact under slicing of F: sum over disjoint slices s of ffn(w.slice(s), x)."""
    gu_2FM = w.gate_up_2FM
    if gu_2FM is not None:          # gate and up rows stacked in one [2F, M] array: one product
        gu_T2F = _linear(x_TM, gu_2FM)
        h_TF = F.silu(gu_T2F[:, :w.ffn_hidden]) * gu_T2F[:, w.ffn_hidden:]
    else:
        h_TF = F.silu(_linear(x_TM, w.gate_FM)) * _linear(x_TM, w.up_FM)
    return _linear(h_TF, w.down_MF)


@dataclass(frozen=True)
class Norm:
    weight_M: torch.Tensor
    bias_M: torch.Tensor | None
    kind: str
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight_M, self.bias_M, self.eps)
        if x.dtype == torch.float32:   # one fused kernel; same result as the lines below in float32
            y = torch.rms_norm(x, (x.shape[-1],), self.weight_M, self.eps)
            return y if self.bias_M is None else y + self.bias_M
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight_M
        return y if self.bias_M is None else y + self.bias_M


@dataclass(frozen=True)
class AttentionWeights:
    q_w: torch.Tensor            # [H*D, M], HF (rotate-half) row order
    k_w: torch.Tensor            # [G*D, M]
    v_w: torch.Tensor            # [G*D, M]
    o_w: torch.Tensor            # [M, H*D]
    q_b: torch.Tensor | None = None
    k_b: torch.Tensor | None = None
    v_b: torch.Tensor | None = None
    o_b: torch.Tensor | None = None

    @cached_property
    def qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of q, k, v as one array when they are consecutive rows of one (`_joined`)."""
        w = _joined(self.q_w, self.k_w, self.v_w)
        b = None if self.q_b is None else _joined(self.q_b, self.k_b, self.v_b)
        return None if w is None or (self.q_b is not None and b is None) else (w, b)


@dataclass(frozen=True)
class MoEWeights:
    router_EM: torch.Tensor
    experts: tuple[ExpertWeights, ...]
    shared: ExpertWeights | None = None
    shared_gate_1M: torch.Tensor | None = None
    # all experts in two arrays, gate/up [E, 2F, M] and down [E, M, F], the experts' weights views
    # of them (`Decoder._experts`); None when the experts are stored apart
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Norm
    attn: AttentionWeights
    ffn_norm: Norm
    dense: ExpertWeights | None = None
    moe: MoEWeights | None = None


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


# ----------------------------------------------------------------------------------- routing

def route(cfg: DecoderConfig, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK, weights_TK) of the model's router, computed in float32 like the HF references."""
    logits_TE = logits_TE.float()
    if cfg.router == "sparsemixer":
        return _sparsemixer(logits_TE, cfg.router_jitter_eps)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK, ids_TK = probs_TE.topk(cfg.top_k, dim=-1)
    if cfg.normalize_topk:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return ids_TK, weights_TK


def _sparsemixer(scores_TE: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's SparseMixer at inference: expert 1 is the arg-max, weighted by a softmax over
    the experts whose score lies within a relative 2*eps of it; expert 2 likewise among the rest."""
    ids, weights = [], []
    masked_TE = scores_TE
    for _ in range(2):
        top_T1, top_ids_T1 = masked_TE.max(dim=-1, keepdim=True)
        factor_TE = scores_TE.abs().clamp(min=top_T1)
        far_TE = (top_T1 - scores_TE) / factor_TE > 2 * eps
        gates_TE = torch.softmax(masked_TE.masked_fill(far_TE, float("-inf")), dim=-1)
        ids.append(top_ids_T1)
        weights.append(gates_TE.gather(-1, top_ids_T1))
        masked_TE = masked_TE.scatter(-1, top_ids_T1, float("-inf"))
    return torch.cat(ids, dim=-1), torch.cat(weights, dim=-1)


# ----------------------------------------------------------------------------------- KV cache

class KVCache:
    """Per-layer K/V [B, G, L, D] for left-padded batches: slot j of sequence b holds a real token
    iff valid_BL[b, j]; next_pos_B counts each sequence's real tokens (its next RoPE position)."""

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.valid_BL = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self.unpadded = True        # every used slot holds a real token (lets decode skip the mask)

    @property
    def batch(self) -> int:
        return self.valid_BL.shape[0]


# ----------------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (arg-max; top_k / top_p ignored). Otherwise softmax(logits / T)
    restricted to the top_k tokens (0 = all) and to the smallest set whose probability reaches
    top_p; sequence b of a batch draws from torch.Generator seeded with seed + b."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            _fail("SamplingConfig", "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        if self.top_k < 0:
            _fail("SamplingConfig", "top_k", self.top_k, "an integer >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            _fail("SamplingConfig", "top_p", self.top_p, "a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig,
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Next token id per row of logits_BV (see SamplingConfig)."""
    if cfg.greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    if cfg.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(-1) - sorted_BV           # mass of the strictly better tokens
        drop_BV = before_BV >= cfg.top_p                        # the best token always stays
        probs_BV = probs_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, 0.0))
    if generators is None:
        generators = [torch.Generator().manual_seed(cfg.seed + b) for b in range(logits_BV.shape[0])]
    out = [torch.multinomial(probs_BV[b].cpu(), 1, generator=generators[b]) for b in range(logits_BV.shape[0])]
    return torch.cat(out).to(logits_BV.device)


@dataclass
class GenerationOutput:
    """tokens[b]: the new ids of prompt b (ending with eos if it was produced); step_logits[b]
    ([n_new, V], float32) the logits each new token was chosen from, when requested."""

    tokens: list[list[int]]
    step_logits: list[torch.Tensor] | None
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    decode_steps: int = 0


# ----------------------------------------------------------------------------------- decoder

ExpertFn = Callable[[int, "int | str", ExpertWeights, torch.Tensor], torch.Tensor]
RouteObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


def _default_expert_fn(layer: int, expert: int | str, w: ExpertWeights, x_TM: torch.Tensor) -> torch.Tensor:
    return ffn(w, x_TM)


def _pair_ffn(stacked: tuple[torch.Tensor, torch.Tensor], a: int, b: int, x_1M: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`ffn` of experts a < b of one stacked layer for one token, as two batched products: any two
    experts of an [E, ...] array are one strided [2, ...] view (batch stride b - a experts)."""
    gu_E2FM, down_EMF = stacked
    _, F2, M = gu_E2FM.shape
    width = F2 // 2
    gu_2M2F = gu_E2FM.as_strided((2, M, F2), ((b - a) * F2 * M, 1, M), gu_E2FM.storage_offset() + a * F2 * M)
    down_2FM = down_EMF.as_strided((2, width, M), ((b - a) * width * M, 1, width),
                                   down_EMF.storage_offset() + a * width * M)
    g_21F2 = torch.bmm(x_1M.view(1, 1, M).expand(2, 1, M), gu_2M2F)
    h_21F = F.silu(g_21F2[..., :width]) * g_21F2[..., width:]
    y_2M = torch.bmm(h_21F, down_2FM).view(2, M)
    return y_2M[0:1], y_2M[1:2]


def _routed_experts(cfg: DecoderConfig, w: MoEWeights, h_1M: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_1M, ids_1K, weights_1K): the routing and the routed experts of one token, the experts as
    gathered multiply-reduce products. Written for torch.compile (inside `_token_layer`): Inductor
    fuses the gather into one reduction loop, so each chosen expert's weights stream once, at
    close to the memory bandwidth (MKL's f32 GEMV reaches about half of it on the AMD hosts the
    CPU bench runs on). Run eagerly it would copy the chosen experts' weights first."""
    gu_E2FM, down_EMF = w.stacked
    ids_1K, weights_1K = route(cfg, F.linear(h_1M, w.router_EM))
    ids_K, width = ids_1K[0], down_EMF.shape[-1]
    gu_K2F = (gu_E2FM[ids_K] * h_1M).sum(-1)
    h_KF = F.silu(gu_K2F[:, :width]) * gu_K2F[:, width:]
    y_KM = (down_EMF[ids_K] * h_KF[:, None, :]).sum(-1)
    y_1M = (weights_1K[0, :, None].to(y_KM.dtype) * y_KM).sum(0, keepdim=True)
    return y_1M, ids_1K, weights_1K


def _token_ffn_block(cfg: DecoderConfig, w: LayerWeights, x_11M: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x + FFN(norm(x)), norm(x), ids_1K, weights_1K) of one token, without a MoE layer's shared
    expert (the caller adds it): the FFN half of the compiled `_token_layer`. Dense layers: `ffn`,
    whose products are multiply-reduces under compile (`_linear`)."""
    h_1M = w.ffn_norm(x_11M).view(1, -1)
    if w.moe is None:
        return x_11M + ffn(w.dense, h_1M).view(x_11M.shape), h_1M, None, None
    y_1M, ids_1K, weights_1K = _routed_experts(cfg, w.moe, h_1M)
    return x_11M + y_1M.view(x_11M.shape), h_1M, ids_1K, weights_1K


# Inductor's C++ wrapper calls a region's kernels without Python in between: about 10 us less per
# region call on the 2-core bench VM (0.83 -> 0.73 ms fixed cost per decoded token, 4 layers).
_COMPILE_OPTIONS = {"cpp_wrapper": True}


def _inductor_compilers() -> tuple[str, ...]:
    """The C++ compilers Inductor's CPU backend will try (its `cpp.cxx` setting: $CXX or g++)."""
    from torch._inductor import config
    cxx = config.cpp.cxx
    return tuple(c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c)


def _attention_block(attention: Callable, norm: Norm, w: AttentionWeights, x_BSM: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor,
                     allowed_BSL: torch.Tensor | None, L1: int) -> torch.Tensor:
    """x + attention(norm(x)): the pre-norm attention half of a layer, one region for
    torch.compile (with the cache length L1 dynamic, one graph serves every decode step)."""
    return x_BSM + attention(w, norm(x_BSM), k_cache, v_cache, cos_BSD, sin_BSD, allowed_BSL, L1)


def _token_layer(attention: Callable, cfg: DecoderConfig, w: LayerWeights, x_11M: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, cos_11D: torch.Tensor, sin_11D: torch.Tensor,
                 L1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A whole layer of one decoded token, `_attention_block` then `_token_ffn_block` (same
    outputs): one region for torch.compile, so one call per layer."""
    x_11M = _attention_block(attention, w.attn_norm, w.attn, x_11M, k_cache, v_cache, cos_11D, sin_11D, None, L1)
    return _token_ffn_block(cfg, w, x_11M)


class Decoder:
    """The model. `expert_fn(layer, expert, weights, x_TM) -> y_TM` computes every FFN (expert is
    the routed expert's id, 'shared' or 'dense'); `route_observer(layer, ids_TK, weights_TK)` is
    called with every MoE routing decision (real tokens only).

    compile_decode: decode steps run as torch.compile'd regions, one per layer: a single token's
    whole layer (`_token_layer`: the attention block, then norm, routing and routed experts or the
    dense FFN), or for a batch without padding the attention block (`_attention_block`; the FFN
    stays eager). CPU only, with the plain expert function. The first decode steps of each new
    weight shape compile (seconds); prefill and padded batches stay eager. A shared expert runs
    eagerly after the region."""

    def __init__(self, source: "WeightSource", *, dtype: torch.dtype = torch.float32, device="cpu",
                 cache_weights: bool = True, expert_fn: ExpertFn | None = None,
                 route_observer: RouteObserver | None = None, compile_decode: bool = False):
        self.source = source
        self.config: DecoderConfig = source.config
        self.dtype = dtype
        self.device = torch.device(device)
        if compile_decode and (self.device.type != "cpu" or expert_fn is not None):
            raise ValueError(f"compile_decode=True needs device 'cpu' and no expert_fn; got device "
                             f"{str(self.device)!r}, expert_fn {'given' if expert_fn else 'None'}")
        if compile_decode and not any(map(shutil.which, _inductor_compilers())):
            raise ValueError(f"compile_decode=True needs a C++ compiler for Inductor "
                             f"({' or '.join(_inductor_compilers())} on PATH, or set CXX); none was found")
        self._token_layer = self._attention_block = None
        if compile_decode:   # each architecture / shape is its own graph of the two regions; a
            # process with several models (the tests, a sweep) needs more than Dynamo's default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled = lambda fn: torch.compile(fn, fullgraph=True, options=_COMPILE_OPTIONS)  # noqa: E731
            self._token_layer, self._attention_block = compiled(_token_layer), compiled(_attention_block)
        self.expert_fn: ExpertFn = expert_fn or _default_expert_fn
        self.route_observer = route_observer
        cfg = self.config
        self.embed_VM = self._w("embed.weight")
        self.final_norm = self._norm("norm")
        self.lm_head_VM = self.embed_VM if cfg.tie_word_embeddings else self._w("lm_head.weight")
        self.lm_head_b = self._w("lm_head.bias") if cfg.lm_head_bias else None
        self._layers = [self.layer_weights(i) for i in range(cfg.num_layers)] if cache_weights else None
        half = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
        self._base_inv_freq = 1.0 / (cfg.rope_theta ** half)
        self._rope_tables: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}   # long RoPE -> (cos, sin)

    # -------------------------------------------------------------- weights

    def _w(self, name: str) -> torch.Tensor:
        # Always a fresh (allocator-aligned) copy: CPU matmul kernels pick code paths by address
        # alignment, and a tensor mapped from a file sits wherever its format put it; copying makes
        # the result independent of the file format, bit for bit.
        return self.source.load(name).to(device=self.device, dtype=self.dtype, copy=True)

    def _norm(self, prefix: str) -> Norm:
        cfg = self.config
        bias = self._w(f"{prefix}.bias") if cfg.norm_kind == "layernorm" else None
        return Norm(self._w(f"{prefix}.weight"), bias, cfg.norm_kind, cfg.norm_eps)

    def _expert(self, prefix: str) -> ExpertWeights:
        return self._experts([prefix])[0][0]

    def _experts(self, prefixes: Sequence[str]) -> tuple[list[ExpertWeights], tuple[torch.Tensor, torch.Tensor]]:
        """The experts under these prefixes, all in one gate/up array [E, 2F, M] (gate rows, then
        up rows, per expert: `ffn` streams both in one product) and one down array [E, M, F], the
        ExpertWeights holding views of them. Slices along F stay views."""
        gu_E2FM = down_EMF = None
        for e, prefix in enumerate(prefixes):
            names = expert_weight_names(prefix)
            gate, up, down = (self._w(names[p]) for p in EXPERT_PARTS)
            if gu_E2FM is None:
                width, hidden = gate.shape
                gu_E2FM = gate.new_empty(len(prefixes), 2 * width, hidden)
                down_EMF = down.new_empty(len(prefixes), hidden, width)
            gu_E2FM[e, :width], gu_E2FM[e, width:] = gate, up
            down_EMF[e] = down
        width = gu_E2FM.shape[1] // 2
        experts = [ExpertWeights(gu[:width], gu[width:], dn) for gu, dn in zip(gu_E2FM, down_EMF)]
        return experts, (gu_E2FM, down_EMF)

    def layer_weights(self, i: int) -> LayerWeights:
        """Layer i's weights in the compute dtype / device (cached ones when cache_weights)."""
        if getattr(self, "_layers", None) is not None:
            return self._layers[i]
        cfg, p = self.config, f"layers.{i}"
        opt = lambda name, present: self._w(name) if present else None  # noqa: E731
        # q, k, v (and their biases) are consecutive rows of one array: `attention` runs one product
        qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv_w = torch.cat([self._w(f"{p}.attn.{n}.weight") for n in "qkv"])
        qkv_b = torch.cat([self._w(f"{p}.attn.{n}.bias") for n in "qkv"]) if cfg.qkv_bias else None
        split = lambda t: (None,) * 3 if t is None else (t[:qd], t[qd:qd + kvd], t[qd + kvd:])  # noqa: E731
        (q_w, k_w, v_w), (q_b, k_b, v_b) = split(qkv_w), split(qkv_b)
        attn = AttentionWeights(q_w=q_w, k_w=k_w, v_w=v_w, o_w=self._w(f"{p}.attn.o.weight"),
                                q_b=q_b, k_b=k_b, v_b=v_b, o_b=opt(f"{p}.attn.o.bias", cfg.out_proj_bias))
        dense = moe = None
        if cfg.is_moe_layer(i):
            shared = self._expert(f"{p}.moe.shared") if cfg.shared_expert_ffn_hidden else None
            experts, stacked = self._experts([f"{p}.moe.experts.{e}" for e in range(cfg.num_experts)])
            moe = MoEWeights(router_EM=self._w(f"{p}.moe.router.weight"), experts=tuple(experts),
                             shared=shared, shared_gate_1M=opt(f"{p}.moe.shared_gate.weight", cfg.shared_expert_gate),
                             stacked=stacked)
        else:
            dense = self._expert(f"{p}.ffn")
        return LayerWeights(self._norm(f"{p}.attn_norm"), attn, self._norm(f"{p}.ffn_norm"), dense, moe)

    # -------------------------------------------------------------- pieces

    def rope(self, pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [B, S, D] for positions pos_BS (HF rotate-half layout; the first
        half of sin negated, see `_rotate`), looked up in a table that grows on demand."""
        cfg = self.config
        end = int(pos_BS.max()) + 1
        long = cfg.rope_scaling is not None and end > cfg.rope_scaling.original_max_position_embeddings
        table = self._rope_tables.get(long)
        if table is None or len(table[0]) < end:           # grow by doubling, at least 256 positions
            length = max(end, 256, 0 if table is None else 2 * len(table[0]))
            table = self._rope_tables[long] = self._rope_table(length, long)
        return table[0][pos_BS], table[1][pos_BS]

    def _rope_table(self, length: int, long: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, inv_freq, scale = self.config, self._base_inv_freq, 1.0
        if cfg.rope_scaling is not None:
            rs = cfg.rope_scaling
            ext = torch.tensor(rs.long_factor if long else rs.short_factor, dtype=torch.float32)
            inv_freq, scale = inv_freq / ext, (rs.long_mscale if long else rs.short_mscale)
        freqs_Nh = torch.arange(length, dtype=torch.int64).to(torch.float32)[:, None] * inv_freq
        emb_ND = torch.cat((freqs_Nh, freqs_Nh), dim=-1)
        cos, sin = emb_ND.cos() * scale, emb_ND.sin() * scale
        sin[:, :cfg.head_dim // 2].neg_()
        return cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) = (x2, x1) * (-1, 1): the
        halves swapped in one flip, the sign folded into sin (exact, the same values)."""
        swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
        return x * cos + swapped * signed_sin

    def attention(self, w: AttentionWeights, h_BSM: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cos_BSD: torch.Tensor, sin_BSD: torch.Tensor, allowed_BSL: torch.Tensor | None,
                  L1: int | None = None) -> torch.Tensor:
        """Attention of one layer over its cache k_cache / v_cache [B, G, max_len, D], the S new
        positions written to slots L1 - S .. L1 - 1. allowed_BSL None: every one of the L1 cached
        slots is visible to every query."""
        cfg = self.config
        B, S, _ = h_BSM.shape
        H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos, sin = cos_BSD[:, None], sin_BSD[:, None]
        if w.qkv is not None:                                               # one product, one RoPE
            qkv_BNSD = _linear(h_BSM, *w.qkv)
            qkv_BNSD = qkv_BNSD.view(B, S, H + 2 * G, D).transpose(1, 2)
            qk_BNSD = self._rotate(qkv_BNSD[:, :H + G], cos, sin)
            q_BHSD, k_BGSD, v_BGSD = qk_BNSD[:, :H], qk_BNSD[:, H:], qkv_BNSD[:, H + G:]
        else:
            q_BHSD = _linear(h_BSM, w.q_w, w.q_b).view(B, S, H, D).transpose(1, 2)
            k_BGSD = _linear(h_BSM, w.k_w, w.k_b).view(B, S, G, D).transpose(1, 2)
            v_BGSD = _linear(h_BSM, w.v_w, w.v_b).view(B, S, G, D).transpose(1, 2)
            q_BHSD, k_BGSD = self._rotate(q_BHSD, cos, sin), self._rotate(k_BGSD, cos, sin)
        L1 = allowed_BSL.shape[-1] if allowed_BSL is not None else L1
        L0 = L1 - S
        k_cache[:, :, L0:L1] = k_BGSD
        v_cache[:, :, L0:L1] = v_BGSD
        k_BGLD, v_BGLD = k_cache[:, :, :L1], v_cache[:, :, :L1]
        if torch.compiler.is_compiling() and S == 1 and allowed_BSL is None:
            # one query per sequence: scores and weighted sum as multiply-reduces that Inductor
            # fuses with the softmax (the extern SDPA kernel costs more than the work here)
            q_BGRD = q_BHSD.reshape(B, G, H // G, D)
            scores_BGRL = (q_BGRD.unsqueeze(3) * k_BGLD.unsqueeze(2)).sum(-1) * D ** -0.5
            p_BGRL = torch.softmax(scores_BGRL, dim=-1)
            o_BSX = (p_BGRL.unsqueeze(-1) * v_BGLD.unsqueeze(2)).sum(3).reshape(B, S, H * D)
        else:
            mask = None if allowed_BSL is None else allowed_BSL[:, None]
            o_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BGLD, v_BGLD, attn_mask=mask, enable_gqa=G != H)
            o_BSX = o_BHSD.transpose(1, 2).reshape(B, S, H * D)
        return _linear(o_BSX, w.o_w, w.o_b)

    def moe(self, i: int, w: MoEWeights, x_TM: torch.Tensor) -> torch.Tensor:
        ids_TK, weights_TK = route(self.config, F.linear(x_TM, w.router_EM))
        if self.route_observer is not None:
            self.route_observer(i, ids_TK, weights_TK)
        if x_TM.shape[0] == 1:
            y_TM = self._one_token(i, w, x_TM, ids_TK[0], weights_TK[0])
        else:
            y_TM = self._routed(i, w, x_TM, ids_TK, weights_TK)
        return y_TM if w.shared is None else y_TM + self._shared(i, w, x_TM)

    def _shared(self, i: int, w: MoEWeights, x_TM: torch.Tensor) -> torch.Tensor:
        s_TM = self.expert_fn(i, "shared", w.shared, x_TM)
        return s_TM if w.shared_gate_1M is None else torch.sigmoid(F.linear(x_TM, w.shared_gate_1M)) * s_TM

    def _compiled_token_layer(self, i: int, w: LayerWeights, x_11M: torch.Tensor, cache: KVCache,
                              cos_11D: torch.Tensor, sin_11D: torch.Tensor, L1: int) -> torch.Tensor:
        """Layer i for one token through the compiled `_token_layer`, plus what stays outside it:
        the route observer and a shared expert (through `expert_fn`)."""
        x_11M, h_1M, ids_1K, weights_1K = self._token_layer(self.attention, self.config, w, x_11M, cache.k[i],
                                                            cache.v[i], cos_11D, sin_11D, L1)
        if w.moe is not None:
            if self.route_observer is not None:
                self.route_observer(i, ids_1K, weights_1K)
            if w.moe.shared is not None:
                x_11M = x_11M + self._shared(i, w.moe, h_1M).view(x_11M.shape)
        return x_11M

    def _one_token(self, i: int, w: MoEWeights, x_1M: torch.Tensor, ids_K: torch.Tensor,
                   weights_K: torch.Tensor) -> torch.Tensor:
        """One token's routed experts, added in ascending expert order. With the plain expert
        function, stacked experts and at most two cores, each pair of experts is one batched
        product (two blocks, one per core, `_pair_ffn`): half the calls of one split product per
        expert. Otherwise each expert goes through `expert_fn`."""
        order = sorted((e, k) for k, e in enumerate(ids_K.tolist()))
        paired = w.stacked is not None and self.expert_fn is _default_expert_fn and torch.get_num_threads() <= 2
        groups = [order[j:j + 2] for j in range(0, len(order), 2)] if paired else [[ek] for ek in order]
        gate_K = None               # Python numbers of the gate weights: scalar products, same values
        y_1M = None
        for group in groups:
            if len(group) == 2:
                ys = _pair_ffn(w.stacked, group[0][0], group[1][0], x_1M)
            else:
                ys = (self.expert_fn(i, group[0][0], w.experts[group[0][0]], x_1M),)
            for y_e, (_, k) in zip(ys, group):
                if gate_K is None:
                    gate_K = weights_K.to(y_e.dtype).tolist()
                y_e = y_e * gate_K[k]
                y_1M = y_e if y_1M is None else y_1M + y_e
        return y_1M

    def _routed(self, i: int, w: MoEWeights, x_TM: torch.Tensor, ids_TK: torch.Tensor,
                weights_TK: torch.Tensor) -> torch.Tensor:
        y_TM = torch.zeros_like(x_TM)
        for e in ids_TK.unique().tolist():
            tok_T, slot_T = (ids_TK == e).nonzero(as_tuple=True)
            y_e = self.expert_fn(i, e, w.experts[e], x_TM[tok_T])
            y_TM.index_add_(0, tok_T, y_e * weights_TK[tok_T, slot_T, None].to(y_e.dtype))
        return y_TM

    def feed_forward(self, i: int, w: LayerWeights, x_TM: torch.Tensor) -> torch.Tensor:
        if w.moe is not None:
            return self.moe(i, w.moe, x_TM)
        return self.expert_fn(i, "dense", w.dense, x_TM)

    # -------------------------------------------------------------- forward

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.dtype, self.device)

    @torch.no_grad()
    def forward(self, tokens_BS: torch.Tensor, cache: KVCache, valid_BS: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Append tokens_BS to the cache and return float32 logits [B, S, V] (or [B, 1, V] with
        last_only). valid_BS marks real tokens (False = left padding)."""
        cfg = self.config
        tokens_BS = torch.as_tensor(tokens_BS, dtype=torch.long, device=self.device)
        B, S = tokens_BS.shape
        if B != cache.batch:
            raise ValueError(f"tokens batch {B} != cache batch {cache.batch}")
        if cache.length + S > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} slots; {cache.length} used + {S} new exceeds it")
        lo, hi = (int(v) for v in tokens_BS.aminmax())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in 0..{cfg.vocab_size - 1}; got {lo}..{hi}")
        if valid_BS is not None:
            valid_BS = torch.as_tensor(valid_BS, dtype=torch.bool, device=self.device)
            if bool(valid_BS.all()):
                valid_BS = None
        L0, L1 = cache.length, cache.length + S
        if valid_BS is None:        # no padding among the new tokens (every decode step)
            pos_BS = cache.next_pos_B[:, None] + torch.arange(S, device=self.device)
            cache.valid_BL[:, L0:L1] = True
        else:
            pos_BS = (cache.next_pos_B[:, None] + valid_BS.long().cumsum(1) - 1).clamp(min=0)
            cache.valid_BL[:, L0:L1] = valid_BS
        allowed_BSL = None          # one unpadded new token sees every slot: no mask needed
        if S > 1 or valid_BS is not None or not cache.unpadded:
            slots_L = torch.arange(L1, device=self.device)
            query_slot_S = slots_L[L0:]
            allowed_BSL = (slots_L[None, :] <= query_slot_S[:, None])[None] & cache.valid_BL[:, None, :L1]
            allowed_BSL |= (slots_L[None, :] == query_slot_S[:, None])[None]  # padded queries see themselves
        cos, sin = self.rope(pos_BS)
        attend = self._attention_block if self._attention_block is not None and allowed_BSL is None \
            else _attention_block

        x_BSM = self.embed_VM[tokens_BS]
        for i in range(cfg.num_layers):
            w = self.layer_weights(i)
            if self._token_layer is not None and B * S == 1 and allowed_BSL is None:
                x_BSM = self._compiled_token_layer(i, w, x_BSM, cache, cos, sin, L1)
                continue
            x_BSM = attend(self.attention, w.attn_norm, w.attn, x_BSM, cache.k[i], cache.v[i], cos, sin,
                           allowed_BSL, L1)
            if valid_BS is None:
                x_BSM = x_BSM + self.feed_forward(i, w, w.ffn_norm(x_BSM).view(B * S, -1)).view(B, S, -1)
            else:
                h_TM = w.ffn_norm(x_BSM)[valid_BS]
                ffn_BSM = torch.zeros_like(x_BSM)
                ffn_BSM[valid_BS] = self.feed_forward(i, w, h_TM)
                x_BSM = x_BSM + ffn_BSM
        cache.length = L1
        if valid_BS is None:
            cache.next_pos_B += S
        else:
            cache.next_pos_B += valid_BS.sum(1)
            cache.unpadded = False
        if last_only:
            x_BSM = x_BSM[:, -1:]
        return _linear(self.final_norm(x_BSM), self.lm_head_VM, self.lm_head_b).float()

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Float32 logits [S, V] of one sequence (every position, fresh cache)."""
        cache = self.new_cache(1, len(tokens))
        return self.forward(torch.tensor([list(tokens)]), cache)[0]

    # -------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingConfig | None = None, eos_token_id: int | None = None,
                 return_logits: bool = False) -> GenerationOutput:
        """Prefill all prompts as one left-padded batch, then decode one token per sequence per
        step until max_new_tokens or every sequence has produced eos_token_id."""
        sampling = sampling or SamplingConfig()
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed; expected an integer >= 1")
        B, P = len(prompts), max(map(len, prompts))
        tokens_BS = torch.zeros(B, P, dtype=torch.long)
        valid_BS = torch.zeros(B, P, dtype=torch.bool)
        for b, p in enumerate(prompts):
            tokens_BS[b, P - len(p):] = torch.tensor(p)
            valid_BS[b, P - len(p):] = True
        cache = self.new_cache(B, P + max_new_tokens)
        gens = None if sampling.greedy else [torch.Generator().manual_seed(sampling.seed + b) for b in range(B)]
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
        done = [False] * B

        def take(logits_BV: torch.Tensor) -> torch.Tensor:
            next_B = sample_next(logits_BV, sampling, gens)
            for b in range(B):
                if not done[b]:
                    out_tokens[b].append(int(next_B[b]))
                    if return_logits:
                        out_logits[b].append(logits_BV[b].cpu())
                    done[b] = (eos_token_id is not None and int(next_B[b]) == eos_token_id) \
                        or len(out_tokens[b]) >= max_new_tokens
            return next_B

        # Inference mode trims per-op overhead; it is thread-local, and a plugged-in expert_fn may
        # update tensors in place on its own threads, which inference tensors forbid there.
        mode = torch.inference_mode() if self.expert_fn is _default_expert_fn else contextlib.nullcontext()
        with mode:
            t0 = time.perf_counter()
            next_B = take(self.forward(tokens_BS, cache, valid_BS, last_only=True)[:, -1])
            t1 = time.perf_counter()
            steps = 0
            while not all(done):
                next_B = take(self.forward(next_B[:, None], cache, last_only=True)[:, -1])
                steps += 1
            t2 = time.perf_counter()
        step_logits = [torch.stack(l) for l in out_logits] if return_logits else None
        return GenerationOutput(out_tokens, step_logits, t1 - t0, t2 - t1, int(valid_BS.sum()), steps)
