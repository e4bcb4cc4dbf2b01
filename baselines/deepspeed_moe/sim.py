"""DeepSpeed-MoE's semantics on our substrate (sim / emu tiers): its gates and its exchange.

Checked against the real `deepspeed.moe` (0.19.8) by tests/dist/test_deepspeed_real.py
(outputs, l_aux and every gradient) and against its gating functions by
tests/unit/test_deepspeed_sim.py.

Gate (`DeepSpeedGate`, registered as gates 'deepspeed_top1' / 'deepspeed_top2'): DeepSpeed's
`TopKGate` with noise and random token selection off (noisy_gate_policy=None, use_rts=False,
top2_2nd_expert_sampling=False), which is what makes it deterministic. Our gates (impl.common.routing) do
not match it, so it lives here:
* computed in fp32 whatever the model dtype: logits = x.float() @ wg.float()^T, softmax;
* top-1: argmax; top-2: argmax, then argmax of the logits with the first masked out;
* capacity (`deepspeed_capacity`) = max(ceil(T/E * cf * k) in fp32 arithmetic, min_capacity)
  (k = 1 or 2); routing.expert_capacity has no min_capacity and rounds in fp64;
* drops: top-1 keeps, per expert, the rows `torch.topk` picks from the 0/1 mask: its tie order,
  neither 'position' nor 'probs' (we make the same call, so CPU results are bit-identical; on
  another device the tie order may differ). top-2 keeps first choices by position, then second
  choices by position after all of the expert's first choices (pre-drop count);
* weights: top-1 = the softmax prob; top-2 = the two probs renormalised to sum to 1 *after*
  the drops (a token whose second choice is dropped gets weight 1 on its first);
  routing.apply_capacity never renormalises;
* l_aux = E * sum_e mean_t(softmax)_e * fraction of first choices on e (pre-drop);
* DeepSpeed asserts T >= min_capacity, also when not dropping; so do we.
Not reproduced: noise (Jitter / RSample / 2nd-expert Gumbel sampling), RTS, eval_capacity_factor
(DeepSpeed switches to it in eval mode; here capacity_factor applies in both), used_token
masks, top-k > 2, expert tensor parallelism.

Exchange (`DeepSpeedDispatcher`, registered as dispatcher 'deepspeed-moe'): a [E, C, M] buffer
per rank, one flat all_to_all_single of equal slices (E/G * C rows per peer, padding
included), experts on [G source][C] rows each, the reverse all-to-all, gate weights applied on
the home rank. C = the gate's capacity when dropping, else the largest per-expert count of any
rank (all_reduce max, DeepSpeed's drop_tokens=False). DeepSpeed also caps the top-1 dropless C
at the local T, a no-op with equal T per rank. The expert-parallel group is the whole comm
(DeepSpeed's ep_size = G); for ep_size < G run one comm per expert-parallel group. Inside an
expert's slice rows are in token order (DeepSpeed's top-2 puts first choices first): neither
the result nor the bytes depend on it. With one of our gates that drops, note that DeepSpeed's
fp32 capacity can be one below routing.expert_capacity (T=45, E=3, k=2, cf=1.1: 33 vs 34); the
dispatcher then raises instead of dropping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from baselines.tutel_2dh.dispatcher import CapacityPaddedDispatcher
from impl.common.comm import Comm
from impl.common.moe_layer import ExpertParallelMoE
from impl.common.registry import register
from impl.common.routing import RoutingResult, init_gate_from_seed

__all__ = ["DeepSpeedMoEConfig", "deepspeed_capacity", "DeepSpeedGate", "DeepSpeedDispatcher",
           "deepspeed_sim_layer"]


@dataclass(frozen=True)
class DeepSpeedMoEConfig:
    """The routing arguments of `deepspeed.moe.layer.MoE` that the sim reproduces (same names)."""

    top_k: int = 1
    capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True

    def __post_init__(self):
        checks = (
            ("top_k", self.top_k in (1, 2) and not isinstance(self.top_k, bool), "1 or 2"),
            ("capacity_factor", isinstance(self.capacity_factor, (int, float)) and not isinstance(
                self.capacity_factor, bool) and math.isfinite(self.capacity_factor) and self.capacity_factor > 0,
             "a finite number > 0"),
            ("min_capacity", isinstance(self.min_capacity, int) and not isinstance(self.min_capacity, bool)
             and self.min_capacity >= 0, "an integer >= 0"),
            ("drop_tokens", isinstance(self.drop_tokens, bool), "True or False"),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"DeepSpeedMoEConfig.{key}: {getattr(self, key)!r} is not allowed; "
                                 f"expected {allowed}")


def deepspeed_capacity(num_tokens: int, num_experts: int, cfg: DeepSpeedMoEConfig) -> int:
    """max(ceil(T/E * cf * k), min_capacity), the product rounded in fp32 as DeepSpeed's
    `_capacity` does (T/E a Python float times a float32 tensor)."""
    factor = torch.tensor(cfg.capacity_factor * cfg.top_k)      # float32, like torch.tensor(cf * 2)
    return max(int(torch.ceil((num_tokens / num_experts) * factor)), cfg.min_capacity)


class DeepSpeedGate(nn.Module):
    """DeepSpeed's TopKGate (k = 1 or 2) without noise or RTS; returns a RoutingResult whose
    aux_loss is DeepSpeed's l_aux (unscaled) and whose probs are fp32, as DeepSpeed's."""

    def __init__(self, hidden: int, num_experts: int, cfg: DeepSpeedMoEConfig | None = None):
        super().__init__()
        cfg = cfg or DeepSpeedMoEConfig()
        if cfg.top_k > num_experts:
            raise ValueError(f"DeepSpeedMoEConfig.top_k: {cfg.top_k} exceeds num_experts={num_experts}")
        self.cfg, self.hidden, self.num_experts = cfg, hidden, num_experts
        self.wg = nn.Linear(hidden, num_experts, bias=False)      # DeepSpeed's name: gate.wg.weight [E, M]

    def forward(self, x_TM: torch.Tensor) -> RoutingResult:
        if x_TM.dim() != 2 or x_TM.shape[1] != self.hidden:
            raise ValueError(f"x_TM must be [T, {self.hidden}], got shape {tuple(x_TM.shape)}")
        T, E, cfg = x_TM.shape[0], self.num_experts, self.cfg
        if T < cfg.min_capacity:
            raise ValueError(f"DeepSpeed gate: T={T} tokens per rank is below min_capacity={cfg.min_capacity}; "
                             "allowed: T >= min_capacity (set min_capacity lower)")
        logits_TE = F.linear(x_TM.float(), self.wg.weight.float())
        gates_TE = F.softmax(logits_TE, dim=1)
        first_TE = F.one_hot(torch.argmax(gates_TE, dim=1), num_classes=E)          # int64 one-hot
        me_ce_E = gates_TE.mean(dim=0) * first_TE.float().mean(dim=0)
        # the same value for k = 1 and 2, written as DeepSpeed writes each (fp32 rounding)
        l_aux = torch.sum(me_ce_E) * E if cfg.top_k == 1 else torch.mean(me_ce_E) * E * E
        capacity = deepspeed_capacity(T, E, cfg)
        if cfg.top_k == 1:
            kept_TE = first_TE
            if cfg.drop_tokens:
                survivors = torch.topk(first_TE, k=min(capacity, T), dim=0)[1]
                kept_TE = first_TE * torch.zeros_like(first_TE).scatter_(0, survivors, 1)
            probs_TE = gates_TE * kept_TE
            routing_map_TE = kept_TE.bool()
        else:
            second_TE = F.one_hot(torch.argmax(logits_TE.masked_fill(first_TE.bool(), float("-inf")), dim=1),
                                  num_classes=E)
            first_kept, second_kept = first_TE, second_TE
            if cfg.drop_tokens:
                position1_TE = torch.cumsum(first_TE, dim=0) - 1
                position2_TE = torch.cumsum(second_TE, dim=0) - 1 + first_TE.sum(dim=0, keepdim=True)
                first_kept = first_TE * (position1_TE < capacity)
                second_kept = second_TE * (position2_TE < capacity)
            w1_T = (gates_TE * first_kept).sum(dim=1)
            w2_T = (gates_TE * second_kept).sum(dim=1)
            denom_T = torch.clamp(w1_T + w2_T, min=torch.finfo(w1_T.dtype).eps)
            probs_TE = (w1_T / denom_T).unsqueeze(1) * first_kept + (w2_T / denom_T).unsqueeze(1) * second_kept
            routing_map_TE = (first_kept + second_kept).bool()
        num_dropped = int(T * cfg.top_k - routing_map_TE.sum())
        return RoutingResult(routing_map_TE, probs_TE, aux_loss=l_aux, num_dropped=num_dropped)


@register("dispatcher", "deepspeed-moe")
class DeepSpeedDispatcher(CapacityPaddedDispatcher):
    """DeepSpeed-MoE's exchange: capacity-padded equal slices, one flat AlltoAll each way.

    Keyword arguments are DeepSpeed's (`DeepSpeedMoEConfig`); give the same ones as the gate.
    The default drop_tokens=False (dynamic C) works with any gate; DeepSpeed's own default is
    True."""

    hierarchical = False

    def __init__(self, comm: Comm, num_experts: int, *, top_k: int = 1, capacity_factor: float = 1.0,
                 min_capacity: int = 4, drop_tokens: bool = False):
        super().__init__(comm, num_experts)
        self.cfg = DeepSpeedMoEConfig(top_k, capacity_factor, min_capacity, drop_tokens)

    @property
    def name(self) -> str:
        return "deepspeed-moe"

    def capacity_rule(self, num_tokens):
        if self.cfg.drop_tokens:
            return deepspeed_capacity(num_tokens, self.num_experts, self.cfg), False
        return None, True


def _gate_factory(top_k: int):
    def factory(hidden: int, num_experts: int, **kwargs) -> DeepSpeedGate:
        return DeepSpeedGate(hidden, num_experts, DeepSpeedMoEConfig(top_k=top_k, **kwargs))
    factory.__qualname__ = f"deepspeed_top{top_k}"
    return factory


register("gate", "deepspeed_top1")(_gate_factory(1))
register("gate", "deepspeed_top2")(_gate_factory(2))


def deepspeed_sim_layer(comm: Comm, cfg: DeepSpeedMoEConfig, hidden: int, experts: nn.Module,
                        gate: DeepSpeedGate | None = None, gate_seed: int = 0) -> ExpertParallelMoE:
    """DeepSpeed-MoE on our substrate: its gate and exchange, `experts` this rank's local experts
    (slot order, e.g. GroupedExperts of `dispatcher.local_experts()`); E = experts * G. Without a
    `gate`, a replicated one is initialised from `gate_seed` (same weights on every rank)."""
    num_experts = experts.num_local_experts * comm.world_size
    gate = gate or init_gate_from_seed(DeepSpeedGate(hidden, num_experts, cfg), gate_seed)
    dispatcher = DeepSpeedDispatcher(comm, num_experts, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor,
                                     min_capacity=cfg.min_capacity, drop_tokens=cfg.drop_tokens)
    return ExpertParallelMoE(gate, experts, dispatcher)
