"""Model against measurement on the emulated cluster: every dispatcher of the HierMoE comparison
runs on an emulated N x G cluster (`impl.common.emu_cluster`, links shaped with tc), its dispatch
and combine timed apart (`layer_bench` timing=stages), and the cost model predicts both from the
emulated cluster's own calibrated profile (`impl.common.calibrate --emulate-rate`) and the exact
routing of the run (synthetic, rebuilt from the config).

    python -m impl.experiments.emu_validation overrides --config workflows/config/experiments/emu_validation.yaml \
        --topology 2x4 --routing zipf --variant hierd-es --profile cal-2x4.yaml   # the bench's --set flags
    python -m impl.experiments.emu_validation table --config ... --record r1.json ... \
        --profile 2x4=cal-2x4.yaml --profile 4x2=cal-4x2.yaml --out-csv emu_validation.csv

What predicts what (`predict`), a thin layer over `impl.hiermoe.dimension`, so a change of the
model there changes these numbers:
* flat (Megatron-LM): the H1 route of the no-dedup counts; HD2: the HD2 route of the dedup
  counts; HD-MoE (`hierd`) and HierMoE (`hierd` + `hierd-es` swaps): the route d* the model
  picks, on the counts under the placement the run used at each repeat (HierMoE's swaps change
  it), the median over repeats;
* Tutel-2DH and DeepSpeed-MoE: the padded equal slices: every rank sends E * C rows (C the
  largest per-expert count of any rank, their dropless mode), Tutel as an intra-node AlltoAll
  then an inter-node one of that whole buffer, DeepSpeed as one flat AlltoAll;
* the combine mirrors the dispatch (same volumes back), so the paper's model predicts it equal;
  the per-collective model (`impl.hiermoe.dimension.route_collectives`) charges
  each stage the collectives it issues (`MODEL_VERSION` says which one ran).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from statistics import median
from typing import Any

import torch

from impl.common import cli
from impl.common.calibrate import parse_sizes
from impl.common.config import ConfigError, build_config, to_dict
from impl.common.costmodel import HardwareProfile, load_profile
from impl.common.dispatcher import ExpertPlacement
from impl.common.records import atomic_output, read_records, summarize
from impl.hiermoe import dimension
from impl.experiments.emu_validation_config import (EmuValidationConfig, Variant, bench_config, bench_overrides,  # noqa: F401
                                                   load_config, uses_profile)
from impl.experiments.layer_bench import LayerBenchConfig, ResolvedBench, synthetic_routing_maps, validate

__all__ = ["Variant", "EmuValidationConfig", "load", "bench_config", "bench_overrides", "uses_profile", "predict", "validation_rows",
           "MODEL_VERSION", "main"]

MODEL_VERSION = "impl.hiermoe.dimension per-collective model (every collective, metadata included)"
PADDED = {"tutel-2dh": "2dh", "deepspeed-moe": "flat"}


def load(path: str | None, overrides: list[str] = ()) -> EmuValidationConfig:
    """The config, with every run's bench config resolved (a bad key fails here, one line)."""
    cfg = load_config(path, overrides)
    try:
        parse_sizes([cfg.calibration.sizes])
    except ValueError as e:
        raise ConfigError(f"calibration.sizes: {e}") from None
    for topology in cfg.topologies:
        for routing in cfg.routings:
            for variant in cfg.variants:
                try:
                    validate(bench_config(cfg, topology, routing, variant, profile=None), with_profile=False)
                except ConfigError as e:
                    raise ConfigError(f"run (topologies: {topology}, routings: {routing}, variants: {variant}): "
                                      f"{e}") from None
    return cfg


# ==========================================================================================
# prediction
# ==========================================================================================
def _padded_capacity(maps: list[torch.Tensor]) -> int:
    """C of the dropless equal-slice dispatchers: the largest per-expert count of any rank."""
    return max(int(m.sum(0).max()) for m in maps)


def _route_ms(maps, topo, placement, dim: int, dedup: bool, profile: HardwareProfile, row_bytes: int,
              agree: bool) -> tuple[float, float]:
    """(dispatch, combine) ms of the HD`dim` / H`dim` route by the model in impl.hiermoe.dimension."""
    counts = dimension.dispatch_counts(maps, topo, placement)
    cs = (dimension.flat_collectives(counts, row_bytes, with_levels=False) if dim == 1 and not dedup else
          dimension.route_collectives(counts, dim, dedup, row_bytes, with_levels=False))
    if agree:
        cs = (dimension.agreement_collective(topo), *cs)
    stage = lambda s: dimension.collectives_time([c for c in cs if c.stage == s and c.phase == "fwd"], profile)  # noqa: E731
    return stage("dispatch"), stage("combine")


def _chosen_dim(maps, topo, placement, profile, row_bytes) -> int:
    return dimension.choose_from_counts(dimension.dispatch_counts(maps, topo, placement), profile, row_bytes)


def _padded_ms(algorithm: str, topo, num_experts: int, capacity: int, profile: HardwareProfile,
               row_bytes: int) -> float:
    """One equal-slice exchange of the [E, C] buffer: flat, or Tutel's 2DH (intra-node AlltoAll of
    the whole buffer, then inter-node AlltoAll of it)."""
    n = num_experts * capacity * row_bytes
    if algorithm == "flat" or topo.num_nodes == 1 or topo.gpus_per_node == 1:
        return profile.comm_time("a2a", "flat", n)
    return profile.comm_time("a2a", "intra-1", n) + profile.comm_time("a2a", "inter-1", n)


def _link_load(maps, topo, placement, dim: int, dedup: bool, profile: HardwareProfile, row_bytes: int) -> dict:
    """A diagnostic beside the model, for the route's node-crossing step: the bytes its busiest
    node link carries (the most any node sends or receives across nodes, from the exact routing),
    the bytes the model's padded buffer (fan x largest split) puts on every node link, the total
    across nodes (what the traffic counters measure), and `busiest_link_ms`: the same calibration
    with that step charged by its busiest link instead of the padded buffer. An equal-split
    AlltoAll with per-rank buffer n puts n x gpus_per_node x (N - 1) / N bytes on each node link,
    flat or inter-node step alike; the other steps keep the model's charge."""
    counts = dimension.route_counts(maps, topo, placement, dedup)
    N, gpn = topo.num_nodes, topo.gpus_per_node
    out = {"busiest_link_ms": 0.0, "busiest_link_bytes": 0, "padded_link_bytes": 0, "cross_node_bytes": 0}
    for L, P in dimension.route_steps(topo, dim):
        step = dimension.step_name_of(topo, L, P)
        rows = dimension.holder_rows(counts, L, P)
        padded_n = (topo.U[L] // topo.U[P]) * int(rows.max()) * row_bytes
        out[f"model_{step}_ms"] = profile.comm_time("a2a", step, padded_n)   # the paper model's share of the step
        if P == 0 and N > 1:        # crosses nodes; holders are the origin ranks, node-major
            dest_node = torch.arange(rows.shape[1]) // (rows.shape[1] // N)
            src_node = torch.arange(rows.shape[0]) // gpn
            cross = (src_node.view(-1, 1) != dest_node.view(1, -1)) * rows
            per_node = torch.stack([torch.zeros(N, dtype=torch.int64).index_add_(0, src_node, cross.sum(1)),
                                    torch.zeros(N, dtype=torch.int64).index_add_(0, dest_node, cross.sum(0))])
            on_link = gpn * (N - 1) / N
            out["busiest_link_bytes"] = int(per_node.max()) * row_bytes
            out["padded_link_bytes"] = int(padded_n * on_link)
            out["cross_node_bytes"] = int(cross.sum()) * row_bytes
            out["busiest_link_ms"] += profile.comm_time("a2a", step, out["busiest_link_bytes"] / on_link)
        else:
            out["busiest_link_ms"] += profile.comm_time("a2a", step, padded_n)
    return out


def predict(rb: ResolvedBench, profile: HardwareProfile, placements: list[list[int]] | None = None) -> dict[str, Any]:
    """Predicted dispatch and combine ms of one bench config (synthetic routing), per repeat's
    placement (median), with the route the model used."""
    if rb.config.routing.source != "synthetic":
        raise ValueError("predict needs routing.source=synthetic (the routing must be rebuilt from the config)")
    dimension.check_profile(profile, rb.topology)
    maps, topo, E = synthetic_routing_maps(rb), rb.topology, rb.num_experts
    row_bytes = rb.hidden * torch.empty(0, dtype=getattr(torch, rb.config.dtype)).element_size()
    system = rb.config.system
    if system in PADDED:
        C = _padded_capacity(maps)
        t = _padded_ms(PADDED[system], topo, E, C, profile, row_bytes)
        n = E * C * row_bytes
        steps = (("flat",) if PADDED[system] == "flat" or topo.num_nodes == 1 or topo.gpus_per_node == 1
                 else ("intra-1", "inter-1"))
        link = int(E * C * row_bytes * topo.gpus_per_node * (topo.num_nodes - 1) / topo.num_nodes)
        # equal slices, padding included: every node link carries what the model charges
        return {"dispatch_ms": t, "combine_ms": t, "route": f"padded {PADDED[system]}, C={C}", "busiest_link_ms": t,
                "busiest_link_bytes": link, "padded_link_bytes": link, "cross_node_bytes": link * topo.num_nodes,
                **{f"model_{step}_ms": profile.comm_time("a2a", step, n) for step in steps}}
    outcomes = []
    for slots in placements or [list(range(E))]:
        placement = ExpertPlacement(tuple(slots))
        if system in ("flat", "megatron-flat"):
            dim, dedup = 1, False
        elif system == "hierd":
            dim, dedup = _chosen_dim(maps, topo, placement, profile, row_bytes), True
        elif system[:2] == "hd" and system[2:].isdigit():
            dim, dedup = int(system[2:]), True
        elif system[:1] == "h" and system[1:].isdigit():
            dim, dedup = int(system[1:]), False
        else:
            raise ValueError(f"no prediction for system {system!r}")
        outcomes.append((*_route_ms(maps, topo, placement, dim, dedup, profile, row_bytes, system == "hierd"),
                         dimension.variant_name(dim, dedup),
                         _link_load(maps, topo, placement, dim, dedup, profile, row_bytes)))
    keys = {k for o in outcomes for k in o[3]}            # model_<step>_ms: the steps of the routes taken
    loads = {k: median(o[3].get(k, 0.0) for o in outcomes) for k in keys}
    # the traffic counters add up every repeat: their mean per step is the mean over placements
    loads["cross_node_bytes"] = sum(o[3]["cross_node_bytes"] for o in outcomes) / len(outcomes)
    return {"dispatch_ms": median(o[0] for o in outcomes), "combine_ms": median(o[1] for o in outcomes),
            "route": "/".join(sorted({o[2] for o in outcomes})), **loads}


# ==========================================================================================
# the table
# ==========================================================================================
def _profiles(items: list[str]) -> dict[str, HardwareProfile]:
    out = {}
    for item in items:
        topology, sep, path = item.partition("=")
        if not sep or not topology or not path:
            raise ValueError(f"--profile {item!r}: expected TOPOLOGY=PATH")
        try:
            out[topology] = load_profile(path)
        except ValueError as e:
            raise ValueError(f"--profile {item!r}: {e}") from None
    return out


def _model_commit() -> str:
    """The last commit that changed the model (impl/hiermoe/dimension.py), or 'unknown'."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cs", "--", "impl/hiermoe/dimension.py"],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def group_runs(cfg: EmuValidationConfig, records: list[dict], profiles: dict[str, HardwareProfile]
               ) -> dict[tuple[str, str, str], list[dict]]:
    """The records by (topology, routing, variant) of the matrix, checked before any prediction:
    at least one, each a cell of the matrix, one config per cell, a profile for each topology."""
    if not records:
        raise ValueError("--record: no records given (or none matches the patterns)")
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        c = r["config"]
        variant = next((name for name, v in cfg.variants.items()
                        if v.system == c.get("system") and v.planner == c.get("planner")), None)
        routing = next((name for name, rs in cfg.routings.items() if to_dict(rs) == c.get("routing")), None)
        if variant is None or routing is None or c.get("topology") not in cfg.topologies:
            raise ValueError(f"--record: the record of {c.get('system')!r} on {c.get('topology')!r} with routing "
                             f"{c.get('routing')} is not in the validation matrix")
        by_key.setdefault((c["topology"], routing, variant), []).append(r)
    for (topology, routing, variant), runs in by_key.items():
        if len({json.dumps(r["config"], sort_keys=True) for r in runs}) != 1:
            raise ValueError(f"--record: the runs of {topology} / {routing} / {variant} have different configs")
        if topology not in profiles:
            raise ValueError(f"--profile: none given for topology {topology!r} (TOPOLOGY=PATH)")
        validate(build_config(LayerBenchConfig, None, [], base=runs[0]["config"]), with_profile=False)
    return by_key


def validation_rows(cfg: EmuValidationConfig, records: list[dict], profiles: dict[str, HardwareProfile]) -> list[dict]:
    """One row per (topology, routing, variant, stage): measured median (p5, p95, n), predicted,
    error = predicted / measured - 1, the route, and the run's network and host."""
    rows, commit = [], _model_commit()
    for (topology, routing, variant), runs in sorted(group_runs(cfg, records, profiles).items()):
        r = runs[0]
        rb = validate(build_config(LayerBenchConfig, None, [], base=r["config"]))
        pred = predict(rb, profiles[topology], [p for run in runs for p in run["extra"].get("placements", [])] or None)
        # per-step times exist in the runs that measured them: pool each quantity over those
        pooled = {k: summarize(v for run in runs if k in run["metrics"] for v in run["metrics"][k]["values"])
                  for k in {k for run in runs for k in run["metrics"]}}
        nets = [run["extra"].get("network", {}) for run in runs]
        net = nets[0]
        loads = [x for n in nets for x in (n.get("load_avg_before") or [None])[:1] + (n.get("load_avg_after") or [None])[:1]
                 if x is not None]
        for stage in ("dispatch", "combine"):
            m = pooled[f"{stage}_ms"]
            rows.append({"topology": topology, "routing": routing, "variant": variant,
                         "system": cfg.variants[variant].label or variant, "stage": stage,
                         "measured_ms": m["median"], "measured_p5_ms": m["p5"], "measured_p95_ms": m["p95"],
                         "repeats": m["n"], "runs": len(runs), "predicted_ms": pred[f"{stage}_ms"],
                         "error": pred[f"{stage}_ms"] / m["median"] - 1, "route": pred["route"],
                         "busiest_link_ms": pred["busiest_link_ms"],
                         "busiest_link_error": pred["busiest_link_ms"] / m["median"] - 1,
                         "busiest_link_bytes": pred["busiest_link_bytes"], "padded_link_bytes": pred["padded_link_bytes"],
                         "cross_node_bytes_modeled": pred["cross_node_bytes"],
                         "cross_node_bytes_measured": median(run["bytes_by_level"].get("node", 0) / 2 for run in runs),
                         "swap_ms": pooled.get("swap_ms", {}).get("median"),
                         "model_steps_ms": _steps(pred, "model_"),
                         "measured_steps_ms": _steps({k: v["median"] for k, v in pooled.items()}, f"{stage}_"),
                         "rate": net.get("rate") if net.get("emulated") else "loopback",
                         "network": "emulated" if net.get("emulated") else
                         f"fallback: {net['fallback_reason']}" if net.get("fallback_reason") else "loopback",
                         "load_1m_min": min(loads, default=None), "load_1m_max": max(loads, default=None),
                         "profile": profiles[topology].name, "model": MODEL_VERSION, "model_commit": commit,
                         "host": r["env"].get("hostname"), "date": max(run["timestamp"] for run in runs)[:10],
                         "git_sha": ",".join(sorted({run["git"].get("sha", "")[:12] for run in runs})),
                         "torch": r["env"].get("torch"), "cpus": r["env"].get("cpu_count")})
    return rows


def _steps(values: dict, prefix: str) -> str:
    """'inter-1=1830;intra-1=460': the per-step times under `prefix` (empty when none)."""
    steps = {k[len(prefix):-3]: v for k, v in values.items() if k.startswith(prefix) and k.endswith("_ms")
             and k[len(prefix):-3] in ("flat",) + tuple(f"{kind}-{i}" for kind in ("inter", "intra") for i in range(1, 9))}
    return ";".join(f"{step}={v:.0f}" for step, v in sorted(steps.items()))


def provenance(records: list[dict], profiles: dict[str, HardwareProfile]) -> list[str]:
    """Comment lines heading the CSV: where, when and with what the numbers were measured."""
    envs = {(r["env"]["hostname"], r["env"]["platform"], r["env"]["python"], r["env"]["torch"]) for r in records}
    shas = sorted({f"{r['git']['sha'][:12]}{' (dirty)' if r['git'].get('dirty') else ''}" for r in records})
    dates = sorted(r["timestamp"] for r in records)
    loads = [x for r in records for x in (r["extra"]["network"].get("load_avg_before", [None])[0],
                                          r["extra"]["network"].get("load_avg_after", [None])[0]) if x is not None]
    nets = {json.dumps({k: r["extra"]["network"].get(k) for k in ("emulated", "rate", "burst", "latency", "intra_rate",
                                                                  "fallback_reason")}, sort_keys=True) for r in records}
    out = ["tier: emu (impl.experiments.layer_bench timing=stages on an emulated cluster, impl.common.emu_cluster)",
           "command: make emu (snakemake emu_validation; python -m impl.experiments.emu_validation table)",
           f"measured: {dates[0]} .. {dates[-1]}",
           *(f"host: {h}; {plat}; python {py}; torch {torch}" for h, plat, py, torch in sorted(envs)),
           f"git: {', '.join(shas)}", *(f"network: {n}" for n in sorted(nets)),
           f"host load (1-min average, before/after each run): {min(loads):.1f} .. {max(loads):.1f}" if loads else
           "host load: not recorded",
           f"model: {MODEL_VERSION}, last changed {_model_commit()}",
           *(f"profile {t}: {p.name}, {p.source}" for t, p in sorted(profiles.items()))]
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m impl.experiments.emu_validation", description=cli.describe(__doc__))
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overrides", help="print the layer bench's --set flags of one run")
    t = sub.add_parser("table", help="measured vs predicted CSV from the runs' records")
    for s in (o, t):
        s.add_argument("--config", required=True, type=cli.input_file, help="EmuValidationConfig YAML")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    o.add_argument("--topology", required=True)
    o.add_argument("--routing", required=True)
    o.add_argument("--variant", required=True)
    o.add_argument("--profile", default=None, type=cli.input_file, help="calibrated profile (hierd / hierd-es)")
    t.add_argument("--record", nargs="+", required=True, help="layer bench records of the matrix")
    t.add_argument("--profile", action="append", default=[], metavar="TOPOLOGY=PATH", help="calibrated profiles")
    t.add_argument("--out-csv", required=True, type=cli.output_path)
    args = p.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        if args.cmd == "overrides":
            for key, allowed in (("topology", cfg.topologies), ("routing", cfg.routings), ("variant", cfg.variants)):
                if getattr(args, key) not in allowed:
                    raise ConfigError(f"--{key}: {getattr(args, key)!r} is not allowed; allowed: {', '.join(allowed)}")
            print(" ".join(f"--set {item}" for item in
                           bench_overrides(cfg, args.topology, args.routing, args.variant, args.profile)))
            return 0
        profiles = _profiles(args.profile)
        records = []
        for path in args.record:
            try:
                records += read_records(path)
            except (ValueError, OSError) as e:
                raise ValueError(f"--record: {e}") from None
        group_runs(cfg, records, profiles)
    except cli.INPUT_ERRORS as e:
        return cli.fail(p, e)
    import pandas as pd

    frame = pd.DataFrame(validation_rows(cfg, records, profiles))
    with atomic_output(args.out_csv) as tmp:
        with open(tmp, "w") as f:
            f.write("".join(f"# {line}\n" for line in provenance(records, profiles)))
            frame.to_csv(f, index=False)
    print(frame[["topology", "routing", "variant", "stage", "measured_ms", "predicted_ms", "error"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
