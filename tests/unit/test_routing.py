"""Gates against hand-computed truth tables (DeepSpeed's TestTopkGate / Megatron's router tests
style): routing maps, weights, capacity drops per policy, DeepSeek-V3 group routing and bias,
aux / z losses against their formulas, gradients, config errors, top-k <-> dense conversion.

Most tests feed the identity matrix as tokens (T = hidden) with the router weight set to the
transposed logit table, so logits_TE is exactly the table written in the test. Tables are
written as log-probabilities (softmax gates) or logit(score) (sigmoid gates), so the expected
probabilities are the plain numbers in the test.
"""
import math

import pytest
import torch

from impl.common import registry
from impl.common.config import ConfigError, from_dict
from impl.common.routing import (GATES, GateConfig, RoutingResult, SoftMoERouter, apply_capacity,
                                 build_gate, expert_capacity, expert_choice_capacity, load_balancing_loss,
                                 routing_from_topk, router_z_loss, topk_ids_from_routing)

F64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=F64)


def logit(p):
    p = t(p)
    return torch.log(p / (1 - p))


def gate_on_table(cfg: GateConfig, logits_TE: torch.Tensor):
    """(gate, x_TM) with x = I_T and weight_EM = logits_TE^T, so the router logits equal the table."""
    T, E = logits_TE.shape
    gate = build_gate(cfg, T, E).double()
    with torch.no_grad():
        gate.weight_EM.copy_(logits_TE.T)
    return gate, torch.eye(T, dtype=F64)


def assert_routing(result: RoutingResult, expected_map, expected_probs):
    assert result.routing_map_TE.dtype == torch.bool
    assert result.routing_map_TE.tolist() == [[bool(v) for v in row] for row in expected_map]
    torch.testing.assert_close(result.probs_TE, t(expected_probs), rtol=0, atol=1e-12)


# Softmax probabilities of four tokens over four experts (each row sums to 1).
P4 = [[0.50, 0.25, 0.125, 0.125],
      [0.10, 0.20, 0.30, 0.40],
      [0.25, 0.50, 0.125, 0.125],
      [0.45, 0.05, 0.15, 0.35]]
LOG_P4 = torch.log(t(P4))
TOP2_MAP = [[1, 1, 0, 0],
            [0, 0, 1, 1],
            [1, 1, 0, 0],
            [1, 0, 0, 1]]
TOP2_PROBS = [[0.50, 0.25, 0, 0],
              [0, 0, 0.30, 0.40],
              [0.25, 0.50, 0, 0],
              [0.45, 0, 0, 0.35]]


# ---------------------------------------------------------------- softmax top-k, switch --------

def test_softmax_topk_truth_table():
    gate, x = gate_on_table(GateConfig(kind="softmax_topk", top_k=2), LOG_P4)
    result = gate(x)
    assert_routing(result, TOP2_MAP, TOP2_PROBS)
    assert result.num_dropped == 0 and result.aux_loss is None and result.z_loss is None


def test_softmax_topk_normalized_divides_by_the_k_probs():
    gate, x = gate_on_table(GateConfig(kind="softmax_topk", top_k=2, normalize_topk=True), LOG_P4)
    assert_routing(gate(x), TOP2_MAP, [[2 / 3, 1 / 3, 0, 0],
                                       [0, 0, 3 / 7, 4 / 7],
                                       [1 / 3, 2 / 3, 0, 0],
                                       [0.45 / 0.8, 0, 0, 0.35 / 0.8]])


def test_softmax_topk_equal_probs_go_to_lower_expert():
    gate, x = gate_on_table(GateConfig(kind="softmax_topk", top_k=2), torch.zeros(2, 4, dtype=F64))
    assert_routing(gate(x), [[1, 1, 0, 0]] * 2, [[0.25, 0.25, 0, 0]] * 2)


def test_switch_top1_weight_is_the_probability_and_aux_loss():
    gate, x = gate_on_table(GateConfig(kind="switch", top_k=1, aux_loss_coeff=0.01), LOG_P4)
    result = gate(x)
    assert_routing(result, [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]],
                   [[0.5, 0, 0, 0], [0, 0, 0, 0.4], [0, 0.5, 0, 0], [0.45, 0, 0, 0]])
    # f = [2, 1, 0, 1] / 4; P = column means = [1.3, 1.0, 0.7, 1.0] / 4
    # E * sum f P = 4 * (0.5 * 0.325 + 0.25 * 0.25 + 0 + 0.25 * 0.25) = 1.15
    torch.testing.assert_close(result.aux_loss, torch.tensor(0.01 * 1.15, dtype=F64))


def test_softmax_topk_aux_loss_counts_all_k_assignments():
    gate, x = gate_on_table(GateConfig(kind="softmax_topk", top_k=2, aux_loss_coeff=1.0), LOG_P4)
    # counts [3, 2, 1, 2] / (T k = 8); E * sum f P = 4 * (3*0.325 + 2*0.25 + 0.175 + 2*0.25) / 8 = 1.075
    torch.testing.assert_close(gate(x).aux_loss, torch.tensor(1.075, dtype=F64))


def test_z_loss_is_mean_squared_logsumexp():
    offsets = t([1.0, -2.0, 0.0, 3.0]).unsqueeze(1)   # softmax-invariant; logsumexp of each row = offset
    gate, x = gate_on_table(GateConfig(kind="softmax_topk", z_loss_coeff=0.5), LOG_P4 + offsets)
    result = gate(x)
    assert_routing(result, TOP2_MAP, TOP2_PROBS)
    torch.testing.assert_close(result.z_loss, torch.tensor(0.5 * (1 + 4 + 0 + 9) / 4, dtype=F64))
    torch.testing.assert_close(router_z_loss(torch.log(t([[1.0, 1.0]])), 1.0),
                               torch.tensor(math.log(2) ** 2, dtype=F64))


# ---------------------------------------------------------------- capacity ---------------------

def test_expert_capacity_formulas():
    assert expert_capacity(4, 4, 2, 1.0) == 2
    assert expert_capacity(5, 4, 1, 1.0) == 2          # ceil(1.25)
    assert expert_capacity(4, 4, 2, 0.5) == 1
    assert expert_capacity(16, 8, 2, 1.25) == 5
    assert expert_choice_capacity(3, 3, 1, 1.0) == 1
    assert expert_choice_capacity(3, 3, 1, 2.0) == 2
    assert expert_choice_capacity(3, 3, 1, 10.0) == 3  # capped at T


@pytest.mark.parametrize("policy,expected_map,expected_probs", [
    # capacity 2: expert 0 is chosen by tokens 0 (.5), 2 (.25), 3 (.45)
    ("probs", [[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0], [1, 0, 0, 1]],
              [[0.5, 0.25, 0, 0], [0, 0, 0.3, 0.4], [0, 0.5, 0, 0], [0.45, 0, 0, 0.35]]),
    ("position", [[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]],
                 [[0.5, 0.25, 0, 0], [0, 0, 0.3, 0.4], [0.25, 0.5, 0, 0], [0, 0, 0, 0.35]]),
])
def test_capacity_factor_one_drop_policies(policy, expected_map, expected_probs):
    gate, x = gate_on_table(GateConfig(kind="softmax_topk", capacity_factor=1.0, drop_policy=policy), LOG_P4)
    result = gate(x)
    assert_routing(result, expected_map, expected_probs)
    assert result.num_dropped == 1


@pytest.mark.parametrize("policy,expected_map", [
    # capacity 1: e0 {t0 .5, t2 .25, t3 .45}, e1 {t0 .25, t2 .5}, e2 {t1}, e3 {t1 .4, t3 .35}
    ("probs", [[1, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]),
    ("position", [[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]),
])
def test_capacity_factor_half_drop_policies(policy, expected_map):
    gate, x = gate_on_table(GateConfig(kind="softmax_topk", capacity_factor=0.5, drop_policy=policy), LOG_P4)
    result = gate(x)
    expected_probs = (t(P4) * t(expected_map)).tolist()
    assert_routing(result, expected_map, expected_probs)
    assert result.num_dropped == 4
    assert result.tokens_per_expert().max() <= 1


def test_apply_capacity_probs_policy_ties_keep_earlier_token():
    rmap = torch.tensor([[True], [True], [True]])
    probs = t([[0.3], [0.5], [0.5]])
    kept, kept_probs, dropped = apply_capacity(rmap, probs, 1, "probs")
    assert kept.squeeze(1).tolist() == [False, True, False] and dropped == 2
    torch.testing.assert_close(kept_probs, t([[0.0], [0.5], [0.0]]))


def test_apply_capacity_large_capacity_keeps_everything():
    gen = torch.Generator().manual_seed(0)
    rmap = torch.rand(20, 5, generator=gen) < 0.4
    probs = torch.rand(20, 5, generator=gen) * rmap
    for policy in ("probs", "position"):
        kept, kept_probs, dropped = apply_capacity(rmap, probs, 20, policy)
        assert torch.equal(kept, rmap) and torch.equal(kept_probs, probs) and dropped == 0


# ---------------------------------------------------------------- GShard noisy top-k -----------

def test_gshard_eval_softmax_over_kept_logits_and_aux_loss():
    cfg = GateConfig(kind="gshard", top_k=2, aux_loss_coeff=1.0)
    gate, x = gate_on_table(cfg, LOG_P4)
    gate.eval()
    result = gate(x)
    assert_routing(result, TOP2_MAP, [[2 / 3, 1 / 3, 0, 0],
                                      [0, 0, 3 / 7, 4 / 7],
                                      [1 / 3, 2 / 3, 0, 0],
                                      [0.45 / 0.8, 0, 0, 0.35 / 0.8]])
    # GShard: f from top-1 only = [2, 1, 0, 1] / 4 with the P of the switch test -> 1.15
    torch.testing.assert_close(result.aux_loss, torch.tensor(1.15, dtype=F64))


def test_gshard_training_noise_is_normal_times_softplus_and_seeded():
    seed = 7
    gate, x = gate_on_table(GateConfig(kind="gshard", top_k=2, noise_seed=seed), LOG_P4)
    gate.train()
    result = gate(x)
    # W_noise starts at zero, so the noise std is softplus(0) = log 2
    eps = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    noisy = LOG_P4 + eps * math.log(2)
    ids = noisy.argsort(dim=1, descending=True)[:, :2]
    expected_probs = torch.zeros(4, 4, dtype=F64).scatter(1, ids, torch.softmax(noisy.gather(1, ids), dim=1))
    torch.testing.assert_close(result.probs_TE, expected_probs, rtol=0, atol=1e-12)
    assert torch.equal(result.routing_map_TE, expected_probs > 0)

    same, _ = gate_on_table(GateConfig(kind="gshard", top_k=2, noise_seed=seed), LOG_P4)
    other, _ = gate_on_table(GateConfig(kind="gshard", top_k=2, noise_seed=seed + 1), LOG_P4)
    big = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    for g in (gate, same, other):
        with torch.no_grad():
            g.weight_EM.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=F64))
    gate.reseed(seed)
    first, second, third = gate(big), same(big), other(big)
    assert torch.equal(first.probs_TE, second.probs_TE)
    assert not torch.equal(first.probs_TE, third.probs_TE)
    gate.eval()
    assert not torch.equal(gate(big).probs_TE, first.probs_TE)   # eval mode: no noise


def test_gshard_large_negative_noise_weight_means_no_noise():
    gate, x = gate_on_table(GateConfig(kind="gshard", top_k=2, noise_seed=0), LOG_P4)
    with torch.no_grad():
        gate.noise_weight_EM.fill_(-200.0)                   # softplus(-200) ~ 1e-87
    gate.train()
    eval_probs = gate.eval()(x).probs_TE
    torch.testing.assert_close(gate.train()(x).probs_TE, eval_probs, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- sigmoid ----------------------

S3 = [[0.9, 0.2, 0.6],
      [0.3, 0.8, 0.4]]


def test_sigmoid_gate_truth_table_plain_and_normalized():
    gate, x = gate_on_table(GateConfig(kind="sigmoid", top_k=2), logit(S3))
    assert_routing(gate(x), [[1, 0, 1], [0, 1, 1]], [[0.9, 0, 0.6], [0, 0.8, 0.4]])
    gate, x = gate_on_table(GateConfig(kind="sigmoid", top_k=2, normalize_topk=True), logit(S3))
    assert_routing(gate(x), [[1, 0, 1], [0, 1, 1]], [[0.6, 0, 0.4], [0, 2 / 3, 1 / 3]])


# ---------------------------------------------------------------- DeepSeek-V3 ------------------

# 8 experts in 4 groups of 2. Token 0: group sums g0 1.0, g1 1.15, g2 0.9, g3 0.6.
DS_SCORES = [[0.9, 0.1, 0.6, 0.55, 0.7, 0.2, 0.3, 0.3]]
DS_CFG = dict(kind="deepseek_v3", top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def one_hot_row(ids, E=8):
    return [[1 if e in ids else 0 for e in range(E)]]


def test_deepseek_group_routing_keeps_best_groups():
    gate, x = gate_on_table(GateConfig(**DS_CFG), logit(DS_SCORES))
    result = gate(x)
    # groups 1 and 0 kept; expert 4 (0.7) is in dropped group 2, so top-2 = {0 (0.9), 2 (0.6)}
    expected = [[0.9 / 1.5 * 2.5, 0, 0.6 / 1.5 * 2.5, 0, 0, 0, 0, 0]]
    assert_routing(result, one_hot_row({0, 2}), expected)
    # without group limits expert 4 would be chosen
    flat, x = gate_on_table(GateConfig(kind="deepseek_v3", top_k=2), logit(DS_SCORES))
    assert_routing(flat(x), one_hot_row({0, 4}), [[0.9 / 1.6, 0, 0, 0, 0.7 / 1.6, 0, 0, 0]])


def test_deepseek_group_score_is_sum_of_top2_not_whole_group():
    scores = [[0.5, 0.5, 0.5, 0.05, 0.9, 0.15, 0.05, 0.05]]
    # groups of 4: g0 top-2 sum 1.0 (full sum 1.55), g1 top-2 sum 1.05 (full sum 1.15) -> g1 wins
    gate, x = gate_on_table(GateConfig(kind="deepseek_v3", top_k=2, n_group=2, topk_group=1), logit(scores))
    assert_routing(gate(x), one_hot_row({4, 5}), [[0, 0, 0, 0, 0.9 / 1.05, 0.15 / 1.05, 0, 0]])


def test_deepseek_bias_changes_selection_not_weights():
    gate, x = gate_on_table(GateConfig(**DS_CFG), logit(DS_SCORES))
    gate.e_score_correction_bias[1] = 0.6            # biased score of expert 1: 0.7 > expert 2's 0.6
    assert_routing(gate(x), one_hot_row({0, 1}), [[0.9 * 2.5, 0.1 * 2.5, 0, 0, 0, 0, 0, 0]])
    gate.e_score_correction_bias.zero_()
    gate.e_score_correction_bias[7] = 0.5            # g3 biased sum 1.1 now beats g0 (1.0)
    # kept groups 1 and 3: biased {2: .6, 3: .55, 6: .3, 7: .8} -> {7, 2}; weights from unbiased .3, .6
    assert_routing(gate(x), one_hot_row({2, 7}), [[0, 0, 0.6 / 0.9 * 2.5, 0, 0, 0, 0, 0.3 / 0.9 * 2.5]])


def test_deepseek_normalize_off_keeps_raw_scores():
    gate, x = gate_on_table(GateConfig(**DS_CFG, normalize_topk=False), logit(DS_SCORES))
    assert_routing(gate(x), one_hot_row({0, 2}), [[0.9 * 2.5, 0, 0.6 * 2.5, 0, 0, 0, 0, 0]])


def test_deepseek_bias_update_rule():
    gate = build_gate(GateConfig(kind="deepseek_v3", top_k=1, bias_update_rate=0.01), 4, 4)
    new_bias = gate.update_bias(torch.tensor([5, 1, 3, 3]))          # mean 3
    assert new_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    gate.update_bias(torch.tensor([5, 1, 3, 3]))
    assert gate.e_score_correction_bias.tolist() == pytest.approx([-0.02, 0.02, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        gate.update_bias(torch.tensor([1, 2]))


DS_SEQ_SCORES = [[0.8, 0.2], [0.3, 0.7], [0.9, 0.1], [0.6, 0.4]]   # rows already sum to 1


@pytest.mark.parametrize("seq_len,expected", [
    # seq (t0, t1): counts [1, 1], P [.55, .45] -> 2 * (.5*.55 + .5*.45) = 1.0
    # seq (t2, t3): counts [2, 0], P [.75, .25] -> 2 * (1 * .75) = 1.5; mean 1.25
    (2, 1.25),
    # one sequence: counts [3, 1] / 4, P [.65, .35] -> 2 * (.75*.65 + .25*.35) = 1.15
    (None, 1.15),
])
def test_deepseek_sequence_wise_aux_loss(seq_len, expected):
    cfg = GateConfig(kind="deepseek_v3", top_k=1, aux_loss_coeff=0.1, aux_loss_seq_len=seq_len)
    gate, x = gate_on_table(cfg, logit(DS_SEQ_SCORES))
    result = gate(x)
    assert result.routing_map_TE[:, 0].tolist() == [True, False, True, True]
    torch.testing.assert_close(result.aux_loss, torch.tensor(0.1 * expected, dtype=F64))


def test_aux_loss_seq_len_must_divide_tokens():
    cfg = GateConfig(kind="deepseek_v3", top_k=1, aux_loss_coeff=0.1, aux_loss_seq_len=3)
    gate, x = gate_on_table(cfg, logit(DS_SEQ_SCORES))
    with pytest.raises(ValueError, match="aux_loss_seq_len=3.*T=4"):
        gate(x)


def test_load_balancing_loss_uniform_routing_is_coeff():
    """Perfectly balanced routing with uniform scores gives exactly coeff (E * E * 1/E * 1/E)."""
    E, T = 4, 8
    selected = torch.zeros(T, E, dtype=torch.bool)
    selected[torch.arange(T), torch.arange(T) % E] = True
    loss = load_balancing_loss(torch.full((T, E), 1 / E, dtype=F64), selected, 1, 0.3)
    torch.testing.assert_close(loss, torch.tensor(0.3, dtype=F64))


# ---------------------------------------------------------------- X-MoE ------------------------

def test_xmoe_cosine_over_temperature_truth_table():
    gate = build_gate(GateConfig(kind="xmoe", top_k=2, low_rank_dim=2, init_temperature=0.5), 2, 3).double()
    with torch.no_grad():
        gate.proj_RM.copy_(torch.eye(2))
        gate.expert_embed_ER.copy_(t([[2.0, 0.0], [0.0, 0.5], [-3.0, 0.0]]))   # norms do not matter
    x = t([[3.0, 4.0], [30.0, 40.0]])                                          # cos = [.6, .8, -.6]
    z = [math.exp(1.2), math.exp(1.6), math.exp(-1.2)]
    p = [v / sum(z) for v in z]
    result = gate(x)
    assert_routing(result, [[1, 1, 0]] * 2, [[p[0], p[1], 0]] * 2)
    gate_norm = build_gate(GateConfig(kind="xmoe", top_k=2, low_rank_dim=2, init_temperature=0.5,
                                      normalize_topk=True), 2, 3).double()
    gate_norm.load_state_dict(gate.state_dict())
    assert_routing(gate_norm(x), [[1, 1, 0]] * 2, [[p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0]] * 2)


# ---------------------------------------------------------------- Expert Choice ----------------

EC_P = [[0.40, 0.35, 0.25],
        [0.30, 0.30, 0.40],
        [0.25, 0.25, 0.50]]


@pytest.mark.parametrize("capacity_factor,expected_map", [
    (None, [[1, 1, 0], [0, 0, 0], [0, 0, 1]]),      # C = ceil(3 * 1 * 1 / 3) = 1: token 1 gets none
    (2.0, [[1, 1, 0], [1, 1, 1], [0, 0, 1]]),       # C = 2: token 1 gets all three experts
    (10.0, [[1, 1, 1]] * 3),                        # C capped at T = 3
])
def test_expert_choice_truth_table(capacity_factor, expected_map):
    gate, x = gate_on_table(GateConfig(kind="expert_choice", top_k=1, capacity_factor=capacity_factor),
                            torch.log(t(EC_P)))
    result = gate(x)
    assert_routing(result, expected_map, (t(EC_P) * t(expected_map)).tolist())
    assert result.num_dropped == 0 and result.aux_loss is None


# ---------------------------------------------------------------- SoftMoE ----------------------

def test_soft_moe_dispatch_and_combine_weights():
    router = SoftMoERouter(hidden=2, num_experts=1, slots_per_expert=2).double()
    with torch.no_grad():
        router.slot_embed_SM.copy_(torch.log(t([[1.0, 2.0], [3.0, 2.0]])).T)   # logits_TS = log [[1,2],[3,2]]
    weights = router(torch.eye(2, dtype=F64))
    torch.testing.assert_close(weights.dispatch_TS, t([[0.25, 0.5], [0.75, 0.5]]))
    torch.testing.assert_close(weights.combine_TS, t([[1 / 3, 2 / 3], [0.6, 0.4]]))
    x = t([[1.0, 0.0], [0.0, 4.0]])
    torch.testing.assert_close(weights.slots_from_tokens(x), t([[0.25, 3.0], [0.5, 2.0]]))
    torch.testing.assert_close(weights.tokens_from_slots(t([[3.0], [6.0]])), t([[5.0], [4.2]]))


def test_soft_moe_rejects_bad_input():
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoERouter(4, 2, slots_per_expert=0)
    with pytest.raises(ValueError, match=r"\[T >= 1, 4\]"):
        SoftMoERouter(4, 2)(torch.zeros(3, 5))


# ---------------------------------------------------------------- all gates --------------------

def any_config(kind: str, **extra) -> GateConfig:
    if kind == "switch":
        extra.setdefault("top_k", 1)
    if kind == "deepseek_v3":
        extra.update(n_group=4, topk_group=2)
    return GateConfig(kind=kind, **extra)


def test_registry_lists_every_kind():
    assert set(GATES) == {"softmax_topk", "gshard", "switch", "deepseek_v3", "sigmoid", "xmoe", "expert_choice"}
    for kind, cls in GATES.items():
        assert registry.get("gate", kind) is cls and cls.kind == kind


@pytest.mark.parametrize("kind", sorted(GATES))
def test_gradients_reach_every_router_parameter(kind):
    torch.manual_seed(0)
    gate = build_gate(any_config(kind, init_std=0.5), 6, 8).double()
    gate.train()
    x = torch.randn(12, 6, dtype=F64, requires_grad=True)
    result = gate(x)
    (result.probs_TE * torch.randn(12, 8, dtype=F64)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in gate.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", sorted(GATES))
def test_result_invariants_random_input(kind):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    gate = build_gate(any_config(kind, capacity_factor=1.0), 5, 8)
    gate.eval()
    result = gate(torch.randn(40, 5, generator=gen))
    rmap, probs = result.routing_map_TE, result.probs_TE
    assert rmap.shape == probs.shape == (40, 8)
    assert torch.all(probs[~rmap] == 0) and torch.all(probs[rmap] > 0)
    if kind == "expert_choice":
        assert result.tokens_per_expert().tolist() == [expert_choice_capacity(40, 8, 2, 1.0)] * 8
    else:
        assert torch.all(result.tokens_per_expert() <= expert_capacity(40, 8, gate.top_k, 1.0))
        assert int(rmap.sum()) + result.num_dropped == 40 * gate.top_k


def test_aux_loss_gradient_flows_through_mean_probs_only():
    gate, x = gate_on_table(GateConfig(kind="switch", top_k=1, aux_loss_coeff=1.0), LOG_P4)
    gate(x).aux_loss.backward()
    assert gate.weight_EM.grad.abs().sum() > 0


# ---------------------------------------------------------------- config errors ----------------

def test_top_k_greater_than_num_experts_names_both():
    with pytest.raises(ValueError, match="top_k=5.*num_experts=4"):
        build_gate(GateConfig(top_k=5), 8, 4)


@pytest.mark.parametrize("data,match", [
    ({"kind": "topk"}, "'topk' is not allowed.*'softmax_topk'"),
    ({"drop_policy": "random"}, "drop_policy.*'probs', 'position'"),
    ({"top_k": 0}, "top_k"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"kind": "switch"}, "top_k.*switch"),
    ({"kind": "softmax_topk", "n_group": 4}, "n_group=4 is not used by kind 'softmax_topk'.*deepseek_v3"),
    ({"kind": "switch", "top_k": 1, "normalize_topk": True}, "normalize_topk"),
    ({"kind": "expert_choice", "aux_loss_coeff": 0.01}, "aux_loss_coeff"),
    ({"kind": "deepseek_v3", "n_group": 2, "topk_group": 3}, "topk_group"),
    ({"aux_loss_seq_len": 8}, "aux_loss_coeff"),
    ({"top_kk": 2}, "unknown key 'top_kk'"),
])
def test_bad_config_raises_config_error(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(GateConfig, data)


def test_deepseek_group_checks_need_num_experts():
    with pytest.raises(ValueError, match="n_group=3 does not divide num_experts=8"):
        build_gate(GateConfig(kind="deepseek_v3", n_group=3, topk_group=1), 4, 8)
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 experts"):
        build_gate(GateConfig(kind="deepseek_v3", top_k=3, n_group=4, topk_group=1), 4, 8)


def test_gate_rejects_wrong_input_width():
    gate = build_gate(GateConfig(), 4, 4)
    with pytest.raises(ValueError, match=r"\[T, 4\].*\(3, 5\)"):
        gate(torch.zeros(3, 5))


# ---------------------------------------------------------------- top-k <-> dense --------------

def test_routing_from_topk_truth_table_and_padding():
    ids = torch.tensor([[2, 0], [1, -1], [-1, -1]])
    weights = t([[0.7, 0.3], [1.0, 0.0], [0.0, 0.0]])
    result = routing_from_topk(ids, weights, 3)
    assert_routing(result, [[1, 0, 1], [0, 1, 0], [0, 0, 0]], [[0.3, 0, 0.7], [0, 1.0, 0], [0, 0, 0]])


def test_topk_ids_from_routing_sorts_by_weight_and_pads():
    result = routing_from_topk(torch.tensor([[0, 2], [1, -1], [-1, -1]]), t([[0.3, 0.7], [1.0, 0.0], [0, 0]]), 3)
    ids, weights = topk_ids_from_routing(result, 3)
    assert ids.tolist() == [[2, 0, -1], [1, -1, -1], [-1, -1, -1]]
    torch.testing.assert_close(weights, t([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    ids4, _ = topk_ids_from_routing(result, 4)                 # k > E pads too
    assert ids4.tolist()[0] == [2, 0, -1, -1]
    with pytest.raises(ValueError, match="token 0 is routed to 2 experts, more than k=1"):
        topk_ids_from_routing(result, 1)


def test_topk_round_trip_through_a_gate_keeps_gradients():
    torch.manual_seed(0)
    gate = build_gate(GateConfig(kind="softmax_topk", top_k=3), 6, 8)
    result = gate(torch.randn(10, 6))
    ids, weights = topk_ids_from_routing(result, 3)
    assert torch.all(weights[:, :-1] >= weights[:, 1:])
    again = routing_from_topk(ids, weights, 8)
    assert torch.equal(again.routing_map_TE, result.routing_map_TE)
    assert torch.equal(again.probs_TE, result.probs_TE)
    again.probs_TE.sum().backward()
    assert gate.weight_EM.grad.abs().sum() > 0


@pytest.mark.parametrize("ids,match", [
    ([[0, 0]], "token 0 lists an expert more than once"),
    ([[0, 4]], "expert id 4 out of range; allowed: 0..3"),
    ([[-2, 1]], "expert id -2 out of range"),
])
def test_routing_from_topk_rejects_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        routing_from_topk(torch.tensor(ids), t([[0.5, 0.5]]), 4)
