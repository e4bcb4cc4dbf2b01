"""The ScheInfer sim tier's config (`impl.experiments.scheinfer.sim`), apart and without torch: the
workflow builds it while it parses, to know the hardware file the run reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from impl.common.config import SEED_MAX, bounded

__all__ = ["HARDWARE_FILE", "MODELS", "SimConfig"]

HARDWARE_FILE = "workflows/config/experiments/scheinfer_hardware.yaml"
MODELS = ("mixtral-8x7b", "llama2-7b", "llama2-13b", "qwen1.5-moe-a2.7b", "phi-3.5-moe")


@dataclass(frozen=True)
class SimConfig:
    experiment: str = "scheinfer_sim"
    models: tuple[str, ...] = MODELS
    hardware: tuple[str, ...] = ("rtx4090-pcie4-16core", "rtx3090-pcie3-8core")
    hardware_file: str = HARDWARE_FILE            # relative to the repository unless absolute
    policies: tuple[str, ...] = ("layers", "fiddler", "scheinfer", "cc-only", "cg-only", "gg-popularity")
    prompt_tokens: int = bounded(128, ge=1, le=1 << 20)
    decode_tokens: int = bounded(32, ge=1, le=1 << 16)
    routing: Literal["gate", "uniform"] = "gate"
    assign: Literal["split", "threshold", "makespan"] = "split"
    gg_mode: Literal["uniform", "popularity"] = "uniform"
    tile: int = bounded(128, ge=1, le=1 << 20)
    dtype_bytes: int = bounded(2, ge=2, le=4)      # 2 or 4
    seed: int = bounded(0, ge=0, le=SEED_MAX)
