"""HDd and Hd on 8 real gloo processes at D = 2 and D = 3: outputs and gradients equal the dense
reference, and per-level traffic equals the SimComm run of the same case."""
import pytest

from impl.common.comm import SimWorld
from impl.common.launcher import launch
from impl.common.topology import get_topology
from tests.support.ep_case import EPCase, assert_matches_reference, reference, run_rank

pytestmark = pytest.mark.dist


def run_cases(comm, cases):
    """Every variant in one launch: process start-up dominates small gloo runs."""
    out = []
    for case in cases:
        comm.traffic.reset()
        out.append(run_rank(comm, case))
    return out


@pytest.mark.parametrize("topo_name", ["2x4", "hier:node=2,socket=2,gpu=2"])
def test_every_variant_on_8_gloo_ranks(topo_name):
    topo = get_topology(topo_name)
    cases = [EPCase(num_experts=16, top_k=4, tokens_per_rank=6, dispatcher=f"{p}{d}", seed=5,
                    slot_of_expert=tuple(reversed(range(16))))
             for d in range(1, topo.D + 1) for p in ("hd", "h")]
    per_rank = launch(run_cases, topo.G, args=(cases,), topology=topo, timeout_s=60, deadline_s=300)
    for i, case in enumerate(cases):
        results = [r[i] for r in per_rank]
        assert_matches_reference(results, reference(case, topo.G))
        sim = SimWorld(topo).run(run_rank, case)
        assert [r["traffic"] for r in results] == [r["traffic"] for r in sim], case.dispatcher
