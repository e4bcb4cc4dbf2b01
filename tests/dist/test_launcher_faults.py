"""The launcher names the rank that broke a job, not a survivor that saw the broken connection:
a rank that calls os._exit, one that raises, one stuck before a collective (found when the
collective timeout passes); SIGTERM or SIGINT to the launching process leaves no rank alive; an emulated
two-namespace cluster runs the same collectives and leaves no namespace behind; megatron-core's
and DeepSpeed's process groups get the launcher's collective timeout."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from impl.common import emu_cluster
from impl.common.comm import SimWorld
from impl.common.emu_cluster import NetworkConfig, emulated_cluster
from impl.common.launcher import LaunchError, launch
from impl.common.topology import get_topology

pytestmark = pytest.mark.dist

TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parents[2]


def _fault(comm, how: str):
    comm.barrier()
    if comm.rank == 1:
        if how == "exit":
            os._exit(3)
        if how == "raise":
            raise ValueError("injected failure")
        if how == "sleep":
            time.sleep(120)
    comm.barrier()
    return comm.rank


@pytest.mark.parametrize("how,message", [
    ("exit", r"rank 1 exited with code 3 without reporting an error"),
    ("raise", r"rank 1 failed: ValueError: injected failure"),
    ("sleep", r"rank 1 stuck before a collective: it entered 1 collectives while ranks 0, 2 reached 2"),
])
def test_the_faulty_rank_is_named(how, message):
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=message):
        launch(_fault, 3, args=(how,), timeout_s=TIMEOUT_S, deadline_s=120)
    assert time.monotonic() - t0 < 60


_SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    from impl.common.emu_cluster import NetworkConfig, emulated_cluster
    from impl.common.launcher import launch
    from impl.common.topology import get_topology
    from tests.dist.test_launcher_faults import _sleep_forever

    topo = get_topology("2x1")
    with emulated_cluster(topo, NetworkConfig(emulate=sys.argv[1] == "emulated", fallback=False)) as cluster:
        launch(_sleep_forever, 2, topology=topo, cluster=cluster, timeout_s=60)
""")


def _sleep_forever(comm):
    sys.stdout.write(f"rank {comm.rank} ready\n")      # one write: print's text and end may interleave across ranks
    sys.stdout.flush()
    time.sleep(600)


def _run_namespaces() -> set[str]:
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in proc.stdout.splitlines() if line.startswith(emu_cluster.PREFIX)}


@pytest.mark.parametrize("network,sig", [("loopback", signal.SIGTERM), ("loopback", signal.SIGINT),
                                         ("emulated", signal.SIGTERM)], ids=["loopback-term", "loopback-int", "emulated-term"])
def test_a_signal_to_the_launcher_leaves_nothing(network, sig):
    if network == "emulated" and (reason := emu_cluster.unavailable_reason()):
        pytest.skip(f"no emulated cluster here: {reason}")
    before = _run_namespaces() if network == "emulated" else set()
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, network], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        ready = [proc.stdout.readline() for _ in range(2)]
        assert all("ready" in line for line in ready), ready
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(ranks) >= 2
        proc.send_signal(sig)
        code = proc.wait(30)
        assert code == 128 + signal.SIGTERM if sig == signal.SIGTERM else code != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == []
    if network == "emulated":
        assert _run_namespaces() == before


def _collectives(comm):
    return {"sum": comm.all_reduce(torch.tensor([float(comm.rank + 1)])).item(),
            "a2a": comm.all_to_all(torch.arange(4.0) + 10 * comm.rank, [2, 2], [2, 2]).tolist()}


def _where(comm):
    """The collectives, and where this rank ran (network namespace, gloo's interface)."""
    return _collectives(comm), os.stat("/proc/self/ns/net").st_ino, os.environ["GLOO_SOCKET_IFNAME"]


def test_emulated_two_node_run_passes_and_leaves_no_namespace():
    if reason := emu_cluster.unavailable_reason():
        pytest.skip(f"no emulated cluster here: {reason}")
    topo = get_topology("2x1")
    before = _run_namespaces()
    with emulated_cluster(topo, NetworkConfig(emulate=True, rate="1gbit", fallback=False)) as cluster:
        assert len(_run_namespaces() - before) == 3   # a bridge and two nodes
        results = launch(_where, 2, topology=topo, cluster=cluster, timeout_s=TIMEOUT_S)
        described = cluster.describe()
    assert [r[0] for r in results] == SimWorld(topo).run(_collectives)
    host_ns = os.stat("/proc/self/ns/net").st_ino
    assert len({r[1] for r in results} | {host_ns}) == 3            # each rank in its own node's namespace
    assert [r[2] for r in results] == [cluster.ifname(0), cluster.ifname(1)]
    assert described["emulated"] and described["rate"] == "1gbit"
    assert _run_namespaces() == before


def _group_timeouts(comm):
    """Timeouts (s) of every process group after megatron-core's parallel state and a DeepSpeed
    group (DeepSpeed's own new_group call) exist."""
    import torch.distributed as dist
    from deepspeed.comm.torch import TorchBackend

    from impl.common.megatron import init_parallel

    init_parallel(2)
    TorchBackend.new_group(None, [0, 1])
    groups = list(dist.distributed_c10d._world.pg_map)
    return sorted({g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups})


def test_megatron_and_deepspeed_groups_get_our_timeout():
    pytest.importorskip("megatron.core")
    pytest.importorskip("deepspeed")
    assert launch(_group_timeouts, 2, timeout_s=TIMEOUT_S) == [[TIMEOUT_S], [TIMEOUT_S]]
