"""A Transformer block in FSMoE's hybrid layout: sequence-parallel, tensor-parallel attention over
the GPUs of a node (MP), then the FSMoE layer (ESP in the node, EP across nodes), each with a
residual; the dense parameters are replicated across nodes (DP), so their gradients are summed
over the data-parallel group, in the MoE backward of the block processed next (FSMoE's gradient
slices) or after the backward.

Attention as Megatron-LM's sequence parallelism does it (ours where FSMoE's text is silent): the
block's input is this GPU's slice of the sequence, [L / N_MP, B, M] (sequence first); an AllGather
over the node rebuilds [L, B, M]; Q, K and V are column-parallel (this GPU's heads), causal
attention runs on them, the output projection is row-parallel, and a ReduceScatter over the node
sums the partial outputs and hands each GPU its slice back. The MoE layer takes the slice's tokens.
Pre-norm LayerNorms (replicated) and no dropout.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from impl.common.comm import Comm, all_gather_autograd, reduce_scatter_autograd
from impl.common.config import ConfigError

from .config import MoELayerConfig
from .layer import FSMoELayer

__all__ = ["SequenceParallelAttention", "FSMoEBlock", "init_attention"]


@torch.no_grad()
def init_attention(heads: int, hidden: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The full (unsharded) attention weights of a block, from the seed alone."""
    g = torch.Generator().manual_seed(int(seed))
    scale = 1 / math.sqrt(hidden)
    return {"w_qkv": (torch.randn(hidden, 3 * hidden, generator=g, dtype=torch.float64) * scale).to(dtype),
            "w_o": (torch.randn(hidden, hidden, generator=g, dtype=torch.float64) * scale).to(dtype)}


class SequenceParallelAttention(nn.Module):
    """Causal multi-head attention, heads split over the node's GPUs, sequence split too."""

    def __init__(self, comm: Comm, hidden: int, heads: int, *, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.comm = comm
        self.group = comm.group("intra", 1) if comm.topology.D > 1 else comm.world
        P = self.group.size
        if heads % P:
            raise ConfigError(f"heads: {heads} is not divisible by the {P} GPUs of a node (tensor parallelism); "
                              f"allowed: a multiple of {P}")
        if hidden % heads:
            raise ConfigError(f"hidden: {hidden} is not divisible by heads={heads}")
        self.hidden, self.heads, self.local_heads = hidden, heads, heads // P
        d, j = hidden // heads, self.group.index(comm.rank)
        full = init_attention(heads, hidden, seed, dtype)
        cols = slice(j * self.local_heads * d, (j + 1) * self.local_heads * d)
        qkv = full["w_qkv"].view(hidden, 3, hidden)[:, :, cols].reshape(hidden, -1)
        self.w_qkv = nn.Parameter(qkv.contiguous())                    # [M, 3 * local heads * d]
        self.w_o = nn.Parameter(full["w_o"][cols, :].contiguous())    # [local heads * d, M]

    def forward(self, x_SBM: torch.Tensor) -> torch.Tensor:
        full = all_gather_autograd(self.comm, x_SBM, self.group)         # [L, B, M]
        L, B, _ = full.shape
        d = self.hidden // self.heads
        q, k, v = (full @ self.w_qkv).view(L, B, 3, self.local_heads, d).permute(2, 1, 3, 0, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # [B, h, L, d]
        partial = attn.permute(2, 0, 1, 3).reshape(L, B, -1) @ self.w_o  # [L, B, M], this GPU's heads
        return reduce_scatter_autograd(self.comm, partial, self.group)   # [L / P, B, M]


class FSMoEBlock(nn.Module):
    """x + Attn(LN(x)), then + MoE(LN(.)) on this GPU's [L / N_MP, B, M] slice."""

    def __init__(self, comm: Comm, cfg: MoELayerConfig, heads: int, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, **layer_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, dtype=dtype)
        self.attention = SequenceParallelAttention(comm, cfg.hidden, heads, seed=seed + 11, dtype=dtype)
        self.norm2 = nn.LayerNorm(cfg.hidden, dtype=dtype)
        self.moe = FSMoELayer(comm, cfg, seed=seed, dtype=dtype, **layer_kwargs)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters replicated across nodes (their gradients are summed over the DP group)."""
        return [*self.norm1.parameters(), *self.attention.parameters(), *self.norm2.parameters()]

    def forward(self, x_SBM: torch.Tensor) -> torch.Tensor:
        h = x_SBM + self.attention(self.norm1(x_SBM))
        S, B, M = h.shape
        return h + self.moe(self.norm2(h).reshape(S * B, M)).view(S, B, M)


def flat_gradients(params: list[nn.Parameter]) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
    """One flat tensor of the parameters' gradients, and the function that writes it back."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])

    def write_back(reduced: torch.Tensor) -> None:
        offset = 0
        for p, g in zip(params, grads):
            p.grad = reduced[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()
    return flat, write_back
