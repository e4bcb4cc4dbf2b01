"""The gate contract: `Gate` (input checks, then the shared capacity and z-loss step around a
subclass's `select`), `GateSelection` (what `select` returns), and the `GATES` table that the
`_gate` decorator fills and registers with the project registry.

The gate kinds themselves live in `gates`; this module holds only what every kind shares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from .capacity import apply_capacity, expert_capacity
from .config import GateConfig
from .losses import load_balancing_loss, router_z_loss
from .result import RoutingResult
from .topk import _dense_from_topk, _topk_stable


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

    def _softmax_topk_selection(self, logits_TE: torch.Tensor) -> GateSelection:
        """Softmax over all E experts, then top-k of those probabilities, which also serve as the
        load-balancing loss's per-expert probabilities (softmax_topk, switch, xmoe)."""
        probs_TE = torch.softmax(logits_TE, dim=-1)
        return self._topk_selection(probs_TE, logits_TE, probs_TE)


class _LinearRouterGate(Gate):
    """A gate whose logits are x W^T with W = `weight_EM` [E, M], no bias."""

    def __init__(self, cfg: GateConfig, hidden: int, num_experts: int):
        super().__init__(cfg, hidden, num_experts)
        self.weight_EM = self._new_weight(num_experts, hidden)

    def logits(self, x_TM: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TM, self.weight_EM)
