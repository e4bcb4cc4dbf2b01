"""How one HierMoE-paper system moves tokens and places experts in the sim-tier experiments, and
the options a system name takes (`HierMoE[gamma=5,every=2]`, `Tutel-2DH[capacity_factor=0]`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from impl.common.config import MAX_REPEATS, bounded

__all__ = ["HierMoEOptions", "SystemSpec", "option_default"]


@dataclass(frozen=True)
class HierMoEOptions:
    """Options of every HierMoE-paper system name; the experiment's config gives the defaults.
    A system ignores the options that do not concern it."""

    max_fn: Literal["max", "smooth", "lse"] = "smooth"   # HierD-ES's max function
    gamma: float = bounded(10.0, gt=0, le=1e4)           # its smooth-max sharpness
    every: int = bounded(1, ge=1, le=MAX_REPEATS)        # plan every n iterations
    history: int = bounded(2, ge=1, le=MAX_REPEATS)      # SmartMoE's load window (iterations)
    method: Literal["lpt", "greedy-swap"] = "lpt"        # SmartMoE's planner
    charge: Literal["all", "tokens"] = "all"             # what the model charges (impl.hiermoe.dimension)
    buffer: Literal["padded", "total"] = "padded"        # the AlltoAll buffer the model is evaluated at
    capacity_factor: float = bounded(1.0, ge=0, le=1e3)  # Tutel-2DH's capacity factor (Tutel's default; 0: dropless)
    swap_cost: Literal["overlap", "exposed", "shared"] = "overlap"   # expert moves: hidden under backward,
    #                                               not hidden, or not hidden and at a rank's share of the link
    overlap: bool = False                                # DeepEP: node step and forwarding pipelined


def option_default(name: str) -> Any:
    """A field of an experiment's config that gives the default of option `name`: the same
    default and declared range as `HierMoEOptions.<name>`."""
    f = next(f for f in dataclasses.fields(HierMoEOptions) if f.name == name)
    return dataclasses.field(default=f.default, metadata=f.metadata)


@dataclass(frozen=True)
class SystemSpec:
    """One system of the sim-tier runs: route kind, dedup, fixed d, placement planner, options."""

    name: str
    route: Literal["flat", "tutel-2dh", "fixed", "auto", "deepep"]
    dedup: bool = False
    dim: int = 1
    planner: Literal["none", "smartmoe", "hierd-es"] = "none"
    max_fn: str = "smooth"
    gamma: float = 10.0
    every: int = 1
    history: int = 2
    method: str = "lpt"
    charge: str = "all"
    buffer: str = "padded"
    capacity_factor: float = 1.0
    swap_cost: str = "overlap"
    overlap: bool = False

    @classmethod
    def from_options(cls, opts: HierMoEOptions, *, name: str = "", **spec) -> "SystemSpec":
        return cls(name=name, max_fn=opts.max_fn, gamma=opts.gamma, every=opts.every, history=opts.history,
                   method=opts.method, charge=opts.charge, buffer=opts.buffer, capacity_factor=opts.capacity_factor,
                   swap_cost=opts.swap_cost, overlap=opts.overlap, **spec)
