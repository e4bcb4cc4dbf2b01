"""DeepSpeed-MoE sim: its gate against DeepSpeed's own gating functions (routing, weights,
capacity, l_aux and gradients), its capacity formula against DeepSpeed's, and the
'deepspeed-moe' dispatcher exact against the dense reference and the flat dispatcher, with its
padded bytes per level equal to a brute-force count."""
import pytest
import torch

from baselines.deepspeed_moe.sim import DeepSpeedDispatcher, DeepSpeedGate, DeepSpeedMoEConfig, deepspeed_capacity, \
    deepspeed_sim_layer
from impl.common.comm import SimWorld
from impl.common.dispatcher import FlatAlltoAllDispatcher
from impl.common.experts import GroupedExperts
from impl.common.moe_layer import ExpertParallelMoE
from impl.common.registry import get
from impl.common.routing import expert_capacity
from impl.common.topology import get_topology
from tests.support.ep_case import EPCase, assert_matches_reference, reference, run_rank


def _identity_gate(E: int, cfg: DeepSpeedMoEConfig) -> DeepSpeedGate:
    """hidden = E and wg = I, so the gate's logits are its input, bit for bit."""
    gate = DeepSpeedGate(E, E, cfg)
    with torch.no_grad():
        gate.wg.weight.copy_(torch.eye(E))
    return gate


GATE_CASES = [  # (top_k, S, E, capacity_factor, min_capacity, seed)
    (1, 16, 4, 1.0, 0, 0), (1, 16, 4, 0.5, 0, 1), (1, 33, 8, 1.0, 4, 2), (1, 12, 3, 0.7, 2, 3),
    (2, 16, 4, 1.0, 0, 4), (2, 16, 4, 0.5, 0, 5), (2, 33, 8, 1.25, 4, 6), (2, 12, 3, 0.6, 1, 7),
    (1, 35, 3, 0.6, 0, 8), (2, 45, 3, 1.1, 0, 9),   # capacities where fp32 rounding matters
]


@pytest.mark.parametrize("k,S,E,cf,min_cap,seed", GATE_CASES)
def test_gate_equals_deepspeed_gating(k, S, E, cf, min_cap, seed):
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")
    logits = (2 * torch.randn(S, E, generator=torch.Generator().manual_seed(seed))).requires_grad_(True)
    R = torch.randn(S, E, generator=torch.Generator().manual_seed(100 + seed))
    if k == 1:
        l_aux, combine_SEC, mask_SEC, _ = sharded_moe.top1gating(logits, cf, min_cap, noisy_gate_policy=None,
                                                                 drop_tokens=True, use_rts=False)
    else:
        l_aux, combine_SEC, mask_SEC, _ = sharded_moe.top2gating(logits, cf, min_cap, drop_tokens=True,
                                                                 top2_2nd_expert_sampling=False)
    weights_SE = combine_SEC.sum(dim=2)
    ((weights_SE * R).sum() + 0.3 * l_aux).backward()
    ds_grad = logits.grad.clone()

    cfg = DeepSpeedMoEConfig(top_k=k, capacity_factor=cf, min_capacity=min_cap)
    x = logits.detach().clone().requires_grad_(True)
    routing = _identity_gate(E, cfg)(x)
    ((routing.probs_TE * R).sum() + 0.3 * routing.aux_loss).backward()

    assert combine_SEC.shape[2] == deepspeed_capacity(S, E, cfg)
    assert torch.equal(routing.routing_map_TE, mask_SEC.any(dim=2))
    assert routing.num_dropped == S * k - int(mask_SEC.any(dim=2).sum()) and routing.num_dropped > 0
    torch.testing.assert_close(routing.probs_TE, weights_SE, rtol=0, atol=0)
    torch.testing.assert_close(routing.aux_loss, l_aux, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ds_grad, rtol=1e-6, atol=1e-7)


def test_capacity_equals_deepspeed_including_fp32_rounding():
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")
    gates = {}
    for S, E, cf, k, min_cap in [(10, 3, 0.3, 1, 0), (10, 3, 0.3, 2, 0), (1000, 7, 1.1, 2, 4), (6, 8, 1.0, 1, 4),
                                 (12, 8, 1.0, 2, 0), (35, 3, 0.6, 1, 0), (45, 3, 1.1, 2, 0), (30, 10, 0.3, 1, 0)]:
        gates.setdefault((S, E), torch.zeros(S, E))
        expected = int(sharded_moe._capacity(gates[(S, E)], torch.tensor(cf * k), torch.tensor(min_cap)))
        assert deepspeed_capacity(S, E, DeepSpeedMoEConfig(k, cf, min_cap)) == expected, (S, E, cf, k, min_cap)
    # fp32 rounding: exact 7.0 becomes 8; fp64's 33.000000000000004 (routing.expert_capacity: 34) stays 33
    assert deepspeed_capacity(35, 3, DeepSpeedMoEConfig(1, 0.6, 0)) == 8 != expert_capacity(35, 3, 1, 0.6)
    assert deepspeed_capacity(45, 3, DeepSpeedMoEConfig(2, 1.1, 0)) == 33 != expert_capacity(45, 3, 2, 1.1)


@pytest.mark.parametrize("topo_name", ["1x2", "2x2", "1x4", "hier:node=2,socket=2,gpu=2"])
def test_dispatcher_matches_dense_reference(topo_name):
    topo = get_topology(topo_name)
    case = EPCase(num_experts=2 * topo.G, top_k=2, tokens_per_rank=10, dispatcher="deepspeed-moe")
    assert_matches_reference(SimWorld(topo).run(run_rank, case), reference(case, topo.G))


def test_dispatcher_with_gate_drops_matches_dense_reference():
    """DeepSpeed's capacity max(ceil(T/E*cf*k), min_capacity) is never below the gate's ceil(T*k*cf/E)."""
    topo = get_topology("2x2")
    case = EPCase(num_experts=8, top_k=2, tokens_per_rank=12, dispatcher="deepspeed-moe",
                  dispatcher_kwargs={"top_k": 2, "capacity_factor": 1.0, "drop_tokens": True},
                  gate_kwargs={"capacity_factor": 1.0, "drop_policy": "probs"})
    assert_matches_reference(SimWorld(topo).run(run_rank, case), reference(case, topo.G))


def _layers_agree(comm, cfg: DeepSpeedMoEConfig, E: int, T: int, M: int) -> dict:
    """DeepSpeed's gate with its exchange vs the same gate with the flat (reference) dispatcher."""
    El = E // comm.world_size
    ids = list(range(comm.rank * El, (comm.rank + 1) * El))
    g = torch.Generator().manual_seed(11)
    gate_w = torch.randn(E, M, generator=g, dtype=torch.float64)
    x = torch.randn(comm.world_size * T, M, generator=g, dtype=torch.float64)[comm.rank * T:(comm.rank + 1) * T]
    out = {}
    for name in ("deepspeed", "flat"):
        experts = GroupedExperts(El, M, 5, kind="gpt").double()
        experts.init_from_seed(ids, 3)
        gate = DeepSpeedGate(M, E, cfg).double()
        with torch.no_grad():
            gate.wg.weight.copy_(gate_w)
        layer = deepspeed_sim_layer(comm, cfg, M, experts, gate) if name == "deepspeed" else \
            ExpertParallelMoE(gate, experts, FlatAlltoAllDispatcher(comm, E))
        xr = x.clone().requires_grad_(True)
        res = layer(xr)
        (res.y_TM.square().sum() + res.routing.aux_loss).backward()
        out[name] = (res.y_TM.detach(), xr.grad, gate.wg.weight.grad, experts.w1.grad, experts.w2.grad,
                     res.routing.num_dropped)
    return out


@pytest.mark.parametrize("cfg", [DeepSpeedMoEConfig(top_k=1, capacity_factor=0.5, min_capacity=0),
                                 DeepSpeedMoEConfig(top_k=2, capacity_factor=0.75, min_capacity=2),
                                 DeepSpeedMoEConfig(top_k=2, drop_tokens=False)], ids=str)
def test_deepspeed_layer_equals_flat_dispatcher_with_same_gate(cfg):
    topo = get_topology("2x2")
    results = SimWorld(topo).run(_layers_agree, cfg, 8, 12, 6)
    for r in results:
        for a, b in zip(r["deepspeed"][:5], r["flat"][:5]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (sum(r["deepspeed"][5] for r in results) > 0) == cfg.drop_tokens


@pytest.mark.parametrize("topo_name", ["2x2", "hier:node=2,socket=2,gpu=2"])
def test_padded_bytes_per_level_equal_brute_force(topo_name):
    """Each exchange: every rank sends E/G * C rows (padding included) to every other rank."""
    topo = get_topology(topo_name)
    case = EPCase(num_experts=2 * topo.G, top_k=2, tokens_per_rank=7, dispatcher="deepspeed-moe")
    world = SimWorld(topo)
    results = world.run(run_rank, case)
    capacity = max(int(r["routing_map"].sum(0).max()) for r in results)
    expected_bytes = {n: 0 for n in topo.level_names}
    expected_msgs = dict(expected_bytes)
    for src in range(topo.G):
        for dst in range(topo.G):
            if src != dst:
                expected_bytes[topo.link_name(src, dst)] += 2 * capacity * case.hidden * 8
                expected_msgs[topo.link_name(src, dst)] += 1
    total = world.total_traffic()
    for phase in ("fwd", "bwd"):
        assert total.by_level("bytes", "tokens", phase) == {k: 2 * v for k, v in expected_bytes.items()}
        assert total.by_level("messages", "tokens", phase) == {k: 2 * v for k, v in expected_msgs.items()}
    # no split counts or gate weights travel; only the capacity agreement (an all-reduce of 3 ints)
    assert sum(total.by_level("bytes", "meta", None, kind="a2a").values()) == 0
    assert sum(total.by_level("bytes", "meta", None, kind="ar").values()) <= topo.G * 2 * 3 * 8


def test_registry_names_build_the_sim():
    world = SimWorld(get_topology("1x2"))
    assert isinstance(get("dispatcher", "deepspeed-moe")(world.comms[0], 4, drop_tokens=True), DeepSpeedDispatcher)
    gate = get("gate", "deepspeed_top2")(6, 4, capacity_factor=1.5, min_capacity=0)
    assert gate.cfg == DeepSpeedMoEConfig(top_k=2, capacity_factor=1.5, min_capacity=0)


@pytest.mark.parametrize("kwargs,match", [({"top_k": 3}, r"top_k: 3 is not allowed; expected 1 or 2"),
                                          ({"capacity_factor": 0}, "capacity_factor: 0 is not allowed"),
                                          ({"min_capacity": -1}, "min_capacity: -1 is not allowed"),
                                          ({"drop_tokens": "yes"}, "drop_tokens: 'yes' is not allowed")])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepSpeedMoEConfig(**kwargs)


def test_too_few_tokens_for_min_capacity():
    with pytest.raises(ValueError, match="T=3 tokens per rank is below min_capacity=4"):
        DeepSpeedGate(5, 4)(torch.zeros(3, 5))


def test_default_gate_is_replicated_across_ranks():
    def body(comm):
        experts = GroupedExperts(2, 6, 5, kind="gpt")
        return deepspeed_sim_layer(comm, DeepSpeedMoEConfig(), 6, experts, gate_seed=3).gate.wg.weight.detach()

    first, *others = SimWorld(get_topology("2x2")).run(body)
    assert all(torch.equal(first, w) for w in others)
