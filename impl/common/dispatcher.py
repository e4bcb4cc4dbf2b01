"""The token-dispatcher interface and the reference flat AlltoAll dispatcher.

The interface is Megatron-core's six stages, made stateless: `dispatch_preprocess` returns a
frozen metadata object that every later stage takes, so several micro-batches (FSMoE's pipelined
chunks) can be in flight through one dispatcher object. Only `token_dispatch` and
`token_combine` move hidden vectors; the pre/post stages are local, except that
`dispatch_preprocess` may exchange split counts (metadata), as Megatron's does.

The expert placement is an argument of `dispatch_preprocess` and travels in the metadata, so no
dispatcher holds one: an expert swap between two steps changes what the next call is given, and a
dispatcher (or a cache it built) can never route by a stale placement.

`FlatAlltoAllDispatcher` has Megatron-LM's alltoall semantics: one copy of a token per selected
(token, expert) pair, rows permuted expert-major, one uneven all-to-all over all G ranks, then
received rows re-sorted by local expert; the gate weights travel with the rows, and the combine
is the exact reverse. It is the reference every other scheme is compared against.

Experts live in physical *slots*: slot s is hosted by rank s // (E / G). `ExpertPlacement` maps
logical expert ids to slots; expert swaps (HierMoE, SmartMoE) change only the placement, which
the MoE layer keeps beside the expert weights it describes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .comm import Comm, all_to_all_autograd
from .routing import RoutingResult

from .registry import register

__all__ = ["ExpertPlacement", "TokenDispatcher", "FlatDispatchMeta", "FlatAlltoAllDispatcher",
           "DispatchedTokens", "check_expert_parallel"]


def check_expert_parallel(num_experts: int, ep_size: int) -> int:
    """Experts per rank; raises ValueError naming both values when E is not divisible by EP."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts % ep_size:
        raise ValueError(f"num_experts E={num_experts} is not divisible by the expert-parallel size "
                         f"{ep_size}; E must be a multiple of {ep_size}")
    return num_experts // ep_size


@dataclass(frozen=True)
class ExpertPlacement:
    """Logical expert -> physical slot (a permutation of 0..E-1). Identity by default."""

    slot_of_expert: tuple[int, ...]

    def __post_init__(self):
        if sorted(self.slot_of_expert) != list(range(len(self.slot_of_expert))):
            raise ValueError(f"slot_of_expert must be a permutation of 0..{len(self.slot_of_expert) - 1}")

    @classmethod
    def identity(cls, num_experts: int) -> "ExpertPlacement":
        return cls(tuple(range(num_experts)))

    @property
    def num_experts(self) -> int:
        return len(self.slot_of_expert)

    @property
    def expert_of_slot(self) -> tuple[int, ...]:
        out = [0] * self.num_experts
        for e, s in enumerate(self.slot_of_expert):
            out[s] = e
        return tuple(out)

    def swap(self, expert_a: int, expert_b: int) -> "ExpertPlacement":
        """The placement with the slots of two logical experts exchanged."""
        slots = list(self.slot_of_expert)
        slots[expert_a], slots[expert_b] = slots[expert_b], slots[expert_a]
        return ExpertPlacement(tuple(slots))

    def to_slots(self, x_TE: torch.Tensor) -> torch.Tensor:
        """Reorder the expert columns of a [T, E] tensor into slot order."""
        return x_TE[:, list(self.expert_of_slot)]

    def owner_rank(self, expert: int, ep_size: int) -> int:
        return self.slot_of_expert[expert] // (self.num_experts // ep_size)

    def local_experts(self, rank: int, ep_size: int) -> list[int]:
        """Logical ids of the experts `rank` hosts, in slot order."""
        per_rank = check_expert_parallel(self.num_experts, ep_size)
        return [self.expert_of_slot[s] for s in range(rank * per_rank, (rank + 1) * per_rank)]

    def check_for(self, num_experts: int) -> "ExpertPlacement":
        if self.num_experts != num_experts:
            raise ValueError(f"placement has {self.num_experts} experts, the dispatcher {num_experts}")
        return self


@dataclass(frozen=True)
class DispatchedTokens:
    """What the experts of one rank receive: rows grouped by local expert (slot order)."""

    x_RM: torch.Tensor
    probs_R: torch.Tensor
    tokens_per_local_expert: tuple[int, ...]


class TokenDispatcher(ABC):
    """Six-stage stateless dispatcher. Subclasses implement the stages; `dispatch` and
    `combine` chain them. The placement is given to each dispatch (identity when omitted)."""

    def __init__(self, comm: Comm, num_experts: int):
        self.comm = comm
        self.num_experts = num_experts
        self.num_local_experts = check_expert_parallel(num_experts, comm.world_size)

    def local_experts(self, placement: ExpertPlacement | None = None) -> list[int]:
        """Logical ids of the experts this rank hosts under `placement`, in slot order."""
        placement = self.placement_or_identity(placement)
        return placement.local_experts(self.comm.rank, self.comm.world_size)

    def placement_or_identity(self, placement: ExpertPlacement | None) -> ExpertPlacement:
        if placement is None:
            return ExpertPlacement.identity(self.num_experts)
        return placement.check_for(self.num_experts)

    def check_routing(self, routing: RoutingResult) -> None:
        if routing.num_experts != self.num_experts:
            raise ValueError(f"routing has {routing.num_experts} experts, dispatcher expects {self.num_experts}")

    # the six stages -------------------------------------------------------------------------
    @abstractmethod
    def dispatch_preprocess(self, x_TM: torch.Tensor, routing: RoutingResult, placement: ExpertPlacement | None = None):
        """Local: permute rows by `placement` (logical expert -> slot; identity when None),
        compute split sizes. Returns (rows, probs, meta); meta carries the placement."""

    @abstractmethod
    def token_dispatch(self, rows, probs, meta):
        """Communication: move rows (and their gate weights) to the experts' ranks."""

    @abstractmethod
    def dispatch_postprocess(self, rows, probs, meta) -> DispatchedTokens:
        """Local: order received rows by local expert."""

    @abstractmethod
    def combine_preprocess(self, expert_out_RM: torch.Tensor, meta):
        """Local: undo the post-dispatch ordering (and any local reduction)."""

    @abstractmethod
    def token_combine(self, rows, meta):
        """Communication: return the rows to their home ranks."""

    @abstractmethod
    def combine_postprocess(self, rows, meta) -> torch.Tensor:
        """Local: sum the rows of each token into the [T, M] output."""

    # convenience ------------------------------------------------------------------------------
    def dispatch(self, x_TM: torch.Tensor, routing: RoutingResult, placement: ExpertPlacement | None = None):
        rows, probs, meta = self.dispatch_preprocess(x_TM, routing, placement)
        rows, probs = self.token_dispatch(rows, probs, meta)
        return self.dispatch_postprocess(rows, probs, meta), meta

    def combine(self, expert_out_RM: torch.Tensor, meta) -> torch.Tensor:
        rows = self.combine_preprocess(expert_out_RM, meta)
        rows = self.token_combine(rows, meta)
        return self.combine_postprocess(rows, meta)


@dataclass(frozen=True)
class FlatDispatchMeta:
    placement: ExpertPlacement
    num_tokens: int
    token_of_row_R: torch.Tensor      # home-token index of every sent row (rows slot-major)
    send_splits: tuple[int, ...]      # rows to each rank
    recv_splits: tuple[int, ...]      # rows from each rank
    sort_idx: torch.Tensor            # received (source-major) rows -> local-expert-major order
    unsort_idx: torch.Tensor          # its inverse
    tokens_per_local_expert: tuple[int, ...]


def chunk_transpose_index(counts_AB: torch.Tensor) -> torch.Tensor:
    """Rows laid out as chunks in (a, b) order with sizes counts_AB[a, b]; return the gather
    index that lays them out in (b, a) order (Megatron's sort_chunks_by_idxs)."""
    A, B = counts_AB.shape
    flat = counts_AB.reshape(-1).cpu()                  # read on the host: one copy, not one per chunk
    starts = torch.cumsum(flat, 0) - flat
    order = torch.arange(A * B).reshape(A, B).t().reshape(-1)
    pieces = [torch.arange(int(starts[i]), int(starts[i] + flat[i])) for i in order.tolist()]
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return index.to(counts_AB.device)   # beside the rows it gathers (CUDA under NCCL)


@register("dispatcher", "flat")
@register("dispatcher", "megatron-flat")
class FlatAlltoAllDispatcher(TokenDispatcher):
    """Megatron-LM's alltoall dispatcher semantics (dropless; capacity drops are the gate's)."""

    def dispatch_preprocess(self, x_TM, routing, placement=None):
        G, El = self.comm.world_size, self.num_local_experts
        self.check_routing(routing)
        placement = self.placement_or_identity(placement)
        map_TS = placement.to_slots(routing.routing_map_TE)
        probs_TS = placement.to_slots(routing.probs_TE)
        slot_token = map_TS.t().nonzero()                   # [R, 2] sorted by slot, then token
        slot_R, token_R = slot_token[:, 0], slot_token[:, 1]
        rows_per_slot = map_TS.sum(0)                        # [E]
        send_GE = rows_per_slot.reshape(G, El)               # rows to rank g for its local expert l
        recv_GE = self.comm.all_to_all(send_GE.contiguous(), [1] * G, [1] * G, category="meta")
        sort_idx = chunk_transpose_index(recv_GE)
        meta = FlatDispatchMeta(
            placement=placement, num_tokens=x_TM.shape[0], token_of_row_R=token_R,
            send_splits=tuple(send_GE.sum(1).tolist()), recv_splits=tuple(recv_GE.sum(1).tolist()),
            sort_idx=sort_idx, unsort_idx=torch.argsort(sort_idx),
            tokens_per_local_expert=tuple(recv_GE.sum(0).tolist()))
        return x_TM.index_select(0, token_R), probs_TS[token_R, slot_R], meta

    def token_dispatch(self, rows, probs, meta):
        rows = all_to_all_autograd(self.comm, rows, meta.send_splits, meta.recv_splits)
        probs = all_to_all_autograd(self.comm, probs, meta.send_splits, meta.recv_splits, category="meta")
        return rows, probs

    def dispatch_postprocess(self, rows, probs, meta):
        return DispatchedTokens(rows.index_select(0, meta.sort_idx), probs.index_select(0, meta.sort_idx),
                                meta.tokens_per_local_expert)

    def combine_preprocess(self, expert_out_RM, meta):
        return expert_out_RM.index_select(0, meta.unsort_idx)

    def token_combine(self, rows, meta):
        return all_to_all_autograd(self.comm, rows, meta.recv_splits, meta.send_splits)

    def combine_postprocess(self, rows, meta):
        out = rows.new_zeros((meta.num_tokens,) + tuple(rows.shape[1:]))
        return out.index_add(0, meta.token_of_row_R, rows)
