"""The pipelined core of an FSMoE layer: dispatch -> ESP AllGather -> expert shards -> ESP
ReduceScatter -> combine, over the capacity axis split into r chunks, run by the schedule
executor on the schedule's lanes, forward with r_fwd and a hand-written backward with r_bwd.

`PipelinedExperts.apply(buf, core, *expert_weights)` maps the ordered tokens [E * C, M]
(expert-major; expert e lives on expert-parallel member e // E_l) to the experts' outputs in the
same layout. It is a custom autograd function: the forward pipeline runs without autograd, and
the backward is its own pipeline over the gradient (AlltoAll of the output gradient to the
experts, AllGather over the node, the experts' hand-written backward, ReduceScatter, AlltoAll
back), so the two passes can use different degrees. A gradient slice handed to the core
(`gradient_slice`: a tensor, or a function called when the slice runs that returns the flat
gradients and a function writing their sum back) is all-reduced over the data-parallel group
during the backward, where the schedule places it ('gar').

Message layouts per chunk of c = C / r capacity rows: the send buffer [N_EP, E_l, c, M] (slice j
for EP member j), received [N_EP (source), E_l, c, M]; gathered over the node [N_ESP, N_EP, E_l,
c, M]; the ReduceScatter gives each node GPU its block back, and the combine returns each
source's rows in its [N_EP (owner), E_l, c, M] order, which is the input layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from impl.common.comm import Comm, CommGroup
from impl.common.equal_slice import equal_slice_all_to_all
from impl.common.executor import execute
from impl.common.timeline import Schedule, Task, Timeline

from .experts import ShardedExperts
from .modules import CallbackBase
from .schedules import COMM_KINDS

__all__ = ["PipelineCore", "PipelinedExperts"]


@dataclass
class PipelineCore:
    """Everything one layer call's pipeline needs; lives from the forward to the backward."""

    comm: Comm
    experts: ShardedExperts
    hooks: CallbackBase
    ep_group: CommGroup
    esp_group: CommGroup | None
    dispatch_algorithm: str
    capacity: int
    schedules: dict[str, Schedule]              # 'fwd' and 'bwd'
    gradient_slice: object = None                 # tensor, or () -> (flat, write_back)
    timelines: dict[str, Timeline] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)           # the experts' forward caches
    grads: dict = field(default_factory=dict)           # the experts' weight gradients

    @property
    def n_ep(self) -> int:
        return self.ep_group.size

    @property
    def n_esp(self) -> int:
        return 1 if self.esp_group is None else self.esp_group.size

    def _lane(self, task: Task) -> Comm:
        return self.comm.lane(task.lane)

    def _a2a(self, task: Task, rows: torch.Tensor, phase: str) -> torch.Tensor:
        return equal_slice_all_to_all(self._lane(task), rows, self.dispatch_algorithm,
                                      self.ep_group if self.n_esp > 1 else None, phase=phase)

    def run(self, phase: str, source: torch.Tensor) -> torch.Tensor:
        """One pass over `source` [N_EP, E_l, C, M]: the forward (outputs) or the backward
        (input gradients from output gradients)."""
        schedule = self.schedules[phase]
        r = sum(1 for t in schedule.tasks if t.kind == "dispatch")
        c = self.capacity // r
        shape = tuple(source.shape)
        result = torch.empty_like(source)
        rows = {}
        if phase == "fwd":
            self.cache = self.experts.new_cache((self.n_esp,) + shape, source.dtype, source.device)
        hooks = self.hooks

        def action(task: Task) -> None:
            k = task.chunk
            cap = slice(k * c, (k + 1) * c) if k is not None else None
            if k in rows and rows[k].is_cuda:
                # made on another lane's stream: its memory must not be reused there before this
                # lane's work on it has run (the host drops the reference as soon as it is issued)
                rows[k].record_stream(torch.cuda.current_stream(rows[k].device))
            if task.kind == "dispatch":
                send = hooks.before_dispatch(source[:, :, cap].contiguous().view(-1, shape[-1]), k, phase)
                rows[k] = hooks.after_dispatch(self._a2a(task, send, phase), k, phase)
            elif task.kind == "ag":
                got = rows[k] if self.esp_group is None else \
                    self._lane(task).all_gather_cat(rows[k], self.esp_group, phase=phase)
                rows[k] = got.view((self.n_esp,) + shape[:2] + (c, shape[-1]))
            elif task.kind == "expert":
                rows[k] = self.experts.forward_chunk(rows[k], cap, self.cache) if phase == "fwd" else \
                    self.experts.backward_chunk(rows[k], cap, self.cache, self.grads)
            elif task.kind == "rs":
                flat = rows[k].reshape(-1, shape[-1])
                rows[k] = flat if self.esp_group is None else \
                    self._lane(task).reduce_scatter(flat, self.esp_group, phase=phase)
            elif task.kind == "combine":
                send = hooks.before_combine(rows.pop(k), k, phase)
                back = hooks.after_combine(self._a2a(task, send, phase), k, phase)
                result[:, :, cap] = back.view(shape[:2] + (c, shape[-1]))
            elif task.kind == "gar":
                if callable(self.gradient_slice):       # produced by now: (flat gradients, write back)
                    flat, write_back = self.gradient_slice()
                    write_back(self._lane(task).all_reduce(flat, "sum", self.ep_group, category="grads", phase=phase))
                elif self.gradient_slice is not None:
                    self.gradient_slice.copy_(self._lane(task).all_reduce(
                        self.gradient_slice, "sum", self.ep_group, category="grads", phase=phase))
            else:
                raise ValueError(f"task {task.name!r}: unknown kind {task.kind!r}")

        self.timelines[phase] = execute(schedule, action, device=source.device)
        return result


class PipelinedExperts(torch.autograd.Function):
    """[E * C, M] ordered tokens -> expert outputs, forward and backward pipelined (see module)."""

    @staticmethod
    def forward(ctx, buf_RM: torch.Tensor, core: PipelineCore, *weights: torch.Tensor) -> torch.Tensor:
        ctx.core = core
        E_l = core.experts.num_local
        view = buf_RM.detach().view(core.n_ep, E_l, core.capacity, -1)
        return core.run("fwd", view).view_as(buf_RM)

    @staticmethod
    def backward(ctx, grad_RM: torch.Tensor):
        core = ctx.core
        view = grad_RM.contiguous().view(core.n_ep, core.experts.num_local, core.capacity, -1)
        grad_in = core.run("bwd", view).view_as(grad_RM)
        weight_grads = core.experts.grads_of(core.grads)
        core.cache, core.grads = {}, {}
        return (grad_in, None, *weight_grads)


def comm_lanes(schedules: dict[str, Schedule]) -> list[str]:
    """Lanes that carry collectives, in a fixed order (every rank creates them in this order)."""
    return sorted({t.lane for s in schedules.values() for t in s.tasks if t.kind in COMM_KINDS})
