"""FSMoE's pipelined layer on real gloo processes (4 and 8 ranks), about twenty cases per world
size in one launch each: outputs and all gradients equal the single-process reference, the bytes
per level equal the simulated run's, and the lanes' measured events keep the schedule's order."""
import itertools
import math

import pytest

from impl.common.comm import SimWorld
from impl.common.launcher import launch
from impl.common.topology import get_topology
from impl.fsmoe.config import MoELayerConfig
from tests.support.fsmoe_case import FSMoECase, assert_matches_reference, reference, run_cases

pytestmark = pytest.mark.dist


def _cases(topo):
    out = []
    degrees = itertools.cycle([(1, 1), (2, 3), (4, 2), (3, 8), (8, 4)])
    for gate, expert, cf in itertools.product(("gshard", "sigmoid", "xmoe", "expert_choice", "softmoe"),
                                              ("gpt", "mixtral"), (0.75, None)):
        r_fwd, r_bwd = next(degrees)
        cfg = MoELayerConfig(hidden=6, ffn_hidden=2 * topo.gpus_per_node, num_experts=2 * topo.num_nodes, top_k=2,
                             gate=gate, expert=expert, capacity_factor=cf, r_fwd=r_fwd, r_bwd=r_bwd,
                             slots_per_expert=math.lcm(r_fwd, r_bwd),
                             gate_options={"noise_seed": 3} if gate == "gshard" else {})
        out.append(FSMoECase(cfg, tokens_per_rank=6, gradient_slice=4))
    for dispatch in ("flat", "1dh", "2dh"):    # EP over every GPU (N_ESP = 1)
        cfg = MoELayerConfig(hidden=6, ffn_hidden=4, num_experts=topo.G, top_k=2, esp=False, dispatch=dispatch,
                             capacity_factor=1.0, r_fwd=2, r_bwd=3, gate_options={"noise_seed": 3})
        out.append(FSMoECase(cfg, tokens_per_rank=6, gradient_slice=4))
    return out


@pytest.mark.parametrize("topo_name", ["2x2", "2x4"])
def test_fsmoe_layer_on_gloo_equals_reference_and_sim(topo_name):
    topo = get_topology(topo_name)
    cases = _cases(topo)
    results = launch(run_cases, topo.G, args=(cases,), topology=topo, timeout_s=60, deadline_s=600)
    sim = SimWorld(topo).run(run_cases, cases)
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        assert_matches_reference(per_rank, reference(case, topo.G))
        assert [r["traffic"] for r in per_rank] == [r[i]["traffic"] for r in sim], case.cfg
        for r in per_rank:
            for phase, events in r["events"].items():
                starts = {n: s for n, s, _ in events}
                ends = {n: e for n, _, e in events}
                for kinds in (("dispatch", "gar", "combine"), ("ag", "rs"), ("expert",)):
                    lane = [n for n, _, _ in events if n.rstrip("0123456789") in kinds]
                    assert all(ends[a] <= starts[b] for a, b in zip(lane, lane[1:])), (phase, lane)


def test_emu_compares_the_pipelines_measured_with_their_prediction(tmp_path):
    """The emu run's layer row measures the span its prediction covers (the two pipelines), inside
    the whole layer's wall time, which is recorded beside it."""
    import yaml

    from impl.common.costmodel import LinearModel
    from impl.experiments.fsmoe.emu import EmuConfig, run, validate

    model = LinearModel(0.1, 1e-6).to_dict(is_comm=True)
    profile = {"name": "t", "topology": "2x2", "source": "test", "units": {"time": "ms", "size": "byte"},
               "comm": {k: {s: model} for k, s in (("a2a", "inter-1"), ("allgather", "intra-1"),
                                                    ("reducescatter", "intra-1"), ("allreduce", "inter-1"))},
               "compute": {"gemm": {"alpha": 0.01, "beta": 1e-7, "work_unit": "mac"}}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    cfg = EmuConfig(hidden=16, ffn_hidden=32, tokens_per_rank=32, repeats=2, warmup=0, gradient_elements=64)
    frame = run(cfg, *validate(cfg, str(path)))
    layer = frame[frame.task == "layer"].set_index("schedule")
    assert set(layer.index) == {"fsmoe", "sequential"}
    assert (layer.measured_ms > 0).all() and (layer.measured_ms < layer.wall_ms).all()
    tasks = frame[frame.task != "layer"]
    assert tasks.wall_ms.isna().all()
