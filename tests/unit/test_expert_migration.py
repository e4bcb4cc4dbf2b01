"""Executing placement changes on simulated ranks: every moved expert arrives with its parameters,
gradients, optimizer state and master weights; checkpoints are placement-free; training with a new
placement after every step equals training without (the acceptance test; gloo twin in tests/dist)."""
import dataclasses

import pytest
import torch

from impl.common.comm import CommError, SimWorld
from impl.common.dispatcher import ExpertPlacement
from impl.common.experts import GroupedExperts
from impl.common.expert_migration import (gather_logical_expert_state, load_logical_expert_state,
                                          migrate_experts)
from impl.common.registry import names
from impl.common.topology import get_topology
from tests.support.expert_training import TrainCase, train_rank

DISPATCHERS = names("dispatcher")
DEEP = "hier:node=2,socket=2,pcie-pair=2,gpu=2"      # the HierMoE testbed's levels, fan-out 2

TOPO = get_topology("2x2")
E = 8
El = E // TOPO.G
NEW = ExpertPlacement((5, 0, 7, 2, 1, 6, 3, 4))


def _experts(comm, placement, dtype=torch.float32):
    ex = GroupedExperts(El, 4, 3, kind="gpt", bias=True).to(dtype)
    ex.init_from_seed([placement.expert_of_slot[comm.rank * El + i] for i in range(El)], seed=1)
    return ex


def _owned(comm, placement, tensors: dict) -> dict:
    """{logical expert: {label: row}} of this rank, read independently of the module under test."""
    return {placement.expert_of_slot[comm.rank * El + i]: {k: t[i].clone() for k, t in tensors.items()}
            for i in range(El)}


def _all_tensors(ex, opt, masters=None):
    out = {}
    for name, p in ex.named_parameters():
        out[name] = p.detach()
        if p.grad is not None:
            out[f"{name}.grad"] = p.grad
        for key in ("exp_avg", "exp_avg_sq"):
            if p in opt.state:
                out[f"{name}.{key}"] = opt.state[p][key]
    for name, m in (masters or {}).items():
        out[name] = m.detach()
        out[f"{name}.grad"] = m.grad
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = opt.state[m][key]
    return out


def _fill_grads(comm, params, placement, scale=1.0):
    """Gradients that identify their expert: a function of (logical id, parameter name)."""
    for name, p in params:
        rows = [torch.full(p.shape[1:], float(placement.expert_of_slot[comm.rank * El + i] * 10 + len(name)) * scale)
                for i in range(El)]
        p.grad = torch.stack(rows).to(p.dtype)


def migrate_rank(comm):
    start = ExpertPlacement.identity(E)
    ex = _experts(comm, start)
    opt = torch.optim.Adam(ex.parameters(), lr=0.1)
    _fill_grads(comm, ex.named_parameters(), start)
    opt.step()
    _fill_grads(comm, ex.named_parameters(), start, scale=-0.5)   # a pending gradient (accumulation)
    before = _owned(comm, start, _all_tensors(ex, opt))
    comm.traffic.reset()
    result = migrate_experts(comm, ex, start, NEW, optimizer=opt)
    after = _owned(comm, NEW, _all_tensors(ex, opt))
    steps = [float(opt.state[p]["step"]) for p in ex.parameters()]
    return before, after, result, comm.traffic.by_level("bytes", category="migration"), steps


def test_migration_moves_parameters_gradients_and_adam_state_by_logical_id():
    results = SimWorld(TOPO).run(migrate_rank)
    before = {e: v for r in results for e, v in r[0].items()}
    after = {e: v for r in results for e, v in r[1].items()}
    assert sorted(after) == list(range(E))
    for e in range(E):
        assert before[e].keys() == after[e].keys() and len(after[e]) == 4 * 4   # 4 params x (value, grad, m, v)
        for label in before[e]:
            assert torch.equal(after[e][label], before[e][label]), (e, label)
    assert all(r[4] == [1.0] * 4 for r in results)                                 # shared 'step' untouched
    moved = results[0][2].moved_experts
    assert moved == tuple(e for e in range(E) if NEW.slot_of_expert[e] != e)
    # bytes per level: every expert that changes rank, its whole row, over the link between the ranks
    row = results[0][2].row_bytes
    expected = {n: 0 for n in TOPO.level_names}
    for e in moved:
        src, dst = e // El, NEW.slot_of_expert[e] // El
        if src != dst:
            expected[TOPO.link_name(src, dst)] += row
    total = {n: sum(r[3][n] for r in results) for n in TOPO.level_names}
    assert total == expected and row == 4 * (4 * 3 + 3 * 4 + 3 + 4) * 4           # fp32 x 4 tensors per param


def _master_rank(comm):
    start = ExpertPlacement.identity(E)
    ex = _experts(comm, start, torch.bfloat16)
    masters = {f"master.{n}": p.detach().float().clone().requires_grad_(True) for n, p in ex.named_parameters()}
    opt = torch.optim.Adam(masters.values(), lr=0.1)
    _fill_grads(comm, masters.items(), start)
    opt.step()
    with torch.no_grad():
        for n, p in ex.named_parameters():
            p.copy_(masters[f"master.{n}"])
    before = _owned(comm, start, _all_tensors(ex, opt, masters))
    migrate_experts(comm, ex, start, NEW, optimizer=opt, extra_tensors=masters)
    return before, _owned(comm, NEW, _all_tensors(ex, opt, masters))


def test_low_precision_model_with_fp32_master_weights():
    results = SimWorld(TOPO).run(_master_rank)
    before = {e: v for r in results for e, v in r[0].items()}
    after = {e: v for r in results for e, v in r[1].items()}
    for e in range(E):
        assert any(t.dtype == torch.bfloat16 for t in after[e].values())
        for label, value in before[e].items():
            assert value.dtype == after[e][label].dtype and torch.equal(after[e][label], value), (e, label)


def _disagree_rank(comm, what):
    ex = _experts(comm, ExpertPlacement.identity(E))
    opt = torch.optim.Adam(ex.parameters(), lr=0.1)
    _fill_grads(comm, ex.named_parameters(), ExpertPlacement.identity(E))
    if what == "state" and comm.rank == 1:
        pass                      # rank 1 never stepped: no Adam state
    else:
        opt.step()
    if what == "step" and comm.rank == 2:
        for p in ex.parameters():
            opt.state[p]["step"] += 1
    migrate_experts(comm, ex, ExpertPlacement.identity(E), NEW, optimizer=opt)


@pytest.mark.parametrize("what,message", [("state", "different expert tensors"),
                                          ("step", "cannot follow a single expert")])
def test_ranks_with_different_state_fail_clearly(what, message):
    with pytest.raises(CommError, match=message):
        SimWorld(TOPO).run(_disagree_rank, what)


def test_no_op_migration_moves_nothing():
    def rank(comm):
        ex = _experts(comm, ExpertPlacement.identity(E))
        before = {k: v.clone() for k, v in ex.state_dict().items()}
        res = migrate_experts(comm, ex, ExpertPlacement.identity(E), ExpertPlacement.identity(E))
        return res.moved_experts, all(torch.equal(before[k], v) for k, v in ex.state_dict().items())
    for moved, same in SimWorld(TOPO).run(rank):
        assert moved == () and same
    with pytest.raises(ValueError, match="placements have 8 and 4 experts"):
        migrate_experts(None, None, ExpertPlacement.identity(E), ExpertPlacement.identity(4))


def _checkpoint_rank(comm):
    start = ExpertPlacement.identity(E)
    ex = _experts(comm, start)
    opt = torch.optim.Adam(ex.parameters(), lr=0.1)
    _fill_grads(comm, ex.named_parameters(), start)
    opt.step()
    migrate_experts(comm, ex, start, NEW, optimizer=opt)
    ckpt = gather_logical_expert_state(comm, ex, NEW, optimizer=opt)
    other = ExpertPlacement((3, 1, 6, 0, 7, 2, 5, 4))
    fresh = GroupedExperts(El, 4, 3, kind="gpt", bias=True)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)                       # no state yet
    load_logical_expert_state(fresh, other, comm.rank, comm.world_size, ckpt, optimizer=fresh_opt)
    again = gather_logical_expert_state(comm, fresh, other, optimizer=fresh_opt)
    weights_only = GroupedExperts(El, 4, 3, kind="gpt", bias=True)
    load_logical_expert_state(weights_only, start, comm.rank, comm.world_size, ckpt)
    own = _owned(comm, start, dict(weights_only.named_parameters()))
    return ckpt, again, own


def test_checkpoint_in_logical_order_loads_into_any_placement():
    results = SimWorld(TOPO).run(_checkpoint_rank)
    ckpt, again = results[0][0], results[0][1]
    assert ckpt["num_experts"] == again["num_experts"] == E
    assert ckpt["shared"].keys() == again["shared"].keys() and all(
        torch.equal(ckpt["shared"][k], again["shared"][k]) for k in ckpt["shared"])
    for e in range(E):
        assert ckpt["experts"][e].keys() == again["experts"][e].keys()
        assert len(ckpt["experts"][e]) == 4 * 3                                     # value, exp_avg, exp_avg_sq
        for label, value in ckpt["experts"][e].items():
            assert torch.equal(again["experts"][e][label], value)
    for r in results:
        for e, entries in r[2].items():
            for label, value in entries.items():
                assert torch.equal(value.detach(), ckpt["experts"][e][label])
    ex = GroupedExperts(El, 4, 3, kind="gpt", bias=False)
    with pytest.raises(KeyError, match="missing from the checkpoint|have no tensor here"):
        load_logical_expert_state(ex, ExpertPlacement.identity(E), 0, 4, ckpt)
    with pytest.raises(ValueError, match="num_experts"):
        load_logical_expert_state(ex, ExpertPlacement.identity(4), 0, 4, ckpt)


def _meta_rank(comm):
    """Experts, gradients and Adam state on 'meta' (no data, but devices are checked): a migration
    index or optimizer buffer made on the CPU fails here, as it would with CUDA experts."""
    ex = GroupedExperts(El, 4, 3, kind="gpt", bias=True).to("meta")
    opt = torch.optim.Adam(ex.parameters(), lr=0.1)
    for p in ex.parameters():
        p.grad = torch.zeros_like(p)
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    migrate_experts(comm, ex, ExpertPlacement.identity(E), NEW, optimizer=opt)
    ckpt = gather_logical_expert_state(comm, ex, NEW, optimizer=opt)
    fresh = GroupedExperts(El, 4, 3, kind="gpt", bias=True).to("meta")
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    load_logical_expert_state(fresh, NEW, comm.rank, comm.world_size, ckpt, optimizer=fresh_opt)
    return {label: value.device.type for label, value in ckpt["experts"][0].items()}, \
        {key: v.device.type for p in fresh.parameters() for key, v in fresh_opt.state[p].items() if v.dim()}


def test_migration_and_checkpoint_buffers_live_on_the_experts_device():
    for ckpt_devices, state_devices in SimWorld(TOPO).run(_meta_rank):
        assert set(ckpt_devices.values()) == {"meta"} and len(ckpt_devices) == 4 * 3
        assert state_devices == {"exp_avg": "meta", "exp_avg_sq": "meta"}


# ------------------------------------------------------------------------------------------
# acceptance: training with a placement change after every step
# ------------------------------------------------------------------------------------------
def _assert_same_tensor(a, b, exact, what):
    if exact:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=str(what))


def _assert_same_training(run, base, exact):
    if exact:
        assert run["losses"] == base["losses"]
    else:
        assert run["losses"] == pytest.approx(base["losses"], rel=1e-6, abs=1e-7)
    for e, entries in base["experts"]["experts"].items():
        for label, value in entries.items():
            _assert_same_tensor(run["experts"]["experts"][e][label], value, exact, (e, label))
    for name, value in base["gate"].items():
        _assert_same_tensor(run["gate"][name], value, exact, name)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_every_dispatcher_trains_the_same_under_a_new_placement_every_step(dispatcher):
    """The invariant for every registered dispatcher, on a four-level topology deep enough for
    every registered route (K = 2: bit-identical)."""
    case = TrainCase(dispatcher=dispatcher, top_k=2, steps=2, num_experts=16, tokens_per_rank=4, hidden=4, ffn_hidden=4)
    base = SimWorld(get_topology(DEEP)).run(train_rank, case)[0]
    run = SimWorld(get_topology(DEEP)).run(train_rank, dataclasses.replace(case, policy="random"))
    assert all(r["losses"] == run[0]["losses"] for r in run)
    assert run[0]["moves"] >= 2 * 8
    _assert_same_training(run[0], base, exact=True)


@pytest.mark.parametrize("dispatcher", ["flat", "hd2"])
@pytest.mark.parametrize("top_k", [2, 3])
def test_training_with_a_new_placement_every_step_equals_training_without(dispatcher, top_k):
    """K = 2: bit-identical (a token's two expert outputs are added in either order, exactly);
    K = 3: the combine adds three terms in another order, so equal to float32 rounding."""
    case = TrainCase(dispatcher=dispatcher, top_k=top_k, steps=5)
    base = SimWorld(TOPO).run(train_rank, case)[0]
    run = SimWorld(TOPO).run(train_rank, TrainCase(dispatcher=dispatcher, top_k=top_k, steps=5, policy="random",
                                                   resume_steps=2))
    assert all(r["losses"] == run[0]["losses"] for r in run)
    run = run[0]
    assert run["moves"] >= 5 * 4
    _assert_same_training(run, base, exact=top_k == 2)
    # the checkpoint written after the swaps, loaded into an identity-placement run, loses nothing
    for e, entries in run["experts"]["experts"].items():
        for label, value in entries.items():
            assert torch.equal(run["reloaded"]["experts"][e][label], value)
    if top_k == 2:
        assert run["resumed"] == run["continued"]
    else:
        assert run["resumed"] == pytest.approx(run["continued"], rel=1e-6)
