"""Seeded synthetic routing: `synthetic_topk` (top-k ids of one batch from a uniform, Zipf or
topic-correlated model) and `synthetic_trace` (a whole trace of steps x layers x ranks).

Controlled, reproducible routing lets dispatchers, cost models and placement run without a model.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch

from .trace import RoutingTrace
from .validation import _int_arg

Distribution = Literal["uniform", "zipf", "correlated"]
_CHUNK = 16384  # tokens per random-key block: bounds memory at [_CHUNK, E] float64


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from several ints (independent streams per layer / group)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def synthetic_topk(num_tokens: int, num_experts: int, top_k: int, distribution: Distribution = "uniform", *,
                   skew: float = 1.0, correlation: float = 0.5, num_clusters: int | None = None,
                   seed: int = 0, popularity_seed: int | None = None) -> torch.Tensor:
    """int64 [T, K]: K distinct experts per token, drawn from a seeded, deterministic model.

    All three models rank random keys and keep each token's K largest (float64 keys, so ties,
    which would bias the pick, have probability ~E^2 / 2^53):

    uniform:    keys ~ U(0, 1): every K-subset equally likely, each expert with probability K / E,
                exactly (the balanced baseline, e.g. HierMoE's Table II).
    zipf:       expert popularity p ∝ 1 / r^skew for ranks r = 1..E, assigned to experts by a seeded
                random permutation; keys = log p + Gumbel noise, which is exactly sequential sampling
                of K distinct experts, each draw proportional to p among those left. skew=0 is uniform.
    correlated: experts are split (seeded permutation) into `num_clusters` equal 'topic' clusters
                (default E // (2K), at least 1; sizes differ by at most one, each must hold >= K).
                Each token draws a topic uniformly and, with probability `correlation`, takes its K
                experts uniformly from that cluster, otherwise uniformly from all E. Every expert's
                marginal load stays K / E (for equal clusters) while experts of a cluster are
                co-selected far more often than chance: co-selection structure without skew.

    seed drives the per-token draws; popularity_seed (default: derived from seed) the permutation
    and the clusters, so several batches can share one popularity order (see synthetic_trace).
    """
    T = _int_arg("num_tokens", num_tokens, 0)
    E = _int_arg("num_experts", num_experts, 1)
    K = _int_arg("top_k", top_k, 1)
    if K > E:
        raise ValueError(f"top_k: {K} is not allowed; expected 1..num_experts={E}")
    if distribution not in get_args(Distribution):
        raise ValueError(f"distribution: {distribution!r} is not allowed; allowed: "
                         + ", ".join(repr(d) for d in get_args(Distribution)))
    seed = _int_arg("seed", seed, 0)
    popularity_seed = _derive_seed(seed, 1) if popularity_seed is None else _int_arg(
        "popularity_seed", popularity_seed, 0)
    if not (isinstance(skew, (int, float)) and not isinstance(skew, bool) and 0 <= skew < math.inf):
        raise ValueError(f"skew: {skew!r} is not allowed; expected a finite number >= 0")
    if not (isinstance(correlation, (int, float)) and not isinstance(correlation, bool)
            and 0 <= correlation <= 1):
        raise ValueError(f"correlation: {correlation!r} is not allowed; expected a number in [0, 1]")
    if num_clusters is not None and distribution != "correlated":
        raise ValueError(f"num_clusters={num_clusters!r} applies to distribution 'correlated' only, "
                         f"not {distribution!r}")

    perm_gen = torch.Generator().manual_seed(popularity_seed)
    perm_E = torch.randperm(E, generator=perm_gen)
    log_p_E = members_CE = None
    if distribution == "zipf":
        ranks = torch.arange(1, E + 1, dtype=torch.float64)
        log_p_E = torch.empty(E, dtype=torch.float64)
        log_p_E[perm_E] = -float(skew) * torch.log(ranks)  # expert perm_E[r-1] has rank r
    elif distribution == "correlated":
        C = max(1, E // (2 * K)) if num_clusters is None else _int_arg("num_clusters", num_clusters, 1)
        if E // C < K:
            raise ValueError(f"num_clusters: {C} is not allowed for num_experts={E}, top_k={K}: a "
                             f"cluster would hold {E // C} < top_k experts; expected 1..{E // K}")
        members_CE = torch.zeros(C, E, dtype=torch.bool)
        for c, part in enumerate(torch.tensor_split(perm_E, C)):
            members_CE[c, part] = True

    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(T, K, dtype=torch.long)
    for start in range(0, T, _CHUNK):
        n = min(_CHUNK, T - start)
        u_NE = torch.rand(n, E, dtype=torch.float64, generator=gen)
        if distribution == "uniform":
            keys_NE = u_NE
        elif distribution == "zipf":
            gumbel_NE = -torch.log(-torch.log(u_NE.clamp_min(torch.finfo(torch.float64).tiny)))
            keys_NE = log_p_E + gumbel_NE
        else:
            topic_N = torch.randint(members_CE.shape[0], (n,), generator=gen)
            inside_N = torch.rand(n, dtype=torch.float64, generator=gen) < correlation
            outside_NE = inside_N[:, None] & ~members_CE[topic_N]
            keys_NE = u_NE.masked_fill(outside_NE, -1.0)  # below every U(0,1) key: never picked
        out[start:start + n] = torch.topk(keys_NE, K, dim=1).indices
    return out


def synthetic_trace(num_experts: int, top_k: int, *, tokens_per_rank: int, num_steps: int = 1,
                    num_layers: int = 1, num_ranks: int = 1, distribution: Distribution = "uniform",
                    skew: float = 1.0, correlation: float = 0.5, num_clusters: int | None = None,
                    seed: int = 0) -> RoutingTrace:
    """A RoutingTrace of num_steps x num_layers x num_ranks groups of tokens_per_rank tokens
    (ordered step, layer, rank). Each layer has its own popularity order / clusters, shared by all
    steps and ranks of that layer (hot experts persist over training steps, differ between
    layers); each group draws its tokens from an independent stream, so a group's routing does not
    depend on how many other groups there are. Weights: softmax of N(0, 1) logits over the K
    chosen experts, sorted descending (slot 0 is the top-1 expert, as in a real top-k gate)."""
    for name, value, low in (("tokens_per_rank", tokens_per_rank, 0), ("num_steps", num_steps, 1),
                             ("num_layers", num_layers, 1), ("num_ranks", num_ranks, 1), ("seed", seed, 0)):
        _int_arg(name, value, low)
    ids, weights = [], []
    for step in range(num_steps):
        for layer in range(num_layers):
            for rank in range(num_ranks):
                group_seed = _derive_seed(seed, 2, step, layer, rank)
                ids.append(synthetic_topk(tokens_per_rank, num_experts, top_k, distribution, skew=skew,
                                          correlation=correlation, num_clusters=num_clusters,
                                          seed=group_seed, popularity_seed=_derive_seed(seed, 3, layer)))
                gen = torch.Generator().manual_seed(_derive_seed(seed, 4, step, layer, rank))
                logits = torch.randn(tokens_per_rank, top_k, generator=gen)
                weights.append(torch.softmax(logits, dim=1).sort(dim=1, descending=True).values)
    G = num_steps * num_layers * num_ranks
    grid = torch.stack(torch.meshgrid(torch.arange(num_steps), torch.arange(num_layers),
                                      torch.arange(num_ranks), indexing="ij"), dim=-1).reshape(G, 3)
    per_token = grid.repeat_interleave(tokens_per_rank, dim=0)
    source = {"kind": "synthetic", "distribution": distribution, "seed": seed,
              "tokens_per_rank": tokens_per_rank, "num_steps": num_steps, "num_layers": num_layers,
              "num_ranks": num_ranks}
    if distribution == "zipf":
        source["skew"] = skew
    if distribution == "correlated":
        source.update(correlation=correlation, num_clusters=num_clusters)
    return RoutingTrace(per_token[:, 0], per_token[:, 1], per_token[:, 2], torch.cat(ids),
                        torch.cat(weights), num_experts, source)
