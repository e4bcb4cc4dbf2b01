"""The communication layer with CUDA tensors: TorchComm over NCCL (world size 1, through the
project's launcher) for every collective, synchronous and asynchronous, and FSMoE's layer whose
executor then runs its lanes as CUDA streams, equal to the same layer on the CPU; TorchComm over
gloo with CUDA tensors on two ranks sharing the GPU, for each collective gloo supports there."""
import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.launcher import launch
from impl.common.topology import get_topology
from impl.fsmoe.config import MoELayerConfig
from tests.support.fsmoe_case import FSMoECase, assert_matches_reference, reference, run_rank

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FSMOE = FSMoECase(MoELayerConfig(hidden=8, ffn_hidden=8, num_experts=4, top_k=2, esp=False, dispatch="flat",
                                 capacity_factor=1.0, r_fwd=2, r_bwd=2, gate_options={"noise_seed": 3}),
                  tokens_per_rank=12, gradient_slice=4)
OPS = ("a2a", "ar", "ag", "rs", "a2a_async", "ar_async", "ag_async", "rs_async")


def _collectives(comm, device: str) -> dict:
    """Every collective on `device` tensors: (status, result on the CPU, result's device type)."""
    G, r = comm.world_size, comm.rank
    x = (torch.arange(4.0 * G, device=device) + 100 * r).reshape(2 * G, 2)
    calls = {"a2a": lambda: comm.all_to_all(x, [2] * G, [2] * G), "ar": lambda: comm.all_reduce(x, "sum"),
             "ag": lambda: comm.all_gather_cat(x), "rs": lambda: comm.reduce_scatter(x),
             "a2a_async": lambda: comm.all_to_all_async(x, [2] * G, [2] * G).wait(),
             "ar_async": lambda: comm.all_reduce_async(x, "sum").wait(),
             "ag_async": lambda: comm.all_gather_cat_async(x).wait(),
             "rs_async": lambda: comm.reduce_scatter_async(x).wait()}
    out = {}
    for op in OPS:
        try:
            y = calls[op]()
            out[op] = ("ok", y.cpu(), y.device.type)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            out[op] = ("unsupported", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", None)
    return out


def _nccl_job(comm) -> dict:
    return {"backend": comm.backend, "device": str(comm.device), "collectives": _collectives(comm, "cuda"),
            "fsmoe": run_rank(comm, FSMOE.on("cuda"))}


@pytest.fixture(scope="module")
def nccl():
    return launch(_nccl_job, 1, backend="nccl", timeout_s=60, deadline_s=180)[0]


@pytest.fixture(scope="module")
def cpu_reference():
    return SimWorld(get_topology("1x1")).run(_collectives, "cpu")[0]


def test_nccl_comm_is_nccl_on_cuda(nccl):
    assert nccl["backend"] == "nccl" and nccl["device"].startswith("cuda")


@pytest.mark.parametrize("op", OPS)
def test_nccl_collectives_on_cuda_tensors_equal_cpu(nccl, cpu_reference, op):
    status, y, device = nccl["collectives"][op]
    assert status == "ok", y
    assert device == "cuda"
    assert torch.equal(y, cpu_reference[op][1])


def test_fsmoe_layer_on_cuda_streams_equals_cpu_run(nccl):
    got = nccl["fsmoe"]
    cpu = SimWorld(get_topology("1x1")).run(run_rank, FSMOE)[0]
    assert_matches_reference([got], reference(FSMOE, 1))
    for key in ("y", "x_grad"):
        torch.testing.assert_close(got[key], cpu[key], rtol=0, atol=1e-12)
    for group in ("gate_grads", "expert_grads"):
        for name, g in cpu[group].items():
            torch.testing.assert_close(got[group][name], g, rtol=0, atol=1e-12)
    assert all("CUDA streams" in src for src in got["timeline_sources"].values())


@pytest.fixture(scope="module")
def gloo_cuda():
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a GPU")
    return launch(_collectives, 2, args=("cuda",), backend="gloo", timeout_s=30, deadline_s=120)


@pytest.mark.parametrize("op", OPS)
def test_gloo_collectives_on_cuda_tensors_equal_cpu(gloo_cuda, op):
    cpu = SimWorld(get_topology("1x2")).run(_collectives, "cpu")
    statuses = {r[op][0] for r in gloo_cuda}
    if statuses == {"unsupported"}:
        pytest.skip(f"gloo does not take CUDA tensors for {op}: {gloo_cuda[0][op][1]}")
    for rank, res in enumerate(gloo_cuda):
        status, y, device = res[op]
        assert status == "ok", y
        assert device == "cuda" and torch.equal(y, cpu[rank][op][1])
