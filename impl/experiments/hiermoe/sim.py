"""Sim-tier HierMoE experiments at paper scale: every system of Figs. 10-13, Table IV and the
ablations evaluated on the same routing stream, iteration by iteration, layer by layer.

    python -m impl.experiments.hiermoe.sim --config workflows/config/experiments/hiermoe_qwen3.yaml \
        --out-csv results/.../x.csv --out-record results/.../x.json
    python -m impl.experiments.hiermoe.sim --config workflows/config/experiments/hiermoe_skew.yaml \
        --variant 'skew-0={"stream": {"skew": 0.0}}' --variant 'skew-1={"stream": {"skew": 1.0}}' ...

`--variant NAME=OVERRIDES` (repeatable) runs the experiment once per variant in one process (a
sweep: process start-up dominates small runs), the variant's overrides (a YAML / JSON mapping of
config keys) applied after the config file and before `--set`; the CSV's `variant` column names
the run each row belongs to.

What is exact and what is modeled:
* Routing: the model's real gate over a token stream of explicit skew (`stream.skew`,
  `impl.experiments.hiermoe.workload`), at the paper's scale (G ranks x 1024 tokens, the paper's E,
  K, M). Every (iteration, layer) row records the routing's balance (largest flat split over its
  mean, MaxVio).
* Volumes: exact duplicate-free and (token, expert) counts per rank, step and level from the
  routing maps under each system's current expert placement (`impl.hiermoe.dimension`), equal to
  what the real dispatchers send, metadata included (tested against their traffic counters).
* Times: MODELED with the alpha-beta hardware profile (HierMoE Fig. 9 constants). By default
  (`charge: all`) every collective a system's dispatcher issues is charged with every byte it
  sends: split counts, expert ids, rows, gate weights, in the dispatch, the combine and their
  backward twins, plus HierD-AlltoAll's d* all-reduce and Tutel's capacity all-reduce;
  `charge: tokens` is the paper's Eqs. (1)-(5) (4 x one dispatch, token rows only, one start-up
  per step), kept for the ablation. Swaps and placements are really planned by the systems'
  planners (HierD-ES, SmartMoE) and change the next iteration's counts.
* End to end (Fig. 10): AlltoAll plus a compute model with constants BORROWED from FSMoE's
  Testbed A profile (same GPU and CPU class; the HierMoE paper gives none): GEMMs by its GEMM
  alpha-beta, attention by its attention model at the run's sequence length (`ATTENTION_READING`),
  expert GEMMs per GPU on the rows its experts receive (the slowest GPU sets the pace), backward =
  2 x forward. Not modeled: dense-gradient all-reduce and optimizer step (identical for all
  systems).
* Expert moves (HierD-ES one pair per layer and planning iteration, SmartMoE whatever its plan
  moves): what moves is each moved expert's bf16 weights, fp32 master weights and two fp32 Adam
  moments (14 bytes per parameter), point to point between its old and new owner over the link
  of their level (`p2p_time`: a lone message has its link to itself), plus the planner's
  statistics all-reduce. When: a layer's moves can run once that layer's backward is done, under
  the backward compute of the layers below it (`swap_cost: overlap`, the default): the iteration
  is charged only the part of the moves' link time that exceeds the backward compute (a lower
  bound: moves and AlltoAlls do not share a link in our timeline). Ablations: `exposed` charges
  the moves in full, after the step; `shared` also gives every move only one rank's share of its
  link (the AlltoAll fit's rate, the model the paper-less earlier version used). Swaps happen every
  `every` iterations, so their cost is amortised over the interval (the median iteration of
  `every` > 1 carries none).

Systems (names as in the paper): Megatron-LM (flat, one copy per (token, expert)), Tutel-2DH
(intra-node then inter-node AlltoAll over capacity-padded equal slices, capacity factor 1.0:
Tutel's default), SmartMoE (flat + SmartMoE placement), HD2-MoE, HD2-MoE-Smart, HD-MoE (d* per
layer and iteration), HierMoE (d* + HierD-ES), DeepEP (beyond the paper: DeepEP-style node-level
dedup, `baselines.deepep`), and Hd / HDd for fixed d. Options in brackets make variants:
`HierMoE[max_fn=max]`, `HierMoE[every=4]`, `Megatron-LM[charge=tokens]`,
`Tutel-2DH[capacity_factor=0]`, `HD2-MoE-Smart[method=greedy-swap]`, `DeepEP[overlap=true]`,
`Megatron-LM[buffer=total]` (the model evaluated at the largest amount a rank sends or receives
instead of the paper's fan x largest split).
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
from tqdm import tqdm

from baselines.deepep import deepep_time
from baselines.smartmoe.planner import smartmoe_placement
from baselines.tutel_2dh.dispatcher import capacity_of, tutel_2dh_collectives
from impl.common import cli
from impl.common.config import (MAX_EXPERTS, MAX_LAYERS, MAX_REPEATS, MAX_TOKENS, SEED_MAX, ConfigError, bounded,
                                 build_config, check_host_memory, checked)
from impl.common.costmodel import HardwareProfile, LinearModel, load_profile
from impl.common.dispatcher import ExpertPlacement
from impl.common.models import ModelConfig, get_model
from impl.common.records import make_record
from impl.common.topology import Topology, get_topology
from impl.hiermoe.dimension import (COUNT_BYTES, DispatchCounts, RouteCounts, agreement_bytes, allreduce_time,
                                    check_profile, collective_time, counts_from_slots, flat_time, iteration_times,
                                    route_time, select_dimension, selected_slots)
from impl.hiermoe.expert_swap import decide_swap, stats_bytes, swap_stats_from_tables, swap_tables
from impl.experiments.hiermoe.spec import SystemSpec, option_default
from impl.experiments.hiermoe.systems import HIERMOE_SYSTEMS
from impl.experiments.hiermoe.workload import RoutingStream, TokenStreamConfig, routing_balance

__all__ = ["SimExperimentConfig", "parse_system", "run_experiment", "summarize_frame", "main", "a2a_time", "LayerRouting",
           "expert_state_bytes", "p2p_time", "migration_time", "uniform_paper_model", "attention_model",
           "ATTENTION_READING", "MODEL_OVERRIDES", "run_profile", "REKEYED"]

PAPER_SYSTEMS = tuple(s.name for s in HIERMOE_SYSTEMS.select(roles=("baseline", "ours")))


def parse_system(text: str, defaults: dict) -> SystemSpec:
    """'HierMoE', 'HD3', 'HierMoE[gamma=5,every=2]' -> SystemSpec (the registry's entry with its
    options); ConfigError names what is allowed."""
    _, spec = HIERMOE_SYSTEMS.parse(text, defaults)
    return dataclasses.replace(spec, name=text.strip())


@dataclass(frozen=True)
class SimExperimentConfig:
    experiment: str = "hiermoe_a2a"           # name written to records
    model: str = "qwen3-30b-a3b-32l"
    topology: str = "hiermoe-testbed"
    profile: str = "hiermoe-testbed"          # alpha-beta of the AlltoAll steps (HierMoE Fig. 9)
    compute_profile: str = "fsmoe-testbed-a"  # GEMM model for the end-to-end step (borrowed)
    num_experts: int | None = bounded(None, ge=1, le=MAX_EXPERTS)   # sweep overrides (Table IV); None = the model's
    top_k: int | None = bounded(None, ge=1, le=MAX_EXPERTS)
    tokens_per_rank: int = bounded(1024, ge=1, le=MAX_TOKENS)      # micro-batch 1 x sequence 1024
    bytes_per_elem: int = bounded(2, ge=1, le=16)                  # bf16 activations
    weight_bytes: int = bounded(4, ge=1, le=16)                    # gate weights (router probabilities) in fp32
    layers: int = bounded(4, ge=1, le=MAX_LAYERS)                  # MoE layers whose routing is simulated
    iterations: int = bounded(8, ge=1, le=MAX_REPEATS)
    warmup: int = bounded(2, ge=0, le=MAX_REPEATS)                 # first iterations left out of the summary
    systems: tuple[str, ...] = PAPER_SYSTEMS
    # defaults of the systems' options (each system name may override them in brackets)
    max_fn: Literal["max", "smooth", "lse"] = "smooth"
    gamma: float = option_default("gamma")
    swap_every: int = option_default("every")
    smartmoe_history: int = option_default("history")
    smartmoe_method: Literal["lpt", "greedy-swap"] = "lpt"
    charge: Literal["all", "tokens"] = "all"
    buffer: Literal["padded", "total"] = "padded"
    capacity_factor: float = option_default("capacity_factor")
    swap_cost: Literal["overlap", "exposed", "shared"] = "overlap"
    stream: TokenStreamConfig = field(default_factory=TokenStreamConfig)
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    # the model's own settings, changed for an ablation (None = the model's): DeepSeek-V3's
    # node-limited routing (expert groups, groups a token may use) and its leading dense layers
    n_group: int | None = bounded(None, ge=1, le=MAX_EXPERTS)
    topk_group: int | None = bounded(None, ge=1, le=MAX_EXPERTS)
    first_k_dense_layers: int | None = bounded(None, ge=0, le=MAX_LAYERS)


MODEL_OVERRIDES = ("n_group", "topk_group", "first_k_dense_layers")
# the last line of a re-keyed profile's notes (run_profile)
REKEYED = ("Re-keyed to {topology}: the same per-step constants with fewer nodes (an approximation: the paper "
           "gives constants for its 32-GPU testbed only).")

# How the end-to-end model reads FSMoE's attention entry (`attention_L<L>` of the compute profile;
# the FSMoE digest: "applied to an attention FLOP count, doubled for backward").
ATTENTION_READING = ("the compute profile's `attention_L<L>` entry at the run's sequence length L (micro-batch 1: "
                     "L = tokens per rank), work 4 L^2 x heads x head_dim, read as one layer's FORWARD attention "
                     "core; its backward is counted as 2 x forward like every other compute term (forward + "
                     "backward = 3 x the entry)")


@dataclass(frozen=True)
class Resolved:
    config: SimExperimentConfig
    model: ModelConfig
    topology: Topology
    profile: HardwareProfile
    compute: HardwareProfile
    systems: tuple[SystemSpec, ...]
    num_experts: int
    top_k: int

    @property
    def row_bytes(self) -> int:
        return self.model.hidden * self.config.bytes_per_elem


def resolve(config: SimExperimentConfig) -> Resolved:
    """Every check before any work; ConfigError (one line) on bad input."""
    model = checked("model", get_model, config.model)
    overrides = {k: getattr(config, k) for k in MODEL_OVERRIDES if getattr(config, k) is not None}
    if overrides:
        model = dataclasses.replace(model, **overrides)     # ModelConfig checks them (ConfigError)
    topo = checked("topology", get_topology, config.topology)
    profiles = []
    for key in ("profile", "compute_profile"):
        try:
            profiles.append(run_profile(getattr(config, key), topo if key == "profile" else None))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
    E = model.num_experts if config.num_experts is None else config.num_experts
    K = model.top_k if config.top_k is None else config.top_k
    if E < 1 or E % topo.G:
        raise ConfigError(f"num_experts: E={E} is not divisible by the expert-parallel size {topo.G}; "
                          f"allowed: a positive multiple of {topo.G}")
    if not 1 <= K <= E:
        raise ConfigError(f"top_k: {K} is not allowed with num_experts={E}; allowed: 1..{E}")
    attention_model(profiles[1], config.tokens_per_rank)
    if config.warmup >= config.iterations:
        raise ConfigError(f"warmup: {config.warmup} is not allowed; allowed: 0..iterations-1 ({config.iterations - 1})")
    # one iteration's routing of every layer: [G * T, E] maps and the tokens' gate inputs
    check_host_memory(4 * config.layers * topo.G * config.tokens_per_rank * (E + config.stream.subspace_dim),
                      "tokens_per_rank, layers, num_experts", f"the routing of {topo.G} ranks")
    defaults = dict(max_fn=config.max_fn, gamma=config.gamma, every=config.swap_every,
                    history=config.smartmoe_history, method=config.smartmoe_method, charge=config.charge, buffer=config.buffer,
                    capacity_factor=config.capacity_factor, swap_cost=config.swap_cost)
    systems = tuple(parse_system(s, defaults) for s in config.systems)
    for s in systems:
        if s.route == "fixed" and s.dim > topo.D:
            raise ConfigError(f"systems: {s.name} needs d={s.dim} but topology {topo.name!r} has D = {topo.D}; "
                              f"allowed: d = 1..{topo.D}")
    if len({s.name for s in systems}) != len(systems):
        raise ConfigError("systems: a system is listed twice")
    return Resolved(config, model, topo, profiles[0], profiles[1], systems, E, K)


def run_profile(name: str, topology: Topology | None) -> HardwareProfile:
    """A named profile; for a topology that is a whole-node prefix of the profile's one (fewer
    nodes of the same testbed, Table IV's G sweep) the same constants re-keyed to it (named
    `<profile>@<topology>`, its notes ending in a REKEYED line)."""
    profile = load_profile(name)
    if topology is None:
        return profile
    try:
        check_profile(profile, topology)
        return profile
    except ValueError:
        full = profile.get_topology()
        same_below = [(lv.name, lv.fanout) for lv in full.levels[1:]] == [(lv.name, lv.fanout) for lv in topology.levels[1:]]
        if topology.D == full.D and same_below and topology.levels[0].fanout <= full.levels[0].fanout:
            return dataclasses.replace(profile, name=f"{profile.name}@{topology.name}", topology=topology.name,
                                       notes=f"{profile.notes}\n{REKEYED.format(topology=topology.name)}")
        raise


# ------------------------------------------------------------------------------------------
# per-system AlltoAll time of one layer in one iteration
# ------------------------------------------------------------------------------------------
def a2a_time(spec: SystemSpec, counts: DispatchCounts, counts_GS: torch.Tensor | None, rz: Resolved
             ) -> tuple[float, int]:
    """(modeled ms of the layer's AlltoAlls in one iteration: dispatch, combine and their backward
    twins; route dimension used). `counts_GS`: the ranks' (token, expert) counts per slot, [G, E]
    (Tutel's capacity; None for the other systems)."""
    rb, wb, prof, buf = rz.row_bytes, rz.config.weight_bytes, rz.profile, spec.buffer
    if spec.route == "tutel-2dh":
        C = capacity_of(counts_GS, rz.config.tokens_per_rank, rz.top_k, spec.capacity_factor)
        cs = tutel_2dh_collectives(rz.topology, rz.num_experts, C, rb, with_levels=False)
        return sum(collective_time(c, prof, buf) for c in cs if spec.charge == "all" or c.what == "tokens"), 2
    if spec.route == "deepep":
        if spec.charge == "tokens":
            return route_time(counts, min(2, rz.topology.D), True, prof, rb, wb, "tokens", buf), 2
        return deepep_time(counts, prof, rb, wb, overlap=spec.overlap, buffer=buf), 2
    if spec.route == "flat":
        return flat_time(counts, prof, rb, wb, spec.charge, buf), 1
    if spec.route == "fixed":
        return route_time(counts, spec.dim, spec.dedup, prof, rb, wb, spec.charge, buf), spec.dim
    times = iteration_times(counts, prof, rb, wb, spec.charge, buf)
    d = select_dimension(times)
    agree = allreduce_time(prof, agreement_bytes(rz.topology)) if spec.charge == "all" else 0.0
    return times[d] + agree, d


# ------------------------------------------------------------------------------------------
# expert moves: what moves, over which link, and what the planners exchange
# ------------------------------------------------------------------------------------------
def expert_state_bytes(model: ModelConfig) -> int:
    """Bytes one moved expert carries, after the optimizer step (gradients are consumed): bf16
    weights, fp32 master weights and two fp32 Adam moments, 14 bytes per parameter."""
    gemms = 3 if model.ffn_kind == "swiglu" else 2
    return gemms * model.hidden * model.moe_ffn_hidden * 14


def p2p_time(profile: HardwareProfile, topology: Topology, src: int, dst: int, nbytes: int, *,
             shared: bool = False) -> float:
    """Modeled ms of one point-to-point message src -> dst, from the AlltoAll step whose messages
    cross exactly that link's level (Inter-(l+1) for level l, the final Intra step for the finest
    level). That step's beta is per byte of a rank's buffer, of which (fan - 1) / fan crosses the
    link, while all the ranks behind the link (G / U[l+1] of them: the GPUs of a node for the
    inter-node link) send at once. A lone message has the link to itself: alpha + beta * n *
    fan / (fan - 1) / (G / U[l+1]). `shared`: the message gets only one rank's share of the link,
    as inside the AlltoAll the fit measured (no division; the ablation)."""
    level = topology.link_level(src, dst)
    if level is None:
        return 0.0
    D, U, G = topology.D, topology.U, topology.G
    if D == 1:
        step, fan = "flat", G
    elif level + 1 < D:
        step, fan = f"inter-{level + 1}", U[level + 1] // U[level]
    else:
        step, fan = f"intra-{D - 1}", U[D] // U[D - 1]
    sharing = 1 if shared else G // U[level + 1]
    model = profile.comm_model("a2a", step)
    return model.alpha_ms + model.beta_ms * nbytes * fan / max(fan - 1, 1) / sharing


def migration_time(old: ExpertPlacement, new: ExpertPlacement, rz: Resolved, shared: bool = False) -> float:
    """Modeled link ms of moving the experts whose owner changed: one message per expert; the moves
    leaving one GPU one after another, different GPUs' concurrently (full-duplex links, so a swap's
    two directions overlap); `shared` as in `p2p_time`."""
    topo, El = rz.topology, rz.num_experts // rz.topology.G
    nbytes = expert_state_bytes(rz.model)
    per_sender: dict[int, float] = {}
    for a, b in zip(old.slot_of_expert, new.slot_of_expert):
        src, dst = a // El, b // El
        if src != dst:
            per_sender[src] = per_sender.get(src, 0.0) + p2p_time(rz.profile, topo, src, dst, nbytes, shared=shared)
    return max(per_sender.values(), default=0.0)


class LayerRouting:
    """One layer's routing in one iteration and what every system derives from it, computed once
    per expert placement (the systems on one placement share it): the sorted slot lists, the
    per-origin counts, the per-rank slot loads, the expert compute and HierD-ES's statistics."""

    def __init__(self, full_map_TE: torch.Tensor, rz: "Resolved"):
        self.rz, self.full_map = rz, full_map_TE
        G = rz.topology.G
        self.rows_E = full_map_TE.sum(0)
        self.counts_GE = full_map_TE.view(G, -1, rz.num_experts).sum(1)
        self.origin_N = torch.arange(G).repeat_interleave(full_map_TE.shape[0] // G)
        self._slots: dict[ExpertPlacement, torch.Tensor] = {}
        self._counts: dict[ExpertPlacement, tuple] = {}
        self._tables: dict[ExpertPlacement, torch.Tensor] = {}
        self._stats: dict = {}

    def slots(self, placement: ExpertPlacement) -> torch.Tensor:
        if placement not in self._slots:
            self._slots[placement] = selected_slots(self.full_map, placement)[0]
        return self._slots[placement]

    def _derived(self, placement: ExpertPlacement, counts: DispatchCounts) -> tuple[DispatchCounts, torch.Tensor, float]:
        """`of`'s entry from the placement's dispatch counts."""
        return (counts, self.counts_GE[:, list(placement.expert_of_slot)],
                expert_compute_ms(self.rz, self.rows_E, placement))

    def of(self, placement: ExpertPlacement) -> tuple[DispatchCounts, torch.Tensor, float]:
        """(dispatch counts, per-rank counts per slot [G, E], expert compute ms) under `placement`."""
        if placement not in self._counts:
            self._counts[placement] = self._derived(placement, counts_from_slots(
                self.slots(placement), self.origin_N, self.rz.topology, self.rz.num_experts))
        return self._counts[placement]

    def tables(self, placement: ExpertPlacement) -> torch.Tensor:
        """HierD-ES's four-case counts under `placement` (`swap_tables`)."""
        if placement not in self._tables:
            self._tables[placement] = swap_tables(self.slots(placement), self.rz.num_experts, self.rz.topology.U[1:])
        return self._tables[placement]

    def swap_stats(self, placement: ExpertPlacement):
        if placement not in self._stats:
            self._stats[placement] = swap_stats_from_tables(self.of(placement)[0], self.tables(placement))
        return self._stats[placement]

    def move(self, old: ExpertPlacement, new: ExpertPlacement) -> None:
        """Derive `new`'s slot lists, counts and HierD-ES tables from `old`'s, in their place (a
        planner that goes on from `new` needs `old` no more). A token that selects none of the
        experts whose slot changed keeps its slot list, and every count is a sum over tokens, so
        only the other tokens are counted again: out under `old`, in under `new` (a swap: about
        2 K / E of the tokens). The same tensors as deriving `new` afresh, bit for bit (tested)."""
        if new == old:
            return
        topo, E = self.rz.topology, self.rz.num_experts
        ids = self.slots(old)
        counts, tables = self.of(old)[0], self.tables(old)
        # old slot -> new slot of the same expert; the padding slot E stays
        remap = torch.tensor(new.slot_of_expert + (E,))[torch.tensor(old.expert_of_slot + (E,))]
        hit = (remap[ids] != ids).any(1)
        before = ids[hit]
        after = torch.sort(remap[before], dim=1).values
        origin = self.origin_N[hit]
        lost, gained = counts_from_slots(before, origin, topo, E), counts_from_slots(after, origin, topo, E)

        def recount(total: RouteCounts, lost: RouteCounts, gained: RouteCounts) -> RouteCounts:
            return RouteCounts(topo, total.dedup, tuple(t - o + i for t, o, i in zip(total.by_level, lost.by_level,
                                                                                       gained.by_level)))

        slots_new = ids.clone()
        slots_new[hit] = after
        self._slots[new] = slots_new
        self._counts[new] = self._derived(new, DispatchCounts(recount(counts.copies, lost.copies, gained.copies),
                                                              recount(counts.pairs, lost.pairs, gained.pairs), E))
        self._tables[new] = tables - swap_tables(before, E, topo.U[1:]) + swap_tables(after, E, topo.U[1:])
        for cache in (self._slots, self._counts, self._tables, self._stats):
            cache.pop(old, None)


class SystemState:
    """One system's per-layer placements and planner memory across iterations."""

    def __init__(self, spec: SystemSpec, rz: Resolved):
        self.spec, self.rz = spec, rz
        self.placements = [ExpertPlacement.identity(rz.num_experts) for _ in range(rz.config.layers)]
        self.loads: list[list[torch.Tensor]] = [[] for _ in range(rz.config.layers)]

    def update(self, iteration: int, layer: int, routing: "LayerRouting", dim: int
               ) -> tuple[float, dict[str, float], float, int]:
        """Plan after this iteration's dispatch: (planning seconds in this process, modeled link ms of
        the moves per swap_cost, modeled ms of the planner's all-reduce, experts moved)."""
        spec, old, rz = self.spec, self.placements[layer], self.rz
        if spec.planner == "none" or (iteration + 1) % spec.every:
            return 0.0, {"overlap": 0.0, "exposed": 0.0, "shared": 0.0}, 0.0, 0
        start = time.perf_counter()
        if spec.planner == "smartmoe":
            self.loads[layer] = (self.loads[layer] + [routing.rows_E])[-spec.history:]
            new = smartmoe_placement(sum(self.loads[layer]), old, rz.topology.G, spec.method)
            plan_bytes = rz.num_experts * COUNT_BYTES
        else:
            stats = routing.swap_stats(old)
            decision = decide_swap(stats, old, rz.profile, rz.row_bytes, max_fn=spec.max_fn, gamma=spec.gamma,
                                   dim=dim if spec.route != "flat" else 1, weight_bytes=rz.config.weight_bytes)
            new = old.swap(*decision.pair) if decision.pair else old
            plan_bytes = stats_bytes(rz.topology, rz.num_experts)
        planning_s = time.perf_counter() - start
        self.placements[layer] = new
        moved = sum(1 for a, b in zip(old.slot_of_expert, new.slot_of_expert) if a != b)
        lone = migration_time(old, new, rz)
        links = {"overlap": lone, "exposed": lone, "shared": migration_time(old, new, rz, shared=True)}
        return planning_s, links, allreduce_time(rz.profile, plan_bytes), moved


# ------------------------------------------------------------------------------------------
# compute model of the end-to-end step (borrowed constants, see the module docstring)
# ------------------------------------------------------------------------------------------
def _gemm(rz: Resolved, macs: float) -> float:
    return rz.compute.compute_time("gemm", macs) if macs > 0 else 0.0


def attention_model(compute: HardwareProfile, sequence: int) -> LinearModel:
    """The compute profile's attention model at this sequence length (`attention_L<L>`, one entry
    per measured length; ATTENTION_READING); ConfigError naming the lengths it has otherwise."""
    key = f"attention_L{sequence}"
    if key not in compute.compute:
        have = sorted((k for k in compute.compute if re.fullmatch(r"attention_L\d+", k)), key=lambda k: int(k[11:]))
        raise ConfigError(f"tokens_per_rank: {sequence} (the sequence length, micro-batch 1) has no attention model "
                          f"in compute_profile {compute.name!r}: no compute entry {key!r}; allowed: "
                          + (", ".join(k[11:] for k in have) + f" (entries {', '.join(have)})" if have else
                             "none (the profile has no attention_L<L> entry)"))
    return compute.compute[key]


def dense_compute_ms(rz: Resolved) -> float:
    """Forward + backward of everything but the routed experts, one GPU, whole model: attention
    (projections by the GEMM model, the core by FSMoE's attention model, ATTENTION_READING), gate,
    shared experts, dense FFN layers, LM head."""
    m, L = rz.model, rz.config.tokens_per_rank
    heads, kv, hd = m.num_heads, m.num_kv_heads or m.num_heads, m.head_dim or m.hidden // m.num_heads
    proj = _gemm(rz, L * m.hidden * heads * hd) * 2 + _gemm(rz, L * m.hidden * kv * hd) * 2
    core = attention_model(rz.compute, L).time_ms(4 * L * L * heads * hd)
    gemms = 3 if m.ffn_kind == "swiglu" else 2
    per_moe = _gemm(rz, L * m.hidden * rz.num_experts)
    if m.num_shared_experts:
        per_moe += gemms * _gemm(rz, L * m.hidden * (m.shared_expert_ffn_hidden or m.moe_ffn_hidden)
                                 * m.num_shared_experts)
    per_dense = gemms * _gemm(rz, L * m.hidden * (m.ffn_hidden or 1))
    forward = (m.num_layers * (proj + core) + m.num_moe_layers * per_moe + m.num_dense_layers * per_dense
               + _gemm(rz, L * m.hidden * m.vocab_size))
    return 3 * forward


def expert_compute_ms(rz: Resolved, rows_E: torch.Tensor, placement: ExpertPlacement) -> float:
    """Forward + backward of one MoE layer's routed experts on the slowest GPU: per expert with
    rows, one GEMM of the GEMM model per projection (alpha + beta * rows * M * H)."""
    gemms = 3 if rz.model.ffn_kind == "swiglu" else 2
    gemm = rz.compute.compute_model("gemm")
    rows_S = rows_E[list(placement.expert_of_slot)].view(rz.topology.G, -1).to(torch.float64)
    per_gpu = (rows_S > 0).sum(1) * gemm.alpha_ms + rows_S.sum(1) * (rz.model.hidden * rz.model.moe_ffn_hidden
                                                                      * gemm.beta_ms)
    return 3 * gemms * float(per_gpu.max())


# ------------------------------------------------------------------------------------------
def _plan_key(spec: SystemSpec) -> SystemSpec:
    """Specs that plan alike share a state: swap_cost only prices the same moves differently, and
    SmartMoE plans from raw loads whatever the route and the AlltoAll model (charge, buffer)."""
    if spec.planner == "smartmoe":
        return SystemSpec("", "flat", planner="smartmoe", every=spec.every, history=spec.history, method=spec.method)
    return dataclasses.replace(spec, name="", swap_cost="overlap")


def run_experiment(rz: Resolved, progress: bool | None = None) -> pd.DataFrame:
    """Tidy rows: one per (iteration, layer, system)."""
    cfg = rz.config
    stream = RoutingStream(rz.model, cfg.layers, rz.topology.G, cfg.tokens_per_rank, cfg.stream, cfg.seed,
                           num_experts=rz.num_experts, top_k=rz.top_k)
    # systems that plan alike share one planner state (an option that only changes how their time is
    # charged afterwards, swap_cost, does not change the plan)
    shared: dict[SystemSpec, SystemState] = {}
    for s in rz.systems:
        shared.setdefault(_plan_key(s), SystemState(s, rz))
    rows = []
    for it in tqdm(range(cfg.iterations), desc=f"{cfg.experiment} iterations", disable=None if progress is None
                   else not progress):
        layer_maps = stream.next_iteration()
        for layer, full_map in enumerate(layer_maps):
            routing = LayerRouting(full_map, rz)
            balance = routing_balance(full_map, rz.topology.G)
            updates: dict[SystemSpec, tuple] = {}
            for spec in rz.systems:
                st = shared[_plan_key(spec)]
                placement = st.placements[layer] if _plan_key(spec) not in updates else updates[_plan_key(spec)][0]
                counts, counts_GS, expert_ms = routing.of(placement)
                ms, d = a2a_time(spec, counts, counts_GS, rz)
                if _plan_key(spec) not in updates:
                    updates[_plan_key(spec)] = (placement, st.update(it, layer, routing, d))
                planning_s, links, plan_comm_ms, moved = updates[_plan_key(spec)][1]
                rows.append({"iteration": it, "layer": layer, "system": spec.name, "dim": d, "a2a_ms": ms,
                             "expert_compute_ms": expert_ms, "planning_ms": planning_s * 1e3,
                             "migration_ms": links[spec.swap_cost], "plan_comm_ms": plan_comm_ms,
                             "moved_experts": moved, "swap_cost": spec.swap_cost, **balance})
    frame = pd.DataFrame(rows)
    frame.insert(0, "experiment", cfg.experiment)
    for key, value in (("model", rz.model.name), ("topology", rz.topology.name), ("G", rz.topology.G),
                       ("E", rz.num_experts), ("K", rz.top_k), ("M", rz.model.hidden), ("tier", "sim"),
                       ("profile", rz.profile.name), ("warmup", cfg.warmup), ("skew", cfg.stream.skew),
                       ("drift", cfg.stream.drift),
                       ("capacity_factor", cfg.capacity_factor), ("compute_profile", rz.compute.name),
                       ("num_layers", rz.model.num_layers), ("n_group", rz.model.n_group),
                       ("topk_group", rz.model.topk_group)):
        frame[key] = value
    frame["dense_compute_ms"] = dense_compute_ms(rz)
    frame["moe_layers_total"] = rz.model.num_moe_layers
    return frame


def summarize_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Per system and measured iteration (after warm-up): mean per-layer AlltoAll ms and the
    modeled end-to-end iteration ms (layers scaled to the model's MoE layer count). The moves'
    link time (planner all-reduce included) is charged beyond the backward compute it hides under
    ('overlap') or in full ('exposed', 'shared'; module docstring)."""
    measured = frame[frame["iteration"] >= frame["warmup"]]
    per_it = measured.groupby(["system", "iteration"], sort=False).agg(
        a2a_ms=("a2a_ms", "mean"), expert_ms=("expert_compute_ms", "mean"), migration_ms=("migration_ms", "mean"),
        plan_comm_ms=("plan_comm_ms", "mean"), moved=("moved_experts", "mean"), layers=("layer", "nunique"),
        dense_ms=("dense_compute_ms", "first"), moe_layers=("moe_layers_total", "first"),
        swap_cost=("swap_cost", "first")).reset_index()
    compute = per_it["dense_ms"] + per_it["moe_layers"] * per_it["expert_ms"]
    per_it["e2e_ms_no_migration"] = per_it["dense_ms"] + per_it["moe_layers"] * (per_it["a2a_ms"] + per_it["expert_ms"])
    per_it["swap_link_ms"] = per_it["moe_layers"] * (per_it["migration_ms"] + per_it["plan_comm_ms"])
    hidden_under = compute * 2 / 3                                # the backward part of the compute
    exposed = (per_it["swap_link_ms"] - hidden_under).clip(lower=0)
    per_it["swap_exposed_ms"] = exposed.where(per_it["swap_cost"] == "overlap", per_it["swap_link_ms"])
    # (swap_cost 'exposed' and 'shared' charge the link time in full; 'shared' also gives each move
    # only one rank's share of its link, planned in SystemState.update)
    per_it["e2e_ms"] = per_it["e2e_ms_no_migration"] + per_it["swap_exposed_ms"]
    return per_it


def uniform_paper_model(model: str, topology: str = "hiermoe-testbed", profile: str = "hiermoe-testbed",
                        tokens_per_rank: int = 1024, bytes_per_elem: int = 2, top_k: int | None = None,
                        num_experts: int | None = None) -> dict[str, float]:
    """The paper's own model (Eqs. (1)-(5), its Fig. 9 constants) under idealised uniform routing:
    every count at its expectation (digest section 3.7), no skew, no sampling noise, token rows
    only. Speedups of HD2 and of HDd* over the flat AlltoAll, and d*: what the paper's model itself
    predicts for the paper's setting, a reference for the measured numbers."""
    from impl.hiermoe.dimension import paper_time, paper_times, uniform_counts

    m, topo = get_model(model), get_topology(topology)
    prof = run_profile(profile, topo)
    E, K, T = num_experts or m.num_experts, top_k or m.top_k, tokens_per_rank
    row_bytes = m.hidden * bytes_per_elem
    flat = paper_time(uniform_counts(topo, E, K, T, False), 1, prof, row_bytes)
    times = paper_times(uniform_counts(topo, E, K, T, True), prof, row_bytes)
    d = select_dimension(times)
    return {"HD2": flat / times[2], "HD-MoE": flat / times[d], "d_star": float(d)}


def make_sim_record(rz: Resolved, frame: pd.DataFrame) -> dict:
    per_it = summarize_frame(frame)
    metrics = {}
    for system, g in per_it.groupby("system", sort=False):
        metrics[f"a2a_ms_per_layer/{system}"] = g["a2a_ms"].tolist()
        metrics[f"e2e_ms_modeled/{system}"] = g["e2e_ms"].tolist()
        metrics[f"e2e_ms_modeled_no_migration/{system}"] = g["e2e_ms_no_migration"].tolist()
    metrics["max_split_ratio"] = frame.groupby(["iteration", "layer"])["max_split_ratio"].first().tolist()
    metrics["maxvio"] = frame.groupby(["iteration", "layer"])["maxvio"].first().tolist()
    return make_record(
        experiment=rz.config.experiment, system=",".join(s.name for s in rz.systems), tier="sim",
        topology=rz.topology,
        model={"name": rz.model.name, "num_experts": rz.num_experts, "top_k": rz.top_k, "hidden": rz.model.hidden,
               "tokens_per_rank": rz.config.tokens_per_rank, "layers_simulated": rz.config.layers},
        config=rz.config, metrics=metrics, seed=rz.config.seed,
        trace_id=f"gate:{rz.model.gate_kind}:token-stream:skew={rz.config.stream.skew}:seed={rz.config.seed}",
        extra={"profile": rz.profile.name, "compute_profile": rz.compute.name,
               "note": "times are modeled (alpha-beta profile); volumes exact from routing masks"})


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME={"a": {"b": 1}}' -> (NAME, ['a.b=1']): a named set of overrides (ConfigError if malformed)."""
    import json

    import yaml

    name, sep, body = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--variant {text!r}: expected NAME=MAPPING, e.g. skew-1='{{\"stream\": {{\"skew\": 1.0}}}}'")
    try:
        mapping = yaml.safe_load(body) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--variant {name}: its overrides are not YAML: {e}".splitlines()[0]) from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"--variant {name}: its overrides must be a mapping of config keys, got {mapping!r}")

    def flatten(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from flatten(f"{prefix}{key}.", item)
        else:
            yield f"{prefix[:-1]}={json.dumps(value)}"

    return name.strip(), list(flatten("", mapping))


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m impl.experiments.hiermoe.sim", __doc__, config=SimExperimentConfig,
                        outputs=("csv", "record"), progress=True)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="run once per variant (overrides after the config file, before --set); repeatable")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant] or [("", [])]
        if len({name for name, _ in variants}) != len(variants):
            raise ConfigError("--variant: a variant name is given twice")
        resolved = [(name, resolve(build_config(SimExperimentConfig, args.config, overrides + args.overrides)))
                    for name, overrides in variants]
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    frames, records = [], {}
    for name, rz in resolved:
        frame = run_experiment(rz, progress=False if args.no_progress else None)
        frame.insert(1, "variant", name)
        frames.append(frame)
        records[name] = make_sim_record(rz, frame)
    frame = pd.concat(frames, ignore_index=True)
    if len(resolved) == 1:
        record = records[resolved[0][0]]
    else:                                   # one record of the sweep: every variant's config and metrics
        first = records[resolved[0][0]]
        record = make_record(
            experiment=first["experiment"], system=first["system"], tier="sim", topology=resolved[0][1].topology,
            model=first["model"], config={name: dataclasses.asdict(rz.config) for name, rz in resolved},
            metrics={f"{name}/{key}": value for name, rec in records.items() for key, value in rec["metrics"].items()},
            seed=resolved[0][1].config.seed, trace_id=first.get("trace_id"), extra={"variants": [n for n, _ in resolved]})
    cli.write_csv_and_record(frame, args.out_csv, record, args.out_record)
    for name, rz in resolved:
        part = frame[frame["variant"] == name]
        summary = summarize_frame(part).groupby("system", sort=False)["a2a_ms"].median()
        base = summary.get("Megatron-LM")
        for system, ms in summary.items():
            ratio = f"  speedup over Megatron-LM {base / ms:.2f}x" if base else ""
            print(f"{(name + ': ') if name else ''}{system:>24}: AlltoAll {ms:8.2f} ms per layer per iteration "
                  f"(modeled){ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
