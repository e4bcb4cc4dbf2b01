"""The decoder with the paths that exist for speed on the CPU: `FastDecoder` is `decoder.Decoder`
(same model, same router) with products that stream the weights at the memory bandwidth, fewer
and larger products, and, opt-in, each decoded token as one torch.compile'd region. It is tested
equal to the reference decoder (tokens equal, logits within rounding) on every architecture and
with every CPU kernel.

Why: decoding one token is memory bound, and at small widths bound by per-operation overhead;
the reference decoder's one-BLAS-call-per-matrix code streams each weight on one core and pays
Python and dispatch costs per operation. What this module changes, all the same math in another
summation order:
* The CPU kernel (`choose_kernel`, recorded as `FastDecoder.kernel`): float32 products of a few
  tokens run as the native kernels of cpu_kernels.py (a product, a whole FFN, a decoded token's
  routed experts in one op), or as torch's: `split_linear` (one batched call over one weight
  block per core) and `paired_ffn` (a decoded token's routed experts two at a time). Which is
  faster depends on the host (vector width, BLAS) and the model's widths: 'auto' measures it at
  start-up, on the decoder's own decode steps. An eager decode step on native kernels runs
  torch's own operations on one thread (`cpu_kernels.torch_ops_on_one_thread`).
* Joined weights: q, k, v as one [(H + 2G) * D, M] array and each FFN's gate and up as one
  [2F, M] array, so each is one product; a layer's experts stacked as gate/up [E, 2F, M] and down
  [E, M, F].
* RMSNorm as torch's fused kernel, RoPE from a cached table with the rotation's sign folded into
  sin, no attention mask for a single unpadded new token (SDPA's causal flag for a prompt on an
  empty cache), inference mode while generating.
* A prompt's MoE layer (`_moe_tokens`): the routed (token, expert) pairs sorted by expert once
  (`ExpertGroups`), so that each expert's tokens are one contiguous block gathered in one
  operation, every FFN of the layer goes to one `run_ffns` call (with a native kernel one op),
  and the outputs return to their tokens with one more gather, added in the reference's order.
* `compile_decode=True`: a decoded token of a single sequence is one compiled region through
  every layer and the LM head (`_token_step`): Inductor fuses the small operations and calls the
  native kernels, its own loops then on one thread (`_compiled_region`), or, with torch's kernel,
  generates multiply-reduce loops that stream each weight once; for a batch without padding the
  attention block is the compiled region. 'auto' times such a decoder's compiled steps. The first
  decode steps of each new weight shape compile (seconds); prefill and padded batches stay
  eager. CPU only, plain expert function.
Measured speeds: tests/bench/test_bench_scheinfer_cpu.py, its latest tables in tests/bench/README.md.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from impl.common.config import ConfigError

from . import cpu_kernels
from .config import DecoderConfig, decode_weight_bytes
from .decoder import Decoder, ExpertFn
from .layers import (AttentionWeights, ExpertWeights, KVCache, LayerWeights, MoEWeights, Norm, append_to_cache,
                     gate_shared, rope_cos_sin, route)

__all__ = ["KERNELS", "KERNEL_ENV", "DECODE_MODES", "KernelChoice", "ProbeShape", "OwnSteps", "choose_kernel",
           "named_kernel", "split_linear", "product", "fast_ffn", "fast_ffns", "paired_ffn", "ExpertGroups",
           "JoinedExpertWeights", "JoinedAttentionWeights", "StackedMoEWeights", "FusedRMSNorm", "FastDecoder"]

# Few-token products x_TK @ w_NK^T are memory bound, and one BLAS call streams the weight on one
# core. So the weight is cut into one block per core and one batched call runs the blocks on all
# cores: along the output dimension N when w is stored row-major ([N, K] rows, the natural
# layout), else along the reduction dimension K when w^T is ([K, N] rows: the engine's down
# slices, see `engine.HybridDecoder._expert`), the partial products then summed. Row blocks are
# multiplied as x @ w^T (a row vector times the transposed block), the kernel that streams a
# block fastest. Small weights (cache-resident, a few microseconds of work) are not split: the
# extra calls cost more than they save.
_SPLIT_MAX_TOKENS = 32
_SPLIT_MIN_WIDTH = 256
_SPLIT_MIN_BYTES = 1 << 20


def split_linear(x: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w_NK, b_N) for x of shape [..., K], split across cores for few tokens; for one
    token under torch.compile a multiply-reduce, which Inductor fuses into one streaming loop."""
    K = x.shape[-1]
    T = x.numel() // K if K else 0
    if torch.compiler.is_compiling():
        if T != 1:
            return F.linear(x, w_NK, b_N)
        y = (x.unsqueeze(-2) * w_NK).sum(-1)
        return y if b_N is None else y + b_N
    n = torch.get_num_threads()
    if (n == 1 or not 0 < T <= _SPLIT_MAX_TOKENS or w_NK.numel() * w_NK.element_size() < _SPLIT_MIN_BYTES
            or x.device.type != "cpu" or x.dtype != w_NK.dtype):
        return F.linear(x, w_NK, b_N)
    x_TK, N = x.reshape(T, K), w_NK.shape[0]
    if N >= _SPLIT_MIN_WIDTH and N % n == 0 and w_NK.stride(1) == 1:       # blocks of output rows
        wt_nKX = w_NK.as_strided((n, K, N // n), (N // n * w_NK.stride(0), 1, w_NK.stride(0)))
        y_nTX = torch.bmm(x_TK.unsqueeze(0).expand(n, T, K), wt_nKX)
        y_TN = y_nTX.view(T, N) if T == 1 else y_nTX.transpose(0, 1).reshape(T, N)
    elif K >= _SPLIT_MIN_WIDTH and K % n == 0 and w_NK.stride(0) == 1:     # blocks of the reduction
        wt_KN = w_NK.t()
        wt_nXN = wt_KN.as_strided((n, K // n, N), (K // n * wt_KN.stride(0), wt_KN.stride(0), 1))
        y_TN = torch.bmm(x_TK.view(T, n, K // n).transpose(0, 1), wt_nXN).sum(0)
    else:
        return F.linear(x, w_NK, b_N)
    if b_N is not None:
        y_TN = y_TN + b_N
    return y_TN.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------- kernel choice

# Which kernel computes the float32 products of a few tokens on the CPU: 'torch' (`split_linear`
# and `paired_ffn` over torch's BLAS; Inductor's loops inside compiled regions) or a native kernel
# (cpu_kernels.py) for an instruction set. 'auto' measures each candidate this host runs, once per
# process and thread count: which one wins depends on the host (its vector width, its BLAS), so the
# choice is measured rather than assumed, and recorded with every run. On a shared host the
# candidates' differences (10-30%) are smaller than what the load moves one timed run, so the
# measurement decides only a clear difference: the widest native kernel is the default, and
# another candidate replaces it only when it is faster by `KERNEL_MARGIN` (`_preferred`).
KERNELS = ("auto", "torch", *cpu_kernels.ISAS)
KERNEL_ENV = "SCHEINFER_CPU_KERNEL"
NAMED_MAX_TOKENS = 64         # a named native kernel's batched products of up to this many tokens (unmeasured;
                              # on cold weights, as a prompt's experts read them, it beats BLAS up to here)
_BATCHED_TOKENS = (16, 64)    # product sizes at which 'auto' compares the kernels for batched products
KERNEL_MARGIN = 0.10
"""How much faster (fraction of the default's time, paired median over rounds) a candidate must be
to replace 'auto''s default, the widest native kernel. The candidates differ by 10-30% while one
probe run moves by more with the load of a shared host, and the pick then followed the noise from
process to process; a default that only a clear win displaces makes the choice repeatable, and a
loss below the margin is a small one."""


@dataclass(frozen=True)
class KernelChoice:
    """The CPU products' kernels and how they were chosen ('option', 'env', 'measured', or 'only'
    when torch's is the one candidate). Products of one or two tokens (decoding: memory bound) use
    `name`; of 3..max_tokens tokens (prefill: compute bound) `batched` (default: `name`); larger
    ones torch's BLAS. 'auto' times decode steps (`rates_gb_s`: GB/s of the weights they read)
    as the caller runs them (`decode_mode`, one of DECODE_MODES) for `name`, a FastDecoder's own
    steps or else a token's routed experts of probe layers, and batched products of probe
    experts (`batched_gflop_s`, per kernel@tokens) for `batched` and `max_tokens`: the two can
    differ, since one-token products run at the memory bandwidth with any vector width while
    batched ones gain from the widest. `probe`: the probe experts' shape (the caller's model's,
    `ProbeShape.probed`) and what the one-token decision timed ('own steps' or 'probe experts').
    `basis`: what each measured decision rested on (`_preferred`): per decision ('decode',
    'decode, compiled', 'batched', 'torch@T'), the default, the candidates' paired median time
    ratios to it, the margin and the pick."""

    name: str
    how: str
    max_tokens: int = 0
    batched: str = ""
    rates_gb_s: dict = field(default_factory=dict)
    batched_gflop_s: dict = field(default_factory=dict)
    note: str = ""
    decode_mode: str = ""
    basis: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)

    @property
    def isa(self) -> int | None:
        """The native ops' `isa` number for one-token products (None: torch's kernels)."""
        return cpu_kernels.ISAS.get(self.name)

    def native(self, tokens: int) -> int | None:
        """The native ops' `isa` for a product of `tokens` tokens, None for torch's."""
        if tokens <= 2:
            return cpu_kernels.ISAS.get(self.name)
        return cpu_kernels.ISAS.get(self.batched or self.name) if tokens <= self.max_tokens else None

    def as_dict(self) -> dict:
        return {"kernel": self.name, "how": self.how, "batched": self.batched or self.name, "max_tokens": self.max_tokens,
                "rates_gb_s": dict(self.rates_gb_s), "batched_gflop_s": dict(self.batched_gflop_s), "note": self.note,
                "decode_mode": self.decode_mode, "basis": {k: dict(v) for k, v in self.basis.items()},
                "probe": dict(self.probe)}


def choose_kernel(requested: "str | KernelChoice | None" = None, *, mode: str = "eager",
                  shape: "ProbeShape | None" = None, own_steps: "OwnSteps | None" = None) -> KernelChoice:
    """The kernel for this process's CPU products: `requested` (an option; a KernelChoice is taken
    as made), else $SCHEINFER_CPU_KERNEL, else 'auto', measured (`_choice`) as the caller will run
    its products (`mode`, one of DECODE_MODES) on experts of the caller's model's shape (`shape`;
    None: Mixtral's ratio at hidden 1024), since the candidates' order depends on both; with
    `own_steps` (a decoder's own decode steps on its own weights) the one-token decision times
    those instead of the probe's experts. A named native kernel this host cannot run is a one-line
    error."""
    if mode not in DECODE_MODES:
        raise ValueError(f"mode={mode!r} is not allowed; expected one of {', '.join(DECODE_MODES)}")
    choice = named_kernel(requested)
    if choice is not None:
        return choice
    native, threads, shape = cpu_kernels.supported_isas(), torch.get_num_threads(), (shape or ProbeShape()).probed()
    return _choice(native, threads, mode, shape, own_steps) if own_steps is not None else \
        _measured_choice(native, threads, mode, shape)


def named_kernel(requested: "str | KernelChoice | None" = None) -> KernelChoice | None:
    """`choose_kernel`'s choice where it needs no measurement (a KernelChoice, a kernel named by
    the option or $SCHEINFER_CPU_KERNEL, or torch's when no native kernel loads), else None
    ('auto'); a bad name is a one-line error either way, so callers can check it up front."""
    if isinstance(requested, KernelChoice):
        return requested
    how = "option" if requested else "env" if os.environ.get(KERNEL_ENV) else "measured"
    name = requested or os.environ.get(KERNEL_ENV) or "auto"
    if name not in KERNELS:
        raise ConfigError(f"cpu kernel={name!r} is not allowed; expected one of {', '.join(KERNELS)} "
                          f"(option `kernel` or ${KERNEL_ENV})")
    if name == "torch":
        return KernelChoice("torch", how)
    native = cpu_kernels.supported_isas()
    if name != "auto":
        if name not in native:
            why = cpu_kernels.load_error() or f"this CPU runs {', '.join(native) or 'none of them'}"
            raise ConfigError(f"cpu kernel={name!r} is not available on this host ({why}); expected one of "
                              f"auto, torch{''.join(', ' + n for n in native)}")
        return KernelChoice(name, how, NAMED_MAX_TOKENS)
    if not native:
        return KernelChoice("torch", "only", note=cpu_kernels.load_error() or "")
    return None


DECODE_MODES = ("eager", "compiled", "ffns")
"""How a caller runs a decoded token's routed experts, as 'auto' measures them: 'eager' as
`FastDecoder.moe` does (`token_experts`), 'compiled' as its compiled token step does (routing and
experts in one graph, `_routed_experts`), 'ffns' as FFN by FFN (`fast_ffns`: the engine's CPU
lane, whose experts are separate gate, up and down arrays)."""
COMPILED = ", compiled"                 # suffix of a compiled decode step's rate in KernelChoice.rates_gb_s
_PROBE_MAX_LAYER_BYTES = 256 << 20
_PROBE_MAX_LAYERS = 8
_DECODE_PROBE_S = 0.5
"""Timed seconds each decode comparison runs at least (more rounds than `rounds` where a round is
short). An eager probe step is a few milliseconds, under the scheduler's time slice on a loaded
host, so one round's ratio is noisy and the paired median needs some twenty rounds; compiled
steps and the batched comparison's rounds are long enough that their five cost as much."""


@dataclass(frozen=True)
class ProbeShape:
    """The experts one decoded token streams in one MoE layer of the caller's model, as 'auto''s
    probe builds them: `top_k` SwiGLU FFNs of `hidden` x `width` (a dense model: its FFN, top_k
    1), chosen by a router of `top_k` equal scores, so that every probe expert is routed to. The
    routing fields (`router`, `normalize_topk`, `router_jitter_eps`) are those `layers.route`
    reads of a DecoderConfig, so the probe routes as the model does, in a compiled graph too."""

    hidden: int = 1024
    width: int = 3584
    top_k: int = 2
    router: str = "softmax"
    normalize_topk: bool = True
    router_jitter_eps: float = 0.0

    @classmethod
    def at_hidden(cls, hidden: int) -> "ProbeShape":
        """Two experts of Mixtral's width ratio (3.5) at `hidden`: for a caller that knows no model
        (the default, ProbeShape(), is Mixtral's ratio at hidden 1024)."""
        return cls(hidden, max(64, hidden * 7 // 2))

    @classmethod
    def of(cls, cfg: DecoderConfig) -> "ProbeShape":
        if not cfg.num_experts:
            return cls(cfg.hidden, cfg.ffn_hidden, 1)
        return cls(cfg.hidden, cfg.moe_ffn_hidden, cfg.top_k, cfg.router, cfg.normalize_topk, cfg.router_jitter_eps)

    @property
    def layer_bytes(self) -> int:
        """float32 bytes of one probe layer's experts (what a decoded token reads of a layer)."""
        return self.top_k * 3 * self.hidden * self.width * 4

    def probed(self) -> "ProbeShape":
        """The shape the probe runs: experts narrowed (to a multiple of 64 wide) so that one layer
        holds at most `_PROBE_MAX_LAYER_BYTES`: a real model's experts (Mixtral's: 1.4 GB a layer)
        would make the probe cost seconds and gigabytes, and at those widths every kernel streams
        at the memory bandwidth anyway."""
        if self.layer_bytes <= _PROBE_MAX_LAYER_BYTES:
            return self
        width = max(64, _PROBE_MAX_LAYER_BYTES // (self.top_k * 3 * self.hidden * 4) // 64 * 64)
        return replace(self, width=min(width, self.width))

    def as_dict(self) -> dict:
        return {"hidden": self.hidden, "width": self.width, "top_k": self.top_k, "router": self.router}


@dataclass(frozen=True, eq=False)
class OwnSteps:
    """A decoder's own decode steps, for 'auto' to time in place of the probe's experts: what runs
    around the experts (attention, norms, the LM head, and how torch's threads and the native ops'
    share the cores between them) moves the candidates' order too. `run(kernel)` makes a few
    steps with `kernel`, `weight_bytes` what they read of the weights in all."""

    run: Callable[[KernelChoice], None]
    weight_bytes: int


@functools.cache
def _measured_choice(native: tuple[str, ...], threads: int, mode: str, shape: ProbeShape, rounds: int = 5) -> KernelChoice:
    """`_choice` on the probe's experts alone, once per process, thread count, mode and shape."""
    return _choice(native, threads, mode, shape, None, rounds)


def _choice(native: tuple[str, ...], threads: int, mode: str, shape: ProbeShape, own_steps: OwnSteps | None,
            rounds: int = 5) -> KernelChoice:
    """'auto' (KernelChoice) for products run as `mode` runs them (DECODE_MODES) at `shape`.
    `name`: a decoded token's routed experts of probe layers (`_probe_layers`) streaming cold
    weights, each candidate as the decode step runs them (`_probe_step`, `_decode_seconds`), or,
    given `own_steps`, the caller's own decode steps: eagerly, and for a compiled decoder
    compiled (keys ending in `COMPILED`), where the native op runs between Inductor's loops; the
    choice is `_preferred` in the caller's mode: the widest native kernel unless another is
    faster by `KERNEL_MARGIN`. Compiling costs seconds per candidate, so the compiled comparison
    is torch's loops against the native kernel the eager probe prefers: the native ones differ
    only inside the op, which compiling does not change. `batched` and `max_tokens`: the prompt's
    products (`_batched_decision`). `rates_gb_s` and `batched_gflop_s` record each candidate's
    fastest run; `probe` the shape and what the one-token decision timed. About a second in all
    eagerly (the probe's timings shared by every caller of the same shape and threads)."""
    rates, basis = {}, {}
    probe_bytes = _probe_layer_count(shape) * shape.layer_bytes

    def decide(seconds: dict[str, list[float]], order: tuple[str, ...], key: str, nbytes: int) -> None:
        rates.update({k: round(nbytes / min(ts) / 1e9, 2) for k, ts in seconds.items()})
        basis[key] = _preferred(seconds, order)

    if mode == "compiled":
        eager_s = _eager_decode_seconds(native, threads, "eager", shape, rounds)
        decide(eager_s, (*native, "torch"), "decode", probe_bytes)
        best = _preferred(eager_s, native)["pick"]
        compiled_s = _own_seconds(own_steps, ("torch", best), rounds, COMPILED) if own_steps else \
            {k + COMPILED: ts for k, ts in _decode_seconds(("torch", best), _probe_layers(shape, False), rounds,
                                                            "compiled", shape).items()}
        decide(compiled_s, (best + COMPILED, "torch" + COMPILED), "decode" + COMPILED,
               own_steps.weight_bytes if own_steps else probe_bytes)
    elif own_steps:
        decide(_own_seconds(own_steps, ("torch", *native), rounds), (*native, "torch"), "decode", own_steps.weight_bytes)
    else:
        decide(_eager_decode_seconds(native, threads, mode, shape, rounds), (*native, "torch"), "decode", probe_bytes)
    name = basis["decode" + (COMPILED if mode == "compiled" else "")]["pick"].removesuffix(COMPILED)
    best, max_tokens, gflop_s, batched_basis = _batched_decision(native, threads, shape, mode == "ffns", rounds)
    return KernelChoice(name, "measured", max_tokens, best, rates, dict(gflop_s), decode_mode=mode,
                        basis={**basis, **batched_basis},
                        probe={**shape.as_dict(), "decode_timed": _decode_timed(mode, own_steps is not None)})


def _decode_timed(mode: str, own: bool) -> str:
    """What `_choice`'s one-token decision timed, as `KernelChoice.probe` records it."""
    if not own:
        return "probe experts"
    return "own compiled steps (native kernels ranked on probe experts)" if mode == "compiled" else "own steps"


@functools.cache
def _batched_decision(native: tuple[str, ...], threads: int, shape: ProbeShape, separate: bool, rounds: int
                      ) -> tuple[str, int, dict, dict]:
    """(batched, max_tokens, batched_gflop_s, basis) of `_choice`: every probe expert for
    _BATCHED_TOKENS tokens (a prompt's MoE layer, always eager: `fast_ffns`), the preferred
    native kernel at the smallest size, and `max_tokens` (the largest size up to which torch's
    BLAS does not replace it, at least 8); once per process, thread count, shape and layout."""
    layers = _probe_layers(shape, separate)
    batched_s = _batched_seconds(("torch", *native), layers, rounds)
    gflop_s = {key: round(2 * int(key.split("@")[1]) * len(layers) * shape.layer_bytes / 4 / min(ts) / 1e9, 1)
               for key, ts in batched_s.items()}
    basis = {"batched": _preferred({n: batched_s[f"{n}@{_BATCHED_TOKENS[0]}"] for n in native}, native)}
    best, max_tokens = basis["batched"]["pick"], 8
    for T in _BATCHED_TOKENS:
        basis[f"torch@{T}"] = _preferred(batched_s, (f"{best}@{T}", f"torch@{T}"))
        if basis[f"torch@{T}"]["pick"] != f"{best}@{T}":
            break
        max_tokens = T
    return best, max_tokens, gflop_s, basis


def _own_seconds(own_steps: OwnSteps, candidates: tuple[str, ...], rounds: int, suffix: str = ""
                 ) -> dict[str, list[float]]:
    """Seconds per round (`_round_seconds`, at least `_DECODE_PROBE_S`) of the caller's own steps
    with each candidate kernel (keys: the kernel's name + `suffix`)."""
    runs = {name + suffix: functools.partial(own_steps.run, KernelChoice(name, "probe")) for name in candidates}
    return _round_seconds(runs, rounds, _DECODE_PROBE_S)


@functools.cache
def _eager_decode_seconds(native: tuple[str, ...], threads: int, mode: str, shape: ProbeShape, rounds: int
                          ) -> dict[str, list[float]]:
    """`_decode_seconds` of every candidate run eagerly in `mode` ('eager' or 'ffns'), once per
    process, thread count, mode and shape: the eager and the compiled choice both start from it."""
    return _decode_seconds(("torch", *native), _probe_layers(shape, mode == "ffns"), rounds, mode, shape)


def _preferred(seconds: dict[str, list[float]], order: tuple[str, ...], margin: float = KERNEL_MARGIN) -> dict:
    """The decision between candidates timed in the same rounds (`_round_seconds`: seconds per
    round), `order` the preference (its first the default). One candidate compares to another by
    the median over rounds of their per-round time ratio (paired: a load burst that slows one
    round slows every candidate in it, and the ratio cancels it; the median ignores the rounds it
    did not). The pick starts as the default and passes to the first candidate in `order` whose
    ratio to it is at most 1 - margin, until none is: so a candidate displaces a preferred one only
    by a clear win, and two near-equal ones that both beat the default go to the preferred one; each
    step's candidate also beats the default by the margin (noisy ratios need not be transitive).
    Returns the decision as `KernelChoice.basis` records it: the default, each other candidate's
    ratio to it (`time_ratios`), the margin, each step's ratio to the pick it replaced (`steps`)
    and the pick."""
    def ratio(key: str, to: str) -> float:
        return round(statistics.median(t / r for t, r in zip(seconds[key], seconds[to])), 3)

    to_default = {key: ratio(key, order[0]) for key in order[1:]}
    pick, steps = order[0], {}
    while winner := next((key for key, r in to_default.items() if r <= 1 - margin and key not in steps
                          and ratio(key, pick) <= 1 - margin), None):
        steps[winner], pick = ratio(winner, pick), winner
    return {"default": order[0], "time_ratios": to_default, "margin": margin, "steps": steps, "pick": pick}


def _probe_layers(shape: ProbeShape, separate: bool) -> list[MoEWeights]:
    """The probe's layers of `shape.top_k` experts of `shape` with a zero router (every expert
    routed to): 3x the last-level cache in all (at least 96 MiB), so that each pass reads them from
    memory, as a decode step reads its experts, but at most `_PROBE_MAX_LAYERS` (a compiled probe
    step is one graph through all of them; a tiny model's experts stay in the cache anyway, and
    its step costs what its operations do). Stacked (`StackedMoEWeights`, as FastDecoder holds
    them) or `separate` (gate, up and down [F, M] arrays of each expert, as the engine holds them)."""
    count = _probe_layer_count(shape)
    E, M, width = shape.top_k, shape.hidden, shape.width
    if separate:
        return [MoEWeights(torch.zeros(E, M), tuple(ExpertWeights(torch.ones(width, M), torch.ones(width, M),
                                                                  torch.ones(width, M).t()) for _ in range(E)))
                for _ in range(count)]
    return [StackedMoEWeights.of(torch.zeros(E, M), torch.ones(E, 2 * width, M), torch.ones(E, M, width))
            for _ in range(count)]


def _probe_layer_count(shape: ProbeShape) -> int:
    return min(_PROBE_MAX_LAYERS, max(1, max(3 * cpu_kernels.last_level_cache_bytes(), 96 << 20) // shape.layer_bytes))


def _probe_step(x_1M: torch.Tensor, layers: tuple[MoEWeights, ...], shape: ProbeShape, kernel: KernelChoice,
                mode: str) -> torch.Tensor:
    """The MoE halves of a decode step over `layers`, x + experts(norm(x)) each, the token routed
    and its experts run as `mode` runs them (DECODE_MODES): in the compiled token step's graph
    (`_routed_experts`), eagerly as `FastDecoder.moe` does (`token_experts`), or FFN by FFN
    (`fast_ffns`, as the engine's CPU lane)."""
    for w in layers:
        h_1M = torch.rms_norm(x_1M, (x_1M.shape[-1],))
        if mode == "compiled":
            y_1M = _routed_experts(shape, w, h_1M, kernel)[0]
        else:
            ids_1K, weights_1K = route(shape, F.linear(h_1M, w.router_EM))
            if mode == "eager":
                y_1M = token_experts(w, h_1M, ids_1K, weights_1K, kernel)
            else:
                order = sorted((e, k) for k, e in enumerate(ids_1K[0].tolist()))
                y_1M = _weighted_sum(order, fast_ffns([(w.experts[e], h_1M) for e, _ in order], kernel), weights_1K,
                                     h_1M.dtype)
        x_1M = x_1M + y_1M
    return x_1M


def _round_seconds(runs: dict, rounds: int, budget_s: float = 0.0, max_rounds: int = 200) -> dict[str, list[float]]:
    """Seconds of each of `runs` in each round (after one untimed round: a warm-up, and a
    compile): `rounds` rounds, and more while the timed ones took under `budget_s` (up to
    `max_rounds`). Each round runs every candidate once, in an order rotated by one between
    rounds, so that load from other work falls on all candidates alike and no candidate always
    runs right after the same other one (whose cache and frequency state it would inherit); the
    rounds are compared paired (`_preferred`)."""
    keys = list(runs)
    times: dict[str, list[float]] = {key: [] for key in keys}
    timed_s = 0.0
    for r in itertools.count():
        if r > rounds and (timed_s >= budget_s or r > max_rounds):
            break
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - t0)
        timed_s += sum(times[key][-1] for key in keys) if r else 0.0
    return {key: ts[1:] for key, ts in times.items()}


def _decode_seconds(candidates: tuple[str, ...], layers: list[MoEWeights], rounds: int, mode: str,
                    shape: ProbeShape) -> dict[str, list[float]]:
    """Seconds per round (`_round_seconds`: at least `rounds`, more until `_DECODE_PROBE_S`) of
    one `_probe_step` over `layers` with each candidate kernel, run as `mode` runs it (compiled:
    `_compiled_region`, as the decoder compiles its token step)."""
    x_1M = torch.ones(1, shape.hidden)

    def run(name: str):
        kernel = KernelChoice(name, "probe")
        native = kernel.native(1) is not None
        if mode == "compiled":
            return functools.partial(_compiled_region(_probe_step, native), x_1M, tuple(layers), shape, kernel, mode)

        def eager():
            with cpu_kernels.torch_ops_on_one_thread() if native and mode == "eager" else contextlib.nullcontext():
                _probe_step(x_1M, tuple(layers), shape, kernel, mode)
        return eager

    with torch.inference_mode():
        return _round_seconds({name: run(name) for name in candidates}, rounds, _DECODE_PROBE_S)


def _batched_seconds(candidates: tuple[str, ...], layers: list[MoEWeights], rounds: int) -> dict[str, list[float]]:
    """Seconds per round (`_round_seconds`; keys 'kernel@tokens') of every expert of every layer
    for each of _BATCHED_TOKENS tokens, as a prompt's MoE layer runs them (`fast_ffns`: one
    native op, or torch's products expert by expert)."""
    hidden = layers[0].router_EM.shape[1]

    def run(name: str, T: int):
        kernel, x_TM = KernelChoice(name, "probe", max(_BATCHED_TOKENS)), torch.ones(T, hidden)
        return lambda: [fast_ffns([(e, x_TM) for e in w.experts], kernel) for w in layers]

    with torch.inference_mode():
        return _round_seconds({f"{name}@{T}": run(name, T) for T in _BATCHED_TOKENS for name in candidates}, rounds)


def product(x: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None,
            kernel: KernelChoice | None = None) -> torch.Tensor:
    """F.linear(x, w_NK, b_N): the native kernel of `kernel` for float32 on the CPU, up to its
    max_tokens (w with rows or columns contiguous), else `split_linear`. Inside a compiled region
    a small weight (cache-resident, microseconds of work) is left to Inductor, which fuses its
    loop with the operations around it; an extern call would cost more."""
    isa = kernel.native(x.numel() // max(x.shape[-1], 1)) if kernel is not None else None
    if (isa is not None and x.dtype == w_NK.dtype == torch.float32 and x.device.type == "cpu"
            and (w_NK.stride(1) == 1 or w_NK.stride(0) == 1)
            and not (torch.compiler.is_compiling() and w_NK.numel() * w_NK.element_size() < _SPLIT_MIN_BYTES)):
        return torch.ops.scheinfer.linear(x, w_NK, b_N, isa)
    return split_linear(x, w_NK, b_N)


# ----------------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class JoinedExpertWeights(ExpertWeights):
    """An FFN whose gate and up are the two halves of gate_up_2FM (one product for both)."""

    gate_up_2FM: torch.Tensor | None = None


@dataclass(frozen=True)
class JoinedAttentionWeights(AttentionWeights):
    """Attention whose q, k, v (and biases) are consecutive rows of qkv_w (qkv_b): one product."""

    qkv_w: torch.Tensor | None = None
    qkv_b: torch.Tensor | None = None


@dataclass(frozen=True)
class StackedMoEWeights(MoEWeights):
    """MoE weights whose experts are views of gate/up [E, 2F, M] and down [E, M, F]."""

    gate_up_E2FM: torch.Tensor | None = None
    down_EMF: torch.Tensor | None = None

    @classmethod
    def of(cls, router_EM: torch.Tensor, gate_up_E2FM: torch.Tensor, down_EMF: torch.Tensor,
           shared: ExpertWeights | None = None, shared_gate_1M: torch.Tensor | None = None) -> "StackedMoEWeights":
        """The layer whose expert e is gate_up_E2FM[e] (gate rows, then up rows) and down_EMF[e],
        as views (slices along F stay views)."""
        width = gate_up_E2FM.shape[1] // 2
        experts = tuple(JoinedExpertWeights(gu[:width], gu[width:], dn, gate_up_2FM=gu)
                        for gu, dn in zip(gate_up_E2FM, down_EMF))
        return cls(router_EM=router_EM, experts=experts, shared=shared, shared_gate_1M=shared_gate_1M,
                   gate_up_E2FM=gate_up_E2FM, down_EMF=down_EMF)


@dataclass(frozen=True)
class FusedRMSNorm(Norm):
    """`Norm` with float32 RMSNorm as torch's one fused kernel."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "rmsnorm" or x.dtype != torch.float32:
            return super().__call__(x)
        y = torch.rms_norm(x, (x.shape[-1],), self.weight_M, self.eps)
        return y if self.bias_M is None else y + self.bias_M


def fast_ffn(w: ExpertWeights, x_TM: torch.Tensor, kernel: KernelChoice | None = None) -> torch.Tensor:
    """`layers.ffn`: the native FFN kernel of `kernel` (`product`'s conditions; gate and up with
    contiguous rows), else `split_linear` products, gate and up in one when they are joined."""
    isa = kernel.native(x_TM.shape[0]) if kernel is not None else None
    if isa is not None and _native_ffn_layout(w, x_TM):
        return torch.ops.scheinfer.ffn(x_TM, w.gate_FM, w.up_FM, w.down_MF, isa)
    if isinstance(w, JoinedExpertWeights):
        gu_T2F = split_linear(x_TM, w.gate_up_2FM)
        h_TF = F.silu(gu_T2F[:, :w.ffn_hidden]) * gu_T2F[:, w.ffn_hidden:]
    else:
        h_TF = F.silu(split_linear(x_TM, w.gate_FM)) * split_linear(x_TM, w.up_FM)
    return split_linear(h_TF, w.down_MF)


def fast_ffns(items: list[tuple[ExpertWeights, torch.Tensor]], kernel: KernelChoice | None = None
              ) -> list[torch.Tensor]:
    """[`fast_ffn`(w, x_TM) for (w, x_TM) in items]: with a native kernel, every FFN that
    qualifies for it in one op (`ffn_many`: two parallel regions in all, not two per FFN, all
    with the kernel for the most tokens among them), the others one by one."""
    isas = [kernel.native(x.shape[0]) if kernel is not None and _native_ffn_layout(w, x) else None for w, x in items]
    native = [j for j, isa in enumerate(isas) if isa is not None]
    if len(native) < 2:
        return [fast_ffn(w, x, kernel) for w, x in items]
    ws = [items[j][0] for j in native]
    isa = kernel.native(max(items[j][1].shape[0] for j in native))
    ys = dict(zip(native, torch.ops.scheinfer.ffn_many([items[j][1] for j in native], [w.gate_FM for w in ws],
                                                      [w.up_FM for w in ws], [w.down_MF for w in ws], isa)))
    return [ys[j] if j in ys else fast_ffn(w, x, kernel) for j, (w, x) in enumerate(items)]


def _native_ffn_layout(w: ExpertWeights, x_TM: torch.Tensor) -> bool:
    """The native FFN ops take this FFN: float32 on the CPU, gate and up with contiguous rows,
    down with rows or columns contiguous."""
    return (x_TM.dtype == w.gate_FM.dtype == torch.float32 and x_TM.device.type == "cpu" and w.gate_FM.stride(1) == 1
            and w.up_FM.stride(1) == 1 and (w.down_MF.stride(1) == 1 or w.down_MF.stride(0) == 1))


def _fast_expert_fn(layer: int, expert: int | str, w: ExpertWeights, x_TM: torch.Tensor) -> torch.Tensor:
    """The default expert function's marker: `FastDecoder.run_ffns` calls `fast_ffn` with the
    decoder's kernel in its place."""
    return fast_ffn(w, x_TM)


def paired_ffn(w: StackedMoEWeights, a: int, b: int, x_1M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ffn` of experts a < b of one stacked layer for one token, as two batched products: any two
    experts of an [E, ...] array are one strided [2, ...] view (batch stride b - a experts)."""
    gu_E2FM, down_EMF = w.gate_up_E2FM, w.down_EMF
    _, F2, M = gu_E2FM.shape
    width = F2 // 2
    gu_2M2F = gu_E2FM.as_strided((2, M, F2), ((b - a) * F2 * M, 1, M), gu_E2FM.storage_offset() + a * F2 * M)
    down_2FM = down_EMF.as_strided((2, width, M), ((b - a) * width * M, 1, width),
                                   down_EMF.storage_offset() + a * width * M)
    g_21F2 = torch.bmm(x_1M.view(1, 1, M).expand(2, 1, M), gu_2M2F)
    h_21F = F.silu(g_21F2[..., :width]) * g_21F2[..., width:]
    y_2M = torch.bmm(h_21F, down_2FM).view(2, M)
    return y_2M[0:1], y_2M[1:2]


def token_experts(w: StackedMoEWeights, x_1M: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor,
                  kernel: KernelChoice) -> torch.Tensor:
    """y_1M: one token's routed experts of a stacked layer, weighted and added in ascending expert
    order, as the eager decode step runs them: the native kernel of `kernel` as one op
    (`moe_token`), or torch's products: pairs of experts (`paired_ffn`) on at most two cores, else
    expert by expert (`fast_ffns`)."""
    if kernel.native(1) is not None:
        return torch.ops.scheinfer.moe_token(x_1M, w.gate_up_E2FM, w.down_EMF, ids_1K[0], weights_1K[0],
                                             kernel.native(1))
    order = sorted((e, k) for k, e in enumerate(ids_1K[0].tolist()))
    ys = []
    if torch.get_num_threads() <= 2:
        for a, b in zip(order[::2], order[1::2]):
            ys.extend(paired_ffn(w, a[0], b[0], x_1M))
    ys += fast_ffns([(w.experts[e], x_1M) for e, _ in order[len(ys):]], kernel)
    return _weighted_sum(order, ys, weights_1K, x_1M.dtype)


def _weighted_sum(order: list[tuple[int, int]], ys: list[torch.Tensor], weights_1K: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """sum of ys[j] * weights_1K[0, k] over order's (expert, k) pairs, in that order."""
    gate_K = weights_1K[0].to(dtype).tolist()   # Python numbers: scalar products, same values
    y_1M = None
    for (_, k), y_e in zip(order, ys):
        y_e = y_e * gate_K[k]
        y_1M = y_e if y_1M is None else y_1M + y_e
    return y_1M


@dataclass(frozen=True)
class ExpertGroups:
    """The routed (token, slot) pairs of several tokens sorted by expert, tokens ascending within
    each expert: pair n is token token_N[n] with router weight weight_N[n]; `blocks` lists
    (expert, start, stop) of every expert with tokens, ascending. Each token's slots are first
    put in ascending expert order, so that `combine` adds a token's terms in that order."""

    token_N: torch.Tensor
    weight_N: torch.Tensor
    inverse_N: torch.Tensor       # sorted position of flat pair t * K + k (k in ascending expert order)
    blocks: list[tuple[int, int, int]]
    top_k: int

    @classmethod
    def of(cls, ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int) -> "ExpertGroups":
        K = ids_TK.shape[1]
        ids_TK, slot_TK = ids_TK.sort(dim=1)
        flat_N = ids_TK.flatten()
        order_N = flat_N.argsort(stable=True)
        counts = torch.bincount(flat_N, minlength=num_experts).tolist()
        ends = list(itertools.accumulate(counts))
        blocks = [(e, end - c, end) for e, (c, end) in enumerate(zip(counts, ends)) if c]
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(order_N.numel())     # the permutation's inverse, without a sort
        return cls(order_N // K, weights_TK.gather(1, slot_TK).flatten()[order_N], inverse_N, blocks, K)

    def combine(self, y_NM: torch.Tensor) -> torch.Tensor:
        """y_TM: each token's rows of y_NM (sorted pairs) added in ascending expert order."""
        y_TKM = y_NM.index_select(0, self.inverse_N).view(-1, self.top_k, y_NM.shape[-1])
        y_TM = y_TKM[:, 0]
        for k in range(1, self.top_k):
            y_TM = y_TM + y_TKM[:, k]
        return y_TM


# ----------------------------------------------------------------------------------- attention

def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`layers.apply_rope` with rotate_half(x) = (-x2, x1) = (x2, x1) * (-1, 1): the halves
    swapped in one flip, the sign folded into sin (exact, the same values)."""
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin


def _attention(cfg: DecoderConfig, w: JoinedAttentionWeights, h_BSM: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, cos_BSD: torch.Tensor, signed_sin_BSD: torch.Tensor,
               allowed_BSL: torch.Tensor | None, L1: int, kernel: KernelChoice | None = None) -> torch.Tensor:
    """`layers.attention` with one q/k/v product and one RoPE; allowed_BSL None: no padding and
    query s sees the slots up to its own, L1 - S + s: with one new token every cached slot, with
    S > 1 new tokens an empty cache before them (L1 = S), so the mask is the causal one and SDPA
    needs none (`FastDecoder.attention_mask`)."""
    B, S, _ = h_BSM.shape
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv_BNSD = product(h_BSM, w.qkv_w, w.qkv_b, kernel).view(B, S, H + 2 * G, D).transpose(1, 2)
    qk_BNSD = _rotate(qkv_BNSD[:, :H + G], cos_BSD[:, None], signed_sin_BSD[:, None])
    q_BHSD, k_BGSD, v_BGSD = qk_BNSD[:, :H], qk_BNSD[:, H:], qkv_BNSD[:, H + G:]
    k_BGLD, v_BGLD = append_to_cache(k_cache, v_cache, k_BGSD, v_BGSD, L1)
    if torch.compiler.is_compiling() and S == 1 and allowed_BSL is None:
        # one query per sequence: scores and weighted sum as multiply-reduces that Inductor
        # fuses with the softmax (the extern SDPA kernel costs more than the work here)
        q_BGRD = q_BHSD.reshape(B, G, H // G, D)
        scores_BGRL = (q_BGRD.unsqueeze(3) * k_BGLD.unsqueeze(2)).sum(-1) * D ** -0.5
        p_BGRL = torch.softmax(scores_BGRL, dim=-1)
        o_BSX = (p_BGRL.unsqueeze(-1) * v_BGLD.unsqueeze(2)).sum(3).reshape(B, S, H * D)
    else:
        mask = None if allowed_BSL is None else allowed_BSL[:, None]
        o_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BGLD, v_BGLD, attn_mask=mask,
                                                is_causal=allowed_BSL is None and S > 1, enable_gqa=G != H)
        o_BSX = o_BHSD.transpose(1, 2).reshape(B, S, H * D)
    return product(o_BSX, w.o_w, w.o_b, kernel)


# ----------------------------------------------------------------------------------- compiled regions

def _attention_block(cfg: DecoderConfig, norm: Norm, w: JoinedAttentionWeights, x_BSM: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor,
                     allowed_BSL: torch.Tensor | None, L1: int, kernel: KernelChoice | None = None
                     ) -> torch.Tensor:
    """x + attention(norm(x)): the pre-norm attention half of a layer, one region for
    torch.compile (with the cache length L1 dynamic, one graph serves every decode step)."""
    return x_BSM + _attention(cfg, w, norm(x_BSM), k_cache, v_cache, cos_BSD, sin_BSD, allowed_BSL, L1, kernel)


def _routed_experts(cfg: DecoderConfig, w: StackedMoEWeights, h_1M: torch.Tensor,
                    kernel: KernelChoice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_1M, ids_1K, weights_1K): the routing and the routed experts of one token
    (`_traced_token_experts`)."""
    ids_1K, weights_1K = route(cfg, F.linear(h_1M, w.router_EM))
    return _traced_token_experts(w, h_1M, ids_1K, weights_1K, kernel), ids_1K, weights_1K


def _traced_token_experts(w: StackedMoEWeights, h_1M: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor,
                          kernel: KernelChoice | None = None) -> torch.Tensor:
    """y_1M: one token's routed experts as the compiled token step runs them: the native kernel of
    `kernel` (one op), else gathered multiply-reduce products. Written for torch.compile: Inductor
    fuses the gather into one reduction loop, so each chosen expert's weights stream once (at one
    row per loop and one accumulator). Run eagerly it would copy the chosen experts' weights first
    (eagerly: `token_experts`)."""
    isa = kernel.native(1) if kernel is not None else None
    if isa is not None and h_1M.dtype == torch.float32:
        return torch.ops.scheinfer.moe_token(h_1M, w.gate_up_E2FM, w.down_EMF, ids_1K[0], weights_1K[0], isa)
    ids_K, width = ids_1K[0], w.down_EMF.shape[-1]
    gu_K2F = (w.gate_up_E2FM[ids_K] * h_1M).sum(-1)
    h_KF = F.silu(gu_K2F[:, :width]) * gu_K2F[:, width:]
    y_KM = (w.down_EMF[ids_K] * h_KF[:, None, :]).sum(-1)
    return (weights_1K[0, :, None].to(y_KM.dtype) * y_KM).sum(0, keepdim=True)


def _token_step(cfg: DecoderConfig, layers: tuple[LayerWeights, ...], final_norm: Norm, lm_head_VM: torch.Tensor,
                lm_head_b: torch.Tensor | None, x_11M: torch.Tensor, k_caches: tuple[torch.Tensor, ...],
                v_caches: tuple[torch.Tensor, ...], cos_11D: torch.Tensor, sin_11D: torch.Tensor, L1: int,
                kernel: KernelChoice | None = None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(float32 logits [1, 1, V], [(ids_1K, weights_1K) of each MoE layer]) of one decoded token
    through every layer, the final norm and the LM head: one region for torch.compile, so one
    call per token (each region call costs tens of microseconds of Python and guards). Products
    are the native kernel of `kernel`, or multiply-reduces (`split_linear`, `_routed_experts`)."""
    routes = []
    for i, w in enumerate(layers):
        x_11M = _attention_block(cfg, w.attn_norm, w.attn, x_11M, k_caches[i], v_caches[i], cos_11D, sin_11D, None,
                                 L1, kernel)
        h_1M = w.ffn_norm(x_11M).view(1, -1)
        if w.moe is None:
            y_1M = fast_ffn(w.dense, h_1M, kernel)
        else:
            y_1M, ids_1K, weights_1K = _routed_experts(cfg, w.moe, h_1M, kernel)
            routes.append((ids_1K, weights_1K))
            if w.moe.shared is not None:
                y_1M = y_1M + gate_shared(w.moe, h_1M, fast_ffn(w.moe.shared, h_1M, kernel))
        x_11M = x_11M + y_1M.view(x_11M.shape)
    return product(final_norm(x_11M), lm_head_VM, lm_head_b, kernel).float(), routes


# Inductor's C++ wrapper calls a region's kernels without Python in between (less fixed cost per
# region call than its Python wrapper).
_COMPILE_OPTIONS = {"cpp_wrapper": True}


@functools.cache
def _compiled_region(fn, native: bool):
    """torch.compile(fn) for a region whose products are native ops (`native`) or Inductor's
    loops. With native ops, Inductor's own loops (norms, RoPE, attention over the cache, small
    weights: microseconds each) run on one thread: OpenMP's workers spin for a while after each
    parallel loop, and on a host without a spare core they hold the core that the native op's
    helper thread needs. Measured on the 2-core host, two cold stacked layers of the kernel probe
    (`_probe_step`): 11-12 ms eager, 48-96 ms compiled with Inductor's parallel loops, 11 ms with
    them on one thread (or with OMP_WAIT_POLICY=passive)."""
    options = {**_COMPILE_OPTIONS, **({"cpp.threads": 1} if native else {})}
    return torch.compile(fn, fullgraph=True, options=options)


def _inductor_compilers() -> tuple[str, ...]:
    """The C++ compilers Inductor's CPU backend will try (its `cpp.cxx` setting: $CXX or g++)."""
    from torch._inductor import config
    cxx = config.cpp.cxx
    return tuple(c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c)


# ----------------------------------------------------------------------------------- decoder

OWN_STEPS = 4      # decode steps per timed run of a FastDecoder's own 'auto' measurement


class FastDecoder(Decoder):
    """`Decoder` with the speed paths of the module doc; `compile_decode=True` adds the compiled
    decode regions (CPU only, without an expert_fn). `kernel`: the few-token products' kernel
    (`KERNELS`; None: $SCHEINFER_CPU_KERNEL, else 'auto'), used for float32 on the CPU and recorded
    as `self.kernel`."""

    default_expert_fn: ExpertFn = staticmethod(_fast_expert_fn)

    def __init__(self, source, *, compile_decode: bool = False, kernel: "str | KernelChoice | None" = None,
                 **decoder_kwargs):
        device, expert_fn = torch.device(decoder_kwargs.get("device", "cpu")), decoder_kwargs.get("expert_fn")
        self._native_dtype = decoder_kwargs.get("dtype", torch.float32) == torch.float32 and device.type == "cpu"
        if compile_decode and (device.type != "cpu" or expert_fn is not None):
            raise ValueError(f"compile_decode=True needs device 'cpu' and no expert_fn; got device "
                             f"{str(device)!r}, expert_fn {'given' if expert_fn else 'None'}")
        if compile_decode and not any(map(shutil.which, _inductor_compilers())):
            raise ValueError(f"compile_decode=True needs a C++ compiler for Inductor "
                             f"({' or '.join(_inductor_compilers())} on PATH, or set CXX); none was found")
        self.compile_decode = compile_decode
        if compile_decode:   # each architecture / shape / kernel is its own graph of the two regions; a
            # process with several models (the tests, a sweep) needs more than Dynamo's default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # a bad kernel name fails before the weights load; 'auto' is measured once they are
        self.kernel = (named_kernel(kernel) if self._native_dtype else None) or KernelChoice("torch", "only")
        self._rope_tables: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}   # long RoPE -> (cos, signed sin)
        super().__init__(source, **decoder_kwargs)
        self._moe_layers = [i for i in range(self.config.num_layers) if self.config.is_moe_layer(i)]
        self.use_kernel(kernel)

    def use_kernel(self, kernel: "str | KernelChoice | None") -> KernelChoice:
        """Switch the products' kernel (`choose_kernel`), e.g. to compare kernels on one set of
        weights; 'auto' is measured on this decoder's own decode steps (with the plain expert
        function; else on the probe's experts of its model's shape). Compiled regions compile
        once more for a new kernel."""
        if not self._native_dtype:
            self.kernel = KernelChoice("torch", "only", note="not float32 on the CPU")
            return self.kernel
        own = OwnSteps(self._own_steps, OWN_STEPS * decode_weight_bytes(self.config, 4)) \
            if self.expert_fn is _fast_expert_fn else None
        self.kernel = choose_kernel(kernel, mode="compiled" if self.compile_decode else "eager",
                                    shape=ProbeShape.of(self.config), own_steps=own)
        return self.kernel

    def _own_steps(self, kernel: KernelChoice) -> None:
        """OWN_STEPS decode steps of one sequence with `kernel` on a scratch cache, the route
        observer off: what 'auto' times of this decoder (`OwnSteps`)."""
        saved = self.kernel, self.route_observer
        self.kernel, self.route_observer = kernel, None
        try:
            cache = self.new_cache(1, OWN_STEPS)
            with self.generation_mode():
                for t in range(OWN_STEPS):
                    self.forward(torch.tensor([[(1 + t) % self.config.vocab_size]]), cache, last_only=True)
        finally:
            self.kernel, self.route_observer = saved

    # -------------------------------------------------------------- weights

    def _norm(self, prefix: str) -> Norm:
        n = super()._norm(prefix)
        return FusedRMSNorm(n.weight_M, n.bias_M, n.kind, n.eps)

    def _joined_rows(self, names: list[str]) -> torch.Tensor:
        """The tensors `names` as consecutive rows of one array, in the compute dtype / device."""
        return torch.cat([self._w(n) for n in names])

    def _expert(self, prefix: str) -> JoinedExpertWeights:
        gate_up_2FM = self._joined_rows([f"{prefix}.gate.weight", f"{prefix}.up.weight"])
        width = gate_up_2FM.shape[0] // 2
        return JoinedExpertWeights(gate_up_2FM[:width], gate_up_2FM[width:], self._w(f"{prefix}.down.weight"),
                                   gate_up_2FM=gate_up_2FM)

    def _attention_weights(self, i: int) -> JoinedAttentionWeights:
        cfg, p = self.config, f"layers.{i}.attn"
        qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv_w = self._joined_rows([f"{p}.{n}.weight" for n in "qkv"])
        qkv_b = self._joined_rows([f"{p}.{n}.bias" for n in "qkv"]) if cfg.qkv_bias else None
        split = lambda t: (None,) * 3 if t is None else (t[:qd], t[qd:qd + kvd], t[qd + kvd:])  # noqa: E731
        (q_w, k_w, v_w), (q_b, k_b, v_b) = split(qkv_w), split(qkv_b)
        return JoinedAttentionWeights(
            q_w=q_w, k_w=k_w, v_w=v_w, o_w=self._w(f"{p}.o.weight"), q_b=q_b, k_b=k_b, v_b=v_b,
            o_b=self._w(f"{p}.o.bias") if cfg.out_proj_bias else None, qkv_w=qkv_w, qkv_b=qkv_b)

    def _moe_weights(self, i: int) -> StackedMoEWeights:
        """Experts stacked as gate/up [E, 2F, M] and down [E, M, F] (`StackedMoEWeights.of`)."""
        cfg, p = self.config, f"layers.{i}.moe"
        E, width, M = cfg.num_experts, cfg.moe_ffn_hidden, cfg.hidden
        gu_E2FM = torch.empty(E, 2 * width, M, dtype=self.dtype, device=self.device)
        down_EMF = torch.empty(E, M, width, dtype=self.dtype, device=self.device)
        for e in range(E):
            gu_E2FM[e, :width] = self._w(f"{p}.experts.{e}.gate.weight")
            gu_E2FM[e, width:] = self._w(f"{p}.experts.{e}.up.weight")
            down_EMF[e] = self._w(f"{p}.experts.{e}.down.weight")
        return StackedMoEWeights.of(
            self._w(f"{p}.router.weight"), gu_E2FM, down_EMF,
            shared=self._expert(f"{p}.shared") if cfg.shared_expert_ffn_hidden else None,
            shared_gate_1M=self._w(f"{p}.shared_gate.weight") if cfg.shared_expert_gate else None)

    # -------------------------------------------------------------- pieces

    def rope(self, pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [B, S, D] (the first half of sin negated, see `_rotate`),
        looked up in a table that grows on demand."""
        cfg = self.config
        end = int(pos_BS.max()) + 1
        long = cfg.rope_scaling is not None and end > cfg.rope_scaling.original_max_position_embeddings
        table = self._rope_tables.get(long)
        if table is None or len(table[0]) < end:           # grow by doubling, at least 256 positions
            length = max(end, 256, 0 if table is None else 2 * len(table[0]))
            cos, sin = rope_cos_sin(cfg, torch.arange(length), long=long)
            sin[:, :cfg.head_dim // 2].neg_()
            table = self._rope_tables[long] = (cos.to(self.device, self.dtype), sin.to(self.device, self.dtype))
        return table[0][pos_BS], table[1][pos_BS]

    def attention_mask(self, cache: KVCache, L0: int, L1: int, padded: bool) -> torch.Tensor | None:
        """None (no mask) without padding when the one new token of each sequence sees every
        slot, or when the new tokens fill an empty cache (a prompt: causal, `_attention`)."""
        if not padded and (L0 == 0 or (L1 - L0 == 1 and cache.unpadded)):
            return None
        return super().attention_mask(cache, L0, L1, padded)

    def attention_block(self, i, w, x_BSM, cache, cos_BSD, sin_BSD, allowed_BSL, L1):
        block = _compiled_region(_attention_block, self.kernel.native(x_BSM.shape[0]) is not None) \
            if self.compile_decode and allowed_BSL is None and x_BSM.shape[1] == 1 else _attention_block
        return block(self.config, w.attn_norm, w.attn, x_BSM, cache.k[i], cache.v[i], cos_BSD, sin_BSD,
                     allowed_BSL, L1, self.kernel)

    @torch.no_grad()
    def forward(self, tokens_BS, cache, valid_BS=None, last_only=False):
        """`Decoder.forward`; with compile_decode, one new token of one unpadded sequence (every
        decode step of a single prompt) runs as the compiled `_token_step`, with the same cache
        bookkeeping and the route observer called after it."""
        tokens_BS = torch.as_tensor(tokens_BS, dtype=torch.long, device=self.device)
        if (not self.compile_decode or self._layers is None or tokens_BS.shape != (1, 1)
                or valid_BS is not None or cache.batch != 1 or not cache.unpadded or cache.length >= cache.max_len
                or not 0 <= int(tokens_BS) < self.config.vocab_size):
            with self._decode_threads(tokens_BS.shape):
                return super().forward(tokens_BS, cache, valid_BS, last_only)   # (which also raises on bad input)
        L1 = cache.length + 1
        cache.valid_BL[:, L1 - 1] = True
        cos_11D, sin_11D = self.rope(cache.next_pos_B[:, None])
        logits_11V, routes = _compiled_region(_token_step, self.kernel.native(1) is not None)(
            self.config, tuple(self._layers), self.final_norm, self.lm_head_VM, self.lm_head_b, self.embed_VM[tokens_BS],
            tuple(cache.k), tuple(cache.v), cos_11D, sin_11D, L1, self.kernel)
        cache.length = L1
        cache.next_pos_B += 1
        if self.route_observer is not None:
            for i, (ids_1K, weights_1K) in zip(self._moe_layers, routes):
                self.route_observer(i, ids_1K, weights_1K)
        return logits_11V

    torch_ops_on_one_thread = True
    """Whether an eager decode step whose products are native ops runs torch's own operations on
    one thread (`cpu_kernels.torch_ops_on_one_thread`)."""

    def _decode_threads(self, shape_BS: torch.Size) -> contextlib.AbstractContextManager:
        """`cpu_kernels.torch_ops_on_one_thread` for a decode step (one new token per sequence)
        whose products are native ops, else nothing."""
        if self.torch_ops_on_one_thread and shape_BS[1] == 1 and self.kernel.native(shape_BS[0]) is not None:
            return cpu_kernels.torch_ops_on_one_thread()
        return contextlib.nullcontext()

    def run_ffns(self, i, items, layer_tokens):
        if self.expert_fn is _fast_expert_fn:
            return fast_ffns([(w, x_TM) for _, w, x_TM in items], self.kernel)
        return super().run_ffns(i, items, layer_tokens)

    def moe(self, i: int, w: MoEWeights, x_TM: torch.Tensor) -> torch.Tensor:
        """One token: its routed experts added in ascending expert order. With the plain expert
        function and stacked experts: `token_experts`, then the shared one; else the layer's routed
        experts and its shared one in one `run_ffns` call (the engine's `run_layer`). More tokens:
        `_moe_tokens` (none: the reference's, which routes nothing)."""
        if x_TM.shape[0] != 1:
            return self._moe_tokens(i, w, x_TM) if x_TM.shape[0] else super().moe(i, w, x_TM)
        ids_1K, weights_1K = self.route(i, w, x_TM)
        shared = [("shared", w.shared, x_TM)] if w.shared is not None else []
        if isinstance(w, StackedMoEWeights) and self.expert_fn is _fast_expert_fn:
            y_1M = token_experts(w, x_TM, ids_1K, weights_1K, self.kernel)
            return y_1M + gate_shared(w, x_TM, self.run_ffns(i, shared, 1)[0]) if shared else y_1M
        order = sorted((e, k) for k, e in enumerate(ids_1K[0].tolist()))
        ys = self.run_ffns(i, [(e, w.experts[e], x_TM) for e, _ in order] + shared, 1)
        y_1M = _weighted_sum(order, ys, weights_1K, x_TM.dtype)
        return y_1M + gate_shared(w, x_TM, ys[-1]) if shared else y_1M

    def _moe_tokens(self, i: int, w: MoEWeights, x_TM: torch.Tensor) -> torch.Tensor:
        """`Decoder.moe` of several tokens (a prompt) with the routed (token, expert) pairs sorted
        by expert once (`ExpertGroups`): one gather puts each expert's tokens in one contiguous
        block, every routed and shared FFN goes to one `run_ffns` call, and the weighted outputs
        come back to their tokens with one more gather, each token's terms added in ascending
        expert order as the reference's index_add_ does (so the same values): a few operations a
        layer instead of several per expert."""
        ids_TK, weights_TK = self.route(i, w, x_TM)
        groups = ExpertGroups.of(ids_TK, weights_TK, len(w.experts))
        x_NM = x_TM.index_select(0, groups.token_N)
        items = [(e, w.experts[e], x_NM[a:b]) for e, a, b in groups.blocks]
        if w.shared is not None:
            items.append(("shared", w.shared, x_TM))
        ys = self.run_ffns(i, items, x_TM.shape[0])
        routed = ys[:len(groups.blocks)]
        y_NM = (torch.cat(routed) if len(routed) > 1 else routed[0]) * groups.weight_N[:, None].to(x_TM.dtype)
        y_TM = groups.combine(y_NM)
        return y_TM if w.shared is None else y_TM + gate_shared(w, x_TM, ys[-1])

    def lm_head(self, x_BSM: torch.Tensor) -> torch.Tensor:
        return product(x_BSM, self.lm_head_VM, self.lm_head_b, self.kernel)

    def generation_mode(self) -> contextlib.AbstractContextManager:
        """Inference mode (less per-operation overhead) with the plain expert function; it is
        thread-local, and a plugged-in expert_fn may update tensors in place on its own threads,
        which inference tensors forbid there."""
        return torch.inference_mode() if self.expert_fn is _fast_expert_fn else torch.no_grad()
