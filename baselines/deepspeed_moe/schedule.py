"""DeepSpeed-MoE's schedule in the FSMoE paper's comparison (the "default" of Fig. 3a): every
collective and computation in sequence on one lane, r = 1, each block's gradient all-reduced
whole after its backward. The real DeepSpeed-MoE (`real.py`) stays its numerical reference."""
from __future__ import annotations

from impl.common.registry import register
from impl.fsmoe.costs import BlockCosts
from impl.fsmoe.partition import whole_after
from impl.fsmoe.planner import TRAINING_PLAN, SystemPlan
from impl.fsmoe.schedules import LANES_SEQUENTIAL

__all__ = ["deepspeed_moe"]


@register(TRAINING_PLAN, "ds-moe")
def deepspeed_moe(blocks: list[BlockCosts]) -> SystemPlan:
    return SystemPlan("ds-moe", LANES_SEQUENTIAL, tuple((1, 1) for _ in blocks), whole_after(blocks),
                      "sequential, r = 1")
