"""The registry of every paper's systems and baselines, for callers that need all of them.

Each system or baseline is registered once, under the name its paper prints, in its paper's
list (`impl.experiments.<paper>.systems`, records and lookups in `impl.experiments.paper_registry`):
which paper, whether it is the paper's own system or a baseline, its options (a dataclass: the
config schema of `NAME[key=value,...]`) and a factory that turns the options into what the
paper's experiments run (a HierMoE route/planner spec, a ScheInfer policy name, ...). A paper's
experiments import their paper's list only, so editing one paper's code reruns that paper's jobs
alone; their figures' plot styles are in `figures.style`.

Importing this module also imports every module that registers an implementation in
`impl.common.registry` (dispatchers, gates, placement planners, training plans, inference
policies, the megatron-core layer), so `registry.get` finds any of them by name: what a caller
that runs any implementation by name (the layer bench, the tests) imports. That is the
experiments layer's job: the substrate's registry names no module above it.
"""
from __future__ import annotations

# Every module that registers implementations (import for the side effect); the papers' lists
# import those their own factories look up.
import baselines.deepep  # noqa: F401
import baselines.deepspeed_moe.sim  # noqa: F401
import baselines.megatron  # noqa: F401  (lazy: megatron itself loads when its factory is called)
import baselines.smartmoe.planner  # noqa: F401
import baselines.tutel_2dh.dispatcher  # noqa: F401
import impl.common.dispatcher  # noqa: F401
import impl.common.routing  # noqa: F401
import impl.hiermoe.dedup_a2a  # noqa: F401
import impl.hiermoe.expert_swap  # noqa: F401
from impl.common.config import ConfigError
from impl.experiments.fsmoe.systems import FSMOE_SYSTEMS
from impl.experiments.hiermoe.systems import HIERMOE_SYSTEMS
from impl.experiments.paper_registry import PAPERS, PaperSystems, System
from impl.experiments.scheinfer.systems import SCHEINFER_SYSTEMS

__all__ = ["PAPERS", "System", "SYSTEMS", "BY_PAPER", "paper_systems"]

BY_PAPER: dict[str, PaperSystems] = {s.paper: s for s in (HIERMOE_SYSTEMS, FSMOE_SYSTEMS, SCHEINFER_SYSTEMS)}
SYSTEMS: tuple[System, ...] = tuple(s for paper in PAPERS for s in BY_PAPER[paper])


def _of(paper: str) -> PaperSystems:
    if paper not in BY_PAPER:
        raise ConfigError(f"paper: {paper!r} is not allowed; allowed: {', '.join(PAPERS)}")
    return BY_PAPER[paper]


def paper_systems(paper: str, roles: tuple[str, ...] = ("baseline", "ours", "variant")) -> tuple[System, ...]:
    """The systems of one paper in registry order (baselines first, the paper's own last)."""
    return _of(paper).select(roles)
