"""`TraceError`, and the input checks every trace module shares.

One home for the checks keeps their messages uniform: each names the argument, array or key that
is wrong and what is allowed.
"""
from __future__ import annotations

import numpy as np
import torch


class TraceError(ValueError):
    """A trace file or trace content that is not valid. The message names the array / key / record
    and what is allowed."""


def _int_arg(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: {value!r} is not allowed; expected an integer >= {low}")
    return int(value)


def _as_int_tensor(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TraceError(f"{name} must be an integer array, got dtype {t.dtype}")
    return t.detach().to("cpu", torch.long)


def _check_ids(ids: torch.Tensor, num_experts: int) -> None:
    """Ids in -1..E-1 and distinct per token (a repeated expert would double-count a token)."""
    if not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < -1 or high >= num_experts:
        bad = low if low < -1 else high
        t = int(((ids == bad).any(dim=1)).nonzero()[0])
        raise TraceError(f"topk_ids_TK: expert id {bad} (token {t}) is out of range; allowed: "
                         f"0..{num_experts - 1} (num_experts={num_experts}), or -1 for an empty slot")
    s = ids.sort(dim=1).values
    repeated = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if repeated.any():
        t = int(repeated.any(dim=1).nonzero()[0])
        raise TraceError(f"topk_ids_TK: token {t} lists an expert more than once: {ids[t].tolist()}")
