"""Routing workloads for the sim-tier HierMoE experiments: the models' real gates applied to skewed
synthetic token streams, per training iteration and MoE layer, split over the G ranks.

The paper trains on an unstated dataset and states no load-balancing setting; routing skew is
what its speedups depend on most (a skewed routing inflates the largest split of the flat
baseline, and gives the expert swap something to fix). So skew is ONE explicit, recorded
parameter of our token stream [reconstruction, documented as ours]:

* Each layer has `num_topics` topic centres (unit-variance Gaussian per dimension) in a
  `subspace_dim`-dimensional subspace of the M-dim hidden space (basis B); a token's hidden state
  is `skew` x its topic's centre plus unit Gaussian noise per dimension, RMS-normalised as after
  the norm that precedes a real router. skew = 0 gives isotropic tokens; larger skew clusters the
  tokens by topic, so the experts the popular topics prefer load up.
* Topic popularity is Zipf(`topic_skew`) over a seeded permutation and drifts between iterations
  as a random walk of the log-popularities (std `drift`), so the hot experts move slowly over
  training, as they do in real runs (Fig. 12's fluctuations).
* The gate module is the model's real one (DeepSeek-V3's sigmoid + bias + node-limited group
  routing, or Qwen3's normalised softmax top-k), its router weight projected onto the subspace,
  x W^T = z (W B^T)^T, so it is evaluated exactly at the cost of a z-sized GEMM. The projected
  rows are scaled to equal norm: a trained router is balanced by its load-balancing loss, and
  equal norms make isotropic tokens (skew = 0) route uniformly, so skew alone sets the imbalance.
* DeepSeek-V3's aux-loss-free balancing runs as in training: after every iteration each layer's
  gate updates its score bias from the global expert loads (`update_bias`), so the stream is not
  skewed beyond what the real router would let it be. Gates without such a mechanism route the
  stream as is (their aux loss would act through training, which the sim tier does not run).

`routing_balance` measures what the skew does: the largest flat AlltoAll split over its mean,
and MaxVio (largest expert load over the mean, minus 1; the balance metric of Wang et al.,
arXiv 2408.15664), recorded with every sim run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from impl.common.config import bounded, check_bounds
from impl.common.models import ModelConfig
from impl.common.routing import build_gate, init_gate_from_seed

__all__ = ["TokenStreamConfig", "RoutingStream", "routing_balance"]


@dataclass(frozen=True)
class TokenStreamConfig:
    skew: float = bounded(0.0, ge=0, le=1e3)        # topic-centre scale over the unit token noise (0 = isotropic tokens)
    num_topics: int = bounded(64, ge=1, le=1 << 16)   # topic clusters per layer
    topic_skew: float = bounded(1.0, ge=0, le=100)    # Zipf exponent of topic popularity (0 = uniform topics)
    drift: float = bounded(0.15, ge=0, le=100)        # std of the per-iteration random walk of log topic popularity
    subspace_dim: int = bounded(64, ge=1, le=4096)    # dimension of the token subspace (exact gate evaluation)

    def __post_init__(self):
        check_bounds(self)


def routing_balance(routing_map_TE: torch.Tensor, world_size: int) -> dict[str, float]:
    """Balance of one layer's routing over all ranks (rank r holds rows r*T..(r+1)*T-1):
    max_split_ratio = the largest (source rank, destination GPU) row count of the flat AlltoAll
    over its mean; maxvio = the largest expert load over the mean load, minus 1."""
    E = routing_map_TE.shape[1]
    load_E = routing_map_TE.sum(0).to(torch.float64)
    split_GG = routing_map_TE.view(world_size, -1, world_size, E // world_size).sum((1, 3)).to(torch.float64)
    mean = split_GG.mean()
    return {"max_split_ratio": float(split_GG.max() / mean) if mean > 0 else 1.0,
            "maxvio": float(load_E.max() / load_E.mean() - 1) if load_E.mean() > 0 else 0.0}


class RoutingStream:
    """Per iteration: for every MoE layer, the [G*T, E] routing map of all tokens (rank r holds
    rows r*T .. (r+1)*T - 1). Deterministic in `seed`."""

    def __init__(self, model: ModelConfig, num_layers: int, world_size: int, tokens_per_rank: int,
                 stream: TokenStreamConfig = TokenStreamConfig(), seed: int = 0, *,
                 num_experts: int | None = None, top_k: int | None = None):
        self.model, self.stream, self.seed = model, stream, seed
        self.num_layers, self.world_size, self.tokens_per_rank = num_layers, world_size, tokens_per_rank
        self.num_experts = num_experts or model.num_experts
        self.top_k = top_k or model.top_k
        gate_cfg = model.gate_config(top_k=self.top_k)
        if gate_cfg.kind == "deepseek_v3" and self.num_experts % gate_cfg.n_group:
            gate_cfg = replace(gate_cfg, n_group=1, topk_group=1)   # E sweep: group routing needs n_group | E
        g = torch.Generator().manual_seed(seed)
        S = stream.subspace_dim
        # orthonormal rows: |z B| = |z|, so normalising z normalises the full hidden state
        basis_SM = torch.linalg.qr(torch.randn(model.hidden, S, generator=g, dtype=torch.float64))[0].t()
        self.gates, self.centres, self.log_pop = [], [], []
        for layer in range(num_layers):
            full = init_gate_from_seed(build_gate(gate_cfg, model.hidden, self.num_experts), seed * 1000 + layer)
            projected = build_gate(gate_cfg, S, self.num_experts)
            with torch.no_grad():
                rows_ES = full.weight_EM.double() @ basis_SM.t()
                rows_ES *= rows_ES.norm(dim=1).mean() / rows_ES.norm(dim=1, keepdim=True)    # equal norms
                projected.weight_EM.copy_(rows_ES.to(projected.weight_EM.dtype))
            self.gates.append(projected)
            self.centres.append(torch.randn(stream.num_topics, S, generator=g, dtype=torch.float64))
            ranks = torch.randperm(stream.num_topics, generator=g).double() + 1
            self.log_pop.append(-stream.topic_skew * ranks.log())
        self._g = g
        self.iteration = 0

    def _tokens(self, layer: int) -> torch.Tensor:
        s, g = self.stream, self._g
        n = self.world_size * self.tokens_per_rank
        probs = torch.softmax(self.log_pop[layer], 0)
        topic_N = torch.multinomial(probs, n, replacement=True, generator=g)
        centres = self.centres[layer]
        z = s.skew * centres[topic_N] + torch.randn(n, centres.shape[1], generator=g, dtype=torch.float64)
        # RMS-normalised like the hidden state a real router sees (after the layer's norm)
        return (z * (math.sqrt(self.model.hidden) / z.norm(dim=1, keepdim=True))).float()

    @torch.no_grad()
    def next_iteration(self) -> list[torch.Tensor]:
        """The routing maps [G*T, E] (bool) of every MoE layer for the next iteration."""
        maps = []
        for layer, gate in enumerate(self.gates):
            routing = gate(self._tokens(layer))
            maps.append(routing.routing_map_TE.clone())
            if hasattr(gate, "update_bias"):
                gate.update_bias(routing.routing_map_TE.sum(0).double())
            self.log_pop[layer] += self.stream.drift * torch.randn(self.stream.num_topics, generator=self._g,
                                                                    dtype=torch.float64)
        self.iteration += 1
        return maps

    def per_rank(self, routing_map_TE: torch.Tensor) -> list[torch.Tensor]:
        return list(routing_map_TE.split(self.tokens_per_rank))

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        while True:
            yield self.next_iteration()
