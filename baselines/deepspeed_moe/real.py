"""The real DeepSpeed-MoE layer (`deepspeed.moe.layer.MoE`) on our process groups and weights.

Runs wherever torch.distributed runs: gloo on CPU (processes from `impl.common.launcher.launch`)
or NCCL under torchrun. `init_deepspeed_comm` wraps the already initialised default process
group in deepspeed.comm (DeepSpeed's own init would create one); `build_deepspeed_moe` builds
the layer with DeepSpeed's expert-parallel groups (consecutive ranks, `ep_size_<n>`) and loads
our weights: the gate's [E, M] router matrix and, per local expert, the GPT FFN of
`GroupedExperts` (kind 'gpt') with the same global expert id, so the real layer and the sim
(`baselines.deepspeed_moe.sim`) compute the same function.

DeepSpeed's randomness is switched off so runs are comparable: use_rts=False,
noisy_gate_policy=None, top2_2nd_expert_sampling=False. On CPU DeepSpeed JIT-builds a
shared-memory comm op the first time `init_deepspeed_comm` runs (tens of seconds; cached in
torch's extension directory afterwards). The MoE path itself uses only all_to_all_single and,
without token dropping, an all_reduce(max).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from impl.common.experts import ACTIVATIONS, GroupedExperts

from .sim import DeepSpeedMoEConfig

__all__ = ["FFNExpert", "DeepSpeedLayerSpec", "init_deepspeed_comm", "build_deepspeed_moe", "local_expert_ids"]


class FFNExpert(nn.Module):
    """One GPT FFN expert, y = act(x @ w1 [+ b1]) @ w2 [+ b2], on any leading shape; parameter
    names and shapes are those of one `GroupedExperts(kind='gpt')` expert, so its
    `expert_state(i)` loads directly. DeepSpeed deep-copies this module per local expert."""

    def __init__(self, hidden: int, ffn_hidden: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.w1 = nn.Parameter(torch.zeros(hidden, ffn_hidden))
        self.w2 = nn.Parameter(torch.zeros(ffn_hidden, hidden))
        self.b1 = nn.Parameter(torch.zeros(ffn_hidden)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(hidden)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w1
        if self.b1 is not None:
            h = h + self.b1
        y = ACTIVATIONS[self.activation](h) @ self.w2
        return y if self.b2 is None else y + self.b2


@dataclass(frozen=True)
class DeepSpeedLayerSpec:
    """Shape and routing of one DeepSpeed MoE layer (the routing fields are MoE's arguments)."""

    hidden: int
    ffn_hidden: int
    num_experts: int
    ep_size: int
    routing: DeepSpeedMoEConfig = DeepSpeedMoEConfig()
    activation: str = "gelu"
    bias: bool = False

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size


def init_deepspeed_comm() -> None:
    """Make deepspeed.comm use the existing torch.distributed default group."""
    import torch.distributed as dist
    if not dist.is_initialized():
        raise RuntimeError("init_deepspeed_comm needs torch.distributed initialised first "
                           "(impl.common.launcher.launch or init_from_env)")
    from datetime import timedelta

    import deepspeed

    from impl.common.launcher import collective_timeout_s

    # the groups DeepSpeed makes later (expert / data parallel) call new_group without a timeout:
    # they get the launcher's (impl.common.launcher.set_collective_timeout), as does this one
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False,
                               timeout=timedelta(seconds=collective_timeout_s()))


def local_expert_ids(spec: DeepSpeedLayerSpec, rank: int) -> list[int]:
    """Global ids of the experts `rank` hosts: DeepSpeed's expert-parallel groups are consecutive
    ranks, and member i of a group holds experts i*E_local .. (i+1)*E_local - 1."""
    first = (rank % spec.ep_size) * spec.num_local_experts
    return list(range(first, first + spec.num_local_experts))


def build_deepspeed_moe(spec: DeepSpeedLayerSpec, gate_weight_EM: torch.Tensor, experts: GroupedExperts,
                        dtype: torch.dtype = torch.float32):
    """The real `deepspeed.moe.layer.MoE` with our weights. `experts` holds this rank's local
    experts (`local_expert_ids`) as GroupedExperts(kind='gpt'); collective: every rank calls it."""
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    world = dist.get_world_size()
    if spec.num_experts % spec.ep_size or world % spec.ep_size:
        raise ValueError(f"ep_size={spec.ep_size} must divide num_experts={spec.num_experts} and the world "
                         f"size {world}")
    if experts.kind != "gpt" or experts.num_local_experts != spec.num_local_experts:
        raise ValueError(f"experts must be GroupedExperts(kind='gpt') with {spec.num_local_experts} local experts, "
                         f"got kind={experts.kind!r} with {experts.num_local_experts}")
    if tuple(gate_weight_EM.shape) != (spec.num_experts, spec.hidden):
        raise ValueError(f"gate_weight_EM must be [{spec.num_experts}, {spec.hidden}], "
                         f"got {tuple(gate_weight_EM.shape)}")
    r = spec.routing
    moe = MoE(spec.hidden, FFNExpert(spec.hidden, spec.ffn_hidden, spec.activation, spec.bias),
              num_experts=spec.num_experts, ep_size=spec.ep_size, k=r.top_k, capacity_factor=r.capacity_factor,
              eval_capacity_factor=r.capacity_factor, min_capacity=r.min_capacity, noisy_gate_policy=None,
              drop_tokens=r.drop_tokens, use_rts=False, top2_2nd_expert_sampling=False).to(dtype)
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(gate_weight_EM)
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(experts.expert_state(i))
    return moe
