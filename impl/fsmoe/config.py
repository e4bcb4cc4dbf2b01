"""The FSMoE layer's typed configuration, checked before any work: every bad value fails with one
line naming the key and what is allowed."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from impl.common.config import ConfigError
from impl.common.equal_slice import A2A_ALGORITHMS
from impl.common.ordering import ORDERS

__all__ = ["MoELayerConfig", "GateKind", "ExpertKind", "MAX_DEGREE"]

GateKind = Literal["gshard", "sigmoid", "xmoe", "expert_choice", "softmoe"]
ExpertKind = Literal["gpt", "mixtral"]
MAX_DEGREE = 8          # pipeline degrees 1..8 (FSMoE's solver searches {1, 2, 4, 8})


@dataclass(frozen=True)
class MoELayerConfig:
    """One FSMoE layer.

    gate:            GShard noisy top-k, Sigmoid, X-MoE, Expert Choice, or SoftMoE (its slots are
                     its own Order / I-Order: `slots_per_expert` slots, no capacity).
    order:           'tutel' (index) or 'gshard' (one-hot einsum) ordering (token-choice gates).
    dispatch:        equal-slice AlltoAll algorithm over the expert-parallel group: 'flat', '1dh',
                     '2dh' (the hierarchical ones need EP over every GPU: esp=False).
    expert:          'gpt' (2 GEMMs, `activation`, default gelu) or 'mixtral' (SwiGLU, 3 GEMMs, silu).
    esp:             True: ESP and MP over the GPUs of a node, EP across nodes (the paper's
                     layout); False: EP over every GPU, no ESP.
    capacity_factor: C = ceil(k f T / E) per expert per GPU, rounded up to lcm(r_fwd, r_bwd);
                     None = no drop (C = the largest per-expert count of any GPU).
    capacity:        a fixed C instead (rounded up the same way).
    drop_tokens:     False: a fixed or factor capacity below what the routing needs is an error.
    r_fwd, r_bwd:    pipeline degrees of the forward and the backward, 1..8.
    gate_options:    extra `GateConfig` fields (e.g. noise_seed, low_rank_dim).
    """

    hidden: int
    ffn_hidden: int
    num_experts: int
    top_k: int = 2
    gate: GateKind = "gshard"
    order: Literal["tutel", "gshard"] = "tutel"
    dispatch: Literal["flat", "1dh", "2dh"] = "flat"
    expert: ExpertKind = "gpt"
    activation: Literal["gelu", "relu", "silu"] | None = None
    esp: bool = True
    capacity_factor: float | None = 1.2
    capacity: int | None = None
    drop_tokens: bool = True
    slots_per_expert: int = 1
    r_fwd: int = 1
    r_bwd: int = 1
    gate_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for key in ("hidden", "ffn_hidden", "num_experts", "top_k", "slots_per_expert"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}: {v!r} is not allowed; allowed: an integer >= 1")
        choices = {"gate": get_args(GateKind), "order": tuple(ORDERS), "dispatch": A2A_ALGORITHMS,
                   "expert": get_args(ExpertKind), "activation": (None, "gelu", "relu", "silu")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not allowed; allowed: "
                                  + ", ".join(map(repr, allowed)))
        for key in ("r_fwd", "r_bwd"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DEGREE:
                raise ConfigError(f"{key}: {v!r} is not allowed; allowed: an integer in 1..{MAX_DEGREE}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k: {self.top_k} is not allowed with num_experts={self.num_experts}; "
                              f"allowed: 1..{self.num_experts}")
        if self.capacity_factor is not None and not (isinstance(self.capacity_factor, (int, float))
                                                     and math.isfinite(self.capacity_factor)
                                                     and self.capacity_factor > 0):
            raise ConfigError(f"capacity_factor: {self.capacity_factor!r} is not allowed; allowed: a number > 0, "
                              "or null for no drop")
        if self.capacity is not None and (isinstance(self.capacity, bool) or not isinstance(self.capacity, int)
                                          or self.capacity < 1):
            raise ConfigError(f"capacity: {self.capacity!r} is not allowed; allowed: an integer >= 1, or null")
        if self.expert == "mixtral" and self.activation not in (None, "silu"):
            raise ConfigError(f"activation: {self.activation!r} is not allowed with expert 'mixtral' (SwiGLU); "
                              "allowed: 'silu'")
        if self.dispatch != "flat" and self.esp:
            raise ConfigError(f"dispatch: {self.dispatch!r} needs expert parallelism over every GPU (esp: false); "
                              "with esp: true the expert-parallel group is the inter-node group: allowed 'flat'")

    @property
    def degree_multiple(self) -> int:
        """Capacity is padded to this, so both passes split it evenly: lcm(r_fwd, r_bwd)."""
        return math.lcm(self.r_fwd, self.r_bwd)

    @property
    def act(self) -> str:
        """The expert's activation: the configured one, or the kind's (gelu for GPT, silu for SwiGLU)."""
        return self.activation or ("silu" if self.expert == "mixtral" else "gelu")

    @property
    def gemms(self) -> int:
        """GEMMs per expert (g in FSMoE's n_exp): 2 for the GPT FFN, 3 for Mixtral's SwiGLU."""
        return 3 if self.expert == "mixtral" else 2

    @property
    def token_choice(self) -> bool:
        return self.gate not in ("expert_choice", "softmoe")
