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
           "GradTask", "iteration"]

CHUNK_KINDS = ("dispatch", "ag", "expert", "rs", "combine")
COMM_KINDS = ("dispatch", "ag", "rs", "combine", "gar", "mp")
LANES_3 = {"dispatch": "inter", "combine": "inter", "gar": "inter", "ag": "intra", "rs": "intra", "mp": "intra",
           "expert": "compute", "dense": "compute"}
LANES_SHARED = {k: ("compute" if k in ("expert", "dense") else "comm") for k in LANES_3}
LANES_SEQUENTIAL = {k: "seq" for k in LANES_3}
_DEPENDS_ON = {"ag": "dispatch", "expert": "ag", "rs": "expert", "combine": "rs"}


def pass_tasks(r: int, lanes: dict[str, str] = LANES_3, *, prefix: str = "", gradient_slice: bool = False,
               gar_name: str = "gar", first_deps: tuple[str, ...] = ()) -> list[Task]:
    """One pass of degree r in FSMoE's launch order (zero durations); `first_deps` gate the
    first dispatch."""
    def name(kind, c):
        return f"{prefix}{kind}{c}"

    def task(kind, c):
        deps = (name(_DEPENDS_ON[kind], c),) if kind in _DEPENDS_ON else (first_deps if c == 0 else ())
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
    block b's dense backward starts; ('after', b) right after block b's dense backward; ('tail',)
    after the whole backward."""

    nbytes: float
    where: tuple
    producers: tuple[int, ...]


def iteration(blocks: list, degrees: list[tuple[int, int]], grads: list[GradTask],
              lanes: dict[str, str] = LANES_3) -> Schedule:
    """Forward and backward of every block of `blocks` (`costs.BlockCosts`, first block first)
    with per-block degrees (r_fwd, r_bwd), the gradient tasks placed as given, durations filled."""
    n = len(blocks)
    tasks: list[Task] = []
    at: dict[tuple, list[GradTask]] = {}
    for g in grads:
        at.setdefault(tuple(g.where), []).append(g)

    def grad_tasks(where: tuple, block_costs) -> list[Task]:
        out = []
        for j, g in enumerate(at.get(where, [])):
            deps = tuple(f"b{p}.b.dense" for p in g.producers)
            label = "-".join(str(x) for x in where)
            out.append(Task(f"gar.{label}.{j}", lanes["gar"], block_costs.t_ar(g.nbytes), deps, "gar", size=g.nbytes))
        return out

    def filled(task: Task, model, r) -> Task:
        return replace(task, duration=model.duration(task.kind, r))

    prev = ()
    for b, (bc, (r_fwd, _)) in enumerate(zip(blocks, degrees)):
        p = f"b{b}.f."
        tasks += [Task(p + "mpag", lanes["mp"], bc.mp_comm_ms, prev, "mp"),
                  Task(p + "dense", lanes["dense"], bc.dense_fwd_ms, (p + "mpag",), "dense"),
                  Task(p + "mprs", lanes["mp"], bc.mp_comm_ms, (p + "dense",), "mp")]
        tasks += [filled(t, bc.fwd, r_fwd) for t in pass_tasks(r_fwd, lanes, prefix=p, first_deps=(p + "mprs",))]
        prev = tuple(f"{p}combine{c}" for c in range(r_fwd))
    for b in reversed(range(n)):
        bc, (_, r_bwd) = blocks[b], degrees[b]
        p = f"b{b}.b."
        moe = [filled(t, bc.bwd, r_bwd) for t in pass_tasks(r_bwd, lanes, prefix=p, first_deps=prev)]
        last_dispatch = max(i for i, t in enumerate(moe) if t.kind == "dispatch")
        moe[last_dispatch + 1:last_dispatch + 1] = grad_tasks(("moe", b), bc)
        tasks += moe
        combines = tuple(f"{p}combine{c}" for c in range(r_bwd))
        tasks += grad_tasks(("dense", b), bc)
        tasks += [Task(p + "mprs", lanes["mp"], bc.mp_comm_ms, combines, "mp"),
                  Task(p + "dense", lanes["dense"], bc.dense_bwd_ms, (p + "mprs",), "dense"),
                  Task(p + "mpag", lanes["mp"], bc.mp_comm_ms, (p + "dense",), "mp")]
        tasks += grad_tasks(("after", b), bc)
        prev = (p + "mpag",)
    tasks += grad_tasks(("tail",), blocks[0])
    return Schedule(tuple(tasks))
