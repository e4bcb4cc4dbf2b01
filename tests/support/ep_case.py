"""One expert-parallel MoE case, run identically on SimComm ranks and on gloo ranks, plus the
single-process dense reference it must equal.

Every rank builds the same global inputs from the seed and keeps its own slice of tokens; the
gate is replicated; each rank holds the experts of its slots. The dense reference holds all E
experts (same weights: experts are initialised per global id) and all G*T tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from impl.common.comm import Comm, SimWorld
from impl.common.dispatcher import ExpertPlacement, FlatAlltoAllDispatcher
from impl.common.experts import GroupedExperts
from impl.common.moe_layer import ExpertParallelMoE, dense_moe_reference
from impl.common.routing import GateConfig, RoutingResult, build_gate, init_gate_from_seed

DTYPE = torch.float64


@dataclass(frozen=True)
class EPCase:
    num_experts: int = 8
    top_k: int = 2
    tokens_per_rank: int = 12
    hidden: int = 6
    ffn_hidden: int = 5
    ffn_kind: str = "swiglu"
    seed: int = 0
    slot_of_expert: tuple[int, ...] | None = None   # None = identity placement
    dispatcher: str = "flat"
    dispatcher_kwargs: dict = field(default_factory=dict)
    gate_kwargs: dict = field(default_factory=dict)   # extra GateConfig fields, e.g. capacity_factor
    device: str = "cpu"                               # where the layer and tokens live (results come back on the CPU)

    def on(self, device: str) -> "EPCase":
        return replace(self, device=device)


def global_inputs(case: EPCase, world_size: int):
    g = torch.Generator().manual_seed(case.seed)
    x = torch.randn(world_size * case.tokens_per_rank, case.hidden, generator=g, dtype=DTYPE)
    w_out = torch.randn(world_size * case.tokens_per_rank, case.hidden, generator=g, dtype=DTYPE)
    return x, w_out


def make_gate(case: EPCase):
    """The replicated gate, initialised from a private generator: SimComm ranks are threads, so
    the global RNG would race between them."""
    gate = build_gate(GateConfig(kind="softmax_topk", top_k=case.top_k, **case.gate_kwargs), case.hidden,
                      case.num_experts).to(DTYPE)
    return init_gate_from_seed(gate, case.seed + 1)


def make_experts(case: EPCase, expert_ids: list[int]):
    experts = GroupedExperts(len(expert_ids), case.hidden, case.ffn_hidden, kind=case.ffn_kind).to(DTYPE)
    experts.init_from_seed(expert_ids, case.seed + 2)
    return experts


def make_dispatcher(case: EPCase, comm: Comm):
    if case.dispatcher == "flat":
        return FlatAlltoAllDispatcher(comm, case.num_experts, **case.dispatcher_kwargs)
    import impl.experiments.systems  # noqa: F401  (registers every dispatcher, also in spawned gloo ranks)
    from impl.common.registry import get
    return get("dispatcher", case.dispatcher)(comm, case.num_experts, **case.dispatcher_kwargs)


def case_placement(case: EPCase) -> ExpertPlacement:
    return ExpertPlacement(case.slot_of_expert) if case.slot_of_expert else ExpertPlacement.identity(case.num_experts)


def run_rank(comm: Comm, case: EPCase) -> dict:
    """Forward + backward of one rank; returns everything the reference comparison needs."""
    x_all, w_all = global_inputs(case, comm.world_size)
    T = case.tokens_per_rank
    x = x_all[comm.rank * T:(comm.rank + 1) * T].clone().to(case.device).requires_grad_(True)
    gate = make_gate(case).to(case.device)
    dispatcher = make_dispatcher(case, comm)
    placement = case_placement(case)
    local = placement.local_experts(comm.rank, comm.world_size)
    experts = make_experts(case, local).to(case.device)
    layer = ExpertParallelMoE(gate, experts, dispatcher, placement)
    out = layer(x)
    loss = (out.y_TM * w_all[comm.rank * T:(comm.rank + 1) * T].to(case.device)).sum()
    loss.backward()
    return {
        "y": out.y_TM.detach().cpu(), "x_grad": x.grad.detach().cpu(),
        "devices": {"y": out.y_TM.device.type, "x_grad": x.grad.device.type},
        "gate_grads": {n: p.grad.detach().clone().cpu() for n, p in gate.named_parameters()},
        "expert_grads": {e: {n: p.grad[i].detach().clone().cpu() for n, p in experts.named_parameters()}
                         for i, e in enumerate(local)},
        "routing_map": out.routing.routing_map_TE.detach().cpu(),
        "traffic": comm.traffic.to_dict(),
    }


def reference(case: EPCase, world_size: int) -> dict:
    x_all, w_all = global_inputs(case, world_size)
    x = x_all.clone().requires_grad_(True)
    gate = make_gate(case)
    experts = make_experts(case, list(range(case.num_experts)))
    # each rank routes its own tokens (a capacity limit applies per rank, as in the EP run)
    chunks = [gate(x_r) for x_r in x.split(case.tokens_per_rank)]
    routing = RoutingResult(torch.cat([r.routing_map_TE for r in chunks]), torch.cat([r.probs_TE for r in chunks]))
    y = dense_moe_reference(x, routing, experts)
    (y * w_all).sum().backward()
    return {
        "y": y.detach(), "x_grad": x.grad.detach(),
        "gate_grads": {n: p.grad.detach() for n, p in gate.named_parameters()},
        "expert_grads": {e: {n: p.grad[e].detach() for n, p in experts.named_parameters()}
                         for e in range(case.num_experts)},
        "routing_map": routing.routing_map_TE.detach(),
    }


def assert_matches_reference(results: list[dict], ref: dict, rtol=1e-10, atol=1e-10):
    close = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref["y"], **close)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), ref["x_grad"], **close)
    for name, g in ref["gate_grads"].items():
        torch.testing.assert_close(sum(r["gate_grads"][name] for r in results), g, **close)
    seen = set()
    for r in results:
        for e, grads in r["expert_grads"].items():
            seen.add(e)
            for name, g in grads.items():
                torch.testing.assert_close(g, ref["expert_grads"][e][name], **close)
    assert seen == set(range(len(ref["expert_grads"]))), "every expert is hosted exactly once"


def brute_force_flat_bytes(routing_maps: list[torch.Tensor], topology, placement: ExpertPlacement,
                           row_bytes: int) -> tuple[dict, dict]:
    """Bytes and messages per level of a one-copy-per-(token, expert) all-to-all, by enumeration."""
    G = topology.G
    bytes_ = {n: 0 for n in topology.level_names}
    pairs = set()
    for src, rmap in enumerate(routing_maps):
        for t, e in rmap.nonzero().tolist():
            dst = placement.owner_rank(e, G)
            if dst != src:
                bytes_[topology.link_name(src, dst)] += row_bytes
                pairs.add((src, dst))
    msgs = {n: 0 for n in topology.level_names}
    for src, dst in pairs:
        msgs[topology.link_name(src, dst)] += 1
    return bytes_, msgs


def identity_round_trip(topology, make_dispatcher, num_experts: int = 8, top_k: int = 2, tokens: int = 9,
                        hidden: int = 5, check_dispatched=None):
    """Dispatch then combine with identity experts and gate weights summing to 1, on SimComm
    ranks: the output must be the input and its gradient all ones (Megatron's dispatcher
    invariant). `check_dispatched(tokens, meta)` runs on every rank for extra assertions."""
    def body(comm):
        g = torch.Generator().manual_seed(10 + comm.rank)
        x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64, requires_grad=True)
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
        rmap = torch.zeros(tokens, num_experts, dtype=torch.bool).scatter_(1, ids, True)
        disp = make_dispatcher(comm, num_experts)
        dispatched, meta = disp.dispatch(x, RoutingResult(rmap, rmap.double() / top_k))
        assert sum(dispatched.tokens_per_local_expert) == dispatched.x_RM.shape[0]
        if check_dispatched is not None:
            check_dispatched(dispatched, meta)
        y = disp.combine(dispatched.x_RM * dispatched.probs_R[:, None], meta)
        y.sum().backward()
        return y.detach(), x.detach(), x.grad

    for y, x, grad in SimWorld(topology).run(body):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, torch.ones_like(grad))
