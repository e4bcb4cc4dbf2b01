"""FSMoE's modular layer and pipelined executor on simulated ranks: forward and hand-written
backward equal the unpipelined single-process reference (outputs, input, gate and expert
gradients) for every pipeline degree pair, gate, expert kind and capacity mode; the dispatch
algorithms; the per-GPU sizes n_a2a, n_ag, n_rs against the traffic counters; the gradient slice;
the executor keeps each schedule's order; bad input fails before any work."""
import functools
import itertools
import math

import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.config import ConfigError
from impl.common.topology import get_topology
from impl.fsmoe.config import MoELayerConfig
from impl.fsmoe.layer import FSMoELayer
from impl.fsmoe.layout import HybridLayout
from tests.support.fsmoe_case import FSMoECase, assert_matches_reference, reference, run_cases, run_rank

TOPO = get_topology("2x2")
GATES = ("gshard", "sigmoid", "xmoe", "expert_choice", "softmoe")
EXPERTS = ("gpt", "mixtral")
CAPACITIES = {"padded": 0.5, "no-drop": None}      # 0.5: small enough that experts drop rows
ALL_DEGREES = list(itertools.product(range(1, 9), repeat=2))
SOME_DEGREES = [(1, 1), (2, 3), (4, 4), (8, 1)]


def _case(gate, expert, cf, r_fwd=1, r_bwd=1, **kw):
    # SoftMoE's slots are its capacity: the fewest that both degrees split evenly
    cfg = MoELayerConfig(hidden=6, ffn_hidden=8, num_experts=4, top_k=2, gate=gate, expert=expert,
                         capacity_factor=cf, r_fwd=r_fwd, r_bwd=r_bwd, slots_per_expert=math.lcm(r_fwd, r_bwd),
                         gate_options={"noise_seed": 5} if gate == "gshard" else {}, **kw)
    return FSMoECase(cfg, tokens_per_rank=kw.pop("tokens", 8), gradient_slice=3)


@functools.lru_cache(maxsize=None)
def _reference(gate, expert, cf, multiple):
    r_fwd, r_bwd = next((a, b) for a, b in ALL_DEGREES if math.lcm(a, b) == multiple)
    return reference(_case(gate, expert, cf, r_fwd, r_bwd), TOPO.G)


def _check_degrees(gate, expert, cf, degrees):
    cases = [_case(gate, expert, cf, a, b) for a, b in degrees]
    results = SimWorld(TOPO).run(run_cases, cases)
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        assert_matches_reference(per_rank, _reference(gate, expert, cf, case.cfg.degree_multiple))
    return results


@pytest.mark.parametrize("cap", CAPACITIES)
@pytest.mark.parametrize("expert", EXPERTS)
@pytest.mark.parametrize("gate", GATES)
def test_pipelined_layer_equals_reference(gate, expert, cap):
    _check_degrees(gate, expert, CAPACITIES[cap], SOME_DEGREES)


@pytest.mark.slow
@pytest.mark.parametrize("cap", CAPACITIES)
@pytest.mark.parametrize("expert", EXPERTS)
@pytest.mark.parametrize("gate", GATES)
def test_pipelined_layer_equals_reference_for_every_degree_pair(gate, expert, cap):
    results = _check_degrees(gate, expert, CAPACITIES[cap], ALL_DEGREES)
    if cap == "padded" and gate in ("gshard", "sigmoid", "xmoe"):
        assert any(r[i]["dropped"] for r in results for i in range(len(ALL_DEGREES))), "no case dropped a row"


@pytest.mark.parametrize("dispatch", ["flat", "1dh", "2dh"])
@pytest.mark.parametrize("topo_name", ["2x2", "2x4"])
def test_expert_parallel_over_every_gpu_with_each_dispatch_algorithm(dispatch, topo_name):
    """esp off (N_ESP = 1): EP over all GPUs, where 1DH and 2DH take their hierarchical routes."""
    topo = get_topology(topo_name)
    for gate, expert in (("gshard", "gpt"), ("sigmoid", "mixtral")):
        case = _case(gate, expert, 1.0, 2, 3, esp=False, dispatch=dispatch)
        case = case.with_config(num_experts=topo.G)
        results = SimWorld(topo).run(run_rank, case)
        assert_matches_reference(results, reference(case, topo.G))


def test_task_sizes_equal_the_traffic_counters():
    """n_a2a, n_ag, n_rs of the digest (whole buffers) against the counted point-to-point bytes:
    the part of a buffer that leaves the GPU, n (P - 1) / P for a group of P."""
    topo = get_topology("2x4")
    case = _case("gshard", "gpt", 1.0, 2, 2).with_config(num_experts=4, ffn_hidden=8)
    results = SimWorld(topo).run(run_rank, case)
    layout = HybridLayout.of(topo, case.cfg)
    for r in results:
        sizes = layout.sizes(case.cfg, r["capacity"])
        elem = 8
        by_kind = {k: sum(v.values()) for k, v in r["traffic_by_kind"].items()}
        assert by_kind["a2a"] == 2 * sizes.n_a2a * elem * (layout.n_ep - 1) // layout.n_ep     # dispatch + combine
        assert by_kind["ag"] == sizes.n_ag * elem * (layout.n_esp - 1) // layout.n_esp
        assert by_kind["rs"] == sizes.n_rs * elem * (layout.n_esp - 1) // layout.n_esp
        # the inter-node AlltoAll crosses nodes only; the ESP collectives stay inside the node
        assert r["traffic_by_kind"]["a2a"]["gpu"] == 0 and r["traffic_by_kind"]["ag"]["node"] == 0
    assert sizes.n_exp == 2 * case.cfg.num_experts * results[0]["capacity"] * 6 * 8


def test_gradient_slice_is_all_reduced_over_the_data_parallel_group():
    results = SimWorld(TOPO).run(run_rank, _case("gshard", "gpt", 1.0, 2, 2))
    # the data-parallel group of the paper's layout: same local index on every node
    for rank, r in enumerate(results):
        group = [rank % 2, rank % 2 + 2]
        assert torch.equal(r["slice"], torch.full((3,), float(sum(g + 1 for g in group)), dtype=torch.float64))


def test_executor_keeps_each_lanes_order_and_the_dependencies():
    results = SimWorld(TOPO).run(run_rank, _case("gshard", "gpt", 1.0, 4, 3))
    for r in results:
        for phase, events in r["events"].items():
            starts = {name: s for name, s, _ in events}
            ends = {name: e for name, _, e in events}
            kinds = [name.rstrip("0123456789") for name, _, _ in events]
            assert kinds.count("dispatch") == (4 if phase == "fwd" else 3)
            for lane_kinds in (("dispatch", "gar", "combine"), ("ag", "rs"), ("expert",)):
                lane = [name for name, _, _ in events if name.rstrip("0123456789") in lane_kinds]
                assert [starts[n] for n in lane] == sorted(starts[n] for n in lane)
                assert all(ends[a] <= starts[b] for a, b in zip(lane, lane[1:]))
            for c in range(kinds.count("dispatch")):
                chain = [f"dispatch{c}", f"ag{c}", f"expert{c}", f"rs{c}", f"combine{c}"]
                assert all(ends[a] <= starts[b] for a, b in zip(chain, chain[1:]))


@pytest.mark.parametrize("kw,message", [
    (dict(r_fwd=9), "r_fwd: 9 is not allowed; allowed: an integer in 1..8"),
    (dict(r_bwd=0), "r_bwd: 0 is not allowed"),
    (dict(gate="switch"), "gate: 'switch' is not allowed; allowed: 'gshard', 'sigmoid', 'xmoe', 'expert_choice', 'softmoe'"),
    (dict(expert="moe"), "expert: 'moe' is not allowed; allowed: 'gpt', 'mixtral'"),
    (dict(capacity_factor=0), "capacity_factor: 0 is not allowed"),
    (dict(dispatch="2dh"), "dispatch: '2dh' needs expert parallelism over every GPU"),
    (dict(expert="mixtral", activation="gelu"), "activation: 'gelu' is not allowed with expert 'mixtral'"),
])
def test_bad_config_is_one_line(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoELayerConfig(hidden=4, ffn_hidden=8, num_experts=4, **kw)


def test_capacity_below_what_the_routing_needs_fails_before_any_token_moves():
    case = _case("sigmoid", "gpt", None).with_config(capacity=1, drop_tokens=False)

    def body(comm):
        layer = FSMoELayer(comm, case.cfg, dtype=torch.float64)
        with pytest.raises(ConfigError, match=r"capacity: C=1 is below the \d+ rows one expert needs with "
                                              "drop_tokens: false"):
            layer(torch.randn(8, 6, dtype=torch.float64))
        return sum(comm.traffic.by_level("bytes", "tokens", None).values())

    assert SimWorld(TOPO).run(body) == [0] * TOPO.G       # no token moved


def test_layout_errors_name_the_value():
    with pytest.raises(ConfigError, match="num_experts: 3 is not divisible by the expert-parallel size 2"):
        HybridLayout.of(TOPO, MoELayerConfig(hidden=4, ffn_hidden=8, num_experts=3, top_k=1))
    with pytest.raises(ConfigError, match="ffn_hidden: 7 is not divisible by the ESP size 2"):
        HybridLayout.of(TOPO, MoELayerConfig(hidden=4, ffn_hidden=7, num_experts=4))
