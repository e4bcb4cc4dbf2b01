"""FSMoE measured in the emu tier: the real layer (`impl.fsmoe.FSMoELayer`) on local gloo ranks,
forward and hand-written backward, under FSMoE's three-lane schedule and the sequential one
(DeepSpeed-MoE's), at a reduced width; beside each measurement the prediction of the same
schedule from a calibration of this machine (the profile the calibration CLI wrote for the same
topology), task by task.

    python -m impl.experiments.fsmoe.emu --profile resources/calibration/fsmoe-2x2-gloo.yaml \\
        --out-csv emu.csv --out-record emu.json

Per schedule it records the span the prediction covers, measured: the forward and backward
pipelines (dispatch .. combine, with the gradient slice) from the executor's own timelines, summed,
the slowest rank's, median over repeats, beside the simulated makespans of the same two schedules;
the whole layer's wall time (gate, Order / I-Order, the capacity all-reduce, autograd and the
barriers included, none of them predicted) beside it as `wall_ms`; and per task the median measured
duration beside the profile's prediction. On a machine with fewer cores than ranks x lanes the lanes contend for the
CPU, which the model (one device per lane) does not see; the record states the host's cores.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch

from impl.common import cli
from impl.common.comm import Comm
from impl.common.config import (MAX_EXPERTS, MAX_REPEATS, MAX_SECONDS, MAX_TOKENS, MAX_WIDTH, SEED_MAX, ConfigError,
                                 bounded, check_host_memory, checked)
from impl.common.costmodel import HardwareProfile, load_profile
from impl.common.launcher import launch
from impl.common.records import make_record
from impl.common.timeline import simulate
from impl.common.topology import get_topology
from impl.fsmoe.config import MAX_DEGREE, MoELayerConfig
from impl.fsmoe.costs import ChunkModel, PassModel
from impl.fsmoe.layer import FSMoELayer
from impl.fsmoe.layout import HybridLayout
from impl.fsmoe.schedules import LANES_3, LANES_SEQUENTIAL, fsmoe_pass

__all__ = ["EmuConfig", "SCHEDULES", "check", "validate", "pass_model", "run", "main"]

PROG = "python -m impl.experiments.fsmoe.emu"
# schedule name -> (lanes, whether the degrees are forced to 1)
SCHEDULES = {"fsmoe": (LANES_3, False), "sequential": (LANES_SEQUENTIAL, True)}


def _schedules(name: str):
    lanes, _ = SCHEDULES[name]
    return lambda c: {"fwd": fsmoe_pass(c.r_fwd, lanes=lanes), "bwd": fsmoe_pass(c.r_bwd, lanes=lanes, gradient_slice=True)}


@dataclass(frozen=True)
class EmuConfig:
    topology: str = "2x2"
    hidden: int = bounded(256, ge=1, le=MAX_WIDTH)
    ffn_hidden: int = bounded(1024, ge=1, le=MAX_WIDTH)
    num_experts: int = bounded(2, ge=1, le=MAX_EXPERTS)
    top_k: int = bounded(2, ge=1, le=MAX_EXPERTS)
    capacity_factor: float = bounded(1.2, gt=0, le=1000)
    expert: Literal["gpt", "mixtral"] = "gpt"
    tokens_per_rank: int = bounded(512, ge=1, le=MAX_TOKENS)
    r_fwd: int = bounded(4, ge=1, le=MAX_DEGREE)
    r_bwd: int = bounded(2, ge=1, le=MAX_DEGREE)
    gradient_elements: int = bounded(262144, ge=1, le=1 << 32)   # the dense gradient slice all-reduced in the backward
    repeats: int = bounded(5, ge=1, le=MAX_REPEATS)
    warmup: int = bounded(2, ge=0, le=MAX_REPEATS)
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    timeout_s: float = bounded(120.0, gt=0, le=MAX_SECONDS)


def pass_model(profile: HardwareProfile, layout: HybridLayout, cfg: MoELayerConfig, capacity: int,
               bytes_per_elem: int, backward: bool) -> PassModel:
    """The profile's chunk models for this layer's sizes (`layout.sizes`), GEMM work in MACs."""
    sizes = layout.sizes(cfg, capacity)

    def comm(kind: str, step: str, elements: int) -> ChunkModel:
        m = profile.comm_model(kind, step)
        return ChunkModel(m.alpha_ms, m.beta_ms * elements * bytes_per_elem)

    gemm = profile.compute_model("gemm")
    factor = 2.0 if backward else 1.0
    return PassModel(comm("a2a", "inter-1", sizes.n_a2a), comm("allgather", "intra-1", sizes.n_ag),
                     comm("reducescatter", "intra-1", sizes.n_rs),
                     ChunkModel(factor * cfg.gemms * gemm.alpha_ms, factor * gemm.beta_ms * sizes.n_exp))


def _rank(comm: Comm, cfg: EmuConfig, schedule: str) -> dict:
    layer_cfg = _layer_config(cfg, schedule)
    torch.manual_seed(cfg.seed)
    layer = FSMoELayer(comm, layer_cfg, seed=cfg.seed, schedules=_schedules(schedule))
    layer.gradient_slice = torch.zeros(cfg.gradient_elements)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + comm.rank)
    x = torch.randn(cfg.tokens_per_rank, cfg.hidden, generator=g).requires_grad_(True)
    walls, spans, tasks = [], [], {}
    for step in range(cfg.warmup + cfg.repeats):
        comm.barrier()
        t0 = time.perf_counter()
        layer(x).square().mean().backward()
        comm.barrier()
        if step >= cfg.warmup:
            walls.append((time.perf_counter() - t0) * 1e3)
            spans.append(sum(tl.makespan for tl in layer.last_timelines.values()))
            for phase, tl in layer.last_timelines.items():
                for row in tl.rows():
                    tasks.setdefault((phase, row["task"]), []).append(row["duration_ms"])
    return {"walls": walls, "spans": spans, "tasks": tasks, "capacity": layer.last_capacity}


def _layer_config(cfg: EmuConfig, schedule: str = "fsmoe") -> MoELayerConfig:
    r_fwd, r_bwd = (1, 1) if SCHEDULES[schedule][1] else (cfg.r_fwd, cfg.r_bwd)
    return MoELayerConfig(hidden=cfg.hidden, ffn_hidden=cfg.ffn_hidden, num_experts=cfg.num_experts, top_k=cfg.top_k,
                          capacity_factor=cfg.capacity_factor, expert=cfg.expert, r_fwd=r_fwd, r_bwd=r_bwd,
                          gate_options={"noise_seed": cfg.seed})


def check(cfg: EmuConfig) -> HybridLayout:
    """What the config alone decides (topology, this host's memory, the layer's layout), before
    the calibration it is run with exists."""
    topo = checked("topology", get_topology, cfg.topology)
    # every rank on this host: at most every expert's weights, the routed tokens' activations
    # (forward and backward), the gradient slice
    routed = cfg.tokens_per_rank * cfg.top_k * max(1.0, cfg.capacity_factor)
    check_host_memory(4 * topo.G * (3 * cfg.num_experts * cfg.hidden * cfg.ffn_hidden
                                    + 8 * routed * (cfg.hidden + cfg.ffn_hidden) + 2 * cfg.gradient_elements),
                      "num_experts, hidden, ffn_hidden, tokens_per_rank, gradient_elements", f"the {topo.G} ranks")
    return HybridLayout.of(topo, _layer_config(cfg))


def validate(cfg: EmuConfig, profile_path: str) -> tuple[HardwareProfile, HybridLayout]:
    """`check`, and the profile: a calibration of the same topology with every model the prediction uses."""
    layout = check(cfg)
    profile = checked("profile", load_profile, profile_path)
    if profile.topology != layout.topology.name:
        raise ConfigError(f"profile: {profile.name!r} is of topology {profile.topology!r}; allowed: a calibration of "
                          f"{layout.topology.name!r}")
    for kind, step in (("a2a", "inter-1"), ("allgather", "intra-1"), ("reducescatter", "intra-1"),
                       ("allreduce", "inter-1")):
        profile.comm_model(kind, step)
    profile.compute_model("gemm")
    return profile, layout


def run(cfg: EmuConfig, profile: HardwareProfile, layout: HybridLayout) -> pd.DataFrame:
    topo = get_topology(cfg.topology)
    rows = []
    for name in SCHEDULES:
        layer_cfg = _layer_config(cfg, name)
        per_rank = launch(_rank, topo.G, args=(cfg, name), topology=topo, timeout_s=cfg.timeout_s, deadline_s=1800)
        capacity = per_rank[0]["capacity"]
        schedules = _schedules(name)(layer_cfg)
        ar = profile.comm_model("allreduce", "inter-1").time_ms(cfg.gradient_elements * 4)
        predicted = {}
        for phase, sched in schedules.items():
            model = pass_model(profile, layout, layer_cfg, capacity, 4, phase == "bwd").with_gar(ar)
            r = sum(1 for t in sched.tasks if t.kind == "dispatch")
            filled = sched.with_durations(lambda t: model.duration(t.kind, r))
            predicted[phase] = simulate(filled)
            for t in filled.tasks:
                measured = statistics.median(x for rank in per_rank for x in rank["tasks"][(phase, t.name)])
                rows.append({"schedule": name, "phase": phase, "task": t.name, "kind": t.kind,
                             "measured_ms": measured, "predicted_ms": t.duration})
        slowest = {key: statistics.median(max(rank[key][i] for rank in per_rank) for i in range(cfg.repeats))
                   for key in ("spans", "walls")}
        rows.append({"schedule": name, "phase": "fwd+bwd", "task": "layer", "kind": "layer",
                     "measured_ms": slowest["spans"], "wall_ms": slowest["walls"],
                     "predicted_ms": predicted["fwd"].makespan + predicted["bwd"].makespan})
    frame = pd.DataFrame(rows)
    frame["error_pct"] = 100 * (frame["predicted_ms"] / frame["measured_ms"] - 1)
    frame["tier"] = "emu"
    frame["host_cores"] = os.cpu_count()
    frame["profile"] = profile.name
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(PROG, __doc__, config=EmuConfig, outputs=("csv", "record"))
    parser.add_argument("--profile", required=True, type=cli.input_file,
                        help="calibrated profile YAML of this machine and topology")
    args = parser.parse_args(argv)
    try:
        cfg = cli.load_config(args, EmuConfig)
        profile, layout = validate(cfg, args.profile)
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    frame = run(cfg, profile, layout)
    layer = frame[frame.task == "layer"].set_index("schedule")
    record = make_record(experiment="fsmoe_emu", system="FSMoE,DS-MoE (sequential)", tier="emu",
                         topology=get_topology(cfg.topology), model={"hidden": cfg.hidden, "ffn_hidden": cfg.ffn_hidden,
                                                                     "num_experts": cfg.num_experts},
                         config=cfg, metrics={f"layer_ms/{s}": [float(v)] for s, v in layer["measured_ms"].items()},
                         seed=cfg.seed, extra={"profile": profile.name, "predicted_ms": layer["predicted_ms"].to_dict()})
    cli.write_csv_and_record(frame, args.out_csv, record, args.out_record)
    for name, row in layer.iterrows():
        print(f"{name:>10}: measured {row.measured_ms:8.2f} ms, predicted {row.predicted_ms:8.2f} ms "
              f"({row.error_pct:+.0f}%)")
    if {"fsmoe", "sequential"} <= set(layer.index):
        print(f"FSMoE over sequential: measured {layer.measured_ms['sequential'] / layer.measured_ms['fsmoe']:.2f}x, "
              f"predicted {layer.predicted_ms['sequential'] / layer.predicted_ms['fsmoe']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
