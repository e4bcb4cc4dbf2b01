"""Expert migration on 4 real gloo processes: training with a new placement after every step
(random permutations, SmartMoE with flat, HierD-ES with hd2) equals training without, bit for bit; a
logical checkpoint written after the swaps resumes an identity-placement run exactly, and every
moved expert arrives with its gradients and Adam state over the right links."""
import pickle

import pytest
import torch

from impl.common.comm import SimWorld
from impl.common.launcher import launch
from impl.common.topology import get_topology
from tests.support.expert_training import TrainCase, train_cases
from tests.unit.test_expert_migration import migrate_rank

pytestmark = pytest.mark.dist

TOPO = get_topology("2x2")
SIZE = dict(num_experts=16, tokens_per_rank=24)
CASES = [  # per dispatcher: no moves, a random permutation every step (+ resume), a planner every step
    TrainCase(dispatcher="flat", **SIZE),
    TrainCase(dispatcher="flat", policy="random", resume_steps=2, **SIZE),
    TrainCase(dispatcher="flat", policy="smartmoe", planner_kwargs=(("history", 1),), **SIZE),
    TrainCase(dispatcher="hd2", **SIZE),
    TrainCase(dispatcher="hd2", policy="random", resume_steps=2, **SIZE),
    TrainCase(dispatcher="hd2", policy="hierd-es", **SIZE),
]


def _job(comm):
    """Results as plain pickle bytes: tensors sent through a multiprocessing queue would be shared
    through the rank's file descriptors, which vanish when the rank exits."""
    return pickle.dumps({"train": train_cases(comm, CASES), "migrate": migrate_rank(comm)})


def _same_state(a, b):
    return all(torch.equal(a["experts"][e][k], v) for e, entries in b["experts"].items() for k, v in entries.items())


def test_migration_and_training_on_gloo():
    results = [pickle.loads(r) for r in launch(_job, TOPO.G, topology=TOPO, timeout_s=60, deadline_s=300)]
    train = [r["train"] for r in results]
    assert all(t[i]["losses"] == train[0][i]["losses"] for t in train for i in range(len(CASES)))
    runs = train[0]
    for start in (0, 3):                       # flat, hd2: base, random, planner
        base = runs[start]
        for run in runs[start + 1:start + 3]:
            assert run["moves"] > 0
            assert run["losses"] == base["losses"]
            assert _same_state(run["experts"], base["experts"])
        resumed = runs[start + 1]
        assert _same_state(resumed["reloaded"], resumed["experts"])
        assert resumed["resumed"] == resumed["continued"]

    # the same decisions as on simulated ranks
    sim = SimWorld(TOPO).run(train_cases, CASES)[0]
    assert [r["placement"] for r in sim] == [r["placement"] for r in runs]

    # expert-by-expert movement and bytes per level, as on SimComm
    moved = results[0]["migrate"]
    before = {e: v for r in results for e, v in r["migrate"][0].items()}
    after = {e: v for r in results for e, v in r["migrate"][1].items()}
    assert all(torch.equal(after[e][k], v) for e in before for k, v in before[e].items())
    sim_migrate = SimWorld(TOPO).run(migrate_rank)
    assert [r["migrate"][3] for r in results] == [r[3] for r in sim_migrate]
    assert moved[2].moved_experts == sim_migrate[0][2].moved_experts
