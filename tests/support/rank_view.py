"""`RankView`: one rank of a topology as one process sees it, with its collectives answered
locally, as though the rank were alone: to time a rank's own compute around its collectives
(benchmarks), not the collectives."""
from __future__ import annotations

from impl.common.comm import Comm, Handle


class RankView(Comm):
    """Rank `rank` of `topology`; a reduction returns its own tensor, a gather its own tensor
    alone, an all-to-all the rows it sends itself."""

    backend = "view"

    def __init__(self, topology, rank: int = 0):
        super().__init__(topology, rank)

    def _make_lane(self, name):
        raise NotImplementedError("the single-rank view has no lanes")

    def _all_to_all(self, x, send_splits, recv_splits, group):
        raise NotImplementedError

    def _all_reduce(self, x, op, group):
        return x.clone()

    def _all_gather_cat(self, x, group):
        return x.clone()

    def _reduce_scatter(self, x, group):
        return x[: x.shape[0] // group.size].clone()

    def _start(self, run, kind, x, group, **args):
        return Handle(run)

    # answered locally: no group to resolve
    def all_to_all(self, x, send_splits, recv_splits, group=None, **counting):
        me = self.rank if group is None else group.index(self.rank)
        return x.split([int(s) for s in send_splits])[me].clone()

    def all_reduce(self, x, op="sum", group=None, **counting):
        return x.clone()

    def all_gather(self, x, group=None, **counting):
        return [x.clone()]

    def all_gather_object(self, obj):
        return [obj]

    def barrier(self, group=None):
        pass
