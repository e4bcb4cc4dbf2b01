"""`RoutingTrace`: routed tokens tagged with (step, layer, rank), their top-K expert ids and weights.

The type checks its invariants on construction, so every trace, however built or read, is valid;
it slices, concatenates and converts to routing maps / `RoutingResult`s, and saves and loads
itself through the file formats in `formats`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..routing import RoutingResult, routing_from_topk
from .formats import _read_jsonl, _read_npz, _suffix, _write_jsonl, _write_npz
from .validation import TraceError, _as_int_tensor, _check_ids


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """T routed tokens, each tagged with (step, layer, rank), with its top-K expert ids / weights.

    step_T, layer_T, rank_T: int64 [T], >= 0.
    topk_ids_TK:     int64 [T, K]; ids in 0..num_experts-1, -1 for an empty slot (a token routed to
                     fewer than K experts: capacity drops, expert choice); distinct per token.
    topk_weights_TK: float32 [T, K] or None (Megatron traces carry no weights).
    num_experts:     E, the width of the routing maps built from the trace.
    source:          JSON-serialisable description of the origin (saved in the npz header).

    Inputs are converted to these dtypes (on CPU) and validated on construction, so every trace,
    however built or loaded, satisfies the invariants above.
    """

    step_T: torch.Tensor
    layer_T: torch.Tensor
    rank_T: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor | None
    num_experts: int
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise dtypes in place once, here
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, (int, np.integer)) \
                or self.num_experts < 1:
            raise TraceError(f"num_experts: {self.num_experts!r} is not allowed; expected an integer >= 1")
        set_(self, "num_experts", int(self.num_experts))
        ids = _as_int_tensor(self.topk_ids_TK, "topk_ids_TK")
        if ids.dim() != 2:
            raise TraceError(f"topk_ids_TK must be 2-D [T, K], got shape {tuple(ids.shape)}")
        T, K = ids.shape
        if K < 1:
            raise TraceError("topk_ids_TK has K=0 columns; expected K >= 1")
        set_(self, "topk_ids_TK", ids)
        for name in ("step_T", "layer_T", "rank_T"):
            v = _as_int_tensor(getattr(self, name), name)
            if v.shape != (T,):
                raise TraceError(f"{name} must have shape ({T},) to match topk_ids_TK {tuple(ids.shape)}, "
                                 f"got {tuple(v.shape)}")
            if T and int(v.min()) < 0:
                raise TraceError(f"{name} holds {int(v.min())}; expected values >= 0")
            set_(self, name, v)
        if self.topk_weights_TK is not None:
            w = torch.as_tensor(self.topk_weights_TK)
            if not w.dtype.is_floating_point:
                raise TraceError(f"topk_weights_TK must be floating point, got {w.dtype}")
            if w.shape != ids.shape:
                raise TraceError(f"topk_weights_TK must have the shape of topk_ids_TK {tuple(ids.shape)}, "
                                 f"got {tuple(w.shape)}")
            w = w.detach().to("cpu", torch.float32)
            if not bool(torch.isfinite(w).all()):
                raise TraceError("topk_weights_TK holds NaN or infinite values")
            set_(self, "topk_weights_TK", w)
        if not isinstance(self.source, dict):
            raise TraceError(f"source must be a dict, got {type(self.source).__name__}")
        _check_ids(ids, self.num_experts)

    # ---- shape ------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.topk_ids_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids_TK.shape[1]

    @property
    def has_weights(self) -> bool:
        return self.topk_weights_TK is not None

    def keys(self) -> list[tuple[int, int, int]]:
        """The distinct (step, layer, rank) groups, sorted."""
        if self.num_tokens == 0:
            return []
        triples = torch.stack([self.step_T, self.layer_T, self.rank_T], dim=1).unique(dim=0)
        return [tuple(int(x) for x in row) for row in triples]

    # ---- slicing and conversion -------------------------------------------------------------

    def select(self, step: int | Iterable[int] | None = None, layer: int | Iterable[int] | None = None,
               rank: int | Iterable[int] | None = None) -> "RoutingTrace":
        """The tokens whose step / layer / rank match (an int, several ints, or None = any), in
        their original order. An empty selection is a valid trace with T = 0."""
        keep_T = torch.ones(self.num_tokens, dtype=torch.bool)
        for name, want, values in (("step", step, self.step_T), ("layer", layer, self.layer_T),
                                   ("rank", rank, self.rank_T)):
            if want is None:
                continue
            wanted = [want] if isinstance(want, (int, np.integer)) else list(want)
            for w in wanted:
                if isinstance(w, bool) or not isinstance(w, (int, np.integer)):
                    raise TraceError(f"select({name}=...): {w!r} is not allowed; expected an int, "
                                     "a sequence of ints, or None")
            keep_T &= torch.isin(values, torch.tensor(wanted, dtype=torch.long))
        return self._take(keep_T)

    def _take(self, index) -> "RoutingTrace":
        weights = None if self.topk_weights_TK is None else self.topk_weights_TK[index]
        return RoutingTrace(self.step_T[index], self.layer_T[index], self.rank_T[index],
                            self.topk_ids_TK[index], weights, self.num_experts, dict(self.source))

    def to_routing_map(self, num_experts: int | None = None) -> torch.Tensor:
        """bool [T, E]: True where a token is routed to an expert (E = num_experts, default the
        trace's). A wider E is allowed (e.g. to add experts); a narrower one must still cover
        every id in the trace."""
        E = self.num_experts if num_experts is None else num_experts
        if isinstance(E, bool) or not isinstance(E, int) or E < 1:
            raise TraceError(f"num_experts: {E!r} is not allowed; expected an integer >= 1")
        ids = self.topk_ids_TK
        if ids.numel() and int(ids.max()) >= E:
            raise TraceError(f"num_experts={E} is too small: the trace routes to expert {int(ids.max())}; "
                             f"expected num_experts >= {int(ids.max()) + 1}")
        valid = ids >= 0
        map_TE = torch.zeros(self.num_tokens, E + 1, dtype=torch.bool)
        map_TE.scatter_(1, torch.where(valid, ids, E), valid)  # padding goes to column E, cut off
        return map_TE[:, :E]

    def to_routing_result(self) -> RoutingResult:
        """The trace as a `RoutingResult` (replay through a dispatcher). Needs weights."""
        if self.topk_weights_TK is None:
            raise TraceError("to_routing_result needs topk_weights_TK, but this trace has none "
                             "(Megatron JSONL traces carry only ids); use to_routing_map")
        return routing_from_topk(self.topk_ids_TK, self.topk_weights_TK, self.num_experts)

    def tokens_per_expert(self) -> torch.Tensor:
        """int64 [E]: assignments per expert over the whole trace."""
        ids = self.topk_ids_TK[self.topk_ids_TK >= 0]
        return torch.bincount(ids, minlength=self.num_experts)

    @classmethod
    def concat(cls, traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        """Tokens of all traces in order (e.g. one Megatron file per rank). K is padded to the
        widest with -1; E is the largest; weights are kept only if every trace has them."""
        traces = list(traces)
        if not traces:
            raise TraceError("concat needs at least one trace")
        K = max(t.top_k for t in traces)
        with_weights = all(t.has_weights for t in traces)
        ids = torch.cat([_pad_cols(t.topk_ids_TK, K, -1) for t in traces])
        weights = torch.cat([_pad_cols(t.topk_weights_TK, K, 0.0) for t in traces]) if with_weights else None
        sources = [t.source for t in traces]
        source = sources[0] if all(s == sources[0] for s in sources) else {"concat": sources}
        return cls(torch.cat([t.step_T for t in traces]), torch.cat([t.layer_T for t in traces]),
                   torch.cat([t.rank_T for t in traces]), ids, weights,
                   max(t.num_experts for t in traces), source)

    # ---- files ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write to `path`; the suffix picks the format (.npz or .jsonl, see the package doc)."""
        path = Path(path)
        suffix = _suffix(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            _write_npz(self, path)
        else:
            _write_jsonl(self, path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, num_experts: int | None = None,
             block: str = "decoder") -> "RoutingTrace":
        """Read a trace file (.npz or .jsonl by suffix), or a directory of Megatron per-rank files
        `router_trace_rank*.jsonl` (concatenated by rank). `num_experts` / `block` apply to JSONL
        only (see the package doc); the npz header fixes E."""
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("router_trace_rank*.jsonl"),
                           key=lambda p: int("".join(c for c in p.stem if c.isdigit()) or 0))
            if not files:
                raise TraceError(f"{path}: directory holds no router_trace_rank*.jsonl files")
            return cls.concat([cls._from_file(f, _read_jsonl(f, num_experts, block)) for f in files])
        suffix = _suffix(path)
        if not path.is_file():
            raise TraceError(f"trace file {str(path)!r} does not exist")
        if suffix == ".npz":
            if num_experts is not None:
                raise TraceError(f"{path}: num_experts= applies to JSONL traces only; an npz trace "
                                 "stores num_experts in its header")
            return cls._from_file(path, _read_npz(path))
        return cls._from_file(path, _read_jsonl(path, num_experts, block))

    @classmethod
    def _from_file(cls, path: Path, fields: dict) -> "RoutingTrace":
        """The trace from a reader's fields; a content error is prefixed with the file's path."""
        try:
            return cls(**fields)
        except TraceError as e:
            raise TraceError(f"{path}: {e}") from None


def _pad_cols(x: torch.Tensor, K: int, fill) -> torch.Tensor:
    if x.shape[1] == K:
        return x
    return torch.cat([x, x.new_full((x.shape[0], K - x.shape[1]), fill)], dim=1)
