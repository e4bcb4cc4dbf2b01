"""The ScheInfer paper's systems (inference on one moderate GPU), baselines first. Each is the
name of its engine policy, which the modules imported here register."""
from __future__ import annotations

import baselines.fiddler  # noqa: F401  (registers the 'fiddler' policy)
import baselines.llamacpp  # noqa: F401  (registers the 'layers' policy)
import impl.scheinfer.policy  # noqa: F401  (registers the 'scheinfer' policy)
from impl.experiments.paper_registry import PaperSystems, System

__all__ = ["SCHEINFER_SYSTEMS"]


def _policy(name: str):
    return lambda: name


SCHEINFER_SYSTEMS = PaperSystems("scheinfer", (
    System("scheinfer", "llama.cpp", "baseline", "llama.cpp's layer offload (-ngl)", _policy("layers")),
    System("scheinfer", "Fiddler", "baseline", "Fiddler's expert-granular CPU/GPU policy", _policy("fiddler")),
    System("scheinfer", "ScheInfer", "ours", "CC / CG / GG slices on three concurrent lanes", _policy("scheinfer")),
))
