"""Routing (gates): which experts each token goes to, and with what weight.

Every gate returns a `RoutingResult`, the one routing representation every dispatcher takes
(Megatron-core's convention: a boolean routing map and a probability matrix, both [T, E]).

Gates (`GATES`, built by `build_gate(GateConfig(kind=...), hidden, num_experts)`):

| kind            | scores                      | selection                      | weights                   |
| --------------- | --------------------------- | ------------------------------ | ------------------------- |
| `softmax_topk`  | softmax over E              | top-k                          | the k probs (opt. / sum)  |
| `gshard`        | logit + N(0,1)*softplus(.)  | top-k (noise in training only) | softmax over the kept k   |
| `switch`        | softmax over E              | top-1                          | the prob                  |
| `deepseek_v3`   | sigmoid                     | grouped top-k of score+bias    | unbiased / sum * scale    |
| `sigmoid`       | sigmoid                     | top-k                          | the k scores (opt. / sum) |
| `xmoe`          | softmax(cosine / tau)       | top-k                          | the k probs (opt. / sum)  |
| `expert_choice` | softmax over E              | each expert takes top-C tokens | the probs                 |

Token-choice gates share the capacity limit (`expert_capacity`, `apply_capacity`: Megatron-core's
drop policies 'probs' and 'position'), the load-balancing loss (`load_balancing_loss`) and the
router z-loss (`router_z_loss`). SoftMoE is not a discrete routing and lives apart
(`SoftMoERouter`). Ties in every top-k resolve to the lower index (expert id, or token index for
expert choice and the 'probs' drop policy), so routing is reproducible bit for bit.

Modules (each imports only those above it):

| module      | holds                                                                    |
| ----------- | ------------------------------------------------------------------------ |
| `result`    | `RoutingResult`                                                          |
| `topk`      | stable top-k, top-k lists <-> dense routing (`routing_from_topk`, ...)   |
| `config`    | `GateConfig`, `GateKind`, `DropPolicy`                                   |
| `capacity`  | `expert_capacity`, `expert_choice_capacity`, `apply_capacity`            |
| `losses`    | `load_balancing_loss`, `router_z_loss`                                   |
| `gate_base` | `Gate`, `GateSelection`, `GATES` and the registering decorator           |
| `gates`     | the seven gate kinds, `build_gate`, `init_gate_from_seed`                |
| `softmoe`   | `SoftMoERouter`, `SoftMoEWeights`                                        |
"""
import importlib

# Names resolve on first use (PEP 562), so `GateConfig` and the other configs import without
# torch: the workflow reads model and gate configs while it parses, before any job runs.
_HOME = {
    "apply_capacity": "capacity", "expert_capacity": "capacity", "expert_choice_capacity": "capacity",
    "DropPolicy": "config", "GateConfig": "config", "GateKind": "config", "GATE_KINDS": "config",
    "GATES": "gates", "Gate": "gate_base", "GateSelection": "gate_base",
    "DeepSeekV3Gate": "gates", "ExpertChoiceGate": "gates", "GShardNoisyTopKGate": "gates", "SigmoidGate": "gates",
    "SoftmaxTopKGate": "gates", "SwitchGate": "gates", "XMoEGate": "gates", "build_gate": "gates",
    "init_gate_from_seed": "gates",
    "load_balancing_loss": "losses", "router_z_loss": "losses",
    "RoutingResult": "result",
    "SoftMoERouter": "softmoe", "SoftMoEWeights": "softmoe",
    "routing_from_topk": "topk", "topk_ids_from_routing": "topk",
}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
