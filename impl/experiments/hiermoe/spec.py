"""How one HierMoE-paper system moves tokens and places experts in the sim-tier experiments, and
the options a system name takes (`HierMoE[gamma=5,every=2]`, `Tutel-2DH[capacity_factor=0]`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from impl.common.config import ConfigError

__all__ = ["HierMoEOptions", "SystemSpec"]


@dataclass(frozen=True)
class HierMoEOptions:
    """Options of every HierMoE-paper system name; the experiment's config gives the defaults.
    A system ignores the options that do not concern it."""

    max_fn: Literal["max", "smooth", "lse"] = "smooth"   # HierD-ES's max function
    gamma: float = 10.0                                  # its smooth-max sharpness
    every: int = 1                                       # plan every n iterations
    history: int = 2                                     # SmartMoE's load window (iterations)
    method: Literal["lpt", "greedy-swap"] = "lpt"        # SmartMoE's planner
    charge: Literal["all", "tokens"] = "all"             # what the model charges (impl.hiermoe.dimension)
    buffer: Literal["padded", "total"] = "padded"        # the AlltoAll buffer the model is evaluated at
    capacity_factor: float = 1.0                         # Tutel-2DH's capacity factor (Tutel's default)
    swap_cost: Literal["overlap", "exposed", "shared"] = "overlap"   # expert moves: hidden under backward,
    #                                               not hidden, or not hidden and at a rank's share of the link
    overlap: bool = False                                # DeepEP: node step and forwarding pipelined

    def __post_init__(self):
        for key in ("every", "history"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: {getattr(self, key)} is not allowed; allowed: >= 1")


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
