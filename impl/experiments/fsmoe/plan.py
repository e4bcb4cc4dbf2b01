"""Plan one FSMoE block stack with every training plan (FSMoE, its ablations and the baselines):
chosen degrees, predicted time per phase, the iteration's makespan and its overlap lower bound.

    python -m impl.experiments.fsmoe.plan --set profile=fsmoe-testbed-a --set hidden=1600 \\
        --set ffn_hidden=6400 --set heads=25 --set batch=4 --set seq=1024 --set layers=2 [--json]

Times are MODELED (tier sim) from the hardware profile's alpha-beta models. The overlap lower
bound of a schedule is `impl.common.timeline.lower_bound`: no order of its tasks on those lanes
can be shorter.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Literal

from impl.common import cli
from impl.common.config import MAX_EXPERTS, MAX_LAYERS, MAX_TOKENS, MAX_WIDTH, bounded, checked
from impl.common.costmodel import load_profile
from impl.common.timeline import lower_bound, simulate
from impl.experiments.fsmoe.systems import FSMOE_SYSTEMS
from impl.fsmoe.costs import BlockShape, block_costs
from impl.fsmoe.schedules import fsmoe_pass

__all__ = ["PlanConfig", "plan_rows", "main"]

PROG = "python -m impl.experiments.fsmoe.plan"


@dataclass(frozen=True)
class PlanConfig:
    profile: str = "fsmoe-testbed-a"
    batch: int = bounded(4, ge=1, le=MAX_TOKENS)
    seq: int = bounded(1024, ge=1, le=MAX_TOKENS)
    hidden: int = bounded(1600, ge=1, le=MAX_WIDTH)
    ffn_hidden: int = bounded(6400, ge=1, le=MAX_WIDTH)
    heads: int = bounded(25, ge=1, le=MAX_WIDTH)
    kv_heads: int | None = bounded(None, ge=1, le=MAX_WIDTH)
    num_experts: int | None = bounded(None, ge=1, le=MAX_EXPERTS)   # default: one expert per node
    top_k: int = bounded(2, ge=1, le=MAX_EXPERTS)
    capacity_factor: float | None = bounded(1.2, gt=0, le=1000)      # null: no drop
    ffn: Literal["gpt", "mixtral"] = "gpt"
    layers: int = bounded(2, ge=1, le=MAX_LAYERS)
    systems: tuple[str, ...] = ()             # paper names; default: every FSMoE-paper system


def resolve(cfg: PlanConfig):
    profile = checked("profile", load_profile, cfg.profile)
    shape = BlockShape(cfg.batch, cfg.seq, cfg.hidden, cfg.ffn_hidden, cfg.heads,
                       cfg.num_experts or profile.get_topology().num_nodes, cfg.top_k, cfg.capacity_factor, cfg.ffn,
                       cfg.kv_heads)
    systems = [FSMOE_SYSTEMS.get(name) for name in cfg.systems] if cfg.systems else list(FSMOE_SYSTEMS)
    return profile, block_costs(shape, profile), systems


def plan_rows(cfg: PlanConfig) -> list[dict]:
    profile, bc, systems = resolve(cfg)
    blocks = [bc] * cfg.layers
    rows = []
    for system in systems:
        plan = system.factory()(blocks)
        schedule = plan.schedule(blocks)
        makespan, bound = simulate(schedule).makespan, lower_bound(schedule)
        r_fwd, r_bwd = plan.degrees[0]
        fwd_pass = fsmoe_pass(r_fwd, lanes=plan.lanes).with_durations(lambda t: bc.fwd.duration(t.kind, r_fwd))
        rows.append({"system": system.name, "plan": plan.system, "r_fwd": r_fwd, "r_bwd": r_bwd,
                     "degrees": [list(d) for d in plan.degrees], "moe_fwd_ms": simulate(fwd_pass).makespan,
                     "iteration_ms": makespan, "lower_bound_ms": bound,
                     "over_lower_bound": makespan / bound, "gradient_tasks": len(plan.grads),
                     "note": plan.note, "tier": "sim", "profile": profile.name})
    base = next((r["iteration_ms"] for r in rows if r["system"] == "DS-MoE"), None)
    for r in rows:
        r["speedup_over_ds_moe"] = base / r["iteration_ms"] if base else None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(PROG, __doc__, config=PlanConfig)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        cfg = cli.load_config(args, PlanConfig)
        rows = plan_rows(cfg)
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    if args.json:
        print(json.dumps({"config": asdict(cfg), "systems": rows}, indent=2))
        return 0
    print(f"{cfg.layers} block(s) on {rows[0]['profile']} (times MODELED, ms)")
    print(f"{'system':>15} {'r_fwd':>5} {'r_bwd':>5} {'MoE fwd':>9} {'iteration':>10} {'lower bd':>9} "
          f"{'ratio':>6} {'vs DS-MoE':>9}")
    for r in rows:
        vs = f"{r['speedup_over_ds_moe']:.2f}x" if r["speedup_over_ds_moe"] else "-"
        print(f"{r['system']:>15} {r['r_fwd']:>5} {r['r_bwd']:>5} {r['moe_fwd_ms']:>9.2f} {r['iteration_ms']:>10.2f} "
              f"{r['lower_bound_ms']:>9.2f} {r['over_lower_bound']:>6.2f} {vs:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
