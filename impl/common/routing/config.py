"""`GateConfig`: which gate, and its options, checked when the config is built.

Options that only some gate kinds read are listed per kind, so a key set for the wrong kind fails
loudly instead of being ignored. `GateKind` and `DropPolicy` name the allowed values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from ..config import ConfigError

GateKind = Literal["softmax_topk", "gshard", "switch", "deepseek_v3", "sigmoid", "xmoe", "expert_choice"]
DropPolicy = Literal["probs", "position"]

GATE_KINDS: tuple[str, ...] = get_args(GateKind)
_TOKEN_CHOICE_KINDS = tuple(k for k in GATE_KINDS if k != "expert_choice")

# Fields that only some kinds read. Setting one away from its default for another kind is an
# error, so a misplaced key in a config fails loudly instead of being ignored.
_KIND_SPECIFIC_FIELDS: dict[str, tuple[str, ...]] = {
    "drop_policy": _TOKEN_CHOICE_KINDS,
    "normalize_topk": ("softmax_topk", "sigmoid", "deepseek_v3", "xmoe"),
    "aux_loss_coeff": _TOKEN_CHOICE_KINDS,
    "aux_loss_seq_len": _TOKEN_CHOICE_KINDS,
    "noise_seed": ("gshard",),
    "n_group": ("deepseek_v3",),
    "topk_group": ("deepseek_v3",),
    "routed_scaling_factor": ("deepseek_v3",),
    "bias_update_rate": ("deepseek_v3",),
    "low_rank_dim": ("xmoe",),
    "init_temperature": ("xmoe",),
}


@dataclass(frozen=True)
class GateConfig:
    """Which gate, and its options. Checked on construction; `build_gate` adds the checks that
    need the number of experts.

    kind:             see the table in the `impl.common.routing` docstring.
    top_k:            experts per token (token-choice gates); k in expert choice's capacity.
    capacity_factor:  None = dropless. Token-choice capacity per expert is
                      ceil(T * top_k * capacity_factor / E); expert choice's per-expert token
                      count is ceil(T * capacity_factor * top_k / E), None meaning 1.0 there.
    drop_policy:      'probs' keeps an overfull expert's highest-probability assignments,
                      'position' its earliest tokens (Megatron-core's moe_token_drop_policy).
    normalize_topk:   divide the k weights by their sum (Qwen3's norm_topk_prob; Mixtral's softmax
                      over the top-k logits is the same thing). None = the kind's convention:
                      True for deepseek_v3, False otherwise.
    aux_loss_coeff:   0 = no load-balancing loss (aux_loss None); see `load_balancing_loss`.
    aux_loss_seq_len: tokens per sequence for the sequence-wise loss (DeepSeek-V3's); None = the
                      whole batch is one sequence.
    z_loss_coeff:     0 = no z-loss (z_loss None); see `router_z_loss`.
    init_std:         std of the normal initialisation of the router weights.
    noise_seed:       gshard: seed of the gate's own noise generator; None = torch's global RNG.
    n_group, topk_group, routed_scaling_factor, bias_update_rate: deepseek_v3 (see the class).
    low_rank_dim, init_temperature: xmoe (see the class).
    """

    kind: GateKind = "softmax_topk"
    top_k: int = 2
    capacity_factor: float | None = None
    drop_policy: DropPolicy = "probs"
    normalize_topk: bool | None = None
    aux_loss_coeff: float = 0.0
    aux_loss_seq_len: int | None = None
    z_loss_coeff: float = 0.0
    init_std: float = 0.02
    noise_seed: int | None = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3
    low_rank_dim: int = 16
    init_temperature: float = 0.07

    def __post_init__(self):
        if self.kind not in GATE_KINDS:
            raise ConfigError(f"GateConfig.kind: {self.kind!r} is not allowed; allowed: "
                              + ", ".join(repr(k) for k in GATE_KINDS))
        if self.drop_policy not in get_args(DropPolicy):
            raise ConfigError(f"GateConfig.drop_policy: {self.drop_policy!r} is not allowed; allowed: "
                              + ", ".join(repr(p) for p in get_args(DropPolicy)))
        _require(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        _require(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
                 self.capacity_factor, "None (dropless) or a number > 0")
        _require(self.aux_loss_coeff >= 0, "aux_loss_coeff", self.aux_loss_coeff, "a number >= 0")
        _require(self.aux_loss_seq_len is None or self.aux_loss_seq_len >= 1, "aux_loss_seq_len",
                 self.aux_loss_seq_len, "None or an integer >= 1")
        _require(self.z_loss_coeff >= 0, "z_loss_coeff", self.z_loss_coeff, "a number >= 0")
        _require(self.init_std >= 0, "init_std", self.init_std, "a number >= 0")
        _require(self.n_group >= 1, "n_group", self.n_group, "an integer >= 1")
        _require(1 <= self.topk_group <= self.n_group, "topk_group", self.topk_group,
                 f"an integer in 1..n_group={self.n_group}")
        _require(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor,
                 "a number > 0")
        _require(self.bias_update_rate >= 0, "bias_update_rate", self.bias_update_rate, "a number >= 0")
        _require(self.low_rank_dim >= 1, "low_rank_dim", self.low_rank_dim, "an integer >= 1")
        _require(self.init_temperature > 0, "init_temperature", self.init_temperature, "a number > 0")
        if self.kind == "switch" and self.top_k != 1:
            raise ConfigError(f"GateConfig.top_k: {self.top_k} is not allowed for kind 'switch', "
                              "which routes each token to one expert; set top_k: 1")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, kinds in _KIND_SPECIFIC_FIELDS.items():
            value = getattr(self, name)
            if self.kind not in kinds and value != defaults[name]:
                raise ConfigError(f"GateConfig.{name}={value!r} is not used by kind {self.kind!r}; "
                                  f"it applies to: {', '.join(kinds)}")
        if self.aux_loss_seq_len is not None and self.aux_loss_coeff == 0:
            raise ConfigError(f"GateConfig.aux_loss_seq_len={self.aux_loss_seq_len} needs "
                              "aux_loss_coeff > 0 (the loss is off at 0)")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"GateConfig.{key}: {value!r} is not allowed; expected {allowed}")
