"""The HierMoE paper's systems (training, AlltoAll): the Figs. 10-13 systems, baselines first,
then the ablations. Each turns its options (`HierMoE[gamma=5,every=2]`) into the SystemSpec the
sim tier runs, so this list imports no implementation."""
from __future__ import annotations

from typing import Callable

from impl.experiments.hiermoe.spec import HierMoEOptions, SystemSpec
from impl.experiments.paper_registry import PaperSystems, System

__all__ = ["HIERMOE_SYSTEMS"]


def _spec(**spec) -> Callable[[HierMoEOptions], SystemSpec]:
    def factory(opts: HierMoEOptions) -> SystemSpec:
        return SystemSpec.from_options(opts, **spec)
    return factory


HIERMOE_SYSTEMS = PaperSystems("hiermoe", (
    System("hiermoe", "Megatron-LM", "baseline", "Megatron-LM's flat AlltoAll, one copy per (token, expert)",
           _spec(route="flat"), HierMoEOptions),
    System("hiermoe", "Tutel-2DH", "baseline", "Tutel's 2DH AlltoAll over capacity-padded equal slices",
           _spec(route="tutel-2dh"), HierMoEOptions),
    System("hiermoe", "SmartMoE", "baseline", "flat AlltoAll with SmartMoE's dynamic expert placement",
           _spec(route="flat", planner="smartmoe"), HierMoEOptions),
    System("hiermoe", "HD2-MoE", "variant", "2-level dedup AlltoAll, fixed d = 2",
           _spec(route="fixed", dedup=True, dim=2), HierMoEOptions),
    System("hiermoe", "HD2-MoE-Smart", "variant", "HD2 with SmartMoE placement",
           _spec(route="fixed", dedup=True, dim=2, planner="smartmoe"), HierMoEOptions),
    System("hiermoe", "HD-MoE", "variant", "dedup AlltoAll with d* chosen per layer and iteration",
           _spec(route="auto", dedup=True), HierMoEOptions),
    System("hiermoe", "HierMoE", "ours", "d* dedup AlltoAll plus HierD-ES expert swap",
           _spec(route="auto", dedup=True, planner="hierd-es"), HierMoEOptions),
    # beyond the paper: the node-level dedup of DeepSeek-V3 / DeepEP
    System("hiermoe", "DeepEP", "baseline", "DeepEP-style two-level dedup (node, then forwarding inside the "
           "node), one notify; beyond the paper", _spec(route="deepep", dedup=True, dim=2), HierMoEOptions),
    *(System("hiermoe", f"{'HD' if dedup else 'H'}{d}", "variant",
             f"{d}-level hierarchical AlltoAll {'with' if dedup else 'without'} dedup (ablation)",
             _spec(route="fixed", dedup=dedup, dim=d), HierMoEOptions)
      for dedup in (True, False) for d in range(1, 9)),
))
