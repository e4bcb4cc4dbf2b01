"""FSMoE's hybrid parallel layout and the per-GPU sizes of one MoE layer's tasks.

With `esp` (the paper's layout, §2.2 / digest §1.5): MP (sequence-parallel attention) and ESP
span the G_n GPUs of a node, EP spans the nodes: the expert-parallel group of a GPU is the GPUs
with the same local index on every node (`inter-1`), its ESP group the node (`intra-1`); each
node holds E / N experts, each sharded over the node's GPUs (H / G_n columns each); the dense
parameters' gradient AllReduce runs over the EP group (one GPU per node, same local index).
Without `esp`: EP over every GPU, no ESP.

Per-GPU sizes in elements (digest §1.5), with T_local = B L / N_ESP tokens per GPU and C the
capacity per expert: n_a2a = E C M (= k f B L M / N_ESP, each AlltoAll), n_ag = n_rs = N_ESP E C M
(= k f B L M), n_exp = g n_ag H / N_ESP (GEMM work units, tokens x M x H). They count whole
buffers; the traffic counters count the point-to-point messages, i.e. the part that leaves the
GPU: n (P - 1) / P for a group of P (tests/unit/test_fsmoe_layer.py checks both).
"""
from __future__ import annotations

from dataclasses import dataclass

from impl.common.comm import Comm, CommGroup
from impl.common.config import ConfigError
from impl.common.topology import Topology

from .config import MoELayerConfig

__all__ = ["HybridLayout", "TaskSizes"]


@dataclass(frozen=True)
class TaskSizes:
    """Elements (n_a2a, n_ag, n_rs) and GEMM work units (n_exp, tokens x M x H) of one forward
    pass of one layer on one GPU."""

    n_a2a: int
    n_ag: int
    n_rs: int
    n_exp: int


@dataclass(frozen=True)
class HybridLayout:
    topology: Topology
    n_esp: int          # GPUs sharing each expert (the node's GPUs, or 1)
    n_ep: int           # members of the expert-parallel group
    experts_per_member: int

    @classmethod
    def of(cls, topology: Topology, cfg: MoELayerConfig) -> "HybridLayout":
        """The layout of `cfg` on `topology`; ConfigError if the experts do not divide over it."""
        if cfg.esp:
            if topology.D < 2:
                raise ConfigError(f"esp: true needs a topology with nodes (at least two levels); "
                                  f"{topology.name!r} has one level; allowed: esp: false")
            n_esp, n_ep = topology.gpus_per_node, topology.num_nodes
        else:
            n_esp, n_ep = 1, topology.G
        if cfg.num_experts % n_ep:
            raise ConfigError(f"num_experts: {cfg.num_experts} is not divisible by the expert-parallel size "
                              f"{n_ep} ({'nodes' if cfg.esp else 'GPUs'} of {topology.name!r}); allowed: a "
                              f"multiple of {n_ep}")
        if cfg.ffn_hidden % n_esp:
            raise ConfigError(f"ffn_hidden: {cfg.ffn_hidden} is not divisible by the ESP size {n_esp} "
                              f"(GPUs per node of {topology.name!r}); allowed: a multiple of {n_esp}")
        return cls(topology, n_esp, n_ep, cfg.num_experts // n_ep)

    def ep_group(self, comm: Comm) -> CommGroup:
        return comm.group("inter", 1) if self.n_esp > 1 else comm.world

    def esp_group(self, comm: Comm) -> CommGroup | None:
        return comm.group("intra", 1) if self.n_esp > 1 else None

    def dp_group(self, comm: Comm) -> CommGroup:
        """Where the dense parameters' gradients are all-reduced: across nodes (same local index)."""
        return self.ep_group(comm)

    def ep_index(self, rank: int) -> int:
        return rank // self.n_esp if self.n_esp > 1 else rank

    def esp_index(self, rank: int) -> int:
        return rank % self.n_esp

    def local_experts(self, rank: int) -> list[int]:
        """Global ids of the experts whose shard `rank` holds."""
        first = self.ep_index(rank) * self.experts_per_member
        return list(range(first, first + self.experts_per_member))

    def sizes(self, cfg: MoELayerConfig, capacity: int) -> TaskSizes:
        """One forward pass's per-GPU sizes for capacity C per expert."""
        n_a2a = cfg.num_experts * capacity * cfg.hidden
        n_ag = self.n_esp * n_a2a
        # n_ag rows through g GEMMs of M x (H / N_ESP): g E C M H
        return TaskSizes(n_a2a, n_ag, n_ag, cfg.gemms * cfg.num_experts * capacity * cfg.hidden * cfg.ffn_hidden)
