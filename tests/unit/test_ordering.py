"""Order / I-Order: the Tutel-style index layout and the GShard-style one-hot einsum are the same
map (values and gradients), capacity drops follow token order, and the capacity arithmetic."""
import pytest
import torch

from impl.common.ordering import EinsumOrder, IndexOrder, capacity, no_drop_capacity, plan_capacity


def _routing(T=11, E=4, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    ids = scores.topk(K, dim=1).indices
    map_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True)
    probs = torch.softmax(scores, 1) * map_TE
    return map_TE, probs


def _reference(x, map_TE, probs, C, y_of_row):
    """Loop form: keep the first C tokens of each expert in token order."""
    T, E = map_TE.shape
    out = torch.zeros_like(x)
    for e in range(E):
        kept = map_TE[:, e].nonzero().flatten()[:C]
        for pos, t in enumerate(kept.tolist()):
            out[t] += probs[t, e] * y_of_row(e * C + pos, x[t])
    return out


@pytest.mark.parametrize("C", [1, 2, 3, 8])
def test_both_orders_equal_the_loop_reference_with_drops(C):
    map_TE, probs = _routing()
    x = torch.randn(11, 5, dtype=torch.float64)
    plan = plan_capacity(map_TE, C)
    assert plan.dropped == sum(max(0, int(n) - C) for n in map_TE.sum(0))
    scale = torch.arange(4 * C, dtype=torch.float64).unsqueeze(1) + 1       # a per-row "expert"
    for order in (IndexOrder(), EinsumOrder()):
        buf = order.order(x, plan)
        assert buf.shape == (4 * C, 5)
        y = order.iorder(buf * scale, plan, probs.double())
        ref = _reference(x, map_TE, probs.double(), C, lambda row, v: v * scale[row])
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_orders_have_equal_gradients():
    map_TE, probs = _routing(seed=3)
    plan = plan_capacity(map_TE, 3)
    grads = []
    for order in (IndexOrder(), EinsumOrder()):
        x = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        p = probs.double().clone().requires_grad_(True)
        y = order.iorder(order.order(x, plan).tanh(), plan, p)
        (y * torch.arange(5.0, dtype=torch.float64)).sum().backward()
        grads.append((x.grad, p.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_capacity_arithmetic():
    assert capacity(1024, 8, 2, 1.2) == 308               # ceil(2 * 1.2 * 1024 / 8) = ceil(307.2)
    assert capacity(1024, 8, 2, 1.2, multiple=12) == 312  # lcm(r_fwd, r_bwd) padding
    assert capacity(10, 8, 1, 1.0) == 2 and capacity(8, 8, 1, 1.0) == 1
    assert no_drop_capacity(7, 4) == 8 and no_drop_capacity(0, 3) == 3
    with pytest.raises(ValueError, match="capacity_factor: 0 is not allowed"):
        capacity(10, 2, 1, 0)
    with pytest.raises(ValueError, match="capacity multiple: 0 is not allowed"):
        capacity(10, 2, 1, 1.0, multiple=0)
