"""A few Adam steps of one expert-parallel MoE layer, with the expert placement changed after
every step (or never), run identically on SimComm ranks and on gloo ranks.

Changing where experts live must not change training: the losses and the final parameters and
optimizer state of every *logical* expert must equal those of a run that never moves an expert.
Every rank builds the same global batch of each step from the seed and keeps its slice; the gate
is replicated (its gradients all-reduced); the experts are initialised by global id, so a run is
a pure function of the case.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from impl.common.comm import Comm
from impl.common.costmodel import HardwareProfile, load_profile, topology_steps
from impl.common.dispatcher import ExpertPlacement
from impl.common.experts import GroupedExperts
from impl.common.expert_migration import (apply_planner, gather_logical_expert_state, load_logical_expert_state,
                                          migrate_experts)
from impl.common.moe_layer import ExpertParallelMoE
from impl.common.registry import get
from impl.common.routing import GateConfig, build_gate, init_gate_from_seed
from impl.common.topology import Topology

DTYPE = torch.float32


@dataclass(frozen=True)
class TrainCase:
    num_experts: int = 8
    top_k: int = 2
    tokens_per_rank: int = 16
    hidden: int = 8
    ffn_hidden: int = 6
    ffn_kind: str = "swiglu"
    dispatcher: str = "flat"
    steps: int = 5
    lr: float = 1e-2
    seed: int = 0
    policy: str = "none"               # 'none', 'random' (a fresh random permutation every step) or a planner name
    planner_kwargs: tuple = ()         # (key, value) pairs for the planner
    resume_steps: int = 0              # > 0: checkpoint after `steps`, then train on and compare with a resumed run
    device: str = "cpu"                # where the layer, optimizer state and tokens live (results come back on the CPU)
    dtype: torch.dtype = DTYPE

    def on(self, device: str) -> "TrainCase":
        return replace(self, device=device)


def profile_for_topology(topology: Topology) -> HardwareProfile:
    """The HierMoE testbed's alpha-beta models for the steps a smaller topology has (same step
    names), so planners can run on test topologies."""
    testbed = load_profile("hiermoe-testbed")
    comm = {("a2a", s): testbed.comm_model("a2a", s) for s in topology_steps(topology)}
    return HardwareProfile(name=f"testbed-{topology.name}", topology=topology.name,
                           source="hiermoe-testbed constants for the steps of a test topology", comm=comm)


def make_dispatcher(case: TrainCase, comm: Comm):
    """The registered dispatcher; the ones that choose a route by the cost model get the testbed
    constants for this topology's steps."""
    import impl.experiments.systems  # noqa: F401  (registers every dispatcher, also in spawned gloo ranks)
    factory = get("dispatcher", case.dispatcher)
    if case.dispatcher == "hierd":
        return factory(comm, case.num_experts, profile=profile_for_topology(comm.topology))
    return factory(comm, case.num_experts)


def make_planner(case: TrainCase, comm: Comm):
    import impl.experiments.systems  # noqa: F401  (registers every planner, also in spawned gloo ranks)
    kwargs = dict(case.planner_kwargs)
    if case.policy == "hierd-es":
        kwargs.setdefault("profile", profile_for_topology(comm.topology))
        kwargs.setdefault("hidden", case.hidden)
    return get("placement_planner", case.policy)(**kwargs)


def batch(case: TrainCase, comm: Comm, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed * 7919 + step)
    n = comm.world_size * case.tokens_per_rank
    x = torch.randn(n, case.hidden, generator=g, dtype=torch.float64).to(case.dtype)
    target = torch.randn(n, case.hidden, generator=g, dtype=torch.float64).to(case.dtype)
    sl = slice(comm.rank * case.tokens_per_rank, (comm.rank + 1) * case.tokens_per_rank)
    return x[sl].to(case.device), target[sl].to(case.device)


def random_placement(case: TrainCase, step: int) -> ExpertPlacement:
    g = torch.Generator().manual_seed(case.seed * 104729 + step + 1)
    return ExpertPlacement(tuple(torch.randperm(case.num_experts, generator=g).tolist()))


class Trainer:
    """One rank's layer, optimizers and placement policy."""

    def __init__(self, comm: Comm, case: TrainCase, with_policy: bool = True):
        self.comm, self.case = comm, case
        gate_cfg = GateConfig(kind="softmax_topk", top_k=case.top_k)
        self.gate = build_gate(gate_cfg, case.hidden, case.num_experts).to(case.dtype)
        init_gate_from_seed(self.gate, case.seed + 1)
        self.gate.to(case.device)
        self.dispatcher = make_dispatcher(case, comm)
        self.experts = GroupedExperts(self.dispatcher.num_local_experts, case.hidden, case.ffn_hidden,
                                      kind=case.ffn_kind).to(case.dtype)
        self.experts.init_from_seed(self.dispatcher.local_experts(), case.seed + 2)
        self.experts.to(case.device)
        self.layer = ExpertParallelMoE(self.gate, self.experts, self.dispatcher)
        self.opt_gate = torch.optim.Adam(self.gate.parameters(), lr=case.lr)
        self.opt_experts = torch.optim.Adam(self.experts.parameters(), lr=case.lr)
        self.planner = make_planner(case, comm) if with_policy and case.policy not in ("none", "random") else None
        self.moves = 0

    def train_step(self, step: int, move: bool = True) -> float:
        comm, case = self.comm, self.case
        x, target = batch(case, comm, step)
        self.opt_gate.zero_grad()
        self.opt_experts.zero_grad()
        out = self.layer(x)
        loss = ((out.y_TM - target) ** 2).sum() / (comm.world_size * case.tokens_per_rank)
        loss.backward()
        for p in self.gate.parameters():
            p.grad.copy_(comm.all_reduce(p.grad, "sum"))
        self.opt_gate.step()
        self.opt_experts.step()
        if move and case.policy == "random":
            new = random_placement(case, step)
            result = migrate_experts(comm, self.experts, self.layer.placement, new, optimizer=self.opt_experts)
            self.layer.placement = new
            self.moves += len(result.moved_experts)
        elif move and self.planner is not None:
            result = apply_planner(comm, self.planner, step, self.layer, out.routing.routing_map_TE,
                                   optimizer=self.opt_experts)
            self.moves += len(result.moved_experts)
        return float(comm.all_reduce(loss.detach().to(torch.float64), "sum"))

    def logical_state(self) -> dict:
        return gather_logical_expert_state(self.comm, self.experts, self.layer.placement,
                                           optimizer=self.opt_experts)


def train_rank(comm: Comm, case: TrainCase) -> dict:
    """Train `case.steps` steps; with `resume_steps`, also checkpoint (logical order), train on,
    and train a fresh identity-placement run resumed from the checkpoint."""
    t = Trainer(comm, case)
    losses = [t.train_step(s) for s in range(case.steps)]
    logical = t.logical_state()
    out = {"losses": losses, "placement": t.layer.placement.slot_of_expert, "moves": t.moves,
           "experts": _on_cpu(logical), "gate": {k: v.cpu().clone() for k, v in t.gate.state_dict().items()},
           "devices": _devices(t)}
    if case.resume_steps:
        ckpt = logical
        gate_state, gate_opt = copy.deepcopy(t.gate.state_dict()), copy.deepcopy(t.opt_gate.state_dict())
        more = range(case.steps, case.steps + case.resume_steps)
        out["continued"] = [t.train_step(s, move=False) for s in more]
        fresh = Trainer(comm, case, with_policy=False)
        fresh.gate.load_state_dict(gate_state)
        fresh.opt_gate.load_state_dict(gate_opt)
        load_logical_expert_state(fresh.experts, fresh.layer.placement, comm.rank, comm.world_size, ckpt,
                                  optimizer=fresh.opt_experts)
        out["reloaded"] = _on_cpu(fresh.logical_state())
        out["resumed"] = [fresh.train_step(s, move=False) for s in more]
    return out


def _on_cpu(state: dict) -> dict:
    """A logical-order expert state with its tensors on the CPU (runs on any device compare there)."""
    cpu = lambda v: v.cpu() if torch.is_tensor(v) else v  # noqa: E731
    return {**state, "experts": {e: {k: cpu(v) for k, v in entries.items()} for e, entries in state["experts"].items()},
            "shared": {k: cpu(v) for k, v in state["shared"].items()}}


def _devices(t: Trainer) -> set[str]:
    """Device types of the experts' parameters, gradients and per-expert optimizer state."""
    tensors = [p for p in t.experts.parameters()] + [p.grad for p in t.experts.parameters() if p.grad is not None]
    tensors += [v for p in t.experts.parameters() for v in t.opt_experts.state.get(p, {}).values()
                if torch.is_tensor(v) and v.dim() >= 1]
    return {x.device.type for x in tensors}


def train_cases(comm: Comm, cases: list[TrainCase]) -> list[dict]:
    """Several cases in one job (one gloo start-up)."""
    return [train_rank(comm, c) for c in cases]
