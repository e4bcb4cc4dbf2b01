"""Emulated-cluster validation without running it: the shipped matrix resolves, the predictor is
the model of impl.hiermoe.dimension on the run's exact routing (a thin layer), the busiest-link
diagnostic equals the model where every split is equal, and the report renders from a CSV."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from figures import emu_validation as fig
from impl.common.config import ConfigError
from impl.common.costmodel import HardwareProfile, LinearModel
from impl.experiments import emu_validation as ev
from impl.experiments.layer_bench import LayerBenchConfig, RoutingSource, validate
from impl.hiermoe import dimension

CONFIG = "workflows/config/experiments/emu_validation.yaml"
PROFILE = HardwareProfile("test-2x2", "2x2", "test", comm={
    ("a2a", "flat"): LinearModel(2.0, 1e-4), ("a2a", "inter-1"): LinearModel(3.0, 2e-4),
    ("a2a", "intra-1"): LinearModel(0.5, 1e-5)})


def test_the_shipped_matrix_resolves(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    cfg = ev.load(CONFIG)
    assert cfg.topologies == ("2x4", "4x2") and set(cfg.routings) == {"uniform", "zipf"}
    built = ev.bench_config(cfg, "4x2", "zipf", "hierd-es", "cal.yaml")
    assert (built.system, built.planner, built.profile, built.timing) == ("hierd", "hierd-es", "cal.yaml", "stages")
    assert built.network.emulate and built.network.rate == "200mbit" and built.routing.skew == 1.0
    assert ev.bench_config(cfg, "2x4", "uniform", "flat", "cal.yaml").profile is None
    with pytest.raises(ConfigError, match="bench.topology: set by the validation matrix"):
        ev.load(CONFIG, ["bench.topology=2x2"])


def _bench(system: str, distribution: str = "zipf") -> object:
    return validate(LayerBenchConfig(topology="2x2", system=system, num_experts=8, top_k=2, hidden=16, ffn_hidden=8,
                                     tokens_per_rank=64, routing=RoutingSource("synthetic", distribution, 1.0)),
                    with_profile=False)


def test_flat_and_hd2_are_the_dimension_model_on_the_runs_routing():
    """Dispatch and combine are the route's forward collectives by the per-collective model: the
    dispatch carries the split counts, ids and gate weights besides the rows, the combine rows only."""
    rb = _bench("flat")
    maps = ev.synthetic_routing_maps(rb)
    assert len(maps) == 4 and all(int(m.sum(1).max()) == 2 for m in maps)
    counts = dimension.dispatch_counts(maps, rb.topology, None)
    for system, dim, dedup in (("flat", 1, False), ("hd2", 2, True)):
        got = ev.predict(_bench(system), PROFILE)
        cs = (dimension.flat_collectives(counts, 16 * 4, with_levels=False) if system == "flat"
              else dimension.route_collectives(counts, dim, dedup, 16 * 4, with_levels=False))
        for stage in ("dispatch", "combine"):
            want = sum(dimension.collective_time(c, PROFILE) for c in cs if c.stage == stage and c.phase == "fwd")
            assert got[f"{stage}_ms"] == pytest.approx(want)
        assert got["combine_ms"] < got["dispatch_ms"]
        assert got["route"] == dimension.variant_name(dim, dedup)


def test_padded_dispatchers_send_E_times_C_rows():
    rb = _bench("tutel-2dh")
    C = max(int(m.sum(0).max()) for m in ev.synthetic_routing_maps(rb))
    n = 8 * C * 16 * 4
    assert ev.predict(rb, PROFILE)["dispatch_ms"] == pytest.approx(PROFILE.comm_time("a2a", "intra-1", n)
                                                                   + PROFILE.comm_time("a2a", "inter-1", n))
    assert ev.predict(_bench("deepspeed-moe"), PROFILE)["dispatch_ms"] == pytest.approx(
        PROFILE.comm_time("a2a", "flat", n))


def test_busiest_link_equals_the_model_when_every_split_is_equal():
    rb = _bench("flat")
    every_expert = [torch.ones(64, 8, dtype=torch.bool)] * 4    # 64 tokens x 2 experts from each rank to each GPU
    topo = rb.topology
    model = dimension.paper_time(dimension.route_counts(every_expert, topo, None, False), 1, PROFILE, 64)
    load = ev._link_load(every_expert, topo, None, 1, False, PROFILE, 64)
    assert load["busiest_link_ms"] == pytest.approx(model)
    assert load["busiest_link_bytes"] == load["padded_link_bytes"] == 2 * 2 * 128 * 64   # 2 ranks x 2 remote GPUs
    assert load["cross_node_bytes"] == 2 * load["busiest_link_bytes"]


def _frame() -> pd.DataFrame:
    rows = []
    for variant, system, measured, predicted in (("flat", "Megatron-LM", 1000.0, 1100.0),
                                                  ("hierd-es", "HierMoE", 400.0, 200.0)):
        for stage in ("dispatch", "combine"):
            rows.append(dict(topology="2x4", routing="zipf", variant=variant, system=system, stage=stage,
                             measured_ms=measured, measured_p5_ms=measured * 0.9, measured_p95_ms=measured * 1.1,
                             repeats=3, predicted_ms=predicted, error=predicted / measured - 1, route="H1",
                             busiest_link_ms=measured, busiest_link_error=0.0, rate="200mbit", network="emulated",
                             busiest_link_bytes=1e8, padded_link_bytes=3e8 if variant == "flat" else 1e8,
                             cross_node_bytes_modeled=2e8, cross_node_bytes_measured=2e8, load_1m_min=1.0,
                             load_1m_max=2.0, runs=2, cpus=2,
                             host="vm", date="2026-12-07", torch="2.13.0", git_sha="abc", profile="p",
                             model=ev.MODEL_VERSION, model_commit="x"))
    return pd.DataFrame(rows)


def test_report_tables_errors_and_speedups(tmp_path):
    text = fig.markdown(_frame(), "flat")
    assert "| 2x4 | zipf | HierMoE | dispatch | 400 ms [360 ms-440 ms] | 200 ms | **-50%** | H1 |" in text
    assert "| 2x4 | zipf | Megatron-LM | combine | 1.00 s [900 ms-1.10 s] | 1.10 s | +10% |" in text
    assert "| 2x4 | zipf | HierMoE | 2.50x | 5.50x |" in text
    assert "2 of 4 predictions miss by more than 25%" in text
    assert "equal the traffic counters' in 4 of 4 rows (all)" in text
    assert "* 2x4 zipf HierMoE dispatch: measured 400 ms, predicted 200 ms (-50%). Not the link volume" in text
    csv = tmp_path / "v.csv"
    csv.write_text("# tier: emu\n" + _frame().to_csv(index=False))
    assert fig.main(["--csv", str(csv), "--out", str(tmp_path / "f.pdf"), "--out-md", str(tmp_path / "f.md")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "f.md").read_text() == text
