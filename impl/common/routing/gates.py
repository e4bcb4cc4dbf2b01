"""The gate kinds (one class each, registered as ("gate", kind)), `build_gate`, which picks the
class for a `GateConfig`, and `init_gate_from_seed`, which gives replicated gates identical weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .capacity import expert_choice_capacity
from .config import GateConfig
from .gate_base import GATES, Gate, GateSelection, _gate, _LinearRouterGate
from .topk import _dense_from_topk, _topk_stable


@_gate("softmax_topk")
class SoftmaxTopKGate(_LinearRouterGate):
    """Softmax over all E experts, then top-k (Mixtral, Qwen-MoE, Megatron-core's default)."""

    def select(self, x_TM):
        return self._softmax_topk_selection(self.logits(x_TM))


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
        return self._softmax_topk_selection(self.logits(x_TM))


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
