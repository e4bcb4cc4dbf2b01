"""How FSMoE (and its ablations) run a stack of blocks: pipeline degrees, gradient placement and
lanes, as a `SystemPlan` that builds the iteration's schedule. The baselines' plans live beside
their systems (`baselines.deepspeed_moe.schedule`, `baselines.pipemoe`) and register under the
same registry kind, `TRAINING_PLAN`, so an experiment names any of them.

* `fsmoe`: three lanes; r_fwd per block by Algorithm 1 (enumeration over 1..8, t_gar = 0); the
  gradient partitioner's placement and r_bwd; then the simulated iteration is compared with the
  same lanes and degrees without partitioning, and the faster is kept (digest §4.5's "keep if not
  better", here checked on the timeline);
* `fsmoe-no-iio`: the same on one shared communication lane, planned with the single-stream
  model (AllGather and ReduceScatter folded into the AlltoAll, as the released harness does);
* `fsmoe-r1`: three lanes and partitioned gradients with r forced to 1 (the harness's check of the
  degree optimisation).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from impl.common.registry import register
from impl.common.timeline import Schedule, simulate

from .costs import BlockCosts, PassModel
from .degree import DOMAINS, integer_optimum
from .partition import GradientPlan, partition, whole_after
from .schedules import LANES_3, LANES_SHARED, GradTask, iteration

__all__ = ["TRAINING_PLAN", "SystemPlan", "best_of"]

TRAINING_PLAN = "training_plan"


@dataclass(frozen=True)
class SystemPlan:
    system: str
    lanes: dict[str, str]
    degrees: tuple[tuple[int, int], ...]        # (r_fwd, r_bwd) per block
    grads: tuple[GradTask, ...]
    note: str = ""

    def schedule(self, blocks: list[BlockCosts]) -> Schedule:
        return iteration(blocks, list(self.degrees), list(self.grads), self.lanes)

    def makespan(self, blocks: list[BlockCosts]) -> float:
        return simulate(self.schedule(blocks)).makespan


def best_of(blocks: list[BlockCosts], *plans: SystemPlan) -> SystemPlan:
    """The plan with the shortest simulated iteration (the first on ties)."""
    return min(plans, key=lambda p: p.makespan(blocks))


def _fsmoe(blocks: list[BlockCosts], name: str, lanes: dict, model_of: Callable[[BlockCosts], PassModel],
           domain=DOMAINS["1..8"]) -> SystemPlan:
    r_fwd = [integer_optimum(model_of(bc, "fwd"), domain).r for bc in blocks]
    plan: GradientPlan = partition(blocks, model_of=lambda bc: model_of(bc, "bwd"), domain=domain)
    partitioned = SystemPlan(name, lanes, tuple(zip(r_fwd, plan.r_bwd)), plan.tasks, "partitioned gradients")
    r_plain = [integer_optimum(model_of(bc, "bwd").with_gar(0.0), domain).r for bc in blocks]
    plain = SystemPlan(name, lanes, tuple(zip(r_fwd, r_plain)), whole_after(blocks),
                       "no partitioning (kept: partitioning was not faster)")
    return best_of(blocks, partitioned, plain)


def _three_lane(bc: BlockCosts, phase: str) -> PassModel:
    return bc.fwd if phase == "fwd" else bc.bwd


def _single_lane(bc: BlockCosts, phase: str) -> PassModel:
    return (bc.fwd if phase == "fwd" else bc.bwd).single_lane()


@register(TRAINING_PLAN, "fsmoe")
def fsmoe(blocks: list[BlockCosts]) -> SystemPlan:
    return _fsmoe(blocks, "fsmoe", LANES_3, _three_lane)


@register(TRAINING_PLAN, "fsmoe-no-iio")
def fsmoe_no_iio(blocks: list[BlockCosts]) -> SystemPlan:
    return _fsmoe(blocks, "fsmoe-no-iio", LANES_SHARED, _single_lane)


@register(TRAINING_PLAN, "fsmoe-r1")
def fsmoe_r1(blocks: list[BlockCosts]) -> SystemPlan:
    return replace(_fsmoe(blocks, "fsmoe-r1", LANES_3, _three_lane, domain=(1,)), note="r forced to 1")
