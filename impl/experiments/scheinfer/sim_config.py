"""The ScheInfer sim tier's config (`impl.experiments.scheinfer.sim`), apart and without torch: the
workflow builds it while it parses, to know the hardware file the run reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["HARDWARE_FILE", "MODELS", "SimConfig"]

HARDWARE_FILE = "workflows/config/experiments/scheinfer_hardware.yaml"
MODELS = ("mixtral-8x7b", "llama2-7b", "llama2-13b", "qwen1.5-moe-a2.7b", "phi-3.5-moe")


@dataclass(frozen=True)
class SimConfig:
    experiment: str = "scheinfer_sim"
    models: tuple[str, ...] = MODELS
    hardware: tuple[str, ...] = ("rtx4090-pcie4-16core", "rtx3090-pcie3-8core")
    hardware_file: str = HARDWARE_FILE            # relative to the repository unless absolute
    policies: tuple[str, ...] = ("layers", "fiddler", "scheinfer", "cc-only", "cg-only")
    prompt_tokens: int = 128
    decode_tokens: int = 32
    routing: Literal["gate", "uniform"] = "gate"
    assign: Literal["split", "threshold", "makespan"] = "split"
    gg_mode: Literal["uniform", "popularity"] = "uniform"
    tile: int = 128
    dtype_bytes: int = 2
    seed: int = 0
