"""`TraceRecorder`: a RoutingTrace captured from a running model through forward hooks on its gates.

The third source of traces, next to files and the synthetic generators: routing exactly as a real
model produced it, recorded without changing the model's code.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..routing import RoutingResult, topk_ids_from_routing
from .trace import RoutingTrace, _pad_cols
from .validation import TraceError, _int_arg


class TraceRecorder:
    """Records every gate's routing while a model runs: forward hooks on all submodules; a module
    whose forward returns a `RoutingResult` is a gate, the others drop their hook after their
    first call (so the per-call cost stays on the gates).

    layer: the gate's number in order of first call (forward order = depth for a stack of
           layers); pass `layers={module_name: layer}` to fix it instead. Gates not named there
           raise, so nothing is recorded under a guessed number.
    step:  `next_step()` advances it (call once per iteration, like Megatron's advance_step), or
           auto_step=True starts a new step when a gate fires twice (Megatron's inference rule).
    rank:  given, else torch.distributed's rank when initialised, else 0.

    A wrapper module that returns its inner gate's RoutingResult object is recorded once (as the
    inner gate). Activation recomputation reruns gates: pause() / resume() around it, or the
    recomputed forward is recorded again.
    """

    def __init__(self, model: nn.Module, *, rank: int | None = None,
                 layers: dict[str, int] | None = None, auto_step: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = _int_arg("rank", rank, 0)
        self.step = 0
        self.auto_step = auto_step
        self.recording = True
        self._fixed_layers = dict(layers) if layers is not None else None
        if self._fixed_layers is not None:
            names = {n for n, _ in model.named_modules()}
            for name, layer in self._fixed_layers.items():
                if name not in names:
                    raise ValueError(f"layers: module {name!r} is not in the model")
                _int_arg(f"layers[{name!r}]", layer, 0)
        self._layers: dict[str, int] = dict(self._fixed_layers or {})
        self._seen_this_step: set[int] = set()
        self._records: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self._num_experts: int | None = None
        self._last_result = None
        self._handles = {name: module.register_forward_hook(self._make_hook(name))
                         for name, module in model.named_modules()}

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, RoutingResult):
                if name not in self._layers:  # not a gate: stop paying for its hook
                    handle = self._handles.pop(name, None)
                    if handle is not None:
                        handle.remove()
                return
            if self.recording and output is not self._last_result:
                self._record(name, module, output)
        return hook

    def _record(self, name: str, module: nn.Module, result: RoutingResult) -> None:
        if name not in self._layers:
            if self._fixed_layers is not None:
                raise ValueError(f"gate {name!r} is not in layers=; give it a layer number "
                                 f"(named: {', '.join(sorted(self._fixed_layers))})")
            self._layers[name] = len(self._layers)
        layer = self._layers[name]
        if self._num_experts is None:
            self._num_experts = result.num_experts
        elif result.num_experts != self._num_experts:
            raise ValueError(f"gate {name!r} routes over {result.num_experts} experts, earlier gates "
                             f"over {self._num_experts}; a trace has one num_experts")
        if self.auto_step:
            if layer in self._seen_this_step:
                self.next_step()
            self._seen_this_step.add(layer)
        k = getattr(module, "top_k", None)
        counts_T = result.routing_map_TE.sum(dim=1)
        widest = int(counts_T.max()) if counts_T.numel() else 1
        k = max(widest, k if isinstance(k, int) and k >= 1 else 1)
        with torch.no_grad():
            ids, weights = topk_ids_from_routing(result, k)
        self._records.append((self.step, layer, ids.cpu(), weights.detach().float().cpu()))
        self._last_result = result

    def next_step(self) -> None:
        self.step += 1
        self._seen_this_step.clear()

    def pause(self) -> None:
        self.recording = False

    def resume(self) -> None:
        self.recording = True

    @property
    def layer_names(self) -> dict[int, str]:
        return {layer: name for name, layer in self._layers.items()}

    def trace(self) -> RoutingTrace:
        """Everything recorded so far, in call order."""
        if not self._records:
            raise TraceError("nothing recorded: no module returned a RoutingResult while recording")
        K = max(ids.shape[1] for _, _, ids, _ in self._records)
        steps, layers = [], []
        for step, layer, ids, _ in self._records:
            steps.append(torch.full((ids.shape[0],), step, dtype=torch.long))
            layers.append(torch.full((ids.shape[0],), layer, dtype=torch.long))
        step_T = torch.cat(steps)
        source = {"kind": "recorder", "rank": self.rank,
                  "layers": {str(k): v for k, v in sorted(self.layer_names.items())}}
        return RoutingTrace(step_T, torch.cat(layers), torch.full_like(step_T, self.rank),
                            torch.cat([_pad_cols(r[2], K, -1) for r in self._records]),
                            torch.cat([_pad_cols(r[3], K, 0.0) for r in self._records]),
                            self._num_experts, source)

    def save(self, path: str | Path) -> Path:
        return self.trace().save(path)

    def clear(self) -> None:
        """Drop the records (keeps the hooks, the layer numbers and the step)."""
        self._records.clear()
        self._last_result = None

    def remove(self) -> None:
        """Detach all hooks; the records stay readable."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
