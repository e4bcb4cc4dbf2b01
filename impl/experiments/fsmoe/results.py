"""Every sim-tier result of the FSMoE paper from the FSMoE system and its baselines' plans, on the
shipped Testbed A and B profiles (times MODELED from their alpha-beta models):

* `grid`: Table 4's 1,458 configured layers per testbed, each a stack of `grid_blocks` identical
  blocks (the released optimiser's default stack of 2; the paper's "one block with its gradient
  aggregation" leaves no later block to hide a gradient in); every plan's degrees and makespan,
  rows labelled figure `grid` (`GRID_FIGURE`); Table 5 is the mean of the per-layer speedups over Tutel;
* `statistic`: how many configured layers have different best forward and backward degrees
  (paper: 912 of 1,458 on Testbed B), under each reading the paper leaves open: r in 1..8 or
  {1, 2, 4, 8}; backward with its layer's gradient (t_gar) or without; with the released
  solver's rules (one un-pipelined AlltoAll under 1 ms -> r = 1; r_fwd = 1 -> r_bwd = 1) or not;
* `table2`: per-operation times of one GPT2-XL-MoE and one Mixtral-7B block (B = 4, L = 1024);
* `models`: Fig. 6 (GPT2-XL-MoE and Mixtral-7B on A and B, Mixtral-22B on A), Fig. 7 (L and P
  sweeps on A), Fig. 8 (GPipe, PP = 2, on A), Table 6 (the gates on B): iteration times of every
  plan; speedups are computed when figures aggregate; Fig. 8 also under each `PP_ABLATIONS` entry
  (one GPipe assumption changed for every plan, rows labelled `fig8:<name>`);
  beside every plan, DeepSpeed-MoE's sequential plan under each `DS_MOE_ABLATIONS` entry (its
  `DsAblation.description`), each a row with its own system name (the grid has none: no result
  over DS-MoE is read from the configured layers);
* every figure of `grid` and `models` (the configured layers, Figs. 6-8, Table 6) also under each
  `CONTENTION_ABLATIONS` entry: the same plans' schedules timed with contending lanes, rows
  labelled `<figure>:<name>` (`_contention_rows`);
* `order`: what a plan's gap over its lower bound is made of, on `order_sample` configured
  layers per testbed: every plan's iteration, the same tasks in the lane orders a local search
  finds (`timeline.search_order`, `order_tries` moves), and the bound;
* `links`: each testbed's communication betas under the profile's unit and the other one (per
  float element / per byte, digest §8.5): the per-GPU bus rate each implies and the load on the
  link it crosses against Table 3's line rate.

    python -m impl.experiments.fsmoe.results --config workflows/config/experiments/fsmoe.yaml \\
        --part grid --out-csv grid.csv --out-record grid.json

Model shapes the paper leaves unstated (digest §6.3, ours): GPT2-XL M 1600, 25 heads, H = 4M,
48 layers (GPT2-XL's depth); Mixtral-8x7B M 4096, H 14336, 32 heads, 8 KV heads, 7 layers (the
paper's count); Mixtral-8x22B M 6144, H 16384, 48 heads, 8 KV heads, 33 layers (the paper's). For
Fig. 8, each of the two pipeline stages is half the nodes with half the layers, 4 micro-batches.
"""
from __future__ import annotations

import functools
import inspect
import math
import random
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

import pandas as pd
from tqdm import tqdm

from impl.common import cli
from impl.common.config import MAX_LAYERS, MAX_REPEATS, MAX_TOKENS, SEED_MAX, ConfigError, bounded, checked
from impl.common.costmodel import HardwareProfile, LinearModel, load_profile
from impl.common.paper import read_paper_csv
from impl.common.records import make_record
from impl.common.timeline import Schedule, lower_bound, search_order, simulate
from impl.experiments.fsmoe.degrees import GRID, grid_shapes
from impl.experiments.fsmoe.systems import FSMOE_SYSTEMS
from impl.fsmoe.costs import BlockCosts, BlockShape, block_costs, with_gshard_order
from impl.fsmoe.degree import DOMAINS, integer_optimum
from impl.fsmoe.schedules import LANES_3, fsmoe_pass, gpipe_iteration

__all__ = ["ResultsConfig", "MODELS", "Part", "RUNNERS", "PARTS", "READINGS", "TABLE2_PROFILES", "table2_factors", "DS_MOE_MP_ALLREDUCE", "DS_MOE_ABLATIONS", "DsAblation", "PP_ABLATIONS", "PpAblation", "CONTENTION", "CONTENTION_ABLATIONS", "FIG8", "GRID_FIGURE", "read_profile", "validate", "run_grid", "run_statistic", "run_table2", "run_models", "run_order", "run_links", "comm_unit", "main"]

PROG = "python -m impl.experiments.fsmoe.results"


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    ffn_hidden: int
    heads: int
    layers: int
    kv_heads: int | None = None
    ffn: Literal["gpt", "mixtral"] = "gpt"


MODELS = {"gpt2-xl": ModelSpec(1600, 6400, 25, 48),
          "mixtral-7b": ModelSpec(4096, 14336, 32, 7, 8, "mixtral"),
          "mixtral-22b": ModelSpec(6144, 16384, 48, 33, 8, "mixtral")}


# name -> what the reading changes (the report's ablation list reads these)
READINGS = {
    "published": "the profiles as they load",
    "gemm-per-byte": "the GEMM beta read per multiply-accumulate instead of per 1/4 (experts and dense GEMMs 4x faster)",
    "comm-other-unit": "every communication beta read in the other unit than its profile's: Testbed A's per byte "
                       "(links 4x slower), Testbed B's per float element (links 4x faster)",
    "paper-table2": "every operation's model scaled so that Table 2's blocks take the paper's times: per testbed and "
                    "operation (AlltoAll, AllGather, ReduceScatter, AllReduce, and the GEMM by the experts' times), "
                    "alpha and beta times the geometric mean of the paper's Table 2 time over ours",
}
# the profile each testbed's Table 2 comes from; Fig. 7's subsets of Testbed A share its factors
TABLE2_PROFILES = {"A": "fsmoe-testbed-a", "B": "fsmoe-testbed-b"}
TABLE2_MODELS = ("gpt2-xl", "mixtral-7b")
# Table 2's operations -> the profile's model each is priced with
TABLE2_SCALED = {"AlltoAll": ("comm", "a2a"), "AllGather": ("comm", "allgather"),
                 "ReduceScatter": ("comm", "reducescatter"), "AllReduce": ("comm", "allreduce"),
                 "Experts": ("compute", "gemm")}
ELEMENT_BYTES = 4                       # the paper's runs are fp32


def comm_unit(model: LinearModel) -> str:
    """The unit a communication beta is read in: 'float32 element' or 'byte' (the profile's
    beta_unit_size; a beta without one, e.g. a calibration's, is per byte)."""
    size = (model.published or {}).get("beta_unit_size", 1)
    if size not in (1, ELEMENT_BYTES):
        raise ConfigError(f"beta_unit_size: {size!r} is not allowed for a communication beta; allowed: 1 (byte), "
                          f"{ELEMENT_BYTES} (float32 element)")
    return "float32 element" if size == ELEMENT_BYTES else "byte"


def _other_unit(model: LinearModel) -> LinearModel:
    """The same published beta read in the other unit (per float element <-> per byte)."""
    size = ELEMENT_BYTES if comm_unit(model) == "float32 element" else 1
    other = 1 if size == ELEMENT_BYTES else ELEMENT_BYTES
    published = {**(model.published or {"beta": model.beta_ms}), "beta_unit_size": other,
                 "beta_unit": "byte" if other == 1 else "float32 element"}
    return replace(model, beta_ms=model.beta_ms * size / other, published=published)


def _table2_ops(profile: HardwareProfile, model: str, batch: int, seq: int) -> dict[str, dict[str, float]]:
    """Table 2's operations of one block of `model` on `profile`: phase -> op -> ms."""
    bc = block_costs(_model_shape(MODELS[model], profile, seq, batch=batch), profile)
    return {phase: {"AlltoAll": 2 * m.a2a.at(1), "AllGather": m.ag.at(1), "ReduceScatter": m.rs.at(1),
                    "Experts": m.exp.at(1), "AllReduce": bc.t_ar(bc.grad_bytes) if phase == "bwd" else 0.0,
                    "Attention": bc.dense_fwd_ms if phase == "fwd" else bc.dense_bwd_ms,
                    "MP AllGather+ReduceScatter": bc.mp_ag_ms + bc.mp_rs_ms}
            for phase, m in (("fwd", bc.fwd), ("bwd", bc.bwd))}


@functools.cache
def table2_factors(testbed: str, batch: int, seq: int) -> dict[str, float]:
    """Per `TABLE2_SCALED` operation: the geometric mean over Table 2's models and phases of the
    paper's time over ours on the testbed's published profile (entries the paper prints as 0 left out).
    Computed once per setting (every profile read with this reading asks for it); read, never changed."""
    paper = read_paper_csv("fsmoe_table2")[0]
    profile = load_profile(TABLE2_PROFILES[testbed])
    logs: dict[str, list[float]] = {op: [] for op in TABLE2_SCALED}
    for model in TABLE2_MODELS:
        for phase, ops in _table2_ops(profile, model, batch, seq).items():
            for op in TABLE2_SCALED:
                theirs = paper[(paper.testbed == testbed) & (paper.model == model) & (paper.phase == phase) &
                               (paper.op == op)]["value"]
                if len(theirs) and float(theirs.iloc[0]) > 0 and ops[op] > 0:
                    logs[op].append(math.log(float(theirs.iloc[0]) / ops[op]))
    return {op: math.exp(sum(v) / len(v)) for op, v in logs.items()}


def _table2_testbed(profile: HardwareProfile) -> str:
    name = profile.name.split("@")[0]
    for testbed, published in TABLE2_PROFILES.items():
        if name == published or name.startswith(f"{published}-"):
            return testbed
    raise ConfigError(f"reading: 'paper-table2' is not allowed for profile {profile.name!r}; allowed: the profiles "
                      f"of Table 2's testbeds ({', '.join(TABLE2_PROFILES.values())} and their subsets)")


def _scaled(model: LinearModel, factor: float) -> LinearModel:
    return replace(model, alpha_ms=model.alpha_ms * factor, beta_ms=model.beta_ms * factor)


def read_profile(profile: HardwareProfile, reading: str, table2: tuple[int, int] = (4, 1024)) -> HardwareProfile:
    """The profile under one reading of the paper's units (digest §8.5), for ablations:
    'published' (as the profiles load: Testbed A's communication betas per float element, B's per
    byte, see their notes; GEMM beta per 1/4 multiply-accumulate), 'gemm-per-byte' (the GEMM beta
    per multiply-accumulate: experts and dense GEMMs 4x faster), 'comm-other-unit' (every
    communication beta in the other unit: A's per byte, 4x slower links; B's per float element,
    4x faster), 'paper-table2' (every operation scaled to the paper's Table 2, `table2_factors` at
    Table 2's (batch, seq) `table2`)."""
    if reading == "published":
        return profile
    if reading == "gemm-per-byte":
        compute = {k: replace(m, beta_ms=m.beta_ms / 4) if k == "gemm" else m for k, m in profile.compute.items()}
        return replace(profile, name=f"{profile.name}[{reading}]", compute=compute)
    if reading == "comm-other-unit":
        comm = {k: _other_unit(m) for k, m in profile.comm.items()}
        return replace(profile, name=f"{profile.name}[{reading}]", comm=comm)
    if reading == "paper-table2":
        factors = table2_factors(_table2_testbed(profile), *table2)
        by_model = {key: factors[op] for op, key in TABLE2_SCALED.items()}
        comm = {k: _scaled(m, by_model[("comm", k[0])]) for k, m in profile.comm.items()}
        compute = {k: _scaled(m, by_model[("compute", k)]) if ("compute", k) in by_model else m
                   for k, m in profile.compute.items()}
        return replace(profile, name=f"{profile.name}[{reading}]", comm=comm, compute=compute)
    raise ConfigError(f"reading: {reading!r} is not allowed; allowed: {', '.join(READINGS)}")


@dataclass(frozen=True)
class ResultsConfig:
    testbeds: dict[str, str] = field(default_factory=lambda: {"A": "fsmoe-testbed-a", "B": "fsmoe-testbed-b"})
    reading: Literal["published", "gemm-per-byte", "comm-other-unit", "paper-table2"] = "published"
    grid_blocks: int = bounded(2, ge=1, le=MAX_LAYERS)
    grid_sample: int | None = bounded(None, ge=1, le=MAX_REPEATS)   # a random sample of n configured layers per testbed (None: all 1,458)
    seq: dict[str, int] = bounded(ge=1, le=MAX_TOKENS, default_factory=lambda: {"A": 1024, "B": 256})
    fig6: tuple[tuple[str, str], ...] = (("A", "gpt2-xl"), ("A", "mixtral-7b"), ("A", "mixtral-22b"),
                                         ("B", "gpt2-xl"), ("B", "mixtral-7b"))
    fig7_seq: tuple[int, ...] = bounded((512, 1024, 2048), ge=1, le=MAX_TOKENS)
    fig7_profiles: dict[int, str] = field(default_factory=lambda: {16: "fsmoe-testbed-a-16", 32: "fsmoe-testbed-a-32",
                                                                     48: "fsmoe-testbed-a"})
    pp_micro_batches: int = bounded(4, ge=1, le=MAX_REPEATS)
    gates: tuple[Literal["gshard", "xmoe", "sigmoid", "expert_choice"], ...] = ("gshard", "xmoe", "sigmoid",
                                                                                 "expert_choice")
    order_sample: int = bounded(8, ge=1, le=MAX_REPEATS)      # configured layers per testbed in `order`
    order_tries: int = bounded(3000, ge=0, le=10**7)          # local-search moves per plan and layer
    table2_batch: int = bounded(4, ge=1, le=MAX_TOKENS)
    table2_seq: int = bounded(1024, ge=1, le=MAX_TOKENS)
    seed: int = bounded(0, ge=0, le=SEED_MAX)

    def __post_init__(self):
        for testbed, model in self.fig6:
            if model not in MODELS:
                raise ConfigError(f"fig6: model {model!r} is not allowed; allowed: {', '.join(MODELS)}")

    def check_part(self, part: str) -> None:
        """What a part needs of the config: Table 4's grid (grid, statistic) exists for the
        testbeds' profiles only; the real-model runs (models, table2) need Testbed A and B, every
        Fig. 6 testbed among `testbeds` and its sequence length in `seq`."""
        if part == "links":
            paper = set(read_paper_csv("fsmoe_table3")[0]["testbed"])
            for testbed in self.testbeds:
                if testbed not in paper:
                    raise ConfigError(f"testbeds: {testbed!r} is not allowed for --part links; allowed: "
                                      f"{', '.join(sorted(paper))} (Table 3's line rates)")
            return
        if part in ("grid", "statistic", "order"):
            for testbed, profile in self.testbeds.items():
                if profile not in GRID["seq"]:
                    raise ConfigError(f"testbeds.{testbed}: {profile!r} is not allowed for --part {part}; allowed: "
                                      f"{', '.join(GRID['seq'])} (Table 4's grid is per testbed)")
            return
        needed = {t for t, _ in self.fig6} | {"A", "B"}
        for testbed in sorted(needed):
            if testbed not in self.testbeds:
                raise ConfigError(f"testbeds: {testbed!r} is missing; the real-model runs use {', '.join(sorted(needed))}")
            if testbed not in self.seq:
                raise ConfigError(f"seq: {testbed!r} is missing; the real-model runs use {', '.join(sorted(needed))}")


def validate(cfg: ResultsConfig, part: str) -> None:
    """Everything one part needs before it runs: the part's config checks and every profile it
    loads, under the config's reading (`paper-table2` reads only Table 2's testbeds)."""
    if part not in PARTS:
        raise ConfigError(f"part: {part!r} is not allowed; allowed: {', '.join(PARTS)}")
    cfg.check_part(part)
    profiles = {f"testbeds.{k}": name for k, name in cfg.testbeds.items()}
    profiles.update({f"fig7_profiles.{n}": name for n, name in cfg.fig7_profiles.items()})
    for key, name in profiles.items():
        profile = checked(key, load_profile, name)
        if cfg.reading == "paper-table2" and part != "links":
            _table2_testbed(profile)


def _profiles(cfg: ResultsConfig) -> dict[str, HardwareProfile]:
    return {k: read_profile(load_profile(v), cfg.reading, (cfg.table2_batch, cfg.table2_seq))
            for k, v in cfg.testbeds.items()}


def _model_shape(spec: ModelSpec, profile: HardwareProfile, seq: int, gate: str = "gshard",
                 batch: int = 1) -> BlockShape:
    return BlockShape(batch, seq, spec.hidden, spec.ffn_hidden, spec.heads, profile.get_topology().num_nodes, 2, 1.2,
                      spec.ffn, spec.kv_heads, gate=gate)


DS_MOE_MP_ALLREDUCE = "DS-MoE (MP AllReduce)"


def _allreduce_mp(blocks: list[BlockCosts]) -> list[BlockCosts]:
    """The blocks with each sequence-parallel collective replaced by an AllReduce (a ReduceScatter
    and an AllGather), as tensor-parallel attention synchronises."""
    return [replace(bc, mp_ag_ms=bc.mp_ag_ms + bc.mp_rs_ms, mp_rs_ms=bc.mp_ag_ms + bc.mp_rs_ms) for bc in blocks]


def _einsum_order(blocks: list[BlockCosts]) -> list[BlockCosts]:
    """The blocks with GShard's one-hot einsum ordering charged for the sequence-parallel tokens."""
    return [with_gshard_order(bc, "sequence-parallel") for bc in blocks]


def _harness(blocks: list[BlockCosts]) -> list[BlockCosts]:
    """AllReduce MP attention, which leaves every GPU of the MP group with the block's tokens, and
    DeepSpeed's einsum ordering of all of them (`costs.gshard_order`, 'replicated')."""
    return [with_gshard_order(bc, "replicated") for bc in _allreduce_mp(blocks)]


@dataclass(frozen=True)
class DsAblation:
    """DeepSpeed-MoE's sequential plan on blocks with one or more costs changed: the rows' system
    name, the change, and what it is (the one description the rows' plan note and the report
    read)."""

    system: str
    blocks: Callable[[list[BlockCosts]], list[BlockCosts]]
    description: str

    @property
    def note(self) -> str:
        return f"ablation: {self.description}"


# name (as the report lists ablations) -> the DS-MoE variant run beside every model row
DS_MOE_ABLATIONS = {
    "ds-moe-mp-allreduce": DsAblation(
        DS_MOE_MP_ALLREDUCE, _allreduce_mp,
        "DS-MoE with tensor-parallel attention synchronised by AllReduce, as the released harness emulates "
        "DeepSpeed-MoE (ours: sequence-parallel AllGather / ReduceScatter)"),
    "ds-moe-einsum-order": DsAblation(
        "DS-MoE (einsum order)", _einsum_order,
        "DS-MoE with GShard's one-hot einsum ordering charged (dispatch and combine GEMMs of the sequence-parallel "
        "tokens; ours: sparse index ordering, uncharged for every system)"),
    "ds-moe-harness": DsAblation(
        "DS-MoE (harness)", _harness,
        "DS-MoE as the released harness emulates DeepSpeed-MoE: AllReduce MP attention and GShard's einsum ordering "
        "of the block's tokens on every GPU of the MP group (its 2 local experts not modeled)"),
}


def _ds_moe_ablation_row(labels: dict, ablation: DsAblation, makespan: float) -> dict:
    return {**labels, "system": ablation.system, "iteration_ms": makespan, "r_fwd": 1, "r_bwd": 1,
            "plan_note": ablation.note}


def _iteration_rows(blocks: list[BlockCosts], ds_moe_ablations: bool = True, **labels) -> list[dict]:
    """Every FSMoE-paper plan on `blocks`, plus (`ds_moe_ablations`) one row per `DS_MOE_ABLATIONS`
    entry: DeepSpeed-MoE's sequential plan on the blocks that ablation changes."""
    rows = []
    for system in FSMOE_SYSTEMS:
        plan = system.factory()(blocks)
        schedule = plan.schedule(blocks)
        timeline = simulate(schedule)
        rows.append({**labels, "system": system.name, "iteration_ms": timeline.makespan,
                     "over_lower_bound": timeline.makespan / lower_bound(schedule),
                     "moe_fwd_over_lower_bound": _pass_over_lower_bound(blocks[0], plan, "fwd"),
                     "moe_bwd_over_lower_bound": _pass_over_lower_bound(blocks[0], plan, "bwd"),
                     "r_fwd": plan.degrees[0][0], "r_bwd": plan.degrees[0][1], "plan_note": plan.note})
        rows += _contention_rows(schedule, plan, system.name, labels)
    ds_moe = FSMOE_SYSTEMS.get("DS-MoE").factory()
    for ablation in DS_MOE_ABLATIONS.values() if ds_moe_ablations else ():
        changed = ablation.blocks(blocks)
        rows.append(_ds_moe_ablation_row(labels, ablation, simulate(ds_moe(changed).schedule(changed)).makespan))
    return rows


def _pass_over_lower_bound(bc: BlockCosts, plan, phase: str) -> float:
    """One MoE pass of the plan's first block on its lanes: simulated makespan over the pass's
    `lower_bound` (no order of its tasks on those lanes can beat it)."""
    r = plan.degrees[0][0 if phase == "fwd" else 1]
    model = bc.fwd if phase == "fwd" else bc.bwd
    schedule = fsmoe_pass(r, lanes=plan.lanes).with_durations(lambda t: model.duration(t.kind, r))
    return simulate(schedule).makespan / lower_bound(schedule)


def run_grid(cfg: ResultsConfig, progress: bool | None = None) -> pd.DataFrame:
    rows = []
    for testbed, profile in _profiles(cfg).items():
        shapes = grid_shapes(cfg.testbeds[testbed], profile.get_topology().num_nodes)
        if cfg.grid_sample is not None:
            shapes = random.Random(cfg.seed).sample(shapes, min(cfg.grid_sample, len(shapes)))
        for i, shape in enumerate(tqdm(shapes, desc=f"configured layers, testbed {testbed}",
                                       disable=None if progress is None else not progress)):
            bc = block_costs(shape, profile)
            rows += _iteration_rows([bc] * cfg.grid_blocks, ds_moe_ablations=False, figure=GRID_FIGURE, testbed=testbed,
                                    layer=i, B=shape.batch, L=shape.seq, M=shape.hidden, H=shape.ffn_hidden,
                                    heads=shape.heads, f=shape.capacity_factor or "*", ffn=shape.ffn)
    return pd.DataFrame(rows)


def run_order(cfg: ResultsConfig, progress: bool | None = None) -> pd.DataFrame:
    """Per sampled configured layer and plan: its iteration, the best lane order found for the same
    tasks, and the lower bound (ms). Plans on one lane (DS-MoE) have no order to search."""
    rows = []
    for testbed, profile in _profiles(cfg).items():
        shapes = grid_shapes(cfg.testbeds[testbed], profile.get_topology().num_nodes)
        shapes = random.Random(cfg.seed).sample(shapes, min(cfg.order_sample, len(shapes)))
        for i, shape in enumerate(tqdm(shapes, desc=f"lane orders, testbed {testbed}",
                                       disable=None if progress is None else not progress)):
            blocks = [block_costs(shape, profile)] * cfg.grid_blocks
            for system in FSMOE_SYSTEMS:
                schedule = system.factory()(blocks).schedule(blocks)
                if len(schedule.lanes) < 2:
                    continue
                searched = search_order(schedule, cfg.order_tries, seed=cfg.seed + i)
                rows.append({"testbed": testbed, "layer": i, "system": system.name,
                             "iteration_ms": simulate(schedule).makespan,
                             "searched_order_ms": simulate(searched).makespan,
                             "lower_bound_ms": lower_bound(schedule), "tasks": len(schedule.tasks),
                             "tries": cfg.order_tries})
    return pd.DataFrame(rows)


def _released_rules(model_fwd, model_bwd, domain) -> tuple[int, int]:
    r_fwd = 1 if model_fwd.a2a.at(1) < 1.0 else integer_optimum(model_fwd, domain).r
    r_bwd = 1 if r_fwd == 1 else integer_optimum(model_bwd, domain).r
    return r_fwd, r_bwd


def run_statistic(cfg: ResultsConfig) -> pd.DataFrame:
    rows = []
    for testbed, profile in _profiles(cfg).items():
        shapes = grid_shapes(cfg.testbeds[testbed], profile.get_topology().num_nodes)
        for domain in DOMAINS:
            for with_gar in (False, True):
                for rules in (False, True):
                    differ = 0
                    for shape in shapes:
                        bc = block_costs(shape, profile)
                        bwd = bc.bwd.with_gar(bc.t_ar(bc.grad_bytes) if with_gar else 0.0)
                        if rules:
                            r_fwd, r_bwd = _released_rules(bc.fwd, bwd, DOMAINS[domain])
                        else:
                            r_fwd, r_bwd = integer_optimum(bc.fwd, DOMAINS[domain]).r, integer_optimum(bwd, DOMAINS[domain]).r
                        differ += r_fwd != r_bwd
                    rows.append({"testbed": testbed, "domain": domain, "backward_t_gar": "layer gradient" if with_gar
                                 else "0", "released_rules": rules, "differ": differ, "total": len(shapes)})
    return pd.DataFrame(rows)


def run_table2(cfg: ResultsConfig) -> pd.DataFrame:
    rows = []
    for testbed, profile in _profiles(cfg).items():
        for model in TABLE2_MODELS:
            for phase, ops in _table2_ops(profile, model, cfg.table2_batch, cfg.table2_seq).items():
                total = sum(ops.values())
                rows += [{"testbed": testbed, "model": model, "phase": phase, "op": op, "ms": ms,
                          "share_pct": 100 * ms / total, "tier": "sim"} for op, ms in ops.items()]
    return pd.DataFrame(rows)


CONTENTION = (0.25, 0.5, 1.0)
"""Lane contentions every figure is also timed under (`CONTENTION_ABLATIONS`): the paper
publishes no measure of how much concurrent intra- and inter-node collectives slow each other, so
the report computes FSMoE's gain as a function of it. c = 1: two overlapping collectives share
one resource evenly (each at half speed, together as long as one after the other)."""
CONTENTION_ABLATIONS = {
    f"contention-{c:g}": (
        f"every figure (the configured layers, Figs. 6-8, Table 6) with the same plans timed under lane contention "
        f"c = {c:g}: while an intra-node and an inter-node collective of one GPU's plan overlap, each runs at "
        f"1 / (1 + c) = {1 / (1 + c):.2f} of its speed (shared copy engines, SMs, PCIe; `timeline.simulate`'s "
        "contention; ours: c = 0, none); only plans with a separate intra-node lane (FSMoE's) overlap them", c)
    for c in CONTENTION}
"""name -> (description, c); each figure's rows under it labelled '<figure>:<name>'."""
_CONTENDING = (LANES_3["ag"], LANES_3["dispatch"])       # the intra-node and the inter-node lane


@dataclass(frozen=True)
class PpAblation:
    """Fig. 8's GPipe run with one assumption changed for every plan alike; its rows carry the
    figure label `fig8:<name>` (`PP_ABLATIONS`)."""

    description: str
    micro_batches: int | None = None    # None: the config's `pp_micro_batches`
    gradients: bool = True              # False: no dense gradients to all-reduce in any plan
    send_recv: bool = False             # charge the stage-to-stage transfers (`gpipe_iteration`'s send_ms)


PP_ABLATIONS = {
    "pp-one-micro-batch": PpAblation(
        "Fig. 8 with one micro-batch per iteration instead of `pp_micro_batches` (the gradients' AllReduce then "
        "weighs as much as one micro-batch's work, as without pipeline parallelism)", micro_batches=1),
    "pp-send-recv": PpAblation(
        "Fig. 8 with GPipe's stage-to-stage transfers charged: each micro-batch's activations (B L M / N_MP per GPU) "
        "forward and their gradients backward on the sending stage's inter-node lane, priced with the AlltoAll model "
        "(the profiles have no point-to-point fit; ours: not charged)", send_recv=True),
    "pp-no-gradients": PpAblation(
        "Fig. 8 with no Gradient-AllReduce in any plan: what is left of FSMoE's gain once the gradients' placement "
        "(its partitioning, Tutel-Improved's dense windows, Lina's chunks) cannot matter", gradients=False),
}
FIG8 = "fig8"
GRID_FIGURE = "grid"                     # the figure label of the configured layers' rows


def _gpipe_rows(testbed_profile: HardwareProfile, spec: ModelSpec, seq: int, micro_batches: int,
                **labels) -> list[dict]:
    """Two pipeline stages, each half the nodes and half the layers (the stages' AlltoAll and
    AllReduce keep the whole testbed's fits: no fit exists for half of it), each plan's schedule also
    under every `CONTENTION_ABLATIONS` entry; then every `PP_ABLATIONS` entry for every plan,
    labelled `fig8:<name>`."""
    topo = testbed_profile.get_topology()
    half = topo.num_nodes // 2
    stage_profile = replace(testbed_profile, name=f"{testbed_profile.name}@pp2", topology=f"{half}x{topo.gpus_per_node}")
    bc = block_costs(_model_shape(spec, stage_profile, seq), stage_profile)

    def stages_of(block: BlockCosts) -> list[list[BlockCosts]]:
        return [[block] * (spec.layers // 2), [block] * (spec.layers - spec.layers // 2)]

    def gpipe(factory, stages, micro: int = micro_batches, send_ms: float = 0.0):
        plans = [factory(blocks) for blocks in stages]
        schedule = gpipe_iteration([(blocks, list(p.degrees), list(p.grads)) for blocks, p in zip(stages, plans)],
                                   micro, plans[0].lanes, send_ms)
        return schedule, plans[0]

    rows = []
    for system in FSMOE_SYSTEMS:
        schedule, plan = gpipe(system.factory(), stages_of(bc))
        rows.append({**labels, "system": system.name, "iteration_ms": simulate(schedule).makespan,
                     "r_fwd": plan.degrees[0][0], "r_bwd": plan.degrees[0][1]})
        rows += _contention_rows(schedule, plan, system.name, labels)
    for ablation in DS_MOE_ABLATIONS.values():
        schedule, _ = gpipe(FSMOE_SYSTEMS.get("DS-MoE").factory(), [ablation.blocks(b) for b in stages_of(bc)])
        rows.append(_ds_moe_ablation_row(labels, ablation, simulate(schedule).makespan))
    activations = bc.shape.batch * bc.shape.seq * bc.shape.hidden * bc.shape.bytes_per_elem / bc.n_esp
    send_ms = stage_profile.comm_model("a2a", "inter-1").time_ms(activations)
    for name, pp in PP_ABLATIONS.items():
        block = bc if pp.gradients else replace(bc, grad_bytes=0)
        for system in FSMOE_SYSTEMS:
            schedule, plan = gpipe(system.factory(), stages_of(block), pp.micro_batches or micro_batches,
                                   send_ms if pp.send_recv else 0.0)
            rows.append({**labels, "figure": f"{FIG8}:{name}", "system": system.name,
                         "iteration_ms": simulate(schedule).makespan, "r_fwd": plan.degrees[0][0],
                         "r_bwd": plan.degrees[0][1], "plan_note": pp.description})
    return rows


def _contends(plan) -> bool:
    """Whether lane contention can change the plan's iteration: it runs tasks on both contending
    lanes (FSMoE's separate intra-node lane beside the inter-node one). Any other plan's schedule
    keeps its own timeline under contention, to the bit (`simulate`)."""
    return set(_CONTENDING) <= set(plan.lanes.values())


def _contention_rows(schedule: Schedule, plan, system: str, labels: dict) -> list[dict]:
    """A plan's schedule (made without contention: its degrees stay those of the headline row)
    timed under each `CONTENTION_ABLATIONS` entry, each a row labelled '<figure>:<name>'. Every
    figure's runner passes its schedules through here. A plan contention cannot change
    (`_contends`) gets no rows: its headline row stands for it under every c (the figures'
    `figure_ablation` keeps it), so the 1,458-layer grid times and writes only what can change."""
    if not _contends(plan):
        return []
    return [{**labels, "figure": f"{labels['figure']}:{name}", "system": system,
             "iteration_ms": simulate(schedule, {_CONTENDING: c}).makespan,
             "r_fwd": plan.degrees[0][0], "r_bwd": plan.degrees[0][1],
             "plan_note": f"{plan.note}; contention c = {c:g}"}
            for name, (_, c) in CONTENTION_ABLATIONS.items()]


def run_models(cfg: ResultsConfig, progress: bool | None = None) -> pd.DataFrame:
    profiles = _profiles(cfg)
    jobs = [("fig6", testbed, model, cfg.seq[testbed], cfg.testbeds[testbed], "gshard") for testbed, model in cfg.fig6]
    a_models = sorted({m for t, m in cfg.fig6 if t == "A"})
    jobs += [("fig7-L", "A", m, L, cfg.testbeds["A"], "gshard") for m in a_models for L in cfg.fig7_seq]
    jobs += [("fig7-P", "A", m, cfg.seq["A"], name, "gshard") for m in a_models for name in cfg.fig7_profiles.values()]
    jobs += [("table6", "B", "gpt2-xl", cfg.seq["B"], cfg.testbeds["B"], g) for g in cfg.gates]
    rows = []
    for figure, testbed, model, seq, profile_name, gate in tqdm(jobs, desc="models", disable=None if progress is None
                                                               else not progress):
        profile = read_profile(load_profile(profile_name), cfg.reading, (cfg.table2_batch, cfg.table2_seq))
        spec = MODELS[model]
        bc = block_costs(_model_shape(spec, profile, seq, gate), profile)
        rows += _iteration_rows([bc] * spec.layers, figure=figure, testbed=testbed, model=model, L=seq, gate=gate,
                                profile=profile.name, P=profile.get_topology().G, layers=spec.layers)
    for model in a_models:
        spec = MODELS[model]
        rows += _gpipe_rows(profiles["A"], spec, cfg.seq["A"], cfg.pp_micro_batches, figure=FIG8, testbed="A",
                            model=model, L=cfg.seq["A"], gate="gshard", profile=profiles["A"].name,
                            P=profiles["A"].get_topology().G, layers=spec.layers)
    return pd.DataFrame(rows)


# nccl-tests' bus bandwidth: what one rank moves over its link per byte of the collective's size
BUS_FACTOR = {"a2a": lambda n: (n - 1) / n, "allgather": lambda n: (n - 1) / n,
              "reducescatter": lambda n: (n - 1) / n, "allreduce": lambda n: 2 * (n - 1) / n}
PCIE_GTS = {"3.0": 8.0, "4.0": 16.0}            # GT/s per lane; 128b/130b encoding from 3.0 on


def _pcie_gbps(link: str) -> float:
    """Data rate of a 'PCIe <gen> x<lanes>' link in Gb/s (one direction)."""
    _, gen, lanes = link.split()
    return PCIE_GTS[gen] * int(lanes.lstrip("x")) * 128 / 130


def run_links(cfg: ResultsConfig) -> pd.DataFrame:
    """Per testbed, reading ('published' and 'comm-other-unit') and collective: the per-GPU bus
    rate its beta implies (nccl-tests' busbw, Gb/s) and the load on the link it crosses against
    that link's line rate (Table 3). The inter-node collectives run in the inter-1 groups, one GPU
    per node, and every GPU of a node runs its own at once (the paper's layout), so a node's NIC
    carries gpus_per_node of them; an intra-node collective crosses each GPU's PCIe x16 link."""
    paper = read_paper_csv("fsmoe_table3")[0].set_index("testbed")
    rows = []
    for testbed, name in cfg.testbeds.items():
        published = load_profile(name)
        for reading in ("published", "comm-other-unit"):
            profile = read_profile(published, reading)
            topo = profile.get_topology()
            for (kind, step), model in profile.comm.items():
                side, level = step.split("-")
                groups = topo.inter_groups(int(level)) if side == "inter" else topo.intra_groups(int(level))
                per_gpu = BUS_FACTOR[kind](len(groups[0])) * 8e-6 / model.beta_ms      # bytes/ms -> Gb/s
                if side == "inter":
                    sharing, link, line = topo.gpus_per_node, "node NIC", float(paper.loc[testbed, "value"])
                else:
                    link = str(paper.loc[testbed, "intra_node"])
                    sharing, line = 1, _pcie_gbps(link)
                rows.append({"testbed": testbed, "profile": name, "reading": reading, "unit": comm_unit(model),
                             "kind": kind, "step": step, "group": len(groups[0]), "beta_ms_per_byte": model.beta_ms,
                             "per_gpu_gbps": per_gpu, "sharing": sharing, "link": link,
                             "load_gbps": per_gpu * sharing, "line_gbps": line,
                             "load_over_line": per_gpu * sharing / line})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Part:
    """One result of the CLI (`--part`): its runner. A runner that takes `progress` reports it (a
    bar over its cases; None: tqdm's default, False: off)."""

    run: Callable[..., pd.DataFrame]

    @property
    def reports_progress(self) -> bool:
        return "progress" in inspect.signature(self.run).parameters

    def __call__(self, cfg: ResultsConfig, progress: bool | None = None) -> pd.DataFrame:
        return self.run(cfg, progress=progress) if self.reports_progress else self.run(cfg)


RUNNERS = {"grid": Part(run_grid), "statistic": Part(run_statistic), "table2": Part(run_table2),
           "models": Part(run_models), "order": Part(run_order), "links": Part(run_links)}
PARTS = tuple(RUNNERS)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(PROG, __doc__, config=ResultsConfig, outputs=("csv", "record"), progress=True)
    parser.add_argument("--part", required=True, choices=PARTS, help="which result to compute")
    args = parser.parse_args(argv)
    try:
        cfg = cli.load_config(args, ResultsConfig)
        validate(cfg, args.part)
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    frame = RUNNERS[args.part](cfg, progress=False if args.no_progress else None)
    frame["tier"] = "sim"
    if "reading" not in frame:              # `links` compares the readings itself
        frame["reading"] = cfg.reading
    record = make_record(experiment=f"fsmoe_{args.part}", system=",".join(s.name for s in FSMOE_SYSTEMS), tier="sim",
                         topology={"name": ",".join(cfg.testbeds.values())}, model={"part": args.part},
                         config=cfg, metrics={"rows": [float(len(frame))]}, seed=cfg.seed,
                         extra={"profiles": dict(cfg.testbeds), "note": "times MODELED from the profiles' alpha-beta models"})
    cli.write_csv_and_record(frame, args.out_csv, record, args.out_record)
    print(f"{args.part}: {len(frame)} rows -> {args.out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
