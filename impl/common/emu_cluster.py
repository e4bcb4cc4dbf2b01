"""An emulated multi-node cluster on one Linux machine: one network namespace per virtual node,
joined through a bridge that lives in a namespace of its own, every node's link shaped with
`tc tbf` in both directions.

    with emulated_cluster(get_topology("2x4"), NetworkConfig(emulate=True, rate="200mbit")) as cluster:
        results = launch(fn, 8, topology="2x4", cluster=cluster)
        print(cluster.describe())          # what the run record stores as its network

    python -m impl.common.emu_cluster run --topology 2x4 --rate 200mbit            # bandwidth probe
    python -m impl.common.emu_cluster run --topology 2x4 --rate 200mbit -- python -m my.script
    python -m impl.common.emu_cluster status
    python -m impl.common.emu_cluster cleanup       # what runs whose owner died left behind

Layout of one run `<run>` (six hex digits, so concurrent runs never collide):

    namespace moeemu-<run>-br:  bridge moe<run>br, ports moe<run>p<i>   (egress shaped: into node i)
    namespace moeemu-<run>-n<i>: veth moe<run>n<i>, 10.213.0.<i+1>/24   (egress shaped: out of node i)
                                 lo (optionally shaped: the intra-node path)

The veth pairs are created directly inside the namespaces (`ip link add ... netns`), so nothing
ever appears on the host's interfaces, and the only addresses are those above, inside the run's
own namespaces; deleting the namespaces deletes everything. A state file
(/run/moeemu/<run>.json) names the owner process, so `cleanup` removes only runs whose owner is
gone, and a new run refuses to start over such leftovers (naming them and this cleanup command).

Paths: a message between nodes leaves through node i's veth (shaped at `rate`) and enters node j
through the bridge's port j (shaped at `rate`), so every node's link is limited in both
directions. Ranks of one node talk through their own address, which the kernel routes over the
namespace's `lo`, never over the veth: the intra-node path is unshaped (0.9-1.9 GB/s aggregate
here) unless `intra_rate` shapes that namespace's `lo` (one tbf for all intra-node traffic of the
node, both directions together, since on `lo` every packet leaves and enters once). The kernel
here has no `netem`, so no latency is added: `latency` is tbf's queueing limit, not a delay.

Ranks enter their node's namespace with setns(2) at start-up (`launcher.join_namespace`: what `ip netns exec` does, without
its private mount namespace, which nothing here needs); gloo binds to the node's veth
(GLOO_SOCKET_IFNAME) and the rendezvous is a FileStore on a shared directory, so no store traffic
crosses the emulated links. Commands (`run -- CMD`) start as `ip netns exec NS env ... CMD` with
torchrun's variables, their store on node 0's address.

Where namespaces cannot be made (not root, no `ip` or `tc`, or the kernel refuses), the run falls
back to loopback ranks and `describe()` states why.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import cli
from .config import MAX_REPEATS, MAX_SECONDS, check_host_memory, checked
from .launcher import RankSite, launch, terminate_as_exit
from .topology import Topology, TopologyError, get_topology

__all__ = ["NetworkConfig", "LoopbackCluster", "EmulatedCluster", "EmuClusterError", "emulated_cluster",
           "check_network", "rate_bytes_per_s", "unavailable_reason", "leftover_runs", "cleanup", "status", "PREFIX",
           "STATE_DIR", "main"]

PREFIX = "moeemu"                       # every namespace of every run starts with this
IF_PREFIX = "moe"                       # interfaces: moe<run>{n,p}<i>, moe<run>br (<= 15 characters)
STATE_DIR = Path("/run") / PREFIX       # one JSON per live run: owner pid, namespaces
SUBNET = "10.213.0"                     # node i has SUBNET.<i+1>/24, inside its namespace only
MAX_NODES = 250
_RUN_RE = re.compile(rf"^{PREFIX}-([0-9a-f]{{6}})-(br|n\d+)$")
_RATE_RE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)$")
_SIZE_RE = re.compile(r"^\d+(\.\d+)?(b|k|kb|m|mb|kbit|mbit)?$")
_TIME_RE = re.compile(r"^\d+(\.\d+)?(s|ms|us)$")


class EmuClusterError(RuntimeError):
    """The emulated cluster could not be set up or torn down (the message says what to do)."""


@dataclass(frozen=True)
class NetworkConfig:
    """How ranks of an emu-tier run are networked.

    emulate=False: loopback ranks, one machine, unshaped. emulate=True: one namespace per node
    of the topology's first level, each node's link shaped to `rate` both ways (tc tbf syntax:
    '200mbit', '1gbit'), `burst` the bucket ('256kb'; a small one starves concurrent pairs),
    `latency` tbf's queueing limit ('400ms'); `intra_rate` optionally shapes each node's `lo`.
    `fallback`: run on loopback (stating why) where namespaces are unavailable, else fail."""

    emulate: bool = False
    rate: str = "200mbit"
    burst: str = "256kb"
    latency: str = "400ms"
    intra_rate: str | None = None
    intra_burst: str = "1mb"
    fallback: bool = True


def check_network(net: NetworkConfig, flag_prefix: str | None = None) -> None:
    """Raise ValueError naming the first malformed field (before anything is created): as
    `network.<field>` for configs, or as the flag `--<flag_prefix><field>` of a CLI."""
    checks = [("rate", net.rate, _RATE_RE, "a tc rate such as 200mbit or 1gbit"),
              ("burst", net.burst, _SIZE_RE, "a tc size such as 256kb"),
              ("latency", net.latency, _TIME_RE, "a tc time such as 400ms"),
              ("intra_burst", net.intra_burst, _SIZE_RE, "a tc size such as 1mb")]
    if net.intra_rate is not None:
        checks.append(("intra_rate", net.intra_rate, _RATE_RE, "a tc rate such as 1gbit, or null"))
    for key, value, pattern, allowed in checks:
        if not isinstance(value, str) or not pattern.match(value):
            name = f"network.{key}" if flag_prefix is None else f"--{flag_prefix}{key.replace('_', '-')}"
            raise ValueError(f"{name}: {value!r} is not allowed; allowed: {allowed}")


def rate_bytes_per_s(rate: str) -> float:
    """'200mbit' -> 25e6 (tc's units: k = 1000; 'bit' rates are bits, 'bps' rates bytes)."""
    m = re.match(r"^(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)$", rate)
    if not m:
        raise ValueError(f"rate {rate!r} is not allowed; allowed: a tc rate such as 200mbit")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m[2]]
    return float(m[1]) * scale / (8 if m[3] == "bit" else 1)


# ==========================================================================================
# availability, names, state
# ==========================================================================================
def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (checked, not tried)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (running as uid %d)" % os.geteuid()
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not on PATH"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise EmuClusterError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _tc(netns: str, *args: str) -> None:
    proc = subprocess.run(["tc", "-n", netns, *args], capture_output=True, text=True)
    if proc.returncode:
        raise EmuClusterError(f"`tc -n {netns} {' '.join(args)}` failed: {proc.stderr.strip()}")


def _namespaces() -> list[str]:
    proc = _ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _process_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot), to tell a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(state: dict | None) -> bool:
    return bool(state) and _process_start(int(state.get("pid", -1))) == state.get("pid_start")


def _read_state(run: str) -> dict | None:
    try:
        return json.loads((STATE_DIR / f"{run}.json").read_text())
    except (OSError, ValueError):
        return None


def _runs() -> dict[str, dict]:
    """{run id: {'namespaces': [...], 'state': dict | None, 'alive': bool}} of every run with
    namespaces or a state file."""
    runs: dict[str, dict] = {}
    for ns in _namespaces():
        if m := _RUN_RE.match(ns):
            runs.setdefault(m[1], {"namespaces": []})["namespaces"].append(ns)
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob("*.json"):
            runs.setdefault(path.stem, {"namespaces": []})
    for run, info in runs.items():
        info["state"] = _read_state(run)
        info["alive"] = _owner_alive(info["state"])
    return runs


def _host_leftover_interfaces() -> list[str]:
    """Interfaces with our name pattern in the caller's namespace (never made there; a check)."""
    proc = _ip("-o", "link", "show", check=False)
    names = [line.split(":")[1].strip().split("@")[0] for line in proc.stdout.splitlines() if ":" in line]
    return [n for n in names if re.fullmatch(rf"{IF_PREFIX}[0-9a-f]{{6}}(br|[np]\d+)", n)]


def leftover_runs() -> dict[str, list[str]]:
    """{run id: its namespaces} of runs whose owner process is gone."""
    return {run: sorted(info["namespaces"]) for run, info in _runs().items() if not info["alive"]}


def cleanup(force: bool = False) -> list[str]:
    """Delete the namespaces (and state files) of runs whose owner died; with `force`, of every
    run with our prefix. Returns what was removed."""
    removed = []
    for run, info in sorted(_runs().items()):
        if info["alive"] and not force:
            continue
        for ns in sorted(info["namespaces"], key=lambda n: n.endswith("-br")):  # nodes, then the bridge
            if _ip("netns", "del", ns, check=False).returncode == 0:
                removed.append(ns)
        (STATE_DIR / f"{run}.json").unlink(missing_ok=True)
    for ifname in _host_leftover_interfaces():
        if _ip("link", "del", ifname, check=False).returncode == 0:
            removed.append(ifname)
    return removed


def status() -> list[str]:
    """One line per run: id, owner, alive or not, namespaces."""
    lines = []
    for run, info in sorted(_runs().items()):
        st = info["state"] or {}
        owner = f"pid {st['pid']}" if "pid" in st else "unknown owner"
        lines.append(f"{run}: {owner}, {'running' if info['alive'] else 'owner gone (cleanup removes it)'}; "
                     f"namespaces: {', '.join(sorted(info['namespaces'])) or 'none'}")
    return lines


# ==========================================================================================
# the cluster
# ==========================================================================================
class LoopbackCluster:
    """All ranks on this machine's loopback, unshaped (no emulation requested, or unavailable)."""

    def __init__(self, topology: Topology, network: NetworkConfig, reason: str | None = None):
        self.topology, self.network, self.reason = topology, network, reason
        self.emulated = False

    def site(self, rank: int) -> RankSite:
        return RankSite(rank // self.topology.gpus_per_node, None, "lo", "127.0.0.1")

    def describe(self) -> dict:
        out = {"emulated": False, "nodes": self.topology.num_nodes, "gpus_per_node": self.topology.gpus_per_node,
               "path": "loopback (lo), unshaped"}
        if self.network.emulate:
            out["requested"] = dataclasses.asdict(self.network)
            out["fallback_reason"] = self.reason
        return out


class EmulatedCluster:
    """One namespace per node plus a bridge namespace; see the module docstring. Use as a
    context manager (or `emulated_cluster`): everything it made is removed on exit, whatever
    ended the block (an error, KeyboardInterrupt, SIGTERM)."""

    emulated = True

    def __init__(self, topology: Topology, network: NetworkConfig):
        check_network(network)
        if topology.num_nodes > MAX_NODES:
            raise EmuClusterError(f"topology {topology.name!r} has {topology.num_nodes} nodes; "
                                  f"the emulated cluster allows at most {MAX_NODES}")
        self.topology, self.network = topology, network
        self.run = secrets.token_hex(3)
        self.bridge_ns = f"{PREFIX}-{self.run}-br"
        self.node_ns = [f"{PREFIX}-{self.run}-n{i}" for i in range(topology.num_nodes)]
        self._made: list[str] = []
        self._state = STATE_DIR / f"{self.run}.json"

    def ifname(self, node: int) -> str:
        return f"{IF_PREFIX}{self.run}n{node}"

    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def site(self, rank: int) -> RankSite:
        node = rank // self.topology.gpus_per_node
        return RankSite(node, self.node_ns[node], self.ifname(node), self.address(node))

    def describe(self) -> dict:
        net = self.network
        return {"emulated": True, "nodes": self.topology.num_nodes, "gpus_per_node": self.topology.gpus_per_node,
                "rate": net.rate, "burst": net.burst, "latency": net.latency,
                "intra_rate": net.intra_rate, "intra_burst": net.intra_burst if net.intra_rate else None,
                "path": "inter-node: veth + bridge, tc tbf on both ends; intra-node: lo "
                        + ("(tc tbf)" if net.intra_rate else "(unshaped)"),
                "namespaces": [self.bridge_ns, *self.node_ns]}

    def link_counters(self) -> dict[str, int]:
        """tc's counters summed over every shaped link (both ends of every node's veth, and `lo`
        where shaped): bytes and packets sent, packets dropped (queue over `latency`: TCP then
        retransmits) and overlimits (packets held back by the bucket)."""
        links = [(ns, self.ifname(i)) for i, ns in enumerate(self.node_ns)]
        links += [(self.bridge_ns, f"{IF_PREFIX}{self.run}p{i}") for i in range(len(self.node_ns))]
        if self.network.intra_rate:
            links += [(ns, "lo") for ns in self.node_ns]
        total = {"bytes": 0, "packets": 0, "drops": 0, "overlimits": 0}
        for ns, dev in links:
            proc = subprocess.run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev], capture_output=True, text=True)
            for qdisc in (json.loads(proc.stdout or "[]") if proc.returncode == 0 else []):
                if qdisc.get("kind") == "tbf":
                    for key in total:
                        total[key] += int(qdisc.get(key, 0))
        return total

    # ---- lifecycle -------------------------------------------------------------------------
    def up(self) -> "EmulatedCluster":
        stale = leftover_runs()
        if stale:
            names = ", ".join(ns for nss in stale.values() for ns in nss) or ", ".join(f"state of run {r}" for r in stale)
            raise EmuClusterError(f"leftovers of an earlier emulated-cluster run whose owner is gone: {names}; "
                                  f"remove them with `python -m impl.common.emu_cluster cleanup` (as root)")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        self._state.write_text(json.dumps({"pid": pid, "pid_start": _process_start(pid), "run": self.run,
                                           "namespaces": [self.bridge_ns, *self.node_ns], "created": time.time()}))
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _shape(self, netns: str, dev: str, rate: str, burst: str) -> None:
        _tc(netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
            "latency", self.network.latency)

    def _build(self) -> None:
        net, br = self.network, f"{IF_PREFIX}{self.run}br"
        self._add_ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", br, "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", br, "up")
        for i, ns in enumerate(self.node_ns):
            self._add_ns(ns)
            port = f"{IF_PREFIX}{self.run}p{i}"
            _ip("link", "add", self.ifname(i), "netns", ns, "type", "veth", "peer", "name", port,
                "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", br)
            _ip("-n", self.bridge_ns, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.ifname(i))
            _ip("-n", ns, "link", "set", self.ifname(i), "up")
            self._shape(ns, self.ifname(i), net.rate, net.burst)            # out of node i
            self._shape(self.bridge_ns, port, net.rate, net.burst)          # into node i
            if net.intra_rate:
                self._shape(ns, "lo", net.intra_rate, net.intra_burst)

    def down(self) -> list[str]:
        """Delete every namespace this run made (node namespaces first) and its state file."""
        errors = []
        for ns in sorted(self._made, key=lambda n: n == self.bridge_ns):
            proc = _ip("netns", "del", ns, check=False)
            if proc.returncode and ns in _namespaces():
                errors.append(f"{ns}: {proc.stderr.strip()}")
        self._made.clear()
        self._state.unlink(missing_ok=True)
        if errors:
            raise EmuClusterError("could not delete " + "; ".join(errors)
                                  + "; run `python -m impl.common.emu_cluster cleanup`")
        return errors

    def __enter__(self) -> "EmulatedCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


@contextlib.contextmanager
def emulated_cluster(topology: Topology, network: NetworkConfig | None = None
                     ) -> Iterator[EmulatedCluster | LoopbackCluster]:
    """The cluster a run's ranks live on: an EmulatedCluster when `network.emulate` and
    namespaces are available, else a LoopbackCluster (with the reason when emulation was asked
    for and `network.fallback` allows it; EmuClusterError otherwise)."""
    network = network or NetworkConfig()
    if not network.emulate:
        yield LoopbackCluster(topology, network)
        return
    check_network(network)
    reason = unavailable_reason()
    if reason is not None:
        if not network.fallback:
            raise EmuClusterError(f"cannot emulate the network: {reason} (network.fallback is false)")
        print(f"[emu_cluster] falling back to loopback ranks: {reason}", file=sys.stderr)
        yield LoopbackCluster(topology, network, reason)
        return
    with terminate_as_exit(), EmulatedCluster(topology, network) as cluster:
        yield cluster


# ==========================================================================================
# command line
# ==========================================================================================
def _probe(comm, nbytes: int, repeats: int) -> dict:
    """Per-rank: time an equal-split AlltoAll over the inter-node and the intra-node groups."""
    import torch

    from .costmodel import step_name

    out = {}
    for kind, level in (("inter", 1), ("intra", 1)):
        try:
            group = comm.group(kind, level)
        except Exception:  # noqa: BLE001 - a one-level topology has no such step
            continue
        if group.size == 1:
            continue
        per_peer = nbytes // 4 // group.size
        x = torch.ones(per_peer * group.size, dtype=torch.float32)
        splits = [per_peer] * group.size
        comm.all_to_all(x, splits, splits, group)  # connect
        times = []
        for _ in range(repeats):
            comm.barrier()
            t0 = time.perf_counter()
            comm.all_to_all(x, splits, splits, group)
            times.append(time.perf_counter() - t0)
        out[step_name(kind, level)] = {"fan": group.size, "bytes_to_others": per_peer * 4 * (group.size - 1),
                                       "seconds": sorted(times)[len(times) // 2]}
    return out


def _run_probe(topology: Topology, cluster, nbytes: int, repeats: int, timeout_s: float) -> int:
    results = launch(_probe, topology.G, args=(nbytes, repeats), topology=topology, cluster=cluster,
                     timeout_s=timeout_s, deadline_s=max(120.0, 4 * timeout_s))
    for step in results[0]:
        slowest = max(r[step]["seconds"] for r in results)
        r0 = results[0][step]
        per_node = r0["bytes_to_others"] * (topology.gpus_per_node if step.startswith("inter") else 1)
        print(f"{step:<8} fan {r0['fan']}: {r0['bytes_to_others'] / 1e6:.1f} MB from each rank to the others of its "
              f"group in {slowest:.2f} s (slowest rank): {per_node / slowest / 1e6:.1f} MB/s out of each "
              f"{'node' if step.startswith('inter') else 'rank'}")
    return 0


def _run_command(topology: Topology, cluster, command: Sequence[str], timeout_s: float) -> int:
    """Start `command` once per rank inside its node's namespace with torchrun's variables; the
    first rank to fail is named and the others are stopped; returns the job's exit code."""
    procs: list[subprocess.Popen] = []
    port = "29500"   # the namespaces are fresh: nothing else listens in them
    try:
        for rank in range(topology.G):
            site = cluster.site(rank)
            env = {"RANK": str(rank), "WORLD_SIZE": str(topology.G), "LOCAL_RANK": str(rank % topology.gpus_per_node),
                   "LOCAL_WORLD_SIZE": str(topology.gpus_per_node), "GROUP_RANK": str(site.node),
                   "NODE_RANK": str(site.node), "MASTER_ADDR": cluster.site(0).address, "MASTER_PORT": port,
                   "GLOO_SOCKET_IFNAME": site.ifname, "MOE_COLLECTIVE_TIMEOUT_S": str(timeout_s)}
            prefix = ["ip", "netns", "exec", site.netns] if site.netns else []
            argv = [*prefix, "env", *(f"{k}={v}" for k, v in env.items()), *command]
            procs.append(subprocess.Popen(argv, start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                r = failed[0]
                print(f"[emu_cluster] rank {r} exited with code {codes[r]}; stopping the others", file=sys.stderr)
                return codes[r]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m impl.common.emu_cluster", description=cli.describe(__doc__))
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="bring up an emulated cluster, run a probe or a command per rank, tear down")
    run.add_argument("--topology", required=True, help="NxG (nodes x GPUs per node) or any topology name")
    run.add_argument("--rate", default="200mbit", help="each node's link, both directions (tc rate)")
    run.add_argument("--burst", default="256kb", help="tbf bucket (tc size)")
    run.add_argument("--latency", default="400ms", help="tbf queueing limit (tc time; no delay is added)")
    run.add_argument("--intra-rate", default=None, help="shape each node's lo (intra-node path) too")
    run.add_argument("--probe-bytes", default=16 * 2**20, type=cli.number(int, ge=1, le=1 << 34),
                     help="probe AlltoAll size per rank")
    run.add_argument("--repeats", default=3, type=cli.number(int, ge=1, le=MAX_REPEATS), help="probe repeats (median)")
    run.add_argument("--timeout", default=120.0, type=cli.number(float, gt=0, le=MAX_SECONDS),
                     help="collective timeout in seconds")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS: run once per rank instead of the probe")
    sub.add_parser("status", help="list emulated-cluster runs on this machine")
    clean = sub.add_parser("cleanup", help="remove the namespaces of runs whose owner process is gone")
    clean.add_argument("--force", action="store_true", help="also remove runs whose owner is still alive")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.cmd == "status":
        print("\n".join(status()) or "no emulated-cluster runs")
        return 0
    if args.cmd == "cleanup":
        if (reason := unavailable_reason()) is not None:
            print(f"{p.prog}: error: {reason}", file=sys.stderr)
            return 2
        removed = cleanup(force=args.force)
        print(f"removed: {', '.join(removed)}" if removed else "nothing to remove")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        topology = checked("--topology", get_topology, args.topology)
        network = NetworkConfig(emulate=True, rate=args.rate, burst=args.burst, latency=args.latency,
                                intra_rate=args.intra_rate)
        check_network(network, flag_prefix="")
        if not command:     # the probe's send and receive buffers on every rank
            check_host_memory(2 * args.probe_bytes * topology.G, "--probe-bytes")
    except (TopologyError, ValueError) as e:
        return cli.fail(p, e)
    with emulated_cluster(topology, network) as cluster:
        print(f"[emu_cluster] {json.dumps(cluster.describe())}", file=sys.stderr)
        if command:
            return _run_command(topology, cluster, command, args.timeout)
        return _run_probe(topology, cluster, args.probe_bytes, args.repeats, args.timeout)


if __name__ == "__main__":
    from impl.common.emu_cluster import main as _main  # the importable module, so spawned ranks can unpickle

    sys.exit(_main())
