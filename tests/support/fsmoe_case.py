"""One FSMoE layer case run identically on SimComm ranks and on gloo ranks, and the unpipelined
single-process reference it must equal (outputs, input gradients, gate and expert gradients).

The reference shares no code with the layer's pipeline: each rank's tokens go through a fresh copy
of the gate (same seed, so the same weights and the same gate noise), capacity drops are a plain
loop over each expert's tokens in token order, and every kept (token, expert) pair runs through the
whole expert (`GroupedExperts`, initialised by global id like the shards) one row at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from impl.common.comm import Comm
from impl.common.experts import GroupedExperts
from impl.common.ordering import capacity as capacity_for
from impl.fsmoe.config import MoELayerConfig
from impl.fsmoe.layer import FSMoELayer
from impl.fsmoe.modules import build_gate_module
from impl.common.routing import init_gate_from_seed

DTYPE = torch.float64


@dataclass(frozen=True)
class FSMoECase:
    cfg: MoELayerConfig
    tokens_per_rank: int = 8
    seed: int = 0
    gradient_slice: int = 0          # > 0: all-reduce a slice of this many elements in the backward
    device: str = "cpu"              # where the layer and its tokens live ('cuda': the executor's CUDA streams)

    def with_config(self, **kw) -> "FSMoECase":
        return replace(self, cfg=replace(self.cfg, **kw))

    def on(self, device: str) -> "FSMoECase":
        return replace(self, device=device)


def inputs(case: FSMoECase, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    T = world_size * case.tokens_per_rank
    return (torch.randn(T, case.cfg.hidden, generator=g, dtype=DTYPE),
            torch.randn(T, case.cfg.hidden, generator=g, dtype=DTYPE))


def run_rank(comm: Comm, case: FSMoECase) -> dict:
    x_all, w_all = inputs(case, comm.world_size)
    T = case.tokens_per_rank
    mine = slice(comm.rank * T, (comm.rank + 1) * T)
    x = x_all[mine].clone().to(case.device).requires_grad_(True)
    layer = FSMoELayer(comm, case.cfg, seed=case.seed, dtype=DTYPE).to(case.device)
    if case.gradient_slice:
        layer.gradient_slice = torch.full((case.gradient_slice,), float(comm.rank + 1), dtype=DTYPE, device=case.device)
    comm.traffic.reset()
    y = layer(x)
    (y * w_all[mine].to(case.device)).sum().backward()
    return {"y": y.detach().cpu(), "x_grad": x.grad.cpu(), "capacity": layer.last_capacity, "dropped": layer.last_dropped,
            "gate_grads": {n: p.grad.detach().clone().cpu() for n, p in layer.gate.named_parameters() if p.grad is not None},
            "expert_grads": {n: p.grad.detach().clone().cpu() for n, p in layer.experts.named_parameters()},
            "experts": layer.experts.global_ids, "shard": layer.layout.esp_index(comm.rank),
            "n_esp": layer.layout.n_esp,
            "slice": None if layer.gradient_slice is None else layer.gradient_slice.detach().cpu(),
            "traffic": comm.traffic.to_dict(kind=None),
            "traffic_by_kind": {k: comm.traffic.by_level("bytes", "tokens", "fwd", kind=k) for k in ("a2a", "ag", "rs")},
            "events": {phase: [(t["task"], t["start_ms"], t["end_ms"]) for t in tl.rows()]
                       for phase, tl in layer.last_timelines.items()},
            "timeline_sources": {phase: tl.source for phase, tl in layer.last_timelines.items()}}


def run_cases(comm: Comm, cases: list[FSMoECase]) -> list[dict]:
    """Several cases in one job (one gloo start-up)."""
    return [run_rank(comm, c) for c in cases]


def _full_experts(cfg: MoELayerConfig, seed: int) -> GroupedExperts:
    experts = GroupedExperts(cfg.num_experts, cfg.hidden, cfg.ffn_hidden,
                             kind="swiglu" if cfg.expert == "mixtral" else "gpt", activation=cfg.act).to(DTYPE)
    experts.init_from_seed(list(range(cfg.num_experts)), seed + 2)
    return experts


def _expert_row(experts: GroupedExperts, e: int, row: torch.Tensor) -> torch.Tensor:
    return experts.forward_one(e, row.unsqueeze(0)).squeeze(0)


def reference(case: FSMoECase, world_size: int) -> dict:
    cfg = case.cfg
    x_all, w_all = inputs(case, world_size)
    x_all = x_all.clone().requires_grad_(True)
    experts = _full_experts(cfg, case.seed)
    gates = [init_gate_from_seed(build_gate_module(cfg), case.seed + 1).to(DTYPE) for _ in range(world_size)]
    chunks = x_all.split(case.tokens_per_rank)
    outs = [gate(x_r) for gate, x_r in zip(gates, chunks)]
    ys = []
    if cfg.gate == "softmoe":
        for x_r, soft in zip(chunks, outs):
            slots = soft.slots_from_tokens(x_r)
            out = torch.stack([_expert_row(experts, s // cfg.slots_per_expert, slots[s]) for s in range(slots.shape[0])])
            ys.append(soft.tokens_from_slots(out))
    else:
        counts_max = max(int(o.routing_map_TE.sum(0).max()) for o in outs)
        if cfg.gate == "expert_choice" or (cfg.capacity is None and cfg.capacity_factor is None):
            C = counts_max
        elif cfg.capacity is not None:      # padded up to lcm(r_fwd, r_bwd): more rows kept, never fewer
            C = -(-cfg.capacity // cfg.degree_multiple) * cfg.degree_multiple
        else:
            C = capacity_for(case.tokens_per_rank, cfg.num_experts, cfg.top_k, cfg.capacity_factor,
                             cfg.degree_multiple)
        for x_r, o in zip(chunks, outs):
            y_r = torch.zeros_like(x_r)
            for e in range(cfg.num_experts):
                for t in o.routing_map_TE[:, e].nonzero().flatten()[:C].tolist():
                    y_r = y_r.index_add(0, torch.tensor([t]),
                                        (o.probs_TE[t, e] * _expert_row(experts, e, x_r[t])).unsqueeze(0))
            ys.append(y_r)
    y = torch.cat(ys)
    (y * w_all).sum().backward()
    gate_grads = {}
    for gate in gates:
        for n, p in gate.named_parameters():
            if p.grad is not None:
                gate_grads[n] = gate_grads.get(n, 0) + p.grad
    return {"y": y.detach(), "x_grad": x_all.grad, "gate_grads": gate_grads,
            "expert_grads": {n: p.grad for n, p in experts.named_parameters()}}


def assert_matches_reference(results: list[dict], ref: dict, rtol=1e-9, atol=1e-9) -> None:
    close = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref["y"], **close)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), ref["x_grad"], **close)
    for name, g in ref["gate_grads"].items():
        torch.testing.assert_close(sum(r["gate_grads"][name] for r in results), g, **close)
    for r in results:
        width = None
        for name, g in r["expert_grads"].items():
            full = ref["expert_grads"][name][r["experts"]]
            width = g.shape[-1] if name in ("w1", "w_gate", "w_up") else g.shape[-2]
            lo, hi = r["shard"] * width, (r["shard"] + 1) * width
            expected = full[..., lo:hi] if name in ("w1", "w_gate", "w_up") else full[:, lo:hi, :]
            torch.testing.assert_close(g, expected, **close)
        assert width is not None


def gradient_slice_expected(world_size: int, ep_ranks: list[list[int]], rank: int, n: int) -> torch.Tensor:
    group = next(g for g in ep_ranks if rank in g)
    return torch.full((n,), float(sum(r + 1 for r in group)), dtype=DTYPE)
