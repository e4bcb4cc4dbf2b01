"""HierMoE Table II: how much of the token traffic deduplication removes, per number of expert
groups R and top-K (tier 'sim': measured on synthetic routing masks, no communication).

    python -m impl.experiments.hiermoe.table2 --config workflows/config/experiments/hiermoe_table2.yaml \
        [--set repeats=3 --set top_ks=[2,8] ...] --out-csv table2.csv --out-record record.json

For every repeat (seed = seed + repeat) and every K, one routing mask of `tokens_per_sample`
tokens over `num_experts` experts is drawn from `impl.common.traces.synthetic_topk`; for every R
its duplication rate is measured (`impl.hiermoe.duplication`). The tidy CSV has one row per
(R, K, repeat) with the measured rate, the closed form under uniform routing (`expected`, the
reference whatever the distribution) and the paper's value where Table II has one (`paper`).
Rates are fractions in [0, 1]. A run record (impl.common.records) summarizes the repeats.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from tqdm import tqdm

from impl.common import cli, traces
from impl.common.config import (MAX_EXPERTS, MAX_REPEATS, MAX_TOKENS, SEED_MAX, ConfigError, bounded, build_config,
                                 check_host_memory)
from impl.common.records import make_record
from impl.common.routing import routing_from_topk
from impl.hiermoe.duplication import duplication_counts, expected_duplication_rate
from impl.common.paper import read_paper_csv

__all__ = ["Table2Config", "load_config", "routing_mask", "measure", "make_table2_record", "main"]

EXPERIMENT = "hiermoe_table2"
SYSTEM = "dedup-analysis"
TIER = "sim"
TOPOLOGY = "expert-groups"  # no network here: R equal groups of contiguous experts


@dataclass(frozen=True)
class Table2Config:
    num_experts: int = bounded(256, ge=1, le=MAX_EXPERTS)                     # E
    top_ks: tuple[int, ...] = bounded((2, 4, 6, 8), ge=1, le=MAX_EXPERTS)      # K values (columns of Table II)
    group_counts: tuple[int, ...] = bounded((32, 16, 8, 4), ge=1, le=MAX_EXPERTS)  # R values (rows of Table II)
    tokens_per_sample: int = bounded(16384, ge=1, le=MAX_TOKENS)               # tokens in one routing mask
    repeats: int = bounded(5, ge=1, le=MAX_REPEATS)        # masks per K, seeds seed .. seed + repeats - 1
    seed: int = bounded(0, ge=0, le=SEED_MAX - MAX_REPEATS)
    distribution: Literal["uniform", "zipf", "correlated"] = "uniform"
    skew: float = bounded(1.0, ge=0, le=100)               # strength of the non-uniform distributions
    paper: str = "hiermoe_table2"                          # name of the paper CSV in figures/paper

    def __post_init__(self):
        for key, values in (("top_ks", self.top_ks), ("group_counts", self.group_counts)):
            if not values:
                raise ConfigError(f"{key}: empty; allowed: a non-empty list of positive integers")
            if len(set(values)) != len(values):
                raise ConfigError(f"{key}: {list(values)} repeats a value; allowed: distinct values")
        for k in self.top_ks:
            if not 1 <= k <= self.num_experts:
                raise ConfigError(f"top_ks: K={k} is not allowed with num_experts={self.num_experts}; "
                                  f"allowed: 1..{self.num_experts}")
        for r in self.group_counts:
            if r < 1 or self.num_experts % r != 0:
                divisors = [d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0]
                raise ConfigError(f"group_counts: R={r} does not divide num_experts={self.num_experts}; "
                                  f"allowed: {', '.join(map(str, divisors))}")
        # one mask and its top-k ids at a time
        check_host_memory(self.tokens_per_sample * (2 * self.num_experts + 16 * max(self.top_ks)),
                          "tokens_per_sample, num_experts", "one routing mask")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.paper):
            raise ConfigError(f"paper: {self.paper!r} is not allowed; allowed: the name of a CSV in "
                              "figures/paper, without directory or suffix (e.g. 'hiermoe_table2')")


def load_config(path=None, overrides=()) -> Table2Config:
    """YAML file (optional) + `key=value` overrides -> validated config (ConfigError if not)."""
    return build_config(Table2Config, path, list(overrides))


def routing_mask(config: Table2Config, top_k: int, seed: int) -> torch.Tensor:
    """bool [T, E] routing mask of one synthetic sample."""
    topk_ids_TK = traces.synthetic_topk(config.tokens_per_sample, config.num_experts, top_k,
                                        distribution=config.distribution, skew=config.skew, seed=seed)
    weights_TK = torch.full(topk_ids_TK.shape, 1.0 / top_k)
    return routing_from_topk(topk_ids_TK, weights_TK, config.num_experts).routing_map_TE


def paper_rates(config: Table2Config) -> dict[tuple[int, int], float]:
    """(R, K) -> the paper's rate as a fraction."""
    table, header = read_paper_csv(config.paper)
    if header["unit"] != "percent" or not {"R", "K"} <= set(table.columns):
        raise ValueError(f"paper CSV {config.paper!r} must have columns R, K, value in percent")
    return {(int(r), int(k)): float(v) / 100.0 for r, k, v in zip(table["R"], table["K"], table["value"])}


def measure(config: Table2Config, progress: bool | None = None) -> pd.DataFrame:
    """Tidy table: one row per (R, K, repeat). `progress=None` shows a bar only on a terminal."""
    paper = paper_rates(config)
    rows = []
    samples = [(repeat, k) for repeat in range(config.repeats) for k in config.top_ks]
    for repeat, k in tqdm(samples, desc="Table II samples", unit="mask",
                          disable=None if progress is None else not progress):
        seed = config.seed + repeat
        routing_map_TE = routing_mask(config, k, seed)
        for r in config.group_counts:
            copies, distinct = duplication_counts(routing_map_TE, r)
            rows.append({
                "experiment": EXPERIMENT, "tier": TIER, "distribution": config.distribution,
                "skew": config.skew, "E": config.num_experts, "K": k, "R": r,
                "tokens": config.tokens_per_sample, "repeat": repeat, "seed": seed,
                "copies": copies, "distinct": distinct, "measured": 1.0 - distinct / copies,
                "expected": expected_duplication_rate(config.num_experts, k, r),
                "paper": paper.get((r, k), float("nan")), "paper_source": config.paper,
            })
    order = {r: i for i, r in enumerate(config.group_counts)}
    frame = pd.DataFrame(rows)
    return frame.sort_values(["R", "K", "repeat"], key=lambda s: s.map(order) if s.name == "R" else s,
                             ignore_index=True)


def make_table2_record(config: Table2Config, frame: pd.DataFrame) -> dict:
    """Run record: per (R, K) the measured rate over repeats, plus the references in `extra`."""
    metrics, expected, paper = {}, {}, {}
    for (r, k), cell in frame.groupby(["R", "K"], sort=False):
        name = f"duplication_rate/R={r}/K={k}"
        metrics[name] = cell.sort_values("repeat")["measured"].tolist()
        expected[name] = float(cell["expected"].iloc[0])
        if pd.notna(cell["paper"].iloc[0]):
            paper[name] = float(cell["paper"].iloc[0])
    last_seed = config.seed + config.repeats - 1
    return make_record(
        experiment=EXPERIMENT, system=SYSTEM, variant=config.distribution, tier=TIER,
        topology={"name": TOPOLOGY, "group_counts": list(config.group_counts)},
        model={"num_experts": config.num_experts, "top_ks": list(config.top_ks),
               "tokens_per_sample": config.tokens_per_sample},
        config=config, metrics=metrics, seed=config.seed,
        trace_id=f"synthetic:{config.distribution}:skew={config.skew}:seeds={config.seed}..{last_seed}",
        extra={"expected_uniform_closed_form": expected, "paper": paper})


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m impl.experiments.hiermoe.table2", __doc__, config=Table2Config,
                        outputs=("csv", "record"), progress=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        paper_rates(config)  # a missing or malformed paper CSV fails before any work
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    frame = measure(config, progress=False if args.no_progress else None)
    cli.write_csv_and_record(frame, args.out_csv, make_table2_record(config, frame), args.out_record)
    worst = (frame["measured"] - frame["paper"]).abs().max() * 100
    print(f"{EXPERIMENT}: {len(frame)} rows -> {args.out_csv}; record -> {args.out_record}; "
          f"max |measured - paper| = {worst:.2f} percentage points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
