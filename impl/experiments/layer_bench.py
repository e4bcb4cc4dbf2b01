"""The layer bench CLI: one expert-parallel MoE layer, forward + backward, any registered dispatcher,
on SimComm ranks (tier `sim`) or local gloo ranks (tier `emu`); writes one run record.

    python -m impl.experiments.layer_bench --set model=deepseek-v3-tiny --set topology=2x2 --set system=hd2 \
        --out-record results/raw/bench.json

Every check (model, topology, system, world size, E divisible by the expert-parallel size, top-k)
runs before any rank starts, and a bad value exits with one line naming it and what is allowed.
Times are wall clock of this machine: in the sim tier they time the algorithms' Python and tensor
work with N ranks as threads of one process, not a network; bytes and messages per level are
exact in both tiers.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch

from impl.common import cli
from impl.common.comm import Comm, SimWorld
from impl.common.config import ConfigError, checked
from impl.common.dispatcher import check_expert_parallel
from impl.common.experts import GroupedExperts
from impl.common.models import ModelConfig, get_model
from impl.common.moe_layer import ExpertParallelMoE
from impl.common.records import make_record, write_record
from impl.common.registry import get, names
from impl.common.routing import build_gate, init_gate_from_seed
from impl.common.topology import Topology, get_topology
from impl.experiments import systems  # noqa: F401  (registers every dispatcher)

__all__ = ["LayerBenchConfig", "validate", "run", "main"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LayerBenchConfig:
    model: str = "deepseek-v3-tiny"        # impl.common.models name; E, K, widths and gate from it
    topology: str = "2x2"                  # impl.common.topology name
    world_size: int | None = None          # G; when given it must equal the topology's G
    tier: Literal["sim", "emu"] = "sim"
    system: str = "flat"                   # registered dispatcher name
    num_experts: int | None = None         # override the model's E
    top_k: int | None = None               # override the model's K
    hidden: int | None = None              # override the model's hidden size M
    ffn_hidden: int | None = None          # override the model's expert FFN size
    tokens_per_rank: int = 128
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    timeout_s: float = 120.0               # per collective


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


def validate(config: LayerBenchConfig) -> ResolvedBench:
    """All checks that need no rank; raises ConfigError with a one-line message."""
    model = checked("model", get_model, config.model)
    topology = checked("topology", get_topology, config.topology)
    if config.world_size is not None and config.world_size != topology.G:
        raise ConfigError(f"world_size: {config.world_size} does not match topology {topology.name!r}; "
                          f"allowed: {topology.G} (its G)")
    if config.system not in names("dispatcher"):
        raise ConfigError(f"system: unknown {config.system!r}; allowed: {', '.join(names('dispatcher'))}")
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
    for key in ("tokens_per_rank", "repeats"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}: {getattr(config, key)} is not allowed; allowed: >= 1")
    if config.warmup < 0:
        raise ConfigError(f"warmup: {config.warmup} is not allowed; allowed: >= 0")
    hidden = config.hidden or model.hidden
    ffn_hidden = config.ffn_hidden or model.moe_ffn_hidden
    if config.tier == "emu" and topology.G > 64:
        raise ConfigError(f"topology: {topology.name!r} has G = {topology.G} ranks; the emu tier runs "
                          "one local process per rank, allowed: G <= 64")
    return ResolvedBench(config, model, topology, E, K, hidden, ffn_hidden)


def _bench_rank(comm: Comm, rb: ResolvedBench) -> dict:
    """One rank: build gate, dispatcher and local experts, time forward + backward."""
    cfg, dtype = rb.config, DTYPES[rb.config.dtype]
    gate_cfg = replace(rb.model.gate_config(), top_k=rb.top_k)
    gate = init_gate_from_seed(build_gate(gate_cfg, rb.hidden, rb.num_experts), cfg.seed).to(dtype)
    dispatcher = get("dispatcher", cfg.system)(comm, rb.num_experts)
    experts = GroupedExperts(len(dispatcher.local_experts()), rb.hidden, rb.ffn_hidden,
                             kind=rb.model.ffn_kind).to(dtype)
    experts.init_from_seed(dispatcher.local_experts(), cfg.seed)
    layer = ExpertParallelMoE(gate, experts, dispatcher)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + comm.rank)
    x = torch.randn(cfg.tokens_per_rank, rb.hidden, generator=g).to(dtype).requires_grad_(True)
    times_ms = []
    for step in range(cfg.warmup + cfg.repeats):
        if step == cfg.warmup:
            comm.traffic.reset()
        comm.barrier()
        start = time.perf_counter()
        out = layer(x)
        out.y_TM.float().square().mean().backward()
        comm.barrier()
        if step >= cfg.warmup:
            times_ms.append((time.perf_counter() - start) * 1e3)
    return {"times_ms": times_ms, "traffic": comm.traffic.to_dict()}


def run(rb: ResolvedBench) -> list[dict]:
    if rb.config.tier == "sim":
        return SimWorld(rb.topology, timeout_s=rb.config.timeout_s).run(_bench_rank, rb)
    from impl.common.launcher import launch
    return launch(_bench_rank, rb.topology.G, (rb,), topology=rb.topology, timeout_s=rb.config.timeout_s)


def _sum_levels(per_rank: list[dict], what: str, phase: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in per_rank:
        for level, v in r["traffic"].get("tokens", {}).get(phase, {}).get(what, {}).items():
            total[level] = total.get(level, 0) + v
    return total


def make_bench_record(rb: ResolvedBench, per_rank: list[dict]) -> dict:
    """Step time = slowest rank per repeat; bytes per level summed over ranks, one step, forward."""
    repeats = rb.config.repeats
    step_ms = [max(r["times_ms"][i] for r in per_rank) for i in range(len(per_rank[0]["times_ms"]))]
    per_step = lambda d: {k: v / repeats for k, v in d.items()}  # noqa: E731
    return make_record(
        experiment="layer_bench", system=rb.config.system, tier=rb.config.tier, topology=rb.topology,
        model={"name": rb.model.name, "num_experts": rb.num_experts, "top_k": rb.top_k,
               "hidden": rb.hidden, "ffn_hidden": rb.ffn_hidden, "ffn_kind": rb.model.ffn_kind,
               "tokens_per_rank": rb.config.tokens_per_rank, "dtype": rb.config.dtype},
        config=rb.config, metrics={"step_time_ms": step_ms}, seed=rb.config.seed,
        trace_id=f"gate:{rb.model.gate_config().kind}:random-inputs:seed={rb.config.seed}",
        bytes_by_level=per_step(_sum_levels(per_rank, "bytes", "fwd")),
        messages_by_level=per_step(_sum_levels(per_rank, "messages", "fwd")),
        extra={"bytes_by_level_bwd": per_step(_sum_levels(per_rank, "bytes", "bwd")),
               "timing_note": "wall clock of this host; sim tier = ranks as threads of one process"})


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m impl.experiments.layer_bench", __doc__, config=LayerBenchConfig)
    parser.add_argument("--out-record", help="write the JSON run record here")
    args = parser.parse_args(argv)
    try:
        rb = validate(cli.load_config(args, LayerBenchConfig))
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    record = make_bench_record(rb, run(rb))
    if args.out_record:
        write_record(args.out_record, record)
    levels = ", ".join(f"{k}={v / 1e6:.3f} MB" for k, v in record["bytes_by_level"].items())
    t = record["metrics"]["step_time_ms"]
    print(f"{rb.config.system} on {rb.topology.name} ({rb.config.tier}): step median {t['median']:.2f} ms "
          f"(p5 {t['p5']:.2f}, p95 {t['p95']:.2f}, n={t['n']}); forward tokens bytes per level: {levels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
