"""FSMoE's performance models: every task of a Transformer block is linear, t(n) = alpha + beta n
(digest §2.2), and a pass of the MoE layer split into r chunks costs, per chunk,

    t_x(r) = alpha_x + (n_x / r) beta_x        for x in a2a, ag, rs, exp.

`block_costs(shape, profile)` instantiates them for one block of the paper's layout (sizes of
digest §1.5, models of a hardware profile): the forward and backward `PassModel`s of the MoE layer
(backward: the expert's alpha and beta doubled, input and weight gradients), the dense part
(attention, projections, gate, the MP AllGather / ReduceScatter of sequence parallelism), the
dense parameters' gradient volume and the AllReduce model that carries it.

What is ours where the paper is silent (each a documented choice, not a published number):
* the no-drop capacity (f = '*') is modeled with factor 1, as the released harness does;
* GEMM work is counted in multiply-accumulates (m n k) and an expert's g GEMMs each cost the
  GEMM model's alpha: alpha_exp = g alpha_gemm, n_exp = g E C M H (g counted once);
* the dense part's compute is the GEMM model applied to its GEMMs: Q, K, V and O projections
  (K and V of width M n_kv / n_heads under grouped-query attention), the attention core as two
  GEMMs per head (Q K^T and A V: 2 L^2 d per sample and head) and the router (M x E); heads and
  projection columns are split over the N_MP = N_ESP GPUs of a node; its backward is 2x; the
  router's GEMMs depend on the gate (`ROUTER_MACS`), its top-k and the ordering are not charged;
* sequence parallelism moves B L M elements per AllGather / ReduceScatter on the intra-node link,
  one of each per pass (AllGather before attention, ReduceScatter after), each priced with its
  own model;
* the dense gradient volume per GPU is the released optimiser's: GPT 3M^2/N_MP + 3M/N_MP + M^2/N_MP
  + M, Mixtral (1 + 2 n_kv / n_heads) M^2 / N_MP + M^2 / N_MP (digest §4.1).

GShard ordering (`gshard_order`), charged only where an experiment asks for it (a DeepSpeed-MoE
ablation; FSMoE and Tutel order by sparse index, whose cost no system is charged): digest §1.2
names it "einsum plus matrix multiplication with a one-hot dispatch mask", §5.3 says the released
harness emulates DeepSpeed-MoE with "a DS dispatch/combine"; the sizes and GEMM shapes below are
our reconstruction from DeepSpeed's `sharded_moe` (its `einsum` helper's matmul for each rule).
With S tokens on a GPU, E experts of capacity C, M hidden, one GEMM of the one-hot [S, E C]
dispatch mask or combine weights against the tokens costs S E C M multiply-accumulates:

    forward   dispatch 'sec,sm->ecm'   [E C, S] x [S, M]      1 GEMM
              combine  'sec,ecm->sm'   [S, E C] x [E C, M]    1 GEMM
    backward  dispatch: the tokens' gradient [S, E C] x [E C, M] (the mask has none)  1 GEMM
              combine: the expert output's [E C, S] x [S, M] and the combine
              weights' [S, M] x [M, E C]                                           2 GEMMs

each priced with the profile's GEMM model, the experts' (alpha per GEMM, beta per
multiply-accumulate): forward 2 (alpha + beta S E C M), backward 3 (alpha + beta S E C M).
C = ceil(k f S / E), DeepSpeed's `_capacity` (ceil(S / E * capacity_factor * k) for top-k) and
ours; so E C is about k f S and the cost about k f S^2 M, whatever the number of experts (E
changes it only through C's rounding). S per GPU ('tokens'): 'sequence-parallel' B L / N_MP (the
MoE input of digest §1.5), or 'replicated' B L: tensor-parallel attention synchronised by
AllReduce leaves every GPU of the MP group with the block's B L tokens, and DeepSpeed's
`MOELayer.forward` orders all of them before `drop_tokens` splits the capacity over the MP group
(so the AlltoAlls carry the same E C M / N_MP per GPU as ours). Not charged (reconstruction): the
gate's element-wise [S, E, C] products (the one-hot locations times the gates, memory-bound; the
profile has no model for them) and DeepSpeed's `min_capacity` floor. The ordering is added to the
dense part's compute task of the block, exact for the one-lane plans it is charged to (on one lane
where a task sits does not change the makespan).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from impl.common import ordering
from impl.common.config import ConfigError
from impl.common.costmodel import HardwareProfile, LinearModel

__all__ = ["BlockShape", "ChunkModel", "PassModel", "BlockCosts", "block_costs", "ROUTER_MACS", "ORDER_TOKENS",
           "EINSUM_ORDER_GEMMS", "OrderCost", "gshard_order", "with_gshard_order"]

# The router's multiply-accumulates per token, per gate (M hidden, E experts): GShard's noisy
# top-k has a second projection for its noise scale; X-MoE projects to 16 dimensions first
# (its default low-rank size) and scores by cosine against E expert embeddings.
ROUTER_MACS = {"gshard": lambda M, E: 2 * M * E, "sigmoid": lambda M, E: M * E,
               "xmoe": lambda M, E: 16 * M + 16 * E, "expert_choice": lambda M, E: M * E}


@dataclass(frozen=True)
class BlockShape:
    """One Transformer block of FSMoE's experiments (Table 4's grid and the real models)."""

    batch: int                     # B, samples per GPU group (per MP group)
    seq: int                       # L
    hidden: int                    # M
    ffn_hidden: int                # H
    heads: int
    num_experts: int               # E
    top_k: int = 1
    capacity_factor: float | None = 1.2     # None: no drop (modeled with factor 1)
    ffn: Literal["gpt", "mixtral"] = "gpt"
    kv_heads: int | None = None             # grouped-query attention (Mixtral); None = heads
    bytes_per_elem: int = 4                 # the paper's runs are fp32
    gate: Literal["gshard", "sigmoid", "xmoe", "expert_choice"] = "gshard"

    def __post_init__(self):
        for key in ("batch", "seq", "hidden", "ffn_hidden", "heads", "num_experts", "top_k", "bytes_per_elem"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}: {v!r} is not allowed; allowed: an integer >= 1")
        if self.ffn not in ("gpt", "mixtral"):
            raise ConfigError(f"ffn: {self.ffn!r} is not allowed; allowed: 'gpt', 'mixtral'")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor: {self.capacity_factor!r} is not allowed; allowed: > 0 or null")
        if self.gate not in ROUTER_MACS:
            raise ConfigError(f"gate: {self.gate!r} is not allowed; allowed: {', '.join(map(repr, ROUTER_MACS))}")

    @property
    def gemms(self) -> int:
        return 3 if self.ffn == "mixtral" else 2


@dataclass(frozen=True)
class ChunkModel:
    """t(r) = alpha + work / r: one chunk of a task split r ways (`work` = n beta, in ms); never
    below 0 (a least-squares fit of noisy measurements can have a negative intercept)."""

    alpha: float
    work: float

    def at(self, r: float) -> float:
        return max(0.0, self.alpha + self.work / r)

    def scaled(self, factor: float) -> "ChunkModel":
        return ChunkModel(self.alpha * factor, self.work * factor)


@dataclass(frozen=True)
class PassModel:
    """One pass (forward or backward) of one MoE layer: the four chunk models and the time of the
    gradient slice t_gar pushed into it (0 in the forward)."""

    a2a: ChunkModel
    ag: ChunkModel
    rs: ChunkModel
    exp: ChunkModel
    t_gar: float = 0.0

    def with_gar(self, t_gar: float) -> "PassModel":
        return replace(self, t_gar=max(0.0, float(t_gar)))

    def single_lane(self) -> "PassModel":
        """The harness's single-stream model (Tutel, FSMoE-No-IIO): AllGather and ReduceScatter
        folded into the AlltoAll, which then carries all communication; no intra-node task."""
        zero = ChunkModel(0.0, 0.0)
        a2a = ChunkModel(self.a2a.alpha + (self.ag.alpha + self.rs.alpha) / 2,
                         self.a2a.work + (self.ag.work + self.rs.work) / 2)
        return replace(self, a2a=a2a, ag=zero, rs=zero)

    def duration(self, kind: str, r: int) -> float:
        """ms of one task of `kind` in a pass of degree r ('dispatch' and 'combine' are AlltoAlls)."""
        if kind in ("dispatch", "combine"):
            return self.a2a.at(r)
        if kind == "gar":
            return self.t_gar
        return {"ag": self.ag, "rs": self.rs, "expert": self.exp}[kind].at(r)


@dataclass(frozen=True)
class BlockCosts:
    shape: BlockShape
    n_esp: int
    n_ep: int
    capacity: int
    fwd: PassModel
    bwd: PassModel
    dense_fwd_ms: float            # attention + projections + router, compute lane
    dense_bwd_ms: float
    mp_ag_ms: float                # the sequence-parallel AllGather, intra lane
    mp_rs_ms: float                # the sequence-parallel ReduceScatter, intra lane
    grad_bytes: int                # dense parameters' gradient per GPU
    allreduce: LinearModel         # over the data-parallel (inter-node) group
    gemm: LinearModel              # the GEMM model every compute task is priced with

    def t_ar(self, nbytes: float) -> float:
        """AllReduce time of `nbytes` (0 for nothing to reduce)."""
        return self.allreduce.time_ms(nbytes) if nbytes > 0 else 0.0

    def ar_bytes(self, t_ms: float) -> float:
        """g_inv: bytes an AllReduce of t_ms moves (0 below its start-up cost)."""
        return max(0.0, (t_ms - self.allreduce.alpha_ms) / self.allreduce.beta_ms)

    @property
    def t_olp_dense(self) -> float:
        """The dense backward's window in which the inter-node link idles (digest §4.2)."""
        return self.dense_bwd_ms + self.mp_ag_ms + self.mp_rs_ms


def _capacity(shape: BlockShape, tokens: int) -> int:
    """The layer's capacity (`ordering.capacity`) for S = `tokens` routed on one GPU (no drop: f = 1)."""
    return ordering.capacity(tokens, shape.num_experts, shape.top_k,
                             1.0 if shape.capacity_factor is None else shape.capacity_factor)


def _per_gpu_capacity(shape: BlockShape, n_esp: int) -> int:
    return _capacity(shape, shape.batch * shape.seq // n_esp)


# GEMMs of the one-hot ordering per pass (module docstring): dispatch and combine forward; the
# dispatch's token gradient and the combine's two (expert output, combine weights) backward
EINSUM_ORDER_GEMMS = {"fwd": 2, "bwd": 3}
ORDER_TOKENS = ("sequence-parallel", "replicated")


@dataclass(frozen=True)
class OrderCost:
    """GShard einsum ordering of one block on one GPU: S tokens, E C capacity slots, S E C M
    multiply-accumulates per GEMM, and the ms of each pass."""

    tokens: int
    slots: int
    macs_per_gemm: int
    fwd_ms: float
    bwd_ms: float


def gshard_order(bc: BlockCosts, tokens: str = "sequence-parallel") -> OrderCost:
    """The one-hot einsum ordering's cost for block `bc` (module docstring), with S = B L / N_MP
    ('sequence-parallel') or B L ('replicated') tokens per GPU."""
    if tokens not in ORDER_TOKENS:
        raise ConfigError(f"tokens: {tokens!r} is not allowed; allowed: {', '.join(map(repr, ORDER_TOKENS))}")
    shape = bc.shape
    S = shape.batch * shape.seq // (bc.n_esp if tokens == "sequence-parallel" else 1)
    slots = shape.num_experts * _capacity(shape, S)
    macs = S * slots * shape.hidden
    per_gemm = bc.gemm.time_ms(macs)
    return OrderCost(S, slots, macs, EINSUM_ORDER_GEMMS["fwd"] * per_gemm, EINSUM_ORDER_GEMMS["bwd"] * per_gemm)


def with_gshard_order(bc: BlockCosts, tokens: str = "sequence-parallel") -> BlockCosts:
    """Block `bc` with GShard einsum ordering charged to its compute (the dense part's task)."""
    order = gshard_order(bc, tokens)
    return replace(bc, dense_fwd_ms=bc.dense_fwd_ms + order.fwd_ms, dense_bwd_ms=bc.dense_bwd_ms + order.bwd_ms)


def block_costs(shape: BlockShape, profile: HardwareProfile, *, ep_step: str = "inter-1",
                esp_step: str = "intra-1") -> BlockCosts:
    """The models of one block of `shape` on `profile`'s topology in the paper's layout (MP and ESP
    over a node's GPUs, EP across nodes, one or more experts per node)."""
    topo = profile.get_topology()
    n_esp, n_ep = topo.gpus_per_node, topo.num_nodes
    if shape.num_experts % n_ep:
        raise ConfigError(f"num_experts: {shape.num_experts} is not divisible by the {n_ep} nodes of "
                          f"{topo.name!r}; allowed: a multiple of {n_ep}")
    M, H, E, v = shape.hidden, shape.ffn_hidden, shape.num_experts, shape.bytes_per_elem
    C = _per_gpu_capacity(shape, n_esp)
    n_a2a = E * C * M
    gemm = profile.compute_model("gemm")

    def comm(kind: str, step: str, elements: int) -> ChunkModel:
        m = profile.comm_model(kind, step)
        return ChunkModel(m.alpha_ms, m.beta_ms * elements * v)

    g = shape.gemms
    fwd = PassModel(a2a=comm("a2a", ep_step, n_a2a), ag=comm("allgather", esp_step, n_esp * n_a2a),
                    rs=comm("reducescatter", esp_step, n_esp * n_a2a),
                    exp=ChunkModel(g * gemm.alpha_ms, gemm.beta_ms * g * E * C * M * H))
    bwd = replace(fwd, exp=fwd.exp.scaled(2.0))
    # dense part, per GPU of an MP group of n_esp
    B, L, heads = shape.batch, shape.seq, shape.heads
    kv = shape.kv_heads or heads
    d = M // heads
    tokens = B * L
    proj_macs = tokens * M * (M + 2 * kv * d + M) / n_esp                    # Q, K, V, O
    core_macs = 2 * B * L * L * d * heads / n_esp                            # Q K^T and A V
    router_macs = tokens / n_esp * ROUTER_MACS[shape.gate](M, E)
    dense_fwd = sum(gemm.time_ms(w) for w in (proj_macs / 2, proj_macs / 2, core_macs / 2, core_macs / 2, router_macs))
    mp_ag = profile.comm_model("allgather", esp_step).time_ms(tokens * M * v)
    mp_rs = profile.comm_model("reducescatter", esp_step).time_ms(tokens * M * v)
    if shape.ffn == "mixtral":
        grad_elems = (1 + 2 * kv / heads) * M * M / n_esp + M * M / n_esp
    else:
        grad_elems = 3 * M * M / n_esp + 3 * M / n_esp + M * M / n_esp + M
    return BlockCosts(shape, n_esp, n_ep, C, fwd, bwd, dense_fwd, 2 * dense_fwd, mp_ag, mp_rs, int(grad_elems * v),
                      profile.comm_model("allreduce", ep_step), gemm)
