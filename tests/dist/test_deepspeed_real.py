"""The real deepspeed.moe.layer.MoE against our DeepSpeed-MoE sim, same inputs and weights:
outputs, l_aux and the gradients of the input, the router and every expert must agree, for
top-1 / top-2, with and without token dropping, with min_capacity, and with ep_size < world size.

One launch of 4 gloo ranks runs every case with the real layer and (ep_size = 4) with the sim
over the same process group; the parent runs the sim again on SimComm ranks. The first run on a
machine JIT-builds DeepSpeed's shared-memory comm op (about 25-45 s, cached afterwards)."""
import pickle

import pytest
import torch

pytest.importorskip("deepspeed")

from baselines.deepspeed_moe.real import (DeepSpeedLayerSpec, build_deepspeed_moe, init_deepspeed_comm,  # noqa: E402
                                          local_expert_ids)
from baselines.deepspeed_moe.sim import DeepSpeedMoEConfig, deepspeed_sim_layer  # noqa: E402
from impl.common.comm import Comm, SimWorld  # noqa: E402
from impl.common.experts import GroupedExperts  # noqa: E402
from impl.common.launcher import launch  # noqa: E402
from impl.common.topology import get_topology  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORLD, T, M, H, E, SEED, AUX_WEIGHT = 4, 16, 6, 5, 8, 7, 0.3
CASES = {  # name: (routing, ep_size); T/E = 2
    "top1-drop": (DeepSpeedMoEConfig(top_k=1, capacity_factor=0.5, min_capacity=0), 4),          # C = 1
    "top1-min-capacity": (DeepSpeedMoEConfig(top_k=1, capacity_factor=1.0, min_capacity=3), 4),  # C = 3
    "top1-dropless": (DeepSpeedMoEConfig(top_k=1, drop_tokens=False), 4),
    "top2-drop": (DeepSpeedMoEConfig(top_k=2, capacity_factor=0.75, min_capacity=0), 4),         # C = 3
    "top2-dropless": (DeepSpeedMoEConfig(top_k=2, drop_tokens=False), 4),
    "top2-drop-ep2": (DeepSpeedMoEConfig(top_k=2, capacity_factor=1.0, min_capacity=0), 2),      # C = 4
}


def inputs(global_rank: int):
    """(gate weight [E, M], this rank's tokens x [T, M], loss weights [T, M]), fp64."""
    gate_w = torch.randn(E, M, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    g = torch.Generator().manual_seed(SEED * 1000 + global_rank)
    x, w = (torch.randn(T, M, generator=g, dtype=torch.float64) for _ in range(2))
    return gate_w, x, w


def experts_for(ids: list[int]) -> GroupedExperts:
    experts = GroupedExperts(len(ids), M, H, kind="gpt").double()
    experts.init_from_seed(ids, SEED + 1)
    return experts


def forward_backward(forward, global_rank: int, gate_param, expert_params: dict[int, dict]) -> dict:
    """loss = <y, w> + AUX_WEIGHT * l_aux; everything the comparison needs."""
    _, x, w = inputs(global_rank)
    x.requires_grad_(True)
    y, l_aux, extra = forward(x)
    ((y * w).sum() + AUX_WEIGHT * l_aux).backward()
    return {"y": y.detach(), "l_aux": l_aux.detach().double(), "x_grad": x.grad, "gate_grad": gate_param.grad.clone(),
            "expert_grads": {e: {n: p.grad.clone() for n, p in ps.items()} for e, ps in expert_params.items()},
            **extra}


def sim_rank(comm: Comm, cfg: DeepSpeedMoEConfig, first_rank: int) -> dict:
    """The sim layer on one rank of an expert-parallel group whose first global rank is first_rank."""
    El = E // comm.world_size
    ids = list(range(comm.rank * El, (comm.rank + 1) * El))
    gate_w, _, _ = inputs(0)
    experts = experts_for(ids)
    layer = deepspeed_sim_layer(comm, cfg, M, experts)
    layer.gate.double()
    with torch.no_grad():
        layer.gate.wg.weight.copy_(gate_w)

    def forward(x):
        out = layer(x)
        return out.y_TM, out.routing.aux_loss, {"dropped": out.routing.num_dropped}

    params = {e: {n: p for n, p in (("w1", experts.w1), ("w2", experts.w2))} for e in ids}
    res = forward_backward(forward, first_rank + comm.rank, layer.gate.wg.weight, params)
    res["expert_grads"] = {e: {n: g[i] for n, g in grads.items()}              # local expert i's slice
                           for i, (e, grads) in enumerate(res["expert_grads"].items())}
    res["traffic"] = comm.traffic.to_dict()
    return res


def real_rank(comm: Comm, cases: dict) -> bytes:
    """Every case on this rank; returned pickled by value (tensors sent through the launcher's
    queue are shared by file descriptor, which races with the rank's exit when there are many)."""
    init_deepspeed_comm()
    out = {}
    for name, (cfg, ep_size) in cases.items():
        spec = DeepSpeedLayerSpec(hidden=M, ffn_hidden=H, num_experts=E, ep_size=ep_size, routing=cfg)
        ids = local_expert_ids(spec, comm.rank)
        moe = build_deepspeed_moe(spec, inputs(0)[0], experts_for(ids), dtype=torch.float64)

        def forward(x):
            y, l_aux, counts = moe(x)
            return y, l_aux, {"exp_counts": counts}

        params = {e: dict(ex.named_parameters()) for e, ex in zip(ids, moe.deepspeed_moe.experts.deepspeed_experts)}
        out[name] = {"real": forward_backward(forward, comm.rank, moe.deepspeed_moe.gate.wg.weight, params)}
        if ep_size == comm.world_size:
            comm.traffic.reset()
            out[name]["gloo_sim"] = sim_rank(comm, cfg, 0)
    return pickle.dumps(out)


@pytest.fixture(scope="module")
def launched():
    # a generous collective timeout: ranks wait at their first collective while one builds the op
    return [pickle.loads(r) for r in launch(real_rank, WORLD, args=(CASES,), timeout_s=300, deadline_s=600)]


def assert_same(a: dict, b: dict, what: str):
    close = dict(rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
    for key in ("y", "l_aux", "x_grad", "gate_grad"):
        torch.testing.assert_close(a[key], b[key], **close)
    assert a["expert_grads"].keys() == b["expert_grads"].keys()
    for e, grads in a["expert_grads"].items():
        for n, g in grads.items():
            torch.testing.assert_close(g, b["expert_grads"][e][n], **close)


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_deepspeed_equals_sim(launched, name):
    cfg, ep_size = CASES[name]
    real = [r[name]["real"] for r in launched]
    sim = []
    for first in range(0, WORLD, ep_size):   # one SimComm world per expert-parallel group
        sim += SimWorld(get_topology(f"1x{ep_size}")).run(sim_rank, cfg, first)
    for rank in range(WORLD):
        assert_same(real[rank], sim[rank], f"{name} rank {rank}: real vs sim")
        if ep_size == WORLD:
            assert_same(launched[rank][name]["gloo_sim"], sim[rank], f"{name} rank {rank}: gloo sim vs sim")
            assert launched[rank][name]["gloo_sim"]["traffic"] == sim[rank]["traffic"]
        # DeepSpeed's exp_counts are pre-drop: kept + dropped assignments
        assert int(real[rank]["exp_counts"].sum()) == T * cfg.top_k
    if cfg.drop_tokens:
        assert sum(s["dropped"] for s in sim) > 0, "the case should exercise token dropping"
    else:
        assert sum(s["dropped"] for s in sim) == 0
