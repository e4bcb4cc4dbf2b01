"""Run N ranks locally over gloo, or join a torchrun / srun job, with collective timeouts.

`launch(fn, world_size, topology=...)` spawns one process per rank, initialises
torch.distributed through a FileStore in a private temporary directory (no port races), builds a
`TorchComm` and calls `fn(comm, *args)`. The parent watches the ranks: when one raises or dies,
every other rank is killed at once and `LaunchError` names the failing rank and its error; an
overall deadline does the same for a hang. No process outlives `launch`. `backend='nccl'` gives
rank r the GPU r mod the GPU count (NCCL wants one GPU per rank; gloo ranks may share one).

`init_from_env(topology)` is the cluster path: under torchrun (RANK / WORLD_SIZE /
MASTER_ADDR set) it initialises nccl (GPU) or gloo (CPU) and returns the TorchComm.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

from .comm import DEFAULT_TIMEOUT_S, TorchComm
from .topology import Topology, get_topology

__all__ = ["launch", "LaunchError", "init_from_env"]


class LaunchError(RuntimeError):
    """A rank failed, died or the job exceeded its deadline."""


def _rank_main(rank: int, world_size: int, store_path: str, topology: Topology, fn, args, kwargs,
               timeout_s: float, threads: int, results: mp.Queue, backend: str = "gloo"):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        comm = TorchComm(topology, timeout_s=timeout_s)
        value = fn(comm, *args, **kwargs)
        # By value: torch would send tensors as shared-memory handles that vanish when this
        # process exits, before the parent has opened them.
        results.put(("ok", rank, pickle.dumps(value)))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - sent to the parent with the rank
        results.put(("error", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        results.close()
        results.join_thread()  # flush the message before the hard exit
        os._exit(1)


def _kill_all(procs: list[mp.Process]):
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), kwargs: dict | None = None, *,
           topology: Topology | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
           deadline_s: float = 600.0, threads_per_rank: int = 1, backend: str = "gloo") -> list[Any]:
    """Run `fn(comm, *args, **kwargs)` on `world_size` local ranks of `backend` ('gloo' or
    'nccl'); return the per-rank results (must be picklable). `fn` must be importable (a
    module-level function).

    `timeout_s` bounds every collective; `deadline_s` the whole job. The default topology is
    one node of `world_size` GPUs."""
    if world_size < 1:
        raise LaunchError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise LaunchError(f"backend={backend!r} is not allowed; expected 'gloo' or 'nccl'")
    if topology is None:
        topology = get_topology(f"1x{world_size}")
    elif isinstance(topology, str):
        topology = get_topology(topology)
    if topology.G != world_size:
        raise LaunchError(f"topology {topology.name!r} has G = {topology.G} ranks, but world_size = {world_size}")
    ctx = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="moe-launch-")
    results_q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, name=f"rank-{r}", daemon=True,
                         args=(r, world_size, os.path.join(tmpdir, "store"), topology, fn, args, kwargs or {},
                               timeout_s, threads_per_rank, results_q, backend))
             for r in range(world_size)]
    results: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        while len(results) < world_size:
            try:
                status, rank, value = results_q.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and p.exitcode != 0]
                if dead:
                    # a rank died without reporting (killed, segfault): give its message a moment
                    try:
                        status, rank, value = results_q.get(timeout=1.0)
                    except queue.Empty:
                        r, code = dead[0], procs[dead[0]].exitcode
                        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                        raise LaunchError(f"rank {r} {how} without reporting an error") from None
                elif time.monotonic() > end:
                    missing = sorted(set(range(world_size)) - set(results))
                    raise LaunchError(f"job exceeded its {deadline_s:.0f} s deadline; ranks {missing} did not finish")
                else:
                    continue
            if status == "error":
                raise LaunchError(f"rank {rank} failed: {value}")
            results[rank] = pickle.loads(value)
        for p in procs:
            p.join(30)
        return [results[r] for r in range(world_size)]
    finally:
        _kill_all(procs)
        results_q.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def init_from_env(topology: Topology | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> TorchComm:
    """Initialise torch.distributed from torchrun's environment (nccl with CUDA, else gloo)."""
    import torch
    import torch.distributed as dist

    topo = get_topology(topology) if isinstance(topology, str) else topology
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise LaunchError(f"environment variable {var} is not set: start this under torchrun or srun")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return TorchComm(topo, timeout_s=timeout_s)
