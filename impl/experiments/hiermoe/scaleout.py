"""Beyond the paper: the AlltoAll speedup of every system over Megatron-LM from 32 to 1,024 GPUs
(8 per node, hierarchies of D = 2..4 levels), with the GPU counts where one system overtakes
another (crossovers). Sim tier: volumes exact from sampled routing, times MODELED.

    python -m impl.experiments.hiermoe.scaleout --config workflows/config/experiments/hiermoe_scaleout.yaml \
        --out-csv scaleout.csv --out-record scaleout.json

Setting [ours; the paper stops at 32 GPUs]: Qwen3-30B-A3B's layer (hidden 2048 in bf16, top-8,
fp32 gate weights), EP = G with `experts_per_gpu` experts per GPU (E = 4 G by default, Qwen3's 128
at 32 GPUs), 1024 tokens per GPU routed uniformly at random (the fitted skew of the main runs is
0), `seeds` samples per point. The hierarchies, 8 GPUs per node:
D = 2: node > gpu(8); D = 3: node > socket(2) > gpu(4); D = 4: node > socket(2) > pcie-pair(2) > gpu(2).

Hardware model: the HierMoE testbed's Fig. 9 constants, EXTRAPOLATED to more nodes (an
assumption, labelled as such in every output). Steps inside a node keep the testbed's constants of
the same level (D = 3's socket is the testbed's socket; D = 2's node step is its Intra-1). Steps
that cross nodes scale with the number of peers and the share of the buffer that crosses the
network: alpha(f) = a + b f through the testbed's fan-4 inter-node and fan-32 flat fits (start-up
grows with peers), and beta grows with the share of a rank's buffer that leaves its node,
relative to the same share on the testbed ((N-1)/N against 3/4 for Inter-1; (G-8)/G against 24/32
for the flat AlltoAll). Systems without a planner only (HierD-ES' tables grow as E^2: E = 4,096 at
1,024 GPUs): Megatron-LM, Tutel-2DH (capacity factor 1.0), H2, HD2-MoE, HD-MoE, DeepEP and DeepEP
with pipelining.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm import tqdm

from baselines.deepep import deepep_time
from baselines.tutel_2dh.dispatcher import tutel_2dh_collectives, tutel_capacity
from impl.common import cli
from impl.common.config import MAX_RANKS, MAX_REPEATS, MAX_TOKENS, ConfigError, bounded, check_host_memory, checked
from impl.common.costmodel import HardwareProfile, LinearModel, load_profile, topology_steps
from impl.common.models import get_model
from impl.common.records import make_record
from impl.common.topology import Level, Topology
from impl.hiermoe.dimension import (agreement_bytes, allreduce_time, collective_time, counts_from_slots, flat_time,
                                    iteration_times, route_time, select_dimension)

__all__ = ["ScaleoutConfig", "scaleout_topology", "scaleout_profile", "uniform_slots", "run", "crossovers", "main"]

SYSTEMS = ("Megatron-LM", "Tutel-2DH", "H2", "HD2-MoE", "HD-MoE", "DeepEP", "DeepEP[overlap=true]")
GPUS_PER_NODE = 8
INSIDE = {2: (("gpu", 8),), 3: (("socket", 2), ("gpu", 4)), 4: (("socket", 2), ("pcie-pair", 2), ("gpu", 2))}


@dataclass(frozen=True)
class ScaleoutConfig:
    model: str = "qwen3-30b-a3b-32l"
    gpus: tuple[int, ...] = bounded((32, 64, 128, 256, 512, 1024), ge=2 * GPUS_PER_NODE, le=MAX_RANKS)
    depths: tuple[int, ...] = bounded((2, 3, 4), ge=min(INSIDE), le=max(INSIDE))
    experts_per_gpu: int = bounded(4, ge=1, le=1024)
    tokens_per_rank: int = bounded(1024, ge=1, le=MAX_TOKENS)
    bytes_per_elem: int = bounded(2, ge=1, le=16)
    weight_bytes: int = bounded(4, ge=1, le=16)
    seeds: int = bounded(3, ge=1, le=MAX_REPEATS)
    base_profile: str = "hiermoe-testbed"


def scaleout_topology(gpus: int, depth: int) -> Topology:
    if depth not in INSIDE:
        raise ConfigError(f"depths: {depth} is not allowed; allowed: {', '.join(map(str, INSIDE))}")
    if gpus % GPUS_PER_NODE or gpus < 2 * GPUS_PER_NODE:
        raise ConfigError(f"gpus: {gpus} is not allowed; allowed: a multiple of {GPUS_PER_NODE}, at least 16")
    levels = (Level("node", gpus // GPUS_PER_NODE, "InfiniBand"),) + tuple(Level(n, f) for n, f in INSIDE[depth])
    return Topology(f"hier:node={gpus // GPUS_PER_NODE}," + ",".join(f"{n}={f}" for n, f in INSIDE[depth]), levels)


def scaleout_profile(topology: Topology, base: HardwareProfile) -> HardwareProfile:
    """The testbed's constants extrapolated to `topology` (module docstring)."""
    a2a = lambda step: base.comm_model("a2a", step)  # noqa: E731
    f_inter, f_flat = 4, 32
    b = (a2a("flat").alpha_ms - a2a("inter-1").alpha_ms) / (f_flat - f_inter)
    a = a2a("inter-1").alpha_ms - b * f_inter
    N, G = topology.num_nodes, topology.G
    inside = {2: {"intra-1": "intra-1"},
              3: {"intra-1": "intra-1", "inter-2": "inter-2", "intra-2": "intra-2"},
              4: {s: s for s in ("intra-1", "inter-2", "intra-2", "inter-3", "intra-3")}}[topology.D]
    comm = {("a2a", step): a2a(same) for step, same in inside.items()}
    comm[("a2a", "inter-1")] = LinearModel(a + b * N, a2a("inter-1").beta_ms * ((N - 1) / N) / (3 / 4))
    comm[("a2a", "flat")] = LinearModel(a + b * G, a2a("flat").beta_ms * ((G - GPUS_PER_NODE) / G) / (24 / 32))
    assert set(s for _, s in comm) == set(topology_steps(topology))
    return HardwareProfile(name=f"{base.name}-extrapolated@{topology.name}", topology=topology.name,
                           source=f"{base.name} constants extrapolated (impl.experiments.hiermoe.scaleout)",
                           notes="EXTRAPOLATED: an assumption, see impl.experiments.hiermoe.scaleout", comm=comm)


def uniform_slots(num_tokens: int, num_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Every token's top-K distinct slots, uniformly at random, ascending: [N, K]."""
    ids = torch.randint(num_experts, (num_tokens, top_k), generator=generator)
    while True:
        ids = torch.sort(ids, dim=1).values
        dup = torch.zeros_like(ids, dtype=torch.bool)
        dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
        if not bool(dup.any()):
            return ids
        ids[dup] = torch.randint(num_experts, (int(dup.sum()),), generator=generator)


def _times(topo: Topology, profile: HardwareProfile, counts, cfg: ScaleoutConfig, row_bytes: int, E: int, K: int):
    wb = cfg.weight_bytes
    agree = allreduce_time(profile, agreement_bytes(topo))
    times = iteration_times(counts, profile, row_bytes, wb)
    d = select_dimension(times)
    C = tutel_capacity(cfg.tokens_per_rank, E, K, 1.0)
    return {"Megatron-LM": (flat_time(counts, profile, row_bytes, wb), 1),
            "Tutel-2DH": (sum(collective_time(c, profile) for c in
                              tutel_2dh_collectives(topo, E, C, row_bytes, with_levels=False)), 2),
            "H2": (route_time(counts, 2, False, profile, row_bytes, wb), 2),
            "HD2-MoE": (route_time(counts, 2, True, profile, row_bytes, wb), 2),
            "HD-MoE": (times[d] + agree, d),
            "DeepEP": (deepep_time(counts, profile, row_bytes, wb), 2),
            "DeepEP[overlap=true]": (deepep_time(counts, profile, row_bytes, wb, overlap=True), 2)}


def run(cfg: ScaleoutConfig, progress: bool | None = None) -> pd.DataFrame:
    model = checked("model", get_model, cfg.model)
    base = load_profile(cfg.base_profile)
    row_bytes = model.hidden * cfg.bytes_per_elem
    points = [(g, d) for d in cfg.depths for g in cfg.gpus]
    for g, d in points:
        scaleout_topology(g, d)
    rows = []
    for g, d in tqdm(points, desc="scale-out", disable=None if progress is None else not progress):
        topo = scaleout_topology(g, d)
        profile = scaleout_profile(topo, base)
        E, K = cfg.experts_per_gpu * g, model.top_k
        for seed in range(cfg.seeds):
            gen = torch.Generator().manual_seed(seed * 100003 + g * 10 + d)
            slots = uniform_slots(g * cfg.tokens_per_rank, E, K, gen)
            origin = torch.arange(g).repeat_interleave(cfg.tokens_per_rank)
            counts = counts_from_slots(slots, origin, topo, E)
            for system, (ms, dim) in _times(topo, profile, counts, cfg, row_bytes, E, K).items():
                rows.append({"G": g, "D": d, "nodes": g // GPUS_PER_NODE, "E": E, "K": K, "seed": seed,
                             "system": system, "a2a_ms": ms, "dim": dim, "topology": topo.name,
                             "profile": profile.name, "tier": "sim", "hardware": "EXTRAPOLATED testbed constants"})
    frame = pd.DataFrame(rows)
    base_ms = frame[frame.system == "Megatron-LM"].set_index(["G", "D", "seed"])["a2a_ms"]
    frame["speedup"] = [base_ms[(r.G, r.D, r.seed)] / r.a2a_ms for r in frame.itertuples()]
    return frame


def crossovers(frame: pd.DataFrame, pairs=(("Tutel-2DH", "Megatron-LM"), ("HD-MoE", "DeepEP"),
                                           ("HD-MoE", "DeepEP[overlap=true]"), ("HD-MoE", "HD2-MoE"),
                                           ("H2", "Megatron-LM"))) -> pd.DataFrame:
    """Per depth and pair (a, b): the median time ratio b / a at every G and the first G at which a
    becomes faster than b, or stops being faster (None when the order never changes)."""
    med = frame.groupby(["D", "G", "system"])["a2a_ms"].median()
    rows = []
    for D in sorted(frame["D"].unique()):
        for a, b in pairs:
            ratios = {g: med[(D, g, b)] / med[(D, g, a)] for g in sorted(frame["G"].unique())}
            gs = sorted(ratios)
            change = [(g0, g1) for g0, g1 in zip(gs, gs[1:]) if (ratios[g0] > 1) != (ratios[g1] > 1)]
            rows.append({"D": int(D), "faster": a, "than": b,
                         **{f"G={g}": ratios[g] for g in gs},
                         "crossover": "none" if not change else
                         "; ".join(f"between {g0} and {g1} ({'a overtakes' if ratios[g1] > 1 else 'b overtakes'})"
                                   for g0, g1 in change)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m impl.experiments.hiermoe.scaleout", __doc__, config=ScaleoutConfig,
                        outputs=("csv", "record"), progress=True)
    args = parser.parse_args(argv)
    try:
        cfg = cli.load_config(args, ScaleoutConfig)
        for key in ("gpus", "depths"):
            if not getattr(cfg, key):
                raise ConfigError(f"{key}: an empty list is not allowed")
        for g in cfg.gpus:
            for d in cfg.depths:
                scaleout_topology(g, d)
        model = checked("model", get_model, cfg.model)
        # the largest point's token slots and counts (int64)
        check_host_memory(32 * max(cfg.gpus) * cfg.tokens_per_rank * max(1, model.top_k), "gpus, tokens_per_rank")
        checked("base_profile", load_profile, cfg.base_profile)
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    frame = run(cfg, progress=False if args.no_progress else None)
    metrics = {f"speedup/{s}/D={d}/G={g}": grp["speedup"].tolist()
               for (s, d, g), grp in frame.groupby(["system", "D", "G"])}
    record = make_record(experiment="hiermoe_scaleout", system=",".join(SYSTEMS), tier="sim",
                         topology={"name": "scale-out", "gpus": list(cfg.gpus), "depths": list(cfg.depths)},
                         model={"name": cfg.model, "experts_per_gpu": cfg.experts_per_gpu},
                         config=dataclasses.asdict(cfg), metrics=metrics, seed=0,
                         extra={"note": "times MODELED with EXTRAPOLATED testbed constants; routing uniform"})
    cli.write_csv_and_record(frame, args.out_csv, record, args.out_record)
    print(crossovers(frame).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
