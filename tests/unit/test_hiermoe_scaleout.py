"""Scale-out sweep (beyond the paper): its hierarchies, the extrapolated profile (which must give
back the testbed's own constants at the testbed's size), uniform routing, and crossovers."""
import pandas as pd
import pytest
import torch

from impl.common.config import ConfigError
from impl.common.costmodel import load_profile
from impl.experiments.hiermoe import scaleout


def test_hierarchies_have_8_gpus_per_node():
    for D, shape in ((2, [4, 8]), (3, [4, 2, 4]), (4, [4, 2, 2, 2])):
        topo = scaleout.scaleout_topology(32, D)
        assert [lv.fanout for lv in topo.levels] == shape and topo.D == D and topo.gpus_per_node == 8
    with pytest.raises(ConfigError, match="gpus: 12 is not allowed"):
        scaleout.scaleout_topology(12, 2)
    with pytest.raises(ConfigError, match="depths: 5 is not allowed"):
        scaleout.scaleout_topology(32, 5)


def test_extrapolation_gives_the_testbed_back_at_its_size():
    base = load_profile("hiermoe-testbed")
    prof = scaleout.scaleout_profile(scaleout.scaleout_topology(32, 4), base)
    for step in ("flat", "inter-1", "intra-1", "inter-2", "intra-2", "inter-3", "intra-3"):
        assert prof.comm_model("a2a", step).alpha_ms == pytest.approx(base.comm_model("a2a", step).alpha_ms)
        assert prof.comm_model("a2a", step).beta_ms == pytest.approx(base.comm_model("a2a", step).beta_ms)
    big = scaleout.scaleout_profile(scaleout.scaleout_topology(1024, 2), base)
    assert big.comm_model("a2a", "flat").alpha_ms > base.comm_model("a2a", "flat").alpha_ms   # more peers
    assert big.comm_model("a2a", "inter-1").beta_ms > base.comm_model("a2a", "inter-1").beta_ms


def test_uniform_slots_are_distinct_and_sorted():
    ids = scaleout.uniform_slots(5000, 64, 8, torch.Generator().manual_seed(0))
    assert ids.shape == (5000, 8) and torch.all(ids[:, 1:] > ids[:, :-1])
    assert ids.min() >= 0 and ids.max() < 64


def test_small_sweep_and_crossovers():
    cfg = scaleout.ScaleoutConfig(model="qwen3-30b-a3b-32l", gpus=(16, 32), depths=(2,), tokens_per_rank=64, seeds=1)
    frame = scaleout.run(cfg, progress=False)
    assert set(frame["system"]) == set(scaleout.SYSTEMS) and len(frame) == 2 * len(scaleout.SYSTEMS)
    assert (frame[frame.system == "Megatron-LM"]["speedup"] == 1.0).all()
    cross = scaleout.crossovers(frame)
    assert {"D", "faster", "than", "G=16", "G=32", "crossover"} <= set(cross.columns)
    toy = pd.DataFrame([{"D": 2, "G": g, "system": s, "a2a_ms": ms, "seed": 0}
                        for g, a, b in ((32, 2.0, 1.0), (64, 1.0, 2.0)) for s, ms in (("A", a), ("B", b))])
    row = scaleout.crossovers(toy, pairs=(("A", "B"),)).iloc[0]
    assert row["crossover"] == "between 32 and 64 (a overtakes)"
