import pytest
import torch

from impl.common.comm import CommError, SimWorld, all_gather_autograd, all_to_all_autograd, reduce_scatter_autograd
from impl.common.topology import get_topology
from tests.support import host_exchange
from tests.support.rank_view import RankView


def _exchange(comm):
    G = comm.world_size
    send = [(comm.rank + j) % 3 for j in range(G)]
    recv = comm.exchange_counts(send)
    x = torch.arange(sum(send), dtype=torch.float64)[:, None] + 100 * comm.rank
    return comm.all_to_all(x, send, recv).squeeze(1).tolist(), recv


def test_sim_all_to_all_uneven_and_zero_splits():
    out = SimWorld(get_topology("1x3")).run(_exchange)
    # rank r sends (r + j) % 3 rows to rank j; rows are numbered per sender
    assert out[0] == ([100.0, 200.0, 201.0], [0, 1, 2])
    assert out[1] == ([0.0, 101.0, 102.0], [1, 2, 0])
    assert out[2] == ([1.0, 2.0, 202.0], [2, 0, 1])


def test_sim_traffic_per_level_and_subgroups():
    topo = get_topology("2x2")

    def body(comm):
        g = comm.group("inter", 1)
        x = torch.ones(g.size * 3, 4, dtype=torch.float32)
        comm.all_to_all(x, [3] * g.size, [3] * g.size, g)
        return g.ranks, comm.all_reduce(torch.tensor([comm.rank]), "max", g).item()

    world = SimWorld(topo)
    res = world.run(body)
    assert res[0] == ((0, 2), 2) and res[3] == ((1, 3), 3)
    tr = world.total_traffic()
    # inter-1 groups cross nodes only: 4 ranks x 1 peer x 3 rows x 16 bytes
    assert tr.by_level("bytes") == {"node": 4 * 3 * 16, "gpu": 0}
    assert tr.by_level("messages") == {"node": 4, "gpu": 0}


def test_autograd_all_to_all_backward_is_reverse_exchange():
    def body(comm):
        G = comm.world_size
        send = [comm.rank + 1] * G
        recv = comm.exchange_counts(send)
        x = torch.randn(sum(send), 2, dtype=torch.float64, requires_grad=True)
        y = all_to_all_autograd(comm, x, send, recv)
        (y * (comm.rank + 1)).sum().backward()
        # each row lands on rank j, which weights it by j + 1
        expected = torch.cat([torch.full((comm.rank + 1, 2), float(j + 1), dtype=torch.float64) for j in range(G)])
        return torch.equal(x.grad, expected), comm.traffic.by_level("rows", phase="bwd")

    for ok, rows in SimWorld(get_topology("1x3")).run(body):
        assert ok and rows["gpu"] > 0


def test_sim_failure_names_rank_and_does_not_hang():
    def body(comm):
        if comm.rank == 2:
            raise ValueError("boom")
        comm.barrier()

    with pytest.raises(CommError, match=r"simulated rank 2 failed: ValueError: boom"):
        SimWorld(get_topology("1x4"), timeout_s=30).run(body)


def test_sim_mismatched_splits_detected():
    def body(comm):
        x = torch.zeros(2, 1)
        return comm.all_to_all(x, [1, 1], [1, 2 if comm.rank == 0 else 1])

    with pytest.raises(CommError, match="expects 2 rows from rank 1"):
        SimWorld(get_topology("1x2"), timeout_s=30).run(body)


def test_split_count_checks():
    def body(comm):
        comm.all_to_all(torch.zeros(3, 1), [1, 1], [1, 1])

    with pytest.raises(CommError, match="send splits sum to 2, tensor has 3 rows"):
        SimWorld(get_topology("1x2"), timeout_s=30).run(body)


# ---- AllGather, ReduceScatter, AllReduce, async handles, lanes ---------------------------------
def _collectives(comm):
    """Every collective kind on a 2x2 topology: results plus this rank's traffic per kind."""
    r = comm.rank
    node = comm.group("intra", 1)                       # the rank's node (2 GPUs)
    x = torch.arange(4 * 3, dtype=torch.float64).reshape(4, 3) + 100 * r
    ag = comm.all_gather_cat(x[:1], node)
    rs = comm.reduce_scatter(x, node)
    ar = comm.all_reduce(torch.full((5,), float(r)), "sum")
    handle = comm.all_to_all_async(x, [1] * 4, [1] * 4)
    mx = comm.all_reduce(torch.tensor([r]), "max")       # issued while the async one may still run
    return {"ag": ag, "rs": rs, "ar": ar, "a2a": handle.wait(), "max": mx,
            "traffic": {k: comm.traffic.by_level("bytes", category=None, phase=None, kind=k) for k in
                        ("ag", "rs", "ar", "a2a")}}


def test_all_gather_reduce_scatter_all_reduce_and_async_on_sim_ranks():
    topo = get_topology("2x2")
    out = SimWorld(topo).run(_collectives)
    xs = [torch.arange(12, dtype=torch.float64).reshape(4, 3) + 100 * r for r in range(4)]
    for r, res in enumerate(out):
        node = [0, 1] if r < 2 else [2, 3]
        assert torch.equal(res["ag"], torch.cat([xs[m][:1] for m in node]))
        me = node.index(r)
        assert torch.equal(res["rs"], (xs[node[0]] + xs[node[1]])[2 * me:2 * me + 2])
        assert torch.equal(res["ar"], torch.full((5,), 6.0))
        assert torch.equal(res["a2a"], torch.stack([xs[j][r] for j in range(4)]))
        assert res["max"].item() == 3
        t = res["traffic"]
        # AllGather: one 1x3 float64 block to the one other node member; ReduceScatter: its 2-row block
        assert t["ag"] == {"node": 0, "gpu": 24} and t["rs"] == {"node": 0, "gpu": 48}
        # AllReduce of 5 float32 over 4 ranks: chunks 2,1,1,1 scattered, then this rank's chunk to
        # all; plus the max of one int64 (chunks 1,0,0,0)
        sent = {j: ([2, 1, 1, 1][j] + [2, 1, 1, 1][r]) * 4 + ([1, 0, 0, 0][j] + [1, 0, 0, 0][r]) * 8
                for j in range(4) if j != r}
        level = lambda j: "gpu" if j // 2 == r // 2 else "node"  # noqa: E731
        assert t["ar"] == {"node": sum(v for j, v in sent.items() if level(j) == "node"),
                           "gpu": sum(v for j, v in sent.items() if level(j) == "gpu")}
        assert t["a2a"] == {"node": 2 * 24, "gpu": 24}


def test_reduce_on_host_is_all_reduce_returned_on_the_cpu():
    """The small tables the host reads: the same reduction as `all_reduce`, on the CPU."""
    def job(comm):
        x = torch.tensor([comm.rank, 1, -comm.rank], dtype=torch.int64)
        host = comm.reduce_on_host(x, "max")
        return host, comm.all_reduce(x, "max")

    for host, plain in SimWorld(get_topology("1x2")).run(job):
        assert host.device.type == "cpu" and torch.equal(host, plain) and host.tolist() == [1, 1, 0]


@pytest.mark.parametrize("topo_name", ["1x1", "1x3", "2x2"])
def test_all_to_all_on_host_equals_brute_force_with_ragged_and_empty_splits(topo_name):
    """The host-side all-to-all on simulated ranks: every rank's rows from every source in rank
    order, on the CPU, counted as metadata (ragged and empty splits: `tests.support.host_exchange`)."""
    topo = get_topology(topo_name)
    world = SimWorld(topo)
    for rank, got in enumerate(world.run(host_exchange.host_all_to_all)):
        assert got.device.type == "cpu" and got.dtype == torch.int64
        assert torch.equal(got, host_exchange.reference(rank, topo.G))
    rows = world.total_traffic().by_level("rows", category="meta")
    sent = sum(host_exchange.send_splits(r, topo.G)[j] for r in range(topo.G) for j in range(topo.G) if j != r)
    assert sum(rows.values()) == sent


@pytest.mark.parametrize("topo_name", ["1x1", "1x3", "2x2"])
def test_all_to_all_on_host_of_the_single_rank_view_is_what_it_sends_itself(topo_name):
    """The single-rank view answers locally: of the brute-force result, the block from itself
    (all of it on a one-rank topology), on the CPU."""
    topo = get_topology(topo_name)
    for rank in range(topo.G):
        got = host_exchange.host_all_to_all(RankView(topo, rank))
        mine = host_exchange.rows_of(rank, topo.G).split(host_exchange.send_splits(rank, topo.G))[rank]
        assert got.device.type == "cpu" and torch.equal(got, mine)
        if topo.G == 1:
            assert torch.equal(got, host_exchange.reference(rank, 1))


def test_gather_and_scatter_autograd_twins():
    def body(comm):
        x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(comm.rank),
                        requires_grad=True)
        w = torch.arange(comm.world_size * 2 * 3, dtype=torch.float64).reshape(-1, 3)
        (all_gather_autograd(comm, x) * w).sum().backward()
        g_ag = x.grad.clone()
        x.grad = None
        y = reduce_scatter_autograd(comm, torch.cat([x] * comm.world_size))
        (y * (comm.rank + 1)).sum().backward()
        return g_ag, x.grad, comm.traffic.by_level("rows", category="tokens", phase="bwd", kind="rs")

    G = 3
    for r, (g_ag, g_rs, rows) in enumerate(SimWorld(get_topology(f"1x{G}")).run(body)):
        w = torch.arange(G * 6, dtype=torch.float64).reshape(-1, 3)
        # d/dx_r of sum_j (w_j-block . x_r) over every member j that gathered x_r
        assert torch.equal(g_ag, G * w[2 * r:2 * r + 2])
        # x_r appears in every member's reduce-scatter input, once in each block j, weighted by j + 1
        assert torch.equal(g_rs, torch.full((2, 3), float(sum(j + 1 for j in range(G))), dtype=torch.float64))
        assert rows["gpu"] == 2 * (G - 1)


def test_lanes_run_concurrently_without_mixing_collectives():
    """Two lanes per rank, each driven by its own thread, issue collectives in different
    interleavings: every result is right and nothing deadlocks."""
    import threading

    def body(comm):
        inter, intra = comm.lane("inter"), comm.lane("intra")
        out = {}

        def run(lane, key, n):
            vals = []
            for i in range(n):
                vals.append(lane.all_reduce(torch.tensor([float(comm.rank + i)]), "sum").item())
            out[key] = vals

        threads = [threading.Thread(target=run, args=(inter, "inter", 5)),
                   threading.Thread(target=run, args=(intra, "intra", 3))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    for res in SimWorld(get_topology("1x4"), timeout_s=30).run(body):
        assert res["inter"] == [6.0 + 4 * i for i in range(5)] and res["intra"] == [6.0 + 4 * i for i in range(3)]


def test_reduce_scatter_needs_divisible_rows():
    def body(comm):
        comm.reduce_scatter(torch.zeros(3, 1))

    with pytest.raises(CommError, match="rows divisible by the group size 2"):
        SimWorld(get_topology("1x2"), timeout_s=10).run(body)
