"""Sim tier of ScheInfer: prefill / decode / overall tokens per second of ScheInfer, llama.cpp's
layer offload ('layers') and Fiddler for real model shapes on named moderate-GPU hardware classes.

    python -m impl.experiments.scheinfer.sim --config workflows/config/experiments/scheinfer_sim.yaml \
        [--set key=value ...] --out-csv OUT.csv --out-record OUT.json

One code path with the engine (impl/scheinfer/engine.py): the policies are built by name through
the registry, residency comes from the engine's own placement (`impl.scheinfer.policy.place`:
staging buffers, then each policy's `resident`), every layer's CC / CG / GG splits from the
policy's `plan` (partition.optimal_split / assign.assign_layer for ScheInfer,
baselines/fiddler/policy.py for Fiddler, baselines/llamacpp/policy.py for llama.cpp's layer
offload), and the FFN time of a layer from partition.lane_times: `assign.layer_makespan` for
concurrent policies, the sum of every band's lane time for serial ones (the engine's
`_run_serial` order). What is
added around the FFNs [R]: attention, router and LM head on the GPU (roofline: weights read
once, flops at the GPU's rate, KV cache read; llama.cpp's CPU layers and head on the CPU, below),
and the activation round trip (D2H input + H2D partial output) of a layer whose CPU lane has
work (scheinfer.md 3.2).

What is assumption, not paper:
* Hardware: the classes in workflows/config/experiments/scheinfer_hardware.yaml are spec-sheet
  peaks times assumed efficiencies; the paper's three machines are not public. A class becomes a
  `CostModel` by the roofline of scheinfer.md 3.2: per MAC, max(2 / flops, bytes_per_param /
  (n * bytes_per_s)) at a geometric grid of token counts n (`PerRowLinear` in between).
* Routing: 'gate' runs the model's real routing function (`layers.route`: softmax top-k or
  Phi's SparseMixer) with seeded random router weights on seeded random hidden states (no
  checkpoint is read; one set of hidden states per step, shared by the layers); 'uniform' gives
  every expert n * k / E tokens in prefill and rotates k experts per decode step.
* Fiddler's popularity (which experts are resident) is counted on the same routing it then
  runs (an oracle: favourable to Fiddler), a shared expert with every token of its layer
  (`policy.PopularityCounter`). So is ScheInfer's where its GG rows go by popularity (gg_mode
  'popularity', or the ablation 'gg-popularity' beside a 'uniform' headline: scheinfer.md 3.3
  step 1 reads both ways). Fiddler is run on MoE models only; the real Fiddler supports
  Mixtral only, so on the other MoE models it is our port of its policy.
* llama.cpp ('layers') is held to its own accounting, the rule of `-ngl N` that
  `baselines.llamacpp.runner.gpu_weight_bytes` reads from a GGUF (llama.cpp's i_gpu_start =
  n_layer + 1 - N, the output layer counted as layer n_layer): the output head on the GPU first
  (any N >= 1), then the last N - 1 whole layers (FFNs, attention, norms, router and their KV
  cache), N the most that fit in the card besides the staging buffer; token embeddings on the
  CPU. A CPU layer runs its attention on
  the CPU (decode), or, at >= 32 tokens (ggml's offload rule), copies its attention weights to
  the GPU and computes there, with no KV copy charged. The other policies keep every non-FFN
  weight and the whole KV cache on the GPU, their FFN rows in what is left.
* No cross-layer prefetch of CG weights (the engine has none).
Metrics: prefill tok/s = prompt tokens / prefill time; decode tok/s = decode steps / decode
time; overall = (prompt tokens + decode steps) / (prefill + decode time). Batch 1.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

import baselines.fiddler  # noqa: F401  (registers the engine policy 'fiddler')
import baselines.llamacpp  # noqa: F401  (registers the engine policy 'layers')
from impl.common import cli
from impl.common.config import ConfigError, check_host_memory, load_yaml
from impl.common.records import make_record
from impl.experiments.scheinfer.sim_config import SimConfig
from impl.scheinfer.assign import ExpertLoad, layer_makespan
from impl.scheinfer.config import DecoderConfig, weight_shapes
from impl.scheinfer.layers import route
from impl.scheinfer.partition import GG_MODES, CostModel, PerRowLinear, Split, lane_times
from impl.scheinfer.policy import Policy, PopularityCounter, ScheInferPolicy, ffn_widths, make_policy, place

__all__ = ["SimConfig", "HardwareClass", "load_hardware", "cost_model", "SYSTEMS", "GG_VARIANTS", "moe_only",
           "CONFIG_GG", "make_sim_policy", "predict_bench", "Routing", "make_routing", "ffn_time", "ModelSetup",
           "setup_model", "CaseSetup", "case_policy", "setup_case", "simulate_case", "run", "resolve", "main"]

REPO = Path(__file__).resolve().parents[3]
# ScheInfer with its GG rows by one reading of scheinfer.md 3.3 step 1 whatever the config's gg_mode
# (which the headline 'scheinfer' uses): 'uniform' (spread evenly over the layers) or 'popularity'
# (whole experts by popularity, as Fiddler; MoE models only)
GG_VARIANTS = {f"gg-{mode}": mode for mode in GG_MODES}
# policy -> system name in figures (figures/style.py); cc-only / cg-only and gg-* are ScheInfer's ablations
SYSTEMS = {"layers": "llama.cpp", "fiddler": "Fiddler", "scheinfer": "ScheInfer",
           "cc-only": "ScheInfer[CC+GG]", "cg-only": "ScheInfer[CG+GG]",
           **{p: f"ScheInfer[GG {mode}]" for p, mode in GG_VARIANTS.items()}}
# the policies whose GG rows follow the config's gg_mode: the headline and its CC / CG ablations
CONFIG_GG = ("scheinfer", "cc-only", "cg-only")
ROWS_GRID = tuple(2 ** i for i in range(15))          # 1 .. 16384 tokens


# ----------------------------------------------------------------------------------- hardware

@dataclass(frozen=True)
class HardwareClass:
    name: str
    gpu_mem_bytes: float
    gpu_reserve_bytes: float
    gpu_flops: float
    gpu_bytes_per_s: float
    cpu_flops: float
    cpu_bytes_per_s: float
    h2d_bytes_per_s: float
    gpu_alpha_s: float = 0.0
    cpu_alpha_s: float = 0.0
    h2d_alpha_s: float = 0.0
    description: str = ""
    source: str = ""


_HW_NUMBERS = ("gpu_mem_bytes", "gpu_reserve_bytes", "gpu_flops", "gpu_bytes_per_s", "cpu_flops", "cpu_bytes_per_s",
               "h2d_bytes_per_s", "gpu_alpha_s", "cpu_alpha_s", "h2d_alpha_s")


def load_hardware(path: str | Path) -> dict[str, HardwareClass]:
    """The hardware classes of a YAML file (format in the file's header), each checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hardware_file: {str(path)!r} is not a file")
    data = load_yaml(path)
    out = {}
    for name, d in data.items():
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: hardware {name!r} must be a mapping")
        unknown = set(d) - set(_HW_NUMBERS) - {"description", "source"}
        if unknown:
            raise ConfigError(f"{path}: hardware {name!r}: key {sorted(unknown, key=str)[0]!r} is not allowed; "
                              f"allowed: {', '.join(_HW_NUMBERS)}, description, source")
        for k in _HW_NUMBERS[:7]:
            if k not in d:
                raise ConfigError(f"{path}: hardware {name!r} lacks {k!r}")
        for k in _HW_NUMBERS:
            v = d.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                    k in _HW_NUMBERS[2:7] and v == 0):
                raise ConfigError(f"{path}: hardware {name!r}: {k}={v!r} is not allowed; expected a number "
                                  f"{'> 0' if k in _HW_NUMBERS[2:7] else '>= 0'}")
        out[name] = HardwareClass(name=name, **{k: float(d.get(k, 0.0)) for k in _HW_NUMBERS},
                                  description=str(d.get("description", "")).strip(),
                                  source=str(d.get("source", "")).strip())
    return out


def cost_model(hw: HardwareClass, dtype_bytes: int) -> CostModel:
    """The engine's cost model of a hardware class (roofline per MAC, module doc)."""
    def lane(flops, bw, alpha):
        return PerRowLinear(ROWS_GRID, tuple(max(2.0 / flops, dtype_bytes / (n * bw)) for n in ROWS_GRID), alpha)
    return CostModel(lane(hw.cpu_flops, hw.cpu_bytes_per_s, hw.cpu_alpha_s),
                     lane(hw.gpu_flops, hw.gpu_bytes_per_s, hw.gpu_alpha_s),
                     hw.h2d_bytes_per_s, hw.h2d_alpha_s, source=f"roofline:{hw.name}")


# ----------------------------------------------------------------------------------- policies

class _BandOnlyPolicy(ScheInferPolicy):
    """ScheInfer's residency with every off-GPU row on one side: 'cc' (CC+GG) or 'cg' (CG+GG),
    CG falling back to CC where the staging buffers cannot hold it (the ablations of scheinfer.md 7)."""

    def __init__(self, band: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.band, self.name = band, f"{band}-only"

    def plan(self, layer, loads, phase, layer_tokens, cg_max):
        out = []
        for ld in loads:
            r = ld.width - ld.gg
            to_cg = self.band == "cg" and (cg_max is None or r <= cg_max)
            out.append(Split(0, r, ld.gg) if to_cg else Split(r, 0, ld.gg))
        return out


def moe_only(name: str, policy: Policy) -> bool:
    """Whether the sim runs policy `name` on MoE models only: one that ranks FFNs by popularity
    (`Policy.uses_popularity`: Fiddler, ScheInfer's GG by popularity), as a dense model has no
    experts to rank; but ScheInfer and its band ablations (`CONFIG_GG`) run on every model
    whatever the config's gg_mode."""
    return policy.uses_popularity and name not in CONFIG_GG


def make_sim_policy(name: str, cfg: DecoderConfig, cost: CostModel, sc: SimConfig,
                    popularity: dict | None = None, layer_bytes: dict[int, int] | None = None,
                    head_bytes: int | None = None) -> Policy:
    """The sim's policy `name`; `layer_bytes` and `head_bytes`: GPU bytes of each layer besides its
    FFNs and of the output head, which llama.cpp's 'layers' (`Policy.whole_layers`) counts in its
    budget and the others keep besides (module doc)."""
    common = dict(cost=cost, hidden=cfg.hidden, num_layers=cfg.num_layers, dtype_bytes=sc.dtype_bytes, tile=sc.tile)
    if name == "scheinfer" or name in GG_VARIANTS:
        return make_policy("scheinfer", **common, assign=sc.assign, gg_mode=GG_VARIANTS.get(name, sc.gg_mode),
                           popularity=popularity)
    if name == "fiddler":
        return make_policy("fiddler", **common, popularity=popularity)
    if name == "layers":
        return make_policy("layers", **common, layer_bytes=layer_bytes, head_bytes=head_bytes)
    if name in ("cc-only", "cg-only"):
        return _BandOnlyPolicy(name[:2], cost, cfg.hidden, sc.dtype_bytes, sc.tile, gg_mode=sc.gg_mode,
                               popularity=popularity)
    raise ConfigError(f"policies: {name!r} is not allowed; allowed: {', '.join(SYSTEMS)}")


def ffn_time(policy: Policy, cost: CostModel, loads, splits, hidden: int, dtype_bytes: int) -> float:
    """Predicted FFN time of one layer: lanes overlapped (concurrent policy) or one after another."""
    if not loads:
        return 0.0
    if policy.concurrent:
        return layer_makespan(cost, loads, splits, hidden, dtype_bytes)
    return sum(t.cpu + t.h2d + t.gpu for t in (lane_times(cost, ld.n, hidden, s, dtype_bytes)
                                               for ld, s in zip(loads, splits)))


# ----------------------------------------------------------------------------------- routing

@dataclass
class Routing:
    """Per MoE layer: prefill token counts per expert [E], decode expert ids per step [S, K]."""

    prefill_counts: dict[int, list[int]]
    decode_ids: dict[int, list[list[int]]]
    prompt_tokens: int = 0
    shared_expert: bool = False        # MoE layers have a shared expert (every token uses it)

    def popularity(self) -> dict[tuple[int, int | str], float]:
        """Tokens per FFN over prefill and decode (`policy.PopularityCounter`: shared experts too)."""
        counter = PopularityCounter(self.shared_expert)
        for i, counts in self.prefill_counts.items():
            counter.add(i, enumerate(counts), self.prompt_tokens)
        for i, steps in self.decode_ids.items():
            counter(i, torch.as_tensor(steps, dtype=torch.long).reshape(len(steps), -1))
        return counter.counts


def make_routing(cfg: DecoderConfig, prompt_tokens: int, decode_tokens: int, kind: str, seed: int) -> Routing:
    """Routing of every MoE layer (module doc for 'gate' and 'uniform')."""
    pre, dec = {}, {}
    E, K = cfg.num_experts, cfg.top_k
    g = torch.Generator().manual_seed(seed)
    x_prefill = torch.randn(prompt_tokens, cfg.hidden, generator=g)
    x_decode = torch.randn(decode_tokens, cfg.hidden, generator=g)
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        if kind == "uniform":
            base, rem = divmod(prompt_tokens * K, E)
            pre[i] = [base + (1 if (e - i) % E < rem else 0) for e in range(E)]
            dec[i] = [[(t * K + j + i) % E for j in range(K)] for t in range(decode_tokens)]
            continue
        router_EM = torch.randn(E, cfg.hidden, generator=g) / math.sqrt(cfg.hidden)
        ids_TK, _ = route(cfg, x_prefill @ router_EM.t())
        pre[i] = torch.bincount(ids_TK.flatten(), minlength=E).tolist()
        ids_SK, _ = route(cfg, x_decode @ router_EM.t())
        dec[i] = ids_SK.tolist()
    return Routing(pre, dec, prompt_tokens, bool(cfg.shared_expert_ffn_hidden))


# ----------------------------------------------------------------------------------- one case

@dataclass(frozen=True)
class ModelSetup:
    """What every case of one model and its routing shares, computed once (`setup_model`)."""

    name: str
    cfg: DecoderConfig
    routing: Routing
    widths: dict              # every FFN: (layer, expert) -> width (`policy.ffn_widths`)
    popularity: dict          # the routing's tokens per FFN (`Routing.popularity`)
    attn_params: int          # per layer: attention projections + router
    nonffn_params: int        # every parameter but the FFNs'
    layer_params: dict        # per layer: its parameters but its FFNs'
    head_params: int          # the output head: final norm and LM head (and the tied embedding table)


@dataclass
class CaseSetup:
    cfg: DecoderConfig
    hw: HardwareClass
    cost: CostModel
    policy: Policy
    widths: dict
    gg: dict
    cg_max: int
    budget_bytes: int
    nonffn_bytes: int
    routing: Routing
    model_name: str
    policy_key: str
    dtype_bytes: int
    attn_params: int          # per layer: attention projections + router
    gpu_layers: frozenset = frozenset()     # layers whose attention (non-FFN weights) is on the GPU
    embed_on_gpu: bool = True
    head_on_gpu: bool = True


def _nonffn_params(cfg: DecoderConfig, widths: dict) -> tuple[int, int]:
    """(per-layer attention + router parameters, all non-FFN parameters)."""
    shapes = weight_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    ffn = sum(widths.values()) * 3 * cfg.hidden
    M, qd, kvd = cfg.hidden, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return 2 * qd * M + 2 * kvd * M + cfg.num_experts * M, total - ffn


def _layer_nonffn_params(cfg: DecoderConfig, widths: dict) -> tuple[dict[int, int], int]:
    """(per layer: every parameter of the layer but its FFNs (attention, norms, router, shared-
    expert gate), the output head: final norm and LM head, the embedding table when tied)."""
    shapes = weight_shapes(cfg)
    ffn: dict[int, int] = {}
    for (i, _), w in widths.items():
        ffn[i] = ffn.get(i, 0) + 3 * w * cfg.hidden
    layer = {i: sum(math.prod(s) for name, s in shapes.items() if name.startswith(f"layers.{i}.")) - ffn[i]
             for i in range(cfg.num_layers)}
    head = sum(math.prod(s) for name, s in shapes.items() if name.split(".")[0] in ("norm", "lm_head"))
    return layer, head + (cfg.vocab_size * cfg.hidden if cfg.tie_word_embeddings else 0)


def setup_model(cfg: DecoderConfig, routing: Routing, name: str = "") -> ModelSetup:
    """The model-level inputs of every (hardware, policy) case of `cfg` on `routing`."""
    widths = ffn_widths(cfg)
    attn, nonffn = _nonffn_params(cfg, widths)
    layer, head = _layer_nonffn_params(cfg, widths)
    return ModelSetup(name, cfg, routing, widths, routing.popularity(), attn, nonffn, layer, head)


def _kv_layer_bytes(cfg: DecoderConfig, sc: SimConfig) -> int:
    """One layer's KV cache for the prompt and every decode step."""
    return 2 * cfg.num_kv_heads * cfg.head_dim * sc.dtype_bytes * (sc.prompt_tokens + sc.decode_tokens)


def case_policy(model: ModelSetup, name: str, cost: CostModel, sc: SimConfig,
                ffn_budget_bytes: int | None = None) -> Policy:
    """The sim's policy `name` (`make_sim_policy`) for a case of `model`: where the card's memory is
    the budget (no `ffn_budget_bytes`), given what a policy that holds whole layers
    (`Policy.whole_layers`, llama.cpp's) counts in it besides the FFNs: each layer's other weights
    and KV cache, and the output head."""
    b = sc.dtype_bytes
    if ffn_budget_bytes is not None:
        return make_sim_policy(name, model.cfg, cost, sc, model.popularity)
    kv_layer = _kv_layer_bytes(model.cfg, sc)
    return make_sim_policy(name, model.cfg, cost, sc, model.popularity,
                           {i: p * b + kv_layer for i, p in model.layer_params.items()}, model.head_params * b)


def setup_case(model: ModelSetup, hw: HardwareClass, policy: str | Policy, sc: SimConfig,
               ffn_budget_bytes: int | None = None) -> CaseSetup:
    """Cost model, policy and placement of one (model, hardware, policy); `policy` a system of the
    sim (`SYSTEMS`, built by `case_policy`) or a policy built already (its `name` the case's).
    The FFN budget is what the card holds beside the other weights and the KV cache, or
    `ffn_budget_bytes` (a bench's `--gpu-mem`: FFN rows plus staging, the rest on the device
    besides). A policy that holds whole layers (`Policy.whole_layers`: llama.cpp's) is held to its
    own accounting (module doc): the output head (`Policy.place_head`), then whole layers (FFNs,
    attention, norms, router, KV cache) in the card's memory, token embeddings on the CPU; under
    `ffn_budget_bytes` its FFN rows alone count, the head on the GPU (as
    `baselines.llamacpp.runner.settings_within_budget` picks -ngl for a bench)."""
    cfg, b = model.cfg, sc.dtype_bytes
    cost = cost_model(hw, b)
    key = policy if isinstance(policy, str) else policy.name
    if isinstance(policy, str):
        policy = case_policy(model, key, cost, sc, ffn_budget_bytes)
    if ffn_budget_bytes is not None:
        budget = int(ffn_budget_bytes)
    elif policy.whole_layers:
        budget = max(0, int(hw.gpu_mem_bytes - hw.gpu_reserve_bytes))
    else:
        budget = max(0, int(hw.gpu_mem_bytes - hw.gpu_reserve_bytes - model.nonffn_params * b
                            - _kv_layer_bytes(cfg, sc) * cfg.num_layers))
    head_on_gpu, layers_budget = policy.place_head(budget)
    placement = place(policy, model.widths, cfg.hidden, b, layers_budget)
    gpu_layers = frozenset(range(cfg.num_layers))
    if policy.whole_layers:
        gpu_layers = frozenset(i for i in range(cfg.num_layers)
                               if all(placement.gg[k] == w for k, w in model.widths.items() if k[0] == i))
    return CaseSetup(cfg, hw, cost, policy, model.widths, dict(placement.gg), placement.cg_max, budget,
                     model.nonffn_params * b, model.routing, model.name, key, b, model.attn_params, gpu_layers,
                     not policy.whole_layers, head_on_gpu)


def _loads(st: CaseSetup, layer: int, phase: str, n: int, step: int) -> list[ExpertLoad]:
    """The active FFNs of a layer in the engine's order: routed experts by id, then shared."""
    cfg = st.cfg
    if not cfg.is_moe_layer(layer):
        keys = [((layer, "dense"), n)]
    else:
        if phase == "prefill":
            counts = st.routing.prefill_counts[layer]
            keys = [((layer, e), c) for e, c in enumerate(counts) if c]
        else:
            ids = st.routing.decode_ids[layer][step]
            keys = [((layer, e), 1) for e in sorted(set(ids))]
        if cfg.shared_expert_ffn_hidden:
            keys.append(((layer, "shared"), n))
    return [ExpertLoad(k, c, st.widths[k], st.gg.get(k, 0)) for k, c in keys]


def _nonffn_time(st: CaseSetup, n: int, ctx: int, lane: str = "gpu") -> float:
    """Time of one layer's attention + router on n new tokens over ctx cached positions [R], on
    the GPU or (a llama.cpp CPU layer) on the CPU: weights read once, flops at the lane's rate,
    KV cache read."""
    cfg, hw, b = st.cfg, st.hw, st.dtype_bytes
    p_attn = st.attn_params
    flops, bw, alpha = ((hw.gpu_flops, hw.gpu_bytes_per_s, hw.gpu_alpha_s) if lane == "gpu" else
                        (hw.cpu_flops, hw.cpu_bytes_per_s, hw.cpu_alpha_s))
    kv_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * b * ctx
    sdpa_flops = 4 * n * (ctx - n / 2 if n > 1 else ctx) * cfg.num_heads * cfg.head_dim
    return alpha + max(2 * n * p_attn / flops, b * p_attn / bw) + kv_bytes / bw + sdpa_flops / flops


def _act_time(st: CaseSetup, cpu_tokens: int, dtype_bytes: int) -> float:
    """D2H of the CPU lane's input rows and H2D of its partial output (scheinfer.md 3.2 T_act)."""
    if cpu_tokens == 0:
        return 0.0
    return 2 * st.cost.h2d_time(dtype_bytes * cpu_tokens * st.cfg.hidden)


def step_time(st: CaseSetup, phase: str, n: int, ctx: int, step: int, dtype_bytes: int, bands: dict) -> dict:
    """One forward step (all layers + LM head): ffn / nonffn / act seconds; adds rows to `bands`
    (cc / cg / gg rows, and 'work' / 'gg_work': rows times tokens, all and on resident rows).
    A layer whose attention is on the GPU pays the activation round trip of its CPU lane's rows;
    a llama.cpp CPU layer runs its attention on the CPU, or, when its products are offloaded
    (its policy's plan copies the layer's FFN weights to the GPU: ggml's rule, `LayersPolicy.plan`),
    copies its attention weights to the GPU and its activations there and back.
    Where consecutive stages (embedding, layers, head) sit on different sides the hidden state
    crosses PCIe once (the head reads the last position only)."""
    out = {"ffn_s": 0.0, "nonffn_s": 0.0, "act_s": 0.0}
    b, M = dtype_bytes, st.cfg.hidden
    side = "gpu" if st.embed_on_gpu else "cpu"
    for i in range(st.cfg.num_layers):
        loads = _loads(st, i, phase, n, step)
        splits = st.policy.plan(i, loads, phase, n, st.cg_max)
        for ld, s in zip(loads, splits):
            if s.width != ld.width or s.gg != ld.gg or s.cg > st.cg_max:
                raise RuntimeError(f"policy {st.policy.name!r} planned {s} for {ld} (cg_max {st.cg_max})")
            for k in ("cc", "cg", "gg"):
                bands[k] += getattr(s, k)
            bands["work"] += ld.n * ld.width
            bands["gg_work"] += ld.n * s.gg
        out["ffn_s"] += ffn_time(st.policy, st.cost, loads, splits, M, b)
        here = "gpu" if i in st.gpu_layers else "cpu"
        if here != side:
            out["act_s"] += st.cost.h2d_time(b * n * M)
        side = here
        if here == "gpu":
            out["act_s"] += _act_time(st, sum(ld.n for ld, s in zip(loads, splits) if s.cc), b)
            out["nonffn_s"] += _nonffn_time(st, n, ctx)
        elif any(s.cg for s in splits):          # the plan offloads this CPU layer's products
            out["act_s"] += _act_time(st, n, b)
            out["nonffn_s"] += st.cost.h2d_time(b * st.attn_params) + _nonffn_time(st, n, ctx)
        else:
            out["nonffn_s"] += _nonffn_time(st, n, ctx, "cpu")
    head = "gpu" if st.head_on_gpu else "cpu"
    if head != side:
        out["act_s"] += st.cost.h2d_time(b * M)
    lm = st.cfg.vocab_size * M                         # last position only (prefill and decode)
    out["nonffn_s"] += (st.hw.gpu_alpha_s + b * lm / st.hw.gpu_bytes_per_s if head == "gpu" else
                        st.hw.cpu_alpha_s + b * lm / st.hw.cpu_bytes_per_s)
    return out


BANDS = ("cc", "cg", "gg", "work", "gg_work")       # what `step_time` counts


def simulate_case(st: CaseSetup, sc: SimConfig) -> list[dict]:
    """Rows (prefill, decode, overall) of one (model, hardware, policy)."""
    b = sc.dtype_bytes
    rows, totals = [], {"ffn_s": 0.0, "nonffn_s": 0.0, "act_s": 0.0}
    all_bands = dict.fromkeys(BANDS, 0)
    for phase in ("prefill", "decode"):
        bands = dict.fromkeys(BANDS, 0)
        acc = {"ffn_s": 0.0, "nonffn_s": 0.0, "act_s": 0.0}
        steps = [(sc.prompt_tokens, sc.prompt_tokens, 0)] if phase == "prefill" else [
            (1, sc.prompt_tokens + t + 1, t) for t in range(sc.decode_tokens)]
        for n, ctx, step in steps:
            for k, v in step_time(st, phase, n, ctx, step, b, bands).items():
                acc[k] += v
        tokens = sc.prompt_tokens if phase == "prefill" else sc.decode_tokens
        rows.append(_row(st, sc, phase, tokens, acc, bands))
        for k in totals:
            totals[k] += acc[k]
        for k in all_bands:
            all_bands[k] += bands[k]
    rows.append(_row(st, sc, "overall", sc.prompt_tokens + sc.decode_tokens, totals, all_bands))
    return rows


def _row(st: CaseSetup, sc: SimConfig, phase: str, tokens: int, acc: dict, bands: dict) -> dict:
    t = acc["ffn_s"] + acc["nonffn_s"] + acc["act_s"]
    width = max(1, bands["cc"] + bands["cg"] + bands["gg"])
    ffn_rows = sum(st.widths.values())
    return {"hardware": st.hw.name, "model": st.model_name, "system": SYSTEMS[st.policy_key], "policy": st.policy_key,
            "phase": phase, "tokens": tokens, "time_s": t, "tokens_per_s": tokens / t if t > 0 else math.inf,
            **acc, "cc_frac": bands["cc"] / width, "cg_frac": bands["cg"] / width, "gg_frac": bands["gg"] / width,
            "gg_work_frac": bands["gg_work"] / max(1, bands["work"]),
            "resident_frac": sum(st.gg.values()) / ffn_rows, "gpu_ffn_budget_bytes": st.budget_bytes,
            "cg_max": st.cg_max, "gpu_layers": len(st.gpu_layers), "num_layers": st.cfg.num_layers,
            "head_on_gpu": st.head_on_gpu, "routing": sc.routing, "assign": sc.assign,
            "gg_mode": getattr(st.policy, "gg_mode", sc.gg_mode),
            "prompt_tokens": sc.prompt_tokens, "decode_tokens": sc.decode_tokens}


# ----------------------------------------------------------------------------------- experiment

@dataclass(frozen=True)
class Resolved:
    config: SimConfig
    hardware: dict[str, HardwareClass]
    models: dict[str, DecoderConfig] = field(default_factory=dict)


def resolve(sc: SimConfig) -> Resolved:
    """Check every value against what exists (models, hardware, policies), before any work."""
    if sc.dtype_bytes not in (2, 4):
        raise ConfigError(f"dtype_bytes: {sc.dtype_bytes!r} is not allowed; allowed: 2, 4")
    for key in ("models", "hardware", "policies"):
        if not getattr(sc, key):
            raise ConfigError(f"{key}: an empty list is not allowed")
    for p in sc.policies:
        if p not in SYSTEMS:
            raise ConfigError(f"policies: {p!r} is not allowed; allowed: {', '.join(SYSTEMS)}")
    path = Path(sc.hardware_file)
    hw = load_hardware(path if path.is_absolute() else REPO / path)
    for h in sc.hardware:
        if h not in hw:
            raise ConfigError(f"hardware: {h!r} is not allowed; allowed: {', '.join(hw)}")
    models = {}
    for m in sc.models:
        try:
            models[m] = DecoderConfig.from_model_config(m)
        except (ConfigError, KeyError, ValueError) as e:
            raise ConfigError(f"models: {m!r}: {e}") from None
    # the seeded hidden states and one layer's router logits (module doc: routing 'gate')
    check_host_memory(8 * (sc.prompt_tokens + sc.decode_tokens) * max(c.hidden + c.num_experts for c in models.values()),
                      "prompt_tokens, decode_tokens", "the routing's hidden states")
    return Resolved(sc, {h: hw[h] for h in sc.hardware}, models)


def run(rz: Resolved) -> pd.DataFrame:
    sc, rows = rz.config, []
    for mname, cfg in rz.models.items():
        model = setup_model(cfg, make_routing(cfg, sc.prompt_tokens, sc.decode_tokens, sc.routing, sc.seed), mname)
        for hw in rz.hardware.values():
            for p in sc.policies:
                st = setup_case(model, hw, p, sc)
                if moe_only(p, st.policy) and not cfg.is_moe:
                    continue                    # no experts to rank by popularity
                rows.extend(simulate_case(st, sc))
    return pd.DataFrame(rows)


def predict_bench(cfg: DecoderConfig, hw: HardwareClass, ffn_budget_bytes: int, prompt_tokens: list[int],
                  decode_tokens: int, policies: tuple[str, ...] = ("scheinfer", "fiddler"), dtype_bytes: int = 4,
                  seed: int = 0) -> pd.DataFrame:
    """The sim tier's prediction of a measured bench (`python -m impl.experiments.scheinfer bench`):
    the same model shape, FFN budget, prompt lengths and decode steps on the hardware class measured
    where the bench ran (`impl.experiments.gpu_check profile --hardware-out`). Rows: policy,
    prompt_tokens, phase, tokens_per_s (modeled; the routing is the module's seeded 'gate')."""
    rows = []
    for n in prompt_tokens:
        sc = SimConfig(prompt_tokens=n, decode_tokens=decode_tokens, dtype_bytes=dtype_bytes, seed=seed,
                       policies=tuple(policies))
        model = setup_model(cfg, make_routing(cfg, n, decode_tokens, sc.routing, seed))
        for p in policies:
            for row in simulate_case(setup_case(model, hw, p, sc, ffn_budget_bytes=ffn_budget_bytes), sc):
                rows.append({"policy": p, "prompt_tokens": n, "phase": row["phase"],
                             "tokens_per_s": row["tokens_per_s"], "cc_frac": row["cc_frac"],
                             "cg_frac": row["cg_frac"], "gg_frac": row["gg_frac"]})
    return pd.DataFrame(rows)


def make_sim_record(rz: Resolved, frame: pd.DataFrame) -> dict:
    metrics = {f"tokens_per_s/{r.hardware}/{r.model}/{r.system}/{r.phase}": [float(r.tokens_per_s)]
               for r in frame.itertuples()}
    return make_record(
        experiment=rz.config.experiment, system=",".join(SYSTEMS[p] for p in rz.config.policies), tier="sim",
        topology={"name": "single-gpu-host", "hardware": list(rz.hardware)},
        model={"names": list(rz.models), "prompt_tokens": rz.config.prompt_tokens,
               "decode_tokens": rz.config.decode_tokens, "dtype_bytes": rz.config.dtype_bytes},
        config=rz.config, metrics=metrics, seed=rz.config.seed,
        trace_id=f"{rz.config.routing}:seed={rz.config.seed}",
        extra={"hardware": {h: vars(c) for h, c in rz.hardware.items()},
               "note": "times MODELED with the engine's cost model on ASSUMED hardware classes (spec sheets "
                       "x assumed efficiencies); the paper's machines are not public"})


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m impl.experiments.scheinfer.sim", __doc__, config=SimConfig,
                        outputs=("csv", "record"), progress=True)     # nothing shows progress; accepted alike
    args = parser.parse_args(argv)
    try:
        rz = resolve(cli.load_config(args, SimConfig))
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    frame = run(rz)
    cli.write_csv_and_record(frame, args.out_csv, make_sim_record(rz, frame), args.out_record)
    for (hw, model), g in frame[frame["phase"] == "overall"].groupby(["hardware", "model"], sort=False):
        print(f"{hw} {model}: " + ", ".join(f"{r.system} {r.tokens_per_s:.2f}" for r in g.itertuples())
              + " tok/s overall (modeled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
