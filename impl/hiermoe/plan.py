"""Plan one MoE layer's dispatch AlltoAll on a topology: for every route (Megatron's flat AlltoAll;
H1..HD, HierMoE's hierarchical route without dedup, where H1 moves the flat route's rows with its
own metadata; HD1..HDD with dedup) the exact rows, bytes and messages per topology level and the
modeled time, and the dimension d* HierMoE would choose.

    python -m impl.hiermoe.plan --topology hiermoe-testbed --synthetic zipf --skew 1.2
    python -m impl.hiermoe.plan --topology hiermoe-testbed --trace run.npz --layer 0 --json

Routing comes from a `impl.common.traces.RoutingTrace` file (.npz / .jsonl; its rank tags are the
source ranks, which must be 0..G-1; every (step, layer) in it is planned unless --step / --layer
select some) or from the synthetic generator (--synthetic, one step and layer, T tokens per rank).
Volumes are those of one dispatch; the combine and both backward phases mirror them.

Modeled times use a hardware profile (alpha-beta per step, impl.common.costmodel): --profile, or
by default the shipped profile made for the topology's name, else the one shipped profile of the
same shape, whose constants are another topology's: the output names the profile and the
topology it was made for. Without one, and for routes whose steps a profile does not model, the
time is 'n/a' (null in JSON) and d* is not chosen; bytes and messages are always exact.

The time of a route is our model (`impl.hiermoe.dimension.route_time`): one layer's AlltoAlls of
one training iteration (dispatch, combine, their backward twins), every collective the dispatcher
issues with every byte it sends, metadata included; d* is its argmin over HD1..HDD. The paper's
model (Eqs. (1)-(5): one dispatch, token rows only) is printed beside it. `flat` is Megatron-LM's
AlltoAll dispatcher (its own metadata: a count table and one gate weight per row); H1 is the
hierarchical dispatcher at d = 1 (same rows, our metadata).

A trace's rank tags are the source ranks; a rank that routed no tokens has no tag, so ranks
missing from the trace are planned with no tokens (and listed); a rank tag beyond the topology's
G, or a trace that declares another number of ranks (`source.num_ranks`), is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from impl.common import cli
from impl.common.config import MAX_EXPERTS, MAX_TOKENS, MAX_WIDTH, SEED_MAX, check_host_memory, checked
from impl.common.costmodel import HardwareProfile, list_profiles, load_profile
from impl.common.topology import Topology, get_topology
from impl.common.traces import RoutingTrace, synthetic_trace
from impl.hiermoe.dimension import (check_profile, dispatch_counts, flat_collectives, flat_time, paper_time,
                                    route_collectives, route_steps, route_time, route_volumes, select_dimension,
                                    step_name_of, traffic_of, variant_name)

__all__ = ["DTYPE_BYTES", "default_profile", "profile_note", "plan_layer", "main"]

PROG = "python -m impl.hiermoe.plan"
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Defaults: the Qwen3-30B-A3B setting of the paper's ablation (E=128, K=8, 1024 tokens per GPU).
DEFAULTS = {"num_experts": 128, "top_k": 8, "tokens_per_rank": 1024, "seed": 0, "skew": 1.0}


class PlanError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(cli.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise PlanError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=cli.describe(__doc__))
    p.add_argument("--topology", required=True, help="preset, NxG, nvswitch-Nx8 or hier:LEVEL=N,...")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="RoutingTrace file (.npz / .jsonl) or directory of router_trace_rank*.jsonl")
    src.add_argument("--synthetic", choices=("uniform", "zipf", "correlated"), help="synthetic routing")
    p.add_argument("--num-experts", type=cli.number(int, ge=1, le=MAX_EXPERTS),
                   help=f"E (synthetic; default {DEFAULTS['num_experts']})")
    p.add_argument("--top-k", type=cli.number(int, ge=1, le=MAX_EXPERTS), help=f"K (synthetic; default {DEFAULTS['top_k']})")
    p.add_argument("--tokens-per-rank", type=cli.number(int, ge=1, le=MAX_TOKENS),
                   help=f"T (synthetic; default {DEFAULTS['tokens_per_rank']})")
    p.add_argument("--seed", type=cli.number(int, ge=0, le=SEED_MAX), help="synthetic seed (default 0)")
    p.add_argument("--skew", type=cli.number(float, ge=0, le=100), help="zipf exponent (synthetic zipf only; default 1.0)")
    p.add_argument("--step", type=cli.number(int, ge=0), action="append",
                   help="trace step to plan (repeatable; default all)")
    p.add_argument("--layer", type=cli.number(int, ge=0), action="append",
                   help="trace layer to plan (repeatable; default all)")
    p.add_argument("--hidden", type=cli.number(int, ge=1, le=MAX_WIDTH), default=2048,
                   help="M, hidden size of a token (default 2048)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="element type on the wire")
    p.add_argument("--profile", help="hardware profile name or YAML path (default: the topology's own)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


# ==========================================================================================
# planning
# ==========================================================================================
def default_profile(topology: Topology) -> HardwareProfile | None:
    """The shipped profile made for the topology's name, else the only shipped profile of the same
    shape (its constants are another topology's: `profile_note` says so); None if there is none
    (or several)."""
    profiles = [load_profile(n) for n in list_profiles()]
    for prof in profiles:
        if prof.topology == topology.name:
            return prof
    shape = [lv.fanout for lv in topology.levels]
    same = [p for p in profiles if [lv.fanout for lv in p.get_topology().levels] == shape]
    return same[0] if len(same) == 1 else None


def profile_note(profile: HardwareProfile | None, topology: Topology) -> str | None:
    """One line naming the profile in use when it was made for another topology (None otherwise)."""
    if profile is None or profile.topology == topology.name:
        return None
    theirs = profile.get_topology()
    return (f"profile {profile.name!r} was made for topology {theirs.name!r} ({theirs.describe()}); its constants "
            f"are used for {topology.name!r} ({topology.describe()}) step by step, by shape; give --profile to "
            "choose another")


def _covers(profile: HardwareProfile | None, topology: Topology, dim: int) -> bool:
    return profile is not None and all(profile.has_comm("a2a", step_name_of(topology, L, P))
                                       for L, P in route_steps(topology, dim))


def _levels(cs, topology: Topology) -> dict[str, dict[str, int]]:
    """Per level: the token bytes and messages of one dispatch, and the metadata bytes of the whole
    iteration (every phase), from a route's collectives."""
    tok_b = traffic_of([c for c in cs if c.stage == "dispatch"], "bytes", "tokens", "fwd")
    tok_m = traffic_of([c for c in cs if c.stage == "dispatch"], "messages", "tokens", "fwd")
    meta = traffic_of(cs, "bytes", "meta", None)
    return {n: {"bytes": tok_b[n], "messages": tok_m[n], "meta_bytes": meta[n]} for n in topology.level_names}


def plan_layer(routing_maps: list[torch.Tensor], topology: Topology, profile: HardwareProfile | None,
               row_bytes: int, weight_bytes: int = 4) -> dict[str, Any]:
    """Every route's volumes and modeled time for one layer's routing (one map per rank)."""
    counts = dispatch_counts(routing_maps, topology)
    covered_flat = _covers(profile, topology, 1)
    cs = flat_collectives(counts, row_bytes, weight_bytes)
    variants = [{
        "variant": "flat", "dim": 1, "dedup": False, "flat": True, "levels": _levels(cs, topology),
        "collectives": len(cs), "rows_by_level": route_volumes(counts.pairs, 1, row_bytes).rows_by_level,
        "time_ms": flat_time(counts, profile, row_bytes, weight_bytes) if covered_flat else None,
        "paper_time_ms": paper_time(counts.pairs, 1, profile, row_bytes) if covered_flat else None, "steps": []}]
    for dedup in (False, True):
        for dim in range(1, topology.D + 1):
            vol = route_volumes(counts.rows(dedup), dim, row_bytes)
            cs = route_collectives(counts, dim, dedup, row_bytes, weight_bytes)
            covered = _covers(profile, topology, dim)
            steps = [{"step": s.step, "fan": s.fan, "max_rows": s.max_rows, "padded_bytes": s.padded_bytes(row_bytes),
                      "rows": s.rows, "messages": s.messages,
                      "time_ms": profile.comm_time("a2a", s.step, s.padded_bytes(row_bytes)) if covered else None}
                     for s in vol.steps]
            variants.append({
                "variant": vol.variant, "dim": dim, "dedup": dedup, "flat": False, "levels": _levels(cs, topology),
                "collectives": len(cs), "rows_by_level": vol.rows_by_level, "steps": steps,
                "time_ms": route_time(counts, dim, dedup, profile, row_bytes, weight_bytes) if covered else None,
                "paper_time_ms": paper_time(counts.rows(dedup), dim, profile, row_bytes) if covered else None})
    hd_times = {v["dim"]: v["time_ms"] for v in variants if v["dedup"]}
    d_star = select_dimension(hd_times) if None not in hd_times.values() else None
    flat_ms = variants[0]["time_ms"]
    return {"tokens": int(sum(m.shape[0] for m in routing_maps)),
            "routed_pairs": int(sum(int(m.sum()) for m in routing_maps)),
            "variants": variants, "d_star": d_star,
            "hierd": None if d_star is None else {
                "variant": variant_name(d_star, True), "time_ms": hd_times[d_star],
                "speedup_over_flat": None if not flat_ms else flat_ms / hd_times[d_star]}}


# ==========================================================================================
# input
# ==========================================================================================
def _resolve(args) -> dict[str, Any]:
    """Every check, before any work: topology, profile, sizes, trace / synthetic parameters."""
    topology = checked("--topology", get_topology, args.topology)
    if args.profile is not None:
        profile = checked("--profile", load_profile, args.profile)
        checked("--profile", lambda p: check_profile(p, topology), profile)
    else:
        profile = default_profile(topology)
    G = topology.G
    out = {"topology": topology, "profile": profile, "row_bytes": args.hidden * DTYPE_BYTES[args.dtype]}
    synthetic_only = {"num-experts": args.num_experts, "top-k": args.top_k, "tokens-per-rank": args.tokens_per_rank,
                      "seed": args.seed, "skew": args.skew}
    if args.trace is not None:
        given = [k for k, v in synthetic_only.items() if v is not None]
        if given:
            raise PlanError(f"--{given[0]} applies to --synthetic only; a trace fixes its own routing")
        trace = RoutingTrace.load(args.trace)
        ranks = sorted(set(trace.rank_T.tolist()))
        declared = trace.source.get("num_ranks") if isinstance(trace.source, dict) else None
        if declared is not None and declared != G:
            raise PlanError(f"trace {args.trace!r} was recorded on {declared} ranks but topology {topology.name!r} "
                            f"has G = {G} ranks; pick a topology with {declared} GPUs")
        if ranks and ranks[-1] >= G:
            raise PlanError(f"trace {args.trace!r} has source rank {ranks[-1]} but topology {topology.name!r} has "
                            f"G = {G} ranks (0..{G - 1}); pick a topology with at least {ranks[-1] + 1} GPUs")
        if trace.num_experts % G:
            raise PlanError(f"trace {args.trace!r} has E={trace.num_experts} experts, not divisible by "
                            f"G={G} of topology {topology.name!r}")
        groups = sorted({(s, l) for s, l, _ in trace.keys()})
        for name, wanted, have in (("step", args.step, {s for s, _ in groups}),
                                   ("layer", args.layer, {l for _, l in groups})):
            missing = sorted(set(wanted or ()) - have)
            if missing:
                raise PlanError(f"--{name}={missing[0]} is not in trace {args.trace!r}; its {name}s: "
                                f"{', '.join(map(str, sorted(have)))}")
        groups = [(s, l) for s, l in groups if (not args.step or s in args.step) and (not args.layer or l in args.layer)]
        if not groups:
            raise PlanError(f"trace {args.trace!r}: no tokens for the selected step(s) and layer(s) together")
        out.update(trace=trace, groups=groups, source={"trace": str(args.trace), "num_experts": trace.num_experts,
                                                         "top_k": trace.top_k,
                                                         "ranks_without_tokens": sorted(set(range(G)) - set(ranks))})
        return out
    for name in ("step", "layer"):
        if getattr(args, name):
            raise PlanError(f"--{name} applies to --trace only")
    if args.skew is not None and args.synthetic != "zipf":
        raise PlanError(f"--skew applies to --synthetic zipf only, not {args.synthetic!r}")
    p = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in DEFAULTS.items()}
    E, K = p["num_experts"], p["top_k"]
    if not 1 <= K <= E:
        raise PlanError(f"--top-k={K} is not allowed with --num-experts={E}; allowed: 1..{E}")
    if E % G:
        raise PlanError(f"--num-experts={E} is not divisible by G={G} of topology {topology.name!r}; "
                        f"allowed: a multiple of {G}")
    # every rank's [T, E] routing map and top-k ids
    check_host_memory(G * p["tokens_per_rank"] * (2 * E + 16 * K), "--tokens-per-rank, --num-experts",
                      f"the routing of {G} ranks")
    out.update(synthetic=p, groups=[(0, 0)],
               source={"synthetic": args.synthetic, **p, **({} if args.synthetic == "zipf" else {"skew": None})})
    return out


def _routing_maps(r: dict[str, Any], step: int, layer: int) -> list[torch.Tensor]:
    G = r["topology"].G
    if "trace" in r:
        group = r["trace"].select(step=step, layer=layer)
        return [group.select(rank=rank).to_routing_map() for rank in range(G)]
    p = r["synthetic"]
    trace = synthetic_trace(p["num_experts"], p["top_k"], tokens_per_rank=p["tokens_per_rank"], num_ranks=G,
                            distribution=r["source"]["synthetic"], skew=p["skew"], seed=p["seed"])
    map_TE = trace.to_routing_map()
    return list(map_TE.split(p["tokens_per_rank"]))


# ==========================================================================================
# output
# ==========================================================================================
def _table(topology: Topology, layer: dict[str, Any]) -> list[str]:
    levels = topology.level_names
    head = (["variant"] + [f"{n} MB" for n in levels] + [f"{n} msgs" for n in levels]
            + ["meta KB", "colls", "model ms", "paper ms"])
    fmt_ms = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    rows = []
    for v in layer["variants"]:
        label = v["variant"] + (" (Megatron)" if v["flat"] else "") + \
            (" (d*)" if v["dedup"] and v["dim"] == layer["d_star"] else "")
        rows.append([label] + [f"{v['levels'][n]['bytes'] / 1e6:.3f}" for n in levels]
                    + [str(v["levels"][n]["messages"]) for n in levels]
                    + [f"{sum(lv['meta_bytes'] for lv in v['levels'].values()) / 1e3:.1f}", str(v["collectives"]),
                       fmt_ms(v["time_ms"]), fmt_ms(v["paper_time_ms"])])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def _human(result: dict[str, Any]) -> str:
    topology = get_topology(result["topology"]["name"])
    lines = [f"topology {topology.name}: {topology.describe()}"]
    src = result["source"]
    if "trace" in src:
        lines.append(f"routing: trace {src['trace']} (E={src['num_experts']}, K={src['top_k']})")
        if src["ranks_without_tokens"]:
            lines.append(f"ranks without tokens in the trace (planned with none): {src['ranks_without_tokens']}")
    else:
        skew = f", skew {src['skew']}" if src["skew"] is not None else ""
        lines.append(f"routing: synthetic {src['synthetic']}{skew}, E={src['num_experts']}, K={src['top_k']}, "
                     f"{src['tokens_per_rank']} tokens per rank, seed {src['seed']}")
    lines.append(f"row: hidden {result['hidden']} x {result['dtype']} = {result['row_bytes']} bytes; MB and msgs: the "
                 "token rows of one dispatch crossing that level's links (MB = 1e6 bytes); meta KB: the metadata of "
                 "one iteration (counts, ids, gate weights and their gradients)")
    if result["profile"]:
        lines.append(f"profile: {result['profile']} (modeled ms, alpha-beta per step; model ms: one layer's "
                     "AlltoAlls of one iteration, every collective; paper ms: Eqs. (1)-(5), one dispatch, rows only)")
        if result["profile_note"]:
            lines.append(f"note: {result['profile_note']}")
    else:
        lines.append(f"profile: none for topology {topology.name!r}; modeled time n/a (give --profile)")
    for layer in result["layers"]:
        lines += ["", f"step {layer['step']}, layer {layer['layer']}: {layer['tokens']} tokens, "
                      f"{layer['routed_pairs']} (token, expert) pairs"]
        lines += _table(topology, layer)
        h = layer["hierd"]
        if h is not None:
            speed = f", {h['speedup_over_flat']:.2f}x Megatron's flat AlltoAll" if h["speedup_over_flat"] else ""
            lines.append(f"d* = {layer['d_star']}: HierD-AlltoAll = {h['variant']}, modeled {h['time_ms']:.3f} ms{speed}")
        elif result["profile"]:
            lines.append(f"d* = n/a: profile {result['profile']!r} does not model every step of HD1..HD{topology.D}")
        else:
            lines.append("d* = n/a: no hardware profile")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        r = _resolve(args)
    except ValueError as e:  # PlanError, TopologyError, TraceError, profile errors
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    topology, profile = r["topology"], r["profile"]
    layers = []
    for step, layer in r["groups"]:
        planned = plan_layer(_routing_maps(r, step, layer), topology, profile, r["row_bytes"])
        layers.append({"step": step, "layer": layer, **planned})
    note = profile_note(profile, topology)
    if note and args.json:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    result = {"topology": topology.to_dict(), "profile": None if profile is None else profile.name,
              "profile_topology": None if profile is None else profile.topology, "profile_note": note,
              "time_unit": "ms", "hidden": args.hidden, "dtype": args.dtype, "row_bytes": r["row_bytes"],
              "source": r["source"], "layers": layers}
    print(json.dumps(result, indent=2) if args.json else _human(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
