"""llama.cpp's layer offload (`-ngl N`) as a `impl.scheinfer.policy.Policy`, registered as the engine
policy 'layers' (scheinfer.md 8.2), so the engine and the sim tier can run llama.cpp's placement
on the same model as ScheInfer's.

What is llama.cpp's: whole layers resident on the GPU, as many as fit, the last ones (-ngl N
holds the output layer and the last N - 1: `runner.ngl_layers`); with `head_bytes` (the output
head's GPU bytes, given by a caller whose budget counts it, as the sim tier's does) the head takes
the budget first, any N >= 1 holding it, and without room for it no layer is on the GPU
(`place_head`); a CPU-resident layer is computed on the CPU when the layer's batch has fewer than `min_batch`
tokens, else its weights are copied to the GPU and computed there (ggml's CUDA offload rule,
min_batch_size = 32); parts run one after another. A layer's GPU bytes are its FFN rows plus
`layer_bytes[i]`: what else -ngl puts on the GPU with the layer (attention, norms, router, its KV
cache), given by the caller that accounts for it (the sim tier; the engine's budget counts FFN
rows only and keeps attention on its device for every policy).
What differs: `order='first'` (the first N layers) exists for ablations.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from impl.common.config import ConfigError
from impl.common.registry import register
from impl.scheinfer.assign import ExpertLoad
from impl.scheinfer.partition import Split
from impl.scheinfer.policy import POLICY_KIND, Policy

__all__ = ["LayersPolicy", "OFFLOAD_MIN_BATCH"]

# ggml's CUDA backend computes a CPU-resident layer's products on the GPU (weights copied) from
# this many tokens of a batch on (ggml-cuda.cu: min_batch_size)
OFFLOAD_MIN_BATCH = 32


@register(POLICY_KIND, "layers")
class LayersPolicy(Policy):
    """Whole layers resident, the rest on the CPU or copied per layer (module doc)."""

    name = "layers"
    concurrent = False
    staging_buffers = 1
    whole_layers = True

    def __init__(self, num_layers: int, order: str = "last", min_batch: int = OFFLOAD_MIN_BATCH,
                 layer_bytes: Mapping[int, int] | None = None, head_bytes: int | None = None):
        if order not in ("last", "first"):
            raise ConfigError(f"layers order={order!r} is not allowed; expected 'last' or 'first'")
        if head_bytes is not None and head_bytes < 0:
            raise ConfigError(f"layers head_bytes={head_bytes!r} is not allowed; expected >= 0")
        self.num_layers, self.order, self.min_batch = num_layers, order, min_batch
        self.layer_bytes = dict(layer_bytes or {})
        self.head_bytes = head_bytes

    @classmethod
    def build(cls, *, cost, hidden, num_layers, dtype_bytes, tile=64, **options):
        return cls(num_layers, **options)

    def place_head(self, budget_bytes: int) -> tuple[bool, int]:
        """(whether the output head is on the GPU, the budget left for the layers and the staging
        buffer): -ngl N >= 1 puts the output layer on the GPU before any repeating layer
        (`runner.ngl_layers`), so the head takes `head_bytes` of the budget first, and where it
        does not fit, N = 0: nothing is on the GPU. Without head_bytes the head is not the
        budget's (True, budget_bytes)."""
        if self.head_bytes is None:
            return super().place_head(budget_bytes)
        if budget_bytes >= self.head_bytes:
            return True, budget_bytes - self.head_bytes
        return False, 0

    def gpu_layers(self, ffns, hidden, dtype_bytes, budget_bytes) -> list[int]:
        """The layers of `ffns` that go on the GPU within budget_bytes, in placement order. Computed
        per call (no state): a layer with no FFN bytes in `ffns` is neither counted nor placed, so
        FFNs met one at a time (the engine's expert_fn path) are placed within the budget given."""
        per_layer: dict[int, int] = {}
        for (i, _), w in ffns.items():
            per_layer[i] = per_layer.get(i, 0) + w * 3 * hidden * dtype_bytes
        left, out = budget_bytes, []
        for i in sorted((i for i, b in per_layer.items() if b > 0), reverse=self.order == "last"):
            need = per_layer[i] + self.layer_bytes.get(i, 0)
            if need > left:
                break
            out.append(i)
            left -= need
        return out

    def resident(self, ffns, hidden, dtype_bytes, budget_bytes):
        on_gpu = set(self.gpu_layers(ffns, hidden, dtype_bytes, budget_bytes))
        return {k: (w if k[0] in on_gpu else 0) for k, w in ffns.items()}

    def plan(self, layer: int, loads: Sequence[ExpertLoad], phase: str, layer_tokens: int,
             cg_max: int | None) -> list[Split]:
        out = []
        for ld in loads:
            r = ld.width - ld.gg
            to_gpu = layer_tokens >= self.min_batch and (cg_max is None or r <= cg_max)
            out.append(Split(0, r, ld.gg) if to_gpu else Split(r, 0, ld.gg))
        return out
