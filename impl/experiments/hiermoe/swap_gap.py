"""What the expert swap (HierD-ES) can gain on our routing: HierMoE over HD-MoE as the swaps
accumulate on a routing that stays, against routing skew (sim tier, modeled times).

    python -m impl.experiments.hiermoe.swap_gap --config workflows/config/experiments/hiermoe_swap_gap.yaml \
        --out-csv results/raw/hiermoe_swap_gap/qwen3.csv --out-record results/raw/hiermoe_swap_gap/qwen3.json

(`hiermoe_swap_gap_deepseek.yaml`: the same on the DeepSeek-V3 setting, node-limited routing as
its sim run has it.)

Why. HierD-ES makes one swap per layer and plan (Theorem 1: the single best pair), so its gain
grows with the swaps made, up to where no single swap lowers the modeled time any more (a local
optimum of the objective), and it is bounded by what the routing leaves to fix. The sim runs make
one swap per iteration (24 in the Section V-E ablation), on a drifting routing. This sweep takes
both limits away: for each skew, one layer's routing of iteration 0 (the stream's `drift` as
configured, 0 = the hot experts stay), HierD-ES planned again and again on that same routing from
the identity placement, each plan on the placement the last one left, with the route d* of the
current placement (as the sim's HierMoE plans), until it keeps the placement (`converged`) or
`max_swaps`. At every checkpoint the placement's modeled AlltoAll time (HD-MoE's model, d* and
its agreement included) on the routing it was planned on (`a2a_ms_same`: no staleness) and on
the next iteration's routing (`a2a_ms_next`: what a run that plans after its step sees), each
under our charge ('all') and the paper's (Eqs. (1)-(5), 'tokens'), the objective Q of the
placement (`q_ms`, Eq. (8) at its d*), and the duplicate-free rows of the route's first step (across
the coarsest level) on the next routing, their mean and largest split (`first_step_rows_*`: a swap
lowers the mean by placing experts that tokens select together in one group, the largest split
over the mean by balancing), and how many of the swaps so far exchanged experts on two nodes
(`cross_node_swaps`; the others stay inside a node, where only the finer steps can change), and
why: of the single swaps the placement allows, the best one across nodes and the best one inside a
node, as Q's relative change (`cross_node_best_dq`, `in_node_best_dq`), and the share of each kind
that would lower Q (`*_lowering_share`). Gains are the rows of 0 swaps over the row's.

What it measures (the report divides): the swap gain after as many swaps as the runs make,
the converged gain (an upper bound for a run of any length on a routing that stays, under this
planner), staleness (same against next), and the objective against the model (Q's gain against
the time's).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field

import pandas as pd
import torch

from impl.common import cli
from impl.common.config import MAX_REPEATS, ConfigError, bounded
from impl.common.dispatcher import ExpertPlacement
from impl.common.records import make_record
from impl.experiments.hiermoe.sim import LayerRouting, SimExperimentConfig, a2a_time, parse_system, resolve
from impl.experiments.hiermoe.workload import RoutingStream, routing_balance
from impl.hiermoe.dimension import holder_rows, route_steps
from impl.hiermoe.expert_swap import REL_TOL, decide_swap, pair_objectives

__all__ = ["SwapGapConfig", "swap_path", "run_sweep", "check", "main"]


@dataclass(frozen=True)
class SwapGapConfig:
    experiment: str = "hiermoe_swap_gap"
    sim: SimExperimentConfig = field(default_factory=SimExperimentConfig)   # model, topology, profile, stream
    skews: tuple[float, ...] = bounded((0.0, 0.5, 1.0, 1.5, 2.0), ge=0, le=1e3)   # stream.skew of each point
    max_swaps: int = bounded(256, ge=1, le=MAX_REPEATS)
    checkpoints: tuple[int, ...] = bounded((1, 8, 24, 64), ge=1, le=MAX_REPEATS)   # swaps at which rows are written


def swap_path(rz, routing: LayerRouting, next_routing: LayerRouting, max_swaps: int, checkpoints: set[int]
              ) -> list[dict]:
    """HierD-ES planned repeatedly on `routing` from the identity placement (module docstring): one
    row at 0 swaps, at every checkpoint reached (`checkpoint`) and at the last swap (`converged` when
    the planner kept the placement before `max_swaps`)."""
    cfg = rz.config
    specs = {charge: parse_system(f"HD-MoE[charge={charge}]", {"max_fn": cfg.max_fn, "gamma": cfg.gamma})
             for charge in ("all", "tokens")}
    placement = ExpertPlacement.identity(rz.num_experts)
    node_of_slot = torch.arange(rz.num_experts) // (rz.num_experts // rz.topology.num_nodes)   # slots are node-major
    rows = []

    def row(swaps: int, converged: bool, d: int, q_ms: float, plan_s: float, stats) -> dict:
        out = {"swaps": swaps, "checkpoint": swaps in checkpoints, "converged": converged, "dim": d, "q_ms": q_ms,
               "planning_s": plan_s, "cross_node_swaps": cross_node,
               **_swaps_by_nodes(rz, stats, d, q_ms, node_of_slot)}
        for charge, spec in specs.items():
            suffix = "" if charge == "all" else "_tokens"
            for which, r in (("same", routing), ("next", next_routing)):
                out[f"a2a_ms_{which}{suffix}"] = a2a_time(spec, r.of(placement)[0], None, rz)[0]
        # the route's first step (across the coarsest level) on the next routing: its duplicate-free
        # rows per (holder, peer), mean and largest (what dedup and balance change)
        first = holder_rows(next_routing.of(placement)[0].copies, *route_steps(rz.topology, d)[0]).double()
        out["first_step_rows_mean"], out["first_step_rows_max"] = float(first.mean()), float(first.max())
        return out

    plan_s, cross_node = 0.0, 0
    for swaps in range(max_swaps + 1):
        _, d = a2a_time(specs["all"], routing.of(placement)[0], None, rz)
        start = time.perf_counter()
        stats = routing.swap_stats(placement)
        decision = decide_swap(stats, placement, rz.profile, rz.row_bytes,
                               max_fn=cfg.max_fn, gamma=cfg.gamma, dim=d, weight_bytes=cfg.weight_bytes)
        plan_s += time.perf_counter() - start
        done = decision.pair is None
        if swaps == 0 or swaps in checkpoints or done or swaps == max_swaps:
            rows.append(row(swaps, done, d, decision.q_current, plan_s, stats))
        if done:
            break
        a, b = (placement.slot_of_expert[e] for e in decision.pair)
        cross_node += bool(node_of_slot[a] != node_of_slot[b])
        swapped = placement.swap(*decision.pair)
        routing.move(placement, swapped)         # the next plan's statistics: only the moved experts' tokens recounted
        placement = swapped
    return rows


def _swaps_by_nodes(rz, stats, d: int, q_ms: float, node_of_slot: torch.Tensor) -> dict:
    """Which single swaps of the placement `stats` were counted on would lower the objective Q
    (Eq. (8) at d, float64), split by whether the two slots lie on two nodes or in one: the best of
    each as Q's relative change (`*_best_dq`, negative: lowers Q) and the share of each kind of pair
    that lowers Q. What shows why the planner does or does not swap across nodes (e.g. under
    node-limited routing)."""
    cfg = rz.config
    q = pair_objectives(stats, rz.profile, rz.row_bytes, d, max_fn=cfg.max_fn, gamma=cfg.gamma)
    upper = torch.ones_like(q, dtype=torch.bool).triu(1) & (q < math.inf)      # each pair of GPUs' slots once
    lowers = q < q_ms - REL_TOL * max(1.0, abs(q_ms))
    across = node_of_slot.view(-1, 1) != node_of_slot.view(1, -1)
    out = {}
    for kind, where in (("cross_node", across), ("in_node", ~across)):
        pairs = upper & where
        n = int(pairs.sum())
        out[f"{kind}_best_dq"] = float(q[pairs].min()) / q_ms - 1 if n else math.nan
        out[f"{kind}_lowering_share"] = int((pairs & lowers).sum()) / n if n else math.nan
    return out


def run_sweep(config: SwapGapConfig) -> pd.DataFrame:
    """One swap path per skew (the routing of the stream's first layer, iterations 0 and 1)."""
    frames = []
    for skew in config.skews:
        sim = dataclasses.replace(config.sim, layers=1, stream=dataclasses.replace(config.sim.stream, skew=skew))
        rz = resolve(sim)
        stream = RoutingStream(rz.model, 1, rz.topology.G, sim.tokens_per_rank, sim.stream, sim.seed,
                               num_experts=rz.num_experts, top_k=rz.top_k)
        first, second = stream.next_iteration()[0], stream.next_iteration()[0]
        rows = swap_path(rz, LayerRouting(first, rz), LayerRouting(second, rz), config.max_swaps,
                         set(config.checkpoints))
        frame = pd.DataFrame(rows)
        for key, value in {"skew": skew, "drift": sim.stream.drift, **routing_balance(first, rz.topology.G),
                           "model": rz.model.name, "topology": rz.topology.name, "E": rz.num_experts,
                           "K": rz.top_k, "G": rz.topology.G, "profile": rz.profile.name,
                           "max_fn": sim.max_fn, "gamma": sim.gamma, "tier": "sim",
                           "n_group": rz.model.n_group, "topk_group": rz.model.topk_group}.items():
            frame[key] = value
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def check(config: SwapGapConfig) -> None:
    """Every check of the config before any work (ConfigError, one line): at least one skew, and
    the sim settings at every skew."""
    if not config.skews:
        raise ConfigError("skews: the list is empty; give at least one routing skew")
    for skew in config.skews:
        resolve(dataclasses.replace(config.sim, stream=dataclasses.replace(config.sim.stream, skew=skew)))


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m impl.experiments.hiermoe.swap_gap", __doc__, config=SwapGapConfig,
                        outputs=("csv", "record"), progress=True)
    args = parser.parse_args(argv)
    try:
        config = cli.load_config(args, SwapGapConfig)
        check(config)
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    frame = run_sweep(config)
    frame.insert(0, "experiment", config.experiment)
    record = make_record(experiment=config.experiment, system="HierMoE,HD-MoE", tier="sim",
                         topology=resolve(config.sim).topology, model={"name": config.sim.model},
                         config=config, seed=config.sim.seed,
                         metrics={f"gain_next/skew={s}": [float(g["a2a_ms_next"].iloc[0] / g["a2a_ms_next"].iloc[-1])]
                                  for s, g in frame.groupby("skew")},
                         extra={"note": "times are modeled (alpha-beta profile); volumes exact from routing masks"})
    cli.write_csv_and_record(frame, args.out_csv, record, args.out_record)
    for skew, g in frame.groupby("skew"):
        last = g.iloc[-1]
        print(f"skew {skew:g} (MaxVio {last['maxvio']:.2f}): {int(last['swaps'])} swaps"
              f"{' (converged)' if last['converged'] else ''}, HierMoE over HD-MoE (modeled) "
              f"{g['a2a_ms_same'].iloc[0] / last['a2a_ms_same']:.3f} on the routing planned on, "
              f"{g['a2a_ms_next'].iloc[0] / last['a2a_ms_next']:.3f} on the next iteration's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
