"""The emulated-cluster validation's config (`impl.experiments.emu_validation`), apart and without
torch: the workflow builds it while it parses, for the matrix of runs (topologies x routings x
variants x runs) and each run's layer bench overrides."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from impl.common.config import MAX_REPEATS, ConfigError, bounded, build_config, to_dict
from impl.common.emu_cluster import NetworkConfig
from impl.experiments.layer_bench_config import PROFILE_SYSTEMS, LayerBenchConfig, RoutingSource

__all__ = ["Variant", "CalibrationArgs", "EmuValidationConfig", "load_config", "uses_profile", "bench_config",
           "bench_overrides"]


@dataclass(frozen=True)
class Variant:
    """One compared system: a registered dispatcher and optionally a placement planner."""

    system: str
    planner: str | None = None
    label: str = ""


def _default_variants() -> dict[str, Variant]:
    return {"flat": Variant("flat", label="Megatron-LM"), "tutel-2dh": Variant("tutel-2dh", label="Tutel-2DH"),
            "deepspeed-moe": Variant("deepspeed-moe", label="DeepSpeed-MoE"), "hd2": Variant("hd2", label="HD2-MoE"),
            "hierd": Variant("hierd", label="HD-MoE"), "hierd-es": Variant("hierd", "hierd-es", label="HierMoE")}


@dataclass(frozen=True)
class CalibrationArgs:
    """Flags of `python -m impl.common.calibrate` for the emulated cluster's profile."""

    sizes: str = "2M,8M,16M,32M,64M"
    repeats: int = bounded(3, ge=1, le=MAX_REPEATS)
    warmup: int = bounded(1, ge=0, le=MAX_REPEATS)
    iters: int = bounded(1, ge=1, le=MAX_REPEATS)


@dataclass(frozen=True)
class EmuValidationConfig:
    topologies: tuple[str, ...] = ("2x4", "4x2")
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(emulate=True, rate="200mbit",
                                                                         fallback=False))
    routings: dict[str, RoutingSource] = field(default_factory=lambda: {
        "uniform": RoutingSource("synthetic", "uniform"), "zipf": RoutingSource("synthetic", "zipf", 1.0)})
    variants: dict[str, Variant] = field(default_factory=_default_variants)
    baseline: str = "flat"                 # variant the ratios divide by
    runs: int = bounded(3, ge=1, le=1000)  # independent bench processes per cell; their repeats are pooled
    bench: dict[str, Any] = field(default_factory=dict)   # LayerBenchConfig keys of every run (the workload)
    calibration: CalibrationArgs = field(default_factory=CalibrationArgs)


_FIXED = ("tier", "topology", "system", "planner", "profile", "routing", "timing", "network")


def load_config(path: str | None, overrides: list[str] = ()) -> EmuValidationConfig:
    """The config with its own keys checked (`impl.experiments.emu_validation.load` also resolves
    every run of the matrix)."""
    cfg = build_config(EmuValidationConfig, path, list(overrides))
    for key in cfg.bench:
        if key in _FIXED:
            raise ConfigError(f"bench.{key}: set by the validation matrix, not in bench; allowed: the workload keys")
    if cfg.baseline not in cfg.variants:
        raise ConfigError(f"baseline: {cfg.baseline!r} is not a variant; allowed: {', '.join(cfg.variants)}")
    return cfg


def uses_profile(v: Variant) -> bool:
    """Whether a variant models its choices with a hardware profile (d*, swaps)."""
    return v.system in PROFILE_SYSTEMS or v.planner is not None


def bench_config(cfg: EmuValidationConfig, topology: str, routing: str, variant: str,
                 profile: str | None) -> LayerBenchConfig:
    """The layer bench config of one run: the workload (`bench`) on one cell of the matrix."""
    v = cfg.variants[variant]
    data = {**cfg.bench, "tier": "emu", "topology": topology, "system": v.system, "planner": v.planner,
            "routing": to_dict(cfg.routings[routing]), "timing": "stages", "network": to_dict(cfg.network),
            "profile": profile if uses_profile(v) else None}
    return build_config(LayerBenchConfig, None, [], base=data)


def bench_overrides(cfg: EmuValidationConfig, topology: str, routing: str, variant: str, profile: str | None) -> list[str]:
    """`--set key=value` items of one run of the layer bench (values as JSON, which YAML reads)."""
    built = bench_config(cfg, topology, routing, variant, profile)
    out = []

    def flat(prefix, value):
        if isinstance(value, dict):
            for k, item in value.items():
                flat(f"{prefix}{k}.", item)
        else:
            out.append(f"{prefix[:-1]}={json.dumps(value)}")
    flat("", to_dict(built))
    return out
