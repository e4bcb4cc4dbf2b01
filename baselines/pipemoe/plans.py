"""The FSMoE paper's pipelined baselines as `SystemPlan`s (clean-room from the digest §3.1, §5.3,
§6.4; PipeMoE's solver from its paper as the digest §5.4 describes it).

All three pipeline the MoE layer with one degree for both passes, PipeMoE's: the r that
minimises the layer's forward time when AlltoAll is overlapped with the experts only, i.e. the
single-stream model (AllGather and ReduceScatter folded into the AlltoAll, as the released
harness plans its single-stream types), enumerated over 1..8. They differ in lanes and in where
the dense gradients' AllReduce goes:

* `tutel` (harness type 0, the one Table 5 is normalised to): one shared communication lane for
  AlltoAll, AllGather, ReduceScatter and gradients; each block's gradient all-reduced whole as
  soon as it exists;
* `tutel-a2a-only`: the other reading of "only AlltoAll overlapped with experts" (digest §8.5):
  AllGather and ReduceScatter run on the compute lane, serialised with the experts;
* `tutel-improved` (type 1): Tutel plus the gradient AllReduce overlapped with non-MoE work only
  (during the next-processed block's dense backward);
* `pipemoe-lina`: Lina's fixed 30 MB gradient chunks, each into the next idle window (inside a
  MoE backward or a dense backward), without resizing chunks or re-planning the degree (our
  reading of Lina's priority scheduling on FIFO lanes: chunks go where the link would idle).
"""
from __future__ import annotations

from impl.common.registry import register
from impl.fsmoe.costs import BlockCosts
from impl.fsmoe.degree import integer_optimum
from impl.fsmoe.partition import dense_windows, fixed_chunks, whole_after
from impl.fsmoe.planner import TRAINING_PLAN, SystemPlan
from impl.fsmoe.schedules import LANES_SHARED

__all__ = ["pipemoe_degree", "LANES_A2A_ONLY", "LINA_CHUNK_BYTES"]

LANES_A2A_ONLY = {**LANES_SHARED, "ag": "compute", "rs": "compute"}
LINA_CHUNK_BYTES = 30e6


def pipemoe_degree(bc: BlockCosts) -> int:
    """PipeMoE's degree: the single-stream forward model's optimum over 1..8, used both ways."""
    return integer_optimum(bc.fwd.single_lane()).r


def _same_degree(blocks: list[BlockCosts]) -> tuple[tuple[int, int], ...]:
    return tuple((r, r) for r in map(pipemoe_degree, blocks))


@register(TRAINING_PLAN, "tutel")
def tutel(blocks: list[BlockCosts]) -> SystemPlan:
    return SystemPlan("tutel", LANES_SHARED, _same_degree(blocks), whole_after(blocks), "PipeMoE degree, shared lane")


@register(TRAINING_PLAN, "tutel-a2a-only")
def tutel_a2a_only(blocks: list[BlockCosts]) -> SystemPlan:
    return SystemPlan("tutel-a2a-only", LANES_A2A_ONLY, _same_degree(blocks), whole_after(blocks),
                      "PipeMoE degree, ESP collectives serialised with the experts")


@register(TRAINING_PLAN, "tutel-improved")
def tutel_improved(blocks: list[BlockCosts]) -> SystemPlan:
    return SystemPlan("tutel-improved", LANES_SHARED, _same_degree(blocks), dense_windows(blocks),
                      "gradients overlapped with non-MoE work")


@register(TRAINING_PLAN, "pipemoe-lina")
def pipemoe_lina(blocks: list[BlockCosts]) -> SystemPlan:
    degrees = _same_degree(blocks)
    grads = fixed_chunks(blocks, [r_bwd for _, r_bwd in degrees], LINA_CHUNK_BYTES,
                         model_of=lambda bc: bc.bwd.single_lane())
    return SystemPlan("pipemoe-lina", LANES_SHARED, degrees, grads, f"{LINA_CHUNK_BYTES / 1e6:.0f} MB gradient chunks")
