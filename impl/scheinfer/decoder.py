"""The reference decoder for the models ScheInfer serves: LLaMA-2 (dense), Mixtral (MoE, softmax
top-2), Qwen-MoE (routed experts + a sigmoid-gated shared expert) and Phi-3.5-MoE (SparseMixer
top-2, LayerNorm, biased attention and LM head).

Why one model: ScheInfer only changes *where* each FFN / expert slice runs (CC / CG / GG,
scheinfer.md 2.2); everything else (attention, norms, routing, sampling) is one code path that
the engine reuses and that is checked against llama.cpp and between weight formats. It is plain
eager PyTorch (layers.py); `fast_decode.FastDecoder` is the same model with the paths that exist
for speed, tested equal to this one.

Conventions
* Semantics are Hugging Face's for every architecture (the checkpoints' own reference code);
  RoPE is HF's rotate-half form on HF-layout q/k weights. GGUF 'llama' files store q/k rows
  permuted for llama.cpp's interleaved-pair RoPE; `weights.py` undoes that permutation on load,
  so one RoPE serves both formats.
* Every FFN and expert goes through `run_ffns`, which calls `expert_fn(layer, expert, weights,
  x_TM)` (default: `layers.ffn`) for each; the engine replaces it to run a layer's slices on
  different devices. `route_observer` sees every routing decision.
* Weights come from a `WeightSource` (weights.py) by canonical name (`config.weight_shapes`). With
  `cache_weights=False` the decoder fetches each layer's tensors when it runs that layer and drops
  them afterwards, so a lazily generated real-size model never sits in memory whole.
* Batches of prompts are left-padded into one KV cache; padded slots are masked out of attention
  and skipped by the FFN / MoE (which therefore see only real tokens), and each sequence's RoPE
  positions count its own real tokens only, so a prompt's outputs do not depend on its batch.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import EXPERT_PARTS, DecoderConfig, expert_weight_names
from .layers import (AttentionWeights, ExpertWeights, KVCache, LayerWeights, MoEWeights, Norm, attention, ffn,
                     gate_shared, rope_cos_sin, route)
from .sampling import GenerationOutput, SamplingConfig, sample_next
from .weights import WeightSource, load_weights

__all__ = ["ExpertFn", "RouteObserver", "FFNItem", "Decoder", "load_decoder"]

ExpertFn = Callable[[int, "int | str", ExpertWeights, torch.Tensor], torch.Tensor]
RouteObserver = Callable[[int, torch.Tensor, torch.Tensor], None]
FFNItem = tuple[Hashable, ExpertWeights, torch.Tensor]      # (expert id | 'shared' | 'dense', weights, x_TM)


def _plain_expert_fn(layer: int, expert: int | str, w: ExpertWeights, x_TM: torch.Tensor) -> torch.Tensor:
    return ffn(w, x_TM)


class Decoder:
    """The model (module doc). `expert_fn(layer, expert, weights, x_TM) -> y_TM` computes every
    FFN (expert is the routed expert's id, 'shared' or 'dense'); `route_observer(layer, ids_TK,
    weights_TK)` is called with every MoE routing decision (real tokens only)."""

    default_expert_fn: ExpertFn = staticmethod(_plain_expert_fn)

    def __init__(self, source: WeightSource, *, dtype: torch.dtype = torch.float32, device="cpu",
                 cache_weights: bool = True, expert_fn: ExpertFn | None = None,
                 route_observer: RouteObserver | None = None):
        self.source = source
        self.config: DecoderConfig = source.config
        self.dtype = dtype
        self.device = torch.device(device)
        self.expert_fn: ExpertFn = expert_fn or self.default_expert_fn
        self.route_observer = route_observer
        cfg = self.config
        self.embed_VM = self._w("embed.weight")
        self.final_norm = self._norm("norm")
        self.lm_head_VM = self.embed_VM if cfg.tie_word_embeddings else self._w("lm_head.weight")
        self.lm_head_b = self._w("lm_head.bias") if cfg.lm_head_bias else None
        self._layers = [self.layer_weights(i) for i in range(cfg.num_layers)] if cache_weights else None

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
        names = expert_weight_names(prefix)
        return ExpertWeights(*(self._w(names[p]) for p in EXPERT_PARTS))

    def _attention_weights(self, i: int) -> AttentionWeights:
        cfg, p = self.config, f"layers.{i}.attn"
        bias = lambda n, present: self._w(f"{p}.{n}.bias") if present else None  # noqa: E731
        return AttentionWeights(
            q_w=self._w(f"{p}.q.weight"), k_w=self._w(f"{p}.k.weight"), v_w=self._w(f"{p}.v.weight"),
            o_w=self._w(f"{p}.o.weight"), q_b=bias("q", cfg.qkv_bias), k_b=bias("k", cfg.qkv_bias),
            v_b=bias("v", cfg.qkv_bias), o_b=bias("o", cfg.out_proj_bias))

    def _moe_weights(self, i: int) -> MoEWeights:
        cfg, p = self.config, f"layers.{i}.moe"
        return MoEWeights(
            router_EM=self._w(f"{p}.router.weight"),
            experts=tuple(self._expert(f"{p}.experts.{e}") for e in range(cfg.num_experts)),
            shared=self._expert(f"{p}.shared") if cfg.shared_expert_ffn_hidden else None,
            shared_gate_1M=self._w(f"{p}.shared_gate.weight") if cfg.shared_expert_gate else None)

    def layer_weights(self, i: int) -> LayerWeights:
        """Layer i's weights in the compute dtype / device (cached ones when cache_weights)."""
        if getattr(self, "_layers", None) is not None:
            return self._layers[i]
        p = f"layers.{i}"
        dense, moe = (None, self._moe_weights(i)) if self.config.is_moe_layer(i) else (self._expert(f"{p}.ffn"), None)
        return LayerWeights(self._norm(f"{p}.attn_norm"), self._attention_weights(i), self._norm(f"{p}.ffn_norm"),
                            dense, moe)

    # -------------------------------------------------------------- pieces

    def rope(self, pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, S, D] of positions pos_BS in the compute dtype and device."""
        return tuple(t.to(self.device, self.dtype) for t in rope_cos_sin(self.config, pos_BS))

    def attention_mask(self, cache: KVCache, L0: int, L1: int, padded: bool) -> torch.Tensor | None:
        """allowed_BSL: new position s (cache slot L0 + s) sees the real tokens of slots <= its own,
        and itself (so a padded query is never left without a key). `padded`: some of the new
        positions are padding (cache.valid_BL says which)."""
        slots_L = torch.arange(L1, device=self.device)
        query_slot_S = slots_L[L0:]
        allowed_BSL = (slots_L[None, :] <= query_slot_S[:, None])[None] & cache.valid_BL[:, None, :L1]
        return allowed_BSL | (slots_L[None, :] == query_slot_S[:, None])[None]

    def route(self, i: int, w: MoEWeights, x_TM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids_TK, weights_TK = route(self.config, F.linear(x_TM, w.router_EM))
        if self.route_observer is not None:
            self.route_observer(i, ids_TK, weights_TK)
        return ids_TK, weights_TK

    def run_ffns(self, i: int, items: Sequence[FFNItem], layer_tokens: int) -> list[torch.Tensor]:
        """y_TM of each FFN of layer i: items = [(expert, weights, x_TM)]; layer_tokens is the
        layer's number of (real) tokens."""
        return [self.expert_fn(i, e, w, x_TM) for e, w, x_TM in items]

    def moe(self, i: int, w: MoEWeights, x_TM: torch.Tensor) -> torch.Tensor:
        """Routed experts (each on its own tokens, weighted by the router) plus the shared expert."""
        ids_TK, weights_TK = self.route(i, w, x_TM)
        experts = ids_TK.unique().tolist()
        picks = [(ids_TK == e).nonzero(as_tuple=True) for e in experts]
        items = [(e, w.experts[e], x_TM[tok_T]) for e, (tok_T, _) in zip(experts, picks)]
        if w.shared is not None:
            items.append(("shared", w.shared, x_TM))
        ys = self.run_ffns(i, items, x_TM.shape[0])
        y_TM = torch.zeros_like(x_TM)
        for (tok_T, slot_T), y_e in zip(picks, ys):
            y_TM.index_add_(0, tok_T, y_e * weights_TK[tok_T, slot_T, None].to(y_e.dtype))
        return y_TM if w.shared is None else y_TM + gate_shared(w, x_TM, ys[-1])

    def feed_forward(self, i: int, w: LayerWeights, x_TM: torch.Tensor) -> torch.Tensor:
        if w.moe is not None:
            return self.moe(i, w.moe, x_TM)
        return self.run_ffns(i, [("dense", w.dense, x_TM)], x_TM.shape[0])[0]

    def attention_block(self, i: int, w: LayerWeights, x_BSM: torch.Tensor, cache: KVCache, cos_BSD: torch.Tensor,
                        sin_BSD: torch.Tensor, allowed_BSL: torch.Tensor | None, L1: int) -> torch.Tensor:
        """x + attention(norm(x)): the pre-norm attention half of layer i."""
        return x_BSM + attention(self.config, w.attn, w.attn_norm(x_BSM), cache.k[i], cache.v[i], cos_BSD, sin_BSD,
                                 allowed_BSL, L1)

    def ffn_block(self, i: int, w: LayerWeights, x_BSM: torch.Tensor, valid_BS: torch.Tensor | None) -> torch.Tensor:
        """x + FFN(norm(x)) on the real tokens (valid_BS None: all of them)."""
        B, S, _ = x_BSM.shape
        h_BSM = w.ffn_norm(x_BSM)
        if valid_BS is None:
            return x_BSM + self.feed_forward(i, w, h_BSM.view(B * S, -1)).view(B, S, -1)
        ffn_BSM = torch.zeros_like(x_BSM)
        ffn_BSM[valid_BS] = self.feed_forward(i, w, h_BSM[valid_BS])
        return x_BSM + ffn_BSM

    def layer(self, i: int, w: LayerWeights, x_BSM: torch.Tensor, cache: KVCache, cos_BSD: torch.Tensor,
              sin_BSD: torch.Tensor, allowed_BSL: torch.Tensor | None, valid_BS: torch.Tensor | None,
              L1: int) -> torch.Tensor:
        x_BSM = self.attention_block(i, w, x_BSM, cache, cos_BSD, sin_BSD, allowed_BSL, L1)
        return self.ffn_block(i, w, x_BSM, valid_BS)

    def lm_head(self, x_BSM: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BSM, self.lm_head_VM, self.lm_head_b)

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
        allowed_BSL = self.attention_mask(cache, L0, L1, padded=valid_BS is not None)
        cos_BSD, sin_BSD = self.rope(pos_BS)

        x_BSM = self.embed_VM[tokens_BS]
        for i in range(cfg.num_layers):
            x_BSM = self.layer(i, self.layer_weights(i), x_BSM, cache, cos_BSD, sin_BSD, allowed_BSL, valid_BS, L1)
        cache.length = L1
        if valid_BS is None:
            cache.next_pos_B += S
        else:
            cache.next_pos_B += valid_BS.sum(1)
            cache.unpadded = False
        if last_only:
            x_BSM = x_BSM[:, -1:]
        return self.lm_head(self.final_norm(x_BSM)).float()

    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """Float32 logits [S, V] of one sequence (every position, fresh cache)."""
        cache = self.new_cache(1, len(tokens))
        return self.forward(torch.tensor([list(tokens)]), cache)[0]

    # -------------------------------------------------------------- generation

    def generation_mode(self) -> contextlib.AbstractContextManager:
        """The autograd mode generate runs in."""
        return torch.no_grad()

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

        with self.generation_mode():
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


def load_decoder(path: str | Path, **decoder_kwargs) -> Decoder:
    """The reference decoder over weights.load_weights(path); keyword arguments go to Decoder."""
    return Decoder(load_weights(path), **decoder_kwargs)
