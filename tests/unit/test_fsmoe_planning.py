"""FSMoE's planning: Algorithm 1's case partition and optima (enumeration, the vectorised form,
SLSQP rounded as released, the timeline), the gradient partitioner against exhaustive search on
small instances, and every registered training plan as a valid schedule."""
import itertools
import random
from dataclasses import replace

import numpy as np
import pytest

from impl.common.costmodel import LinearModel, load_profile
from impl.common.registry import get, names
from impl.common.timeline import lower_bound, simulate
from impl.fsmoe.costs import BlockShape, ChunkModel, PassModel, block_costs
from impl.fsmoe.degree import (DOMAINS, case_of, case_time, case_times, integer_optimum, predicates, slsqp_degree,
                               timeline_optimum, timeline_time)
from impl.fsmoe.partition import _available, moe_times, objective, partition, step1, whole_after
from impl.fsmoe.planner import TRAINING_PLAN
from impl.fsmoe.schedules import fsmoe_pass


def _random_model(rng: random.Random, t_gar: float | None = None) -> PassModel:
    c = lambda: ChunkModel(rng.uniform(0.01, 1.0), rng.uniform(0.5, 40.0))  # noqa: E731
    return PassModel(c(), c(), c(), c(), rng.uniform(0, 30) if t_gar is None else t_gar)


def test_exactly_one_case_holds_at_every_degree():
    rng = random.Random(0)
    for _ in range(300):
        m = _random_model(rng)
        for r in range(1, 9):
            q = predicates(m, r)
            holds = {1: (q["Q1"] and not q["Q2"] and q["Q4"]) or (q["Q1"] and q["Q2"] and q["Q5"])
                     or (not q["Q1"] and not q["Q3"] and q["Q6"]) or (not q["Q1"] and q["Q3"] and q["Q7"]),
                     2: (q["Q1"] and q["Q2"] and not q["Q5"]) or (not q["Q1"] and q["Q3"] and not q["Q7"]),
                     3: q["Q1"] and not q["Q2"] and not q["Q4"],
                     4: not q["Q1"] and not q["Q3"] and not q["Q6"]}
            assert [c for c, ok in holds.items() if ok] == [case_of(m, r)]


def test_vectorised_optimum_equals_enumeration():
    rng = random.Random(1)
    for _ in range(100):
        m = _random_model(rng, 0.0)
        gars = np.array([rng.uniform(0, 60) for _ in range(7)])
        times, rs = moe_times(m, gars)
        for t_gar, t, r in zip(gars, times, rs):
            best = integer_optimum(m.with_gar(t_gar))
            assert (best.r, best.time) == (int(r), pytest.approx(float(t)))


def test_slsqp_choice_is_the_best_feasible_rounded_point():
    """The released solver's answer, checked by exhaustion over its own candidates: every case's
    time at every power of two where that case's predicates hold (within its tolerance)."""
    rng = random.Random(2)
    for _ in range(12):
        m = _random_model(rng)
        choice = slsqp_degree(m)
        assert choice.r in DOMAINS["pow2"]
        assert case_of(m, choice.r) == choice.case or case_times(m, choice.r)[choice.case] == pytest.approx(choice.time)
        feasible = [case_time(m, r) for r in DOMAINS["pow2"]]
        assert choice.time >= min(feasible) - 1e-6          # never better than the model allows


def test_timeline_optimum_is_the_best_simulated_degree():
    rng = random.Random(3)
    for _ in range(20):
        m = _random_model(rng, 0.0)
        best = timeline_optimum(m, fsmoe_pass)
        assert best.time == pytest.approx(min(timeline_time(m, r, fsmoe_pass) for r in range(1, 9)))


def test_case_two_is_exact_when_compute_dominates():
    """Experts far slower than any collective: the pass is first dispatch + first AllGather + all
    expert work + last ReduceScatter + last combine, the Case 2 form, on the timeline too."""
    m = PassModel(ChunkModel(0.1, 1.0), ChunkModel(0.05, 0.5), ChunkModel(0.05, 0.5), ChunkModel(0.2, 100.0))
    for r in range(1, 9):
        assert case_of(m, r) == 2
        assert timeline_time(m, r, fsmoe_pass) == pytest.approx(case_time(m, r))


def _blocks(n, seed):
    rng = random.Random(seed)
    profile = load_profile(rng.choice(["fsmoe-testbed-a", "fsmoe-testbed-b"]))
    E = profile.get_topology().num_nodes
    out = []
    for _ in range(n):
        M = rng.choice([1024, 2048])
        out.append(block_costs(BlockShape(rng.choice([1, 2, 4]), rng.choice([256, 512, 1024]), M,
                                          M * rng.choice([2, 4]), rng.choice([8, 16]), E, rng.choice([1, 2]),
                                          rng.choice([1.2, None]), rng.choice(["gpt", "mixtral"])), profile))
    return out


def _synthetic_blocks(n, seed):
    """Blocks whose windows are short against their gradients, so that pushing gradients into MoE
    passes (Step 2) matters: experts dominate the backward, the AllReduce is slow."""
    rng = random.Random(seed)
    base = _blocks(1, 0)[0]
    out = []
    for _ in range(n):
        m = PassModel(ChunkModel(0.2, rng.uniform(2, 6)), ChunkModel(0.1, rng.uniform(1, 3)),
                      ChunkModel(0.1, rng.uniform(1, 3)), ChunkModel(0.1, rng.uniform(10, 40)))
        out.append(replace(base, fwd=m, bwd=m, dense_bwd_ms=rng.uniform(0.1, 1.0), mp_ag_ms=0.05, mp_rs_ms=0.05,
                           grad_bytes=int(rng.uniform(2e7, 8e7)),
                           allreduce=LinearModel(0.3, rng.uniform(2e-7, 6e-7))))
    return out


def _moe_bytes(plan, n) -> np.ndarray:
    return np.array([sum(t.nbytes for t in plan.tasks if t.where == ("moe", b)) for b in range(n)])


def _realised_objective(blocks, plan) -> float:
    """Step 2's objective recomputed from the emitted tasks: each block's MoE backward with the
    bytes placed in it, plus the exposed tail."""
    total = 0.0
    for b, nbytes in enumerate(_moe_bytes(plan, len(blocks))):
        total += float(moe_times(blocks[b].bwd, np.array(blocks[b].t_ar(nbytes)))[0])
    return total + blocks[0].t_ar(sum(t.nbytes for t in plan.tasks if t.where == ("tail",)))


@pytest.mark.parametrize("maker,n", [("synthetic", 2), ("synthetic", 3), ("synthetic", 4), ("synthetic", 5),
                                     ("profiles", 4), ("profiles", 6)])
def test_partitioner_carries_out_the_pushes_it_optimised(maker, n):
    """The tasks realise Step 2's x_b exactly (each block's MoE slice = its Step-1 window + x_b)
    and the objective recomputed from the tasks is the one the plan reports."""
    make = _synthetic_blocks if maker == "synthetic" else _blocks
    for seed in range(10):
        blocks = make(n, seed)
        plan = partition(blocks)
        s1 = step1(blocks)
        window = np.array([sum(a for a, _ in s1.moe[b]) for b in range(n)])
        assert _moe_bytes(plan, n) - window == pytest.approx(np.array(plan.pushed), abs=1.0)
        assert _realised_objective(blocks, plan) == pytest.approx(plan.objective_ms, rel=1e-9)


def test_the_random_cases_exercise_pushes_that_compete_for_one_producer():
    """Among the cases above, some push into two or more blocks (the realisation order matters)."""
    assert sum(np.count_nonzero(partition(_synthetic_blocks(n, seed)).pushed) >= 2
               for n in (3, 4, 5) for seed in range(10)) >= 3


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (2, 2), (3, 3), (3, 4), (3, 5), (3, 6), (2, 7), (3, 21), (4, 6)])
def test_partitioner_equals_exhaustive_search_on_small_instances(n, seed):
    blocks = _synthetic_blocks(n, seed)
    grid = 6
    plan = partition(blocks, grid=grid, seed=0)
    s1 = step1(blocks)
    avail = _available(s1, n)
    if avail.max() == 0:
        assert plan.pushed == (0.0,) * n
        return
    step = avail.max() / grid
    units = np.floor(avail / step + 1e-9).astype(int)
    best = min(objective(blocks, s1, np.array(u) * step)
               for u in itertools.product(*(range(k + 1) for k in units))
               if all(sum(u[b2] for b2 in range(b, n)) <= units[b] for b in range(n)))
    assert plan.objective_ms == pytest.approx(float(best), rel=1e-9)
    assert _realised_objective(blocks, plan) == pytest.approx(float(best), rel=1e-9)     # the tasks too
    assert plan.objective_ms <= float(objective(blocks, s1, np.zeros(n))) + 1e-9


def test_the_small_instances_exercise_step_two():
    """Most of the instances above push part of the leftover into MoE passes."""
    pushed = [any(partition(_synthetic_blocks(n, seed), grid=6).pushed) for n, seed in
              [(2, 1), (2, 2), (3, 3), (3, 4), (3, 5), (3, 6), (2, 7)]]
    assert sum(pushed) >= 4


def test_partitioner_places_every_gradient_byte_once_after_it_exists():
    for seed in range(6):
        blocks = _blocks(4, seed)
        plan = partition(blocks)
        assert sum(t.nbytes for t in plan.tasks) == pytest.approx(sum(bc.grad_bytes for bc in blocks))
        for t in plan.tasks:
            if t.where[0] in ("moe", "dense"):
                assert all(p > t.where[1] for p in t.producers)     # produced by a block processed earlier


@pytest.mark.parametrize("name", names(TRAINING_PLAN))
def test_every_training_plan_is_a_valid_schedule(name):
    for seed in range(3):
        blocks = _blocks(3, seed)
        plan = get(TRAINING_PLAN, name)(blocks)
        tl = simulate(plan.schedule(blocks))
        assert tl.makespan >= max(tl.busy().values()) - 1e-9
        assert tl.makespan >= lower_bound(plan.schedule(blocks)) - 1e-9
        assert sum(t.size for t in plan.schedule(blocks).tasks if t.kind == "gar") == pytest.approx(
            sum(bc.grad_bytes for bc in blocks))
        if name == "ds-moe":       # one lane: the makespan is the sum of every task
            assert tl.makespan == pytest.approx(sum(t.duration for t in plan.schedule(blocks).tasks))


@pytest.mark.parametrize("name", names(TRAINING_PLAN))
def test_every_chunk_waits_for_its_pass_input_not_for_its_lane(name):
    """The data dependencies alone order each pass: every chunk's dispatch depends on what its
    pass consumes (the block's sequence-parallel ReduceScatter forward, the previous block's
    backward or the forward's end), so no reordering of a lane (and no bound) can run a chunk
    before its input exists."""
    blocks = _blocks(2, 0)
    plan = get(TRAINING_PLAN, name)(blocks)
    tasks = plan.schedule(blocks).tasks
    for t in tasks:
        if t.kind == "dispatch":
            block, phase = t.name.split(".")[:2]
            assert t.deps, t.name
            if phase == "f":
                assert t.deps == (f"{block}.f.mprs",), t.name
            first = next(u for u in tasks if u.kind == "dispatch" and u.name.startswith(f"{block}.{phase}."))
            assert t.deps == first.deps, t.name


def test_fsmoe_is_never_slower_than_without_partitioning():
    fsmoe = get(TRAINING_PLAN, "fsmoe")
    for seed in range(8):
        blocks = _blocks(3, seed)
        plan = fsmoe(blocks)
        plain = type(plan)("plain", plan.lanes, tuple((r, integer_optimum(bc.bwd).r) for (r, _), bc in
                                                      zip(plan.degrees, blocks)), whole_after(blocks))
        assert plan.makespan(blocks) <= plain.makespan(blocks) + 1e-9


def test_lina_chunks_fill_the_windows_of_the_degree_the_plan_runs():
    """PipeMoE+Lina issues 30 MB chunks into block b's MoE backward until its idle link time at
    the degree the plan executes (PipeMoE's, both passes) is used up: every chunk but the last
    starts inside that window, and the window is full whenever chunks are left over for later."""
    from baselines.pipemoe.plans import LINA_CHUNK_BYTES
    from impl.fsmoe.degree import olp_moe

    lina = get(TRAINING_PLAN, "pipemoe-lina")
    differs = 0
    for seed in range(12):
        blocks = _blocks(3, seed)
        plan = lina(blocks)
        for b, bc in enumerate(blocks):
            r = plan.degrees[b][1]
            model = bc.bwd.single_lane()
            differs += r != integer_optimum(model.with_gar(0.0)).r
            window = olp_moe(model, r)
            times = [bc.t_ar(t.nbytes) for t in plan.grads if t.where == ("moe", b)]
            assert sum(times[:-1]) < window + 1e-9
            later = [t for t in plan.grads if t.where[0] == "tail" or t.where == ("dense", b)
                     or (t.where[0] in ("moe", "dense") and t.where[1] < b)]
            if any(p > b for t in later for p in t.producers):
                assert sum(times) >= window - 1e-9
            assert all(t.nbytes <= LINA_CHUNK_BYTES + 1e-6 for t in plan.grads)
    assert differs > 0          # the executed degree is not the backward optimum in some blocks


def test_sequence_parallel_tasks_are_priced_by_the_collective_they_run():
    """Forward: AllGather (mpag) then ReduceScatter (mprs); backward: the ReduceScatter's gradient
    is an AllGather and the AllGather's a ReduceScatter, each priced by its own model."""
    from impl.fsmoe.schedules import backward_tasks, forward_tasks
    from impl.fsmoe.schedules import LANES_3 as lanes
    bc = replace(_blocks(1, 0)[0], mp_ag_ms=1.25, mp_rs_ms=7.5)
    fwd, _ = forward_tasks([bc], [(1, 1)], lanes)
    bwd, _ = backward_tasks([bc], [(1, 1)], [], lanes)
    by_name = {t.name: t.duration for t in fwd + bwd}
    assert (by_name["b0.f.mpag"], by_name["b0.f.mprs"]) == (1.25, 7.5)
    assert (by_name["b0.b.mprs"], by_name["b0.b.mpag"]) == (1.25, 7.5)


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_gpipe_charges_each_stage_transfer_once_on_the_sending_stages_link(micro_batches):
    """DS-MoE runs one lane per stage; with one micro-batch the stages take turns, so the
    iteration is every task plus one forward and one backward transfer. With more micro-batches
    each stage-to-stage transfer is one task on the sender's lane, waited for by the receiver;
    a zero send_ms leaves the schedule as it was."""
    from impl.fsmoe.schedules import LANES_SEQUENTIAL, gpipe_iteration

    blocks = _blocks(2, 0)
    plan = get(TRAINING_PLAN, "ds-moe")(blocks)
    stages = [(blocks, list(plan.degrees), list(plan.grads))] * 2
    plain = gpipe_iteration(stages, micro_batches, LANES_SEQUENTIAL)
    assert gpipe_iteration(stages, micro_batches, LANES_SEQUENTIAL, 0.0) == plain
    sent = gpipe_iteration(stages, micro_batches, LANES_SEQUENTIAL, 1.5)
    sends = [t for t in sent.tasks if t.kind == "send"]
    assert len(sends) == 2 * micro_batches
    assert {t.lane for t in sends if ".f." in t.name} == {"seq@s0"} and {t.lane for t in sends if ".b." in t.name} == {"seq@s1"}
    for t in sends:
        receiver = next(u for u in sent.tasks if t.name in u.deps)
        assert receiver.lane != t.lane
    if micro_batches == 1:
        assert simulate(sent).makespan == pytest.approx(simulate(plain).makespan + 2 * 1.5)
    assert simulate(sent).makespan >= simulate(plain).makespan
