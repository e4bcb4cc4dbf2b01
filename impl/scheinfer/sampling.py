"""Choosing the next token from logits, and what a generation returns.

Greedy decoding is the arg-max (the parity tests against llama.cpp use it); sampling draws from
one seeded generator per sequence, so a prompt's tokens do not depend on its batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import config_error

__all__ = ["SamplingConfig", "sample_next", "GenerationOutput"]


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (arg-max; top_k / top_p ignored). Otherwise softmax(logits / T)
    restricted to the top_k tokens (0 = all) and to the smallest set whose probability reaches
    top_p; sequence b of a batch draws from torch.Generator seeded with seed + b."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise config_error("SamplingConfig", "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise config_error("SamplingConfig", "top_k", self.top_k, "an integer >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise config_error("SamplingConfig", "top_p", self.top_p, "a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig,
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Next token id per row of logits_BV (see SamplingConfig)."""
    if cfg.greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    if cfg.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(-1) - sorted_BV           # mass of the strictly better tokens
        drop_BV = before_BV >= cfg.top_p                        # the best token always stays
        probs_BV = probs_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, 0.0))
    if generators is None:
        generators = [torch.Generator().manual_seed(cfg.seed + b) for b in range(logits_BV.shape[0])]
    out = [torch.multinomial(probs_BV[b].cpu(), 1, generator=generators[b]) for b in range(logits_BV.shape[0])]
    return torch.cat(out).to(logits_BV.device)


@dataclass
class GenerationOutput:
    """tokens[b]: the new ids of prompt b (ending with eos if it was produced); step_logits[b]
    ([n_new, V], float32) the logits each new token was chosen from, when requested."""

    tokens: list[list[int]]
    step_logits: list[torch.Tensor] | None
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    decode_steps: int = 0

