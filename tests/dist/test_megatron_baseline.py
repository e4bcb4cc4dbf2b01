"""The real megatron-core MoELayer (alltoall dispatcher) on CPU over gloo equals our
FlatAlltoAllDispatcher-based ExpertParallelMoE: same routing, outputs, gradients (input, router,
every expert) and the same token bytes / messages per topology level, forward and backward, which
also equal a brute-force count of one row per (token, remote expert) pair each way."""
import pickle
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("megatron.core")

from impl.common.comm import TrafficCounter  # noqa: E402
from impl.common.dispatcher import ExpertPlacement, FlatAlltoAllDispatcher  # noqa: E402
from impl.common.launcher import launch  # noqa: E402
from impl.common.moe_layer import ExpertParallelMoE  # noqa: E402
from impl.common.routing import GateConfig, build_gate  # noqa: E402
from impl.common.topology import get_topology  # noqa: E402
from tests.support.ep_case import brute_force_flat_bytes  # noqa: E402

pytestmark = pytest.mark.dist

DTYPE = torch.float64
# megatron's router takes the softmax in float32 even for float64 logits (see baselines.megatron.moe):
# the float64 layers differ by ~1e-7, so float32-level tolerances
CLOSE = dict(rtol=1e-5, atol=2e-6)


@dataclass(frozen=True)
class Case:
    num_experts: int
    top_k: int
    ffn_kind: str = "swiglu"
    activation: str = "silu"
    bias: bool = False
    capacity_factor: float | None = None
    gate_kind: str = "softmax_topk"
    normalize_topk: bool | None = None
    tokens_per_rank: int = 12
    hidden: int = 8
    ffn_hidden: int = 6
    seed: int = 0

    def config(self):
        from baselines.megatron.moe import MegatronMoEConfig

        return MegatronMoEConfig(
            num_experts=self.num_experts, hidden=self.hidden, ffn_hidden=self.ffn_hidden,
            gate=GateConfig(kind=self.gate_kind, top_k=self.top_k, capacity_factor=self.capacity_factor,
                            normalize_topk=self.normalize_topk),
            ffn_kind=self.ffn_kind, activation=self.activation, bias=self.bias, dtype="float64")


def _inputs(case: Case, rank: int):
    g = torch.Generator().manual_seed(case.seed * 101 + rank)
    x = torch.randn(case.tokens_per_rank, case.hidden, generator=g, dtype=DTYPE)
    w = torch.randn(case.tokens_per_rank, case.hidden, generator=g, dtype=DTYPE)
    return x, w


def _forward_backward(layer, x, w):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.y_TM * w).sum().backward()
    return out, x.grad


def _rank(comm, cases):
    """Both layers on this rank; the result is pickled by value (tensors handed over as shared
    memory can vanish with the rank's process before the parent reads them)."""
    from impl.common.megatron.cpu_patches import apply_cpu_patches
    from baselines.megatron.moe import count_all_to_all
    from impl.common.registry import get

    results = []
    for case in cases:
        cfg = case.config()
        x, w = _inputs(case, comm.rank)
        torch.manual_seed(case.seed + 1)
        gate = build_gate(cfg.gate, cfg.hidden, cfg.num_experts).to(DTYPE)
        dispatcher = FlatAlltoAllDispatcher(comm, cfg.num_experts)
        experts = cfg.new_experts(dispatcher.local_experts(), case.seed + 2)
        comm.traffic.reset()
        ours, ours_x_grad = _forward_backward(ExpertParallelMoE(gate, experts, dispatcher), x, w)

        meg = get("moe_layer", "megatron-core")(comm, cfg, gate=gate,
                                                experts=cfg.new_experts(dispatcher.local_experts(), case.seed + 2))
        counter = TrafficCounter(comm.topology)
        with count_all_to_all(counter):
            theirs, their_x_grad = _forward_backward(meg, x, w)
        results.append({
            "ours": {"y": ours.y_TM.detach(), "x_grad": ours_x_grad, "map": ours.routing.routing_map_TE,
                     "gate_grad": gate.weight_EM.grad.clone(),
                     "expert_grads": {e: {n: p.grad[i].clone() for n, p in experts.named_parameters()}
                                      for i, e in enumerate(dispatcher.local_experts())},
                     "tokens": comm.traffic.to_dict()["tokens"]},
            "megatron": {"y": theirs.y_TM.detach(), "x_grad": their_x_grad, "map": theirs.routing.routing_map_TE,
                         "gate_grad": meg.layer.router.weight.grad.clone(),
                         "expert_grads": meg.expert_tensors(grad=True),
                         "tokens": counter.to_dict()["tokens"]},
        })
    patches = apply_cpu_patches()
    return pickle.dumps({"cases": results, "patches": patches, "again": apply_cpu_patches()})


def _check(case: Case, topology, per_rank: list[dict]):
    ours = [r["ours"] for r in per_rank]
    theirs = [r["megatron"] for r in per_rank]
    for o, t in zip(ours, theirs):
        assert torch.equal(o["map"], t["map"]), "same routing"
        if case.capacity_factor is not None:
            assert int(t["map"].sum()) < case.tokens_per_rank * case.top_k, "the capacity drops assignments"
        torch.testing.assert_close(t["y"], o["y"], **CLOSE)
        torch.testing.assert_close(t["x_grad"], o["x_grad"], **CLOSE)
        assert set(t["expert_grads"]) == set(o["expert_grads"])
        for e, grads in o["expert_grads"].items():
            for name, g in grads.items():
                torch.testing.assert_close(t["expert_grads"][e][name], g, **CLOSE)
    torch.testing.assert_close(sum(t["gate_grad"] for t in theirs), sum(o["gate_grad"] for o in ours), **CLOSE)
    # bytes and messages per level: megatron's all-to-alls == our TrafficCounter == brute force
    for o, t in zip(ours, theirs):
        assert t["tokens"] == o["tokens"]
    row_bytes = case.hidden * DTYPE.itemsize
    one_way, messages = brute_force_flat_bytes([t["map"] for t in theirs], topology,
                                               ExpertPlacement.identity(case.num_experts), row_bytes)
    for phase in ("fwd", "bwd"):
        total = {lvl: sum(t["tokens"][phase]["bytes"][lvl] for t in theirs) for lvl in topology.level_names}
        assert total == {lvl: 2 * b for lvl, b in one_way.items()}, phase        # dispatch + combine
        msgs = {lvl: sum(t["tokens"][phase]["messages"][lvl] for t in theirs) for lvl in topology.level_names}
        assert msgs == {lvl: 2 * m for lvl, m in messages.items()}, phase


@pytest.mark.parametrize("topology_name,cases", [
    ("1x2", (Case(num_experts=4, top_k=2),
             Case(num_experts=4, top_k=2, ffn_kind="gpt", activation="gelu", bias=True, capacity_factor=0.8),
             Case(num_experts=4, top_k=1, gate_kind="switch", seed=2))),
    ("2x2", (Case(num_experts=8, top_k=3, normalize_topk=True),
             Case(num_experts=4, top_k=2, ffn_kind="gpt", activation="relu", gate_kind="sigmoid",
                  normalize_topk=True, seed=1))),
], ids=["ep2", "ep4"])
def test_megatron_moe_layer_equals_flat_dispatcher(topology_name, cases):
    topology = get_topology(topology_name)
    results = [pickle.loads(r) for r in
               launch(_rank, topology.G, args=(cases,), topology=topology, timeout_s=60, deadline_s=240)]
    for i, case in enumerate(cases):
        _check(case, topology, [r["cases"][i] for r in results])
    for r in results:   # on CPU every patch is in effect, and applying them again changes nothing
        assert r["patches"] == r["again"] == ("current_device", "te_general_gemm", "dtoh_stream+dtoh_sync",
                                              "rng_tracker")


@pytest.mark.parametrize("kw,match", [
    (dict(gate=GateConfig(kind="gshard", top_k=2)),
     r"gate.kind: 'gshard' .* allowed: 'softmax_topk', 'switch', 'sigmoid'"),
    (dict(gate=GateConfig(kind="sigmoid", top_k=2)), r"gate.normalize_topk: .* set normalize_topk: true"),
    (dict(ffn_kind="swiglu", activation="gelu"), r"ffn_kind 'swiglu' needs activation 'silu'"),
    (dict(dtype="bfloat16"), r"dtype: 'bfloat16' is not allowed; allowed: 'float32', 'float64'"),
    (dict(gate=GateConfig(kind="softmax_topk", top_k=5)), r"gate.top_k: 5 is not allowed with num_experts=4"),
])
def test_config_errors_name_the_key(kw, match):
    """Checked before any rank starts; no megatron import needed."""
    from baselines.megatron.moe import MegatronMoEConfig
    from impl.common.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        MegatronMoEConfig(**{**dict(num_experts=4, hidden=8, ffn_hidden=6), **kw})



def test_config_from_model():
    from baselines.megatron.moe import MegatronMoEConfig
    from impl.common.config import ConfigError
    from impl.common.models import get_model

    cfg = MegatronMoEConfig.from_model(get_model("qwen3-30b-a3b-tiny"))
    assert (cfg.num_experts, cfg.top_k, cfg.ffn_kind, cfg.gate.normalize_topk) == (32, 8, "swiglu", True)
    with pytest.raises(ConfigError, match="gate.kind: 'deepseek_v3'"):
        MegatronMoEConfig.from_model(get_model("deepseek-v3-tiny"))
