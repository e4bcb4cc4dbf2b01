"""Micro-benchmarks that fit the engine's cost model on this machine (scheinfer.md 9.1 item 4).

* CPU lane: FFN slices of several widths at several row counts n, timed as the engine runs them
  (`fast_decode.fast_ffn` with the engine's kernel, down stored as [F, M] rows); per n a
  least-squares line t = alpha + s_per_mac(n) * MACs
  (fit_linear, r^2 kept).
* Memory bandwidth: a large tensor copy (reported, explains the GEMV regime).
* GPU lane and host->device copies: with CUDA, the same FFN slices on the GPU and pinned H2D
  copies of several sizes. Without CUDA the GPU lanes are emulated on CPU tensors (engine.py), so
  what is fitted is what those lanes run - CPU compute and a host memcpy - and the result says
  `gpu_emulated=True`.
Medians over `reps` repeats after one warm-up; no constant is assumed.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field

import torch

from impl.common.costmodel import LinearFit, fit_linear

from .fast_decode import KernelChoice, ProbeShape, choose_kernel, fast_ffn
from .layers import ExpertWeights
from .partition import CostModel, PerRowLinear

__all__ = ["Calibration", "calibrate"]


@dataclass
class Calibration:
    cost: CostModel
    fits: dict[str, LinearFit]
    mem_bytes_per_s: float
    device: str
    gpu_emulated: bool
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"cost": json.loads(self.cost.to_json()),
                "fits": {k: dataclasses.asdict(f) for k, f in self.fits.items()},
                "mem_bytes_per_s": self.mem_bytes_per_s, "device": self.device,
                "gpu_emulated": self.gpu_emulated, "settings": self.settings}


def _median_time(fn, reps: int, sync=None) -> float:
    fn()
    if sync:
        sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _fit_ffn(device, dtype, hidden, widths, rows, reps, sync, name, fits, kernel=None) -> PerRowLinear:
    g = torch.Generator().manual_seed(0)
    wmax = max(widths)
    gate, up, down_FM = (torch.randn(s, generator=g).to(device=device, dtype=dtype)
                         for s in ((wmax, hidden), (wmax, hidden), (wmax, hidden)))
    w = ExpertWeights(gate, up, down_FM.t())
    per_mac, alphas = [], []
    for n in rows:
        x = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
        macs = [3.0 * n * hidden * f for f in widths]
        ts = [_median_time(lambda f=f: fast_ffn(w.slice(0, f), x, kernel), reps, sync) for f in widths]
        fit = fit_linear(macs, ts)
        fits[f"{name}_n{n}"] = fit
        per_mac.append(max(fit.beta, 1e-18))
        alphas.append(max(fit.alpha, 0.0))
    return PerRowLinear(tuple(rows), tuple(per_mac), statistics.median(alphas))


def calibrate(hidden: int = 256, widths=(128, 256, 512, 1024), rows=(1, 4, 16, 64), reps: int = 5,
              dtype: torch.dtype = torch.float32, copy_sizes=(1 << 16, 1 << 18, 1 << 20, 1 << 22),
              device: str | None = None, kernel: str | None = None) -> Calibration:
    """Fit a CostModel for the engine's lanes on this machine (module doc); `kernel`: the CPU
    lane's (a KernelChoice, e.g. the engine's, or `fast_decode.choose_kernel`'s for FFN by FFN
    products at Mixtral's width ratio)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    fits: dict[str, LinearFit] = {}
    choice = choose_kernel(kernel, mode="ffns", shape=ProbeShape.at_hidden(hidden)) \
        if dtype == torch.float32 else KernelChoice("torch", "only", note="not float32")
    cpu = _fit_ffn("cpu", dtype, hidden, widths, rows, reps, None, "cpu", fits, choice)
    gpu = _fit_ffn(dev, dtype, hidden, widths, rows, reps, sync, "gpu", fits) if cuda else cpu
    if not cuda:
        fits.update({k.replace("cpu", "gpu", 1): v for k, v in list(fits.items()) if k.startswith("cpu")})
    # host -> device (or host memcpy when emulated)
    sizes, ts = [], []
    for nb in copy_sizes:
        src = torch.empty(nb // 4, dtype=torch.float32)
        if cuda:
            src = src.pin_memory()
        dst = torch.empty(nb // 4, dtype=torch.float32, device=dev)
        ts.append(_median_time(lambda: dst.copy_(src, non_blocking=cuda), reps, sync))
        sizes.append(nb)
    h2d = fit_linear(sizes, ts)
    fits["h2d"] = h2d
    big = torch.empty(1 << 24, dtype=torch.float32)
    mem = 2 * big.numel() * 4 / _median_time(lambda: big.clone(), max(2, reps // 2))
    cost = CostModel(cpu, gpu, h2d_bytes_per_s=1.0 / max(h2d.beta, 1e-15), h2d_alpha_s=max(h2d.alpha, 0.0),
                     source=f"calibrated:{dev.type}{'(emulated gpu)' if not cuda else ''}")
    return Calibration(cost, fits, mem, str(dev), not cuda,
                       {"hidden": hidden, "widths": list(widths), "rows": list(rows), "reps": reps,
                        "dtype": str(dtype), "threads": torch.get_num_threads(),
                        "cpu_kernel": choice.as_dict()})
