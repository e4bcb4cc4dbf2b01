"""ScheInfer's three-lane executor: every FFN / expert runs as CC, CG and GG slices on a CPU lane,
a host->device copy lane and a GPU compute lane at the same time (scheinfer.md 2.3-2.4).

* `HybridEngine.run_layer(layer, items)` executes one layer's active FFNs under a `Policy`:
  the CPU lane computes every CC slice (torch's intra-op pool, `threads` threads); the copy lane
  copies every CG slice into one of two staging buffers (double buffering: the copy of FFN j+1
  overlaps the GPU compute of FFN j); the GPU lane computes every GG slice (resident copies) and
  then each CG slice once its copy has landed, and gives the buffer back. Outputs are summed in the
  fixed order CC + CG + GG, so results never depend on timing.
* With CUDA: the GPU lane issues on a compute stream, the copy lane on a copy stream from pinned
  host memory (non_blocking), with CUDA events between them; a lane synchronises its own stream
  before it stamps an end time. Without CUDA both GPU lanes run on CPU tensors (a real memcpy
  into the staging buffers and a real compute on it), so every code path runs and is tested on
  CPU; the timeline is then one of emulated lanes sharing the CPU.
* Every band records a `LaneEvent` (lane, layer, FFN, phase, start/end, rows, tokens): the
  timeline of diagram (a) in scheinfer.md 2.5.
* `HybridDecoder` is `model.Decoder` with the engine underneath: non-FFN weights on the engine's
  device, FFN / expert weights in (pinned) host memory with `down` stored as [F, M] rows so every
  slice is one contiguous block, a layer's routed experts handed to the engine together (the base
  decoder calls them one by one), and the phase (prefill / decode) known per forward call.
* Policies: 'scheinfer' (partition.py + assign.py), 'fiddler' (baselines/fiddler/policy.py),
  'layers' (llama.cpp's layer offload), 'fixed' (given CC/CG/GG fractions: ablations and tests).
  Concurrency is a property of the policy: Fiddler and llama.cpp run their parts one after another.

GPU memory (`gpu_mem_bytes`) counts FFN / expert weights and staging buffers only; attention,
embeddings, norms, routers and the KV cache are assumed resident besides it [R, digest 1.2].
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from impl.common.config import ConfigError

from .assign import ASSIGN_MODES, ExpertLoad, assign_layer
from .model import Decoder, ExpertWeights, MoEWeights, expert_weight_names, ffn, route
from .partition import GG_MODES, CostModel, Split, resident_rows

__all__ = ["POLICIES", "LaneEvent", "Policy", "ScheInferPolicy", "FixedPolicy", "LayersPolicy", "make_policy",
           "HybridEngine", "HybridDecoder", "ffn_widths"]

POLICIES = ("scheinfer", "fiddler", "layers", "fixed")
LANE_SWITCH_INTERVAL_S = 1e-4     # GIL switch interval while an engine is open (see __init__)
Key = tuple[int, Hashable]          # (layer, expert id | 'dense' | 'shared')


@dataclass(frozen=True)
class LaneEvent:
    lane: str            # 'cpu' | 'h2d' | 'gpu'
    band: str            # 'cc' | 'cg' | 'gg'
    layer: int
    expert: Hashable
    phase: str
    start: float         # perf_counter seconds
    end: float
    rows: int
    tokens: int


def ffn_widths(cfg) -> dict[Key, int]:
    """Every FFN of a DecoderConfig: (layer, expert) -> intermediate width F."""
    out: dict[Key, int] = {}
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            out.update({(i, e): cfg.moe_ffn_hidden for e in range(cfg.num_experts)})
            if cfg.shared_expert_ffn_hidden:
                out[(i, "shared")] = cfg.shared_expert_ffn_hidden
        else:
            out[(i, "dense")] = cfg.ffn_hidden
    return out


# ----------------------------------------------------------------------------------- policies

class Policy(ABC):
    """Where each FFN's rows live (resident GG rows, fixed at load) and how a layer's active FFNs
    are split at run time."""

    name: str = "?"
    concurrent: bool = True
    staging_buffers: int = 2         # host->device staging buffers the policy needs for CG

    @abstractmethod
    def resident(self, ffns: dict[Key, int], hidden: int, dtype_bytes: int, budget_bytes: int) -> dict[Key, int]:
        """GG rows per FFN (a suffix of F) within budget_bytes."""

    @abstractmethod
    def plan(self, layer: int, loads: Sequence[ExpertLoad], phase: str, layer_tokens: int,
             cg_max: int | None) -> list[Split]:
        """A Split per active FFN (loads carry token counts and resident rows)."""


class ScheInferPolicy(Policy):
    """partition.py's static GG + per (phase, expert) CC/CG optimiser, with assign.py's modes."""

    name = "scheinfer"

    def __init__(self, cost: CostModel, hidden: int, dtype_bytes: int, tile: int = 64, assign: str = "split",
                 gg_mode: str = "uniform", popularity: dict | None = None, exhaustive: bool = False):
        if assign not in ASSIGN_MODES:
            raise ConfigError(f"assign={assign!r} is not allowed; expected one of {', '.join(ASSIGN_MODES)}")
        if gg_mode not in GG_MODES:
            raise ConfigError(f"gg_mode={gg_mode!r} is not allowed; expected one of {', '.join(GG_MODES)}")
        if tile < 1:
            raise ConfigError(f"tile={tile!r} is not allowed; expected an integer >= 1")
        self.cost, self.hidden, self.dtype_bytes, self.tile = cost, hidden, dtype_bytes, tile
        self.assign, self.gg_mode, self.popularity, self.exhaustive = assign, gg_mode, popularity, exhaustive

    def resident(self, ffns, hidden, dtype_bytes, budget_bytes):
        return resident_rows(ffns, hidden, dtype_bytes, budget_bytes, self.tile, self.gg_mode, self.popularity)

    def plan(self, layer, loads, phase, layer_tokens, cg_max):
        return assign_layer(self.cost, loads, self.hidden, self.tile, self.dtype_bytes, self.assign, cg_max,
                            exhaustive=self.exhaustive)


class FixedPolicy(Policy):
    """Given CC / CG / GG fractions of every FFN (rounded to rows, the GG rows resident whatever
    the budget): forced partitions for exactness tests and ablations."""

    name = "fixed"

    def __init__(self, cc: float, cg: float, gg: float, concurrent: bool = True):
        if min(cc, cg, gg) < 0 or abs(cc + cg + gg - 1) > 1e-9:
            raise ConfigError(f"fixed fractions (cc, cg, gg)={(cc, cg, gg)!r}; expected numbers >= 0 summing to 1")
        self.frac, self.concurrent = (cc, cg, gg), concurrent

    def resident(self, ffns, hidden, dtype_bytes, budget_bytes):
        return {k: round(self.frac[2] * w) for k, w in ffns.items()}

    def plan(self, layer, loads, phase, layer_tokens, cg_max):
        out = []
        for ld in loads:
            cc = min(round(self.frac[0] * ld.width), ld.width - ld.gg)
            out.append(Split(cc, ld.width - ld.gg - cc, ld.gg))
        return out


class LayersPolicy(Policy):
    """llama.cpp's `-ngl N` (scheinfer.md 8.2): the FFNs of N whole layers resident, N the most
    that fit; the last N layers by default (llama.cpp's i_gpu_start = n_layer - N), `order='first'`
    for the first N. A CPU-resident layer is computed on the CPU when the layer's batch has fewer
    than `min_batch` tokens, else its weights are copied and computed on the GPU (ggml's CUDA
    offload rule, min_batch_size = 32). Parts run one after another (no overlap)."""

    name = "layers"
    concurrent = False
    staging_buffers = 1

    def __init__(self, num_layers: int, order: str = "last", min_batch: int = 32):
        if order not in ("last", "first"):
            raise ConfigError(f"layers order={order!r} is not allowed; expected 'last' or 'first'")
        self.num_layers, self.order, self.min_batch = num_layers, order, min_batch
        self.gpu_layers: set[int] = set()

    def resident(self, ffns, hidden, dtype_bytes, budget_bytes):
        per_layer = {i: 0 for i in range(self.num_layers)}
        for (i, _), w in ffns.items():
            per_layer[i] += w * 3 * hidden * dtype_bytes
        seq = range(self.num_layers - 1, -1, -1) if self.order == "last" else range(self.num_layers)
        left = budget_bytes
        for i in seq:
            if per_layer[i] > left:
                break
            self.gpu_layers.add(i)
            left -= per_layer[i]
        return {k: (w if k[0] in self.gpu_layers else 0) for k, w in ffns.items()}

    def plan(self, layer, loads, phase, layer_tokens, cg_max):
        out = []
        for ld in loads:
            r = ld.width - ld.gg
            to_gpu = layer_tokens >= self.min_batch and (cg_max is None or r <= cg_max)
            out.append(Split(0, r, ld.gg) if to_gpu else Split(r, 0, ld.gg))
        return out


def make_policy(name: str, *, cost: CostModel | None, hidden: int, num_layers: int, dtype_bytes: int,
                tile: int = 64, **options) -> Policy:
    """A policy by name; `options` go to its constructor (module doc)."""
    if name not in POLICIES:
        raise ConfigError(f"policy={name!r} is not allowed; expected one of {', '.join(POLICIES)}")
    if name in ("scheinfer", "fiddler") and cost is None:
        raise ConfigError(f"policy={name!r} needs a cost model (calibrate.py)")
    if name == "scheinfer":
        return ScheInferPolicy(cost, hidden, dtype_bytes, tile, **options)
    if name == "fiddler":
        from baselines.fiddler.policy import FiddlerPolicy
        return FiddlerPolicy(cost, hidden, dtype_bytes, **options)
    if name == "layers":
        return LayersPolicy(num_layers, **options)
    return FixedPolicy(**options)


# ----------------------------------------------------------------------------------- engine

_switch = {"open": 0, "saved": None}
_switch_lock = threading.Lock()


def _short_switch_interval(delta: int) -> None:
    """While any engine is open the GIL switch interval is LANE_SWITCH_INTERVAL_S; the first open
    engine saves the old one, the last to close restores it. Why: the lanes are Python threads whose
    work is many short GIL-free torch calls; with the default 5 ms interval one lane re-takes the
    GIL after each call while another waits for it (a convoy), which serialises the lanes."""
    with _switch_lock:
        if delta > 0 and _switch["open"] == 0:
            _switch["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch["saved"], LANE_SWITCH_INTERVAL_S))
        _switch["open"] += delta
        if delta < 0 and _switch["open"] == 0:
            sys.setswitchinterval(_switch["saved"])


def _start_lane_thread(threads: int) -> None:
    torch.set_num_threads(threads)
    x = torch.ones(4, 64)
    F.linear(x, x)


def _contiguous_rows(w: ExpertWeights, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up, down^T rows [a, b) (each [b-a, M]; contiguous when down is stored as [F, M])."""
    return w.gate_FM[a:b], w.up_FM[a:b], w.down_MF[:, a:b].t()


class HybridEngine:
    """Three lanes (module doc). `expert_fn` plugs into `model.Decoder` directly; `HybridDecoder`
    hands whole layers to `run_layer`."""

    def __init__(self, policy: Policy, hidden: int, dtype: torch.dtype = torch.float32,
                 gpu_mem_bytes: int = 0, device: str | torch.device | None = None, threads: int | None = None,
                 lane_hook: Callable[[str, str], None] | None = None):
        if gpu_mem_bytes < 0:
            raise ConfigError(f"gpu_mem_bytes={gpu_mem_bytes!r} is not allowed; expected an integer >= 0")
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads={threads!r} is not allowed; expected an integer >= 1")
            torch.set_num_threads(threads)
        self.policy, self.hidden, self.dtype = policy, hidden, dtype
        self.dtype_bytes = torch.empty((), dtype=dtype).element_size()
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.gpu_mem_bytes = gpu_mem_bytes
        self.lane_hook = lane_hook
        self.phase = "prefill"
        self.events: list[LaneEvent] = []
        self._lock = threading.Lock()
        self._gg: dict[Key, int] = {}
        self._resident: dict[Key, ExpertWeights] = {}
        self._widths: dict[Key, int] | None = None
        self.cg_max: int | None = 0
        self._slots: queue.Queue | None = None
        self._pools = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"scheinfer-{lane}")
                       for lane in ("cpu", "h2d", "gpu")}
        _short_switch_interval(+1)
        self._open = True
        # Start every lane's thread now, with one small product: a thread's first torch call pays
        # one-off set-up (milliseconds) that would otherwise land in the first layer's timeline.
        # torch's thread count is per thread (OpenMP), so each lane is given this thread's: left at
        # its default, every lane would run multi-threaded kernels on all cores at once.
        self.threads = torch.get_num_threads()
        for f in [pool.submit(_start_lane_thread, self.threads) for pool in self._pools.values()]:
            f.result()
        if self.cuda:
            self._compute_stream = torch.cuda.Stream(self.device)
            self._copy_stream = torch.cuda.Stream(self.device)

    # -------------------------------------------------------------- placement

    def place(self, widths: dict[Key, int]) -> dict[Key, int]:
        """Size staging buffers and resident rows for these FFNs (once, before running)."""
        row_bytes = 3 * self.hidden * self.dtype_bytes
        max_w = max(widths.values())
        staging = self.policy.staging_buffers * max_w * row_bytes
        budget = self.gpu_mem_bytes
        if budget >= staging:              # CG possible: staging buffers come first
            budget -= staging
            self.cg_max = max_w
            self._slots = queue.Queue()
            for _ in range(self.policy.staging_buffers):
                self._slots.put(tuple(torch.empty(max_w, self.hidden, dtype=self.dtype, device=self.device)
                                      for _ in range(3)))
        else:
            self.cg_max = 0
        self._widths = dict(widths)
        self._gg = self.policy.resident(self._widths, self.hidden, self.dtype_bytes, budget)
        return dict(self._gg)

    @property
    def resident_bytes(self) -> int:
        return sum(self._gg.values()) * 3 * self.hidden * self.dtype_bytes

    def _resident_slice(self, key: Key, w: ExpertWeights) -> ExpertWeights:
        r = self._resident.get(key)
        if r is None:
            width, g = w.ffn_hidden, self._gg.get(key, 0)
            gate, up, down_FM = (t.to(self.device, copy=True).contiguous() for t in _contiguous_rows(w, width - g, width))
            r = self._resident[key] = ExpertWeights(gate, up, down_FM.t())
        return r

    # -------------------------------------------------------------- running

    def expert_fn(self, layer: int, expert, w: ExpertWeights, x_TM: torch.Tensor) -> torch.Tensor:
        """`model.ExpertFn`: one FFN through the lanes (placement is made on first use)."""
        return self.run_layer(layer, [(expert, w, x_TM)], x_TM.shape[0])[0]

    def _stamp(self, lane, band, key, start, rows, tokens):
        with self._lock:
            self.events.append(LaneEvent(lane, band, key[0], key[1], self.phase, start, time.perf_counter(),
                                         rows, tokens))

    def run_layer(self, layer: int, items: Sequence[tuple[Hashable, ExpertWeights, torch.Tensor]],
                  layer_tokens: int) -> list[torch.Tensor]:
        """Outputs y_TM of the FFNs items = [(expert, weights, x_TM)] of one layer."""
        if self._widths is None:
            self.place({(layer, e): w.ffn_hidden for e, w, _ in items})
        for e, w, _ in items:
            if (layer, e) not in self._widths:          # FFNs met only at run time (expert_fn use)
                self._widths[(layer, e)] = w.ffn_hidden
                self._gg.update(self.policy.resident({(layer, e): w.ffn_hidden}, self.hidden, self.dtype_bytes, 0))
        loads = [ExpertLoad((layer, e), x.shape[0], w.ffn_hidden, self._gg.get((layer, e), 0)) for e, w, x in items]
        splits = self.policy.plan(layer, loads, self.phase, layer_tokens, self.cg_max)
        for ld, s in zip(loads, splits):
            if s.width != ld.width or s.gg != ld.gg or (s.cg and self.cg_max is not None and s.cg > self.cg_max):
                raise RuntimeError(f"policy {self.policy.name!r} planned {s} for {ld}; expected width "
                                   f"{ld.width}, gg {ld.gg}, cg <= {self.cg_max}")
        work = [((layer, e), w, x, s) for (e, w, x), s in zip(items, splits)]
        if self.cuda:       # GPU lanes start after the caller's stream has produced x
            self._main_stream = torch.cuda.current_stream(self.device)
            self._compute_stream.wait_stream(self._main_stream)
        parts = self._run_concurrent(work) if self.policy.concurrent else self._run_serial(work)
        out = []
        for (key, w, x, s), p in zip(work, parts):
            ys = [p[b] for b in ("cc", "cg", "gg") if b in p]
            y = ys[0] if ys else torch.zeros_like(x)
            for t in ys[1:]:
                y = y + t
            out.append(y)
        return out

    # lane bodies -------------------------------------------------------------

    def _hook(self, lane, band):
        if self.lane_hook is not None:
            self.lane_hook(lane, band)

    def _cpu_band(self, key, w, x_host, s) -> torch.Tensor:
        t0 = time.perf_counter()
        self._hook("cpu", "cc")
        y = ffn(w.slice(0, s.cc), x_host)
        self._stamp("cpu", "cc", key, t0, s.cc, x_host.shape[0])
        return y

    def _copy_band(self, key, w, s):
        slot = self._slots.get()
        t0 = time.perf_counter()
        self._hook("h2d", "cg")
        src = _contiguous_rows(w, s.cc, s.cc + s.cg)
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                for dst, t in zip(slot, src):
                    dst[:s.cg].copy_(t, non_blocking=True)
            self._copy_stream.synchronize()
        else:
            for dst, t in zip(slot, src):
                dst[:s.cg].copy_(t)
        self._stamp("h2d", "cg", key, t0, s.cg, 0)
        return slot

    def _gpu_band(self, band, key, w_dev: ExpertWeights, x_dev, rows) -> torch.Tensor:
        t0 = time.perf_counter()
        self._hook("gpu", band)
        if self.cuda:
            with torch.cuda.stream(self._compute_stream):
                y = ffn(w_dev, x_dev)
            self._compute_stream.synchronize()
            y.record_stream(self._main_stream)      # freed later on the caller's stream
        else:
            y = ffn(w_dev, x_dev)
        self._stamp("gpu", band, key, t0, rows, x_dev.shape[0])
        return y

    def _staged(self, slot, rows) -> ExpertWeights:
        gate, up, down_FM = slot
        return ExpertWeights(gate[:rows], up[:rows], down_FM[:rows].t())

    def _to_host(self, x):
        return x.to("cpu") if self.cuda else x

    def _to_dev(self, y):
        return y.to(self.device, non_blocking=False) if self.cuda else y

    def _run_concurrent(self, work):
        parts: list[dict[str, torch.Tensor]] = [{} for _ in work]
        copies: list[Future | None] = [Future() if s.cg else None for _, _, _, s in work]

        def cpu_lane():
            for j, (key, w, x, s) in enumerate(work):
                if s.cc:
                    parts[j]["cc"] = self._cpu_band(key, w, self._to_host(x), s)

        def copy_lane():
            for j, (key, w, x, s) in enumerate(work):
                if s.cg:
                    try:
                        copies[j].set_result(self._copy_band(key, w, s))
                    except BaseException as e:     # the GPU lane must not wait forever
                        for f in copies[j:]:
                            if f is not None and not f.done():
                                f.set_exception(e)
                        raise

        def gpu_lane():
            for j, (key, w, x, s) in enumerate(work):
                if s.gg:
                    parts[j]["gg"] = self._gpu_band("gg", key, self._resident_slice(key, w), x, s.gg)
            for j, (key, w, x, s) in enumerate(work):
                if s.cg:
                    slot = copies[j].result()
                    try:
                        parts[j]["cg"] = self._gpu_band("cg", key, self._staged(slot, s.cg), x, s.cg)
                    finally:
                        self._slots.put(slot)

        futs = [self._pools["gpu"].submit(gpu_lane), self._pools["h2d"].submit(copy_lane),
                self._pools["cpu"].submit(cpu_lane)]
        for f in futs:
            f.result()
        for p in parts:
            if "cc" in p:
                p["cc"] = self._to_dev(p["cc"])
        return parts

    def _run_serial(self, work):
        """GPU parts first, then CPU parts, one at a time (Fiddler's and llama.cpp's order)."""
        parts: list[dict[str, torch.Tensor]] = [{} for _ in work]
        for j, (key, w, x, s) in enumerate(work):
            if s.gg:
                parts[j]["gg"] = self._gpu_band("gg", key, self._resident_slice(key, w), x, s.gg)
            if s.cg:
                slot = self._copy_band(key, w, s)
                try:
                    parts[j]["cg"] = self._gpu_band("cg", key, self._staged(slot, s.cg), x, s.cg)
                finally:
                    self._slots.put(slot)
        for j, (key, w, x, s) in enumerate(work):
            if s.cc:
                parts[j]["cc"] = self._to_dev(self._cpu_band(key, w, self._to_host(x), s))
        return parts

    def close(self):
        for p in self._pools.values():
            p.shutdown(wait=True)
        if self._open:
            self._open = False
            _short_switch_interval(-1)


# ----------------------------------------------------------------------------------- decoder

class HybridDecoder(Decoder):
    """`model.Decoder` running its FFNs through a `HybridEngine` (module doc). `on_forward(S)` is
    called after every forward call with its number of new positions (progress displays)."""

    def __init__(self, source, engine: HybridEngine, *, on_forward: Callable[[int], None] | None = None,
                 pin_memory: bool | None = None):
        self.engine = engine
        self._pin = engine.cuda if pin_memory is None else pin_memory
        self.on_forward = on_forward
        super().__init__(source, dtype=engine.dtype, device=engine.device, cache_weights=True,
                         expert_fn=engine.expert_fn)
        if self.config.hidden != engine.hidden:
            raise ConfigError(f"engine hidden={engine.hidden} but the model's hidden={self.config.hidden}")
        engine.place(ffn_widths(self.config))
        for i in range(self.config.num_layers):             # resident slices up front
            lw = self.layer_weights(i)
            ffns = {"dense": lw.dense} if lw.dense is not None else {
                **dict(enumerate(lw.moe.experts)), **({"shared": lw.moe.shared} if lw.moe.shared else {})}
            for e, w in ffns.items():
                engine._resident_slice((i, e), w)

    def _expert(self, prefix: str) -> ExpertWeights:
        # FFN weights stay in host memory (pinned with CUDA); down kept as [F, M] rows.
        names = expert_weight_names(prefix)
        host = lambda n: self.source.load(n).to(dtype=self.dtype, copy=True)  # noqa: E731
        gate, up = host(names["gate"]), host(names["up"])
        down_FM = host(names["down"]).t().contiguous()
        if self._pin:
            gate, up, down_FM = gate.pin_memory(), up.pin_memory(), down_FM.pin_memory()
        return ExpertWeights(gate, up, down_FM.t())

    def moe(self, i: int, w: MoEWeights, x_TM: torch.Tensor) -> torch.Tensor:
        ids_TK, weights_TK = route(self.config, F.linear(x_TM, w.router_EM))
        if self.route_observer is not None:
            self.route_observer(i, ids_TK, weights_TK)
        experts = ids_TK.unique().tolist()
        sel = [(ids_TK == e).nonzero(as_tuple=True) for e in experts]
        items = [(e, w.experts[e], x_TM[tok_T]) for e, (tok_T, _) in zip(experts, sel)]
        if w.shared is not None:
            items.append(("shared", w.shared, x_TM))
        ys = self.engine.run_layer(i, items, x_TM.shape[0])
        y_TM = torch.zeros_like(x_TM)
        for (tok_T, slot_T), y_e in zip(sel, ys):
            y_TM.index_add_(0, tok_T, y_e * weights_TK[tok_T, slot_T, None].to(y_e.dtype))
        if w.shared is not None:
            s_TM = ys[-1]
            if w.shared_gate_1M is not None:
                s_TM = torch.sigmoid(F.linear(x_TM, w.shared_gate_1M)) * s_TM
            y_TM = y_TM + s_TM
        return y_TM

    @torch.no_grad()
    def forward(self, tokens_BS, cache, valid_BS=None, last_only=False):
        S = torch.as_tensor(tokens_BS).shape[1]
        self.engine.phase = "prefill" if S > 1 or cache.length == 0 else "decode"
        out = super().forward(tokens_BS, cache, valid_BS, last_only)
        if self.on_forward is not None:
            self.on_forward(S)
        return out
