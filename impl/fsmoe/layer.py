"""`FSMoELayer`: one rank's FSMoE layer (SPMD): Gate -> Order -> pipelined core (dispatch, ESP
AllGather, expert shards, ESP ReduceScatter, combine) -> I-Order, with the hooks around it.

    layer = FSMoELayer(comm, MoELayerConfig(hidden=M, ffn_hidden=H, num_experts=E, r_fwd=4, r_bwd=2))
    y_TM = layer(x_TM)              # x_TM: this GPU's tokens (its sequence-parallel slice)

The schedules the core runs default to FSMoE's (`schedules.fsmoe_pass` with degrees r_fwd and
r_bwd, the gradient slice in the backward); any schedule with the same tasks can be given
instead (the baselines of the FSMoE paper are schedules). `layer.gradient_slice` (a tensor, or a
function returning the flat gradients and a write-back when the slice runs, see `pipeline`) is
all-reduced over the data-parallel group during the next backward, where the schedule puts it.
`layer.last_timelines` holds the measured timelines of the last forward and backward.

Capacity (per expert, per GPU) is agreed by every GPU before any token moves, in one all-reduce
of three ints: the largest per-expert count (no-drop mode and the drop_tokens=False check) and
the capacity each GPU computed (they must agree: equal-slice exchanges need one C).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from impl.common.comm import Comm
from impl.common.config import ConfigError
from impl.common.ordering import capacity as capacity_for, no_drop_capacity
from impl.common.routing import init_gate_from_seed
from impl.common.timeline import Schedule

from .config import MoELayerConfig
from .experts import ShardedExperts
from .layout import HybridLayout
from .modules import CallbackBase, build_gate_module, build_order
from .pipeline import PipelineCore, PipelinedExperts, comm_lanes
from .schedules import fsmoe_pass

__all__ = ["FSMoELayer", "default_schedules"]


def default_schedules(cfg: MoELayerConfig) -> dict[str, Schedule]:
    """FSMoE's own: three lanes, the launch order of the released layer, the gradient slice
    right after the backward's last dispatch."""
    return {"fwd": fsmoe_pass(cfg.r_fwd), "bwd": fsmoe_pass(cfg.r_bwd, gradient_slice=True)}


class FSMoELayer(nn.Module):
    def __init__(self, comm: Comm, cfg: MoELayerConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 hooks: CallbackBase | None = None,
                 schedules: Callable[[MoELayerConfig], dict[str, Schedule]] = default_schedules):
        super().__init__()
        self.comm, self.cfg = comm, cfg
        self.layout = HybridLayout.of(comm.topology, cfg)
        self.schedules = schedules(cfg)
        for phase, r in (("fwd", cfg.r_fwd), ("bwd", cfg.r_bwd)):
            got = sum(1 for t in self.schedules[phase].tasks if t.kind == "dispatch")
            if got != r:
                raise ConfigError(f"schedule {phase}: has {got} chunks, the config's r_{phase} is {r}")
        for lane in comm_lanes(self.schedules):       # every rank, same order (process groups)
            comm.lane(lane)
        if cfg.gate == "softmoe" and cfg.slots_per_expert % cfg.degree_multiple:
            raise ConfigError(f"slots_per_expert: {cfg.slots_per_expert} is not allowed with r_fwd={cfg.r_fwd}, "
                              f"r_bwd={cfg.r_bwd}; allowed: a multiple of {cfg.degree_multiple} (SoftMoE's slots "
                              "are its capacity)")
        self.gate = init_gate_from_seed(build_gate_module(cfg), seed + 1).to(dtype)
        self.order = build_order(cfg)
        self.experts = ShardedExperts(self.layout.local_experts(comm.rank), cfg.hidden, cfg.ffn_hidden, cfg.expert,
                                      cfg.act, shard=self.layout.esp_index(comm.rank),
                                      num_shards=self.layout.n_esp, seed=seed + 2, dtype=dtype)
        self.hooks = hooks or CallbackBase()
        self.gradient_slice = None
        self.last_timelines: dict = {}
        self.last_capacity: int | None = None
        self.last_dropped = 0

    def agreed_capacity(self, counts_E: torch.Tensor | None, num_tokens: int) -> int:
        """C for this call, the same on every GPU (see the module docstring)."""
        cfg, multiple = self.cfg, self.cfg.degree_multiple
        if cfg.gate == "softmoe":
            return cfg.slots_per_expert
        local_max = int(counts_E.max()) if counts_E.numel() else 0
        if cfg.gate == "expert_choice":
            mine = no_drop_capacity(local_max, multiple)
        elif cfg.capacity is not None:
            mine = no_drop_capacity(cfg.capacity, multiple)
        elif cfg.capacity_factor is not None:
            mine = capacity_for(num_tokens, cfg.num_experts, cfg.top_k, cfg.capacity_factor, multiple)
        else:
            mine = 0
        stats = self.comm.reduce_on_host(torch.tensor([local_max, mine, -mine]), "max").tolist()
        global_max, high, low = stats[0], stats[1], -stats[2]
        if high != low:
            raise ConfigError(f"capacity: GPUs computed different capacities ({low}..{high}) because their token "
                              "counts differ; every GPU needs the same number of tokens")
        if mine == 0:
            return no_drop_capacity(global_max, multiple)
        if not cfg.drop_tokens and global_max > high:
            raise ConfigError(f"capacity: C={high} is below the {global_max} rows one expert needs with "
                              f"drop_tokens: false; allowed: capacity >= {global_max}, a larger capacity_factor, "
                              "null (no drop) or drop_tokens: true")
        return high

    def forward(self, x_TM: torch.Tensor) -> torch.Tensor:
        if x_TM.dim() != 2 or x_TM.shape[1] != self.cfg.hidden:
            raise ValueError(f"x_TM must be [tokens, {self.cfg.hidden}], got {tuple(x_TM.shape)}")
        x_TM = self.hooks.before_moe_start(x_TM)
        gate_out = self.gate(x_TM)
        C = self.agreed_capacity(self.order.counts(gate_out), x_TM.shape[0])
        buf_RM, ctx = self.order.order(x_TM, gate_out, C)
        core = PipelineCore(self.comm, self.experts, self.hooks, self.layout.ep_group(self.comm),
                            self.layout.esp_group(self.comm), self.cfg.dispatch, C, self.schedules,
                            gradient_slice=self.gradient_slice)
        out_RM = PipelinedExperts.apply(buf_RM, core, *self.experts.weights())
        self.last_timelines, self.last_capacity = core.timelines, C
        self.last_dropped = ctx.plan.dropped if ctx.plan is not None else 0
        return self.hooks.before_moe_end(self.order.iorder(out_RM, ctx))
