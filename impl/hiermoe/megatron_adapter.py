"""HierMoE's HierD-AlltoAll inside a real megatron-core MoELayer.

megatron-core picks its token dispatcher from a hard-coded string, so a custom one is installed by
replacing `layer.token_dispatcher` after construction:

    from impl.hiermoe.megatron_adapter import install_hiermoe
    install_hiermoe(layer_or_model, topology="2x2", dim=2)

`SixStageDispatcherAdapter` turns any of our stateless six-stage `TokenDispatcher`s into a
megatron `MoETokenDispatcher`: megatron calls the six stages in the same order with the same
split of work (local / communication / local), so each stage maps one to one. The adapter keeps
the one piece of state megatron's interface leaves to the dispatcher - the metadata between
`dispatch_preprocess` and `combine_postprocess` - on `self`, as megatron's own dispatchers do
(one micro-batch in flight per dispatcher).

Semantics that make the pairing exact: megatron's experts multiply each row by its gate weight
(`per_token_scale`) before returning it, which is what our dispatchers' combine expects (HierMoE's
reverse route sums gate-weighted partial outputs); rows reach the experts grouped by local expert
with `tokens_per_expert` counts, the layout megatron's SequentialMLP / GroupedMLP consume.

Scope: expert tensor parallelism 1, dropless or router-side capacity drops (not
pad-to-capacity), no shared-expert overlap, identity expert placement (megatron's experts do not
move), and an EP group that is the whole world in rank order (EP = world size, HierMoE's setting:
EP = number of GPUs), because the hierarchical step groups are built over global ranks.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from impl.common.comm import Comm, TorchComm
from impl.common.config import DEFAULT_TIMEOUT_S
from impl.common.megatron import ep_group_ranks
from impl.common.dispatcher import TokenDispatcher
from impl.common.routing import RoutingResult
from impl.common.topology import Topology, get_topology
from impl.hiermoe.dedup_a2a import HierarchicalDispatcher

__all__ = ["SixStageDispatcherAdapter", "install_dispatcher", "install_hiermoe", "moe_layers"]


class SixStageDispatcherAdapter(MoETokenDispatcher):
    """One of our TokenDispatchers (its comm spans megatron's EP group) as megatron's dispatcher."""

    def __init__(self, inner: TokenDispatcher, config, pg_collection: ProcessGroupCollection):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.tp_size != 1:
            raise ValueError(f"expert tensor parallel size {self.tp_size} is not supported by "
                             f"{type(inner).__name__} in megatron; allowed: 1")
        if config.moe_pad_expert_input_to_capacity:
            raise ValueError("moe_pad_expert_input_to_capacity=True is not supported; allowed: False "
                             "(router-side capacity drops work)")
        if config.moe_shared_expert_overlap:
            raise ValueError("moe_shared_expert_overlap=True is not supported; allowed: False")
        if inner.num_experts != config.num_moe_experts:
            raise ValueError(f"dispatcher has {inner.num_experts} experts, the layer {config.num_moe_experts}")
        if inner.comm.world_size != self.ep_size:
            raise ValueError(f"dispatcher comm has {inner.comm.world_size} ranks, the EP group {self.ep_size}")
        self.inner = inner
        self.num_local_experts = inner.num_local_experts
        self._meta = None
        self._hidden_shape: torch.Size | None = None

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self._hidden_shape = hidden_states.shape
        x_TM = hidden_states.reshape(-1, hidden_states.shape[-1])
        # megatron's experts never move: the identity placement
        rows, row_probs, self._meta = self.inner.dispatch_preprocess(x_TM, RoutingResult(routing_map, probs), None)
        return rows, row_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return self.inner.token_dispatch(hidden_states, probs, self._meta)

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens = self.inner.dispatch_postprocess(hidden_states, probs, self._meta)
        counts = torch.tensor(tokens.tokens_per_local_expert, dtype=torch.long)  # host, as megatron's
        return tokens.x_RM, counts, tokens.probs_R

    def combine_preprocess(self, hidden_states: torch.Tensor):
        return self.inner.combine_preprocess(hidden_states, self._meta)

    def token_combine(self, hidden_states: torch.Tensor):
        return self.inner.token_combine(hidden_states, self._meta)

    def combine_postprocess(self, hidden_states: torch.Tensor):
        y_TM = self.inner.combine_postprocess(hidden_states, self._meta)
        self._meta = None
        return y_TM.view(self._hidden_shape)


def moe_layers(module: nn.Module) -> list[MoELayer]:
    """Every megatron MoELayer in `module` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def _pg_collection(dispatcher: MoETokenDispatcher) -> ProcessGroupCollection:
    pg = ProcessGroupCollection()
    pg.ep, pg.expt_tp, pg.tp_ep = dispatcher.ep_group, dispatcher.tp_group, dispatcher.tp_ep_group
    return pg


def install_dispatcher(module: nn.Module, make: Callable[[Comm, int], TokenDispatcher], *,
                       topology: Topology | str | None = None, comm: Comm | None = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """Replace the token dispatcher of every MoELayer in `module` by `make(comm, num_experts)`
    wrapped in `SixStageDispatcherAdapter`. `comm` is reused when given; otherwise a TorchComm
    of `topology` is built, which creates process groups: every rank must call this, in the same
    order. Returns the comm (its `traffic` counts the new dispatchers' bytes per level)."""
    import torch.distributed as dist

    layers = moe_layers(module)
    if not layers:
        raise ValueError(f"no megatron-core MoELayer found in {type(module).__name__}")
    world = dist.get_world_size()
    ranks = ep_group_ranks(layers[0].token_dispatcher.ep_group)
    if ranks != list(range(world)):
        raise ValueError(f"the expert-parallel group must be the whole world in rank order (EP = world size "
                         f"{world}); got EP group ranks {ranks}")
    if comm is None:
        if topology is None:
            raise ValueError("give a topology (e.g. '2x2') or a comm")
        comm = TorchComm(get_topology(topology) if isinstance(topology, str) else topology, timeout_s=timeout_s)
    elif topology is not None:
        name = topology if isinstance(topology, str) else topology.name
        if name != comm.topology.name:
            raise ValueError(f"topology {name!r} differs from the comm's {comm.topology.name!r}; give one of them")
    if comm.world_size != world:
        raise ValueError(f"comm topology {comm.topology.name!r} has G = {comm.world_size}, the world {world}")
    for layer in layers:
        inner = make(comm, layer.config.num_moe_experts)
        if inner.local_experts() != list(layer.local_expert_indices):
            raise ValueError(f"dispatcher places experts {inner.local_experts()} on rank {comm.rank}, megatron "
                             f"holds {list(layer.local_expert_indices)}; only the identity placement is supported")
        layer.token_dispatcher = SixStageDispatcherAdapter(inner, layer.config, _pg_collection(layer.token_dispatcher))
    return comm


def install_hiermoe(module: nn.Module, topology: Topology | str | None = None, dim: int = 2, *,
                    dedup: bool = True, comm: Comm | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """HierMoE's HD`dim` (dedup) or H`dim` (dedup=False) dispatcher in every MoELayer of
    `module`; see `install_dispatcher`."""
    def make(c: Comm, num_experts: int) -> TokenDispatcher:
        return HierarchicalDispatcher(c, num_experts, dim=dim, dedup=dedup)

    return install_dispatcher(module, make, topology=topology, comm=comm, timeout_s=timeout_s)
