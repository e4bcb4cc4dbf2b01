"""Tutel-2DH on real gloo processes (4 and 8 ranks): outputs and gradients equal the dense
reference, and the per-rank traffic equals the simulated run's. One launch per world size; the
8-rank launch also runs the 4x2 view of the same processes (a second TorchComm)."""
import pytest

from impl.common.comm import Comm, SimWorld, TorchComm
from impl.common.launcher import launch
from impl.common.topology import get_topology
from tests.support.ep_case import EPCase, assert_matches_reference, reference, run_rank

pytestmark = pytest.mark.dist


def _case(topo_name: str, mode: str) -> EPCase:
    G = get_topology(topo_name).G
    kwargs = {"dropless": dict(dispatcher_kwargs={"capacity_factor": 0.0}),
              "gate-drops": dict(dispatcher_kwargs={"capacity_factor": 1.0, "top_k": 2},
                                 gate_kwargs={"capacity_factor": 1.0, "drop_policy": "position"})}[mode]
    return EPCase(num_experts=2 * G, top_k=2, tokens_per_rank=10, dispatcher="tutel-2dh", **kwargs)


RUNS = {4: [("2x2", "dropless"), ("2x2", "gate-drops"), ("1x4", "dropless")],
        8: [("2x4", "dropless"), ("2x4", "gate-drops"), ("4x2", "dropless")]}


def run_cases(comm: Comm, runs: list[tuple[str, str]]) -> list[dict]:
    comms = {comm.topology.name: comm}
    out = []
    for topo_name, mode in runs:
        if topo_name not in comms:   # every rank builds the same groups, in the same order
            comms[topo_name] = TorchComm(get_topology(topo_name), timeout_s=60)
        c = comms[topo_name]
        c.traffic.reset()
        out.append(run_rank(c, _case(topo_name, mode)))
    return out


@pytest.mark.parametrize("world_size", sorted(RUNS))
def test_tutel_2dh_on_gloo(world_size):
    runs = RUNS[world_size]
    per_rank = launch(run_cases, world_size, args=(runs,), topology=get_topology(runs[0][0]), timeout_s=60,
                      deadline_s=300)
    for i, (topo_name, mode) in enumerate(runs):
        topo, case = get_topology(topo_name), _case(topo_name, mode)
        results = [r[i] for r in per_rank]
        assert_matches_reference(results, reference(case, topo.G))
        sim = SimWorld(topo).run(run_rank, case)
        assert [r["traffic"] for r in results] == [r["traffic"] for r in sim], (topo_name, mode)
