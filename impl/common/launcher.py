"""Run N ranks locally over gloo (on loopback or an emulated cluster), or join a torchrun / srun
job, with collective timeouts, and name the rank that broke a job.

`launch(fn, world_size, topology=..., cluster=...)` spawns one process per rank, initialises
torch.distributed through a FileStore in a private temporary directory (no port races; shared by
every namespace of an emulated cluster), builds a `TorchComm` and calls `fn(comm, *args)`. Each
rank runs where `cluster.site(rank)` says (`impl.common.emu_cluster`: its node's network
namespace, gloo bound to that node's interface; loopback by default). `backend='nccl'` gives
rank r the GPU r mod the GPU count (NCCL wants one GPU per rank; gloo ranks may share one).

The parent watches the ranks and, when the job breaks, names the rank that broke it, not a
survivor that merely saw the broken connection:

* a rank that exits without returning (os._exit, a crash, a kill) is named at once;
* a rank that raises is named with its error, ahead of ranks whose errors are communication
  failures (a closed connection, a timed-out collective), which are consequences;
* a rank stuck before a collective: when the others time out in it (the collective timeout), the
  rank that stays silent and whose collective count lags is named. Every rank publishes how many
  collectives it has entered (`TorchComm` counts them into a shared array);
* the job deadline names the ranks that did not finish, with their counts.

After the first sign of failure the parent waits a short grace period for the other ranks' news,
then kills every rank (and their children: each rank leads its own process group). SIGTERM and
SIGINT to the launching process do the same; ranks also die if the parent is killed outright
(PR_SET_PDEATHSIG). No process outlives `launch`.

`init_from_env(topology)` is the cluster path: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK /
GROUP_RANK) or plain srun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODEID), it checks
that ranks are node-major as the topology assumes, initialises nccl (GPU) or gloo (CPU) and
returns the TorchComm. Process groups that libraries create later (DeepSpeed's expert groups,
megatron-core's parallel state via `collective_timeout_s()`) get the same collective timeout.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple

from .config import DEFAULT_TIMEOUT_S
from .topology import Topology, get_topology

if TYPE_CHECKING:       # torch loads where ranks start, so a config check can import this module without it
    from .comm import TorchComm

__all__ = ["launch", "LaunchError", "RankSite", "LOOPBACK", "init_from_env", "rank_environment",
           "set_collective_timeout", "collective_timeout_s", "diagnose", "RankError", "join_namespace", "require_job",
           "terminate_as_exit", "GRACE_S"]

GRACE_S = 3.0            # after the first failure, how long to wait for the other ranks' news
TIMEOUT_ENV = "MOE_COLLECTIVE_TIMEOUT_S"
PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000
# What gloo / torch.distributed say when a peer is gone or a collective timed out: consequences.
_COMM_FAILURE = re.compile(r"connection (closed|reset)|broken pipe|timed out|timeout|socket|ECONNRESET|EPIPE|"
                           r"gloo/transport|DistNetworkError|DistBackendError|DistStoreError", re.IGNORECASE)


class LaunchError(RuntimeError):
    """A rank failed, died, got stuck, or the job exceeded its deadline."""


class RankSite(NamedTuple):
    """Where one rank runs: its node, the network namespace to enter (None: stay), gloo's
    interface and its address (`impl.common.emu_cluster` makes the namespaces)."""

    node: int
    netns: str | None
    ifname: str
    address: str


LOOPBACK = RankSite(0, None, "lo", "127.0.0.1")


@dataclass(frozen=True)
class RankError:
    """What a failing rank reported: its error, and whether it is a communication failure."""

    text: str
    comm_failure: bool


# ==========================================================================================
# collective timeout
# ==========================================================================================
def set_collective_timeout(timeout_s: float) -> None:
    """Make `timeout_s` the timeout of every process group this process creates from now on,
    also by libraries that call `new_group` without one (DeepSpeed's expert groups); megatron-core
    passes its own, from `collective_timeout_s()`."""
    from torch.distributed import distributed_c10d

    os.environ[TIMEOUT_ENV] = repr(float(timeout_s))
    distributed_c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)


def collective_timeout_s(default: float = DEFAULT_TIMEOUT_S) -> float:
    """The collective timeout this process's ranks use (set by `launch` / `init_from_env`)."""
    return float(os.environ.get(TIMEOUT_ENV, default))


# ==========================================================================================
# the rank process
# ==========================================================================================
def join_namespace(netns: str) -> None:
    """Move the calling process into network namespace `netns` (/run/netns/<netns>), as
    `ip netns exec` does; call before opening any socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {netns!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies, and lead a process group of its own so the
    parent can end the rank's children with it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:   # the parent died before the prctl took effect
        os._exit(1)
    os.setpgrp()


def _rank_main(rank: int, world_size: int, store_path: str, topology: Topology, fn, args, kwargs,
               timeout_s: float, threads: int, site: RankSite, parent_pid: int, progress, results: mp.Queue,
               backend: str = "gloo"):
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent decides; it stops every rank on Ctrl-C
    if site.netns:
        join_namespace(site.netns)
    os.environ["GLOO_SOCKET_IFNAME"] = site.ifname
    import torch
    import torch.distributed as dist

    from .comm import TorchComm

    torch.set_num_threads(threads)
    set_collective_timeout(timeout_s)

    def count() -> None:
        progress[rank] += 1

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        comm = TorchComm(topology, timeout_s=timeout_s, on_collective=count)
        value = fn(comm, *args, **kwargs)
        # By value: torch would send tensors as shared-memory handles that vanish when this
        # process exits, before the parent has opened them.
        results.put(("ok", rank, pickle.dumps(value)))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - sent to the parent with the rank
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        results.put(("error", rank, RankError(text, bool(_COMM_FAILURE.search(f"{type(e).__name__}: {e}")))))
        results.close()
        results.join_thread()  # flush the message before the hard exit
        os._exit(1)


# ==========================================================================================
# the parent
# ==========================================================================================
@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block SIGTERM raises SystemExit(143) in the main thread, so `finally` clauses
    and context managers (ranks killed, namespaces deleted) run as they do for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kill_all(procs: list[mp.Process]) -> None:
    """SIGTERM every rank's process group, then SIGKILL whatever is left after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        live = [p for p in procs if p.pid is not None and p.is_alive()]
        for p in live:
            for kill in (lambda: os.killpg(p.pid, sig), lambda: os.kill(p.pid, sig)):
                try:
                    kill()
                    break
                except (ProcessLookupError, PermissionError):
                    continue
        deadline = time.monotonic() + wait_s
        for p in live:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:   # the groups too: children of a rank that exited by itself
        if p.pid is not None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _death(code: int | None) -> str:
    if code is None:
        return "disappeared"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


def _ranks(rs) -> str:
    rs = sorted(rs)
    return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))


def diagnose(errors: Mapping[int, RankError], died: Mapping[int, int | None], silent: set[int],
             counts: list[int], timeout_s: float) -> str:
    """The message of a failed job, naming the rank that caused it (see the module docstring).

    errors: rank -> what it reported; died: rank -> exit code of ranks that ended without a
    result or an error; silent: ranks still running without news; counts: collectives entered."""
    if died:
        first = min(died)
        others = sorted(set(died) - {first})
        also = f" ({_ranks(others)} too)" if others else ""
        return (f"rank {first} {_death(died[first])} without reporting an error (os._exit, a crash or a kill)"
                f"{also}; collectives entered per rank: {counts}")
    causes = {r: e for r, e in errors.items() if not e.comm_failure}
    if causes:
        r = min(causes)
        return f"rank {r} failed: {causes[r].text}"
    if errors:
        top = max(counts) if counts else 0
        lagging = sorted(r for r in silent if counts and counts[r] < top) or sorted(silent)
        if lagging:
            waited = sorted(errors)
            where = (f"it entered {counts[lagging[0]]} collectives while {_ranks(waited)} reached {top}"
                     if counts and counts[lagging[0]] < top else "it stayed silent")
            return (f"{_ranks(lagging)} stuck before a collective: {where} and timed out waiting for it after "
                    f"{timeout_s:.0f} s; collectives entered per rank: {counts}")
        r = min(errors)
        return f"rank {r} failed: {errors[r].text}"
    raise ValueError("diagnose() needs at least one error or dead rank")


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), kwargs: dict | None = None, *,
           topology: Topology | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
           deadline_s: float = 600.0, threads_per_rank: int = 1, cluster=None, backend: str = "gloo") -> list[Any]:
    """Run `fn(comm, *args, **kwargs)` on `world_size` local ranks of `backend` ('gloo' or
    'nccl'); return the per-rank results (must be picklable). `fn` must be importable (a
    module-level function).

    `timeout_s` bounds every collective; `deadline_s` the whole job. The default topology is
    one node of `world_size` GPUs. `cluster` (`impl.common.emu_cluster.emulated_cluster`) says
    where each rank runs; loopback when None."""
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
    sites = [cluster.site(r) if cluster is not None else LOOPBACK for r in range(world_size)]
    ctx = mp.get_context("spawn")
    tmpdir = tempfile.mkdtemp(prefix="moe-launch-")
    results_q: mp.Queue = ctx.Queue()
    progress = ctx.RawArray("q", world_size)
    procs = [ctx.Process(target=_rank_main, name=f"rank-{r}", daemon=True,
                         args=(r, world_size, os.path.join(tmpdir, "store"), topology, fn, args, kwargs or {},
                               timeout_s, threads_per_rank, sites[r], os.getpid(), progress, results_q, backend))
             for r in range(world_size)]
    results: dict[int, Any] = {}
    errors: dict[int, RankError] = {}
    died: dict[int, int | None] = {}

    def collect(wait_s: float) -> None:
        """Take the news: messages first, then ranks that ended without one."""
        ended = [r for r, p in enumerate(procs) if not p.is_alive()]
        try:
            status, rank, value = results_q.get(timeout=wait_s)
            while True:
                if status == "ok":
                    results[rank] = pickle.loads(value)
                else:
                    errors[rank] = value
                status, rank, value = results_q.get_nowait()
        except queue.Empty:
            pass
        for r in ended:
            if r not in results and r not in errors and r not in died:
                died[r] = procs[r].exitcode

    try:
        with terminate_as_exit():
            for p in procs:
                p.start()
            end = time.monotonic() + deadline_s
            while len(results) < world_size:
                collect(0.2)
                if errors or died:
                    grace_end = time.monotonic() + GRACE_S
                    while time.monotonic() < grace_end and len(results) + len(errors) + len(died) < world_size:
                        collect(0.1)
                    silent = set(range(world_size)) - set(results) - set(errors) - set(died)
                    raise LaunchError(diagnose(errors, died, silent, list(progress), timeout_s))
                if time.monotonic() > end:
                    missing = sorted(set(range(world_size)) - set(results))
                    raise LaunchError(f"job exceeded its {deadline_s:.0f} s deadline; {_ranks(missing)} did not "
                                      f"finish; collectives entered per rank: {list(progress)}")
            for p in procs:
                p.join(30)
            return [results[r] for r in range(world_size)]
    finally:
        _kill_all(procs)
        results_q.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


# ==========================================================================================
# torchrun / srun
# ==========================================================================================
_TORCHRUN = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
             "local_world_size": "LOCAL_WORLD_SIZE", "node": "GROUP_RANK"}
_SLURM = {"rank": "SLURM_PROCID", "world_size": "SLURM_NTASKS", "local_rank": "SLURM_LOCALID",
          "local_world_size": "SLURM_NTASKS_PER_NODE", "node": "SLURM_NODEID"}


def _first_slurm_host(env: Mapping[str, str]) -> str | None:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    if re.fullmatch(r"[\w.-]+", nodelist):
        return nodelist
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = out.stdout.split()
    return hosts[0] if out.returncode == 0 and hosts else None


def rank_environment(topology: Topology, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """This process's place in the job from torchrun's variables, or else Slurm's, checked
    against the topology's node-major order: {'source', 'rank', 'world_size', 'local_rank',
    'local_world_size', 'node', 'master_addr', 'master_port'}. LaunchError names what is wrong."""
    env = os.environ if env is None else env
    if "RANK" in env:
        names, source = _TORCHRUN, "torchrun"
    elif "SLURM_PROCID" in env:
        names, source = _SLURM, "slurm"
    else:
        raise LaunchError("neither torchrun's RANK nor Slurm's SLURM_PROCID is set: start this under torchrun "
                          "or srun (workflows/scripts/launch_cluster.sh does either)")
    out: dict[str, Any] = {"source": source}
    for key, var in names.items():
        value = env.get(var)
        if key == "local_world_size" and value is not None and source == "slurm":
            value = value.split("(")[0].split(",")[0]       # SLURM_NTASKS_PER_NODE may read '4(x2)'
        if value is None:
            if key in ("local_world_size", "node") and source == "torchrun" and "LOCAL_RANK" in env:
                continue   # older launchers: checked below as far as known
            raise LaunchError(f"environment variable {var} is not set ({source}); cannot place this rank")
        try:
            out[key] = int(value)
        except ValueError:
            raise LaunchError(f"environment variable {var}={value!r} is not an integer") from None
    rank, world, gpn = out["rank"], out["world_size"], topology.gpus_per_node
    if world != topology.G:
        raise LaunchError(f"the job has {world} ranks ({names['world_size']}), topology {topology.name!r} has "
                          f"G = {topology.G}; pick a topology with {world} GPUs or change the job")
    lws = out.get("local_world_size")
    if lws is not None and lws != gpn:
        raise LaunchError(f"{lws} ranks per node ({names['local_world_size']}), topology {topology.name!r} has "
                          f"{gpn} GPUs per node")
    expected = (rank // gpn, rank % gpn)
    actual = (out.get("node", expected[0]), out["local_rank"])
    if actual != expected:
        raise LaunchError(f"rank {rank} runs as local rank {actual[1]} of node {actual[0]}, but topology "
                          f"{topology.name!r} numbers ranks node-major (rank {rank} = local rank {expected[1]} of "
                          f"node {expected[0]}); use block distribution (srun --distribution=block) or torchrun")
    addr = env.get("MASTER_ADDR") or (_first_slurm_host(env) if source == "slurm" else None)
    if not addr:
        raise LaunchError("MASTER_ADDR is not set and no first host could be read from SLURM_JOB_NODELIST")
    out["master_addr"], out["master_port"] = addr, int(env.get("MASTER_PORT", 29500))
    return out


def require_job(topology: Topology, what: str) -> None:
    """One ValueError line, before anything starts, unless this process is a rank of a torchrun /
    srun job placed as `topology` says (`what`: the option that asked for a job)."""
    try:
        rank_environment(topology)
    except LaunchError as e:
        raise ValueError(f"{what}: {e}") from None


def init_from_env(topology: Topology | str, timeout_s: float | None = None) -> TorchComm:
    """Initialise torch.distributed from torchrun's or Slurm's environment (nccl with CUDA, else
    gloo), after checking the ranks' placement against the topology (also across ranks: the
    ranks of one topology node must share a host)."""
    import torch
    import torch.distributed as dist

    from .comm import TorchComm

    topo = get_topology(topology) if isinstance(topology, str) else topology
    timeout_s = collective_timeout_s() if timeout_s is None else timeout_s
    place = rank_environment(topo)
    set_collective_timeout(timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(place["local_rank"])
    # torchrun's agent already serves the store on MASTER_PORT (env:// joins it); under srun rank 0 serves it
    init = "env://" if place["source"] == "torchrun" else f"tcp://{place['master_addr']}:{place['master_port']}"
    dist.init_process_group(backend, init_method=init, rank=place["rank"], world_size=place["world_size"],
                            timeout=timedelta(seconds=timeout_s))
    comm = TorchComm(topo, timeout_s=timeout_s)
    hosts = comm.all_gather_object(socket.gethostname())
    for node in range(topo.num_nodes):
        mine = {hosts[r] for r in range(node * topo.gpus_per_node, (node + 1) * topo.gpus_per_node)}
        if len(mine) > 1:
            raise LaunchError(f"the ranks of topology node {node} run on several hosts ({', '.join(sorted(mine))}); "
                              "ranks must be node-major: one host per block of gpus_per_node ranks")
    return comm
