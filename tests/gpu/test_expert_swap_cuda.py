"""Training with expert swaps on CUDA tensors: SimWorld thread-ranks share the one GPU, the
planners count on the CUDA routing maps and the migration moves CUDA parameters, gradients and
Adam state; losses, placements and every logical expert's final state equal the CPU run. A
planner or migration buffer made on the CPU and mixed with the rank's tensors fails here."""
import dataclasses

import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.topology import get_topology
from tests.support.expert_training import TrainCase, train_rank

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOPO = "2x2"

# float64: the CUDA run's routing equals the CPU run's, so the planners see the same maps and choose
# the same placements; the numbers then agree to float64 rounding
CASES = {
    "random": TrainCase(policy="random"),
    "hierd-es": TrainCase(dispatcher="hd2", policy="hierd-es", planner_kwargs=(("max_fn", "max"),)),
    "hierd-es-four-case": TrainCase(policy="hierd-es", planner_kwargs=(("z_method", "four_case"),)),
    "smartmoe": TrainCase(num_experts=16, tokens_per_rank=24, policy="smartmoe", planner_kwargs=(("history", 1),)),
    "smartmoe-greedy-swap": TrainCase(dispatcher="hd2", num_experts=16, tokens_per_rank=24, policy="smartmoe",
                                      planner_kwargs=(("method", "greedy-swap"),)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_with_swaps_on_device_equals_cpu_run(name, device=DEVICE):
    case = dataclasses.replace(CASES[name], steps=3, dtype=torch.float64, resume_steps=1)
    topo = get_topology(TOPO)
    on_cpu = SimWorld(topo).run(train_rank, case)
    on_device = SimWorld(topo).run(train_rank, case.on(device))
    assert all(r["devices"] == {torch.device(device).type} for r in on_device)
    assert on_cpu[0]["moves"] > 0, "the case must move experts"
    close = dict(rtol=1e-10, atol=1e-12)
    for rank, (got, want) in enumerate(zip(on_device, on_cpu)):
        assert got["placement"] == want["placement"] and got["moves"] == want["moves"], f"rank {rank}"
        for key in ("losses", "continued", "resumed"):
            assert got[key] == pytest.approx(want[key], rel=1e-10), (rank, key)
        for state in ("experts", "reloaded"):
            for e, entries in want[state]["experts"].items():
                for label, value in entries.items():
                    torch.testing.assert_close(got[state]["experts"][e][label], value, **close,
                                               msg=lambda m: f"rank {rank} {state} expert {e} {label}: {m}")
        for k, value in want["gate"].items():
            torch.testing.assert_close(got["gate"][k], value, **close)
