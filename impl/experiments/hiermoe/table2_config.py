"""The Table II experiment's config (`impl.experiments.hiermoe.table2`), apart and without torch:
the workflow builds it while it parses, to name the run's outputs by the config's hash."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from impl.common.config import ConfigError, build_config

__all__ = ["EXPERIMENT", "SYSTEM", "TIER", "TOPOLOGY", "Table2Config", "load_config"]

EXPERIMENT = "hiermoe_table2"
SYSTEM = "dedup-analysis"
TIER = "sim"
TOPOLOGY = "expert-groups"  # no network here: R equal groups of contiguous experts


@dataclass(frozen=True)
class Table2Config:
    num_experts: int = 256                       # E
    top_ks: tuple[int, ...] = (2, 4, 6, 8)        # K values (columns of Table II)
    group_counts: tuple[int, ...] = (32, 16, 8, 4)  # R values (rows of Table II)
    tokens_per_sample: int = 16384               # tokens in one routing mask
    repeats: int = 5                             # masks per K, seeds seed .. seed + repeats - 1
    seed: int = 0
    distribution: Literal["uniform", "zipf", "correlated"] = "uniform"
    skew: float = 1.0                            # strength of the non-uniform distributions
    paper: str = "hiermoe_table2"                # name of the paper CSV in figures/paper

    def __post_init__(self):
        if self.num_experts < 1:
            raise ConfigError(f"num_experts: {self.num_experts} is not allowed; allowed: a positive integer")
        for key, values in (("top_ks", self.top_ks), ("group_counts", self.group_counts)):
            if not values:
                raise ConfigError(f"{key}: empty; allowed: a non-empty list of positive integers")
            if len(set(values)) != len(values):
                raise ConfigError(f"{key}: {list(values)} repeats a value; allowed: distinct values")
        for k in self.top_ks:
            if not 1 <= k <= self.num_experts:
                raise ConfigError(f"top_ks: K={k} is not allowed with num_experts={self.num_experts}; "
                                  f"allowed: 1..{self.num_experts}")
        for r in self.group_counts:
            if r < 1 or self.num_experts % r != 0:
                divisors = [d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0]
                raise ConfigError(f"group_counts: R={r} does not divide num_experts={self.num_experts}; "
                                  f"allowed: {', '.join(map(str, divisors))}")
        if self.tokens_per_sample < 1:
            raise ConfigError(f"tokens_per_sample: {self.tokens_per_sample} is not allowed; allowed: >= 1")
        if self.repeats < 1:
            raise ConfigError(f"repeats: {self.repeats} is not allowed; allowed: >= 1")
        if self.skew < 0:
            raise ConfigError(f"skew: {self.skew} is not allowed; allowed: >= 0")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.paper):
            raise ConfigError(f"paper: {self.paper!r} is not allowed; allowed: the name of a CSV in "
                              "figures/paper, without directory or suffix (e.g. 'hiermoe_table2')")


def load_config(path=None, overrides=()) -> Table2Config:
    """YAML file (optional) + `key=value` overrides -> validated config (ConfigError if not)."""
    return build_config(Table2Config, path, list(overrides))
