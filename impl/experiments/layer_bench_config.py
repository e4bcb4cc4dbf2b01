"""The layer bench's config (`impl.experiments.layer_bench`), apart and without torch: the
workflow builds it while it parses (the emulated-cluster matrix, the cluster runs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from impl.common.config import MAX_EXPERTS, MAX_RANKS, MAX_REPEATS, MAX_SECONDS, MAX_TOKENS, MAX_WIDTH, SEED_MAX, bounded
from impl.common.emu_cluster import NetworkConfig

__all__ = ["PROFILE_SYSTEMS", "PROFILE_PLANNERS", "RoutingSource", "LayerBenchConfig"]

PROFILE_SYSTEMS = ("hierd",)                 # dispatchers that choose d* from a hardware profile
PROFILE_PLANNERS = ("hierd-es",)             # planners that model swaps with a hardware profile


@dataclass(frozen=True)
class RoutingSource:
    """Where each step's routing comes from: the model's gate, or synthetic top-k ids
    (`impl.common.traces.synthetic_topk`: distribution uniform | zipf | correlated, Zipf `skew`)."""

    source: Literal["gate", "synthetic"] = "gate"
    distribution: Literal["uniform", "zipf", "correlated"] = "uniform"
    skew: float = bounded(1.0, ge=0, le=100)


@dataclass(frozen=True)
class LayerBenchConfig:
    model: str = "deepseek-v3-tiny"        # impl.common.models name; E, K, widths and gate from it
    topology: str = "2x2"                  # impl.common.topology name
    world_size: int | None = bounded(None, ge=1, le=MAX_RANKS)   # G; when given it must equal the topology's G
    tier: Literal["sim", "emu", "cluster"] = "sim"
    system: str = "flat"                   # registered dispatcher name
    planner: str | None = None             # registered placement planner run after every step (hierd-es)
    profile: str | None = None             # hardware profile (name or YAML path) for hierd / hierd-es
    num_experts: int | None = bounded(None, ge=1, le=MAX_EXPERTS)   # override the model's E
    top_k: int | None = bounded(None, ge=1, le=MAX_EXPERTS)         # override the model's K
    hidden: int | None = bounded(None, ge=1, le=MAX_WIDTH)          # override the model's hidden size M
    ffn_hidden: int | None = bounded(None, ge=1, le=MAX_WIDTH)      # override the model's expert FFN size
    tokens_per_rank: int = bounded(128, ge=1, le=MAX_TOKENS)
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    routing: RoutingSource = field(default_factory=RoutingSource)
    timing: Literal["step", "stages"] = "step"
    repeats: int = bounded(3, ge=1, le=MAX_REPEATS)
    warmup: int = bounded(1, ge=0, le=MAX_REPEATS)
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    timeout_s: float = bounded(120.0, gt=0, le=MAX_SECONDS)     # per collective
    deadline_s: float = bounded(3600.0, gt=0, le=MAX_SECONDS)   # whole emu-tier job
    network: NetworkConfig = field(default_factory=NetworkConfig)   # emu tier: loopback or emulated cluster
