"""FSMoE (Pan et al., ASPLOS '25): a modular MoE layer whose sub-modules (Gate, Order, I-Order,
Dispatch, Combine, Expert, and six hooks) are replaceable, run by a pipelined executor that
co-schedules inter-node communication (AlltoAll, gradient AllReduce slices), intra-node
communication (ESP AllGather / ReduceScatter) and expert computation on three lanes, with a
hand-written pipelined backward whose degree r_bwd may differ from the forward's r_fwd.

Modules: `config` (the layer's typed config and its checks), `layout` (the hybrid MP/ESP-in-node,
EP-across-node layout and the per-GPU message sizes n_a2a, n_ag, n_rs, n_exp), `modules` (the
sub-modules and hooks), `experts` (ESP-sharded GPT and Mixtral experts with their hand-written
backward), `schedules` (the task schedules of one layer pass), `pipeline` (the executor: a
custom autograd function), `layer` (`FSMoELayer`).

What is ours where the paper is silent (each module says more):
* capacity drops keep token order per expert (Megatron's 'position' policy);
* experts have no biases (the released layer has none; a bias would have to be added once per
  ESP group);
* ESP shards the expert hidden dimension H contiguously: member j holds columns j*H/N..(j+1)*H/N
  of the first GEMM(s) and the matching rows of the last;
* the hand-written backward caches the gathered expert inputs and the pre-activations of the
  forward (no recomputation) and applies the activation's exact derivative;
* hooks around dispatch and combine see every message of both passes (the backward's gradient
  messages too), so a message transform (e.g. compression) must keep shapes;
* in the no-drop mode C is the largest per-expert count over all GPUs (one all-reduce max).
"""
