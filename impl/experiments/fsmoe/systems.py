"""The FSMoE paper's systems (training, co-scheduled pipelines): the plans of Figs. 6-8 and
Table 5, baselines first. Each is its planner (blocks -> SystemPlan), looked up among the
training plans, which the modules imported here register."""
from __future__ import annotations

from typing import Callable

import baselines.deepspeed_moe.schedule  # noqa: F401  (registers ds-moe)
import baselines.pipemoe.plans  # noqa: F401  (registers tutel, tutel-improved, pipemoe-lina, tutel-a2a-only)
from impl.common.registry import get
from impl.experiments.paper_registry import PaperSystems, System
from impl.fsmoe.planner import TRAINING_PLAN

__all__ = ["FSMOE_SYSTEMS"]


def _plan(name: str) -> Callable[[], Callable]:
    return lambda: get(TRAINING_PLAN, name)


FSMOE_SYSTEMS = PaperSystems("fsmoe", (
    System("fsmoe", "DS-MoE", "baseline", "DeepSpeed-MoE's sequential schedule, r = 1", _plan("ds-moe")),
    System("fsmoe", "Tutel", "baseline", "Tutel with PipeMoE's degree, one communication lane", _plan("tutel")),
    System("fsmoe", "Tutel-Improved", "baseline", "Tutel plus gradients overlapped with non-MoE work",
           _plan("tutel-improved")),
    System("fsmoe", "PipeMoE+Lina", "baseline", "PipeMoE with Lina's fixed 30 MB gradient chunks",
           _plan("pipemoe-lina")),
    System("fsmoe", "FSMoE-No-IIO", "variant", "FSMoE on one shared communication lane", _plan("fsmoe-no-iio")),
    System("fsmoe", "FSMoE", "ours", "three co-scheduled lanes, per-pass degrees, partitioned gradients",
           _plan("fsmoe")),
    System("fsmoe", "FSMoE-r1", "variant", "FSMoE with r forced to 1", _plan("fsmoe-r1")),
    System("fsmoe", "Tutel-A2A-only", "variant", "Tutel with the ESP collectives on the compute lane",
           _plan("tutel-a2a-only")),
))
