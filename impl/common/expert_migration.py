"""Executing a placement change: move experts, with everything that belongs to them, between ranks.

Expert swaps (HierMoE's HierD-ES, SmartMoE) only decide a new `ExpertPlacement`; this module makes
it true. Slot s lives on rank s // E_local at local index s % E_local, and a rank's experts are
stacked tensors `[E_local, ...]` (`impl.common.experts.GroupedExperts`). For every logical expert
whose slot changes, the old owner sends the expert's row of every *per-expert* tensor to the new
owner, which writes it into the new local index:

* the parameters and their gradients (gradient-accumulation buffers are the `.grad`s);
* the optimizer state of those parameters: every state tensor whose first dimension is E_local
  (Adam's exp_avg / exp_avg_sq, AMSGrad's max_exp_avg_sq, SGD's momentum_buffer);
* any extra stacked tensors the caller names (FP32 master weights of a low-precision model), their
  gradients and their optimizer state.

Per-tensor optimizer state that is not per expert (Adam's `step`) cannot follow one expert, so it
must be equal on every rank; it is checked, not moved. Everything an expert owns is packed into
one byte row (bit-exact for any dtype) and all moves of one placement change travel in a single
uneven all-to-all over all ranks (zero splits for ranks that take no part), counted under traffic
category 'migration'. Every rank knows both placements, so the splits need no exchange.

Checkpoints are kept in *logical* expert order (`gather_logical_expert_state`,
`load_logical_expert_state`), so a checkpoint written after any number of swaps loads into a run
with any placement, the identity included.

`PlacementPlanner` is the interface both planners implement ('placement_planner' in the registry):
called every iteration with this rank's routing, it returns the placement to use next, the same on
every rank.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .comm import Comm
from .dispatcher import ExpertPlacement, check_expert_parallel

__all__ = ["PlacementPlanner", "MigrationResult", "migrate_experts", "apply_planner",
           "expert_tensors", "gather_logical_expert_state", "load_logical_expert_state", "moved_experts"]

MIGRATION_CATEGORY = "migration"


# ==========================================================================================
# planner interface
# ==========================================================================================
class PlacementPlanner(ABC):
    """Decides expert placements from routing. `step` is called by every rank every iteration
    (after the optimizer step) with this rank's routing map of the layer; on planning iterations
    (every `every` iterations, starting at 0) it is a collective and returns the new placement,
    identical on all ranks; otherwise it returns `placement` unchanged."""

    name = "planner"

    def __init__(self, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: {every!r} is not allowed; expected a positive integer (plan every n iterations)")
        self.every = every

    def due(self, iteration: int) -> bool:
        return iteration % self.every == 0

    def observe(self, routing_map_TE: torch.Tensor) -> None:
        """Hook called every iteration before a possible plan (statistics windows)."""

    @abstractmethod
    def plan(self, comm: Comm, placement: ExpertPlacement, routing_map_TE: torch.Tensor) -> ExpertPlacement:
        """A collective: the new placement from every rank's routing, the same on all ranks."""

    def step(self, comm: Comm, iteration: int, placement: ExpertPlacement,
             routing_map_TE: torch.Tensor) -> ExpertPlacement:
        self.observe(routing_map_TE)
        return self.plan(comm, placement, routing_map_TE) if self.due(iteration) else placement


# ==========================================================================================
# what belongs to an expert
# ==========================================================================================
@dataclass(frozen=True)
class _Stacked:
    label: str
    tensor: torch.Tensor            # [E_local, ...]


def _is_per_expert(value: Any, num_local: int, like: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == num_local and value.shape == like.shape


def expert_tensors(experts: nn.Module, num_local_experts: int, *, optimizer: torch.optim.Optimizer | None = None,
                   extra_tensors: Mapping[str, torch.Tensor] | None = None, include_grads: bool = True
                   ) -> tuple[list[_Stacked], dict[str, Any]]:
    """(per-expert stacked tensors, shared per-tensor values) of one rank, in a deterministic order.

    Labels: '<param>' for each parameter of `experts`, '<param>.grad' for its gradient,
    '<param>.<key>' for its optimizer state; the same under the caller's names for `extra_tensors`.
    Shared values are the optimizer state entries that are not per expert (e.g. '<param>.step')."""
    bases: list[tuple[str, torch.Tensor]] = sorted(experts.named_parameters())
    if not bases:
        raise ValueError("the experts module has no parameters to migrate")
    names = {n for n, _ in bases}
    for name, t in sorted((extra_tensors or {}).items()):
        if name in names:
            raise ValueError(f"extra tensor name {name!r} clashes with a parameter of the experts module")
        names.add(name)
        bases.append((name, t))
    stacked: list[_Stacked] = []
    shared: dict[str, Any] = {}
    for name, t in bases:
        if t.dim() < 1 or t.shape[0] != num_local_experts:
            raise ValueError(f"{name!r} has shape {tuple(t.shape)}; every expert tensor must be stacked "
                             f"[E_local={num_local_experts}, ...]")
        stacked.append(_Stacked(name, t.data if isinstance(t, nn.Parameter) else t))
        if include_grads and t.grad is not None:
            stacked.append(_Stacked(f"{name}.grad", t.grad))
        state = optimizer.state.get(t, {}) if optimizer is not None else {}
        for key in sorted(state):
            value = state[key]
            if _is_per_expert(value, num_local_experts, t):
                stacked.append(_Stacked(f"{name}.{key}", value))
            else:
                shared[f"{name}.{key}"] = value
    return stacked, shared


def _signature(stacked: list[_Stacked], shared: Mapping[str, Any]) -> tuple:
    rows = tuple((s.label, tuple(s.tensor.shape[1:]), str(s.tensor.dtype)) for s in stacked)
    values = tuple((k, v.tolist() if torch.is_tensor(v) else v) for k, v in sorted(shared.items()))
    return rows, values


def _check_agreement(comm: Comm, stacked: list[_Stacked], shared: Mapping[str, Any], what: str) -> None:
    """Every rank must hold the same per-expert tensors (labels, shapes, dtypes) and the same
    shared optimizer values, or an expert arriving from another rank would not fit."""
    mine = _signature(stacked, shared)
    for rank, theirs in enumerate(comm.all_gather_object(mine)):
        if theirs[0] != mine[0]:
            diff = sorted(set(theirs[0]) ^ set(mine[0]))
            raise ValueError(f"{what}: rank {comm.rank} and rank {rank} hold different expert tensors "
                             f"(label, shape, dtype differ: {diff[:4]}); all ranks need the same optimizer "
                             f"and gradient state")
        if theirs[1] != mine[1]:
            diff = sorted(set(theirs[1]) ^ set(mine[1]), key=str)
            raise ValueError(f"{what}: shared optimizer state differs between rank {comm.rank} and rank {rank} "
                             f"({diff[:4]}); per-tensor state such as Adam's 'step' cannot follow a single expert")


def _row_bytes(stacked: list[_Stacked]) -> list[int]:
    return [math.prod(s.tensor.shape[1:]) * s.tensor.element_size() for s in stacked]


def _device_of(stacked: list[_Stacked]) -> torch.device:
    """Where an expert's tensors live: the migration's index and byte buffers are made there, so
    CUDA experts move through the backend without a copy to the host (NCCL takes CUDA tensors only)."""
    return stacked[0].tensor.device if stacked else torch.device("cpu")


def _pack(stacked: list[_Stacked], local_idx: torch.Tensor) -> torch.Tensor:
    """uint8 [n, row_bytes]: the rows `local_idx` of every stacked tensor, byte for byte."""
    n = local_idx.numel()
    parts = [s.tensor.detach().index_select(0, local_idx).reshape(n, math.prod(s.tensor.shape[1:]))
             .contiguous().view(torch.uint8) for s in stacked]
    return torch.cat(parts, dim=1) if parts else torch.zeros(n, 0, dtype=torch.uint8, device=local_idx.device)


def _unpack_rows(stacked: list[_Stacked], buf: torch.Tensor):
    """Yield (stacked tensor, its rows [n, ...] in its dtype) from a packed byte buffer."""
    n, offset = buf.shape[0], 0
    for s, width in zip(stacked, _row_bytes(stacked)):
        chunk = buf[:, offset:offset + width].contiguous().view(s.tensor.dtype)
        offset += width
        yield s, chunk.reshape((n,) + tuple(s.tensor.shape[1:]))


# ==========================================================================================
# migration
# ==========================================================================================
@dataclass(frozen=True)
class MigrationResult:
    """What one placement change did on this rank."""

    moved_experts: tuple[int, ...]   # logical ids whose slot changed (same on every rank)
    sent_rows: int                   # experts this rank sent (to itself included)
    received_rows: int
    row_bytes: int                   # bytes per expert (everything it owns)


def moved_experts(old: ExpertPlacement, new: ExpertPlacement) -> tuple[int, ...]:
    if old.num_experts != new.num_experts:
        raise ValueError(f"placements have {old.num_experts} and {new.num_experts} experts; they must match")
    return tuple(e for e in range(old.num_experts) if old.slot_of_expert[e] != new.slot_of_expert[e])


@torch.no_grad()
def migrate_experts(comm: Comm, experts: nn.Module, old: ExpertPlacement, new: ExpertPlacement, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_tensors: Mapping[str, torch.Tensor] | None = None,
                    check: bool = True) -> MigrationResult:
    """Move every expert whose slot differs between `old` and `new`, with its gradients, optimizer
    state and extra tensors. A collective: every rank calls it with the same placements. `check`
    verifies first (one small all-gather) that all ranks hold the same kinds of expert state. The
    caller routes by `new` from then on (`apply_planner` sets the layer's placement)."""
    E = old.num_experts
    moved = moved_experts(old, new)
    El = check_expert_parallel(E, comm.world_size)
    stacked, shared = expert_tensors(experts, El, optimizer=optimizer, extra_tensors=extra_tensors)
    if not moved:
        return MigrationResult((), 0, 0, sum(_row_bytes(stacked)))
    if check:
        _check_agreement(comm, stacked, shared, "migrate_experts")
    me, G = comm.rank, comm.world_size
    owner = lambda placement, e: placement.slot_of_expert[e] // El  # noqa: E731
    sends = sorted((owner(new, e), e) for e in moved if owner(old, e) == me)
    recvs = sorted((owner(old, e), e) for e in moved if owner(new, e) == me)
    send_splits = [sum(1 for dst, _ in sends if dst == g) for g in range(G)]
    recv_splits = [sum(1 for src, _ in recvs if src == g) for g in range(G)]
    device = _device_of(stacked)
    send_idx = torch.tensor([old.slot_of_expert[e] % El for _, e in sends], dtype=torch.long, device=device)
    recv_idx = torch.tensor([new.slot_of_expert[e] % El for _, e in recvs], dtype=torch.long, device=device)
    buf = comm.all_to_all(_pack(stacked, send_idx), send_splits, recv_splits, category=MIGRATION_CATEGORY)
    for s, rows in _unpack_rows(stacked, buf):
        s.tensor.index_copy_(0, recv_idx, rows)
    return MigrationResult(moved, len(sends), len(recvs), sum(_row_bytes(stacked)))


def apply_planner(comm: Comm, planner: PlacementPlanner, iteration: int, layer: nn.Module, routing_map_TE: torch.Tensor,
                  *, optimizer: torch.optim.Optimizer | None = None,
                  extra_tensors: Mapping[str, torch.Tensor] | None = None) -> MigrationResult:
    """One iteration of dynamic placement for an `ExpertParallelMoE` layer (after the optimizer
    step): plan when due, move the experts, set the layer's placement. A collective."""
    current = layer.placement
    new = planner.step(comm, iteration, current, routing_map_TE)
    result = migrate_experts(comm, layer.experts, current, new, optimizer=optimizer, extra_tensors=extra_tensors)
    layer.placement = new
    return result


# ==========================================================================================
# checkpoints in logical order
# ==========================================================================================
@torch.no_grad()
def gather_logical_expert_state(comm: Comm, experts: nn.Module, placement: ExpertPlacement, *,
                                optimizer: torch.optim.Optimizer | None = None,
                                extra_tensors: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Every expert's parameters, optimizer state and extra tensors keyed by LOGICAL expert id, on
    every rank (one all-gather): {'num_experts': E, 'bases': parameter and extra tensor names,
    'experts': {e: {label: tensor}}, 'shared': {label: value}}. Gradients are not part of a
    checkpoint. A collective."""
    E = placement.num_experts
    El = check_expert_parallel(E, comm.world_size)
    stacked, shared = expert_tensors(experts, El, optimizer=optimizer, extra_tensors=extra_tensors,
                                     include_grads=False)
    _check_agreement(comm, stacked, shared, "gather_logical_expert_state")
    rows = torch.cat(comm.all_gather(_pack(stacked, torch.arange(El, device=_device_of(stacked)))))  # [E, row_bytes]
    per_expert: dict[int, dict[str, torch.Tensor]] = {e: {} for e in range(E)}
    expert_of_slot = placement.expert_of_slot
    for s, values in _unpack_rows(stacked, rows):
        for slot in range(E):
            per_expert[expert_of_slot[slot]][s.label] = values[slot].clone()
    shared_out = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in shared.items()}
    bases = sorted([n for n, _ in experts.named_parameters()] + list(extra_tensors or {}))
    return {"num_experts": E, "bases": bases, "experts": per_expert, "shared": shared_out}


@torch.no_grad()
def load_logical_expert_state(experts: nn.Module, placement: ExpertPlacement, rank: int, world_size: int,
                              state: Mapping, *, optimizer: torch.optim.Optimizer | None = None,
                              extra_tensors: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load a logical-order checkpoint into this rank's experts under any `placement`. Optimizer
    state missing on this rank (a fresh optimizer) is created from the checkpoint. Local: no
    communication."""
    E = placement.num_experts
    if state.get("num_experts") != E:
        raise ValueError(f"checkpoint has num_experts={state.get('num_experts')!r}, placement {E}")
    El = check_expert_parallel(E, world_size)
    if optimizer is not None:
        _create_missing_optimizer_state(experts, El, state, optimizer, extra_tensors)
    stacked, _ = expert_tensors(experts, El, optimizer=optimizer, extra_tensors=extra_tensors, include_grads=False)
    have = {s.label for s in stacked}
    want = set(next(iter(state["experts"].values())))
    if optimizer is None:  # weights only: the checkpoint's optimizer entries are not needed
        want = set(state["bases"])
    if want != have:
        raise KeyError(f"checkpoint expert entries {sorted(want - have)} have no tensor here and "
                       f"{sorted(have - want)} are missing from the checkpoint")
    for s in stacked:
        for i in range(El):
            s.tensor[i].copy_(state["experts"][placement.expert_of_slot[rank * El + i]][s.label])


def _create_missing_optimizer_state(experts: nn.Module, El: int, state: Mapping, optimizer: torch.optim.Optimizer,
                                    extra_tensors: Mapping[str, torch.Tensor] | None) -> None:
    """Fill optimizer.state for expert tensors from the checkpoint's labels: per-expert entries as
    stacked tensors (values copied later), shared entries (e.g. 'step') as saved."""
    sample = next(iter(state["experts"].values()))
    bases = dict(experts.named_parameters())
    bases.update(extra_tensors or {})
    for name, t in bases.items():
        prefix = f"{name}."
        keys = {label[len(prefix):]: value for label, value in sample.items() if label.startswith(prefix)}
        shared = {label[len(prefix):]: value for label, value in state["shared"].items() if label.startswith(prefix)}
        keys = {k: v for k, v in keys.items() if "." not in k and k != "grad"}
        shared = {k: v for k, v in shared.items() if "." not in k}
        if not keys and not shared:
            continue
        entries = optimizer.state[t]
        for key, value in keys.items():
            if key not in entries:
                entries[key] = torch.zeros((El,) + tuple(value.shape), dtype=value.dtype, device=t.device)
        for key, value in shared.items():
            entries[key] = value.clone() if torch.is_tensor(value) else value
