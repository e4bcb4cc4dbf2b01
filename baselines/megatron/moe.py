"""The real megatron-core (0.16.1) MoE layer and a small megatron-core GPT model, built from our
configs on an already initialised torch.distributed world (gloo on CPU, nccl on GPU).

Why: Megatron-LM's alltoall dispatcher is the baseline every HierMoE / FSMoE speed-up is
normalised to. Running the real package - not a re-implementation - next to our
`FlatAlltoAllDispatcher` shows that our reference has Megatron's semantics (same outputs,
gradients and bytes per level on the same routing and weights), and it is the layer into which
`impl.hiermoe.megatron_adapter.install_hiermoe` drops the HierMoE dispatcher.

* `init_parallel(ep)` (from `impl.common.megatron`): CPU patches, then megatron's
  `parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)` on top of the world
  the launcher created, and megatron's model-parallel RNG seeds.
* `MegatronMoEConfig`: one MoE layer in our vocabulary (E, M, FFN width and kind, our
  `GateConfig`), mapped onto `TransformerConfig` by `transformer_config`.
* `build_megatron_moe(comm, cfg)` -> `MegatronMoE`: the `MoELayer` (`get_moe_module_spec(use_te=
  False)`: TopKRouter + SequentialMLP + alltoall dispatcher) with our gate's weights and our
  `GroupedExperts` weights (`init_from_seed` by global expert id), behind the same
  `forward(x_TM) -> MoEOutput` as `impl.common.moe_layer.ExpertParallelMoE`.
* `count_all_to_all(counter)`: counts the rows/bytes of megatron's own EP all-to-alls per
  topology level into our `TrafficCounter` (forward and backward).
* `build_gpt_model` + `GPTTrainer`: a megatron-core `GPTModel` (`get_gpt_layer_local_spec`) trained
  with megatron's DDP grad buffers and `finalize_model_grads` and a torch optimizer.

Semantics worth knowing when comparing with our layer:
* Megatron applies the gate weight inside each expert, between the activation and fc2
  (`MLP.forward(per_token_scale=...)`; with biases, fc2's bias is scaled too), i.e. it scales the
  expert's output row, like `ExpertParallelMoE`.
* Its router computes the softmax in float32 (`torch.softmax(..., dtype=torch.float32)`) even for
  float64 logits, so a float64 layer agrees with our float64 gate to ~1e-7, not 1e-15.
* Permutation: rows are expert-major over the whole [T, E] routing map (token order inside an
  expert), all-to-all'd in rank order, then re-sorted by local expert - the order of our flat
  dispatcher. Expert weights: fc1 = [w1]^T (GPT) or [w_gate; w_up]^T (SwiGLU: megatron's GLU
  applies the activation to the first half), fc2 = w2^T / w_down^T.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from impl.common.comm import Comm, TrafficCounter
from impl.common.config import ConfigError
from impl.common.experts import GroupedExperts
from impl.common.moe_layer import MoEOutput
from impl.common.routing import GateConfig, RoutingResult, build_gate
from impl.common.topology import Topology

from impl.common.megatron import apply_cpu_patches, ep_group_ranks, init_parallel

__all__ = ["MegatronMoEConfig", "MegatronMoE", "transformer_config", "build_moe_layer",
           "build_megatron_moe", "load_gate", "load_grouped_experts", "expert_tensors", "count_all_to_all",
           "build_gpt_model", "GPTTrainer", "causal_mask", "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
_ROUTER_KINDS = ("softmax_topk", "switch", "sigmoid")


# ------------------------------------------------------------------------------------------
# parallel state
# ------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MegatronMoEConfig:
    """One MoE layer in our terms. `gate` is our GateConfig (kind, top_k, capacity, losses):
    kinds softmax_topk, switch and sigmoid map onto megatron's TopKRouter."""

    num_experts: int
    hidden: int
    ffn_hidden: int
    gate: GateConfig = field(default_factory=GateConfig)
    ffn_kind: Literal["gpt", "swiglu"] = "swiglu"
    activation: Literal["gelu", "relu", "silu"] = "silu"
    bias: bool = False
    dtype: Literal["float32", "float64"] = "float32"
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"

    def __post_init__(self):
        for key in ("num_experts", "hidden", "ffn_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"MegatronMoEConfig.{key}: {getattr(self, key)!r} is not allowed; "
                                  "expected an integer >= 1")
        allowed = {"ffn_kind": ("gpt", "swiglu"), "activation": tuple(_ACTIVATIONS),
                   "dtype": tuple(DTYPES), "dispatcher": ("alltoall", "allgather")}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ConfigError(f"MegatronMoEConfig.{key}: {getattr(self, key)!r} is not allowed; "
                                  f"allowed: {', '.join(map(repr, values))}")
        if self.ffn_kind == "swiglu" and (self.activation != "silu" or self.bias):
            raise ConfigError("MegatronMoEConfig: ffn_kind 'swiglu' needs activation 'silu' and bias false "
                              f"(got activation={self.activation!r}, bias={self.bias})")
        g = self.gate
        if g.kind not in _ROUTER_KINDS:
            raise ConfigError(f"MegatronMoEConfig.gate.kind: {g.kind!r} has no megatron TopKRouter mapping "
                              f"here; allowed: {', '.join(map(repr, _ROUTER_KINDS))}")
        if g.kind == "sigmoid" and g.top_k > 1 and not g.normalize_topk:
            raise ConfigError("MegatronMoEConfig.gate.normalize_topk: megatron's sigmoid router always "
                              "normalises top-k > 1 weights; set normalize_topk: true")
        if g.aux_loss_seq_len is not None:
            raise ConfigError("MegatronMoEConfig.gate.aux_loss_seq_len: not mapped; allowed: None")
        if not 1 <= g.top_k <= self.num_experts:
            raise ConfigError(f"MegatronMoEConfig.gate.top_k: {g.top_k} is not allowed with "
                              f"num_experts={self.num_experts}; allowed: 1..{self.num_experts}")

    @classmethod
    def from_model(cls, model, **overrides) -> "MegatronMoEConfig":
        """From an `impl.common.models.ModelConfig` (its routed experts and gate)."""
        kw = dict(num_experts=model.num_experts, hidden=model.hidden, ffn_hidden=model.moe_ffn_hidden,
                  gate=model.gate_config(), ffn_kind=model.ffn_kind, activation=model.activation,
                  bias=model.mlp_bias)
        kw.update(overrides)
        return cls(**kw)

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def new_experts(self, global_expert_ids: list[int], seed: int) -> GroupedExperts:
        """Our GroupedExperts for these global ids, initialised from (seed, id)."""
        experts = GroupedExperts(len(global_expert_ids), self.hidden, self.ffn_hidden, kind=self.ffn_kind,
                                 bias=self.bias, activation=self.activation).to(DTYPES[self.dtype])
        experts.init_from_seed(global_expert_ids, seed)
        return experts


def transformer_config(cfg: MegatronMoEConfig, expert_parallel_size: int, *, num_layers: int = 1,
                       num_heads: int = 1, dense_ffn_hidden: int | None = None, **extra):
    """megatron-core's TransformerConfig for `cfg`: CPU initialisation, no fusions, no dropout,
    local (non-TE) modules. `extra` sets further TransformerConfig fields."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    g = cfg.gate
    kw = dict(
        num_layers=num_layers, hidden_size=cfg.hidden, num_attention_heads=num_heads,
        ffn_hidden_size=dense_ffn_hidden or cfg.ffn_hidden, moe_ffn_hidden_size=cfg.ffn_hidden,
        num_moe_experts=cfg.num_experts, moe_router_topk=g.top_k,
        moe_token_dispatcher_type=cfg.dispatcher, expert_model_parallel_size=expert_parallel_size,
        moe_grouped_gemm=False, use_cpu_initialization=True, gradient_accumulation_fusion=False,
        params_dtype=DTYPES[cfg.dtype], bf16=False, fp16=False,
        add_bias_linear=cfg.bias, gated_linear_unit=cfg.ffn_kind == "swiglu",
        activation_func=_ACTIVATIONS[cfg.activation],
        hidden_dropout=0.0, attention_dropout=0.0,
        # router: ours -> megatron's
        moe_router_score_function="sigmoid" if g.kind == "sigmoid" else "softmax",
        # softmax over E then top-k (pre-softmax) = our un-normalised softmax_topk; softmax over the
        # top-k logits = our normalize_topk
        moe_router_pre_softmax=g.kind != "sigmoid" and not g.normalize_topk,
        moe_router_dtype="fp64" if cfg.dtype == "float64" else "fp32",
        moe_aux_loss_coeff=g.aux_loss_coeff, moe_z_loss_coeff=g.z_loss_coeff or None,
        moe_expert_capacity_factor=g.capacity_factor, moe_token_drop_policy=g.drop_policy,
    )
    kw.update(extra)
    return TransformerConfig(**kw)


# ------------------------------------------------------------------------------------------
# the MoE layer and weight exchange with our modules
# ------------------------------------------------------------------------------------------
def build_moe_layer(cfg: MegatronMoEConfig, expert_parallel_size: int):
    """A megatron-core MoELayer from `get_moe_module_spec(use_te=False)` (call `init_parallel`
    first)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    apply_cpu_patches()
    tcfg = transformer_config(cfg, expert_parallel_size)
    spec = get_moe_module_spec(use_te=False, num_experts=cfg.num_experts, moe_grouped_gemm=False)
    return build_module(spec, config=tcfg)


def _linear_pairs(experts_kind: str, bias: bool):
    """(megatron param of one expert MLP, function of our per-expert tensors) pairs."""
    if experts_kind == "swiglu":
        return [("linear_fc1.weight", lambda p: torch.cat([p["w_gate"].t(), p["w_up"].t()], 0)),
                ("linear_fc2.weight", lambda p: p["w_down"].t())]
    pairs = [("linear_fc1.weight", lambda p: p["w1"].t()), ("linear_fc2.weight", lambda p: p["w2"].t())]
    if bias:
        pairs += [("linear_fc1.bias", lambda p: p["b1"]), ("linear_fc2.bias", lambda p: p["b2"])]
    return pairs


def _local_mlps(layer) -> list[nn.Module]:
    experts = layer.experts
    if not hasattr(experts, "local_experts"):
        raise TypeError(f"expected megatron's SequentialMLP experts, got {type(experts).__name__}; "
                        "build the layer with moe_grouped_gemm=False")
    return list(experts.local_experts)


@torch.no_grad()
def load_grouped_experts(layer, experts: GroupedExperts) -> None:
    """Copy our GroupedExperts (this rank's local experts, slot order) into the layer's
    SequentialMLP experts."""
    mlps = _local_mlps(layer)
    if experts.num_local_experts != len(mlps):
        raise ValueError(f"GroupedExperts has {experts.num_local_experts} experts, the megatron layer "
                         f"{len(mlps)} local experts")
    for i, mlp in enumerate(mlps):
        ours = experts.expert_state(i)
        params = dict(mlp.named_parameters())
        for name, make in _linear_pairs(experts.kind, experts.bias):
            value = make(ours)
            if params[name].shape != value.shape:
                raise ValueError(f"megatron expert {i} {name}: shape {tuple(params[name].shape)}, ours "
                                 f"{tuple(value.shape)}")
            params[name].copy_(value)


def expert_tensors(layer, kind: str, bias: bool, *, grad: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """This rank's expert weights (or their gradients) in our GroupedExperts naming, keyed by
    global expert id: the inverse of `load_grouped_experts`."""
    mlps = _local_mlps(layer)
    first = layer.local_expert_indices[0]
    out = {}
    for i, mlp in enumerate(mlps):
        p = {n: (t.grad if grad else t).detach() for n, t in mlp.named_parameters()}
        fc1, fc2 = p["linear_fc1.weight"], p["linear_fc2.weight"]
        if kind == "swiglu":
            gate_w, up_w = fc1.chunk(2, dim=0)
            d = {"w_gate": gate_w.t(), "w_up": up_w.t(), "w_down": fc2.t()}
        else:
            d = {"w1": fc1.t(), "w2": fc2.t()}
            if bias:
                d.update(b1=p["linear_fc1.bias"], b2=p["linear_fc2.bias"])
        out[first + i] = {n: t.clone() for n, t in d.items()}
    return out


@torch.no_grad()
def load_gate(layer, gate: nn.Module) -> None:
    """Copy one of our linear router gates (weight_EM [E, M]) into megatron's TopKRouter."""
    weight = getattr(gate, "weight_EM", None)
    if weight is None:
        raise TypeError(f"gate {type(gate).__name__} has no weight_EM; allowed: softmax_topk, switch, sigmoid")
    router = layer.router
    if router.weight.shape != weight.shape:
        raise ValueError(f"router weight {tuple(router.weight.shape)} vs gate {tuple(weight.shape)}")
    router.weight.copy_(weight)
    if router.bias is not None:   # add_bias_linear gives megatron's router a bias; ours has none
        router.bias.zero_()


class MegatronMoE(nn.Module):
    """A megatron-core MoELayer behind ExpertParallelMoE's interface: `forward(x_TM)` takes the
    [T, M] tokens of this rank and returns MoEOutput(y_TM, routing, None), where `routing` is the
    RoutingResult megatron's router produced."""

    def __init__(self, layer, cfg: MegatronMoEConfig):
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        self._routing: tuple[torch.Tensor, torch.Tensor] | None = None
        layer.router.register_forward_hook(self._keep_routing)

    def _keep_routing(self, module, inputs, output):
        self._routing = output        # (probs [T, E], routing_map [T, E])

    def local_experts(self) -> list[int]:
        return list(self.layer.local_expert_indices)

    def forward(self, x_TM: torch.Tensor, routing: RoutingResult | None = None) -> MoEOutput:
        if routing is not None:
            raise ValueError("megatron-core's MoELayer routes with its own router; pass routing=None")
        y, mlp_bias = self.layer(x_TM.unsqueeze(1))      # megatron layout [S, B, M], B = 1
        if mlp_bias is not None:
            y = y + mlp_bias
        probs, routing_map = self._routing
        self._routing = None
        return MoEOutput(y.squeeze(1), RoutingResult(routing_map, probs), None)

    def expert_tensors(self, *, grad: bool = False) -> dict[int, dict[str, torch.Tensor]]:
        return expert_tensors(self.layer, self.cfg.ffn_kind, self.cfg.bias, grad=grad)


def build_megatron_moe(comm: Comm, cfg: MegatronMoEConfig, *, gate: nn.Module | None = None,
                       experts: GroupedExperts | None = None, seed: int = 0) -> MegatronMoE:
    """The 'megatron-core' moe_layer: megatron's MoELayer with EP = comm.world_size, loaded with
    `gate` (else a fresh gate of `cfg.gate` seeded by `seed`) and `experts` (else this rank's
    GroupedExperts from `init_from_seed(local ids, seed)`)."""
    init_parallel(comm.world_size, seed=seed)
    layer = build_moe_layer(cfg, comm.world_size)
    dtype = DTYPES[cfg.dtype]
    if gate is None:
        torch.manual_seed(seed)
        gate = build_gate(cfg.gate, cfg.hidden, cfg.num_experts).to(dtype)
    if experts is None:
        experts = cfg.new_experts(list(layer.local_expert_indices), seed)
    load_gate(layer, gate)
    load_grouped_experts(layer, experts)
    return MegatronMoE(layer, cfg)


# ------------------------------------------------------------------------------------------
# traffic of megatron's own all-to-alls
# ------------------------------------------------------------------------------------------
class _CountBackward(torch.autograd.Function):
    """Identity whose backward records the rows the all-to-all's backward twin sends."""

    @staticmethod
    def forward(ctx, out, record):
        ctx.record = record
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.record("bwd")
        return grad, None


@contextmanager
def count_all_to_all(counter: TrafficCounter) -> Iterator[TrafficCounter]:
    """Count every all-to-all megatron's token dispatchers issue (forward and backward) into
    `counter`, whose topology describes the EP group (member i of the group = topology rank i).
    2-D tensors (hidden rows) are category 'tokens', others (probs) 'meta'."""
    import torch.distributed as dist
    from megatron.core.transformer.moe import token_dispatcher as td

    original = td.all_to_all
    topology: Topology = counter.topology

    def counted(group, input_, output_split_sizes=None, input_split_sizes=None):
        ranks = ep_group_ranks(group)
        if len(ranks) != topology.G:
            raise ValueError(f"all-to-all over {len(ranks)} ranks, counter topology {topology.name!r} "
                             f"has G = {topology.G}")
        me = ranks.index(dist.get_rank())
        n = len(ranks)
        even = [input_.shape[0] // n] * n
        send = [int(s) for s in (input_split_sizes if input_split_sizes is not None else even)]
        recv = [int(s) for s in (output_split_sizes if output_split_sizes is not None else even)]
        category = "tokens" if input_.dim() == 2 else "meta"
        row_bytes = math.prod(input_.shape[1:]) * input_.element_size()

        def record(phase: str):
            for peer, rows in enumerate(send if phase == "fwd" else recv):
                counter.add(me, peer, rows, row_bytes, category, phase)

        record("fwd")
        out = original(group, input_, output_split_sizes, input_split_sizes)
        return _CountBackward.apply(out, record) if out.requires_grad else out

    td.all_to_all = counted
    try:
        yield counter
    finally:
        td.all_to_all = original


# ------------------------------------------------------------------------------------------
# a small GPT model and its training step
# ------------------------------------------------------------------------------------------
def causal_mask(seq_len: int) -> torch.Tensor:
    """[1, 1, S, S] bool, True = masked (megatron's convention); pass it as attention_mask,
    because megatron's default mask is allocated on 'cuda'."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]


def build_gpt_model(cfg: MegatronMoEConfig, expert_parallel_size: int, *, num_layers: int = 2,
                    num_heads: int = 4, vocab_size: int = 128, max_seq_len: int = 64, seed: int = 0,
                    **extra):
    """megatron-core GPTModel with an MoE FFN in every layer (`get_gpt_layer_local_spec`), CPU
    initialisation seeded by `seed` (identical on every rank for replicated weights)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    apply_cpu_patches()
    tcfg = transformer_config(cfg, expert_parallel_size, num_layers=num_layers, num_heads=num_heads, **extra)
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False)
    torch.manual_seed(seed)
    return GPTModel(tcfg, spec, vocab_size=vocab_size, max_sequence_length=max_seq_len)


class GPTTrainer:
    """Training steps of a megatron GPTModel: megatron's DistributedDataParallel grad buffers and
    `finalize_model_grads` (DP all-reduce of replicated weights, expert-DP of expert weights),
    then torch Adam on the reduced grads (megatron's own optimizers need CUDA)."""

    def __init__(self, model, lr: float = 1e-3):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.model = model
        self.ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        self.optimizer = torch.optim.Adam(self.ddp.parameters(), lr=lr)

    def step(self, tokens_BS: torch.Tensor) -> float:
        """One step on next-token prediction of `tokens_BS` [B, S+1]; returns this rank's loss."""
        from megatron.core.distributed import finalize_model_grads

        inputs, labels = tokens_BS[:, :-1], tokens_BS[:, 1:]
        B, S = inputs.shape
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        positions = torch.arange(S).unsqueeze(0).expand(B, -1)
        loss = self.ddp(inputs, positions, causal_mask(S), labels=labels).float().mean()
        loss.backward()
        finalize_model_grads([self.ddp])
        for p in self.ddp.parameters():
            p.grad = p.main_grad.to(p.dtype)
        self.optimizer.step()
        return float(loss.detach())
