"""HierMoE Table II: group masks, duplication rates, closed form, and the experiment CLI."""
import itertools
import json
import math
from fractions import Fraction

import pandas as pd
import pytest
import torch

from impl.common.config import ConfigError
from impl.common.records import validate_record
from impl.experiments.hiermoe import table2
from impl.hiermoe.duplication import (duplication_counts, duplication_rate, expected_distinct_groups,
                                      expected_duplication_rate, group_mask)
from impl.common.paper import read_paper_csv


def mask(rows, num_experts):
    """bool [T, E] from per-token expert lists."""
    routing_map_TE = torch.zeros(len(rows), num_experts, dtype=torch.bool)
    for t, experts in enumerate(rows):
        routing_map_TE[t, list(experts)] = True
    return routing_map_TE


# ---- group_mask / duplication_rate on hand-made routings -----------------------------------------

def test_group_mask_truth_table():
    # E = 8 in R = 4 groups {0,1} {2,3} {4,5} {6,7}
    routing_map_TE = mask([[0, 1], [1, 2], [7], [], [0, 3, 5, 6]], 8)
    expected_TR = torch.tensor([[1, 0, 0, 0],
                                [1, 1, 0, 0],
                                [0, 0, 0, 1],
                                [0, 0, 0, 0],
                                [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(group_mask(routing_map_TE, 4), expected_TR)
    assert torch.equal(group_mask(routing_map_TE, 8), routing_map_TE)  # one expert per group
    assert torch.equal(group_mask(routing_map_TE, 1), routing_map_TE.any(dim=1, keepdim=True))


def test_duplication_rate_hand_computed():
    # Paper Fig. 3 shape: 4 experts in 2 groups {0,1} {2,3}.
    routing_map_TE = mask([[0, 1], [0, 2], [2, 3], [1, 3]], 4)
    # 8 copies; distinct groups per token: 1, 2, 1, 2 -> 6; rate 1 - 6/8
    assert duplication_counts(routing_map_TE, 2) == (8, 6)
    assert duplication_rate(routing_map_TE, 2) == pytest.approx(0.25)
    assert duplication_rate(routing_map_TE, 4) == 0.0   # every expert its own group
    assert duplication_rate(routing_map_TE, 1) == pytest.approx(0.5)  # one group: 4 of 8 copies


def test_errors_name_the_values():
    routing_map_TE = mask([[0, 1]], 6)
    with pytest.raises(ValueError, match="num_groups R=4 does not divide num_experts E=6"):
        group_mask(routing_map_TE, 4)
    with pytest.raises(ValueError, match="must be a 2-D bool tensor"):
        group_mask(routing_map_TE.int(), 2)
    with pytest.raises(ValueError, match="num_groups must be a positive integer, got 0"):
        group_mask(routing_map_TE, 0)
    with pytest.raises(ValueError, match="selects no experts"):
        duplication_rate(mask([[]], 6), 2)
    with pytest.raises(ValueError, match="top_k K=9 exceeds num_experts E=8; allowed: 1..8"):
        expected_duplication_rate(8, 9, 2)
    with pytest.raises(ValueError, match="num_groups R=3 does not divide num_experts E=8"):
        expected_duplication_rate(8, 2, 3)


# ---- closed form ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_experts", [4, 6, 8, 12])
def test_closed_form_equals_enumeration_of_all_subsets(num_experts):
    """Exact equality with the average over all C(E, K) equally likely top-K sets."""
    divisors = [r for r in range(1, num_experts + 1) if num_experts % r == 0]
    for top_k in range(1, num_experts + 1):
        subsets = list(itertools.combinations(range(num_experts), top_k))
        assert len(subsets) == math.comb(num_experts, top_k)
        for r in divisors:
            size = num_experts // r
            total = sum(len({e // size for e in subset}) for subset in subsets)
            brute = Fraction(total, len(subsets))
            assert expected_distinct_groups(num_experts, top_k, r) == brute
            assert expected_duplication_rate(num_experts, top_k, r) == pytest.approx(float(1 - brute / top_k),
                                                                                     abs=1e-15)


def test_closed_form_limits():
    assert expected_duplication_rate(256, 1, 4) == 0.0                 # one copy, nothing to dedup
    assert expected_duplication_rate(256, 8, 256) == 0.0               # one expert per group
    assert expected_duplication_rate(256, 8, 1) == pytest.approx(7 / 8)  # one group: 1 of 8 copies
    assert expected_distinct_groups(8, 8, 4) == 4                      # all experts: all groups


def test_closed_form_reproduces_paper_table_within_a_point_and_a_half():
    table, _ = read_paper_csv("hiermoe_table2")
    assert len(table) == 16
    for r, k, pct in zip(table["R"], table["K"], table["value"]):
        assert abs(expected_duplication_rate(256, int(k), int(r)) * 100 - pct) < 1.5, (r, k)


# ---- measured on synthetic uniform routing -------------------------------------------------------

def test_measured_rate_converges_to_closed_form():
    """Mean over 4096 uniform tokens: standard error is below 0.3 points for these cells."""
    config = table2.Table2Config(num_experts=64, top_ks=(2, 8), group_counts=(16, 4),
                                 tokens_per_sample=4096, repeats=1)
    for k in config.top_ks:
        routing_map_TE = table2.routing_mask(config, k, seed=11)
        assert routing_map_TE.shape == (4096, 64) and routing_map_TE.dtype == torch.bool
        assert torch.all(routing_map_TE.sum(dim=1) == k)
        for r in config.group_counts:
            measured = duplication_rate(routing_map_TE, r)
            assert measured == pytest.approx(expected_duplication_rate(64, k, r), abs=0.01), (k, r)


@pytest.mark.slow
def test_table2_at_paper_scale_within_two_points_of_the_paper():
    config = table2.Table2Config(tokens_per_sample=8192, repeats=2)
    frame = table2.measure(config, progress=False)
    assert len(frame) == 4 * 4 * 2
    assert frame["paper"].notna().all()
    per_cell = frame.groupby(["R", "K"])[["measured", "paper", "expected"]].median()
    assert ((per_cell["measured"] - per_cell["paper"]).abs() < 0.02).all(), per_cell
    assert ((per_cell["measured"] - per_cell["expected"]).abs() < 0.005).all(), per_cell
    # exact bookkeeping: rate = 1 - distinct / copies, copies = T * K
    assert (frame["copies"] == frame["tokens"] * frame["K"]).all()
    assert (frame["measured"] == 1 - frame["distinct"] / frame["copies"]).all()


# ---- experiment config and CLI -------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("top_ks=[2, 300]", r"top_ks: K=300 is not allowed with num_experts=256; allowed: 1..256"),
    ("group_counts=[4, 3]", r"group_counts: R=3 does not divide num_experts=256; allowed: 1, 2, 4, 8"),
    ("tokens=5", r"unknown key 'tokens'; allowed: distribution, group_counts, num_experts, paper, "),
    ("distribution=normal", r"distribution: 'normal' is not allowed; allowed: 'uniform', 'zipf', 'correlated'"),
    ("repeats=0", r"repeats: 0 is not allowed; allowed: 1\.\.100000"),
    ("top_ks=[]", r"top_ks: empty"),
    ("paper=../x.csv", r"paper: '../x.csv' is not allowed"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        table2.load_config(None, [override])


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out_csv, out_record = tmp_path / "t.csv", tmp_path / "r.json"
    code = table2.main(["--set", "group_counts=[4, 5]", "--out-csv", str(out_csv), "--out-record", str(out_record)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "R=5 does not divide num_experts=256" in err
    assert not out_csv.exists() and not out_record.exists()


def test_cli_writes_csv_and_valid_record(tmp_path):
    config_file = tmp_path / "exp.yaml"
    config_file.write_text("num_experts: 64\ntop_ks: [4]\ngroup_counts: [8, 4]\n")
    out_csv, out_record = tmp_path / "out" / "t.csv", tmp_path / "out" / "r.json"
    code = table2.main(["--config", str(config_file), "--set", "tokens_per_sample=256", "--set", "repeats=3",
                        "--out-csv", str(out_csv), "--out-record", str(out_record), "--no-progress"])
    assert code == 0
    frame = pd.read_csv(out_csv)
    assert list(frame["R"]) == [8, 8, 8, 4, 4, 4] and set(frame["K"]) == {4}
    assert list(frame["seed"]) == [0, 1, 2] * 2
    # the paper's cells are keyed by (R, K): Table II has K = 4 at R = 8 (17%) and R = 4 (32%)
    assert list(frame["paper"]) == pytest.approx([0.17] * 3 + [0.32] * 3)
    record = json.loads(out_record.read_text())
    validate_record(record)
    assert record["tier"] == "sim" and record["experiment"] == "hiermoe_table2"
    assert record["config"]["num_experts"] == 64 and record["config"]["repeats"] == 3
    metric = record["metrics"]["duplication_rate/R=4/K=4"]
    assert metric["n"] == 3
    assert metric["values"] == pytest.approx(list(frame[frame["R"] == 4]["measured"]))
    assert record["extra"]["expected_uniform_closed_form"]["duplication_rate/R=8/K=4"] == pytest.approx(
        expected_duplication_rate(64, 4, 8))


def test_cells_the_paper_lacks_have_no_paper_value():
    config = table2.Table2Config(num_experts=32, top_ks=(3, 4), group_counts=(4,), tokens_per_sample=64, repeats=1)
    frame = table2.measure(config, progress=False)
    assert list(frame["K"]) == [3, 4]
    assert pd.isna(frame["paper"].iloc[0]) and frame["paper"].iloc[1] == pytest.approx(0.32)
