"""ESP-sharded experts with a hand-written backward.

A GPU holds, for each of its node's E / N experts, one ESP shard: the columns j*H/P..(j+1)*H/P of
the first GEMM(s) and the matching rows of the last, P = N_ESP, j = the GPU's index in the node.
Applied to the rows gathered from the whole node, a shard's output is a partial sum; the
ReduceScatter over the node adds the P partial sums, which is the full expert's output.

Weights start as the full expert's (`GroupedExperts.init_from_seed` by global id), then sliced, so
a single-process reference holding whole experts has bit-identical weights.

The backward is written by hand (FSMoE runs its backward as its own pipeline, with its own
degree): `forward_chunk` caches the input rows and the pre-activations of each chunk in
full-capacity buffers of the caller's cache (one per layer call, so several calls may be in
flight), and a backward chunk of another size reads them by capacity slice; `backward_chunk`
returns the input gradient and sums the weight gradients into the caller's dict, with the
activation's exact derivative (gelu's erf form, relu's step, silu's sigmoid(h) (1 + h (1 -
sigmoid(h)))). The caller hands the sums to autograd, so they reach `.grad` like any gradient.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from impl.common.experts import GroupedExperts

__all__ = ["ShardedExperts", "activation_grad"]

_ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh, exactly (no approximation of the activation used in the forward)."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "silu":
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    return cdf + h * pdf


class ShardedExperts(nn.Module):
    """ESP shard `shard` of `num_shards` of the experts `global_ids` ('gpt': w1 [E_l, M, H/P],
    w2 [E_l, H/P, M]; 'mixtral': w_gate, w_up [E_l, M, H/P], w_down [E_l, H/P, M])."""

    def __init__(self, global_ids: list[int], hidden: int, ffn_hidden: int, kind: str, activation: str,
                 shard: int = 0, num_shards: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if ffn_hidden % num_shards:
            raise ValueError(f"ffn_hidden {ffn_hidden} is not divisible by {num_shards} ESP shards")
        self.kind, self.activation, self.global_ids = kind, activation, list(global_ids)
        self.hidden, self.shard_width = hidden, ffn_hidden // num_shards
        lo, hi = shard * self.shard_width, (shard + 1) * self.shard_width
        full = GroupedExperts(len(global_ids), hidden, ffn_hidden, kind="swiglu" if kind == "mixtral" else "gpt",
                              activation=activation).to(dtype)
        full.init_from_seed(self.global_ids, seed)        # in the target dtype, as a reference would
        names = ("w_gate", "w_up", "w_down") if kind == "mixtral" else ("w1", "w2")
        for name in names:
            w = getattr(full, name).detach()
            w = w[:, :, lo:hi] if name != names[-1] else w[:, lo:hi, :]
            self.register_parameter(name, nn.Parameter(w.to(dtype).contiguous()))
        self.names = names

    @property
    def num_local(self) -> int:
        return len(self.global_ids)

    def weights(self) -> tuple[nn.Parameter, ...]:
        """The parameters, in the order `grads_of` returns their gradients."""
        return tuple(getattr(self, n) for n in self.names)

    def new_cache(self, rows_shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Forward caches for a pass whose gathered input is `rows_shape` ([..., E_l, C, M]:
        capacity on the second-last axis), on `device` (the rows'): the backward multiplies them
        with the output gradient, which lives there."""
        cache = {"x": torch.empty(rows_shape, dtype=dtype, device=device)}
        for key in (("g", "u") if self.kind == "mixtral" else ("h",)):
            cache[key] = torch.empty(rows_shape[:-1] + (self.shard_width,), dtype=dtype, device=device)
        return cache

    @torch.no_grad()
    def forward_chunk(self, x: torch.Tensor, cap: slice, cache: dict) -> torch.Tensor:
        """Partial outputs of rows x [..., E_l, c, M] (capacity slice `cap` of the pass), caching
        what the backward needs."""
        cache["x"][..., cap, :] = x
        if self.kind == "mixtral":
            g = torch.einsum("...ecm,emh->...ech", x, self.w_gate)
            u = torch.einsum("...ecm,emh->...ech", x, self.w_up)
            cache["g"][..., cap, :], cache["u"][..., cap, :] = g, u
            return torch.einsum("...ech,ehm->...ecm", F.silu(g) * u, self.w_down)
        h = torch.einsum("...ecm,emh->...ech", x, self.w1)
        cache["h"][..., cap, :] = h
        return torch.einsum("...ech,ehm->...ecm", _ACT[self.activation](h), self.w2)

    @torch.no_grad()
    def backward_chunk(self, dy: torch.Tensor, cap: slice, cache: dict, grads: dict) -> torch.Tensor:
        """Input gradient of the capacity slice `cap` from the output gradient dy [..., E_l, c, M];
        weight gradients are summed into `grads`."""
        x = cache["x"][..., cap, :]

        def add(name: str, g: torch.Tensor) -> None:
            grads[name] = g if name not in grads else grads[name] + g

        if self.kind == "mixtral":
            g, u = cache["g"][..., cap, :], cache["u"][..., cap, :]
            add("w_down", torch.einsum("...ech,...ecm->ehm", F.silu(g) * u, dy))
            da = torch.einsum("...ecm,ehm->...ech", dy, self.w_down)
            dg, du = da * u * activation_grad("silu", g), da * F.silu(g)
            add("w_gate", torch.einsum("...ecm,...ech->emh", x, dg))
            add("w_up", torch.einsum("...ecm,...ech->emh", x, du))
            return torch.einsum("...ech,emh->...ecm", dg, self.w_gate) + torch.einsum("...ech,emh->...ecm", du, self.w_up)
        h = cache["h"][..., cap, :]
        add("w2", torch.einsum("...ech,...ecm->ehm", _ACT[self.activation](h), dy))
        dh = torch.einsum("...ecm,ehm->...ech", dy, self.w2) * activation_grad(self.activation, h)
        add("w1", torch.einsum("...ecm,...ech->emh", x, dh))
        return torch.einsum("...ech,emh->...ecm", dh, self.w1)

    def grads_of(self, grads: dict) -> tuple[torch.Tensor, ...]:
        """The summed weight gradients in `weights()` order (zeros where a pass saw no rows)."""
        return tuple(grads.get(n, torch.zeros_like(getattr(self, n))) for n in self.names)
