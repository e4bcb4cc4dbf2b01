"""Every implementation registered before collection, so tests parametrised over a registry kind
(`impl.common.registry.names`) cover all of them.

`pytest --emulate-network RATE` runs the ranks of every multi-process test (everything started
with `impl.common.launcher.launch`: our dispatchers, the real megatron-core and DeepSpeed
baselines) on an emulated cluster of the test's topology, each node in its own network namespace
with its link shaped to RATE (`impl.common.emu_cluster`; loopback, with the reason printed, where
namespaces are unavailable)."""
import impl.experiments.systems  # noqa: F401


def pytest_addoption(parser):
    parser.addoption("--emulate-network", metavar="RATE", default=None,
                     help="run launched ranks on an emulated cluster whose node links are shaped to RATE (tc rate, "
                          "e.g. 1gbit); needs root, ip and tc")


def pytest_configure(config):
    rate = config.getoption("--emulate-network")
    if not rate:
        return
    from impl.common import launcher
    from impl.common.emu_cluster import NetworkConfig, check_network, emulated_cluster
    from impl.common.topology import get_topology

    network = NetworkConfig(emulate=True, rate=rate)
    check_network(network)
    plain = launcher.launch

    def launch_on_emulated_cluster(fn, world_size, args=(), kwargs=None, *, topology=None, cluster=None, **options):
        if cluster is not None:
            return plain(fn, world_size, args, kwargs, topology=topology, cluster=cluster, **options)
        topo = get_topology(topology or f"1x{world_size}") if not hasattr(topology, "G") else topology
        with emulated_cluster(topo, network) as emulated:
            return plain(fn, world_size, args, kwargs, topology=topo, cluster=emulated, **options)

    launcher.launch = launch_on_emulated_cluster
