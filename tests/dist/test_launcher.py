"""Local gloo launcher: collectives agree with SimComm; a dying rank ends the job quickly with
its rank and error named, and leaves no process behind."""
import os
import time

import psutil
import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.launcher import LaunchError, launch
from impl.common.topology import get_topology
from tests.support import host_exchange

pytestmark = pytest.mark.dist


def _collectives(comm):
    G = comm.world_size
    send = [(comm.rank * 2 + j) % 3 for j in range(G)]
    recv = comm.exchange_counts(send)
    x = torch.arange(sum(send) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * comm.rank
    out = {"a2a": comm.all_to_all(x, send, recv).tolist(), "recv": recv}
    for kind, lvl in (("inter", 1), ("intra", 1)):
        g = comm.group(kind, lvl)
        out[f"{kind}{lvl}"] = (g.ranks, comm.all_reduce(torch.tensor([float(comm.rank)]), "sum", g).item(),
                               [t.item() for t in comm.all_gather(torch.tensor([comm.rank]), g)])
    out["total"] = comm.total_traffic().to_dict()
    return out


def test_gloo_collectives_equal_simulated():
    topo = get_topology("2x2")
    assert launch(_collectives, 4, topology=topo) == SimWorld(topo).run(_collectives)


def test_gloo_all_to_all_on_host_equals_brute_force_with_ragged_and_empty_splits():
    topo = get_topology("2x2")
    for rank, got in enumerate(launch(host_exchange.host_all_to_all, 4, topology=topo)):
        assert got.device.type == "cpu" and torch.equal(got, host_exchange.reference(rank, topo.G))


def _die_on_rank_1(comm):
    if comm.rank == 1:
        raise RuntimeError("injected failure")
    comm.barrier()  # the others wait here for a peer that never comes
    return comm.rank


def _children():
    return {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())}


def test_dead_rank_stops_job_with_message_and_no_leftovers():
    before = _children()
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"rank 1 failed: RuntimeError: injected failure"):
        launch(_die_on_rank_1, 4, timeout_s=120)
    assert time.monotonic() - t0 < 60
    time.sleep(0.5)
    assert _children() - before == set()


def _hang(comm):
    if comm.rank == 0:
        time.sleep(600)
    comm.barrier()


def test_deadline_kills_a_hang():
    with pytest.raises(LaunchError, match="deadline"):
        launch(_hang, 2, timeout_s=120, deadline_s=8)


def test_topology_size_mismatch():
    with pytest.raises(LaunchError, match="G = 4 ranks, but world_size = 2"):
        launch(_collectives, 2, topology="2x2")
