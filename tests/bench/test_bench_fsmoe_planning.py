"""The cost of FSMoE's planning per configured layer, against the paper's SLSQP (193 ms per
configuration in the paper): our degree optimiser (enumeration of the case formulas over r in
1..8) and the whole plan of a two-block stack (degrees, gradient partitioning, timeline check).

    pytest tests/bench/test_bench_fsmoe_planning.py --benchmark-enable
"""
import pytest

from impl.common.costmodel import load_profile
from impl.common.registry import get
from impl.fsmoe.costs import BlockShape, block_costs
from impl.fsmoe.degree import integer_optimum, slsqp_degree
from impl.fsmoe.planner import TRAINING_PLAN

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def block():
    return block_costs(BlockShape(4, 1024, 4096, 14336, 32, 6, 2, 1.2, "mixtral", kv_heads=8),
                       load_profile("fsmoe-testbed-a"))


def test_degree_optimiser_per_configuration(benchmark, block):
    result = benchmark(lambda: (integer_optimum(block.fwd), integer_optimum(block.bwd.with_gar(5.0))))
    assert result[0].r >= 1


def test_paper_slsqp_per_configuration(benchmark, block):
    benchmark.pedantic(lambda: (slsqp_degree(block.fwd), slsqp_degree(block.bwd.with_gar(5.0))), rounds=5)


def test_full_fsmoe_plan_of_two_blocks(benchmark, block):
    plan = benchmark.pedantic(lambda: get(TRAINING_PLAN, "fsmoe")([block, block]), rounds=5)
    assert len(plan.degrees) == 2
