"""The Python stages of the one-command GPU evidence run (`workflows/scripts/gpu_check.sh` drives
them; `--dry-run` runs every one of them without a GPU, the device side emulated on the CPU and
labelled so).

    python -m impl.experiments.gpu_check device  --out a_device.json [--dry-run]
    python -m impl.experiments.gpu_check profile --out d_profile.yaml --hardware-out d_scheinfer_hardware.yaml [--dry-run]
    python -m impl.experiments.gpu_check record  --dir OUT --stages STAGES.tsv --out e_record.json [--dry-run]

* `device`: the GPU, its driver, torch / CUDA / cuDNN / NCCL versions, the CPU, the llama.cpp
  build the bench will load (`baselines.llamacpp.runner.llama_cpp_info`), and host<->device
  bandwidth (pinned and pageable) with device-to-device copy, each the median of timed copies of
  one size (CUDA events).
* `profile`: a hardware profile for the sim tiers, two files. `d_profile.yaml` is an
  `impl.common.costmodel.HardwareProfile` (topology 1x1; one GPU has no collectives to fit):
  least-squares alpha-beta models of float32 and bfloat16 GEMMs on the device ('gemm' is the one
  the FSMoE / HierMoE sims read), host->device and device->host copies, device memory copy, and
  the CPU's GEMM and memory copy. `d_scheinfer_hardware.yaml` is the same machine as a hardware
  class of the ScheInfer sim tier (`impl.experiments.scheinfer.sim.load_hardware` reads it):
  sustained rates taken from the largest measured size of each sweep, alphas from the fits.
* `record`: one run record (`impl.common.records`) of the whole run: the device, versions, the
  bench's per-system tok/s (its metrics), ScheInfer's speed over each other system (medians of
  this run), how the GPU budget bound each system, the GPU tests' outcomes, the profile's models
  and each stage's exit status and time; prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

from impl.common import cli

__all__ = ["COPY_KINDS", "copy_seconds", "device_report", "build_profile", "hardware_class", "run_record", "main"]

MiB = 1 << 20
COPY_KINDS = ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "d2d", "host")
USAGE_EXIT = 2


# ----------------------------------------------------------------------------------- probes

def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def copy_seconds(kind: str, nbytes: int, reps: int = 5) -> float:
    """Median seconds of one copy of `nbytes` of `kind` (COPY_KINDS): host<->device pinned or
    pageable, device->device, host->host; timed with CUDA events on the device, with the host
    clock for 'host' and whenever CUDA is absent (then every kind is a host memcpy)."""
    import torch
    if kind not in COPY_KINDS:
        raise ValueError(f"copy kind {kind!r} is not allowed; expected one of {', '.join(COPY_KINDS)}")
    n = max(1, nbytes // 4)
    cuda = _cuda() and kind != "host"
    if not cuda:
        src, dst = torch.ones(n), torch.empty(n)
    else:
        host = torch.ones(n, pin_memory=kind.endswith("_pinned"))
        dev = torch.ones(n, device="cuda")
        src, dst = {"h2d": (host, dev), "d2h": (dev, host), "d2d": (dev, torch.empty_like(dev))}[kind[:3]]
    non_blocking = kind.endswith("_pinned")
    times = []
    for r in range(reps + 1):                        # the first copy warms up
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            dst.copy_(src, non_blocking=non_blocking)
            end.record()
            end.synchronize()
            t = begin.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if r:
            times.append(t)
    return statistics.median(times)


def _nvidia_smi() -> dict[str, str]:
    fields = "name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current,clocks.max.sm"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return {"error": f"nvidia-smi: {type(e).__name__}: {e}"}
    return dict(zip(fields.split(","), (v.strip() for v in out.split(","))))


def _nccl_version() -> str | None:
    import torch
    try:
        v = torch.cuda.nccl.version()
    except Exception:                            # noqa: BLE001 - no NCCL in this build
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _llamacpp() -> dict[str, Any]:
    try:
        from baselines.llamacpp.runner import llama_cpp_info
        return llama_cpp_info()
    except Exception as e:                       # noqa: BLE001 - reported, the run goes on
        return {"error": f"{type(e).__name__}: {e}"}


def device_report(sizes_mib: int = 256, reps: int = 5) -> dict[str, Any]:
    """Stage a (module doc)."""
    import numpy as np
    import torch
    from impl.common.records import collect_env

    cuda = _cuda()
    report: dict[str, Any] = {"emulated": not cuda, "env": collect_env(), "numpy": np.__version__,
                              "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                              "cpu_threads": torch.get_num_threads(), "llama_cpp": _llamacpp()}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        report["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                         "total_memory_bytes": total, "free_memory_bytes": free,
                         "cudnn": torch.backends.cudnn.version(),
                         "nccl": _nccl_version(),
                         "nvidia_smi": _nvidia_smi()}
    nbytes = sizes_mib * MiB
    bw = {}
    for kind in COPY_KINDS if cuda else ("host",):
        t = copy_seconds(kind, nbytes, reps)
        bw[kind] = {"bytes": nbytes, "median_s": t, "GB_per_s": nbytes / t / 1e9}
    report["bandwidth"] = {"note": "bytes copied once per copy / median time (d2d and host copies read and write "
                                   "each byte: their traffic is twice this)"
                                   + ("" if cuda else "; NO CUDA: only a host memcpy (emulated run)"), **bw}
    return report


# ----------------------------------------------------------------------------------- profile

def _sweep_copy(kind: str, sizes: list[int], reps: int) -> dict[str, list]:
    return {"bytes": sizes, "median_ms": [1e3 * copy_seconds(kind, n, reps) for n in sizes]}


def build_profile(dry_run: bool, command: str) -> tuple[Any, dict[str, Any]]:
    """Stage d's measurements: (HardwareProfile, ScheInfer hardware class mapping)."""
    import datetime as dt

    import torch
    from impl.common.calibrate import measure_gemm
    from impl.common.costmodel import HardwareProfile, LinearModel, fit_linear
    from impl.common.records import collect_env, git_info

    cuda = _cuda() and not dry_run
    dev = "cuda" if cuda else "cpu"
    if cuda:
        gemm_tokens, gemm_dim, copy_sizes, reps = [512, 1024, 2048, 3072, 4096], 4096, [m * MiB for m in (4, 16, 64, 256)], 5
    else:
        gemm_tokens, gemm_dim, copy_sizes, reps = [32, 64, 128], 256, [m * MiB for m in (1, 4, 8)], 3
    cpu_tokens, cpu_dim = ([64, 128, 256, 512], 1024) if cuda else ([16, 32, 64], 256)
    series = {
        "gemm": measure_gemm(gemm_tokens, gemm_dim, reps, 2, 3, dev),
        "gemm_bf16": measure_gemm(gemm_tokens, gemm_dim, reps, 2, 3, dev, torch.bfloat16),
        "cpu_gemm": measure_gemm(cpu_tokens, cpu_dim, 3, 1, 2, "cpu"),
        "cpu_gemm_bf16": measure_gemm(cpu_tokens, cpu_dim, 3, 1, 2, "cpu", torch.bfloat16),
    }
    kinds = ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2d") if cuda else ()
    for kind in (*kinds, "host"):
        series[kind] = _sweep_copy(kind, copy_sizes, reps)
    where = torch.cuda.get_device_name(0) if cuda else f"the CPU ({torch.get_num_threads()} threads)"
    notes = {"gemm": f"float32 torch.matmul [tokens, {gemm_dim}] @ [{gemm_dim}, {gemm_dim}] on {where}; work = "
                     "tokens*M*H multiply-accumulates (TF32 off, torch's default)",
             "gemm_bf16": f"as gemm, bfloat16 operands, on {where}",
             "cpu_gemm": f"float32 torch.matmul [tokens, {cpu_dim}] @ [{cpu_dim}, {cpu_dim}] on the CPU, "
                         f"{torch.get_num_threads()} threads",
             "cpu_gemm_bf16": "as cpu_gemm, bfloat16 operands",
             "h2d_pinned": "host->device copy from pinned memory, x = bytes", "h2d_pageable": "host->device copy from "
             "pageable memory, x = bytes", "d2h_pinned": "device->host copy into pinned memory, x = bytes",
             "d2d": "device memory copy, x = bytes copied (each read once and written once)",
             "host": "host memcpy (torch copy_), x = bytes copied (each read once and written once)"}
    compute = {}
    for name, pts in series.items():
        x = pts.get("work", pts.get("bytes"))
        fit = fit_linear(x, pts["median_ms"])
        compute[name] = LinearModel.from_fit(fit, work_unit="mac" if "work" in pts else "byte", note=notes[name])
    env = collect_env()
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    label = "EMULATED (no GPU: every 'device' number is the CPU's)" if not cuda else where
    profile = HardwareProfile(
        name=_slug(f"measured-{where if cuda else 'cpu-emulated'}"), topology="1x1",
        source=f"measured with `{command}` on {env['hostname']}, {now}",
        description=f"one GPU and its host, measured: {label}",
        notes="Compute models only: one GPU has no collectives. Per point the median of repeated timed calls "
              "(CUDA events or a synchronised host clock); 'gemm' is what the FSMoE / HierMoE sim tiers read.",
        compute=compute,
        provenance={"host": env["hostname"], "platform": env["platform"], "python": env["python"],
                    "torch": env["torch"], "cuda": env["cuda"], "gpus": env["gpus"], "cpu_model": env["cpu_model"],
                    "date": now, "command": command, "git_sha": git_info()["sha"], "emulated": not cuda},
        measurements=series)
    return profile, hardware_class(series, cuda, label, profile.source)


def hardware_class(series: dict[str, dict], cuda: bool, label: str, source: str) -> dict[str, Any]:
    """The ScheInfer sim's hardware class of the measured machine (keys of
    impl.experiments.scheinfer.sim.HardwareClass): sustained rates at the largest size of each
    sweep, per-call alphas from the fits."""
    import torch
    from impl.common.costmodel import fit_linear

    def rate(name, per):        # per: work units per point -> flop or bytes
        pts = series[name]
        x = pts.get("work", pts.get("bytes"))
        return per * x[-1] / (pts["median_ms"][-1] / 1e3)

    def alpha_s(name):
        pts = series[name]
        return max(fit_linear(pts.get("work", pts.get("bytes")), pts["median_ms"]).alpha, 0.0) / 1e3

    if cuda:
        free, total = torch.cuda.mem_get_info()
        gpu_mem, reserve = float(total), float(total - free)
        h2d = fit_linear(series["h2d_pinned"]["bytes"], series["h2d_pinned"]["median_ms"])
        h2d_rate, h2d_alpha = 1e-3 / max(h2d.beta, 1e-18), max(h2d.alpha, 0.0) / 1e3
        gpu_bw = rate("d2d", 2.0)
    else:
        gpu_mem, reserve, h2d_rate, h2d_alpha = 0.0, 0.0, rate("host", 1.0), alpha_s("host")
        gpu_bw = rate("host", 2.0)
    return {"description": f"measured: {label}. gpu_reserve_bytes is what the device had in use after CUDA "
                           "start-up (context, other processes); 16-bit rates are bfloat16 GEMMs",
            "source": source, "gpu_mem_bytes": gpu_mem, "gpu_reserve_bytes": reserve,
            "gpu_flops": rate("gemm_bf16", 2.0), "gpu_bytes_per_s": gpu_bw, "gpu_alpha_s": alpha_s("gemm_bf16"),
            "cpu_flops": rate("cpu_gemm_bf16", 2.0), "cpu_bytes_per_s": rate("host", 2.0),
            "cpu_alpha_s": alpha_s("cpu_gemm_bf16"), "h2d_bytes_per_s": h2d_rate, "h2d_alpha_s": h2d_alpha}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ----------------------------------------------------------------------------------- record

def _junit(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"{path.name}: {e}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for c in suite.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = c.find(tag)
            if el is not None:
                outcome, message = tag, (el.get("message") or "")[:300]
        cases.append({"test": f"{c.get('classname')}::{c.get('name')}", "outcome": outcome,
                      "seconds": float(c.get("time") or 0), **({"message": message} if message else {})})
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "cases": cases}


def _stages(path: Path | None) -> list[dict[str, Any]]:
    """The stage table gpu_check.sh writes: name, exit status, seconds, limit per line (TSV);
    ValueError naming --stages and the line that is not one."""
    out = []
    if path is not None and path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--stages {path}: cannot be read: {e}") from None
        for i, line in enumerate(text.splitlines(), 1):
            try:
                name, rc, seconds, limit = line.split("\t")[:4]
                out.append({"stage": name, "exit_status": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                            "timed_out": int(rc) in (124, 137)})
            except ValueError:
                raise ValueError(f"--stages {path}: line {i} is not NAME<TAB>EXIT<TAB>SECONDS<TAB>LIMIT: "
                                 f"{line[:60]!r}") from None
    return out


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(path) if path.is_file() else None
    except Exception as e:                       # noqa: BLE001 - a broken stage output is reported, not fatal
        return {"error": f"{path.name}: {type(e).__name__}: {e}"}


def run_record(out_dir: Path, stages: list[dict[str, Any]], dry_run: bool, command: list[str]) -> dict:
    """Stage e (module doc)."""
    import yaml
    from impl.common.records import make_record, read_record

    device = _read(out_dir / "a_device.json", lambda p: json.loads(p.read_text())) or {}
    bench = _read(out_dir / "c_bench.json", read_record) or {}
    profile = _read(out_dir / "d_profile.yaml", lambda p: yaml.safe_load(p.read_text())) or {}
    hw = _read(out_dir / "d_scheinfer_hardware.yaml", lambda p: yaml.safe_load(p.read_text())) or {}
    tests = _junit(out_dir / "b_pytest.xml")
    gpu = (device.get("gpu") or {}).get("name")
    medians = {k: v["median"] for k, v in (bench.get("metrics") or {}).items() if isinstance(v, dict) and "median" in v}
    bench_extra = bench.get("extra") or {}
    extra = {
        "dry_run": dry_run,
        "what": "GPU evidence run: versions and bandwidth (a), GPU tests (b), ScheInfer vs Fiddler vs llama.cpp "
                "partially offloaded under one GPU budget (c), hardware profile (d)"
                + (" -- DRY RUN: no GPU, device lanes emulated on the CPU" if dry_run else ""),
        "device": {"gpu": device.get("gpu"), "bandwidth": device.get("bandwidth"), "llama_cpp": device.get("llama_cpp"),
                   "emulated": device.get("emulated")},
        "versions": {k: device.get(k) for k in ("torch", "torch_cuda", "numpy")},
        "tok_s_medians": medians,
        "ratios": bench_extra.get("ratios"),
        "budget": bench_extra.get("budget"),
        "weights_file_type": bench_extra.get("weights_file_type"),
        "popularity": {k: v for k, v in (bench_extra.get("popularity") or {}).items() if k != "counts"} or None,
        "bench_config": bench.get("config"),
        "gpu_tests": tests,
        "profile": {"name": profile.get("name"), "compute": profile.get("compute")} if profile else None,
        "scheinfer_hardware_class": hw or None,
        "stages": stages,
        "files": sorted(p.name for p in out_dir.iterdir() if p.is_file()),
    }
    return make_record(experiment="gpu_check", system=bench.get("system", "none"),
                       tier="cluster" if gpu and not dry_run else "emu",
                       topology={"name": "1x1", "device": gpu or "cpu (emulated)"}, model=bench.get("model", {}),
                       config={"dry_run": dry_run, "bench": bench.get("config")}, metrics=bench.get("metrics") or {},
                       seed=0, command=command, extra=extra)


def _table(record: dict) -> list[str]:
    ex = record["extra"]
    lines = [f"device: {record['topology']['device']}, torch {ex['versions']['torch']}, "
             f"CUDA {ex['versions']['torch_cuda']}, tier {record['tier']}"]
    for s in ex["stages"]:
        lines.append(f"  stage {s['stage']:<10} exit {s['exit_status']:>3}  {s['seconds']:>4d}/{s['limit_s']} s"
                     + ("  TIMED OUT" if s["timed_out"] else ""))
    t = ex["gpu_tests"]
    if t and "tests" in t:
        lines.append(f"  gpu tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped")
    if ex["tok_s_medians"]:
        lines.append("  median tok/s (phase/system/prompt):")
        lines += [f"    {k:<58} {v:10.2f}" for k, v in sorted(ex["tok_s_medians"].items())]
    for ph, by_prompt in (ex["ratios"] or {}).items():
        if ph == "definition":
            continue
        for prompt, others in by_prompt.items():
            lines.append(f"  scheinfer / other, {ph}, {prompt}: "
                         + ", ".join(f"{o} {r:.2f}x" for o, r in others.items()))
    return lines


# ----------------------------------------------------------------------------------- CLI

def _directory(text: str) -> str:
    if not text.strip() or not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m impl.experiments.gpu_check", description=cli.describe(__doc__))
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("device", help="stage a: device, versions, bandwidth")
    d.add_argument("--out", required=True, type=cli.output_path)
    d.add_argument("--dry-run", action="store_true")
    d.add_argument("--mib", type=cli.number(int, ge=1, le=1 << 16), default=256, help="MiB per timed copy")
    p = sub.add_parser("profile", help="stage d: hardware profile for the sim tiers")
    p.add_argument("--out", required=True, type=cli.output_path, help="HardwareProfile YAML")
    p.add_argument("--hardware-out", required=True, type=cli.output_path, help="ScheInfer sim hardware class YAML")
    p.add_argument("--dry-run", action="store_true")
    r = sub.add_parser("record", help="stage e: the run record of the whole run")
    r.add_argument("--dir", required=True, type=_directory, help="the folder the stages wrote")
    r.add_argument("--stages", default=None, type=cli.input_file,
                   help="stage statuses: name, exit status, seconds, limit (TSV)")
    r.add_argument("--out", required=True, type=cli.output_path)
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--command", default=None, help="the command line of the whole run, for the record")
    args = ap.parse_args(argv)
    command = shlex.join([sys.executable, "-m", "impl.experiments.gpu_check", *(argv or sys.argv[1:])])
    if args.cmd == "device":
        if not args.dry_run and not _cuda():
            print("error: no CUDA device; run with --dry-run to emulate", file=sys.stderr)
            return USAGE_EXIT
        rep = device_report(min(args.mib, 16) if args.dry_run else args.mib)
        Path(args.out).write_text(json.dumps(rep, indent=2, default=str) + "\n")
        gpu = rep.get("gpu", {})
        print(f"device: {gpu.get('name', 'none (emulated)')}, torch {rep['torch']}, CUDA {rep['torch_cuda']}, "
              f"driver {gpu.get('nvidia_smi', {}).get('driver_version', '-')}")
        for k, v in rep["bandwidth"].items():
            if isinstance(v, dict):
                print(f"  {k:<13} {v['GB_per_s']:8.2f} GB/s")
        print(f"  llama.cpp: {rep['llama_cpp']}")
        return 0
    if args.cmd == "profile":
        from impl.common.costmodel import load_profile, save_profile
        from impl.common.records import atomic_write_text
        from impl.experiments.scheinfer.sim import load_hardware
        import yaml
        profile, hw = build_profile(args.dry_run, command)
        save_profile(profile, args.out)
        name = profile.name.replace("measured-", "", 1)
        atomic_write_text(args.hardware_out, yaml.safe_dump({name: hw}, sort_keys=False, width=100))
        load_profile(args.out)                      # both files read back as their consumers read them
        load_hardware(args.hardware_out)
        print("\n".join(_profile_lines(profile, hw)))
        return 0
    from impl.common.records import write_record
    try:
        cmd = shlex.split(args.command) if args.command is not None else shlex.split(command)
        if not cmd:
            raise ValueError("names no command")
    except ValueError as e:
        return cli.fail(ap.prog + " record", f"--command {args.command!r}: {e}")
    try:
        stages = _stages(Path(args.stages) if args.stages else None)
    except ValueError as e:
        return cli.fail(ap.prog + " record", e)
    record = run_record(Path(args.dir), stages, args.dry_run, cmd)
    write_record(args.out, record)
    print("\n".join(_table(record)))
    return 0


def _profile_lines(profile, hw: dict) -> list[str]:
    from impl.common.costmodel import profile_summary
    return [*profile_summary(profile),
            "  scheinfer hardware class: " + ", ".join(f"{k}={v:.3g}" for k, v in hw.items() if isinstance(v, float))]


if __name__ == "__main__":
    raise SystemExit(main())
