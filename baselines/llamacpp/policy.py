"""llama.cpp's layer offload (`-ngl N`) as a `impl.scheinfer.policy.Policy`, registered as the engine
policy 'layers' (scheinfer.md 8.2), so the engine and the sim tier can run llama.cpp's placement
on the same model as ScheInfer's.

What is llama.cpp's: the FFNs of N whole layers resident on the GPU, N the most that fit, the last
N layers (llama.cpp's i_gpu_start = n_layer - N); a CPU-resident layer is computed on the CPU when
the layer's batch has fewer than `min_batch` tokens, else its weights are copied to the GPU and
computed there (ggml's CUDA offload rule, min_batch_size = 32); parts run one after another.
What differs: `order='first'` (the first N layers) exists for ablations; attention is not placed
here (the engine keeps it on its device for every policy).
"""
from __future__ import annotations

from typing import Sequence

from impl.common.config import ConfigError
from impl.common.registry import register
from impl.scheinfer.assign import ExpertLoad
from impl.scheinfer.partition import CostModel, Split
from impl.scheinfer.policy import POLICY_KIND, Policy

__all__ = ["LayersPolicy"]


class LayersPolicy(Policy):
    """Whole layers resident, the rest on the CPU or copied per layer (module doc)."""

    name = "layers"
    concurrent = False
    staging_buffers = 1

    def __init__(self, num_layers: int, order: str = "last", min_batch: int = 32):
        if order not in ("last", "first"):
            raise ConfigError(f"layers order={order!r} is not allowed; expected 'last' or 'first'")
        self.num_layers, self.order, self.min_batch = num_layers, order, min_batch
        self.gpu_layers: set[int] = set()

    def resident(self, ffns, hidden, dtype_bytes, budget_bytes):
        per_layer = {i: 0 for i in range(self.num_layers)}
        for (i, _), w in ffns.items():
            per_layer[i] += w * 3 * hidden * dtype_bytes
        seq = range(self.num_layers - 1, -1, -1) if self.order == "last" else range(self.num_layers)
        left = budget_bytes
        for i in seq:
            if per_layer[i] > left:
                break
            self.gpu_layers.add(i)
            left -= per_layer[i]
        return {k: (w if k[0] in self.gpu_layers else 0) for k, w in ffns.items()}

    def plan(self, layer: int, loads: Sequence[ExpertLoad], phase: str, layer_tokens: int,
             cg_max: int | None) -> list[Split]:
        out = []
        for ld in loads:
            r = ld.width - ld.gg
            to_gpu = layer_tokens >= self.min_batch and (cg_max is None or r <= cg_max)
            out.append(Split(0, r, ld.gg) if to_gpu else Split(r, 0, ld.gg))
        return out


@register(POLICY_KIND, "layers")
def _layers(*, cost: CostModel | None, hidden: int, num_layers: int, dtype_bytes: int, tile: int = 64,
            **options) -> LayersPolicy:
    return LayersPolicy(num_layers, **options)
