import pytest
import torch

from impl.common.comm import CommError, SimWorld, all_to_all_autograd
from impl.common.topology import get_topology


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
