"""Per-token routing traces: which experts each token of each (step, layer, rank) went to.

Traces let dispatchers, cost models and placement algorithms run on routing from a real model (or
a controlled synthetic one) without running the model. Three sources feed one `RoutingTrace`:
`synthetic_topk` / `synthetic_trace` (seeded generators), `TraceRecorder` (forward hooks on the
gates of a running model) and Megatron-core's router-trace JSONL files.

File formats (`RoutingTrace.save` / `RoutingTrace.load`, chosen by suffix)

`.npz` (primary; compressed NumPy archive, loaded with allow_pickle=False):

| array             | dtype   | shape  | meaning                                                  |
| ----------------- | ------- | ------ | -------------------------------------------------------- |
| `step_T`          | int32   | [T]    | training / decode step of each token (>= 0)              |
| `layer_T`         | int32   | [T]    | MoE layer (>= 0)                                         |
| `rank_T`          | int32   | [T]    | rank that routed the token (>= 0)                        |
| `topk_ids_TK`     | int32   | [T, K] | expert ids in 0..E-1, -1 = empty slot; distinct per row  |
| `topk_weights_TK` | float32 | [T, K] | combine weight per slot (absent when the source has none)|
| `header`          | str     | []     | JSON object, see below                                   |

header: {"format": "moe-routing-trace", "version": 1, "num_experts": E, "top_k": K,
"source": {...}}; `source` says where the trace came from (generator name and parameters,
"recorder" with layer -> module names, or "megatron_jsonl" with the path).

`.jsonl` (Megatron-core's router trace, megatron/core/transformer/moe/router_trace.py, which
writes one file per rank, `router_trace_rank{rank}.jsonl`): one JSON object per line, one line per
(step, layer, rank) group of tokens:

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 2, "top_indices": [[12, 45], ...]}

Megatron's records carry no weights and no expert count. We write the same records plus two
optional keys that Megatron's readers ignore: "top_weights" ([num_tokens][topk] floats) and
"num_experts". On reading, records of another `block` (Megatron's "mtp" heads, whose layer
numbers collide with the decoder's) are skipped unless asked for; a trace without "num_experts"
needs `num_experts=` or takes max id + 1 (recorded in source as "num_experts_inferred"). Only the
npz header keeps `source`; JSONL keeps the tokens, weights and E.

Modules (each imports only those above it):

| module       | holds                                                                      |
| ------------ | -------------------------------------------------------------------------- |
| `validation` | `TraceError` and the argument / id checks the modules share                |
| `formats`    | npz and JSONL readers and writers, `FORMAT_NAME`, `FORMAT_VERSION`         |
| `trace`      | `RoutingTrace`                                                             |
| `synthetic`  | `synthetic_topk`, `synthetic_trace`, `Distribution`                        |
| `recorder`   | `TraceRecorder`                                                            |
"""
from .formats import FORMAT_NAME, FORMAT_VERSION
from .recorder import TraceRecorder
from .synthetic import Distribution, synthetic_topk, synthetic_trace
from .trace import RoutingTrace
from .validation import TraceError

__all__ = ["TraceError", "RoutingTrace", "TraceRecorder", "synthetic_topk", "synthetic_trace",
           "Distribution", "FORMAT_NAME", "FORMAT_VERSION"]
