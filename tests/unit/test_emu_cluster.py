"""Emulated cluster and launcher logic that needs no rank processes: network settings are checked
before anything is made, leftovers of a dead owner are refused with the cleanup command and
removed by it, the failure diagnosis names the cause rather than a consequence, and a job's
environment (torchrun or Slurm) is placed node-major against the topology."""
import json
import subprocess
import sys

import pytest

from impl.common import emu_cluster
from impl.common.emu_cluster import (EmuClusterError, EmulatedCluster, LoopbackCluster, NetworkConfig, check_network,
                                     emulated_cluster, rate_bytes_per_s)
from impl.common.launcher import LaunchError, RankError, diagnose, rank_environment
from impl.common.topology import get_topology


@pytest.mark.parametrize("field,value,allowed", [
    ("rate", "fast", "a tc rate"), ("burst", "big", "a tc size"), ("latency", "5", "a tc time"),
    ("intra_rate", "1 gbit", "a tc rate"),
])
def test_bad_network_values_name_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"network\.{field}: '{value}' is not allowed; allowed: {allowed}"):
        check_network(NetworkConfig(emulate=True, **{field: value}))


def test_rates():
    assert rate_bytes_per_s("200mbit") == 25e6 and rate_bytes_per_s("1gbit") == 125e6
    assert rate_bytes_per_s("3mbps") == 3e6


def test_loopback_when_not_asked_and_fallback_states_why(monkeypatch):
    topo = get_topology("2x2")
    with emulated_cluster(topo) as cluster:
        assert isinstance(cluster, LoopbackCluster) and cluster.describe()["emulated"] is False
        assert cluster.site(3) == (1, None, "lo", "127.0.0.1")
    monkeypatch.setattr(emu_cluster, "unavailable_reason", lambda: "network namespaces need root (running as uid 1000)")
    with emulated_cluster(topo, NetworkConfig(emulate=True)) as cluster:
        assert cluster.describe()["fallback_reason"] == "network namespaces need root (running as uid 1000)"
    with pytest.raises(EmuClusterError, match="need root.*network.fallback is false"):
        with emulated_cluster(topo, NetworkConfig(emulate=True, fallback=False)):
            pass


def test_names_are_per_run_and_short():
    topo = get_topology("12x2")
    a, b = (EmulatedCluster(topo, NetworkConfig(emulate=True)) for _ in range(2))
    assert a.run != b.run
    assert a.site(23) == (11, f"moeemu-{a.run}-n11", f"moe{a.run}n11", "10.213.0.12")
    assert all(len(a.ifname(i)) <= 15 for i in range(12))      # Linux interface names


def test_leftovers_of_a_dead_owner_are_refused_then_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(emu_cluster, "STATE_DIR", tmp_path)
    monkeypatch.setattr(emu_cluster, "_namespaces", lambda: [])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "abc123.json").write_text(json.dumps({"pid": dead.pid, "pid_start": "0", "run": "abc123"}))
    cluster = EmulatedCluster(get_topology("2x1"), NetworkConfig(emulate=True))
    with pytest.raises(EmuClusterError, match=r"abc123.*python -m impl.common.emu_cluster cleanup"):
        cluster.up()
    assert any("abc123" in line and "owner gone" in line for line in emu_cluster.status())
    monkeypatch.setattr(emu_cluster, "_host_leftover_interfaces", lambda: [])
    emu_cluster.cleanup()
    assert not (tmp_path / "abc123.json").exists() and emu_cluster.leftover_runs() == {}


def test_cli_rejects_bad_rate_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "impl.common.emu_cluster", "run", "--topology", "2x2",
                           "--rate", "fast"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "rate: 'fast' is not allowed" in proc.stderr


# ---- diagnosis -------------------------------------------------------------------------------
CLOSED = RankError("RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection closed by peer", True)
TIMED_OUT = RankError("RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms", True)


def test_a_dead_rank_beats_the_survivors_that_saw_it_go():
    msg = diagnose({0: CLOSED, 2: CLOSED}, {1: -9}, set(), [4, 4, 4], 10)
    assert msg.startswith("rank 1 was killed by signal 9 (SIGKILL) without reporting an error")


def test_an_error_beats_communication_failures():
    msg = diagnose({0: CLOSED, 3: RankError("KeyError: 'x'", False)}, {}, set(), [2, 2, 2, 2], 10)
    assert msg == "rank 3 failed: KeyError: 'x'"


def test_a_silent_lagging_rank_is_the_stuck_one():
    msg = diagnose({0: TIMED_OUT, 2: TIMED_OUT}, {}, {1}, [7, 6, 7], 10)
    assert msg.startswith("rank 1 stuck before a collective: it entered 6 collectives while ranks 0, 2 reached 7 "
                          "and timed out waiting for it after 10 s")


# ---- torchrun / Slurm environments ---------------------------------------------------------------
TOPO = get_topology("2x4")


def test_torchrun_environment_is_placed():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "n0", "MASTER_PORT": "29400"}
    assert rank_environment(TOPO, env) == {"source": "torchrun", "rank": 5, "world_size": 8, "local_rank": 1,
                                           "local_world_size": 4, "node": 1, "master_addr": "n0", "master_port": 29400}


def test_slurm_environment_is_placed():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
           "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu07"}
    place = rank_environment(TOPO, env)
    assert (place["source"], place["rank"], place["node"], place["master_addr"]) == ("slurm", 6, 1, "gpu07")


@pytest.mark.parametrize("env,message", [
    ({}, "neither torchrun's RANK nor Slurm's SLURM_PROCID is set"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
      "SLURM_NTASKS_PER_NODE": "4", "MASTER_ADDR": "a"},
     r"rank 1 runs as local rank 0 of node 1, but topology '2x4' numbers ranks node-major .*--distribution=block"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0",
      "MASTER_ADDR": "a"}, "the job has 4 ranks"),
    ({"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0",
      "MASTER_ADDR": "a"}, "8 ranks per node"),
])
def test_misplaced_jobs_are_refused(env, message):
    with pytest.raises(LaunchError, match=message):
        rank_environment(TOPO, env)
