"""The task schedules of one MoE layer pass, as timeline `Schedule`s that both the simulator and
the executor run.

A pass with pipeline degree r has, per chunk c, five tasks: 'dispatch' (AlltoAll towards the
experts), 'ag' (ESP AllGather), 'expert', 'rs' (ESP ReduceScatter), 'combine' (AlltoAll back);
in the backward pass the same five carry gradients (the AlltoAll to the experts is the combine's
reverse, and so on), and a 'gar' task all-reduces a slice of the dense gradients. Each schedule
says which lane every task runs on and the order tasks are issued, which is where the systems
differ:

* `fsmoe`: three lanes, inter-node ('inter': AlltoAlls and the gradient slice), intra-node
  ('intra': AllGather, ReduceScatter) and 'compute'; issued as FSMoE's launcher does: every
  chunk's dispatch and AllGather, then the gradient slice (right after the last dispatch), then
  per chunk the expert and its ReduceScatter, then every combine.

Task names are '<kind><chunk>' ('dispatch0', 'expert3', ...) and 'gar'.
"""
from __future__ import annotations

from impl.common.timeline import Schedule, Task

__all__ = ["CHUNK_KINDS", "LANES_3", "COMM_KINDS", "fsmoe_pass", "chunk_tasks"]

CHUNK_KINDS = ("dispatch", "ag", "expert", "rs", "combine")
COMM_KINDS = ("dispatch", "ag", "rs", "combine", "gar")
LANES_3 = {"dispatch": "inter", "combine": "inter", "gar": "inter", "ag": "intra", "rs": "intra",
           "expert": "compute"}
_DEPENDS_ON = {"ag": "dispatch", "expert": "ag", "rs": "expert", "combine": "rs"}


def chunk_tasks(r: int, lanes: dict[str, str]) -> dict[str, list[Task]]:
    """kind -> the r chunk tasks of that kind (zero durations), with their data dependencies."""
    out = {}
    for kind in CHUNK_KINDS:
        deps = lambda c: (f"{_DEPENDS_ON[kind]}{c}",) if kind in _DEPENDS_ON else ()  # noqa: E731
        out[kind] = [Task(f"{kind}{c}", lanes[kind], 0.0, deps(c), kind, c) for c in range(r)]
    return out


def fsmoe_pass(r: int, *, gradient_slice: bool = False, lanes: dict[str, str] = LANES_3) -> Schedule:
    """FSMoE's launch order on its three lanes (or the lanes given)."""
    t = chunk_tasks(r, lanes)
    issued = [x for c in range(r) for x in (t["dispatch"][c], t["ag"][c])]
    if gradient_slice:
        issued.append(Task("gar", lanes["gar"], 0.0, (), "gar"))
    issued += [x for c in range(r) for x in (t["expert"][c], t["rs"][c])]
    issued += t["combine"]
    return Schedule(tuple(issued))
