"""The Table II experiment's config (`impl.experiments.hiermoe.table2`), apart and without torch:
the workflow builds it while it parses, to name the run's outputs by the config's hash."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from impl.common.config import (MAX_EXPERTS, MAX_REPEATS, MAX_TOKENS, SEED_MAX, ConfigError, bounded, build_config,
                                 check_host_memory)

__all__ = ["EXPERIMENT", "SYSTEM", "TIER", "TOPOLOGY", "Table2Config", "load_config"]

EXPERIMENT = "hiermoe_table2"
SYSTEM = "dedup-analysis"
TIER = "sim"
TOPOLOGY = "expert-groups"  # no network here: R equal groups of contiguous experts


@dataclass(frozen=True)
class Table2Config:
    num_experts: int = bounded(256, ge=1, le=MAX_EXPERTS)                     # E
    top_ks: tuple[int, ...] = bounded((2, 4, 6, 8), ge=1, le=MAX_EXPERTS)      # K values (columns of Table II)
    group_counts: tuple[int, ...] = bounded((32, 16, 8, 4), ge=1, le=MAX_EXPERTS)  # R values (rows of Table II)
    tokens_per_sample: int = bounded(16384, ge=1, le=MAX_TOKENS)               # tokens in one routing mask
    repeats: int = bounded(5, ge=1, le=MAX_REPEATS)        # masks per K, seeds seed .. seed + repeats - 1
    seed: int = bounded(0, ge=0, le=SEED_MAX - MAX_REPEATS)
    distribution: Literal["uniform", "zipf", "correlated"] = "uniform"
    skew: float = bounded(1.0, ge=0, le=100)               # strength of the non-uniform distributions
    paper: str = "hiermoe_table2"                          # name of the paper CSV in figures/paper

    def __post_init__(self):
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
        # one mask and its top-k ids at a time
        check_host_memory(self.tokens_per_sample * (2 * self.num_experts + 16 * max(self.top_ks)),
                          "tokens_per_sample, num_experts", "one routing mask")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.paper):
            raise ConfigError(f"paper: {self.paper!r} is not allowed; allowed: the name of a CSV in "
                              "figures/paper, without directory or suffix (e.g. 'hiermoe_table2')")


def load_config(path=None, overrides=()) -> Table2Config:
    """YAML file (optional) + `key=value` overrides -> validated config (ConfigError if not)."""
    return build_config(Table2Config, path, list(overrides))
