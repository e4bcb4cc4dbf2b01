"""Cluster topology: ordered levels, hierarchical rank order, and the sub-groups of every
hierarchical AlltoAll step.

A topology is a list of levels from the coarsest (slowest link) to the finest, each with a
fan-out: the HierMoE testbed is node(4) > socket(2) > pcie-pair(2) > gpu(2), i.e. 4 nodes of
2 sockets of 2 NVLink pairs of 2 GPUs, G = 32. Ranks are numbered hierarchically (node-major),
so that every group at every level is a contiguous block of ranks and the experts it hosts a
contiguous block of expert ids (HierMoE digest, section 2.1).

Notation follows the HierMoE paper: D = number of levels, U[i] = number of groups at level i
(U[0] = 1, U[i] = product of the first i fan-outs), G = number of GPUs = U[D].

* Intra-level-i group: the G / U[i] ranks inside one level-i group (intra-0 = all ranks).
* Inter-level-i group (1 <= i < D): the U[i] / U[i-1] ranks that sit in the same level-(i-1)
  group and at the same position inside their level-i groups (e.g. Inter-1 = the GPUs with the
  same local index on every node).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

__all__ = ["Level", "Topology", "TopologyError", "get_topology", "TOPOLOGY_PRESETS"]


class TopologyError(ValueError):
    """A topology name or shape that cannot be built."""


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: `fanout` children per parent, joined by `link`."""

    name: str
    fanout: int
    link: str = ""

    def __post_init__(self):
        if self.fanout < 1:
            raise TopologyError(f"level {self.name!r}: fanout must be >= 1, got {self.fanout}")


@dataclass(frozen=True)
class Topology:
    """Ordered levels, coarsest first. Immutable; every derived quantity is computed on demand."""

    name: str
    levels: tuple[Level, ...]

    def __post_init__(self):
        if not self.levels:
            raise TopologyError(f"topology {self.name!r} has no levels")
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names):
            raise TopologyError(f"topology {self.name!r}: duplicate level names {names}")

    # ---- sizes -------------------------------------------------------------------------
    @property
    def D(self) -> int:
        return len(self.levels)

    @property
    def G(self) -> int:
        return math.prod(lv.fanout for lv in self.levels)

    @property
    def world_size(self) -> int:
        return self.G

    @cached_property
    def U(self) -> tuple[int, ...]:
        """U[i] = number of groups at level i for i = 0..D (U[0] = 1, U[D] = G)."""
        out = [1]
        for lv in self.levels:
            out.append(out[-1] * lv.fanout)
        return tuple(out)

    @property
    def num_nodes(self) -> int:
        return self.U[1]

    @property
    def gpus_per_node(self) -> int:
        return self.G // self.U[1]

    # ---- coordinates -------------------------------------------------------------------
    def coords(self, rank: int) -> tuple[int, ...]:
        """Rank -> (index at level 0, index at level 1, ...), coarsest first."""
        self._check_rank(rank)
        out = []
        for lv in reversed(self.levels):
            rank, c = divmod(rank, lv.fanout)
            out.append(c)
        return tuple(reversed(out))

    def rank(self, coords: tuple[int, ...]) -> int:
        if len(coords) != self.D:
            raise TopologyError(f"expected {self.D} coordinates, got {coords}")
        r = 0
        for c, lv in zip(coords, self.levels):
            if not 0 <= c < lv.fanout:
                raise TopologyError(f"coordinate {c} out of range for level {lv.name!r} (0..{lv.fanout - 1})")
            r = r * lv.fanout + c
        return r

    def group_index(self, rank: int, level: int) -> int:
        """Index of the level-`level` group containing `rank` (level 0 -> always 0)."""
        self._check_rank(rank)
        return rank // (self.G // self.U[level])

    def link_level(self, src: int, dst: int) -> int | None:
        """Level whose link a message src -> dst crosses (the coarsest differing coordinate);
        None for a message to oneself."""
        if src == dst:
            return None
        for i, (a, b) in enumerate(zip(self.coords(src), self.coords(dst))):
            if a != b:
                return i
        raise AssertionError("unreachable")

    def link_name(self, src: int, dst: int) -> str | None:
        lvl = self.link_level(src, dst)
        return None if lvl is None else self.levels[lvl].name

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(lv.name for lv in self.levels)

    # ---- groups ------------------------------------------------------------------------
    def intra_groups(self, level: int) -> list[tuple[int, ...]]:
        """All Intra-level-`level` groups (0 <= level < D): contiguous blocks of G/U[level] ranks."""
        if not 0 <= level < self.D:
            raise TopologyError(f"intra level must be in 0..{self.D - 1}, got {level}")
        size = self.G // self.U[level]
        return [tuple(range(g * size, (g + 1) * size)) for g in range(self.U[level])]

    def inter_groups(self, level: int) -> list[tuple[int, ...]]:
        """All Inter-level-`level` groups (1 <= level < D): U[level]/U[level-1] ranks each, one
        per level-`level` group inside a common level-(level-1) group, same position inside it."""
        if not 1 <= level < self.D:
            raise TopologyError(f"inter level must be in 1..{self.D - 1}, got {level}")
        parent_size = self.G // self.U[level - 1]
        child_size = self.G // self.U[level]
        fan = self.U[level] // self.U[level - 1]
        groups = []
        for parent in range(self.U[level - 1]):
            base = parent * parent_size
            for offset in range(child_size):
                groups.append(tuple(base + j * child_size + offset for j in range(fan)))
        return groups

    def group_of(self, kind: str, level: int, rank: int) -> tuple[int, ...]:
        """The `kind` ('inter' or 'intra') group at `level` that contains `rank`."""
        groups = self.inter_groups(level) if kind == "inter" else self.intra_groups(level)
        for g in groups:
            if rank in g:
                return g
        raise AssertionError("every rank is in exactly one group per step")

    def all_step_groups(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """Every (kind, level, ranks) group, in the one order all ranks must create them."""
        out = []
        for level in range(self.D):
            out += [("intra", level, g) for g in self.intra_groups(level)]
        for level in range(1, self.D):
            out += [("inter", level, g) for g in self.inter_groups(level)]
        return out

    def describe(self) -> str:
        return " > ".join(f"{lv.name}({lv.fanout})" for lv in self.levels) + f"  [G={self.G}]"

    def to_dict(self) -> dict:
        return {"name": self.name, "levels": [[lv.name, lv.fanout, lv.link] for lv in self.levels],
                "G": self.G, "U": list(self.U[: self.D])}

    def _check_rank(self, rank: int):
        if not 0 <= rank < self.G:
            raise TopologyError(f"rank {rank} out of range for topology {self.name!r} (0..{self.G - 1})")


def _nxg(nodes: int, gpus: int, name: str) -> Topology:
    levels = [Level("node", nodes, "inter-node")]
    if gpus > 1 or nodes == 1:
        levels.append(Level("gpu", gpus, "intra-node"))
    return Topology(name, tuple(levels))


def _nvswitch(nodes: int) -> Topology:
    return Topology(f"nvswitch-{nodes}x8", (Level("node", nodes, "InfiniBand"), Level("gpu", 8, "NVSwitch")))


TOPOLOGY_PRESETS: dict[str, Topology] = {
    # HierMoE testbed (Fig. 1b, Table III): 4 nodes > 2 sockets (QPI) > 2 PCIe-connected NVLink
    # pairs > 2 GPUs (NVLink bridge). D = 4, U = [1, 4, 8, 16], G = 32.
    "hiermoe-testbed": Topology("hiermoe-testbed", (
        Level("node", 4, "InfiniBand 200Gb/s"), Level("socket", 2, "QPI"),
        Level("pcie-pair", 2, "PCIe 4.0"), Level("gpu", 2, "NVLink bridge"))),
    # one node of the same testbed (D = 3)
    "hiermoe-node": Topology("hiermoe-node", (
        Level("socket", 2, "QPI"), Level("pcie-pair", 2, "PCIe 4.0"), Level("gpu", 2, "NVLink bridge"))),
    # FSMoE Testbed A: 6 nodes x 8 RTX A6000, 200 Gb/s IB
    "fsmoe-testbed-a": Topology("fsmoe-testbed-a", (Level("node", 6, "InfiniBand 200Gb/s"), Level("gpu", 8, "NVLink/PCIe 4.0"))),
    # FSMoE Testbed B: 8 nodes x 4 RTX 2080Ti, 100 Gb/s IB
    "fsmoe-testbed-b": Topology("fsmoe-testbed-b", (Level("node", 8, "InfiniBand 100Gb/s"), Level("gpu", 4, "PCIe 3.0"))),
}

_NXG_RE = re.compile(r"^(\d+)x(\d+)$")
_NVSWITCH_RE = re.compile(r"^nvswitch-(\d+)x8$")
_HIER_RE = re.compile(r"^hier:((?:[A-Za-z0-9_-]+=\d+,?)+)$")


def get_topology(name: str) -> Topology:
    """Named preset, `NxG` (N nodes x G GPUs, for emulation), `nvswitch-Nx8`, or
    `hier:node=4,socket=2,gpu=2` (an explicit level list, coarsest first)."""
    if name in TOPOLOGY_PRESETS:
        return TOPOLOGY_PRESETS[name]
    if m := _NXG_RE.match(name):
        n, g = int(m[1]), int(m[2])
        if n < 1 or g < 1:
            raise TopologyError(f"topology {name!r}: nodes and GPUs per node must be >= 1")
        return _nxg(n, g, name)
    if m := _NVSWITCH_RE.match(name):
        return _nvswitch(int(m[1]))
    if m := _HIER_RE.match(name):
        parts = [p.split("=") for p in m[1].strip(",").split(",")]
        return Topology(name, tuple(Level(k, int(v)) for k, v in parts))
    allowed = ", ".join(sorted(TOPOLOGY_PRESETS)) + ", NxG (e.g. 2x4), nvswitch-Nx8, hier:LEVEL=N,..."
    raise TopologyError(f"unknown topology {name!r}; allowed: {allowed}")
