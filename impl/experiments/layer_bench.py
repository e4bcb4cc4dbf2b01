"""The layer bench CLI: one expert-parallel MoE layer, any registered dispatcher, on SimComm ranks
(tier `sim`), local gloo ranks (tier `emu`: on loopback, or with `network.emulate` one network
namespace per node of an emulated cluster, links shaped with tc) or a torchrun / srun job (tier
`cluster`, NCCL on GPUs); writes one run record.

    python -m impl.experiments.layer_bench --set model=deepseek-v3-tiny --set topology=2x2 --set system=hd2 \
        --out-record results/raw/bench.json
    python -m impl.experiments.layer_bench --set tier=emu --set topology=2x4 --set network.emulate=true \
        --set network.rate=200mbit --set timing=stages --set routing.source=synthetic \
        --set routing.distribution=zipf --set system=hierd --set planner=hierd-es --set profile=emu.yaml ...

Every check (model, topology, system, planner, profile, world size, E divisible by the
expert-parallel size, top-k, network) runs before any rank starts, and a bad value exits with one
line naming it and what is allowed.

What is timed (wall clock of the host; in the sim tier the ranks are threads of one process):
* timing=step: forward + backward of the layer, between two barriers (`step_time_ms`);
* timing=stages: a forward pass with a barrier after each part, so every part is timed alone:
  `dispatch_ms` (dispatch_preprocess + token_dispatch + dispatch_postprocess, i.e. split counts,
  metadata and the token AlltoAll(s)), `expert_ms`, `combine_ms` (the three combine stages);
  `step_time_ms` is their sum. Each repeat's value is the slowest rank's.
* with a placement planner (`planner=hierd-es`, HierMoE's expert swap), after every step the
  planner runs and the chosen experts migrate (`swap_ms`, its bytes under category 'migration').

Routing: `routing.source=gate` routes with the model's gate; `synthetic` draws each rank's top-k
ids from `impl.common.traces.synthetic_topk` (uniform or Zipf, one popularity order shared by all
ranks, gate weights 1/K), so a workload is the same for every system and can be rebuilt exactly
from the config (`synthetic_routing_maps`) for a model's prediction.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from impl.common import cli
from impl.common.comm import Comm, SimWorld
from impl.common.config import MAX_LOCAL_RANKS, ConfigError, check_bounds, check_host_memory, checked
from impl.common.costmodel import HardwareProfile, load_profile, topology_steps
from impl.common.dispatcher import check_expert_parallel
from impl.common.emu_cluster import check_network
from impl.common.launcher import require_job
from impl.common.experts import GroupedExperts
from impl.common.models import ModelConfig, get_model
from impl.common.moe_layer import ExpertParallelMoE
from impl.common.records import make_record, write_record
from impl.common.registry import get, names
from impl.common.routing import RoutingResult, build_gate, init_gate_from_seed, routing_from_topk
from impl.common.topology import Topology, get_topology
from impl.common.traces import synthetic_topk
from impl.experiments import systems  # noqa: F401  (registers every dispatcher)
from impl.experiments.layer_bench_config import PROFILE_PLANNERS, PROFILE_SYSTEMS, LayerBenchConfig, RoutingSource

__all__ = ["LayerBenchConfig", "RoutingSource", "ResolvedBench", "validate", "run", "main",
           "synthetic_routing_maps", "make_bench_record", "PROFILE_SYSTEMS", "STAGES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
STAGES = ("dispatch_ms", "expert_ms", "combine_ms")


@dataclass(frozen=True)
class ResolvedBench:
    """The config with the model's values filled in: what every rank runs."""
    config: LayerBenchConfig
    model: ModelConfig
    topology: Topology
    num_experts: int
    top_k: int
    hidden: int
    ffn_hidden: int
    profile: HardwareProfile | None = None


def validate(config: LayerBenchConfig, with_profile: bool = True) -> ResolvedBench:
    """All checks that need no rank; raises ConfigError with a one-line message. `with_profile`
    False skips loading the hardware profile (a workflow checking runs whose profile a
    calibration job writes later)."""
    check_bounds(config)       # the ranges the fields declare (a config built in code skips from_dict)
    model = checked("model", get_model, config.model)
    topology = checked("topology", get_topology, config.topology)
    if config.world_size is not None and config.world_size != topology.G:
        raise ConfigError(f"world_size: {config.world_size} does not match topology {topology.name!r}; "
                          f"allowed: {topology.G} (its G)")
    if config.system not in names("dispatcher"):
        raise ConfigError(f"system: unknown {config.system!r}; allowed: {', '.join(names('dispatcher'))}")
    if config.planner is not None and config.planner not in PROFILE_PLANNERS:
        raise ConfigError(f"planner: {config.planner!r} is not allowed; allowed: null, {', '.join(PROFILE_PLANNERS)}")
    E = config.num_experts if config.num_experts is not None else model.num_experts
    K = config.top_k if config.top_k is not None else model.top_k
    if E < 1:
        raise ConfigError(f"num_experts: model {model.name!r} is dense (E = {E}); allowed: an MoE model "
                          "or num_experts >= 1")
    try:
        check_expert_parallel(E, topology.G)
    except ValueError as e:
        raise ConfigError(f"num_experts: {e}") from None
    if not 1 <= K <= E:
        raise ConfigError(f"top_k: {K} is not allowed with num_experts={E}; allowed: 1..{E}")
    hidden = model.hidden if config.hidden is None else config.hidden
    ffn_hidden = model.moe_ffn_hidden if config.ffn_hidden is None else config.ffn_hidden
    if config.tier != "cluster":           # every rank on this host
        check_host_memory(_bench_bytes(topology.G, E // topology.G, K, hidden, ffn_hidden, config.tokens_per_rank,
                                       DTYPES[config.dtype].itemsize),
                          "num_experts, hidden, ffn_hidden, tokens_per_rank", f"the {topology.G} ranks")
    if config.tier == "emu" and topology.G > MAX_LOCAL_RANKS:
        raise ConfigError(f"topology: {topology.name!r} has G = {topology.G} ranks; the emu tier runs "
                          f"one local process per rank, allowed: G <= {MAX_LOCAL_RANKS}")
    if config.network.emulate and config.tier != "emu":
        raise ConfigError(f"network.emulate: true needs tier emu (tier is {config.tier!r})")
    try:
        check_network(config.network)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    profile = None
    if not with_profile:
        pass
    elif config.system in PROFILE_SYSTEMS or config.planner in PROFILE_PLANNERS:
        profile = checked("profile", load_profile, config.profile or topology.name)
        from impl.hiermoe.dimension import check_profile

        try:
            check_profile(profile, topology)
        except ValueError as e:
            raise ConfigError(f"profile: {e}") from None
        missing = [step for step in topology_steps(topology) if not profile.has_comm("a2a", step)]
        if missing:             # d* is chosen over every route, so every step's AlltoAll is modelled
            raise ConfigError(f"profile: {profile.name!r} has no a2a model for step {', '.join(missing)} of "
                              f"topology {topology.name!r}; HierMoE's d* choice needs every step's")
    elif config.profile is not None:
        raise ConfigError(f"profile: only {', '.join(PROFILE_SYSTEMS + PROFILE_PLANNERS)} use a hardware profile; "
                          f"system {config.system!r} without a planner does not")
    return ResolvedBench(config, model, topology, E, K, hidden, ffn_hidden, profile)


def _bench_bytes(ranks: int, local_experts: int, top_k: int, hidden: int, ffn_hidden: int, tokens: int,
                 itemsize: int) -> int:
    """About the bytes `ranks` ranks hold: expert weights with their gradients (three [M, F]
    matrices per expert at most), and per token the input, K routed copies and their FFN
    activations, twice over for the backward."""
    weights = 2 * local_experts * 3 * hidden * ffn_hidden
    activations = 2 * tokens * (hidden + top_k * (2 * hidden + 3 * ffn_hidden))
    return ranks * itemsize * (weights + activations)


def synthetic_routing_maps(rb: ResolvedBench, ranks: range | list[int] | None = None) -> list[torch.Tensor]:
    """The [T, E] bool routing map of every rank (or of `ranks`) under `routing.source=synthetic`:
    what the bench routes by, rebuilt from the config alone (one popularity order for all ranks)."""
    cfg = rb.config
    out = []
    for rank in (range(rb.topology.G) if ranks is None else ranks):
        ids_TK = synthetic_topk(cfg.tokens_per_rank, rb.num_experts, rb.top_k, cfg.routing.distribution,
                                skew=cfg.routing.skew, seed=cfg.seed * 100_003 + rank, popularity_seed=cfg.seed)
        out.append(torch.zeros(ids_TK.shape[0], rb.num_experts, dtype=torch.bool).scatter_(1, ids_TK, True))
    return out


def _routing_fn(rb: ResolvedBench, rank: int, gate, dtype, device):
    """x -> RoutingResult for this rank: the gate's, or the fixed synthetic routing."""
    if rb.config.routing.source == "gate":
        return gate
    (map_TE,) = synthetic_routing_maps(rb, [rank])
    ids_TK = map_TE.nonzero()[:, 1].view(map_TE.shape[0], rb.top_k).to(device)
    fixed = routing_from_topk(ids_TK, torch.full(ids_TK.shape, 1.0 / rb.top_k, dtype=dtype, device=device),
                              rb.num_experts)
    return lambda x: fixed


def _sync(comm: Comm) -> None:
    """A barrier, after this rank's queued GPU work is done (kernels run asynchronously)."""
    if comm.device.type == "cuda":
        torch.cuda.synchronize(comm.device)
    comm.barrier()


def _timed(comm: Comm, fn):
    """(result, ms) of fn() between two barriers: every rank's part of it is done at the end."""
    _sync(comm)
    start = time.perf_counter()
    out = fn()
    _sync(comm)
    return out, (time.perf_counter() - start) * 1e3


class _StepClock:
    """Wall time this rank spends in the AlltoAlls of each communication step ('flat',
    'inter-1', 'intra-1', ...: every AlltoAll of the step's group, its metadata ones included),
    read and reset around each timed stage: which step of a route the time went to."""

    def __init__(self, comm: Comm):
        self.ms: dict[str, float] = {}
        plain = comm._all_to_all

        def timed(x, send_splits, recv_splits, group):
            start = time.perf_counter()
            try:
                return plain(x, send_splits, recv_splits, group)
            finally:
                self.ms[group.name] = self.ms.get(group.name, 0.0) + (time.perf_counter() - start) * 1e3

        comm._all_to_all = timed

    def take(self) -> dict[str, float]:
        out, self.ms = self.ms, {}
        return out


def _stage_pass(comm: Comm, layer: ExpertParallelMoE, x, routing: RoutingResult, clock: _StepClock) -> dict:
    """One forward with a barrier after dispatch, experts and combine: each part timed alone,
    and the time each part spent in each step's AlltoAlls."""
    d = layer.dispatcher
    with torch.no_grad():
        clock.take()
        (tokens, meta), dispatch_ms = _timed(comm, lambda: d.dispatch(x, routing, layer.placement))
        dispatch_steps = clock.take()
        out_RM, expert_ms = _timed(comm, lambda: layer.experts(tokens.x_RM, list(tokens.tokens_per_local_expert))
                                   * tokens.probs_R.unsqueeze(-1).to(x.dtype))
        clock.take()
        _, combine_ms = _timed(comm, lambda: d.combine(out_RM, meta))
        combine_steps = clock.take()
    return {"dispatch_ms": dispatch_ms, "expert_ms": expert_ms, "combine_ms": combine_ms,
            **{f"dispatch_{step}_ms": v for step, v in dispatch_steps.items()},
            **{f"combine_{step}_ms": v for step, v in combine_steps.items()}}


def _build_planner(rb: ResolvedBench):
    if rb.config.planner is None:
        return None
    return get("placement_planner", rb.config.planner)(rb.profile, rb.hidden, DTYPES[rb.config.dtype].itemsize)


def _bench_rank(comm: Comm, rb: ResolvedBench) -> dict:
    """One rank: build gate, dispatcher and local experts; time the layer (see the docstring)."""
    from impl.common.expert_migration import apply_planner

    cfg, dtype, device = rb.config, DTYPES[rb.config.dtype], comm.device   # cuda under NCCL
    gate_cfg = replace(rb.model.gate_config(), top_k=rb.top_k)
    gate = init_gate_from_seed(build_gate(gate_cfg, rb.hidden, rb.num_experts), cfg.seed).to(device, dtype)
    options = {"profile": rb.profile} if cfg.system in PROFILE_SYSTEMS else {}
    dispatcher = get("dispatcher", cfg.system)(comm, rb.num_experts, **options)
    experts = GroupedExperts(len(dispatcher.local_experts()), rb.hidden, rb.ffn_hidden,
                             kind=rb.model.ffn_kind).to(dtype)
    experts.init_from_seed(dispatcher.local_experts(), cfg.seed)
    layer = ExpertParallelMoE(gate, experts.to(device), dispatcher)
    route = _routing_fn(rb, comm.rank, gate, dtype, device)
    planner = _build_planner(rb)
    clock = _StepClock(comm) if cfg.timing == "stages" else None
    g = torch.Generator().manual_seed(cfg.seed * 7919 + comm.rank)
    x = torch.randn(cfg.tokens_per_rank, rb.hidden, generator=g).to(device, dtype).requires_grad_(cfg.timing == "step")
    samples: dict[str, list] = {"step_time_ms": []}
    for step in range(cfg.warmup + cfg.repeats):
        measured = step >= cfg.warmup
        if step == cfg.warmup:
            comm.traffic.reset()
        placement = layer.placement
        routing = route(x)
        if cfg.timing == "stages":
            parts = _stage_pass(comm, layer, x, routing, clock)
            step_ms = sum(parts[k] for k in STAGES)
        else:
            def fwd_bwd():
                out = layer(x, routing)
                out.y_TM.float().square().mean().backward()
            parts, (_, step_ms) = {}, _timed(comm, fwd_bwd)
        if planner is not None:
            migration, parts["swap_ms"] = _timed(comm, lambda: apply_planner(comm, planner, step, layer,
                                                                               routing.routing_map_TE.detach()))
            parts["moved_experts"] = len(migration.moved_experts)
        if measured:
            samples["step_time_ms"].append(step_ms)
            samples.setdefault("parts", []).append(parts)    # keys may change per repeat (d*)
            samples.setdefault("placement", []).append(list(placement.slot_of_expert))
            if hasattr(dispatcher, "last_dim"):
                samples.setdefault("dim", []).append(dispatcher.last_dim)
    return {"samples": samples, "traffic": comm.traffic.to_dict()}


def run(rb: ResolvedBench) -> tuple[list[dict] | None, dict[str, Any]]:
    """(per-rank results, where the ranks ran). Tier cluster: every rank of the job calls it;
    rank 0 gets every rank's results, the others None."""
    cfg = rb.config
    if cfg.tier == "sim":
        return SimWorld(rb.topology, timeout_s=cfg.timeout_s).run(_bench_rank, rb), {"ranks": "threads of one process"}
    if cfg.tier == "emu":
        from impl.common.emu_cluster import emulated_cluster
        from impl.common.launcher import launch

        load_before = os.getloadavg()
        with emulated_cluster(rb.topology, cfg.network) as cluster:
            results = launch(_bench_rank, rb.topology.G, (rb,), topology=rb.topology, timeout_s=cfg.timeout_s,
                             deadline_s=cfg.deadline_s, cluster=cluster)
            # other work on the host competes with the ranks: its load goes with the numbers; and
            # what the shaped links did (drops make TCP retransmit) where the network is emulated
            where = {**cluster.describe(), "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
            if cluster.emulated:
                where["tc_counters"] = cluster.link_counters()
            return results, where
    import torch.distributed as dist

    from impl.common.launcher import init_from_env

    comm = init_from_env(rb.topology, timeout_s=cfg.timeout_s)
    try:
        mine = _bench_rank(comm, rb)
        everyone = comm.all_gather_object(mine)
        where = {"backend": comm.backend, "hosts": sorted(set(comm.all_gather_object(socket.gethostname())))}
    finally:
        dist.destroy_process_group()
    return (everyone, where) if comm.rank == 0 else (None, where)


def _sum_levels(per_rank: list[dict], what: str, phase: str, category: str = "tokens") -> dict[str, int]:
    total: dict[str, int] = {}
    for r in per_rank:
        for level, v in r["traffic"].get(category, {}).get(phase, {}).get(what, {}).items():
            total[level] = total.get(level, 0) + v
    return total


def make_bench_record(rb: ResolvedBench, per_rank: list[dict], network: dict | None = None) -> dict:
    """Each timed quantity per repeat = its slowest rank; bytes per level summed over ranks, per
    step (forward tokens; metadata, backward and migration bytes under extra)."""
    cfg, repeats = rb.config, rb.config.repeats
    first = per_rank[0]["samples"]
    timed = ["step_time_ms"] + sorted({k for r in per_rank for parts in r["samples"]["parts"] for k in parts
                                       if k.endswith("_ms")}, key=lambda k: (k not in STAGES, k))
    metrics = {k: [max((r["samples"]["step_time_ms"][i] if k == "step_time_ms" else
                        r["samples"]["parts"][i].get(k, 0.0)) for r in per_rank) for i in range(repeats)]
               for k in timed}
    per_step = lambda d: {k: v / repeats for k, v in d.items()}  # noqa: E731
    routing = cfg.routing
    trace = (f"gate:{rb.model.gate_config().kind}:random-inputs:seed={cfg.seed}" if routing.source == "gate" else
             f"synthetic:{routing.distribution}" + (f":skew={routing.skew}" if routing.distribution == "zipf" else "")
             + f":seed={cfg.seed}")
    extra = {"bytes_by_level_bwd": per_step(_sum_levels(per_rank, "bytes", "bwd")),
             "meta_bytes_by_level": per_step(_sum_levels(per_rank, "bytes", "fwd", "meta")),
             "migration_bytes_by_level": per_step(_sum_levels(per_rank, "bytes", "fwd", "migration")),
             "timing": cfg.timing, "placements": first["placement"],
             "timing_note": "wall clock of this host, slowest rank per repeat; sim tier = ranks as threads of one process",
             "network": network or {}}
    if "dim" in first:
        extra["dims"] = first["dim"]
    if "moved_experts" in first["parts"][0]:
        extra["moved_experts"] = [parts["moved_experts"] for parts in first["parts"]]
    if rb.profile is not None:
        extra["profile"] = {"name": rb.profile.name, "source": rb.profile.source}
    return make_record(
        experiment="layer_bench", system=cfg.system + (f"+{cfg.planner}" if cfg.planner else ""), tier=cfg.tier,
        topology=rb.topology,
        model={"name": rb.model.name, "num_experts": rb.num_experts, "top_k": rb.top_k,
               "hidden": rb.hidden, "ffn_hidden": rb.ffn_hidden, "ffn_kind": rb.model.ffn_kind,
               "tokens_per_rank": cfg.tokens_per_rank, "dtype": cfg.dtype},
        config=cfg, metrics=metrics, seed=cfg.seed, trace_id=trace,
        bytes_by_level=per_step(_sum_levels(per_rank, "bytes", "fwd")),
        messages_by_level=per_step(_sum_levels(per_rank, "messages", "fwd")), extra=extra)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m impl.experiments.layer_bench", __doc__, config=LayerBenchConfig)
    parser.add_argument("--out-record", type=cli.output_path, help="write the JSON run record here")
    args = parser.parse_args(argv)
    try:
        rb = validate(cli.load_config(args, LayerBenchConfig))
        if rb.config.tier == "cluster":
            require_job(rb.topology, "tier: cluster")
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    per_rank, network = run(rb)
    if per_rank is None:   # not rank 0 of a cluster job
        return 0
    record = make_bench_record(rb, per_rank, network)
    if args.out_record:
        write_record(args.out_record, record)
    levels = ", ".join(f"{k}={v / 1e6:.3f} MB" for k, v in record["bytes_by_level"].items())
    m = record["metrics"]
    parts = "".join(f", {k} {m[k]['median']:.1f}" for k in (*STAGES, "swap_ms") if k in m)
    t = m["step_time_ms"]
    where = "emulated cluster" if network.get("emulated") else ""
    print(f"{record['system']} on {rb.topology.name} ({rb.config.tier}{', ' + where if where else ''}): step median "
          f"{t['median']:.2f} ms (p5 {t['p5']:.2f}, p95 {t['p95']:.2f}, n={t['n']}){parts}; "
          f"forward tokens bytes per level: {levels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
