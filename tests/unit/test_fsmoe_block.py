"""FSMoE's hybrid layout end to end on simulated ranks: a stack of two blocks (sequence-parallel
tensor-parallel attention in the node, the FSMoE layer with ESP in the node and EP across nodes,
dense gradients summed across nodes inside the next block's MoE backward) equals a
single-process model on the same data: outputs, input gradients and every parameter's gradient."""
import torch
import torch.nn.functional as F

from impl.common.comm import SimWorld
from impl.common.experts import GroupedExperts
from impl.common.ordering import capacity as capacity_for
from impl.common.routing import init_gate_from_seed
from impl.common.topology import get_topology
from impl.fsmoe.block import FSMoEBlock, flat_gradients, init_attention
from impl.fsmoe.config import MoELayerConfig
from impl.fsmoe.modules import build_gate_module

TOPO = get_topology("2x2")                 # 2 nodes x 2 GPUs: MP = ESP = 2, EP = DP = 2
DTYPE = torch.float64
B, L, M, HEADS, BLOCKS = 2, 8, 8, 4, 2
CFG = MoELayerConfig(hidden=M, ffn_hidden=12, num_experts=2, top_k=1, gate="sigmoid", capacity_factor=1.5,
                     r_fwd=2, r_bwd=3)


def data():
    g = torch.Generator().manual_seed(5)
    nodes = TOPO.num_nodes
    return (torch.randn(L, nodes * B, M, generator=g, dtype=DTYPE),    # [L, global batch, M]
            torch.randn(L, nodes * B, M, generator=g, dtype=DTYPE))


def _slice(x, rank):
    node, local = divmod(rank, TOPO.gpus_per_node)
    P = TOPO.gpus_per_node
    return x[local * L // P:(local + 1) * L // P, node * B:(node + 1) * B]


def _rank(comm):
    x_all, w_all = data()
    blocks = [FSMoEBlock(comm, CFG, HEADS, seed=100 * i, dtype=DTYPE) for i in range(BLOCKS)]
    for i in range(BLOCKS - 1):   # block i's MoE backward all-reduces block i+1's attention gradients
        blocks[i].moe.gradient_slice = (lambda nxt=blocks[i + 1]: flat_gradients(list(nxt.attention.parameters())))
    x = _slice(x_all, comm.rank).clone().requires_grad_(True)
    h = x
    for blk in blocks:
        h = blk(h)
    (h * _slice(w_all, comm.rank)).sum().backward()
    world = comm.world
    # after the backward: block 0's attention over the DP group; norms and gates over every GPU
    flat, write_back = flat_gradients(list(blocks[0].attention.parameters()))
    write_back(comm.all_reduce(flat, "sum", comm.group("inter", 1)))
    for blk in blocks:
        for p in [*blk.norm1.parameters(), *blk.norm2.parameters(), *blk.moe.gate.parameters()]:
            p.grad = comm.all_reduce(p.grad, "sum", world)
    return {"y": h.detach(), "x_grad": x.grad,
            "params": [{n: p.grad.clone() for n, p in blk.named_parameters()} for blk in blocks],
            "esp": comm.rank % TOPO.gpus_per_node, "node": comm.rank // TOPO.gpus_per_node}


def _reference():
    """One process, whole weights: per node's data, full attention; per GPU's tokens, its own
    gate copy and capacity (what each GPU routes), then every kept pair through its whole expert."""
    x_all, w_all = data()
    x = x_all.clone().requires_grad_(True)
    state = []
    for i in range(BLOCKS):
        seed = 100 * i
        att = {k: v.clone().requires_grad_(True) for k, v in init_attention(HEADS, M, seed + 11, DTYPE).items()}
        norms = [torch.nn.LayerNorm(M, dtype=DTYPE) for _ in range(2)]
        gates = [init_gate_from_seed(build_gate_module(CFG), seed + 1).to(DTYPE) for _ in range(TOPO.G)]
        experts = GroupedExperts(CFG.num_experts, M, CFG.ffn_hidden, kind="gpt", activation="gelu").to(DTYPE)
        experts.init_from_seed(list(range(CFG.num_experts)), seed + 2)
        state.append((att, norms, gates, experts))
    h = x
    for att, norms, gates, experts in state:
        a = norms[0](h)
        d = M // HEADS
        q, k, v = (a @ att["w_qkv"]).view(L, -1, 3, HEADS, d).permute(2, 1, 3, 0, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3).reshape(L, -1, M)
        h = h + o @ att["w_o"]
        n2 = norms[1](h)
        moe_out = torch.zeros_like(h)
        C = capacity_for(L // TOPO.gpus_per_node * B, CFG.num_experts, CFG.top_k, CFG.capacity_factor,
                         CFG.degree_multiple)
        for rank in range(TOPO.G):
            tokens = _slice(n2, rank).reshape(-1, M)
            routing = gates[rank](tokens)
            out = torch.zeros_like(tokens)
            for e in range(CFG.num_experts):
                for t in routing.routing_map_TE[:, e].nonzero().flatten()[:C].tolist():
                    row = experts.forward_one(e, tokens[t:t + 1]).squeeze(0)
                    out = out.index_add(0, torch.tensor([t]), (routing.probs_TE[t, e] * row).unsqueeze(0))
            node, local = divmod(rank, TOPO.gpus_per_node)
            P = TOPO.gpus_per_node
            placed = torch.zeros_like(h)
            placed[local * L // P:(local + 1) * L // P, node * B:(node + 1) * B] = out.view(L // P, B, M)
            moe_out = moe_out + placed
        h = h + moe_out
    (h * w_all).sum().backward()
    return h.detach(), x.grad, state


def test_block_stack_equals_the_single_process_model():
    results = SimWorld(TOPO).run(_rank)
    y, x_grad, state = _reference()
    close = dict(rtol=1e-9, atol=1e-9)
    for r in results:
        rank = r["node"] * TOPO.gpus_per_node + r["esp"]
        torch.testing.assert_close(r["y"], _slice(y, rank), **close)
        torch.testing.assert_close(r["x_grad"], _slice(x_grad, rank), **close)
    P, d = TOPO.gpus_per_node, M // HEADS
    for i, (att, norms, gates, experts) in enumerate(state):
        gate_grads = {n: sum(p.grad for g in gates for m, p in g.named_parameters() if m == n)
                      for n, _ in gates[0].named_parameters()}
        for r in results:
            grads = r["params"][i]
            j = r["esp"]
            cols = slice(j * HEADS // P * d, (j + 1) * HEADS // P * d)
            torch.testing.assert_close(grads["attention.w_qkv"], att["w_qkv"].grad.view(M, 3, M)[:, :, cols].reshape(M, -1), **close)
            torch.testing.assert_close(grads["attention.w_o"], att["w_o"].grad[cols, :], **close)
            torch.testing.assert_close(grads["norm1.weight"], norms[0].weight.grad, **close)
            torch.testing.assert_close(grads["norm2.bias"], norms[1].bias.grad, **close)
            for n, g in gate_grads.items():
                torch.testing.assert_close(grads[f"moe.gate.{n}"], g, **close)
            width = CFG.ffn_hidden // P
            e = r["node"]                                      # one expert per node
            torch.testing.assert_close(grads["moe.experts.w1"][0], experts.w1.grad[e][:, j * width:(j + 1) * width], **close)
            torch.testing.assert_close(grads["moe.experts.w2"][0], experts.w2.grad[e][j * width:(j + 1) * width, :], **close)
