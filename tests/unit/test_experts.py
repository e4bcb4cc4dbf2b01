import pytest
import torch
from torch.nn import functional as F

from impl.common.experts import GroupedExperts, expert_flops

DT = torch.float64


def make(kind, n=4, ids=None, seed=3, **kw):
    ex = GroupedExperts(n, 6, 5, kind=kind, **kw).to(DT)
    ex.init_from_seed(ids if ids is not None else list(range(n)), seed)
    return ex


@pytest.mark.parametrize("kind,kw", [("gpt", {}), ("gpt", {"bias": True, "activation": "relu"}), ("swiglu", {})])
def test_grouped_forward_equals_per_expert_loop(kind, kw):
    ex = make(kind, **kw)
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), 6, dtype=DT)
    y = ex(x, counts)
    rows = x.split(counts)
    for i, r in enumerate(rows):
        torch.testing.assert_close(y.split(counts)[i], ex.forward_one(i, r))


def test_hand_written_formulas():
    g = make("gpt")
    s = make("swiglu")
    x = torch.randn(4, 6, dtype=DT)
    torch.testing.assert_close(g(x, [0, 4, 0, 0]), F.gelu(x @ g.w1[1]) @ g.w2[1])
    expected = (F.silu(x @ s.w_gate[2]) * (x @ s.w_up[2])) @ s.w_down[2]
    torch.testing.assert_close(s(x, [0, 0, 4, 0]), expected)


def test_weights_depend_only_on_seed_and_global_id():
    dense = make("swiglu", n=8, ids=list(range(8)))
    shard = make("swiglu", n=2, ids=[5, 2])
    for name, p in shard.named_parameters():
        assert torch.equal(p[0], getattr(dense, name)[5])
        assert torch.equal(p[1], getattr(dense, name)[2])
    other_seed = make("swiglu", n=2, ids=[5, 2], seed=4)
    assert not torch.equal(other_seed.w_up, shard.w_up)


def test_gradients_flow_to_used_experts_only():
    ex = make("gpt")
    x = torch.randn(5, 6, dtype=DT, requires_grad=True)
    ex(x, [2, 0, 3, 0]).sum().backward()
    assert ex.w1.grad[0].abs().sum() > 0 and ex.w1.grad[2].abs().sum() > 0
    assert ex.w1.grad[1].abs().sum() == 0 and ex.w1.grad[3].abs().sum() == 0
    assert torch.autograd.gradcheck(lambda t: ex(t, [2, 0, 3, 0]), (x,))


def test_empty_input_keeps_graph():
    ex = make("swiglu")
    y = ex(torch.zeros(0, 6, dtype=DT), [0, 0, 0, 0])
    assert y.shape == (0, 6)
    y.sum().backward()
    assert ex.w_down.grad is not None and ex.w_down.grad.abs().sum() == 0


def test_expert_state_round_trip():
    a, b = make("gpt", n=2, ids=[0, 1]), make("gpt", n=2, ids=[7, 8])
    a.load_expert_state(1, b.expert_state(0))
    assert torch.equal(a.w1[1], b.w1[0]) and torch.equal(a.w2[1], b.w2[0])
    with pytest.raises(KeyError, match="expected"):
        a.load_expert_state(0, {"w1": a.w1[0]})


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "moe"}, "ffn kind 'moe'.*allowed: gpt, swiglu"),
    ({"activation": "tanh"}, "activation 'tanh'"),
    ({"kind": "swiglu", "bias": True}, "bias"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupedExperts(2, 4, 4, **kwargs)


def test_count_mismatch_is_rejected():
    ex = make("gpt")
    with pytest.raises(ValueError, match="sums to 3"):
        ex(torch.zeros(4, 6, dtype=DT), [1, 1, 1, 0])


def test_flops():
    assert expert_flops(10, 4, 8, "gpt") == 2 * 10 * 4 * 8 * 2
    assert expert_flops(10, 4, 8, "swiglu") == 2 * 10 * 4 * 8 * 3


def test_empty_input_output_depends_on_input():
    """A rank that receives no rows must still run the backward of the collective that
    delivered them, so the empty output stays connected to the (empty) input."""
    ex = make("gpt")
    x = torch.zeros(0, 6, dtype=DT, requires_grad=True)
    ex(x, [0, 0, 0, 0]).sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 6)
