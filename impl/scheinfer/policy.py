"""Placement and execution policies of the three-lane engine, and the one GPU-budget placement.

A `Policy` says which rows of each FFN / expert stay resident on the GPU (GG, fixed at load) and
how a layer's active FFNs are split into CC / CG / GG bands at run time. Policies are selected by
name through the registry (kind "inference_policy"): ScheInfer's own ('scheinfer', 'fixed') are
registered here; baselines register theirs in their own packages ('fiddler' in
baselines.fiddler, llama.cpp's 'layers' in baselines.llamacpp), which a caller imports to make
those names available. The registry holds the classes: `make_policy` builds one with
`Policy.build`, and `policy_ranks_by_popularity` asks one, before it is built, whether it will
need a popularity profile. The engine and the sim tier both place weights with `place`, so a
prediction and a measurement of one policy use the very same placement.

GPU memory counts FFN / expert weights and staging buffers only; attention, embeddings, norms,
routers and the KV cache are assumed resident besides it [R, digest 1.2].
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from impl.common.config import ConfigError
from impl.common.registry import get, names, register

from .assign import ASSIGN_MODES, ExpertLoad, assign_layer
from .config import DecoderConfig
from .partition import GG_MODES, CostModel, Split, resident_rows

__all__ = ["POLICY_KIND", "FFNKey", "Policy", "ScheInferPolicy", "FixedPolicy", "needs_cost", "make_policy",
           "policy_ranks_by_popularity",
           "ffn_widths", "PopularityCounter", "profile_popularity", "Placement", "place"]

POLICY_KIND = "inference_policy"
FFNKey = tuple[int, Hashable]          # (layer, expert id | 'dense' | 'shared')


def ffn_widths(cfg: DecoderConfig) -> dict[FFNKey, int]:
    """Every FFN of a DecoderConfig: (layer, expert) -> intermediate width F."""
    out: dict[FFNKey, int] = {}
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            out.update({(i, e): cfg.moe_ffn_hidden for e in range(cfg.num_experts)})
            if cfg.shared_expert_ffn_hidden:
                out[(i, "shared")] = cfg.shared_expert_ffn_hidden
        else:
            out[(i, "dense")] = cfg.ffn_hidden
    return out


class PopularityCounter:
    """Popularity of every FFN: the tokens it processed, counted from routing decisions. A routed
    expert (layer, e) counts the tokens routed to it; a layer's shared expert (layer, 'shared')
    counts every token of the layer, since every token uses it. What Fiddler's residency and
    ScheInfer's gg_mode='popularity' rank FFNs by (`counts`). Use it as a
    `Decoder.route_observer`, or feed per-expert token counts to `add`."""

    def __init__(self, shared_expert: bool):
        self.shared_expert = shared_expert
        self.counts: dict[FFNKey, float] = {}

    @classmethod
    def for_config(cls, cfg: DecoderConfig) -> "PopularityCounter":
        return cls(bool(cfg.shared_expert_ffn_hidden))

    def add(self, layer: int, expert_tokens: Iterable[tuple[int, int]], tokens: int) -> None:
        """`tokens` tokens of MoE layer `layer`, routed as (expert, token count) pairs."""
        for e, c in expert_tokens:
            self.counts[(layer, e)] = self.counts.get((layer, e), 0.0) + c
        if self.shared_expert:
            self.counts[(layer, "shared")] = self.counts.get((layer, "shared"), 0.0) + tokens

    def __call__(self, layer: int, ids_TK, weights_TK=None) -> None:
        ids = torch.as_tensor(ids_TK)
        tokens = ids.shape[0] if ids.dim() else 0
        experts, counts = torch.unique(ids.flatten(), return_counts=True)
        self.add(layer, zip(experts.tolist(), counts.tolist()), tokens)


def profile_popularity(decoder, tokens: Sequence[int]) -> dict[FFNKey, float]:
    """Tokens per FFN (`PopularityCounter`) routed on one prefill of `tokens` through `decoder`
    (a `decoder.Decoder`; its own route observer is put back afterwards): an offline profile, as
    Fiddler's, for a policy that ranks FFNs by popularity."""
    counter = PopularityCounter.for_config(decoder.config)
    own = decoder.route_observer
    decoder.route_observer = counter
    try:
        decoder.forward(torch.tensor([list(tokens)]), decoder.new_cache(1, len(tokens)), last_only=True)
    finally:
        decoder.route_observer = own
    return counter.counts


class Policy(ABC):
    """Where each FFN's rows live (resident GG rows, fixed at load) and how a layer's active FFNs
    are split at run time. `concurrent`: the three lanes overlap (else parts run one after
    another); `staging_buffers`: host->device buffers the policy needs for CG;
    `uses_popularity`: the policy ranks FFNs by popularity, so it is built with a profile
    (`popularity`, e.g. `profile_popularity`, or given one by `set_popularity`) and has something
    to rank on MoE models only;
    `whole_layers`: the policy's GPU budget holds whole layers, each layer's non-FFN weights and KV
    cache going to the GPU with its FFN rows and the output head taking its share first
    (`place_head`), the token embeddings on the CPU (llama.cpp's -ngl); other policies keep every
    non-FFN weight on the GPU besides their budget."""

    name: str = "?"
    concurrent: bool = True
    staging_buffers: int = 2
    uses_popularity: bool = False
    whole_layers: bool = False
    popularity: Mapping[FFNKey, float] | None = None

    @classmethod
    @abstractmethod
    def build(cls, *, cost: CostModel | None, hidden: int, num_layers: int, dtype_bytes: int, tile: int = 64,
              **options) -> Policy:
        """The policy `make_policy` builds by name: every policy is offered the same arguments and
        takes what it uses; `options` are its own."""

    @classmethod
    def ranks_by_popularity(cls, **options) -> bool:
        """Whether a policy built with `options` has `uses_popularity`, known before it is built
        (it may need a cost model first): a caller makes a calibration prompt only for one that
        profiles."""
        return cls.uses_popularity

    def set_popularity(self, popularity: Mapping[FFNKey, float] | None) -> None:
        """Give a policy that ranks FFNs by popularity (`uses_popularity`, which its options may
        decide) the profile it ranks on, once it is built and before its weights are placed;
        None: key order."""
        self.popularity = None if popularity is None else dict(popularity)

    def place_head(self, budget_bytes: int) -> tuple[bool, int]:
        """(whether the output head is on the GPU, the budget left for the FFN rows and the staging
        buffers): the head is on the GPU besides the budget, unless the policy counts it in."""
        return True, budget_bytes

    @abstractmethod
    def resident(self, ffns: dict[FFNKey, int], hidden: int, dtype_bytes: int, budget_bytes: int) -> dict[FFNKey, int]:
        """GG rows per FFN (a suffix of F) within budget_bytes."""

    @abstractmethod
    def plan(self, layer: int, loads: Sequence[ExpertLoad], phase: str, layer_tokens: int,
             cg_max: int | None) -> list[Split]:
        """A Split per active FFN (loads carry token counts and resident rows)."""


@register(POLICY_KIND, "scheinfer")
class ScheInferPolicy(Policy):
    """partition.py's static GG + per (phase, expert) CC/CG optimiser, with assign.py's modes."""

    name = "scheinfer"

    def __init__(self, cost: CostModel, hidden: int, dtype_bytes: int, tile: int = 64, assign: str = "split",
                 gg_mode: str = "uniform", popularity: dict | None = None, exhaustive: bool = False):
        if assign not in ASSIGN_MODES:
            raise ConfigError(f"assign={assign!r} is not allowed; expected one of {', '.join(ASSIGN_MODES)}")
        if gg_mode not in GG_MODES:
            raise ConfigError(f"gg_mode={gg_mode!r} is not allowed; expected one of {', '.join(GG_MODES)}")
        if tile < 1:
            raise ConfigError(f"tile={tile!r} is not allowed; expected an integer >= 1")
        self.cost, self.hidden, self.dtype_bytes, self.tile = cost, hidden, dtype_bytes, tile
        self.assign, self.gg_mode, self.popularity, self.exhaustive = assign, gg_mode, popularity, exhaustive

    @classmethod
    def build(cls, *, cost, hidden, num_layers, dtype_bytes, tile=64, **options):
        return cls(needs_cost(cls.name, cost), hidden, dtype_bytes, tile, **options)

    @classmethod
    def ranks_by_popularity(cls, gg_mode: str = "uniform", **options) -> bool:
        """GG rows by popularity (gg_mode 'popularity'): whole FFNs, most popular first."""
        return gg_mode == "popularity"

    @property
    def uses_popularity(self) -> bool:
        return self.ranks_by_popularity(gg_mode=self.gg_mode)

    def resident(self, ffns, hidden, dtype_bytes, budget_bytes):
        return resident_rows(ffns, hidden, dtype_bytes, budget_bytes, self.tile, self.gg_mode, self.popularity)

    def plan(self, layer, loads, phase, layer_tokens, cg_max):
        return assign_layer(self.cost, loads, self.hidden, self.tile, self.dtype_bytes, self.assign, cg_max,
                            exhaustive=self.exhaustive)


@register(POLICY_KIND, "fixed")
class FixedPolicy(Policy):
    """Given CC / CG / GG fractions of every FFN (rounded to rows): forced partitions for exactness
    tests and ablations. FFNs take their GG rows in key order, each if the budget still holds
    them (with a budget that holds them all, every FFN has its fractions)."""

    name = "fixed"

    def __init__(self, cc: float, cg: float, gg: float, concurrent: bool = True):
        if min(cc, cg, gg) < 0 or abs(cc + cg + gg - 1) > 1e-9:
            raise ConfigError(f"fixed fractions (cc, cg, gg)={(cc, cg, gg)!r}; expected numbers >= 0 summing to 1")
        self.frac, self.concurrent = (cc, cg, gg), concurrent

    @classmethod
    def build(cls, *, cost, hidden, num_layers, dtype_bytes, tile=64, **options):
        return cls(**options)

    def resident(self, ffns, hidden, dtype_bytes, budget_bytes):
        out, left = {}, budget_bytes
        for k in sorted(ffns, key=str):
            need = round(self.frac[2] * ffns[k]) * 3 * hidden * dtype_bytes
            out[k] = round(self.frac[2] * ffns[k]) if need <= left else 0
            left -= need if need <= left else 0
        return out

    def plan(self, layer, loads, phase, layer_tokens, cg_max):
        out = []
        for ld in loads:
            r = ld.width - ld.gg
            cc = min(round(self.frac[0] * ld.width), r)
            if cg_max is not None:             # what the staging buffers cannot hold goes to CC
                cc = max(cc, r - cg_max)
            out.append(Split(cc, r - cc, ld.gg))
        return out


def needs_cost(name: str, cost: CostModel | None) -> CostModel:
    """`cost`, or the one-line error of a policy built without the cost model it needs."""
    if cost is None:
        raise ConfigError(f"policy={name!r} needs a cost model (calibrate.py)")
    return cost


def make_policy(name: str, *, cost: CostModel | None, hidden: int, num_layers: int, dtype_bytes: int,
                tile: int = 64, **options) -> Policy:
    """The policy registered under `name` (module doc); `options` go to its constructor."""
    registered = names(POLICY_KIND)
    if name not in registered:
        raise ConfigError(f"policy={name!r} is not allowed; expected one of {', '.join(registered)} (a baseline's "
                          "policy is registered when its package is imported: baselines.fiddler, baselines.llamacpp)")
    return get(POLICY_KIND, name).build(cost=cost, hidden=hidden, num_layers=num_layers, dtype_bytes=dtype_bytes,
                                        tile=tile, **options)


def policy_ranks_by_popularity(name: str, **options) -> bool:
    """`Policy.ranks_by_popularity` of the policy registered under `name` (a name `make_policy`
    takes), before any is built."""
    return get(POLICY_KIND, name).ranks_by_popularity(**options)


# ----------------------------------------------------------------------------------- placement

@dataclass(frozen=True)
class Placement:
    """Where a policy puts the FFN weights under a GPU budget: resident GG rows per FFN, and the
    staging buffers for CG (`staging_buffers` of `cg_max` rows each; cg_max 0: no CG at all)."""

    gg: Mapping[FFNKey, int]
    cg_max: int
    staging_buffers: int
    row_bytes: int

    @property
    def staging_bytes(self) -> int:
        return self.staging_buffers * self.cg_max * self.row_bytes

    @property
    def resident_bytes(self) -> int:
        return sum(self.gg.values()) * self.row_bytes


def place(policy: Policy, widths: Mapping[FFNKey, int], hidden: int, dtype_bytes: int,
          budget_bytes: int) -> Placement:
    """Staging buffers first, sized for the widest FFN, when the budget holds them (else no CG);
    the rest of the budget to the policy's resident rows."""
    if budget_bytes < 0:
        raise ConfigError(f"GPU budget={budget_bytes!r} bytes is not allowed; expected >= 0")
    if not widths:
        raise ConfigError("place: no FFNs to place; expected at least one (layer, expert) -> width")
    row_bytes = 3 * hidden * dtype_bytes
    max_w = max(widths.values())
    staging = policy.staging_buffers * max_w * row_bytes
    cg_max = 0
    if budget_bytes >= staging:
        budget_bytes -= staging
        cg_max = max_w
    gg = policy.resident(dict(widths), hidden, dtype_bytes, int(budget_bytes))
    return Placement(gg, cg_max, policy.staging_buffers if cg_max else 0, row_bytes)
