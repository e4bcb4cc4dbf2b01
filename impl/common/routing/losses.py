"""Router losses: the load-balancing loss (Switch / GShard / Megatron-core / DeepSeek-V3 forms) and
ST-MoE's router z-loss, as plain functions of scores and logits so any gate can add them.
"""
from __future__ import annotations

import torch


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
