"""Measured cost of one expert swap on local gloo ranks (tier emu), beside what the sim tier's
model charges for it on the same machine.

    python -m impl.experiments.hiermoe.swap_measure --profile results/raw/calibration/2x2-gloo.yaml \
        --set model=qwen3-30b-a3b-32l --out-csv swap.csv --out-record swap.json

What a HierD-ES swap moves (`impl.common.expert_migration.migrate_experts`, after the optimizer
step, gradients consumed): each of the two experts' bf16 weights, fp32 master weights and Adam
moments, one AlltoAll in which the two owners exchange them. Measured here with experts of the
model's real shape (Qwen3-30B-A3B: 3 x 2048 x 768 parameters, 66 MB per expert): one pair across
the topology's coarsest level ("across nodes": ranks 0 and G/2) and one inside the finest group
(ranks 0 and 1), `repeats` timed swaps each (swapping back and forth), each the slowest rank's
wall time between two barriers, and the bare AlltoAll of the same bytes between the same ranks
(`transport_ms`: what the link costs without packing and the state check). Beside each: the bytes per expert the model assumes
(`sim.expert_state_bytes`, 14 per parameter) against those the migration sent, and the modeled
time (`sim.p2p_time`) with this machine's calibrated alpha-beta profile, so the report can say
whether the model's "what moves and over which link" holds where it can be measured.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import pandas as pd
import torch

from impl.common import cli
from impl.common.config import (MAX_RANKS, MAX_REPEATS, SEED_MAX, ConfigError, bounded, check_host_memory,
                                 checked)
from impl.common.costmodel import load_profile
from impl.common.dispatcher import ExpertPlacement
from impl.common.experts import GroupedExperts
from impl.common.expert_migration import MIGRATION_CATEGORY, migrate_experts
from impl.common.launcher import launch
from impl.common.models import get_model
from impl.common.records import make_record
from impl.common.topology import get_topology
from impl.hiermoe.dimension import check_profile
from impl.experiments.hiermoe.sim import expert_state_bytes, p2p_time

__all__ = ["SwapMeasureConfig", "measure_rank", "main"]


@dataclass(frozen=True)
class SwapMeasureConfig:
    model: str = "qwen3-30b-a3b-32l"    # expert shape (hidden, moe_ffn_hidden, ffn kind)
    topology: str = "2x2"               # local gloo ranks; the profile must be calibrated for it
    profile: str = ""                   # calibrated profile YAML of this machine (required)
    repeats: int = bounded(5, ge=1, le=MAX_REPEATS)
    warmup: int = bounded(1, ge=0, le=MAX_REPEATS)
    seed: int = bounded(0, ge=0, le=SEED_MAX - MAX_RANKS)


def _pairs(G: int) -> list[tuple[str, int, int]]:
    return [("across the coarsest level", 0, G // 2), ("inside the finest group", 0, 1)]


def _transport_ms(comm, a: int, b: int, nbytes: int) -> float:
    """The slowest rank's time of the bare AlltoAll in which ranks a and b exchange `nbytes` (what a
    swap's migration sends, without packing, unpacking and the state-agreement check)."""
    G = comm.world_size
    send = [0] * G
    if comm.rank in (a, b):
        send[b if comm.rank == a else a] = 1
    buf = torch.zeros(sum(send), nbytes, dtype=torch.uint8)
    comm.barrier()
    start = time.perf_counter()
    comm.all_to_all(buf, send, send, category="probe")
    comm.barrier()
    elapsed = time.perf_counter() - start
    return float(comm.reduce_on_host(torch.tensor([elapsed], dtype=torch.float64), "max")) * 1e3


def measure_rank(comm, cfg: SwapMeasureConfig, hidden: int, ffn_hidden: int, kind: str) -> list[dict]:
    """On every rank: one expert per rank in bf16 with fp32 master weights under Adam (state
    created by one step, gradients then dropped), then timed swaps of each measured pair."""
    G = comm.world_size
    torch.manual_seed(cfg.seed + comm.rank)
    experts = GroupedExperts(1, hidden, ffn_hidden, kind=kind).to(torch.bfloat16)
    masters = {f"master.{n}": p.detach().float().clone().requires_grad_(True) for n, p in experts.named_parameters()}
    opt = torch.optim.Adam(masters.values(), lr=1e-3)
    for m in masters.values():
        m.grad = torch.ones_like(m)
    opt.step()
    opt.zero_grad(set_to_none=True)
    rows = []
    for label, a, b in _pairs(G):
        base = ExpertPlacement.identity(G)
        swapped = base.swap(a, b)
        placements = [base, swapped]
        for r in range(cfg.warmup + cfg.repeats):
            old, new = placements[r % 2], placements[(r + 1) % 2]
            comm.traffic.reset()
            comm.barrier()
            start = time.perf_counter()
            result = migrate_experts(comm, experts, old, new, optimizer=opt, extra_tensors=masters)
            comm.barrier()
            elapsed = time.perf_counter() - start
            slowest = float(comm.reduce_on_host(torch.tensor([elapsed], dtype=torch.float64), "max"))
            sent = comm.total_traffic().by_level("bytes", MIGRATION_CATEGORY, None)
            transport = _transport_ms(comm, a, b, result.row_bytes)
            if r >= cfg.warmup:
                rows.append({"pair": label, "src": a, "dst": b, "repeat": r - cfg.warmup, "measured_ms": slowest * 1e3,
                             "transport_ms": transport, "bytes_per_expert": result.row_bytes,
                             "bytes_sent": sum(sent.values()), "link_level": comm.topology.link_name(a, b)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m impl.experiments.hiermoe.swap_measure", __doc__, config=SwapMeasureConfig,
                        outputs=("csv", "record"))
    parser.add_argument("--profile", dest="profile_path", type=cli.input_file,
                        help="calibrated profile YAML (overrides profile=)")
    args = parser.parse_args(argv)
    try:
        cfg = cli.load_config(args, SwapMeasureConfig)
        if args.profile_path:
            cfg = SwapMeasureConfig(**{**cfg.__dict__, "profile": args.profile_path})
        if not cfg.profile:
            raise ConfigError("profile: a calibrated profile YAML of this machine is required "
                              "(python -m impl.common.calibrate)")
        model = checked("model", get_model, cfg.model)
        topo = checked("topology", get_topology, cfg.topology)
        if topo.G < 2:
            raise ConfigError(f"topology: {topo.name!r} has one rank; a swap needs at least 2")
        profile = checked("profile", load_profile, cfg.profile)
        try:
            check_profile(profile, topo)
        except ValueError as e:
            raise ConfigError(f"profile: {e}") from None
        # every rank: one expert in bf16, its fp32 master weights and Adam's two moments
        check_host_memory(topo.G * 18 * 3 * model.hidden * model.moe_ffn_hidden, "model", f"the {topo.G} ranks")
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    kind = "swiglu" if model.ffn_kind == "swiglu" else "gpt"
    results = launch(measure_rank, topo.G, args=(cfg, model.hidden, model.moe_ffn_hidden, kind), topology=topo,
                     timeout_s=300, deadline_s=900)
    frame = pd.DataFrame(results[0])
    model_bytes = expert_state_bytes(model)
    frame["bytes_per_expert_model"] = model_bytes
    frame["modeled_ms"] = [p2p_time(profile, topo, a, b, model_bytes) for a, b in zip(frame["src"], frame["dst"])]
    for key, value in (("tier", "emu"), ("model", model.name), ("topology", topo.name), ("profile", profile.name),
                       ("profile_path", cfg.profile)):
        frame[key] = value
    metrics = {f"swap_ms/{label}": g["measured_ms"].tolist() for label, g in frame.groupby("pair", sort=False)}
    record = make_record(experiment="hiermoe_swap_measure", system="expert-migration", tier="emu", topology=topo,
                         model={"name": model.name, "hidden": model.hidden, "moe_ffn_hidden": model.moe_ffn_hidden},
                         config=cfg, metrics=metrics, seed=cfg.seed,
                         extra={"note": "measured on local gloo ranks; modeled_ms from the calibrated profile"})
    cli.write_csv_and_record(frame, args.out_csv, record, args.out_record)
    for label, g in frame.groupby("pair", sort=False):
        print(f"{label}: measured {g['measured_ms'].median():.1f} ms (bare AlltoAll {g['transport_ms'].median():.1f} ms), "
              f"modeled {g['modeled_ms'].iloc[0]:.1f} ms, "
              f"{int(g['bytes_per_expert'].iloc[0])} bytes per expert (model: {model_bytes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
