"""The building blocks of the reference decoder, written as the Hugging Face models compute them:
weight containers, RMSNorm / LayerNorm, rotate-half RoPE, attention over a KV cache, the SwiGLU
FFN and the MoE router.

Why plain: this is the code a reader checks against the checkpoints' reference implementations
and llama.cpp; the fast decode path (fast_decode.py) is tested equal to it.

Two properties the engine relies on:
* `ffn` is exact under slicing of the intermediate dimension F: a slice is a row slice of gate /
  up plus a column slice of down (`ExpertWeights.slice`), and the slices' outputs sum to the whole,
  y = sum_s ffn(w.slice(s), x). ScheInfer's CC / CG / GG bands are such slices (scheinfer.md 2.2).
* `route` is the one router of every decoder, the engine and the sim tier; its top-k orders
  equal scores as llama.cpp does (see `route`).

Shape letters: B batch, S new positions, L cache slots, V vocab, M hidden, F FFN width, H query
heads, G key/value heads, D head dim, T tokens, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DecoderConfig

__all__ = ["ExpertWeights", "ffn", "Norm", "AttentionWeights", "MoEWeights", "LayerWeights", "route",
           "rope_cos_sin", "rotate_half", "apply_rope", "project_qkv", "append_to_cache", "attention",
           "gate_shared", "KVCache"]


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


def ffn(w: ExpertWeights, x_TM: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN; exact under slicing of F: sum over disjoint slices s of ffn(w.slice(s), x)."""
    return F.linear(F.silu(F.linear(x_TM, w.gate_FM)) * F.linear(x_TM, w.up_FM), w.down_MF)


@dataclass(frozen=True)
class Norm:
    """RMSNorm (LLaMA, Mixtral, Qwen; computed in float32 as HF does) or LayerNorm (Phi-3.5-MoE).
    A bias after RMSNorm is what llama.cpp computes for a 'phimoe' file (weights.py)."""

    weight_M: torch.Tensor
    bias_M: torch.Tensor | None
    kind: str
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight_M, self.bias_M, self.eps)
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


@dataclass(frozen=True)
class MoEWeights:
    router_EM: torch.Tensor
    experts: tuple[ExpertWeights, ...]
    shared: ExpertWeights | None = None
    shared_gate_1M: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Norm
    attn: AttentionWeights
    ffn_norm: Norm
    dense: ExpertWeights | None = None
    moe: MoEWeights | None = None


# ----------------------------------------------------------------------------------- routing

def route(cfg: DecoderConfig, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK, weights_TK) of the model's router, computed in float32 like the HF references.

    Softmax top-k picks the k largest probabilities; equal ones in ascending expert order, the
    order llama.cpp gives them: its MoE graph selects experts with ggml_argsort_top_k (a
    descending argsort of the probabilities, then the first k), whose CPU kernel is std::sort with
    a strict '>' comparison, and libstdc++'s std::sort is an insertion sort, hence stable, up to 16
    elements (Mixtral's 8 and Phi-3.5's 16 experts). Beyond 16 (Qwen1.5-MoE's 60) std::sort leaves
    the order of equal elements unspecified, and llama.cpp's choice among exactly equal
    probabilities is not reproduced. torch.topk gives no defined order at all."""
    logits_TE = logits_TE.float()
    if cfg.router == "sparsemixer":
        return _sparsemixer(logits_TE, cfg.router_jitter_eps)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TE, ids_TE = probs_TE.sort(dim=-1, descending=True, stable=True)
    weights_TK, ids_TK = weights_TE[:, :cfg.top_k], ids_TE[:, :cfg.top_k]
    if cfg.normalize_topk:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return ids_TK, weights_TK


def _sparsemixer(scores_TE: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's SparseMixer at inference: expert 1 is the arg-max, weighted by a softmax over
    the experts whose score lies within a relative 2*eps of it; expert 2 likewise among the rest.
    Equal maxima go to the lowest expert id (torch.max returns the first), as in `route`."""
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


def gate_shared(w: MoEWeights, x_TM: torch.Tensor, shared_TM: torch.Tensor) -> torch.Tensor:
    """The shared expert's output scaled by its sigmoid gate (Qwen-MoE), if it has one."""
    return shared_TM if w.shared_gate_1M is None else torch.sigmoid(F.linear(x_TM, w.shared_gate_1M)) * shared_TM


# ----------------------------------------------------------------------------------- attention

def rope_cos_sin(cfg: DecoderConfig, pos_BS: torch.Tensor, long: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cos and sin [..., D] of RoPE at positions pos_BS (HF rotate-half layout). With
    Phi-3.5's longrope, `long` picks the factors and scale; None: 'long' iff the largest position
    passes original_max_position_embeddings (HF decides per forward call). Computed on the CPU, so
    every device gets the same values."""
    half = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    inv_freq, scale = 1.0 / (cfg.rope_theta ** half), 1.0
    pos_BS = pos_BS.cpu()
    rs = cfg.rope_scaling
    if rs is not None:
        if long is None:
            long = int(pos_BS.max()) + 1 > rs.original_max_position_embeddings
        ext = torch.tensor(rs.long_factor if long else rs.short_factor, dtype=torch.float32)
        inv_freq, scale = inv_freq / ext, (rs.long_mscale if long else rs.short_mscale)
    freqs = pos_BS.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def project_qkv(cfg: DecoderConfig, w: AttentionWeights, h_BSM: torch.Tensor, linear=F.linear
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, S, D], k and v [B, G, S, D] of h_BSM, before RoPE."""
    B, S, _ = h_BSM.shape
    heads = lambda t, n: t.view(B, S, n, cfg.head_dim).transpose(1, 2)  # noqa: E731
    return (heads(linear(h_BSM, w.q_w, w.q_b), cfg.num_heads), heads(linear(h_BSM, w.k_w, w.k_b), cfg.num_kv_heads),
            heads(linear(h_BSM, w.v_w, w.v_b), cfg.num_kv_heads))


def append_to_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor,
                    L1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the S new keys / values to slots L1 - S .. L1 - 1 of a layer's cache [B, G, max_len, D];
    return the cache's first L1 slots."""
    L0 = L1 - k_BGSD.shape[2]
    k_cache[:, :, L0:L1] = k_BGSD
    v_cache[:, :, L0:L1] = v_BGSD
    return k_cache[:, :, :L1], v_cache[:, :, :L1]


def attention(cfg: DecoderConfig, w: AttentionWeights, h_BSM: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor, allowed_BSL: torch.Tensor,
              L1: int) -> torch.Tensor:
    """Attention of one layer: the S new positions written to its cache, then each query attends
    to the cached slots allowed_BSL marks."""
    B, S, _ = h_BSM.shape
    q_BHSD, k_BGSD, v_BGSD = project_qkv(cfg, w, h_BSM)
    cos, sin = cos_BSD[:, None], sin_BSD[:, None]
    q_BHSD, k_BGSD = apply_rope(q_BHSD, cos, sin), apply_rope(k_BGSD, cos, sin)
    k_BGLD, v_BGLD = append_to_cache(k_cache, v_cache, k_BGSD, v_BGSD, L1)
    o_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BGLD, v_BGLD, attn_mask=allowed_BSL[:, None],
                                            enable_gqa=cfg.num_kv_heads != cfg.num_heads)
    return F.linear(o_BHSD.transpose(1, 2).reshape(B, S, -1), w.o_w, w.o_b)


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
        self.unpadded = True        # every used slot holds a real token

    @property
    def batch(self) -> int:
        return self.valid_BL.shape[0]
