"""Every registered dispatcher with CUDA tensors: SimWorld thread-ranks share the one GPU, and the
forward output and every gradient equal the same run on CPU tensors (and the dense reference).
A tensor a dispatcher builds on the CPU and mixes with the tokens fails here, not on a cluster."""
import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.registry import names
from impl.common.topology import get_topology
from tests.support.ep_case import EPCase, assert_matches_reference, reference, run_rank
from tests.support.expert_training import profile_for_topology

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the smallest topology with d levels, for the routes of dimension d (h3, hd4, ...); others use 2x2
TOPOLOGY_OF_DEPTH = {1: "2x2", 2: "2x2", 3: "hier:node=2,socket=2,gpu=2", 4: "hier:node=2,socket=2,pcie-pair=2,gpu=2"}


def _topology(name: str):
    depth = int(name[-1]) if name.rstrip("1234") in ("h", "hd") else 2
    return get_topology(TOPOLOGY_OF_DEPTH[depth])


def _case(name: str, topo) -> EPCase:
    """A few dozen tokens, top-3 over permuted slots (the placement paths run too), float64."""
    E = 2 * topo.G
    perm = tuple(torch.randperm(E, generator=torch.Generator().manual_seed(5)).tolist())
    kwargs = {"profile": profile_for_topology(topo)} if name == "hierd" else {}
    return EPCase(num_experts=E, top_k=3, tokens_per_rank=6, dispatcher=name, slot_of_expert=perm, seed=2,
                  dispatcher_kwargs=kwargs)


def _assert_same_run(got: list[dict], want: list[dict], rtol=1e-10, atol=1e-10):
    close = dict(rtol=rtol, atol=atol)
    for rank, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g["routing_map"], w["routing_map"]), f"rank {rank}: routing differs"
        for key in ("y", "x_grad"):
            torch.testing.assert_close(g[key], w[key], **close, msg=lambda m: f"rank {rank} {key}: {m}")
        for name, grad in w["gate_grads"].items():
            torch.testing.assert_close(g["gate_grads"][name], grad, **close)
        assert g["expert_grads"].keys() == w["expert_grads"].keys()
        for e, grads in w["expert_grads"].items():
            for name, grad in grads.items():
                torch.testing.assert_close(g["expert_grads"][e][name], grad, **close)


@pytest.mark.parametrize("name", names("dispatcher"))
def test_dispatcher_on_device_equals_cpu_run(name, device=DEVICE):
    topo = _topology(name)
    case = _case(name, topo)
    on_cpu = SimWorld(topo).run(run_rank, case)
    on_device = SimWorld(topo).run(run_rank, case.on(device))
    kind = torch.device(device).type
    assert all(r["devices"] == {"y": kind, "x_grad": kind} for r in on_device)
    _assert_same_run(on_device, on_cpu)
    assert_matches_reference(on_device, reference(case, topo.G))
