"""How often the ways of choosing FSMoE's pipeline degree disagree, and what each disagreement
costs, on random configured layers (Table 4's parameter ranges, both testbeds).

For every configuration and pass (forward with t_gar = 0; backward with the 2x expert model and
the block's whole dense gradient as t_gar) it records the r chosen by
* `enum`: the case formulas' optimum over r in 1..8 (what the planner uses),
* `enum_pow2`: the same over {1, 2, 4, 8} (the released solver's domain),
* `slsqp`: the paper's method, SLSQP per case rounded as the released solver does,
* `timeline`: the simulated schedule's optimum (the ground truth the formulas relax),
and the simulated pass time at each. The summary gives, per method, how often its r differs from
the timeline optimum and the time lost (mean and worst, percent), plus how often enum and slsqp
differ. Times are MODELED (tier sim).

    python -m impl.experiments.fsmoe.degrees --set samples=1000 --out-csv d.csv --out-record d.json
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import pandas as pd
from tqdm import tqdm

from impl.common import cli
from impl.common.config import MAX_REPEATS, SEED_MAX, ConfigError, bounded, checked
from impl.common.costmodel import load_profile
from impl.common.records import make_record
from impl.fsmoe.costs import BlockShape, block_costs
from impl.fsmoe.degree import DOMAINS, integer_optimum, slsqp_degree, timeline_time
from impl.fsmoe.schedules import fsmoe_pass

__all__ = ["DegreeStudyConfig", "GRID", "sample_shapes", "run", "summarize", "main"]

PROG = "python -m impl.experiments.fsmoe.degrees"
METHODS = ("enum", "enum_pow2", "slsqp", "timeline")

# Table 4 of the FSMoE paper; L differs per testbed (Testbed B's 11 GB GPUs)
GRID = {"batch": (1, 2, 4), "heads": (8, 16, 32), "hidden": (1024, 2048, 4096), "h_scale": (2, 3, 4),
        "capacity_factor": (1.2, 2.4, None), "ffn": ("gpt", "mixtral"),
        "seq": {"fsmoe-testbed-a": (512, 1024, 2048), "fsmoe-testbed-b": (256, 512, 1024)}}


@dataclass(frozen=True)
class DegreeStudyConfig:
    profiles: tuple[str, ...] = ("fsmoe-testbed-a", "fsmoe-testbed-b")
    samples: int = bounded(1000, ge=1, le=MAX_REPEATS)
    slsqp_samples: int | None = bounded(None, ge=0, le=MAX_REPEATS)   # run SLSQP on the first n samples only (None: all)
    seed: int = bounded(0, ge=0, le=SEED_MAX)


def grid_shapes(profile: str, num_experts: int) -> list[BlockShape]:
    """Every configured layer of Table 4 for one testbed (3^6 x 2 = 1,458)."""
    g = GRID
    return [BlockShape(b, L, M, M * s, h, num_experts, 1, f, ffn)
            for b in g["batch"] for h in g["heads"] for L in g["seq"][profile] for M in g["hidden"]
            for s in g["h_scale"] for f in g["capacity_factor"] for ffn in g["ffn"]]


def sample_shapes(cfg: DegreeStudyConfig) -> list[tuple[str, BlockShape]]:
    pool = [(p, s) for p in cfg.profiles for s in grid_shapes(p, load_profile(p).get_topology().num_nodes)]
    return random.Random(cfg.seed).sample(pool, min(cfg.samples, len(pool)))


def run(cfg: DegreeStudyConfig, progress: bool | None = None) -> pd.DataFrame:
    profiles = {p: load_profile(p) for p in cfg.profiles}
    rows = []
    for i, (name, shape) in enumerate(tqdm(sample_shapes(cfg), desc="degree study", disable=None if progress is None
                                           else not progress)):
        bc = block_costs(shape, profiles[name])
        for phase, model in (("fwd", bc.fwd), ("bwd", bc.bwd.with_gar(bc.t_ar(bc.grad_bytes)))):
            sched = lambda r, g=(phase == "bwd"): fsmoe_pass(r, gradient_slice=g)  # noqa: E731
            times = {r: timeline_time(model, r, sched) for r in DOMAINS["1..8"]}
            t0 = time.perf_counter()
            chosen = {"enum": integer_optimum(model).r}
            enum_s = time.perf_counter() - t0
            chosen["enum_pow2"] = integer_optimum(model, DOMAINS["pow2"]).r
            slsqp_s = None
            if cfg.slsqp_samples is None or i < cfg.slsqp_samples:
                t0 = time.perf_counter()
                chosen["slsqp"] = slsqp_degree(model).r
                slsqp_s = time.perf_counter() - t0
            chosen["timeline"] = min(times, key=lambda r: (times[r], r))
            row = {"profile": name, "phase": phase, "B": shape.batch, "L": shape.seq, "M": shape.hidden,
                   "H": shape.ffn_hidden, "heads": shape.heads, "f": shape.capacity_factor or "*", "ffn": shape.ffn,
                   "enum_ms_per_config": enum_s * 1e3, "slsqp_ms_per_config": None if slsqp_s is None else slsqp_s * 1e3,
                   "r_slsqp": None, "t_slsqp": None}      # set below where SLSQP ran (slsqp_samples)
            for method, r in chosen.items():
                row[f"r_{method}"] = r
                row[f"t_{method}"] = times[r]
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame["tier"] = "sim"
    return frame


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method and pass: share of configurations whose r differs from the timeline optimum,
    and the time lost against it (mean and worst, percent)."""
    out = []
    for phase, g in list(frame.groupby("phase")) + [("both", frame)]:
        for method in METHODS[:-1]:
            sub = g.dropna(subset=[f"r_{method}"])
            if sub.empty:            # SLSQP ran on none (slsqp_samples=0)
                continue
            loss = (sub[f"t_{method}"] / sub["t_timeline"] - 1) * 100
            out.append({"phase": phase, "method": method, "configs": len(sub),
                        "differs_from_timeline_pct": 100 * float((sub[f"r_{method}"] != sub["r_timeline"]).mean()),
                        "mean_loss_pct": float(loss.mean()), "max_loss_pct": float(loss.max())})
        both = g.dropna(subset=["r_slsqp"])
        if both.empty:
            continue
        out.append({"phase": phase, "method": "enum vs slsqp", "configs": len(both),
                    "differs_from_timeline_pct": 100 * float((both["r_enum"] != both["r_slsqp"]).mean()),
                    "mean_loss_pct": float(((both["t_slsqp"] / both["t_enum"]) - 1).mean() * 100),
                    "max_loss_pct": float(((both["t_slsqp"] / both["t_enum"]) - 1).max() * 100)})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(PROG, __doc__, config=DegreeStudyConfig, outputs=("csv", "record"), progress=True)
    args = parser.parse_args(argv)
    try:
        cfg = cli.load_config(args, DegreeStudyConfig)
        if not cfg.profiles:
            raise ConfigError("profiles: an empty list is not allowed; allowed: " + ", ".join(GRID["seq"]))
        for p in cfg.profiles:
            if p not in GRID["seq"]:
                raise ConfigError(f"profiles: {p!r} is not allowed; allowed: {', '.join(GRID['seq'])} "
                                  "(Table 4's sequence lengths are per testbed)")
            checked("profiles", load_profile, p)
    except cli.INPUT_ERRORS as e:
        return cli.fail(parser, e)
    frame = run(cfg, progress=False if args.no_progress else None)
    summary = summarize(frame)
    metrics = {"enum_ms_per_config": frame["enum_ms_per_config"].tolist(),
               "slsqp_ms_per_config": frame["slsqp_ms_per_config"].dropna().tolist() or [0.0]}
    record = make_record(experiment="fsmoe_degree_methods", system="FSMoE", tier="sim",
                         topology={"name": ",".join(cfg.profiles)}, model={"grid": "FSMoE Table 4"}, config=cfg,
                         metrics=metrics, seed=cfg.seed, extra={"summary": summary.to_dict(orient="records")})
    cli.write_csv_and_record(frame, args.out_csv, record, args.out_record)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
