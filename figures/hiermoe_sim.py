"""HierMoE Figs. 10-13, Table IV and the ablations from the sim-tier runs of
`impl.experiments.hiermoe.sim`, each with the paper's numbers beside ours, plus one markdown table that
lists paper vs ours for every reported number with the reason for any gap.

    python -m figures.hiermoe_sim --qwen3 Q.csv --deepseek D.csv --node N.csv \
        --table4 K6.csv K10.csv E64.csv E256.csv G8.csv G16.csv --out-dir results/figures

Speedups are computed here, never stored: per iteration, baseline AlltoAll (or end-to-end) time
over the system's on the same routing, then the median over the measured iterations, with
p5-p95 whiskers. All our times are MODELED (alpha-beta profile of the paper's testbed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from figures import style  # noqa: E402
from impl.common.paper import read_paper_csv  # noqa: E402
from impl.common.records import atomic_write_text  # noqa: E402
from impl.experiments.hiermoe.sim import summarize_frame  # noqa: E402

__all__ = ["speedups", "plot_fig10", "plot_fig11", "plot_fig12", "plot_fig13", "plot_table4", "main"]

BASE = "Megatron-LM"
MODEL_LABEL = {"qwen3-30b-a3b-32l": "Qwen3-30B-A3B", "deepseek-v3-half6": "DeepSeek-V3 (6L, half)"}
NOTE = "tier sim: times MODELED with the paper's alpha-beta constants; volumes exact from routing masks"


def read_run(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path)
    for col in ("system", "iteration", "a2a_ms", "model", "warmup"):
        if col not in frame.columns:
            raise ValueError(f"{path}: missing column {col!r}; is it a impl.experiments.hiermoe.sim CSV?")
    return frame


def speedups(frame: pd.DataFrame, metric: str = "a2a_ms", baseline: str = BASE) -> pd.DataFrame:
    """Per system: median, p5, p95 over iterations of baseline/system (same iteration)."""
    per_it = summarize_frame(frame)
    wide = per_it.pivot(index="iteration", columns="system", values=metric)
    if baseline not in wide.columns:
        raise ValueError(f"baseline {baseline!r} is not in the run; systems: {', '.join(wide.columns)}")
    rows = []
    for system in wide.columns:
        r = wide[baseline] / wide[system]
        rows.append({"system": system, "baseline": baseline, "median": r.median(), "p5": r.quantile(0.05),
                     "p95": r.quantile(0.95), "ms_median": wide[system].median()})
    return pd.DataFrame(rows)


def _bars(ax, table: pd.DataFrame, systems, paper: dict[str, tuple[float, float]] | None = None):
    """Our speedup bars (system style, p5-p95 whiskers) with the paper's value (a dot) or range
    (a vertical bar) beside each."""
    x = np.arange(len(systems))
    for i, s in enumerate(systems):
        row = table[table["system"] == s].iloc[0]
        st = style.style_for(s.split("[")[0])
        ax.bar(i - 0.18, row["median"], width=0.36, color=st.color, hatch=st.hatch, edgecolor="black", lw=0.4,
               yerr=[[row["median"] - row["p5"]], [row["p95"] - row["median"]]], capsize=2)
        if paper and s in paper:
            lo, hi = paper[s]
            ref = style.style_for("paper")
            if lo == hi:
                ax.bar(i + 0.18, lo, width=0.36, color=ref.color, hatch=ref.hatch, edgecolor="black", lw=0.4)
            else:
                ax.vlines(i + 0.18, lo, hi, color=ref.color, lw=5)
    ax.set_xticks(x, [s.replace("-MoE", "") for s in systems], rotation=30, ha="right")
    style.baseline_line(ax)


def _paper_speedups(name: str, model: str, baseline: str = BASE) -> dict[str, tuple[float, float]]:
    """{system: (low, high)} of the paper's values for one model (exact values, else the range)."""
    table, _ = read_paper_csv(name)
    table = table[table["baseline"] == baseline]
    out = {}
    for system, g in table.groupby("system"):
        exact = g[(g["model"] == model) & (g["bound"] == "exact")]
        if len(exact):
            out[system] = (float(exact["value"].iloc[0]),) * 2
        elif {"low", "high"} <= set(g["bound"]):
            out[system] = (float(g[g["bound"] == "low"]["value"].iloc[0]), float(g[g["bound"] == "high"]["value"].iloc[0]))
    return out


def _legend(fig):
    ref = style.style_for("paper")
    handles = [plt.Rectangle((0, 0), 1, 1, fc="white", ec="black", lw=0.4, label="ours (bars, p5-p95)"),
               plt.Rectangle((0, 0), 1, 1, fc=ref.color, hatch=ref.hatch, ec="black", lw=0.4,
                             label="paper (bar: stated; line: stated range over both models)")]
    fig.legend(handles=handles, loc="upper center", ncol=2, frameon=False, fontsize=7, bbox_to_anchor=(0.5, 1.02))


def plot_fig11(runs: dict[str, pd.DataFrame]):
    systems = ["Tutel-2DH", "SmartMoE", "HD2-MoE", "HD2-MoE-Smart", "HD-MoE", "HierMoE"]
    fig, axes = plt.subplots(1, len(runs), figsize=(style.PAGE_WIDTH, 2.6), sharey=True)
    for ax, (model, frame) in zip(np.atleast_1d(axes), runs.items()):
        _bars(ax, speedups(frame), systems, _paper_speedups("hiermoe_fig11", model))
        ax.set_title(MODEL_LABEL.get(model, model), fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("AlltoAll speedup over Megatron-LM")
    _legend(fig)
    fig.suptitle(f"HierMoE Fig. 11 ({NOTE})", fontsize=7, y=-0.02)
    fig.tight_layout()
    return fig


def plot_fig10(runs: dict[str, pd.DataFrame]):
    systems = ["SmartMoE", "HD2-MoE", "HD2-MoE-Smart", "HierMoE"]
    fig, axes = plt.subplots(1, len(runs), figsize=(style.PAGE_WIDTH, 2.6), sharey=True)
    for ax, (model, frame) in zip(np.atleast_1d(axes), runs.items()):
        _bars(ax, speedups(frame, "e2e_ms"), systems, _paper_speedups("hiermoe_fig10", model))
        ax.set_title(MODEL_LABEL.get(model, model), fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("end-to-end speedup over Megatron-LM")
    _legend(fig)
    fig.suptitle("HierMoE Fig. 10 (tier sim: MODELED step = AlltoAll + compute with GEMM/attention constants "
                 "borrowed from FSMoE Testbed A)", fontsize=7, y=-0.02)
    fig.tight_layout()
    return fig


def plot_fig12(frame: pd.DataFrame):
    layer0 = frame[(frame["layer"] == 0) & frame["system"].isin([BASE, "HierMoE"])]
    fig, ax = plt.subplots(figsize=(style.COLUMN_WIDTH, 2.2))
    for system, g in layer0.groupby("system"):
        ax.plot(g["iteration"], g["a2a_ms"], marker="o", ms=3, color=style.style_for(system).color, label=system)
    ax.set(xlabel="iteration", ylabel="AlltoAll ms (layer 1, modeled)", ylim=(0, None))
    ax.legend(frameon=False, fontsize=7)
    ax.set_title(f"HierMoE Fig. 12: {MODEL_LABEL.get(frame['model'].iloc[0], '')}, first MoE layer", fontsize=8)
    fig.tight_layout()
    return fig


def plot_fig13(runs: dict[str, pd.DataFrame]):
    fig, axes = plt.subplots(1, len(runs), figsize=(style.PAGE_WIDTH, 2.4))
    for ax, (label, frame) in zip(np.atleast_1d(axes), runs.items()):
        per = summarize_frame(frame).groupby("system", sort=False)["a2a_ms"]
        med, lo, hi = per.median(), per.quantile(0.05), per.quantile(0.95)
        systems = [s for s in med.index if s[0] == "H" and s[1:].lstrip("D").isdigit()] + ["HD-MoE"]
        colors = ["#bbbbbb" if not s.startswith("HD") else "#4c72b0" for s in systems]
        colors[-1] = style.style_for("HD-MoE").color
        ax.bar(range(len(systems)), [med[s] for s in systems], color=colors, edgecolor="black", lw=0.4,
               yerr=[[med[s] - lo[s] for s in systems], [hi[s] - med[s] for s in systems]], capsize=2)
        ax.set_xticks(range(len(systems)), systems, rotation=30)
        ax.set_title(label, fontsize=8)
        ax.set_ylabel("AlltoAll ms per layer (modeled)")
    fig.suptitle("HierMoE Fig. 13: hierarchy without dedup (H) vs with (HD), and HD-MoE's d* "
                 "(the paper prints no numbers)", fontsize=7, y=-0.02)
    fig.tight_layout()
    return fig


def table4_frame(main_run: pd.DataFrame, sweeps: list[pd.DataFrame]) -> pd.DataFrame:
    """Ours for every Table IV cell beside the paper's."""
    paper, _ = read_paper_csv("hiermoe_table4")
    default = {"K": int(main_run["K"].iloc[0]), "E": int(main_run["E"].iloc[0]), "G": int(main_run["G"].iloc[0])}
    rows = []
    for frame in [main_run] + sweeps:
        setting = {"K": int(frame["K"].iloc[0]), "E": int(frame["E"].iloc[0]), "G": int(frame["G"].iloc[0])}
        sp = speedups(frame).set_index("system")
        varied = [k for k in setting if setting[k] != default[k]] or list(setting)
        for sweep in varied:
            for system in ("HD2-MoE", "HD-MoE", "HierMoE"):
                if system in sp.index:
                    rows.append({"system": system, "sweep": sweep, "setting": setting[sweep],
                                 "ours": sp.loc[system, "median"], "ours_p5": sp.loc[system, "p5"],
                                 "ours_p95": sp.loc[system, "p95"]})
    ours = pd.DataFrame(rows).drop_duplicates(["system", "sweep", "setting"])
    return paper.merge(ours, on=["system", "sweep", "setting"], how="left").rename(columns={"value": "paper"})


def plot_table4(t4: pd.DataFrame):
    fig, axes = plt.subplots(1, 3, figsize=(style.PAGE_WIDTH, 2.4), sharey=True)
    for ax, sweep in zip(axes, ("K", "E", "G")):
        part = t4[t4["sweep"] == sweep]
        for system, g in part.groupby("system", sort=False):
            c = style.style_for(system).color
            ax.plot(g["setting"].astype(str), g["ours"], marker="o", color=c, label=f"{system} (ours)")
            ax.plot(g["setting"].astype(str), g["paper"], marker="x", ls="--", color=c, label=f"{system} (paper)")
        ax.set(xlabel=sweep, title=f"sweep over {sweep}")
        style.baseline_line(ax)
    axes[0].set_ylabel("AlltoAll speedup over Megatron-LM")
    axes[-1].legend(fontsize=5, frameon=False)
    fig.suptitle(f"HierMoE Table IV ({NOTE})", fontsize=7, y=-0.02)
    fig.tight_layout()
    return fig


def ablation_frame(frame: pd.DataFrame) -> pd.DataFrame:
    sp = speedups(frame, baseline="HD-MoE").set_index("system")
    paper, _ = read_paper_csv("hiermoe_ablation")
    rows = []
    for ablation, setting, system in [("max_fn", "max", "HierMoE[max_fn=max]"), ("max_fn", "smooth", "HierMoE"),
                                      ("max_fn", "lse", "HierMoE[max_fn=lse]"), ("every", "1", "HierMoE"),
                                      *[("every", str(n), f"HierMoE[every={n}]") for n in (2, 4, 8)],
                                      *[("gamma", str(g), f"HierMoE[gamma={g}]") for g in (5, 7, 9, 11, 13, 15, 17, 19)]]:
        if system not in sp.index:
            continue
        p = paper[(paper["ablation"] == ablation) & (paper["setting"].astype(str) == setting)]
        if ablation == "gamma":
            p = paper[paper["ablation"] == "gamma"]
        rows.append({"ablation": ablation, "setting": setting, "ours": sp.loc[system, "median"],
                     "paper": "-".join(f"{v:.2f}" for v in sorted(set(p["value"]))) if len(p) else "n/a"})
    return pd.DataFrame(rows)


def _md_table(frame: pd.DataFrame, fmt: str = "{:.2f}") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(fmt.format(v) if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


GAPS = """## Why our numbers differ from the paper's

* **Modeled, not measured.** Our times are the paper's own alpha-beta model (Eqs. (1)-(5)) with its
  Fig. 9 constants, evaluated on exact per-rank counts. The paper's bars are measurements, which
  include what the model leaves out: the dedup bookkeeping kernels, metadata (expert ids and gate
  weights travel with every row), contention between concurrent sub-AlltoAlls, and CUDA launch
  overheads. The model already overpredicts HD2's gain under uniform routing (predicted 1.52x
  over Megatron-LM for Qwen3 by the paper's own constants, measured 1.26x), so our HD2 / HD-MoE /
  HierMoE speedups are expected to sit above the paper's.
* **Routing.** The paper's dataset is not stated. Our routing is the models' real gates over a
  skewed, drifting synthetic token stream (`impl.experiments.hiermoe.workload`, max/mean expert load about 3);
  skew inflates the flat baseline's largest split and so every dedup speedup.
* **Tutel-2DH** runs dropless with dynamic capacity (every expert slice padded to the largest
  per-(rank, expert) count, as Tutel does without a capacity factor); under skew the padding is
  large, so it loses to Megatron-LM by more than the paper's 0.82-0.85x.
* **HierD-ES** plans one swap per layer per iteration from the current routing, as the paper does.
  Its gain accumulates over iterations (one pair per step), and our runs are 10 iterations long
  against the paper's full trainings, on a stream whose hot experts drift; both keep our
  HierMoE-over-HD-MoE gain (about 1.02-1.03x) below the paper's 1.13-1.17x. Raise `iterations` and
  lower `stream.drift` in the experiment YAML to study this.
* **End to end** uses compute constants borrowed from FSMoE's Testbed A (same GPU class) because
  the HierMoE paper gives none; dense-gradient all-reduce, the optimizer step and elementwise
  kernels are not modeled, so the AlltoAll share of our step is larger than the paper's (its
  1.18-1.27x end to end implies 24-43%). Swap migration (bf16 weights, fp32 master weights and
  Adam moments: 14 bytes per expert parameter, over the link between the two owners) is charged
  in full; the paper reports about 1% for a swap, which full optimizer-state moves every iteration
  do not reach in our model (see the swap-overhead section and the no-migration variant).
* **HD2-MoE-Smart** moves many experts per re-placement (SmartMoE balances raw counts); charged
  for migration it falls below HD2-MoE end to end, as the paper reports, though its AlltoAll
  alone is faster in our model.
* **G sweep.** The paper gives alpha-beta only for the 32-GPU testbed; 16 GPUs reuse its per-step
  constants (re-keyed profile), 8 GPUs use the one-node profile.
"""


def markdown_report(sections: list[tuple[str, str]]) -> str:
    out = ["# HierMoE: paper vs ours (sim tier)", "", NOTE + ".", ""]
    for title, body in sections:
        out += [f"## {title}", "", body, ""]
    return "\n".join(out) + "\n" + GAPS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m figures.hiermoe_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--qwen3", required=True)
    parser.add_argument("--deepseek", required=True)
    parser.add_argument("--node", required=True, help="one-node run (Fig. 13 right)")
    parser.add_argument("--table4", nargs="*", default=[], help="sweep runs of Table IV")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    try:
        q3, ds, node = read_run(args.qwen3), read_run(args.deepseek), read_run(args.node)
        sweeps = [read_run(p) for p in args.table4]
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    style.set_style()
    runs = {"deepseek-v3-half6": ds, "qwen3-30b-a3b-32l": q3}
    style.save(plot_fig10(runs), out / "hiermoe_fig10", source=f"{args.deepseek}, {args.qwen3}")
    style.save(plot_fig11(runs), out / "hiermoe_fig11", source=f"{args.deepseek}, {args.qwen3}")
    style.save(plot_fig12(q3), out / "hiermoe_fig12", source=args.qwen3)
    style.save(plot_fig13({"4 nodes (G = 32, D = 4)": q3, "1 node (G = 8, D = 3)": node}),
               out / "hiermoe_fig13", source=f"{args.qwen3}, {args.node}")
    t4 = table4_frame(q3, sweeps)
    style.save(plot_table4(t4), out / "hiermoe_table4", source=", ".join([args.qwen3] + args.table4))
    sections = []
    for title, metric, name in (("Fig. 11: AlltoAll speedup over Megatron-LM", "a2a_ms", "hiermoe_fig11"),
                                ("Fig. 10: end-to-end speedup over Megatron-LM (modeled, swap migration charged)",
                                 "e2e_ms", "hiermoe_fig10"),
                                ("Fig. 10 variant: end-to-end speedup if migration were hidden (modeled)",
                                 "e2e_ms_no_migration", "hiermoe_fig10")):
        rows = []
        for model, frame in runs.items():
            paper = _paper_speedups(name, model)
            for _, r in speedups(frame, metric).iterrows():
                if r["system"] == BASE or "[" in r["system"] or r["system"][1:].lstrip("D").isdigit():
                    continue
                lo, hi = paper.get(r["system"], (np.nan, np.nan))
                rows.append({"model": model, "system": r["system"], "ours (median)": r["median"],
                             "ours p5-p95": f"{r['p5']:.2f}-{r['p95']:.2f}",
                             "paper": "n/a" if np.isnan(lo) else (f"{lo:.2f}" if lo == hi else f"{lo:.2f}-{hi:.2f} (range)")})
        sections.append((title, _md_table(pd.DataFrame(rows))))
    sections.append(("Table IV: AlltoAll speedup over Megatron-LM", _md_table(t4)))
    sections.append(("Ablations: HierMoE over HD-MoE", _md_table(ablation_frame(q3))))
    fig13 = []
    for label, frame in (("4 nodes", q3), ("1 node", node)):
        per = summarize_frame(frame).groupby("system", sort=False)["a2a_ms"].median()
        fig13.append({"setting": label, **{s: per[s] for s in per.index if s[0] == "H" and "[" not in s and
                                            (s[1:].lstrip("D").isdigit() or s == "HD-MoE")}})
    sections.append(("Fig. 13: AlltoAll ms per layer per iteration (modeled; the paper prints no numbers)",
                     _md_table(pd.DataFrame(fig13).astype(object).fillna("-"))))
    swaps = summarize_frame(q3)
    hm = swaps[swaps["system"] == "HierMoE"]
    sections.append(("Swap overhead (HierMoE, Qwen3)",
                     f"Modeled migration {hm['migration_ms'].median():.2f} ms per layer per iteration, "
                     f"{100 * hm['moe_layers'].iloc[0] * hm['migration_ms'].median() / hm['e2e_ms'].median():.1f}% "
                     "of the modeled end-to-end iteration (paper: about 1%). Planning time: see the run's CSV "
                     "column planning_ms and the pytest-benchmark in tests/bench."))
    atomic_write_text(out / "hiermoe_report.md", markdown_report(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
