"""Calibrate a hardware profile: time collectives per topology step and a GEMM sweep, fit
alpha-beta models by least squares, write a HardwareProfile YAML with provenance.

    python -m impl.common.calibrate --topology 1x4 --backend gloo --sizes 1M:8M:1M --repeats 5 \\
        --out results/profiles/local-1x4.yaml

`--launcher local` (default) spawns the topology's G ranks on this machine with the project's
launcher (gloo, CPU tensors); with `--emulate-rate RATE` they run on an emulated cluster
(`impl.common.emu_cluster`: one network namespace per node, each node's link shaped to RATE both
ways), and the profile's provenance records the network. `--launcher env` joins a job started by
torchrun / srun (one CLI process per rank; nccl with CUDA tensors, or gloo); rank 0 writes the
profile.

Method, per collective and step (flat, inter-1, intra-1, ...; see impl.common.costmodel):
* every rank takes part in its own group of the step, so all groups of a step run at once, as
  in a hierarchical AlltoAll;
* for each message size: `--warmup` untimed calls, then `--repeats` timed repeats, each started
  right after a world barrier and made of `--iters` back-to-back calls whose mean it records (as
  nccl-tests does, to smooth scheduler jitter); a repeat's time is the slowest rank's (the
  collective is done when its last rank is), the point's time the median over repeats;
* sizes follow nccl-tests: the per-rank AlltoAll send buffer, the AllGather output buffer, the
  AllReduce buffer, in float32 elements, rounded down to a whole number of elements per peer
  (at least one); the sizes actually moved are the ones fitted and recorded;
* steps whose groups hold a single rank are a local copy, not communication, and are skipped.
The GEMM sweep times torch.matmul of a [tokens, M] by [M, M] float32 product (work = tokens*M*M
multiply-accumulates, FSMoE's GEMM workload unit) in the calling process (rank 0 under `env`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import re
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass
from statistics import median
from typing import Any, Sequence

from . import cli
from .config import MAX_LOCAL_RANKS, MAX_REPEATS, MAX_SECONDS, MAX_WIDTH, check_host_memory
from .emu_cluster import NetworkConfig, check_network, emulated_cluster
from .costmodel import (HardwareProfile, LinearModel, fit_linear, parse_step, profile_summary, save_profile,
                        step_name, topology_steps)
from .launcher import require_job
from .records import collect_env, git_info
from .topology import Topology, TopologyError, get_topology

__all__ = ["CalibrationPlan", "parse_size", "parse_sizes", "step_group_size", "message_nbytes", "calibrate",
           "measure_collectives", "measure_gemm", "aggregate_repeats", "build_profile", "parse_args", "main", "COLLECTIVES",
           "R2_THRESHOLD", "PRESETS", "fit_warning", "poor_fits"]

COLLECTIVES = ("a2a", "allgather", "reducescatter", "allreduce")
# A fit below this r^2 is flagged in the profile (the model's note) and on screen: a linear model
# that explains little of the measured times should not silently drive a planner.
R2_THRESHOLD = 0.95
# FSMoE's profiling protocol (digest §2.3): 2^18 .. 24 * 2^18 float32 elements per collective, a
# GEMM of 512 .. 6,144 tokens with M = H = 1,024, five runs per point.
PRESETS = {"fsmoe": {"sizes": ["1M:24M:1M"], "collectives": "a2a,allgather,reducescatter,allreduce",
                     "gemm_tokens": "512:6144:512", "gemm_dim": 1024, "repeats": 5}}
FLOAT32_BYTES = 4
MAX_POINTS = 10_000          # sizes of one sweep
_SIZE_RE = re.compile(r"^(\d+)([KMG]?)$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


# ==========================================================================================
# sizes and plan
# ==========================================================================================
def parse_size(text: str) -> int:
    """'4096' -> 4096, '64K' -> 65536, '2M' -> 2097152 (binary multiples)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"size {text!r} is not allowed; allowed: an integer with an optional K, M or G suffix (e.g. 64K)")
    return int(m[1]) * _SIZE_FACTORS[m[2].upper()]


def parse_sizes(items: Sequence[str]) -> list[int]:
    """Comma- or space-separated sizes and ranges START:STOP:STEP (inclusive), sorted, unique
    (at most MAX_POINTS of them)."""
    out: set[int] = set()
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            if ":" in part:
                pieces = part.split(":")
                if len(pieces) != 3:
                    raise ValueError(f"size range {part!r} must be START:STOP:STEP, e.g. 1M:8M:1M")
                start, stop, step = (parse_size(p) for p in pieces)
                if step <= 0 or stop < start:
                    raise ValueError(f"size range {part!r}: needs STEP > 0 and STOP >= START")
                if (stop - start) // step + 1 > MAX_POINTS:
                    raise ValueError(f"size range {part!r} has {(stop - start) // step + 1} points; allowed: "
                                     f"<= {MAX_POINTS}")
                out.update(range(start, stop + 1, step))
            else:
                out.add(parse_size(part))
    if not out:
        raise ValueError("no sizes given")
    if min(out) <= 0:
        raise ValueError(f"sizes must be > 0, got {min(out)}")
    return sorted(out)


def step_group_size(topology: Topology, step: str) -> int:
    """Ranks per group of a step: U[i]/U[i-1] for inter-i, G/U[i] for intra-i (flat = G)."""
    kind, level = parse_step(step)
    if kind == "inter":
        if not 1 <= level < topology.D:
            raise ValueError(f"step {step!r} does not exist in topology {topology.name!r}; "
                             f"its steps: {', '.join(topology_steps(topology))}")
        return topology.U[level] // topology.U[level - 1]
    if not 0 <= level < topology.D:
        raise ValueError(f"step {step!r} does not exist in topology {topology.name!r}; "
                         f"its steps: {', '.join(topology_steps(topology))}")
    return topology.G // topology.U[level]


def message_nbytes(collective: str, requested: int, group_size: int) -> tuple[int, int]:
    """(float32 elements of this rank's input tensor, bytes in the nccl-tests convention) for a
    requested size: whole elements per peer for AlltoAll, AllGather and ReduceScatter, at least one."""
    if collective == "allreduce":
        elements = max(1, requested // FLOAT32_BYTES)
        return elements, elements * FLOAT32_BYTES
    per_peer = max(1, requested // (FLOAT32_BYTES * group_size))
    if collective in ("a2a", "reducescatter"):      # the per-rank input buffer
        return per_peer * group_size, per_peer * group_size * FLOAT32_BYTES
    if collective == "allgather":
        return per_peer, per_peer * group_size * FLOAT32_BYTES
    raise ValueError(f"collective {collective!r} is not allowed; allowed: {', '.join(COLLECTIVES)}")


@dataclass(frozen=True)
class CalibrationPlan:
    """What to measure: `tasks` are the (collective, step) pairs timed at every requested size
    (each rounded per step by `message_nbytes`); `skipped` the steps with one-rank groups."""

    topology: str
    sizes: tuple[int, ...]
    repeats: int
    warmup: int
    iters: int
    tasks: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...] = ()
    progress: bool = True

    @classmethod
    def build(cls, topology: str, sizes: Sequence[int], repeats: int, warmup: int, collectives: Sequence[str],
              steps: Sequence[str] | None = None, iters: int = 1, progress: bool = True) -> "CalibrationPlan":
        """Validate everything before any process starts."""
        try:
            topo = get_topology(topology)
        except TopologyError as e:
            raise ValueError(f"--topology: {e}") from None
        if repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {repeats}")
        if iters < 1:
            raise ValueError(f"--iters must be >= 1, got {iters}")
        if warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {warmup}")
        for c in collectives:
            if c not in COLLECTIVES:
                raise ValueError(f"--collectives: {c!r} is not allowed; allowed: {', '.join(COLLECTIVES)}")
        all_steps = topology_steps(topo)
        try:
            chosen = list(all_steps) if not steps else [_canonical(s, topo) for s in steps]
        except ValueError as e:
            raise ValueError(f"--steps: {e}") from None
        tasks, skipped = [], []
        for step in chosen:
            size = step_group_size(topo, step)
            if size == 1:
                skipped.append(step)
                continue
            for c in collectives:
                actual = {message_nbytes(c, s, size)[1] for s in sizes}
                if len(actual) < 2:
                    raise ValueError(f"--sizes: {c} over {step} ({size} ranks) needs >= 2 distinct sizes after "
                                     f"rounding to whole float32 elements per peer, got {sorted(actual)} bytes")
                tasks.append((c, step))
        if not tasks:
            raise ValueError(f"topology {topo.name!r}: every chosen step has groups of one rank; nothing to measure")
        return cls(topo.name, tuple(sizes), repeats, warmup, iters, tuple(tasks), tuple(skipped), progress)


def _canonical(step: str, topo: Topology) -> str:
    name = step_name(*parse_step(step))  # 'intra-0' -> 'flat'
    step_group_size(topo, name)  # raises for a step the topology lacks
    return name


# ==========================================================================================
# measurement (runs on every rank)
# ==========================================================================================
def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _collective_call(comm, collective: str, group, elements: int, device):
    """A zero-argument closure running one `collective` over `group` on a float32 tensor."""
    import torch

    x = torch.ones(elements, dtype=torch.float32, device=device)
    if collective == "a2a":
        splits = [elements // group.size] * group.size
        return lambda: comm.all_to_all(x, splits, splits, group)
    if collective == "allgather":
        return lambda: comm.all_gather_cat(x, group)
    if collective == "reducescatter":
        return lambda: comm.reduce_scatter(x, group)
    return lambda: comm.all_reduce(x, "sum", group)


def measure_collectives(comm, plan: CalibrationPlan) -> dict[str, Any] | None:
    """Per-rank body: time every (collective, step, size); rank 0 returns
    {'collective/step': {'nbytes': [...], 'times_ms': [rank][size][repeat]}}, other ranks None."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if comm.backend == "nccl" else torch.device("cpu")
    mine: dict[str, dict[str, list]] = {}
    for collective, step in plan.tasks:
        group = comm.group(*parse_step(step))
        key = f"{collective}/{step}"
        mine[key] = {"nbytes": [], "times_ms": []}
        # untimed calls at the largest size first: connection set-up and buffer growth happen here
        prime = _collective_call(comm, collective, group, message_nbytes(collective, plan.sizes[-1], group.size)[0], device)
        for _ in range(max(1, plan.warmup)):
            prime()
        for requested in plan.sizes:
            elements, nbytes = message_nbytes(collective, requested, group.size)
            call = _collective_call(comm, collective, group, elements, device)
            for _ in range(plan.warmup):
                call()
            _sync(device)
            times = []
            for _ in range(plan.repeats):
                comm.barrier()
                t0 = time.perf_counter()
                for _ in range(plan.iters):
                    call()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3 / plan.iters)
            mine[key]["nbytes"].append(nbytes)
            mine[key]["times_ms"].append(times)
            if plan.progress and comm.rank == 0:
                print(f"[calibrate] {key:<18} {nbytes:>12d} B  median {median(times):9.4f} ms (rank 0)",
                      file=sys.stderr, flush=True)
    gathered = comm.all_gather_object(mine)
    if comm.rank != 0:
        return None
    return {key: {"nbytes": gathered[0][key]["nbytes"], "times_ms": [g[key]["times_ms"] for g in gathered]}
            for key in mine}


def aggregate_repeats(times_ms_rank_size_repeat: Sequence[Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """Per size: each repeat's slowest rank, then median / min / max over repeats."""
    n_sizes = len(times_ms_rank_size_repeat[0])
    out: dict[str, list[float]] = {"median_ms": [], "min_ms": [], "max_ms": []}
    for s in range(n_sizes):
        per_rank = [rank[s] for rank in times_ms_rank_size_repeat]
        if len({len(r) for r in per_rank}) != 1:
            raise ValueError(f"size #{s}: ranks report different numbers of repeats")
        slowest = [max(vals) for vals in zip(*per_rank)]
        out["median_ms"].append(median(slowest))
        out["min_ms"].append(min(slowest))
        out["max_ms"].append(max(slowest))
    return out


def measure_gemm(tokens: Sequence[int], dim: int, repeats: int, warmup: int, iters: int = 1,
                 device: str = "cpu", dtype=None) -> dict[str, list]:
    """Median over repeats (each the mean of `iters` calls) of a [t, dim] @ [dim, dim] matmul
    (float32 unless `dtype` names another torch dtype) per token count t; work = t * dim * dim
    multiply-accumulates."""
    import torch

    dev = torch.device(device)
    dtype = dtype or torch.float32
    weight = torch.randn(dim, dim, dtype=torch.float32, device=dev).to(dtype)
    work, med = [], []
    for t in tokens:
        x = torch.randn(t, dim, dtype=torch.float32, device=dev).to(dtype)
        for _ in range(warmup):
            torch.matmul(x, weight)
        _sync(dev)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.matmul(x, weight)
            _sync(dev)
            times.append((time.perf_counter() - t0) * 1e3 / iters)
        work.append(t * dim * dim)
        med.append(median(times))
    return {"work": work, "median_ms": med}


# ==========================================================================================
# profile
# ==========================================================================================
def build_profile(name: str, plan: CalibrationPlan, comm_results: dict[str, Any], gemm: dict[str, list] | None,
                  gemm_note: str, provenance: dict[str, Any]) -> HardwareProfile:
    """Fit every measured series and assemble the profile (measured points kept beside the fits)."""
    comm_models, measurements = {}, {}
    for key, series in comm_results.items():
        collective, step = key.split("/")
        agg = aggregate_repeats(series["times_ms"])
        fit = fit_linear(series["nbytes"], agg["median_ms"])
        comm_models[(collective, step)] = LinearModel.from_fit(fit, note=fit_warning(key, fit.r2) or "")
        measurements[key] = {"nbytes": list(series["nbytes"]), **agg}
    compute = {}
    if gemm is not None:
        fit = fit_linear(gemm["work"], gemm["median_ms"])
        warning = fit_warning("gemm", fit.r2)
        compute["gemm"] = LinearModel.from_fit(fit, work_unit="mac",
                                               note=f"{warning} | {gemm_note}" if warning else gemm_note)
        measurements["gemm"] = {"work": list(gemm["work"]), "median_ms": list(gemm["median_ms"])}
    notes = [f"Measured on this machine by impl.common.calibrate: per point the median over {plan.repeats} "
             f"repeats (each the mean of {plan.iters} calls) of the slowest rank's time; sizes per rank in the nccl-tests convention (AlltoAll send buffer, AllGather "
             "output buffer, AllReduce buffer), float32 elements."]
    if plan.skipped:
        notes.append(f"Skipped steps (groups of one rank, no communication): {', '.join(plan.skipped)}.")
    return HardwareProfile(name=name, topology=plan.topology, source=provenance["source"],
                           description=f"calibrated on {provenance['host']} over {provenance['backend']}, "
                                       f"topology {plan.topology}",
                           notes="\n".join(textwrap.fill(n, width=100) for n in notes), comm=comm_models, compute=compute,
                           provenance={k: v for k, v in provenance.items() if k != "source"},
                           measurements=measurements)


def fit_warning(key: str, r2: float) -> str | None:
    """The flag a poor fit carries (None for a fit at or above `R2_THRESHOLD`)."""
    if r2 >= R2_THRESHOLD:
        return None
    return (f"POOR FIT: {key} r^2 = {r2:.4g} < {R2_THRESHOLD} (times barely follow a line in the size; "
            "repeat with more --repeats / --iters or larger sizes before trusting predictions)")


def poor_fits(profile: HardwareProfile) -> list[str]:
    """Every flagged model of a profile, one line each."""
    models = [m for m in profile.comm.values()] + list(profile.compute.values())
    return [m.note.split(" | ")[0] for m in models if m.note.startswith("POOR FIT")]


def _provenance(backend: str, world_size: int, command: str) -> dict[str, Any]:
    """How a profile was measured: the run records' environment and git fields, in the profile's keys."""
    env = collect_env()
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    host = env["hostname"]
    return {"source": f"measured with `{command}` on {host}, {now}", "host": host, "platform": env["platform"],
            "python": env["python"], "torch": env["torch"], "backend": backend, "world_size": world_size,
            "date": now, "command": command, "git_sha": git_info()["sha"]}


# ==========================================================================================
# entry points
# ==========================================================================================
def calibrate(plan: CalibrationPlan, *, launcher: str = "local", backend: str = "gloo", timeout_s: float = 120.0,
              deadline_s: float = 600.0, network: NetworkConfig | None = None) -> tuple[dict[str, Any] | None, dict]:
    """Run the collective sweep; returns (rank 0's series (None on the other ranks under `env`),
    where the ranks ran: the emulated network's description under `local`)."""
    topo = get_topology(plan.topology)
    if launcher == "local":
        from .launcher import launch

        with emulated_cluster(topo, network) as cluster:
            results = launch(measure_collectives, topo.G, args=(plan,), topology=topo, timeout_s=timeout_s,
                             deadline_s=deadline_s, cluster=cluster)
            return results[0], cluster.describe()
    from .launcher import init_from_env

    import torch.distributed as dist

    comm = init_from_env(topo, timeout_s=timeout_s)
    try:
        if comm.backend != backend:
            raise ValueError(f"--backend {backend} requested, but the job initialised {comm.backend!r}")
        return measure_collectives(comm, plan), {"launcher": "env", "backend": comm.backend}
    finally:
        dist.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m impl.common.calibrate", description=cli.describe(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help="topology preset or NxG (e.g. 1x4, 2x2); G ranks are used")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a paper's profiling protocol (fsmoe: 2^18..24*2^18 floats per collective, every "
                        "collective, GEMM 512..6144 tokens at M = H = 1024, 5 repeats); explicit flags override it")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"),
                   help="torch.distributed backend (nccl only with --launcher env)")
    p.add_argument("--launcher", default="local", choices=("local", "env"),
                   help="local: spawn G ranks here; env: join a torchrun / srun job")
    p.add_argument("--sizes", nargs="+", default=["1M:8M:1M"],
                   help="per-rank message sizes in bytes: list (64K,256K) or range START:STOP:STEP")
    p.add_argument("--repeats", type=cli.number(int, ge=1, le=MAX_REPEATS), default=5,
                   help="timed calls per size (median taken)")
    p.add_argument("--warmup", type=cli.number(int, ge=0, le=MAX_REPEATS), default=2, help="untimed calls per size")
    p.add_argument("--iters", type=cli.number(int, ge=1, le=MAX_REPEATS), default=5,
                   help="back-to-back calls per timed repeat (their mean is recorded)")
    p.add_argument("--collectives", default="a2a", help=f"comma-separated, from: {', '.join(COLLECTIVES)}")
    p.add_argument("--steps", default="", help="comma-separated steps (default: all of the topology)")
    p.add_argument("--gemm-tokens", default="256:2048:256",
                   help="token counts of the GEMM sweep (list or range); empty to skip the GEMM")
    p.add_argument("--gemm-dim", type=cli.number(int, ge=1, le=MAX_WIDTH), default=512,
                   help="M = H of the [tokens, M] @ [M, H] GEMM")
    p.add_argument("--gemm-threads", type=cli.number(int, ge=0, le=4096), default=0,
                   help="torch threads for the GEMM (0: torch's default)")
    p.add_argument("--name", default="", help="profile name (default calibrated-<topology>-<backend>)")
    p.add_argument("--out", required=True, type=cli.output_path, help="output profile YAML")
    p.add_argument("--timeout", type=cli.number(float, gt=0, le=MAX_SECONDS), default=120.0,
                   help="seconds per collective before failing")
    p.add_argument("--deadline", type=cli.number(float, gt=0, le=MAX_SECONDS), default=600.0,
                   help="seconds for the whole sweep (local launcher)")
    p.add_argument("--emulate-rate", default=None,
                   help="run the local ranks on an emulated cluster, each node's link shaped to this tc rate "
                        "(e.g. 200mbit; see impl.common.emu_cluster); loopback when omitted")
    # the link flags default to None (given or not), so that one without --emulate-rate is refused
    p.add_argument("--emulate-burst", default=None,
                   help=f"tbf bucket of the emulated links (default {NetworkConfig.burst})")
    p.add_argument("--emulate-latency", default=None,
                   help=f"tbf queueing limit of the emulated links (default {NetworkConfig.latency})")
    p.add_argument("--emulate-intra-rate", default=None, help="also shape each emulated node's intra-node path")
    p.add_argument("--quiet", action="store_true", help="no per-point progress lines")
    return p


def _with_flag(flag: str, parse, value):
    try:
        return parse(value)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def parse_args(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line, a --preset's values taking the place of the defaults (explicit flags win)."""
    parser = parser or _parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parse_args(argv, parser)
    try:
        if not args.out.endswith((".yaml", ".yml")):
            raise ValueError(f"--out {args.out!r}: must end in .yaml or .yml")
        if args.launcher == "local" and args.backend != "gloo":
            raise ValueError(f"--backend {args.backend} needs --launcher env (start under torchrun / srun); "
                             f"local ranks use gloo")
        if args.launcher == "env":
            import torch

            joined = "nccl" if torch.cuda.is_available() else "gloo"  # what init_from_env initialises
            if args.backend != joined:
                raise ValueError(f"--backend {args.backend}: a torchrun / srun job on this machine uses {joined!r} "
                                 f"({'CUDA' if joined == 'nccl' else 'no CUDA'} here)")
        sizes = _with_flag("--sizes", parse_sizes, args.sizes)
        gemm_tokens = _with_flag("--gemm-tokens", parse_sizes, [args.gemm_tokens]) if args.gemm_tokens.strip() else []
        if gemm_tokens and len(gemm_tokens) < 2:
            raise ValueError(f"--gemm-tokens: needs >= 2 distinct token counts, got {gemm_tokens}")
        # every flag is checked, also those a run without --emulate-rate ignores
        emulate = args.emulate_rate is not None
        links = {"--emulate-burst": args.emulate_burst, "--emulate-latency": args.emulate_latency,
                 "--emulate-intra-rate": args.emulate_intra_rate}
        shaping = [flag for flag, value in links.items() if value is not None]
        if shaping and not emulate:
            raise ValueError(f"{shaping[0]} needs --emulate-rate (links are shaped only on an emulated cluster)")
        network = NetworkConfig(emulate=emulate, rate=args.emulate_rate if emulate else NetworkConfig.rate,
                                burst=NetworkConfig.burst if args.emulate_burst is None else args.emulate_burst,
                                latency=NetworkConfig.latency if args.emulate_latency is None else args.emulate_latency,
                                intra_rate=args.emulate_intra_rate)
        check_network(network, flag_prefix="emulate-")
        if network.emulate and args.launcher != "local":
            raise ValueError("--emulate-rate needs --launcher local (the emulated cluster starts the ranks)")
        collectives = [c.strip() for c in args.collectives.split(",") if c.strip()]
        if not collectives:
            raise ValueError(f"--collectives: {args.collectives!r} names none; allowed: {', '.join(COLLECTIVES)}")
        plan = CalibrationPlan.build(args.topology, sizes, args.repeats, args.warmup, collectives,
                                     [s.strip() for s in args.steps.split(",") if s.strip()] or None,
                                     iters=args.iters, progress=not args.quiet)
        topo = get_topology(plan.topology)
        if args.launcher == "env":
            require_job(topo, "--launcher env")
        elif topo.G > MAX_LOCAL_RANKS:
            raise ValueError(f"--topology {args.topology}: G = {topo.G} ranks; --launcher local runs one process "
                             f"per rank on this machine, allowed: G <= {MAX_LOCAL_RANKS}")
        # every rank's send and receive buffers, and the GEMM's operands (all on this host under local)
        check_host_memory(3 * max(sizes) * (topo.G if args.launcher == "local" else 1), "--sizes")
        if gemm_tokens:
            check_host_memory(FLOAT32_BYTES * args.gemm_dim * (2 * max(gemm_tokens) + args.gemm_dim),
                              "--gemm-tokens, --gemm-dim")
    except ValueError as e:
        return cli.fail(parser, e)
    command = shlex.join(["python", "-m", "impl.common.calibrate", *argv])
    series, where = calibrate(plan, launcher=args.launcher, backend=args.backend, timeout_s=args.timeout,
                              deadline_s=args.deadline, network=network)
    if series is None:  # not rank 0 of an env job
        return 0
    import torch

    if args.gemm_threads:
        torch.set_num_threads(args.gemm_threads)
    device = f"cuda:{torch.cuda.current_device()}" if args.backend == "nccl" else "cpu"
    gemm = None
    gemm_note = ""
    if gemm_tokens:
        gemm = measure_gemm(gemm_tokens, args.gemm_dim, args.repeats, args.warmup, args.iters, device)
        gemm_note = (f"torch.matmul float32 [tokens, {args.gemm_dim}] @ [{args.gemm_dim}, {args.gemm_dim}] on "
                     f"{device}, {torch.get_num_threads()} threads; work = tokens*M*H")
    world = get_topology(plan.topology).G
    provenance = {**_provenance(args.backend, world, command), "repeats": plan.repeats, "warmup": plan.warmup,
                  "iters": plan.iters, "network": where}
    profile = build_profile(args.name or f"calibrated-{plan.topology}-{args.backend}", plan, series, gemm,
                            gemm_note, provenance)
    path = save_profile(profile, args.out)
    print("\n".join(profile_summary(profile)))
    for line in poor_fits(profile):
        print(f"calibrate: warning: {line}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from impl.common.calibrate import main as _main  # the importable module, so spawned ranks can unpickle

    sys.exit(_main())
