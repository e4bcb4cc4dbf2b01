"""Routing (gates): which experts each token goes to, and with what weight.

Every gate returns a `RoutingResult`, the one routing representation every dispatcher takes
(Megatron-core's convention: a boolean routing map and a probability matrix, both [T, E]).

Gates (`GATES`, built by `build_gate(GateConfig(kind=...), hidden, num_experts)`):

| kind            | scores                      | selection                      | weights                   |
| --------------- | --------------------------- | ------------------------------ | ------------------------- |
| `softmax_topk`  | softmax over E              | top-k                          | the k probs (opt. / sum)  |
| `gshard`        | logit + N(0,1)*softplus(.)  | top-k (noise in training only) | softmax over the kept k   |
| `switch`        | softmax over E              | top-1                          | the prob                  |
| `deepseek_v3`   | sigmoid                     | grouped top-k of score+bias    | unbiased / sum * scale    |
| `sigmoid`       | sigmoid                     | top-k                          | the k scores (opt. / sum) |
| `xmoe`          | softmax(cosine / tau)       | top-k                          | the k probs (opt. / sum)  |
| `expert_choice` | softmax over E              | each expert takes top-C tokens | the probs                 |

Token-choice gates share the capacity limit (`expert_capacity`, `apply_capacity`: Megatron-core's
drop policies 'probs' and 'position'), the load-balancing loss (`load_balancing_loss`) and the
router z-loss (`router_z_loss`). SoftMoE is not a discrete routing and lives apart
(`SoftMoERouter`). Ties in every top-k resolve to the lower index (expert id, or token index for
expert choice and the 'probs' drop policy), so routing is reproducible bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .registry import register

__all__ = ["RoutingResult", "GateKind", "DropPolicy", "GateConfig", "Gate", "GateSelection", "GATES",
           "build_gate", "init_gate_from_seed", "SoftmaxTopKGate", "GShardNoisyTopKGate", "SwitchGate", "DeepSeekV3Gate",
           "SigmoidGate", "XMoEGate", "ExpertChoiceGate", "SoftMoERouter", "SoftMoEWeights",
           "expert_capacity", "expert_choice_capacity", "apply_capacity", "load_balancing_loss",
           "router_z_loss", "topk_ids_from_routing", "routing_from_topk"]


@dataclass(frozen=True)
class RoutingResult:
    """Routing of T tokens over E experts.

    routing_map_TE: bool, True where token t is sent to expert e (after capacity drops).
    probs_TE:       float, the combine weight of (t, e); zero where routing_map_TE is False.
                    Differentiable with respect to the gate's parameters and input.
    aux_loss:       scalar load-balancing loss of the gate, or None when the gate defines none.
    z_loss:         scalar router z-loss, or None.
    num_dropped:    (token, expert) assignments removed by the capacity limit.
    """

    routing_map_TE: torch.Tensor
    probs_TE: torch.Tensor
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    num_dropped: int = 0

    @property
    def num_tokens(self) -> int:
        return self.routing_map_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.routing_map_TE.shape[1]

    def tokens_per_expert(self) -> torch.Tensor:
        return self.routing_map_TE.sum(dim=0)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

GateKind = Literal["softmax_topk", "gshard", "switch", "deepseek_v3", "sigmoid", "xmoe", "expert_choice"]
DropPolicy = Literal["probs", "position"]

_ALL_KINDS: tuple[str, ...] = get_args(GateKind)
_TOKEN_CHOICE_KINDS = tuple(k for k in _ALL_KINDS if k != "expert_choice")

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

    kind:             see the module table.
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
        if self.kind not in _ALL_KINDS:
            raise ConfigError(f"GateConfig.kind: {self.kind!r} is not allowed; allowed: "
                              + ", ".join(repr(k) for k in _ALL_KINDS))
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


# --------------------------------------------------------------------------------------------
# Shared pieces: top-k, capacity, losses, top-k <-> dense conversion
# --------------------------------------------------------------------------------------------

def _topk_stable(scores: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest along `dim`, ties to the lower index (torch.topk leaves
    the order of ties unspecified, which would make routing differ between runs and devices)."""
    order = torch.sort(scores, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return scores.gather(dim, order), order


def _dense_from_topk(ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                     num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter top-k ids / weights into (routing_map_TE, probs_TE); ids of -1 are padding. The
    weights keep their autograd graph. An extra column E collects the padding and is cut off."""
    T = ids_TK.shape[0]
    valid_TK = ids_TK >= 0
    columns_TK = torch.where(valid_TK, ids_TK, num_experts)
    map_TE = torch.zeros(T, num_experts + 1, dtype=torch.bool, device=ids_TK.device)
    map_TE = map_TE.scatter(1, columns_TK, valid_TK)[:, :num_experts]
    weights_TK = torch.where(valid_TK, weights_TK, torch.zeros_like(weights_TK))
    probs_TE = weights_TK.new_zeros(T, num_experts + 1).scatter(1, columns_TK, weights_TK)[:, :num_experts]
    return map_TE, probs_TE


def routing_from_topk(ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int) -> RoutingResult:
    """A `RoutingResult` from per-token expert ids and weights (trace replay, tests). An id of -1
    marks an empty slot (a token with fewer than K experts); ids must be distinct per token."""
    if ids_TK.dim() != 2 or ids_TK.shape != weights_TK.shape:
        raise ValueError(f"ids_TK and weights_TK must both be [T, K]; got {tuple(ids_TK.shape)} and "
                         f"{tuple(weights_TK.shape)}")
    if ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
        raise ValueError(f"ids_TK must be an integer tensor, got {ids_TK.dtype}")
    if not weights_TK.dtype.is_floating_point:
        raise ValueError(f"weights_TK must be a floating-point tensor, got {weights_TK.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    ids_TK = ids_TK.long()
    if ids_TK.numel():
        low, high = int(ids_TK.min()), int(ids_TK.max())
        if low < -1 or high >= num_experts:
            bad = low if low < -1 else high
            raise ValueError(f"expert id {bad} out of range; allowed: 0..{num_experts - 1}, or -1 for none")
        sorted_TK = ids_TK.sort(dim=1).values
        repeated = (sorted_TK[:, 1:] == sorted_TK[:, :-1]) & (sorted_TK[:, 1:] >= 0)
        if repeated.any():
            t = int(repeated.any(dim=1).nonzero()[0])
            raise ValueError(f"token {t} lists an expert more than once: {ids_TK[t].tolist()}")
    routing_map_TE, probs_TE = _dense_from_topk(ids_TK, weights_TK, num_experts)
    return RoutingResult(routing_map_TE, probs_TE)


def topk_ids_from_routing(result: RoutingResult, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK, weights_TK): each token's experts by weight, descending (equal weights by expert
    id), padded with id -1 and weight 0 where a token has fewer than k experts. Raises when a
    token has more than k experts (expert choice can give a token up to E)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    routing_map_TE, probs_TE = result.routing_map_TE, result.probs_TE
    T, E = routing_map_TE.shape
    counts_T = routing_map_TE.sum(dim=1)
    if T and int(counts_T.max()) > k:
        t = int(counts_T.argmax())
        raise ValueError(f"token {t} is routed to {int(counts_T[t])} experts, more than k={k}")
    key_TE = torch.where(routing_map_TE, probs_TE.detach(), torch.full_like(probs_TE, -math.inf))
    order_TE = torch.sort(key_TE, dim=1, descending=True, stable=True).indices
    width = min(k, E)
    ids_TW = order_TE[:, :width]
    valid_TW = routing_map_TE.gather(1, ids_TW)
    ids_TW = torch.where(valid_TW, ids_TW, torch.full_like(ids_TW, -1))
    gathered_TW = probs_TE.gather(1, ids_TW.clamp(min=0))
    weights_TW = torch.where(valid_TW, gathered_TW, torch.zeros_like(gathered_TW))
    if width < k:  # more slots than experts: pad the missing columns
        ids_TW = torch.cat([ids_TW, ids_TW.new_full((T, k - width), -1)], dim=1)
        weights_TW = torch.cat([weights_TW, weights_TW.new_zeros(T, k - width)], dim=1)
    return ids_TW, weights_TW


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments an expert may take: ceil(T * k * capacity_factor / E) (Megatron-core's
    get_capacity, without a minimum)."""
    return math.ceil(num_tokens * top_k * capacity_factor / num_experts)


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert picks in expert choice: C = ceil(T * capacity_factor * k / E), capped at
    T. With capacity_factor 1 the experts take T * k assignments in all, k per token on average
    (Zhou et al. 2022 write C = T * c / E with c the mean experts per token, here c = k * cf)."""
    return min(num_tokens, math.ceil(num_tokens * capacity_factor * top_k / num_experts))


def apply_capacity(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, capacity: int,
                   drop_policy: DropPolicy) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep at most `capacity` tokens per expert. 'probs' keeps the highest probs (equal probs:
    the earlier token), 'position' the earliest tokens. Returns (map, probs, num_dropped); kept
    weights are not renormalised (as in Megatron-core and DeepSpeed)."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if drop_policy == "position":
        rank_TE = routing_map_TE.long().cumsum(dim=0) - 1
    elif drop_policy == "probs":
        key_TE = torch.where(routing_map_TE, probs_TE.detach(), torch.full_like(probs_TE, -math.inf))
        order_TE = torch.sort(key_TE, dim=0, descending=True, stable=True).indices
        positions_TE = torch.arange(key_TE.shape[0], device=key_TE.device).unsqueeze(1).expand_as(order_TE)
        rank_TE = torch.empty_like(order_TE).scatter_(0, order_TE, positions_TE)
    else:
        raise ValueError(f"drop_policy {drop_policy!r} is not allowed; allowed: "
                         + ", ".join(repr(p) for p in get_args(DropPolicy)))
    kept_TE = routing_map_TE & (rank_TE < capacity)
    num_dropped = int(routing_map_TE.sum() - kept_TE.sum())
    return kept_TE, probs_TE * kept_TE, num_dropped


def load_balancing_loss(scores_TE: torch.Tensor, selected_TE: torch.Tensor, top_k: int, coeff: float,
                        seq_len: int | None = None) -> torch.Tensor:
    """coeff * E * sum_e f_e * P_e, averaged over sequences of `seq_len` tokens (None: one).

    f_e = (assignments to e) / (L * top_k), P_e = mean over the L tokens of scores_TE[:, e].
    This is Switch's loss (top_k = 1), Megatron-core's top-k form, GShard's (selected = top-1,
    top_k = 1) and DeepSeek-V3's sequence-wise balance loss (f_e = E / (K * L) * count, scores =
    sigmoid scores normalised over all experts). Gradients flow through P only."""
    T, E = scores_TE.shape
    seq_len = T if seq_len is None else seq_len
    if T == 0:
        return scores_TE.new_zeros(())
    if T % seq_len:
        raise ValueError(f"aux_loss_seq_len={seq_len} does not divide the number of tokens T={T}")
    num_seq = T // seq_len
    fraction_SE = selected_TE.to(scores_TE.dtype).reshape(num_seq, seq_len, E).sum(dim=1) / (seq_len * top_k)
    mean_score_SE = scores_TE.reshape(num_seq, seq_len, E).mean(dim=1)
    return coeff * E * (fraction_SE * mean_score_SE).sum(dim=1).mean()


def router_z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """coeff * mean_t (logsumexp_e logits[t, e])^2 (ST-MoE's router z-loss)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateSelection:
    """What a gate's `select` produces before the shared capacity / z-loss step."""

    routing_map_TE: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor          # the router's clean logits, for the z-loss
    aux_loss: torch.Tensor | None


GATES: dict[str, type["Gate"]] = {}


def _gate(kind: str):
    """Class decorator: name the gate and put it in `GATES` and the project registry."""
    def decorator(cls):
        cls.kind = kind
        GATES[kind] = cls
        return register("gate", kind)(cls)
    return decorator


class Gate(nn.Module):
    """Base of the token routers: `forward(x_TM) -> RoutingResult`.

    Subclasses implement `select` (scores, choice, weights, aux loss); the base checks the input,
    then applies the capacity limit (token-choice gates) and the z-loss. The router runs in the
    dtype of its parameters."""

    kind: ClassVar[str] = ""
    token_choice: ClassVar[bool] = True
    default_normalize_topk: ClassVar[bool] = False

    def __init__(self, cfg: GateConfig, hidden: int, num_experts: int):
        super().__init__()
        if not isinstance(cfg, GateConfig):
            raise TypeError(f"cfg must be a GateConfig, got {type(cfg).__name__}")
        for name, value in (("hidden", hidden), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if cfg.kind != self.kind:
            raise ValueError(f"GateConfig.kind={cfg.kind!r} given to the {self.kind!r} gate "
                             f"{type(self).__name__}; use build_gate")
        if cfg.top_k > num_experts:
            raise ValueError(f"top_k={cfg.top_k} exceeds num_experts={num_experts}; "
                             f"allowed: 1..{num_experts}")
        self.cfg = cfg
        self.hidden = hidden
        self.num_experts = num_experts
        self.top_k = cfg.top_k
        self.normalize_topk = (self.default_normalize_topk if cfg.normalize_topk is None
                               else cfg.normalize_topk)

    def _new_weight(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.randn(*shape) * self.cfg.init_std)

    def select(self, x_TM: torch.Tensor) -> GateSelection:
        raise NotImplementedError

    def forward(self, x_TM: torch.Tensor) -> RoutingResult:
        if x_TM.dim() != 2 or x_TM.shape[1] != self.hidden:
            raise ValueError(f"x_TM must be [T, {self.hidden}] (hidden={self.hidden}), "
                             f"got shape {tuple(x_TM.shape)}")
        if not x_TM.dtype.is_floating_point:
            raise ValueError(f"x_TM must be floating point, got {x_TM.dtype}")
        seq_len = self.cfg.aux_loss_seq_len
        if seq_len is not None and x_TM.shape[0] % seq_len:
            raise ValueError(f"aux_loss_seq_len={seq_len} does not divide the number of tokens "
                             f"T={x_TM.shape[0]}")
        selection = self.select(x_TM.to(self._param_dtype()))
        routing_map_TE, probs_TE, num_dropped = selection.routing_map_TE, selection.probs_TE, 0
        if self.token_choice and self.cfg.capacity_factor is not None:
            capacity = expert_capacity(x_TM.shape[0], self.num_experts, self.top_k, self.cfg.capacity_factor)
            routing_map_TE, probs_TE, num_dropped = apply_capacity(routing_map_TE, probs_TE, capacity,
                                                                   self.cfg.drop_policy)
        z_loss = None
        if self.cfg.z_loss_coeff > 0:
            z_loss = router_z_loss(selection.logits_TE, self.cfg.z_loss_coeff)
        return RoutingResult(routing_map_TE, probs_TE, selection.aux_loss, z_loss, num_dropped)

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _aux_loss(self, scores_TE: torch.Tensor, selected_TE: torch.Tensor,
                  top_k: int) -> torch.Tensor | None:
        if self.cfg.aux_loss_coeff == 0:
            return None
        return load_balancing_loss(scores_TE, selected_TE, top_k, self.cfg.aux_loss_coeff,
                                   self.cfg.aux_loss_seq_len)

    def _topk_selection(self, scores_TE: torch.Tensor, logits_TE: torch.Tensor,
                        balance_scores_TE: torch.Tensor) -> GateSelection:
        """Top-k by `scores_TE`, weights = those scores (optionally / their sum); the
        load-balancing loss uses `balance_scores_TE` as the per-expert probabilities."""
        weights_TK, ids_TK = _topk_stable(scores_TE, self.top_k)
        if self.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        routing_map_TE, probs_TE = _dense_from_topk(ids_TK, weights_TK, self.num_experts)
        return GateSelection(routing_map_TE, probs_TE, logits_TE,
                             self._aux_loss(balance_scores_TE, routing_map_TE, self.top_k))


class _LinearRouterGate(Gate):
    """A gate whose logits are x W^T with W = `weight_EM` [E, M], no bias."""

    def __init__(self, cfg: GateConfig, hidden: int, num_experts: int):
        super().__init__(cfg, hidden, num_experts)
        self.weight_EM = self._new_weight(num_experts, hidden)

    def logits(self, x_TM: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TM, self.weight_EM)


@_gate("softmax_topk")
class SoftmaxTopKGate(_LinearRouterGate):
    """Softmax over all E experts, then top-k (Mixtral, Qwen-MoE, Megatron-core's default)."""

    def select(self, x_TM):
        logits_TE = self.logits(x_TM)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        return self._topk_selection(probs_TE, logits_TE, probs_TE)


@_gate("switch")
class SwitchGate(SoftmaxTopKGate):
    """Switch Transformer: softmax, top-1, weight = that probability (not renormalised). Its
    loss is alpha * E * sum_e f_e P_e with f_e the fraction of tokens sent to e (aux_loss_coeff
    = alpha, 0.01 in the paper)."""


@_gate("gshard")
class GShardNoisyTopKGate(_LinearRouterGate):
    """Noisy top-k gating (Shazeer et al. 2017, as written in GShard-style systems):
    H = x W_g^T + eps * softplus(x W_noise^T), eps ~ N(0, 1) in training mode only;
    weights = softmax over the k kept entries of H.

    eps is drawn as `torch.randn(T, E)` on the CPU from the gate's own generator seeded with
    `noise_seed` (torch's global RNG when None), so a seeded gate is reproducible on any device.
    W_noise starts at zero as in Shazeer et al. Load-balancing loss (GShard): E * sum_e f_e P_e
    with f_e the fraction of tokens whose top-1 (of H) is e and P_e the mean softmax(H)[:, e]
    over all E experts, times aux_loss_coeff."""

    def __init__(self, cfg: GateConfig, hidden: int, num_experts: int):
        super().__init__(cfg, hidden, num_experts)
        self.noise_weight_EM = nn.Parameter(torch.zeros(num_experts, hidden))
        self.generator = None if cfg.noise_seed is None else torch.Generator().manual_seed(cfg.noise_seed)

    def reseed(self, seed: int) -> None:
        """Restart the noise sequence from `seed`."""
        self.generator = torch.Generator().manual_seed(seed)

    def noisy_logits(self, x_TM: torch.Tensor, clean_logits_TE: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return clean_logits_TE
        eps_TE = torch.randn(clean_logits_TE.shape, generator=self.generator, dtype=clean_logits_TE.dtype)
        return clean_logits_TE + eps_TE.to(x_TM.device) * F.softplus(F.linear(x_TM, self.noise_weight_EM))

    def select(self, x_TM):
        logits_TE = self.logits(x_TM)
        noisy_TE = self.noisy_logits(x_TM, logits_TE)
        kept_logits_TK, ids_TK = _topk_stable(noisy_TE, self.top_k)
        routing_map_TE, probs_TE = _dense_from_topk(ids_TK, torch.softmax(kept_logits_TK, dim=-1),
                                                    self.num_experts)
        aux = None
        if self.cfg.aux_loss_coeff > 0:
            top1_TE = torch.zeros_like(routing_map_TE).scatter(1, ids_TK[:, :1], True)
            aux = self._aux_loss(torch.softmax(noisy_TE, dim=-1), top1_TE, 1)
        return GateSelection(routing_map_TE, probs_TE, logits_TE, aux)


@_gate("sigmoid")
class SigmoidGate(_LinearRouterGate):
    """Sigmoid gate (BASE layers / StableMoE as FSMoE writes it): scores = sigmoid(x W^T), top-k,
    the expert output scaled by its score (optionally normalised over the k). Its optional
    load-balancing loss uses the scores normalised over all experts as P_e."""

    def select(self, x_TM):
        logits_TE = self.logits(x_TM)
        scores_TE = torch.sigmoid(logits_TE)
        return self._topk_selection(scores_TE, logits_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True))


@_gate("deepseek_v3")
class DeepSeekV3Gate(_LinearRouterGate):
    """DeepSeek-V3 routing.

    scores = sigmoid(x W^T); selection uses scores + `e_score_correction_bias` (aux-loss-free
    balancing: the bias changes which experts are chosen, never their weights). Node-limited
    routing: the E experts form n_group contiguous groups, a group's score is the sum of its two
    largest biased scores (its only score when a group has one expert), the topk_group best
    groups stay and the top-k experts are chosen among theirs (experts of dropped groups are
    masked with -inf, so they can never be chosen). Weights = the selected unbiased scores
    (normalised to sum 1 when normalize_topk, the default for this kind) * routed_scaling_factor.
    With aux_loss_coeff > 0 the sequence-wise balance loss is added (`load_balancing_loss` with
    the scores normalised over all experts, sequences of aux_loss_seq_len tokens)."""

    default_normalize_topk = True

    def __init__(self, cfg: GateConfig, hidden: int, num_experts: int):
        super().__init__(cfg, hidden, num_experts)
        if num_experts % cfg.n_group:
            raise ValueError(f"n_group={cfg.n_group} does not divide num_experts={num_experts}")
        self.group_size = num_experts // cfg.n_group
        if cfg.top_k > cfg.topk_group * self.group_size:
            raise ValueError(f"top_k={cfg.top_k} exceeds the {cfg.topk_group * self.group_size} experts in "
                             f"topk_group={cfg.topk_group} groups of {self.group_size}")
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def select(self, x_TM):
        cfg = self.cfg
        logits_TE = self.logits(x_TM)
        scores_TE = torch.sigmoid(logits_TE)
        biased_TE = scores_TE.detach() + self.e_score_correction_bias.to(scores_TE.dtype)
        if cfg.n_group > 1:
            T = biased_TE.shape[0]
            grouped_TNg = biased_TE.reshape(T, cfg.n_group, self.group_size)
            group_score_TN = _topk_stable(grouped_TNg, min(2, self.group_size))[0].sum(dim=-1)
            kept_groups_TN = torch.zeros_like(group_score_TN, dtype=torch.bool).scatter(
                1, _topk_stable(group_score_TN, cfg.topk_group)[1], True)
            kept_TE = kept_groups_TN.repeat_interleave(self.group_size, dim=1)
            biased_TE = biased_TE.masked_fill(~kept_TE, -math.inf)
        ids_TK = _topk_stable(biased_TE, self.top_k)[1]
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * cfg.routed_scaling_factor
        routing_map_TE, probs_TE = _dense_from_topk(ids_TK, weights_TK, self.num_experts)
        aux = None
        if cfg.aux_loss_coeff > 0:
            aux = self._aux_loss(scores_TE / scores_TE.sum(dim=-1, keepdim=True), routing_map_TE, self.top_k)
        return GateSelection(routing_map_TE, probs_TE, logits_TE, aux)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's bias step after a training step: bias_e += rate * sign(mean load - load_e)
        (an overloaded expert's bias falls, an underloaded one's rises). Pass the load summed over
        the data-parallel group in distributed training. Returns the new bias."""
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert_E must have shape ({self.num_experts},), "
                             f"got {tuple(tokens_per_expert_E.shape)}")
        load_E = tokens_per_expert_E.to(self.e_score_correction_bias)
        self.e_score_correction_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        return self.e_score_correction_bias


@_gate("xmoe")
class XMoEGate(Gate):
    """X-MoE routing (Chi et al. 2022): h = W_proj x (dim low_rank_dim), score_e =
    cos(h, expert_embed_e) / tau with a learnable temperature tau (starts at init_temperature),
    softmax over E, top-k. Normalising both sides keeps the routing independent of the token
    and embedding norms, which is what X-MoE uses against representation collapse. tau is used
    as a plain parameter; the optimiser must keep it positive."""

    def __init__(self, cfg: GateConfig, hidden: int, num_experts: int):
        super().__init__(cfg, hidden, num_experts)
        self.proj_RM = self._new_weight(cfg.low_rank_dim, hidden)
        self.expert_embed_ER = self._new_weight(num_experts, cfg.low_rank_dim)
        self.temperature = nn.Parameter(torch.tensor(cfg.init_temperature))

    def logits(self, x_TM: torch.Tensor) -> torch.Tensor:
        h_TR = F.normalize(F.linear(x_TM, self.proj_RM), dim=-1)
        cosine_TE = F.linear(h_TR, F.normalize(self.expert_embed_ER, dim=-1))
        return cosine_TE / self.temperature

    def select(self, x_TM):
        logits_TE = self.logits(x_TM)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        return self._topk_selection(probs_TE, logits_TE, probs_TE)


@_gate("expert_choice")
class ExpertChoiceGate(_LinearRouterGate):
    """Expert choice (Zhou et al. 2022): scores = softmax over experts of x W^T; every expert
    takes its C highest-scoring tokens, C = `expert_choice_capacity` (capacity_factor None means
    1.0), equal scores going to the earlier token. A token gets 0..E experts, weighted by its
    scores; nothing is dropped (num_dropped 0) and the routing is balanced by construction, so
    there is no load-balancing loss."""

    token_choice = False

    def select(self, x_TM):
        logits_TE = self.logits(x_TM)
        scores_TE = torch.softmax(logits_TE, dim=-1)
        T = scores_TE.shape[0]
        capacity_factor = 1.0 if self.cfg.capacity_factor is None else self.cfg.capacity_factor
        capacity = expert_choice_capacity(T, self.num_experts, self.top_k, capacity_factor)
        token_ids_CE = _topk_stable(scores_TE, capacity, dim=0)[1]
        routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(0, token_ids_CE, True)
        return GateSelection(routing_map_TE, scores_TE * routing_map_TE, logits_TE, None)


def build_gate(cfg: GateConfig, hidden: int, num_experts: int) -> Gate:
    """The gate of kind `cfg.kind` for `hidden`-wide tokens and `num_experts` experts. Raises
    ValueError when the config does not fit E (top_k > E, n_group not dividing E, ...)."""
    if not isinstance(cfg, GateConfig):
        raise TypeError(f"cfg must be a GateConfig, got {type(cfg).__name__}")
    return GATES[cfg.kind](cfg, hidden, num_experts)


@torch.no_grad()
def init_gate_from_seed(gate: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter of a replicated gate from a private generator.

    torch's global RNG is shared by threads, so SimComm ranks (threads) seeding it and then
    building their gates can interleave and end up with different "replicated" weights; a
    private generator gives every rank bit-identical gates. Buffers (e.g. DeepSeek-V3's score
    bias) are left as built."""
    g = torch.Generator().manual_seed(int(seed))
    for _, p in sorted(gate.named_parameters()):
        fan_in = p.shape[-1] if p.dim() > 1 else 1
        p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in ** 0.5).to(p.dtype))
    return gate


# --------------------------------------------------------------------------------------------
# SoftMoE
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SoftMoEWeights:
    """Soft MoE mixing weights over S = E * slots_per_expert slots; slot s belongs to expert
    s // slots_per_expert.

    dispatch_TS: softmax over tokens for each slot (each column sums to 1): slot inputs are
                 convex combinations of all tokens.
    combine_TS:  softmax over slots for each token (each row sums to 1)."""

    dispatch_TS: torch.Tensor
    combine_TS: torch.Tensor
    slots_per_expert: int

    def slots_from_tokens(self, x_TM: torch.Tensor) -> torch.Tensor:
        """x_SM: the input of every slot."""
        return self.dispatch_TS.transpose(0, 1) @ x_TM

    def tokens_from_slots(self, y_SM: torch.Tensor) -> torch.Tensor:
        """y_TM: each token's output, mixed from all slot outputs."""
        return self.combine_TS @ y_SM


class SoftMoERouter(nn.Module):
    """SoftMoE (Puigcerver et al. 2023), one of FSMoE's gates. Not a discrete routing: every slot
    sees a weighted mix of every token, so there is no RoutingResult and token dispatchers
    cannot serve it; the experts run on `slots_from_tokens(x)` (slots_per_expert rows each) and
    `tokens_from_slots` mixes their outputs back. logits_TS = x phi with learnable slot
    parameters `slot_embed_SM`; the T tokens passed in are the group the softmax over tokens runs
    over (one sequence in the paper). The paper's optional l2-normalisation of x and phi is not
    included."""

    def __init__(self, hidden: int, num_experts: int, slots_per_expert: int = 1, init_std: float = 0.02):
        super().__init__()
        sizes = (("hidden", hidden), ("num_experts", num_experts), ("slots_per_expert", slots_per_expert))
        for name, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.hidden = hidden
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.slot_embed_SM = nn.Parameter(torch.randn(num_experts * slots_per_expert, hidden) * init_std)

    def forward(self, x_TM: torch.Tensor) -> SoftMoEWeights:
        if x_TM.dim() != 2 or x_TM.shape[1] != self.hidden or x_TM.shape[0] == 0:
            raise ValueError(f"x_TM must be [T >= 1, {self.hidden}] (hidden={self.hidden}), "
                             f"got shape {tuple(x_TM.shape)}")
        logits_TS = F.linear(x_TM.to(self.slot_embed_SM.dtype), self.slot_embed_SM)
        return SoftMoEWeights(torch.softmax(logits_TS, dim=0), torch.softmax(logits_TS, dim=1),
                              self.slots_per_expert)
