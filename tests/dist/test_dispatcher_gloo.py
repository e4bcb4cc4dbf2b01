"""The same expert-parallel cases on real gloo processes: outputs, gradients and per-level
bytes must equal the single-process reference and the simulated run."""
import pytest

from impl.common.comm import SimWorld
from impl.common.launcher import launch
from impl.common.topology import get_topology
from tests.support.ep_case import EPCase, assert_matches_reference, reference, run_rank

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("topo_name,E,K", [("1x2", 4, 2), ("2x2", 8, 3), ("2x4", 16, 4)])
def test_flat_dispatcher_on_gloo(topo_name, E, K):
    topo = get_topology(topo_name)
    case = EPCase(num_experts=E, top_k=K, tokens_per_rank=10)
    results = launch(run_rank, topo.G, args=(case,), topology=topo, timeout_s=60, deadline_s=300)
    assert_matches_reference(results, reference(case, topo.G))
    sim = SimWorld(topo).run(run_rank, case)
    assert [r["traffic"] for r in results] == [r["traffic"] for r in sim]
