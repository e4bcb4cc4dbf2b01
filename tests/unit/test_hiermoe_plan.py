"""The planning CLI: every route's per-level volumes and modeled time, d*, trace selection, and a
one-line error (exit 2) for every bad input, before any work."""
import json
import subprocess
import sys

import pytest

from impl.common.costmodel import load_profile
from impl.common.dispatcher import ExpertPlacement
from impl.common.topology import get_topology
from impl.common.traces import synthetic_trace
from impl.hiermoe import plan
from impl.common.traces import RoutingTrace
from impl.hiermoe.dimension import choose_from_counts, dispatch_counts, flat_time, route_time, volumes
from tests.support.ep_case import brute_force_flat_bytes


def run_json(capsys, *argv):
    assert plan.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv):
    assert plan.main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def per_rank_maps(trace, G):
    return [trace.select(rank=r).to_routing_map() for r in range(G)]


def check_layer(layer, maps, topo, profile, row_bytes):
    """Every variant's volumes and time equal the library's, the flat rows an enumeration, and d*
    is the argmin of the printed model times."""
    assert [v["variant"] for v in layer["variants"]] == \
        ["flat"] + [f"H{d}" for d in range(1, topo.D + 1)] + [f"HD{d}" for d in range(1, topo.D + 1)]
    counts = dispatch_counts(maps, topo)
    for v in layer["variants"]:
        vol = volumes(maps, topo, None, v["dim"], v["dedup"], row_bytes=row_bytes)
        assert {n: lv["bytes"] for n, lv in v["levels"].items()} == vol.bytes_by_level
        assert {n: lv["messages"] for n, lv in v["levels"].items()} == vol.messages_by_level
        if profile is None:
            assert v["time_ms"] is None
        elif v["flat"]:
            assert v["time_ms"] == pytest.approx(flat_time(counts, profile, row_bytes))
        else:
            assert v["time_ms"] == pytest.approx(route_time(counts, v["dim"], v["dedup"], profile, row_bytes))
            assert v["paper_time_ms"] == pytest.approx(sum(s["time_ms"] for s in v["steps"]))
    flat_bytes, flat_msgs = brute_force_flat_bytes(maps, topo, ExpertPlacement.identity(maps[0].shape[1]), row_bytes)
    for v in layer["variants"][:2]:                          # Megatron's flat and H1 send the same rows
        assert {n: lv["bytes"] for n, lv in v["levels"].items()} == flat_bytes
        assert {n: lv["messages"] for n, lv in v["levels"].items()} == flat_msgs
    expected = None if profile is None else choose_from_counts(counts, profile, row_bytes)
    assert layer["d_star"] == expected
    if profile is not None:
        printed = {v["dim"]: v["time_ms"] for v in layer["variants"] if v["dedup"]}
        assert expected == min(printed, key=lambda d: (printed[d], d)) or printed[1] < min(printed.values()) + 1e-12


def test_synthetic_testbed_json(capsys):
    out = run_json(capsys, "--topology", "hiermoe-testbed", "--synthetic", "zipf", "--skew", "1.1",
                   "--num-experts", "64", "--top-k", "6", "--tokens-per-rank", "40", "--seed", "3",
                   "--hidden", "1024", "--dtype", "fp32")
    topo, profile = get_topology("hiermoe-testbed"), load_profile("hiermoe-testbed")
    assert out["profile"] == "hiermoe-testbed" and out["row_bytes"] == 4096
    trace = synthetic_trace(64, 6, tokens_per_rank=40, num_ranks=32, distribution="zipf", skew=1.1, seed=3)
    (layer,) = out["layers"]
    check_layer(layer, per_rank_maps(trace, 32), topo, profile, 4096)
    assert layer["hierd"]["variant"] == f"HD{layer['d_star']}"


def test_trace_every_group_and_selection(capsys, tmp_path):
    topo = get_topology("hier:node=2,socket=2,gpu=2")
    trace = synthetic_trace(16, 3, tokens_per_rank=20, num_steps=2, num_layers=2, num_ranks=8,
                            distribution="uniform", seed=1)
    for suffix in (".npz", ".jsonl"):
        path = trace.save(tmp_path / f"t{suffix}")
        out = run_json(capsys, "--topology", topo.name, "--trace", str(path), "--profile",
                       "hiermoe-node", "--hidden", "8")
        assert [(g["step"], g["layer"]) for g in out["layers"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for g in out["layers"]:
            maps = per_rank_maps(trace.select(step=g["step"], layer=g["layer"]), 8)
            check_layer(g, maps, topo, load_profile("hiermoe-node"), 16)
    out = run_json(capsys, "--topology", topo.name, "--trace", str(path), "--step", "1", "--layer", "0")
    assert [(g["step"], g["layer"]) for g in out["layers"]] == [(1, 0)]
    assert out["profile"] == "hiermoe-node"     # the one shipped profile of the same shape


def test_no_profile_prints_bytes_and_na(capsys):
    out = run_json(capsys, "--topology", "2x4", "--synthetic", "uniform", "--num-experts", "16",
                   "--top-k", "4", "--tokens-per-rank", "10")
    assert out["profile"] is None
    (layer,) = out["layers"]
    trace = synthetic_trace(16, 4, tokens_per_rank=10, num_ranks=8, distribution="uniform", seed=0)
    check_layer(layer, per_rank_maps(trace, 8), get_topology("2x4"), None, 4096)
    assert plan.main(["--topology", "2x4", "--synthetic", "uniform", "--num-experts", "16",
                      "--tokens-per-rank", "10"]) == 0
    text = capsys.readouterr().out
    assert "n/a" in text and "d* = n/a: no hardware profile" in text


def test_human_table_marks_d_star(capsys):
    assert plan.main(["--topology", "hiermoe-testbed", "--synthetic", "uniform", "--tokens-per-rank", "128"]) == 0
    text = capsys.readouterr().out
    for name in ("flat (Megatron)", "H4", "HD1", "HD4", "node MB", "gpu msgs", "meta KB", "model ms", "paper ms"):
        assert name in text
    d_star = int(text.split("d* = ")[1][0])
    assert f"HD{d_star} (d*)" in text


@pytest.mark.parametrize("argv,message", [
    (["--topology", "nope", "--synthetic", "uniform"], "unknown topology 'nope'"),
    (["--topology", "2x4", "--synthetic", "uniform", "--profile", "nope"], "unknown hardware profile 'nope'"),
    (["--topology", "2x4", "--synthetic", "uniform", "--profile", "hiermoe-testbed"], "not '2x4'"),
    (["--topology", "2x4", "--synthetic", "uniform", "--num-experts", "12"], "--num-experts=12 is not divisible by G=8"),
    (["--topology", "2x4", "--synthetic", "uniform", "--num-experts", "16", "--top-k", "17"],
     "--top-k=17 is not allowed with --num-experts=16; allowed: 1..16"),
    (["--topology", "2x4", "--synthetic", "uniform", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["--topology", "2x4", "--synthetic", "uniform", "--hidden", "0"], "argument --hidden: 0 is not allowed"),
    (["--topology", "2x4", "--synthetic", "uniform", "--skew", "2"], "--skew applies to --synthetic zipf only"),
    (["--topology", "2x4", "--synthetic", "uniform", "--step", "1"], "--step applies to --trace only"),
    (["--topology", "2x4"], "one of the arguments --trace --synthetic is required"),
    (["--topology", "2x4", "--synthetic", "uniform", "--trace", "x.npz"], "not allowed with argument"),
    (["--topology", "2x4", "--trace", "missing.npz"], "does not exist"),
    (["--topology", "2x4", "--trace", "missing.npz", "--top-k", "2"], "--top-k applies to --synthetic only"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert message in run_error(capsys, *argv)


def test_trace_errors(capsys, tmp_path):
    path = synthetic_trace(16, 2, tokens_per_rank=4, num_ranks=8, num_layers=2).save(tmp_path / "t.npz")
    line = run_error(capsys, "--topology", "hiermoe-testbed", "--trace", str(path))
    assert "recorded on 8 ranks" in line and "G = 32" in line
    assert "--layer=5 is not in trace" in run_error(capsys, "--topology", "2x4", "--trace", str(path), "--layer", "5")
    path = synthetic_trace(12, 2, tokens_per_rank=4, num_ranks=8).save(tmp_path / "e.npz")
    assert "E=12 experts, not divisible by G=8" in run_error(capsys, "--topology", "2x4", "--trace", str(path))


@pytest.mark.slow
def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "impl.hiermoe.plan", "--topology", "2x2", "--synthetic", "uniform",
                           "--num-experts", "8", "--top-k", "2", "--tokens-per-rank", "4", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"][0]["tokens"] == 16


def test_trace_with_a_rank_that_routed_nothing_is_planned(capsys, tmp_path):
    """A rank with no tokens has no tag in the trace: it is planned with none and listed."""
    topo = get_topology("2x4")
    trace = synthetic_trace(16, 3, tokens_per_rank=12, num_ranks=8, distribution="uniform", seed=2)
    keep = trace.rank_T != 5
    quiet = RoutingTrace(trace.step_T[keep], trace.layer_T[keep], trace.rank_T[keep], trace.topk_ids_TK[keep],
                         trace.topk_weights_TK[keep], 16, {"kind": "recorded"})
    out = run_json(capsys, "--topology", topo.name, "--trace", str(quiet.save(tmp_path / "q.npz")), "--hidden", "8")
    assert out["source"]["ranks_without_tokens"] == [5]
    (layer,) = out["layers"]
    assert layer["tokens"] == 7 * 12
    check_layer(layer, per_rank_maps(quiet, 8), topo, None, 16)
    assert plan.main(["--topology", topo.name, "--trace", str(tmp_path / "q.npz")]) == 0
    assert "ranks without tokens in the trace (planned with none): [5]" in capsys.readouterr().out


def test_trace_of_another_world_size_is_refused_with_the_right_hint(capsys, tmp_path):
    small = synthetic_trace(16, 2, tokens_per_rank=4, num_ranks=8).save(tmp_path / "s.npz")
    line = run_error(capsys, "--topology", "hiermoe-testbed", "--trace", str(small))
    assert "was recorded on 8 ranks but topology 'hiermoe-testbed' has G = 32 ranks; pick a topology with 8 GPUs" in line
    big = synthetic_trace(16, 2, tokens_per_rank=4, num_ranks=16)
    big = RoutingTrace(big.step_T, big.layer_T, big.rank_T, big.topk_ids_TK, big.topk_weights_TK, 16, {})
    line = run_error(capsys, "--topology", "2x4", "--trace", str(big.save(tmp_path / "b.npz")))
    assert "has source rank 15 but topology '2x4' has G = 8 ranks (0..7); pick a topology with at least 16 GPUs" in line


def test_profile_of_another_topology_is_named(capsys):
    """hier:node=2,socket=2,gpu=2 has the shape of the one-node testbed profile: the output says
    whose constants it uses (human text, JSON field and a note on stderr)."""
    argv = ["--topology", "hier:node=2,socket=2,gpu=2", "--synthetic", "uniform", "--num-experts", "16",
            "--top-k", "2", "--tokens-per-rank", "8"]
    assert plan.main(argv) == 0
    text = capsys.readouterr().out
    assert ("note: profile 'hiermoe-node' was made for topology 'hiermoe-node' (socket(2) > pcie-pair(2) > gpu(2)  "
            "[G=8]); its constants are used for 'hier:node=2,socket=2,gpu=2'") in text
    assert plan.main(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["profile"] == "hiermoe-node" and out["profile_topology"] == "hiermoe-node"
    assert "was made for topology 'hiermoe-node'" in out["profile_note"] and "note:" in captured.err
    out = run_json(capsys, "--topology", "hiermoe-testbed", "--synthetic", "uniform", "--tokens-per-rank", "8")
    assert out["profile_note"] is None
