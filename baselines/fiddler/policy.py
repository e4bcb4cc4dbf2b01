"""Fiddler's CPU-GPU orchestration as a `impl.scheinfer.policy.Policy` (scheinfer.md 8.1), registered
as the engine policy 'fiddler'.

What is Fiddler's (read from src/fiddler/mixtral.py at 227715b, re-expressed, no code copied):
* whole experts are resident on the GPU in decreasing popularity until the memory is used
  (Fiddler: an offline-profiled (layer, expert) list and floor(budget / expert bytes) of them);
* per layer and step, an expert with n_e tokens that is not resident runs on the CPU when
  n_e * latency_cpu < latency_gpu (copy + run), else its weights are copied to the GPU and run
  there; a resident expert always runs on the GPU;
* no overlap: GPU experts first, then CPU experts; one staging expert on the GPU.

What differs, and why:
* The cost constants come from the calibrated cost model (impl.scheinfer.calibrate), not Fiddler's
  7 / 70 "TODO" constants: cpu = T_cpu(n_e, F), gpu = T_h2d(F) + T_gpu(n_e, F). Fiddler's own
  constants are available as `FIDDLER_CONSTANTS` via `constants=` for the as-published setting.
* Fiddler enumerates 2^E assignments minimising a *sum*, which equals each expert choosing its
  cheaper side independently; that is what `plan` does.
* Popularity: tokens per FFN from a routing trace (`impl.scheinfer.policy.PopularityCounter`, e.g.
  as a `Decoder.route_observer`; a shared expert counts every token of its layer) or, without
  one, key order. Fiddler ships an offline profile; the ScheInfer CLI makes one per run on a
  calibration prompt (`impl.scheinfer.policy.profile_popularity`), the sim tier counts the routing
  it simulates. Fiddler itself supports Mixtral only (its list is for Mixtral-8x7B); on other
  models (shared experts, Phi's SparseMixer routing) this is our port of its policy.
"""
from __future__ import annotations

from typing import Hashable, Mapping, Sequence

from impl.common.registry import register
from impl.scheinfer.assign import ExpertLoad
from impl.scheinfer.partition import CostModel, Split, lane_times, resident_rows
from impl.scheinfer.policy import POLICY_KIND, Policy, needs_cost

__all__ = ["FiddlerPolicy", "FIDDLER_CONSTANTS"]

FIDDLER_CONSTANTS = {"latency_cpu": 7.0, "latency_gpu": 70.0}     # per token / per non-resident expert


@register(POLICY_KIND, "fiddler")
class FiddlerPolicy(Policy):
    name = "fiddler"
    concurrent = False
    staging_buffers = 1
    uses_popularity = True

    def __init__(self, cost: CostModel, hidden: int, dtype_bytes: int,
                 popularity: Mapping[tuple[int, Hashable], float] | None = None,
                 constants: Mapping[str, float] | None = None):
        self.cost, self.hidden, self.dtype_bytes = cost, hidden, dtype_bytes
        self.popularity = dict(popularity or {})
        self.constants = dict(constants) if constants is not None else None

    @classmethod
    def build(cls, *, cost, hidden, num_layers, dtype_bytes, tile=64, **options):
        return cls(needs_cost(cls.name, cost), hidden, dtype_bytes, **options)

    def resident(self, ffns, hidden, dtype_bytes, budget_bytes):
        return resident_rows(ffns, hidden, dtype_bytes, budget_bytes, tile=1, mode="popularity",
                             popularity=self.popularity)

    def on_cpu(self, n: int, width: int) -> bool:
        """True when a non-resident expert with n tokens is cheaper on the CPU."""
        if self.constants is not None:
            return n * self.constants["latency_cpu"] < self.constants["latency_gpu"]
        t_cpu = lane_times(self.cost, n, self.hidden, Split(width, 0, 0), self.dtype_bytes).cpu
        t_gpu = lane_times(self.cost, n, self.hidden, Split(0, width, 0), self.dtype_bytes).offload
        return t_cpu < t_gpu

    def plan(self, layer: int, loads: Sequence[ExpertLoad], phase: str, layer_tokens: int,
             cg_max: int | None) -> list[Split]:
        out = []
        for ld in loads:
            if ld.gg == ld.width:
                out.append(Split(0, 0, ld.width))
            elif ld.gg == 0 and not self.on_cpu(ld.n, ld.width) and (cg_max is None or ld.width <= cg_max):
                out.append(Split(0, ld.width, 0))
            else:
                r = ld.width - ld.gg
                out.append(Split(r, 0, ld.gg))
        return out
