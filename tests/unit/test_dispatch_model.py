"""The dispatch model charges what the dispatchers send: for every modeled dispatcher (Megatron's
flat AlltoAll, Hd, HDd, HierD-AlltoAll, Tutel-2DH, the DeepEP-style dispatcher) the bytes and
messages per topology level of every collective the model lists equal the traffic counters of a
real forward + backward on SimComm, per category ('tokens', 'meta') and phase; and the metadata
of the hierarchical routes stays under 1% of the token bytes at hidden 2048 in bf16."""
import pytest
import torch

from baselines.deepep import deepep_collectives, deepep_time
from baselines.tutel_2dh.dispatcher import capacity_of, tutel_2dh_collectives
from impl.common.comm import SimWorld
from impl.common.dispatcher import ExpertPlacement
from impl.common.routing import RoutingResult
from impl.common.topology import get_topology
from impl.hiermoe.dedup_a2a import HierarchicalDispatcher
from impl.hiermoe.dimension import (agreement_collective, choose_from_counts, collectives_time, dispatch_counts,
                                    flat_collectives, flat_time, route_collectives, route_time, traffic_of)
from tests.support.ep_case import EPCase, run_rank
from tests.support.expert_training import profile_for_topology

SMALL = ["flat", "megatron-flat", "tutel-2dh", "deepep", "hierd"] + [f"{p}{d}" for d in (1, 2, 3) for p in ("h", "hd")]


def model_of(name, counts, topo, case, row_bytes, weight_bytes, maps):
    if name in ("flat", "megatron-flat"):
        return flat_collectives(counts, row_bytes, weight_bytes)
    if name == "tutel-2dh":
        counts_GE = torch.stack([m.sum(0) for m in maps])
        return tutel_2dh_collectives(topo, case.num_experts, capacity_of(counts_GE, case.tokens_per_rank,
                                                                          case.top_k, 0.0), row_bytes)
    if name == "deepep":
        return deepep_collectives(counts, row_bytes, weight_bytes)
    if name == "hierd":
        d = choose_from_counts(counts, profile_for_topology(topo), row_bytes, weight_bytes)
        return (agreement_collective(topo),) + route_collectives(counts, d, True, row_bytes, weight_bytes)
    return route_collectives(counts, int(name[-1]), name.startswith("hd"), row_bytes, weight_bytes)


def check(topo_name, name, E, K):
    topo = get_topology(topo_name)
    if name[-1].isdigit() and int(name[-1]) > topo.D:
        return
    perm = tuple(torch.randperm(E, generator=torch.Generator().manual_seed(5)).tolist())
    kwargs = {"profile": profile_for_topology(topo)} if name == "hierd" else {}
    case = EPCase(num_experts=E, top_k=K, tokens_per_rank=7, dispatcher=name, slot_of_expert=perm, seed=2,
                  dispatcher_kwargs=kwargs)
    world = SimWorld(topo)
    results = world.run(run_rank, case)
    maps = [r["routing_map"] for r in results]
    placement = ExpertPlacement(perm)
    counts = dispatch_counts(maps, topo, placement)
    slot_maps = [placement.to_slots(m) for m in maps]
    model = model_of(name, counts, topo, case, case.hidden * 8, 8, slot_maps)
    total = world.total_traffic()
    for category in ("tokens", "meta"):
        for phase in ("fwd", "bwd"):
            for what in ("bytes", "messages"):
                assert total.by_level(what, category, phase) == traffic_of(model, what, category, phase), \
                    (name, category, phase, what)
    assert total.by_level("bytes", "meta", "fwd") != dict.fromkeys(topo.level_names, 0) or name == "tutel-2dh"
    # the time functions' closed forms equal the sum over the listed collectives
    profile = profile_for_topology(topo)
    listed = collectives_time(model, profile)
    if name in ("flat", "megatron-flat"):
        assert flat_time(counts, profile, case.hidden * 8, 8) == pytest.approx(listed)
    elif name == "deepep":
        assert deepep_time(counts, profile, case.hidden * 8, 8) == pytest.approx(listed)
    elif name not in ("tutel-2dh", "hierd"):
        assert route_time(counts, int(name[-1]), name.startswith("hd"), profile, case.hidden * 8, 8) == \
            pytest.approx(listed)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("topo_name,E,K", [("2x4", 16, 4), ("hier:node=2,socket=2,gpu=2", 16, 3)])
def test_model_equals_traffic_counters(topo_name, E, K, name):
    check(topo_name, name, E, K)


@pytest.mark.parametrize("name", ["flat", "h4", "hd3", "hierd", "deepep", "tutel-2dh"])
def test_model_equals_traffic_counters_on_the_testbed(name):
    check("hiermoe-testbed", name, 64, 8)


def _paper_scale_rank(comm, dim):
    """One Qwen3-30B-A3B layer's dispatch + combine + backward on one rank: 256 tokens, E = 128,
    K = 8, hidden 2048 in bf16, router weights in fp32 (what the traffic counters see)."""
    g = torch.Generator().manual_seed(comm.rank)
    T, E, K, M = 256, 128, 8, 2048
    x = torch.randn(T, M, generator=g).to(torch.bfloat16).requires_grad_(True)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    ids = torch.topk(logits.detach(), K, dim=1).indices
    rmap = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True)
    probs = torch.softmax(logits, 1) * rmap
    disp = HierarchicalDispatcher(comm, E, dim=dim)
    tokens, meta = disp.dispatch(x, RoutingResult(rmap, probs))
    y = disp.combine(tokens.x_RM * tokens.probs_R.unsqueeze(1).to(torch.bfloat16), meta)
    y.float().sum().backward()


@pytest.mark.parametrize("dim", [2, 3])
def test_metadata_is_under_one_percent_of_token_bytes(dim):
    world = SimWorld(get_topology("hiermoe-testbed"))
    world.run(_paper_scale_rank, dim)
    total = world.total_traffic()
    meta = sum(total.by_level("bytes", "meta", None).values())
    tokens = sum(total.by_level("bytes", "tokens", None).values())
    assert 0 < meta <= 0.01 * tokens, meta / tokens
