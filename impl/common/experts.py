"""Expert FFNs grouped over the local experts of one rank.

Weights are stacked per local expert (`[E_local, ...]`) so one rank's experts are a single module
whose parameters can be sliced per expert for expert swap and checkpointing. Initialisation is by
*global* expert id: an expert's weights depend only on (seed, global id), so an expert-parallel
shard and a single-process dense reference holding all E experts get bit-identical weights, which
is what makes the dispatcher exactness tests meaningful.

Shapes: M = model hidden size, H = expert FFN hidden size, R = dispatched rows.
* GPT FFN (2 GEMMs):    y = act(x @ w1 [+ b1]) @ w2 [+ b2]           w1: [E, M, H], w2: [E, H, M]
* SwiGLU FFN (3 GEMMs): y = (silu(x @ w_gate) * (x @ w_up)) @ w_down w_gate, w_up: [E, M, H], w_down: [E, H, M]
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GroupedExperts", "FFN_KINDS", "ACTIVATIONS", "expert_flops"]

FFN_KINDS = ("gpt", "swiglu")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class GroupedExperts(nn.Module):
    """`num_local_experts` FFN experts; `forward(x_RM, tokens_per_expert)` takes rows grouped
    contiguously by local expert (the order every dispatcher produces)."""

    def __init__(self, num_local_experts: int, hidden: int, ffn_hidden: int, kind: str = "gpt",
                 bias: bool = False, activation: str = "gelu"):
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"ffn kind {kind!r} is not supported; allowed: {', '.join(FFN_KINDS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")
        if kind == "swiglu" and bias:
            raise ValueError("bias=True is only supported for kind='gpt' (SwiGLU experts have no bias)")
        for name, v in (("num_local_experts", num_local_experts), ("hidden", hidden), ("ffn_hidden", ffn_hidden)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.num_local_experts, self.hidden, self.ffn_hidden = num_local_experts, hidden, ffn_hidden
        self.kind, self.bias, self.activation = kind, bias, activation
        for name, shape in self._shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(num_local_experts, *shape)))
        self.init_from_seed(list(range(num_local_experts)), seed=0)

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        M, H = self.hidden, self.ffn_hidden
        if self.kind == "swiglu":
            return {"w_gate": (M, H), "w_up": (M, H), "w_down": (H, M)}
        shapes = {"w1": (M, H), "w2": (H, M)}
        if self.bias:
            shapes.update(b1=(H,), b2=(M,))
        return shapes

    @torch.no_grad()
    def init_from_seed(self, global_expert_ids: Sequence[int], seed: int) -> None:
        """Initialise local expert i from (seed, global_expert_ids[i]) alone."""
        if len(global_expert_ids) != self.num_local_experts:
            raise ValueError(f"got {len(global_expert_ids)} global expert ids for "
                             f"{self.num_local_experts} local experts")
        for i, e in enumerate(global_expert_ids):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(e))
            for name, shape in self._shapes().items():
                fan_in = shape[0] if len(shape) == 2 else self.hidden
                w = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
                if name.startswith("b"):
                    w = w * 0.1
                getattr(self, name)[i].copy_(w.to(getattr(self, name).dtype))

    def forward_one(self, local_idx: int, x_RM: torch.Tensor) -> torch.Tensor:
        """Apply local expert `local_idx` to rows `x_RM`."""
        p = {name: getattr(self, name)[local_idx] for name in self._shapes()}
        if self.kind == "swiglu":
            return (F.silu(x_RM @ p["w_gate"]) * (x_RM @ p["w_up"])) @ p["w_down"]
        h = x_RM @ p["w1"]
        if self.bias:
            h = h + p["b1"]
        y = ACTIVATIONS[self.activation](h) @ p["w2"]
        return y + p["b2"] if self.bias else y

    def forward(self, x_RM: torch.Tensor, tokens_per_expert: Sequence[int]) -> torch.Tensor:
        counts = [int(c) for c in tokens_per_expert]
        if len(counts) != self.num_local_experts:
            raise ValueError(f"tokens_per_expert has {len(counts)} entries for {self.num_local_experts} local experts")
        if sum(counts) != x_RM.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {sum(counts)} but x has {x_RM.shape[0]} rows")
        if x_RM.shape[0] == 0:
            # Keep the graph connected to the input and to every parameter: the backward of the
            # collective that delivered x_RM must run on this rank too (its peers wait for it),
            # and the parameters get zero gradients, not None.
            total = sum(getattr(self, name).sum() for name in self._shapes())
            return x_RM @ x_RM.new_zeros(self.hidden, self.hidden) + 0 * total
        outs = [self.forward_one(i, rows) for i, rows in enumerate(x_RM.split(counts)) if rows.shape[0]]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def expert_state(self, local_idx: int) -> dict[str, torch.Tensor]:
        """A copy of one expert's weights (what an expert swap moves between ranks)."""
        return {name: getattr(self, name)[local_idx].detach().clone() for name in self._shapes()}

    @torch.no_grad()
    def load_expert_state(self, local_idx: int, state: dict[str, torch.Tensor]) -> None:
        names = set(self._shapes())
        if set(state) != names:
            raise KeyError(f"expert state has keys {sorted(state)}; expected {sorted(names)}")
        for name, value in state.items():
            getattr(self, name)[local_idx].copy_(value)

    def extra_repr(self) -> str:
        return (f"num_local_experts={self.num_local_experts}, hidden={self.hidden}, "
                f"ffn_hidden={self.ffn_hidden}, kind={self.kind}, bias={self.bias}")


def expert_flops(rows: int, hidden: int, ffn_hidden: int, kind: str) -> int:
    """Forward FLOPs of `rows` tokens through one expert (2 per multiply-add)."""
    gemms = 3 if kind == "swiglu" else 2
    return 2 * rows * hidden * ffn_hidden * gemms
