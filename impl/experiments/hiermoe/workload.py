"""Routing workloads for the sim-tier HierMoE experiments: the models' real gates applied to skewed
synthetic token streams, per training iteration and MoE layer, split over the G ranks.

The paper trains on an unstated dataset; routing skew is what its speedups depend on (a skewed
routing inflates max(p) for the flat baseline and gives the expert swap something to fix). Our
token stream [reconstruction, documented as ours]:

* Each layer has `num_topics` topic centres in the hidden space; a token's hidden state is its
  topic's centre plus noise. Topic popularity is Zipf(`topic_skew`) over a seeded permutation,
  and drifts between iterations as a random walk of the log-popularities (std `drift`), so the
  hot experts move slowly over training, as they do in real runs (Fig. 12's fluctuations).
* Hidden states are RMS-normalised, as after the norm that precedes a real router, and lie in a
  `subspace_dim`-dimensional subspace of the M-dim hidden space (basis B),
  so the gate, x W^T = z (W B^T)^T, is evaluated exactly at the cost of a z-sized GEMM: the gate
  module is the model's real one (DeepSeek-V3's sigmoid + bias + node-limited group routing, or
  Qwen3's normalised softmax top-k) with its router weight projected onto the subspace.
* DeepSeek-V3's aux-loss-free balancing runs as in training: after every iteration each layer's
  gate updates its score bias from the global expert loads (`update_bias`), so the stream is not
  skewed beyond what the real router would let it be. Gates without such a mechanism route the
  stream as is (their aux loss would act through training, which the sim tier does not run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from impl.common.config import ConfigError
from impl.common.models import ModelConfig
from impl.common.routing import build_gate, init_gate_from_seed

__all__ = ["TokenStreamConfig", "RoutingStream"]


@dataclass(frozen=True)
class TokenStreamConfig:
    num_topics: int = 64          # topic clusters per layer
    topic_skew: float = 1.0       # Zipf exponent of topic popularity (0 = uniform topics)
    drift: float = 0.15           # std of the per-iteration random walk of log topic popularity
    noise: float = 1.5            # token noise per dimension; topic centres have unit scale (max/mean expert load ~3)
    subspace_dim: int = 64        # dimension of the token subspace (exact gate evaluation)

    def __post_init__(self):
        checks = (("num_topics", self.num_topics >= 1, "an integer >= 1"),
                  ("topic_skew", self.topic_skew >= 0, "a number >= 0"),
                  ("drift", self.drift >= 0, "a number >= 0"),
                  ("noise", self.noise >= 0, "a number >= 0"),
                  ("subspace_dim", self.subspace_dim >= 1, "an integer >= 1"))
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not allowed; allowed: {allowed}")


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
                projected.weight_EM.copy_((full.weight_EM.double() @ basis_SM.t()).to(projected.weight_EM.dtype))
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
        z = centres[topic_N] + s.noise * torch.randn(n, centres.shape[1], generator=g, dtype=torch.float64)
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
