"""Task schedules that both the timeline simulator and the executor run: one MoE layer pass, and a
whole training iteration of a stack of blocks.

A pass with pipeline degree r has, per chunk c, five tasks: 'dispatch' (AlltoAll towards the
experts), 'ag' (ESP AllGather), 'expert', 'rs' (ESP ReduceScatter), 'combine' (AlltoAll back);
in the backward pass the same five carry gradients. 'gar' tasks all-reduce slices of the dense
parameters' gradients over the data-parallel (inter-node) group. Where each task runs and in
which order it is issued is what distinguishes the systems:

* lanes: FSMoE's three (`LANES_3`: 'inter' for AlltoAlls and gradients, 'intra' for ESP and
  sequence-parallel collectives, 'compute'), one shared communication lane (`LANES_SHARED`: Tutel,
  FSMoE-No-IIO), or one lane for everything (`LANES_SEQUENTIAL`: DeepSpeed-MoE's default);
* issue order inside a pass: FSMoE's launcher issues every chunk's dispatch and AllGather, then a
  gradient slice if the pass carries one (right after the last dispatch), then per chunk the
  expert and its ReduceScatter, then every combine (`pass_tasks`);
* where the gradients go (`GradTask`: inside a block's MoE backward, during its dense backward,
  right after the block that produced them, or at the end).

An iteration (`iteration`) is the forward of every block (sequence-parallel AllGather, the dense
part, ReduceScatter, the MoE pass) then the backward in reverse (the MoE pass, then the dense
part's gradients); a block's dense gradient exists once its dense backward has run, and a
gradient task waits for the blocks it reduces.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from impl.common.timeline import Schedule, Task

__all__ = ["CHUNK_KINDS", "COMM_KINDS", "LANES_3", "LANES_SHARED", "LANES_SEQUENTIAL", "fsmoe_pass", "pass_tasks",
           "GradTask", "forward_tasks", "backward_tasks", "iteration", "gpipe_iteration"]

CHUNK_KINDS = ("dispatch", "ag", "expert", "rs", "combine")
COMM_KINDS = ("dispatch", "ag", "rs", "combine", "gar", "mp")
LANES_3 = {"dispatch": "inter", "combine": "inter", "gar": "inter", "ag": "intra", "rs": "intra", "mp": "intra",
           "expert": "compute", "dense": "compute"}
LANES_SHARED = {k: ("compute" if k in ("expert", "dense") else "comm") for k in LANES_3}
LANES_SEQUENTIAL = {k: "seq" for k in LANES_3}
_DEPENDS_ON = {"ag": "dispatch", "expert": "ag", "rs": "expert", "combine": "rs"}


def pass_tasks(r: int, lanes: dict[str, str] = LANES_3, *, prefix: str = "", gradient_slice: bool = False,
               gar_name: str = "gar", first_deps: tuple[str, ...] = ()) -> list[Task]:
    """One pass of degree r in FSMoE's launch order (zero durations); `first_deps` gate every
    chunk's dispatch (each needs the pass's input, whatever lane order issues them: the bound and
    any reordering see the same data dependencies as the FIFO lanes)."""
    def name(kind, c):
        return f"{prefix}{kind}{c}"

    def task(kind, c):
        deps = (name(_DEPENDS_ON[kind], c),) if kind in _DEPENDS_ON else first_deps
        return Task(name(kind, c), lanes[kind], 0.0, deps, kind, c)

    issued = [task(kind, c) for c in range(r) for kind in ("dispatch", "ag")]
    if gradient_slice:
        issued.append(Task(f"{prefix}{gar_name}", lanes["gar"], 0.0, (), "gar"))
    issued += [task(kind, c) for c in range(r) for kind in ("expert", "rs")]
    issued += [task("combine", c) for c in range(r)]
    return issued


def fsmoe_pass(r: int, *, gradient_slice: bool = False, lanes: dict[str, str] = LANES_3) -> Schedule:
    """One MoE layer pass as FSMoE runs it (the layer's default schedule)."""
    return Schedule(tuple(pass_tasks(r, lanes, gradient_slice=gradient_slice)))


@dataclass(frozen=True)
class GradTask:
    """An AllReduce of `nbytes` of dense gradients produced by the blocks `producers`, issued at
    `where`: ('moe', b) inside block b's MoE backward after its last dispatch; ('dense', b) when
    block b's dense backward starts (after its first sequence-parallel collective); ('after', b) right after block b's dense backward; ('tail',)
    after the whole backward."""

    nbytes: float
    where: tuple
    producers: tuple[int, ...]


def _grad_tasks(grads: list[GradTask], where: tuple, block_costs, lanes: dict[str, str], prefix: str) -> list[Task]:
    out = []
    for j, g in enumerate(t for t in grads if tuple(t.where) == where):
        deps = tuple(f"{prefix}b{p}.b.dense" for p in g.producers)
        label = "-".join(str(x) for x in where)
        out.append(Task(f"{prefix}gar.{label}.{j}", lanes["gar"], block_costs.t_ar(g.nbytes), deps, "gar",
                        size=g.nbytes))
    return out


def _filled(task: Task, model, r: int) -> Task:
    return replace(task, duration=model.duration(task.kind, r))


def forward_tasks(blocks: list, degrees: list[tuple[int, int]], lanes: dict[str, str], *, prefix: str = "",
                  first_deps: tuple[str, ...] = ()) -> tuple[list[Task], tuple[str, ...]]:
    """Every block's forward: sequence-parallel AllGather, dense part, ReduceScatter, MoE pass.
    Returns the tasks and the names the next stage waits for."""
    tasks, prev = [], first_deps
    for b, (bc, (r_fwd, _)) in enumerate(zip(blocks, degrees)):
        p = f"{prefix}b{b}.f."
        tasks += [Task(p + "mpag", lanes["mp"], bc.mp_ag_ms, prev, "mp"),
                  Task(p + "dense", lanes["dense"], bc.dense_fwd_ms, (p + "mpag",), "dense"),
                  Task(p + "mprs", lanes["mp"], bc.mp_rs_ms, (p + "dense",), "mp")]
        tasks += [_filled(t, bc.fwd, r_fwd) for t in pass_tasks(r_fwd, lanes, prefix=p, first_deps=(p + "mprs",))]
        prev = tuple(f"{p}combine{c}" for c in range(r_fwd))
    return tasks, prev


def backward_tasks(blocks: list, degrees: list[tuple[int, int]], grads: list[GradTask], lanes: dict[str, str], *,
                   prefix: str = "", first_deps: tuple[str, ...] = ()) -> tuple[list[Task], tuple[str, ...]]:
    """Every block's backward in reverse (MoE pass, then the dense part's gradients), the gradient
    tasks placed where `grads` says (the tail ones too, after the last block)."""
    tasks, prev = [], first_deps
    for b in reversed(range(len(blocks))):
        bc, (_, r_bwd) = blocks[b], degrees[b]
        p = f"{prefix}b{b}.b."
        moe = [_filled(t, bc.bwd, r_bwd) for t in pass_tasks(r_bwd, lanes, prefix=p, first_deps=prev)]
        last_dispatch = max(i for i, t in enumerate(moe) if t.kind == "dispatch")
        moe[last_dispatch + 1:last_dispatch + 1] = _grad_tasks(grads, ("moe", b), bc, lanes, prefix)
        tasks += moe
        combines = tuple(f"{p}combine{c}" for c in range(r_bwd))
        # a dense-window gradient is issued after the sequence-parallel collective that starts the
        # dense backward, so on a shared lane it runs while the dense part computes; the backward
        # tasks are named after the forward collective they differentiate: the ReduceScatter's
        # backward is an AllGather, the AllGather's a ReduceScatter
        tasks.append(Task(p + "mprs", lanes["mp"], bc.mp_ag_ms, combines, "mp"))
        tasks += _grad_tasks(grads, ("dense", b), bc, lanes, prefix)
        tasks += [Task(p + "dense", lanes["dense"], bc.dense_bwd_ms, (p + "mprs",), "dense"),
                  Task(p + "mpag", lanes["mp"], bc.mp_rs_ms, (p + "dense",), "mp")]
        tasks += _grad_tasks(grads, ("after", b), bc, lanes, prefix)
        prev = (p + "mpag",)
    tasks += _grad_tasks(grads, ("tail",), blocks[0], lanes, prefix)
    return tasks, prev


def iteration(blocks: list, degrees: list[tuple[int, int]], grads: list[GradTask],
              lanes: dict[str, str] = LANES_3) -> Schedule:
    """Forward and backward of every block of `blocks` (`costs.BlockCosts`, first block first)
    with per-block degrees (r_fwd, r_bwd), the gradient tasks placed as given, durations filled."""
    fwd, last = forward_tasks(blocks, degrees, lanes)
    bwd, _ = backward_tasks(blocks, degrees, grads, lanes, first_deps=last)
    return Schedule(tuple(fwd + bwd))


def gpipe_iteration(stages: list[tuple[list, list[tuple[int, int]], list[GradTask]]], micro_batches: int,
                    lanes: dict[str, str] = LANES_3, send_ms: float = 0.0) -> Schedule:
    """GPipe over pipeline stages, each (blocks, degrees, gradient tasks) on its own GPUs (its own
    lanes): every micro-batch's forward through the stages, then every backward in reverse; a
    stage all-reduces its gradients in its last backward (micro-batch 0), where its plan puts them.
    `send_ms` > 0 charges each stage-to-stage transfer (a micro-batch's activations forward, their
    gradients backward) as a task of that many ms on the sending stage's inter-node lane (the
    AlltoAlls' lane), issued as soon as what it carries exists and waited for by the receiving
    stage; 0 leaves the transfers out."""
    tasks: list[Task] = []
    ends: dict[tuple[int, int, str], tuple[str, ...]] = {}

    def send(stage_tasks: list[Task], last: tuple[str, ...], s: int, name: str) -> tuple[str, ...]:
        """Issue the transfer on stage s's inter-node lane right after `last`, the tasks whose
        output it carries (before any later task of that stage, e.g. a gradient AllReduce)."""
        if send_ms <= 0:
            return last
        at = max(i for i, t in enumerate(stage_tasks) if t.name in last) + 1
        stage_tasks.insert(at, Task(name, f"{lanes['dispatch']}@s{s}", send_ms, last, "send"))
        return (name,)

    for m in range(micro_batches):
        for s, (blocks, degrees, _) in enumerate(stages):
            stage_lanes = {k: f"{v}@s{s}" for k, v in lanes.items()}
            fwd, last = forward_tasks(blocks, degrees, stage_lanes, prefix=f"s{s}.m{m}.",
                                      first_deps=ends.get((s - 1, m, "f"), ()))
            if s < len(stages) - 1:
                last = send(fwd, last, s, f"s{s}.m{m}.f.send")
            tasks += fwd
            ends[(s, m, "f")] = last
    for m in reversed(range(micro_batches)):
        for s in reversed(range(len(stages))):
            blocks, degrees, grads = stages[s]
            stage_lanes = {k: f"{v}@s{s}" for k, v in lanes.items()}
            after = ends[(len(stages) - 1, m, "f")] if s == len(stages) - 1 else ends[(s + 1, m, "b")]
            bwd, last = backward_tasks(blocks, degrees, grads if m == 0 else [], stage_lanes, prefix=f"s{s}.m{m}.",
                                       first_deps=after)
            if s > 0:
                last = send(bwd, last, s, f"s{s}.m{m}.b.send")
            tasks += bwd
            ends[(s, m, "b")] = last
    return Schedule(tuple(tasks))
