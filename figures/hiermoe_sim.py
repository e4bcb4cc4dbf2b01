"""HierMoE Figs. 10-13, Table IV, the ablations and the routing-skew sweep from the sim-tier runs of
`impl.experiments.hiermoe.sim`, each with the paper's numbers beside ours, and the report
`hiermoe_report.md`: what reproduces and what does not, every number of the paper's CSVs beside
ours, and for every gap above 10% the ablations (one assumption changed at a time, each a
recorded run) that show its cause.

    python -m figures.hiermoe_sim --qwen3 Q.csv --deepseek D.csv --deepseek-ablation DA.csv --node N.csv --table4 T4.csv \
        --ablation A.csv --ablation-persistent P.csv --ablation-long L.csv --ablation-long-persistent LP.csv --skew S.csv --swap swap.csv \
        --swap-gap gap-qwen3.csv gap-deepseek.csv --table2-csv T2.csv --table2-md T2.md --fig9-md F9.md --out-dir results/figures

Speedups are computed here, never stored: per iteration, baseline AlltoAll (or end-to-end) time
over the system's on the same routing, then the median over the measured iterations, with
p5-p95 whiskers. An ablation variant (`X[charge=tokens]`, `X[buffer=total]`) is compared with the
baseline under the same assumption. All our times are MODELED (alpha-beta profile of the paper's
testbed); every number printed comes from the runs, the paper's CSVs or the paper's own model
evaluated here (`impl.experiments.hiermoe.sim.uniform_paper_model`).
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from figures import style  # noqa: E402
from figures.inputs import read_results  # noqa: E402
from figures.verdicts import RULE, TOLERANCE, reproduces  # noqa: E402  (a number further off gets its causes)
from impl.common import cli  # noqa: E402
from impl.common.paper import read_paper_csv  # noqa: E402
from impl.common.records import atomic_write_text  # noqa: E402
from impl.experiments.hiermoe.sim import (ATTENTION_READING, summarize_frame,  # noqa: E402
                                          uniform_paper_model as _uniform_paper_model, run_profile)
from impl.common.topology import get_topology  # noqa: E402

__all__ = ["speedup", "speedups", "plot_fig10", "plot_fig11", "plot_fig12", "plot_fig13", "plot_table4",
           "plot_skew", "main"]

BASE = "Megatron-LM"
QWEN3, DEEPSEEK = "qwen3-30b-a3b-32l", "deepseek-v3-half6"
MODEL_LABEL = {QWEN3: "Qwen3-30B-A3B", DEEPSEEK: "DeepSeek-V3 (6L, half)"}
NOTE = "tier sim: times MODELED with the paper's alpha-beta constants; volumes exact from routing masks"
FIG11_SYSTEMS = ["Tutel-2DH", "SmartMoE", "HD2-MoE", "HD2-MoE-Smart", "HD-MoE", "HierMoE", "DeepEP"]
FIG10_SYSTEMS = ["SmartMoE", "HD2-MoE", "HD2-MoE-Smart", "HD-MoE", "HierMoE", "DeepEP"]
ASSUMPTIONS = ("charge=tokens", "buffer=total")   # ablation options compared with a like baseline


def variants_of(frame: pd.DataFrame, path: str, required: tuple[str, ...] = ()) -> dict[str, pd.DataFrame]:
    """{variant name: its rows} of a sweep run (`--variant` of the sim CLI), in run order."""
    if "variant" not in frame.columns:
        raise ValueError(f"{path}: no 'variant' column; is it a sweep run (--variant) of impl.experiments.hiermoe.sim?")
    names = list(dict.fromkeys(frame["variant"].astype(str)))
    missing = [n for n in required if n not in names]
    if missing:
        raise ValueError(f"{path}: variant {missing[0]!r} missing; it has {', '.join(names)}")
    return {n: frame[frame["variant"].astype(str) == n].reset_index(drop=True) for n in names}


def read_run(path: str) -> pd.DataFrame:
    return read_results(path, ("system", "iteration", "layer", "a2a_ms", "dim", "model", "warmup", "num_layers",
                               "moe_layers_total", "n_group", "topk_group"), "impl.experiments.hiermoe.sim")


# the paper's own model is evaluated once per setting (the report asks for it per paper number)
uniform_paper_model = functools.lru_cache(maxsize=None)(_uniform_paper_model)


# ==========================================================================================
# speedups
# ==========================================================================================
def options_of(system: str) -> str:
    m = re.fullmatch(r"[^\[]+\[(.*)\]", system)
    return m[1] if m else ""


def base_name(system: str) -> str:
    return system.split("[")[0]


def like_baseline(system: str, baseline: str, available) -> str:
    """The baseline under the same modeling assumption as the system (`X[charge=tokens]` is
    compared with `Megatron-LM[charge=tokens]`), when the run has it."""
    opts = options_of(system)
    if opts in ASSUMPTIONS and f"{baseline}[{opts}]" in available:
        return f"{baseline}[{opts}]"
    return baseline


_SUMMARIES: dict[int, tuple[pd.DataFrame, pd.DataFrame]] = {}


def _summary(frame: pd.DataFrame) -> pd.DataFrame:
    """`summarize_frame` once per run (the report asks for hundreds of ratios of the same runs)."""
    if id(frame) not in _SUMMARIES or _SUMMARIES[id(frame)][0] is not frame:
        _SUMMARIES[id(frame)] = (frame, summarize_frame(frame))
    return _SUMMARIES[id(frame)][1]


def _wide(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    return _summary(frame).pivot(index="iteration", columns="system", values=metric)


def speedup(frame: pd.DataFrame, system: str, over: str = BASE, metric: str = "a2a_ms") -> dict[str, float]:
    """median, p5, p95 over the measured iterations of over / system (same iteration)."""
    wide = _wide(frame, metric)
    over = like_baseline(system, over, wide.columns)
    if system not in wide.columns or over not in wide.columns:
        return {"median": np.nan, "p5": np.nan, "p95": np.nan}
    r = wide[over] / wide[system]
    return {"median": float(r.median()), "p5": float(r.quantile(0.05)), "p95": float(r.quantile(0.95))}


def speedups(frame: pd.DataFrame, metric: str = "a2a_ms", baseline: str = BASE) -> pd.DataFrame:
    """Per system: median, p5, p95 of its speedup over `baseline` (like-for-like for ablations)."""
    wide = _wide(frame, metric)
    rows = [{"system": s, "baseline": like_baseline(s, baseline, wide.columns), **speedup(frame, s, baseline, metric),
             "ms_median": float(wide[s].median())} for s in wide.columns]
    return pd.DataFrame(rows)


def fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def pct(ours: float, paper: float) -> str:
    return f"{100 * (ours / paper - 1):+.0f}%"


# ==========================================================================================
# figures
# ==========================================================================================
def _bars(ax, frame: pd.DataFrame, systems, metric: str, paper: dict[str, tuple[float, float]] | None = None):
    """Our speedup bars (system style, p5-p95 whiskers) with the paper's value (a grey bar) or
    range (a grey line) beside each."""
    for i, s in enumerate(systems):
        row = speedup(frame, s, BASE, metric)
        if np.isnan(row["median"]):
            continue
        st = style.style_for(base_name(s))
        ax.bar(i - 0.18, row["median"], width=0.36, color=st.color, hatch=st.hatch, edgecolor="black", lw=0.4,
               yerr=[[row["median"] - row["p5"]], [row["p95"] - row["median"]]], capsize=2)
        if paper and s in paper:
            lo, hi = paper[s]
            ref = style.style_for("paper")
            if lo == hi:
                ax.bar(i + 0.18, lo, width=0.36, color=ref.color, hatch=ref.hatch, edgecolor="black", lw=0.4)
            else:
                ax.vlines(i + 0.18, lo, hi, color=ref.color, lw=5)
    ax.set_xticks(np.arange(len(systems)), [s.replace("-MoE", "") for s in systems], rotation=35, ha="right",
                  fontsize=7)
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


def _legend(fig, y: float = 0.0):
    ref = style.style_for("paper")
    handles = [plt.Rectangle((0, 0), 1, 1, fc="white", ec="black", lw=0.4, label="ours (bars, p5-p95)"),
               plt.Rectangle((0, 0), 1, 1, fc=ref.color, hatch=ref.hatch, ec="black", lw=0.4,
                             label="paper (bar: stated; line: stated range over both models)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=7, bbox_to_anchor=(0.5, y))


def _speedup_figure(runs: dict[str, pd.DataFrame], systems, metric, paper_name, ylabel, title):
    fig, axes = plt.subplots(1, len(runs), figsize=(style.PAGE_WIDTH, 3.2), sharey=True)
    for ax, (model, frame) in zip(np.atleast_1d(axes), runs.items()):
        _bars(ax, frame, systems, metric, _paper_speedups(paper_name, model))
        ax.set_title(MODEL_LABEL.get(model, model), fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel(ylabel, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.suptitle(title, fontsize=7, y=0.99, va="top")
    _legend(fig, 0.0)
    return fig


def plot_fig11(runs: dict[str, pd.DataFrame]):
    return _speedup_figure(runs, FIG11_SYSTEMS, "a2a_ms", "hiermoe_fig11", "AlltoAll speedup\nover Megatron-LM",
                           f"HierMoE Fig. 11 ({NOTE}; DeepEP: beyond the paper)")


def plot_fig10(runs: dict[str, pd.DataFrame]):
    return _speedup_figure(runs, FIG10_SYSTEMS, "e2e_ms", "hiermoe_fig10", "end-to-end speedup\nover Megatron-LM",
                           "HierMoE Fig. 10 (tier sim: MODELED step = AlltoAll + compute with GEMM/attention "
                           "constants borrowed from FSMoE Testbed A, expert moves hidden under backward)")


def plot_fig12(frame: pd.DataFrame):
    """First-layer AlltoAll time per iteration (the paper prints no numbers); the long ablation
    run (one layer, many iterations) gives the curve."""
    layer0 = frame[(frame["layer"] == 0) & frame["system"].isin([BASE, "HierMoE", "HD-MoE", "DeepEP"])]
    fig, ax = plt.subplots(figsize=(style.PAGE_WIDTH * 0.75, 3.0))
    for system, g in layer0.groupby("system"):
        st = style.style_for(system)
        ax.plot(g["iteration"], g["a2a_ms"], marker="o", ms=3, lw=1.2, color=st.color, label=system)
    ax.set(xlabel="training iteration", ylabel="AlltoAll ms, first MoE layer (modeled)", ylim=(0, None))
    ax.legend(frameon=False, fontsize=8, loc="lower right", ncol=2)
    ax.set_title(f"HierMoE Fig. 12: {MODEL_LABEL.get(frame['model'].iloc[0], '')}, first MoE layer, "
                 f"routing skew {frame['skew'].iloc[0]:g}\n({NOTE})", fontsize=7)
    fig.tight_layout()
    return fig


def fixed_dims(systems) -> list[str]:
    return [s for s in systems if re.fullmatch(r"HD?\d", s)]


def plot_fig13(runs: dict[str, pd.DataFrame]):
    fig, axes = plt.subplots(1, len(runs), figsize=(style.PAGE_WIDTH, 2.8))
    for ax, (label, frame) in zip(np.atleast_1d(axes), runs.items()):
        per = _summary(frame).groupby("system", sort=False)["a2a_ms"]
        med, lo, hi = per.median(), per.quantile(0.05), per.quantile(0.95)
        systems = fixed_dims(med.index) + [s for s in ("HD-MoE", "DeepEP") if s in med.index]
        colors = [style.style_for(s).color if s in ("HD-MoE", "DeepEP") else ("#4c72b0" if s.startswith("HD")
                  else "#bbbbbb") for s in systems]
        ax.bar(range(len(systems)), [med[s] for s in systems], color=colors, edgecolor="black", lw=0.4,
               yerr=[[med[s] - lo[s] for s in systems], [hi[s] - med[s] for s in systems]], capsize=2)
        ax.set_xticks(range(len(systems)), systems, rotation=35, ha="right", fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.set_ylabel("AlltoAll ms per layer\nper iteration (modeled)", fontsize=8)
    fig.suptitle("HierMoE Fig. 13: hierarchy without dedup (H, grey) vs with (HD, blue), HD-MoE's d* and "
                 "DeepEP (beyond the paper); the paper prints no numbers", fontsize=7, y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def table4_frame(main_run: pd.DataFrame, sweeps: list[pd.DataFrame]) -> pd.DataFrame:
    """Ours for every Table IV cell beside the paper's, with the frame each cell came from."""
    paper, _ = read_paper_csv("hiermoe_table4")
    default = {"K": int(main_run["K"].iloc[0]), "E": int(main_run["E"].iloc[0]), "G": int(main_run["G"].iloc[0])}
    rows, frames = [], {}
    for frame in [main_run] + sweeps:
        setting = {"K": int(frame["K"].iloc[0]), "E": int(frame["E"].iloc[0]), "G": int(frame["G"].iloc[0])}
        varied = [k for k in setting if setting[k] != default[k]] or list(setting)
        for sweep in varied:
            frames.setdefault((sweep, setting[sweep]), frame)
            for system in ("HD2-MoE", "HD-MoE", "HierMoE"):
                sp = speedup(frame, system)
                rows.append({"system": system, "sweep": sweep, "setting": setting[sweep], "ours": sp["median"],
                             "ours_p5": sp["p5"], "ours_p95": sp["p95"]})
    ours = pd.DataFrame(rows).drop_duplicates(["system", "sweep", "setting"])
    out = paper.merge(ours, on=["system", "sweep", "setting"], how="left").rename(columns={"value": "paper"})
    return out, frames


def plot_table4(t4: pd.DataFrame):
    fig, axes = plt.subplots(1, 3, figsize=(style.PAGE_WIDTH, 2.9), sharey=True)
    for ax, sweep in zip(axes, ("K", "E", "G")):
        part = t4[t4["sweep"] == sweep]
        for system, g in part.groupby("system", sort=False):
            c = style.style_for(system).color
            ax.plot(g["setting"].astype(str), g["ours"], marker="o", color=c, label=f"{system} (ours)")
            ax.plot(g["setting"].astype(str), g["paper"], marker="x", ls="--", color=c, label=f"{system} (paper)")
        ax.set(xlabel=sweep, title=f"sweep over {sweep}")
        style.baseline_line(ax)
    axes[0].set_ylabel("AlltoAll speedup over Megatron-LM", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=6, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"HierMoE Table IV ({NOTE})", fontsize=7, y=1.0, va="bottom")
    return fig


SKEW_SYSTEMS = ["Tutel-2DH", "SmartMoE", "H2", "HD2-MoE", "HD2-MoE-Smart", "HD-MoE", "HierMoE", "DeepEP"]


def skew_frame(runs: list[pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for frame in runs:
        balance = frame.groupby(["iteration", "layer"]).first()
        for s in SKEW_SYSTEMS:
            if s in set(frame["system"]):
                rows.append({"skew": float(frame["skew"].iloc[0]), "system": s, **speedup(frame, s),
                             "max_split_ratio": float(balance["max_split_ratio"].median()),
                             "maxvio": float(balance["maxvio"].median())})
    return pd.DataFrame(rows).sort_values(["system", "skew"])


def fit_skew(sk: pd.DataFrame, target: float, system: str = "HD2-MoE") -> tuple[float, bool]:
    """The skew whose speedup of `system` is closest to `target` (linear between the sweep's points);
    True when the fit sits at the sweep's lower or upper bound."""
    g = sk[sk["system"] == system].sort_values("skew")
    xs, ys = g["skew"].to_numpy(), g["median"].to_numpy()
    if target <= ys.min():
        return float(xs[np.argmin(ys)]), True
    if target >= ys.max():
        return float(xs[np.argmax(ys)]), True
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if min(y0, y1) <= target <= max(y0, y1):
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0)), False
    return float(xs[0]), True


def plot_skew(sk: pd.DataFrame, fitted: float, target: float):
    """Speedups against skew, the paper's Qwen3 values dotted, `target` (the fitted number) among them."""
    fig, ax = plt.subplots(figsize=(style.PAGE_WIDTH, 3.4))
    for system, g in sk.groupby("system", sort=False):
        st = style.style_for(system) if system in style.SYSTEM_STYLES else style.style_for("model")
        ax.errorbar(g["skew"], g["median"], yerr=[g["median"] - g["p5"], g["p95"] - g["median"]], marker="o", ms=3,
                    capsize=2, color=st.color, label=system, lw=1)
    paper = _paper_speedups("hiermoe_fig11", QWEN3)
    for system, (lo, hi) in paper.items():
        if lo == hi and system in set(sk["system"]):
            ax.axhline(lo, ls=":", lw=0.8, color=style.style_for(system).color)
    ax.axhline(target, ls=":", lw=0.8, color=style.style_for("HD2-MoE").color)
    ax.axvline(fitted, ls="--", lw=0.8, color="black")
    ax.annotate(f"fitted skew {fitted:g}", (fitted, 1.0), fontsize=7, ha="left", va="bottom",
                xytext=(3, 3), textcoords="offset points")
    style.baseline_line(ax)
    top = ax.secondary_xaxis("top")
    g0 = sk.drop_duplicates("skew")
    top.set_xticks(g0["skew"], [f"{v:.2f}" for v in g0["max_split_ratio"]], fontsize=6)
    top.set_xlabel("largest flat split / mean split (measured)", fontsize=7)
    ax.set(xlabel="routing skew (topic-centre scale over token noise)", ylabel="AlltoAll speedup over Megatron-LM")
    ax.legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"AlltoAll speedups against routing skew, Qwen3-30B-A3B (dotted: the paper's Qwen3 values)\n{NOTE}",
                 fontsize=7, y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# ==========================================================================================
# the report: paper numbers, ours, and the ablations behind every gap
# ==========================================================================================
@dataclass
class Runs:
    qwen3: pd.DataFrame
    deepseek: pd.DataFrame
    node: pd.DataFrame
    table4: dict
    ablation: pd.DataFrame
    persistent: pd.DataFrame
    gamma: pd.DataFrame
    skew: pd.DataFrame
    fitted_skew: float
    fit_at_bound: bool
    swap: pd.DataFrame
    skew_runs: dict = field(default_factory=dict)          # {skew: that variant's rows}
    deepseek_ablation: dict = field(default_factory=dict)  # {variant: its rows} (ungrouped, dense0)
    swap_gap: dict = field(default_factory=dict)           # {model: its swap-gap sweeps} (`read_swap_gaps`)
    long: dict = field(default_factory=dict)               # {variant: its rows}: HD-MoE, HierMoE over a long run

    def of(self, model: str) -> pd.DataFrame:
        return self.qwen3 if model == QWEN3 else self.deepseek

    @functools.cached_property
    def swap_gap_text(self) -> tuple[str, str] | None:
        """`swap_gap_lines` of the swap-gap sweeps (headline sentence, section), made once."""
        return swap_gap_lines(self.swap_gap, self) if self.swap_gap else None

    @functools.cached_property
    def persistent_skew(self) -> Ablation:
        """The persistent-skew run as one ablation for every number it bears on (its balance and the
        fitted routing's read once)."""
        return Ablation(f"a persistent skew (skew {self.persistent['skew'].iloc[0]:g}, no drift; MaxVio "
                        f"{_balance(self.persistent)['maxvio']:.2f} against {_balance(self.ablation)['maxvio']:.2f})",
                        "`ablation-persistent`", frame=self.persistent)


def _md_table(frame: pd.DataFrame, digits: int = 2) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(fmt(v, digits) if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# the paper's numbers, read from its CSVs (never typed in here)
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _paper_table(name: str) -> pd.DataFrame:
    """figures/paper/<name>.csv, read once per report build (its callers only filter it)."""
    return read_paper_csv(name)[0]


def _paper_rows(name: str, **where) -> pd.DataFrame:
    hit = _paper_table(name)
    for column, value in where.items():
        hit = hit[hit[column].astype(str) == str(value)]
    return hit


def paper_value(name: str, **where) -> float:
    """The one value of figures/paper/<name>.csv whose columns equal `where`."""
    hit = _paper_rows(name, **where)
    if len(hit) != 1:
        raise ValueError(f"figures/paper/{name}.csv: {len(hit)} rows with {where}; expected one")
    return float(hit["value"].iloc[0])


def fit_target(main_run: pd.DataFrame) -> float:
    """The paper number the routing skew is fitted to: HD2-MoE over Megatron-LM in Table IV's
    default column, which is the Qwen3 setting of the main run."""
    return paper_value("hiermoe_table4", system="HD2-MoE", sweep="K", setting=int(main_run["K"].iloc[0]))


def paper_range(name: str, **where) -> tuple[float, float]:
    table = _paper_rows(name, **where)
    return float(table["value"].min()), float(table["value"].max())


def derived_tutel(bound: str) -> tuple[float, float, float]:
    """Tutel-2DH over Megatron-LM as the paper's Fig. 11 ranges imply it at one end (it prints no
    such number): (HierMoE over Megatron-LM) / (HierMoE over Tutel-2DH), with both terms."""
    a = paper_value("hiermoe_fig11", system="HierMoE", baseline=BASE, bound=bound)
    b = paper_value("hiermoe_fig11", system="HierMoE", baseline="Tutel-2DH", bound=bound)
    return a / b, a, b


# ------------------------------------------------------------------------------------------
# paired comparisons: an ordering holds only beyond the iteration-to-iteration noise
# ------------------------------------------------------------------------------------------
def paired(frame: pd.DataFrame, a: str, b: str, metric: str = "a2a_ms") -> tuple[str, dict]:
    """How `a` compares with `b` on the same iterations: the per-iteration ratio (b's time over
    a's) and 'faster' (its p5 above 1), 'slower' (its p95 below 1) or 'no difference' (its
    p5-p95 contains 1)."""
    r = speedup(frame, a, b, metric)
    if np.isnan(r["median"]):
        return "n/a", r
    return ("faster" if r["p5"] > 1 else "slower" if r["p95"] < 1 else "no difference"), r


def _spread(r: dict) -> str:
    return f"paired ratio p5-p95 {fmt(r['p5'], 3)}-{fmt(r['p95'], 3)}"


def claim(word: str, expected: str, r: dict) -> str:
    """'holds' / 'does not hold' / 'no difference (...)' for a paper claim that a is `expected`
    ('faster' or 'slower') than b."""
    if word == "n/a":
        return "not in the runs"
    if word == "no difference":
        return f"no difference ({_spread(r)} contains 1)"
    return ("holds" if word == expected else "does not hold") + f" ({_spread(r)})"


# ------------------------------------------------------------------------------------------
# the ablations behind a gap, and when one is named as its cause
# ------------------------------------------------------------------------------------------
VARIANT_OPTIONS = ("charge", "buffer", "capacity_factor", "method", "overlap")

ASSUMPTION_TEXT = {
    "charge=tokens": "charging only the token rows, one start-up per step (the paper's Eqs. (1)-(5))",
    "buffer=total": "reading the AlltoAll buffer as the largest amount one rank sends or receives "
                    "(instead of fan x the largest split)",
    "capacity_factor=0": "Tutel dropless (capacity = the largest per-expert count)",
    "capacity_factor=1.25": "Tutel capacity factor 1.25",
    "method=greedy-swap": "our earlier greedy-swap SmartMoE planner",
    "overlap=true": "DeepEP's node step and forwarding pipelined",
}


def ratio(frame: pd.DataFrame, system: str, baseline: str, metric: str = "a2a_ms", bound: str = "exact") -> float:
    """Ours for one paper number: the median per-iteration speedup of `system` over `baseline`
    (NaN where the run lacks either); `X[opt=*]` is a range over the run's values of a swept
    option, its `bound` end (the option's default where the run has no sweep)."""
    if system.endswith("=*]"):
        names = [s for s in dict.fromkeys(frame["system"]) if s.startswith(system[:-2])] or [base_name(system)]
        values = [speedup(frame, s, baseline, metric)["median"] for s in names]
        return (min if bound == "low" else max)(values)
    if system not in set(frame["system"]):
        return np.nan
    return speedup(frame, system, baseline, metric)["median"]


@dataclass(eq=False)
class Ablation:
    """One assumption changed, and ours under it for any number of a setting: the setting's run
    with an option added to the systems' names (both sides: a modeling assumption; only `of`: that
    system's option), or a run of its own (`frame`)."""
    what: str
    run: str
    option: str = ""
    of: str = ""
    frame: pd.DataFrame | None = None

    def changes(self, system: str, baseline: str) -> bool:
        return not self.of or self.of in (system, baseline)

    def value(self, frame: pd.DataFrame, system: str, baseline: str, metric: str, bound: str = "exact") -> float:
        def name(s):
            return f"{s}[{self.option}]" if self.option and (not self.of or s == self.of) else s
        if self.option and not self.of and (name(system) not in set(frame["system"])
                                            or name(baseline) not in set(frame["system"])):
            return np.nan
        return ratio(frame if self.frame is None else self.frame, name(system), name(baseline), metric, bound)


@dataclass(frozen=True)
class Compared:
    """One paper number beside ours. `run` names our run; `setting` the numbers it stands among
    (those of the same setting and metric; by default the run's)."""
    source: str
    label: str
    system: str
    baseline: str
    paper: float
    metric: str
    run: str
    bound: str = "exact"
    fitted: bool = False
    setting: str = ""

    @property
    def group(self) -> tuple:
        return (self.setting or self.run, self.metric)

    @property
    def key(self) -> tuple:
        """The same number printed in several places (Fig. 11, its range, Table IV's default column)."""
        return (self.system, self.baseline, self.metric, self.run, self.paper)


def derived(c: Compared, others: list[Compared]) -> list[Compared]:
    """The numbers two of the setting's printed ones imply together with `c`: over the same
    baseline, c's system over the other's; for the same system, the other baseline over c's (for
    HierMoE over Megatron-LM beside HD-MoE over Megatron-LM: the swap gain, HierMoE over HD-MoE)."""
    out = []
    for o in others:
        if o.baseline == c.baseline and o.system != c.system:
            s, b = c.system, o.system
        elif o.system == c.system and o.baseline != c.baseline:
            s, b = o.baseline, c.baseline
        else:
            continue
        out.append(Compared(c.source, f"{s} over {b} (derived: {fmt(c.paper)} / {fmt(o.paper)})", s, b,
                            c.paper / o.paper, c.metric, c.run))
    return out


def setting_checks(c: Compared, rows: list[Compared]) -> list[Compared]:
    """The other numbers of c's setting an assumption must keep within the tolerance to be named
    c's cause: the printed ones (the fitted one left out) and those derived with c."""
    others = list({o.key: o for o in rows if o.group == c.group and o.key != c.key
                   and not o.fitted and not o.system.endswith("=*]")}.values())
    return others + derived(c, others)


def is_cause(ab: Ablation, c: Compared, checks: list[Compared], frame: pd.DataFrame) -> tuple[bool, str]:
    """(whether `ab` accounts for c's gap, why in words): it must bring every other number of the
    setting that it changes (`checks`: `setting_checks` of c) within the tolerance too, not only c."""
    checked = []
    for o in checks:
        if not ab.changes(o.system, o.baseline):
            continue
        v = ab.value(frame, o.system, o.baseline, o.metric, o.bound)
        if np.isnan(v):
            return False, f"its run has no {o.system} over {o.baseline} under it, so {o.label} is unchecked"
        checked.append((o, v))
    off = [(o, v) for o, v in checked if abs(v / o.paper - 1) > TOLERANCE]
    if off:
        # the swap gain first where it is off (HierMoE's own part of the number), else the furthest
        o, v = max(off, key=lambda t: ((t[0].system, t[0].baseline) == ("HierMoE", "HD-MoE"), abs(t[1] / t[0].paper - 1)))
        return False, (f"under it {o.label} is ours {fmt(v)} against the paper's {fmt(o.paper)} ({pct(v, o.paper)})"
                       + (f", and {len(off) - 1} more of the setting's numbers move out of 10%" if len(off) > 1 else ""))
    return True, (f"it also keeps the {len(checked)} other number{'s' if len(checked) != 1 else ''} of this setting "
                  f"it changes within {100 * TOLERANCE:.0f}%" if checked else
                  "it changes no other number of this setting")


def ablations_of(runs: Runs, c: Compared, frame: pd.DataFrame) -> list[Ablation]:
    """Every one-assumption ablation of c in the runs: a modeling assumption on both sides
    (`X[charge=tokens]` over `B[charge=tokens]`), an option of either system
    (`Tutel-2DH[capacity_factor=0]`), and runs that change one setting (routing skew, a persistent
    skew, DeepSeek-V3's group routing and dense layers)."""
    names = set(frame["system"])
    s, b = c.system, c.baseline
    out = [Ablation(ASSUMPTION_TEXT[opt], f"`{s}[{opt}]` over `{b}[{opt}]`", option=opt) for opt in ASSUMPTIONS
           if f"{s}[{opt}]" in names and f"{b}[{opt}]" in names]
    for v in sorted(names):
        opt = options_of(v)
        if opt and opt not in ASSUMPTIONS and opt.split("=")[0] in VARIANT_OPTIONS and base_name(v) in (s, b) \
                and base_name(v) != v:
            where = f"`{v}` over `{b}`" if base_name(v) == s else f"`{s}` over `{v}`"
            out.append(Ablation(ASSUMPTION_TEXT.get(opt, opt), where, option=opt, of=base_name(v)))
    if c.run == "qwen3" and c.metric == "a2a_ms" and runs.skew_runs:
        g = runs.skew[runs.skew["system"] == s]
        if len(g):
            for x in dict.fromkeys((float(g.loc[g["median"].idxmin(), "skew"]), float(g.loc[g["median"].idxmax(), "skew"]))):
                out.append(Ablation(f"routing skew {x:g}", "skew sweep", frame=runs.skew_runs[x]))
    if c.run in ("qwen3", "ablation", "ablation-gamma") and c.metric == "a2a_ms" and "HierMoE" in (base_name(s),
                                                                                                 base_name(b)):
        out.append(runs.persistent_skew)
    if c.run == "deepseek":
        for variant, frame_v in runs.deepseek_ablation.items():
            if variant == "ungrouped":
                out.append(Ablation("routing without DeepSeek-V3's node-limited groups (n_group 1, topk_group 1)",
                                    f"`deepseek-ablation` variant {variant}", frame=frame_v))
            elif variant == "dense0" and c.metric == "e2e_ms":
                out.append(Ablation(f"all {int(frame_v['num_layers'].iloc[0])} layers MoE (first_k_dense_layers 0)",
                                    f"`deepseek-ablation` variant {variant}", frame=frame_v))
    return out


def _balance(frame: pd.DataFrame) -> dict[str, float]:
    """The routing's balance over a run (median over iterations and layers)."""
    first = frame.groupby(["iteration", "layer"]).first()
    return {"max_split_ratio": float(first["max_split_ratio"].median()), "maxvio": float(first["maxvio"].median())}


def paper_model_of(uniform: dict, system: str, over: str) -> float:
    """The paper's own model's prediction (uniform routing) of system over `over`, where it has one."""
    ms = {"Megatron-LM": 1.0, "HD2-MoE": uniform["HD2"], "HD-MoE": uniform["HD-MoE"]}
    return ms[system] / ms[over] if system in ms and over in ms and system != over else np.nan


def uniform_of(frame: pd.DataFrame) -> dict[str, float]:
    """The paper's own model (uniform routing) for a run's model, topology, profile, K and E."""
    first = frame.iloc[0]
    return uniform_paper_model(str(first["model"]), str(first["topology"]), str(first["profile"]).split("@")[0],
                               top_k=int(first["K"]), num_experts=int(first["E"]))


def cause_text(runs: Runs, c: Compared, rows: list[Compared], frame: pd.DataFrame) -> str:
    """The one-assumption ablations of a gap with their numbers; one is named the cause only when
    `is_cause` says so, otherwise the closest is given without causal wording."""
    tried = [(ab, ab.value(frame, c.system, c.baseline, c.metric, c.bound)) for ab in ablations_of(runs, c, frame)]
    parts = [f"{ab.what}: {fmt(v)} ({ab.run})" for ab, v in tried]
    checks = setting_checks(c, rows)
    if base_name(c.system) == "HierMoE" and c.baseline != "HD-MoE":
        gain = [o for o in derived(c, checks) if (o.system, o.baseline) == ("HierMoE", "HD-MoE")]
        if gain:
            parts.insert(0, f"the swap gain here, HierMoE over HD-MoE: ours {fmt(ratio(frame, 'HierMoE', 'HD-MoE', c.metric))}"
                            f", the paper's {fmt(gain[0].paper)} ({gain[0].label.split('(')[1].rstrip(')')})")
    model_says = paper_model_of(uniform_of(frame), c.system, c.baseline) if c.metric == "a2a_ms" else np.nan
    if not np.isnan(model_says):
        parts.append(f"our implementation of the paper's model (its Eqs. (1)-(5) and constants, idealised uniform "
                     f"routing, `uniform_paper_model`; the paper prints no such prediction) gives {fmt(model_says)}")
    out = "; ".join(parts)
    candidates = [(ab, v) for ab, v in tried if not np.isnan(v)]
    if not candidates:
        return out or "no one-assumption ablation of this number in the runs"
    near = sorted(candidates, key=lambda t: abs(t[1] / c.paper - 1))
    within = [(ab, v) for ab, v in near if abs(v / c.paper - 1) <= TOLERANCE]
    verdicts = {ab: is_cause(ab, c, checks, frame) for ab, _ in within}
    named = [(ab, v, verdicts[ab][1]) for ab, v in within if verdicts[ab][0]]
    if named:
        ab, v, why = named[0]
        out += f". Cause: {ab.what} ({fmt(v)}, {pct(v, c.paper)} from the paper); {why}"
    else:
        ab, v = near[0]
        out += f". Closest single ablation: {ab.what} ({fmt(v)}, {pct(v, c.paper)} from the paper)"
        out += (f"; not named as the cause: {verdicts[ab][1]}" if within else
                f"; none brings this number within {100 * TOLERANCE:.0f}%")
    if not np.isnan(model_says) and abs(model_says / c.paper - 1) > TOLERANCE:
        out += (f"; the paper's measurement is {pct(c.paper, model_says)} off what its own model gives under "
                f"uniform routing ({fmt(model_says)})")
    return out


def _either(values: dict[str, float], bound: str) -> tuple[str, float]:
    """For a range stated over both models: the lower end against our lower model's value, the
    upper against our higher one (the paper does not say which model gets which end)."""
    items = [(m, v) for m, v in values.items() if not np.isnan(v)]
    if not items:
        return "", np.nan
    return (min if bound == "low" else max)(items, key=lambda kv: kv[1])


RUN_OF_MODEL = {QWEN3: "qwen3", DEEPSEEK: "deepseek"}


def compared_numbers(runs: Runs, t4: pd.DataFrame) -> tuple[list[Compared], dict[str, pd.DataFrame]]:
    """Every number of figures/paper/hiermoe_fig10, fig11, table4 and ablation, with the run ours
    comes from; and those runs by name."""
    frames = {"qwen3": runs.qwen3, "deepseek": runs.deepseek, "ablation": runs.ablation, "ablation-gamma": runs.gamma}
    target = fit_target(runs.qwen3)
    rows = []
    for name, metric in (("hiermoe_fig11", "a2a_ms"), ("hiermoe_fig10", "e2e_ms")):
        table, _ = read_paper_csv(name)
        for _, r in table.iterrows():
            values = {m: ratio(runs.of(m), r["system"], r["baseline"], metric) for m in (QWEN3, DEEPSEEK)}
            model = r["model"] if r["model"] in values else _either(values, r["bound"])[0]
            if not model:
                continue
            label = (f"{r['system']} over {r['baseline']}, {MODEL_LABEL.get(model, model)}"
                     + ("" if r["bound"] == "exact" else f" ({r['bound']} end of the range over both models)"))
            fitted = (metric == "a2a_ms" and r["system"] == "HD2-MoE" and r["baseline"] == BASE and model == QWEN3
                      and float(r["value"]) == target)
            rows.append(Compared("Fig. 11" if name.endswith("11") else "Fig. 10", label, r["system"], r["baseline"],
                                 float(r["value"]), metric, RUN_OF_MODEL[model], fitted=fitted))
    for _, r in t4.iterrows():
        frame = runs.table4.get((r["sweep"], r["setting"]))
        if frame is None:
            continue
        run = "qwen3" if frame is runs.qwen3 else f"table4 {r['sweep']} = {r['setting']}"
        frames[run] = frame
        rows.append(Compared("Table IV", f"{r['system']}, {r['sweep']} = {r['setting']}", r["system"], BASE,
                             float(r["paper"]), "a2a_ms", run,
                             fitted=r["system"] == "HD2-MoE" and frame is runs.qwen3 and float(r["paper"]) == target))
    table, _ = read_paper_csv("hiermoe_ablation")
    for _, r in table.iterrows():
        if r["ablation"] == "gamma":
            system, run = "HierMoE[gamma=*]", "ablation-gamma"
        else:
            default = (r["ablation"], str(r["setting"])) in (("max_fn", "smooth"), ("every", "1"))
            system, run = ("HierMoE" if default else f"HierMoE[{r['ablation']}={r['setting']}]"), "ablation"
        rows.append(Compared("Sec. V-E ablation", f"{r['ablation']} = {r['setting']} ({r['bound']}): HierMoE over HD-MoE",
                             system, "HD-MoE", float(r["value"]), "a2a_ms", run, bound=r["bound"], setting="ablation"))
    return rows, frames


def paper_rows(runs: Runs, t4: pd.DataFrame) -> pd.DataFrame:
    """Every paper number beside ours, with the causes of every gap above the tolerance."""
    numbers, frames = compared_numbers(runs, t4)
    rows = []
    for c in numbers:
        frame = frames[c.run]
        ours = ratio(frame, c.system, c.baseline, c.metric, c.bound)
        gap = abs(ours / c.paper - 1) if c.paper and not np.isnan(ours) else np.nan
        cause = cause_text(runs, c, numbers, frame) if gap > TOLERANCE or c.fitted else ""
        if c.fitted:
            cause = ("FITTED: the routing skew was fitted to this number (left out of the comparison); "
                     + ("the fit sits at its lower bound, so it is not reached. " if runs.fit_at_bound else "") + cause)
        rows.append({"paper source": c.source, "number": c.label, "paper": c.paper, "ours": ours,
                     "ours vs paper": "n/a" if np.isnan(gap) else pct(ours, c.paper), "fitted": c.fitted, "key": c.key,
                     "cause (ablations: one assumption changed, its run)": cause})
    return pd.DataFrame(rows)


def distinct(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per paper number (system, baseline, metric, setting and value), the fitted one and
    those without ours left out."""
    keep = rows[(rows["ours vs paper"] != "n/a") & ~rows["fitted"]]
    return keep.drop_duplicates("key")


def _within(rows: pd.DataFrame) -> pd.Series:
    return (rows["ours"] / rows["paper"] - 1).abs() <= TOLERANCE


def orderings(runs: Runs) -> list[str]:
    """The paper's orderings, each checked on our runs beyond the iteration-to-iteration noise
    (paired per-iteration ratios), with the ablations that bear on it."""
    out = []

    def sp(model, s, over=BASE, metric="a2a_ms", frame=None):
        return speedup(frame if frame is not None else runs.of(model), s, over, metric)["median"]

    tutel = [derived_tutel(bound) for bound in ("low", "high")]
    paper_tutel = " and ".join(f"{fmt(v)} at the {end} ends ({fmt(a)} / {fmt(b)})"
                               for end, (v, a, b) in zip(("low", "high"), tutel))
    for model in (QWEN3, DEEPSEEK):
        name, frame = MODEL_LABEL[model], runs.of(model)
        word, r = paired(frame, "Tutel-2DH", BASE)
        tz, tt = sp(model, "Tutel-2DH[capacity_factor=0]"), sp(model, "Tutel-2DH[buffer=total]")
        out.append(f"* Tutel-2DH slower than Megatron-LM ({name}): paper yes (no number printed; the ends of its "
                   f"Fig. 11 ranges imply {paper_tutel}: HierMoE over Megatron-LM / HierMoE over Tutel-2DH); ours "
                   f"{fmt(r['median'])} with Tutel's default capacity factor 1.0 -> {claim(word, 'slower', r)}. "
                   f"Dropless (capacity factor 0, the largest per-expert count) gives {fmt(tz)}; evaluating the "
                   f"AlltoAlls at the largest per-rank total instead of fan x the largest split gives {fmt(tt)}. "
                   f"Megatron-LM's modeled time carries its largest split, {_balance(frame)['max_split_ratio']:.2f}x the "
                   "mean split in this run (median over iterations and layers); Tutel's capacity-padded slices are "
                   "equal.")
        for metric, what in (("a2a_ms", "AlltoAll"), ("e2e_ms", "end to end")):
            word, r = paired(frame, "HD2-MoE-Smart", "HD2-MoE", metric)
            hs, h = sp(model, "HD2-MoE-Smart", metric=metric), sp(model, "HD2-MoE", metric=metric)
            greedy = sp(model, "HD2-MoE-Smart[method=greedy-swap]") if metric == "a2a_ms" else np.nan
            text = (f"* HD2-MoE-Smart slower than HD2-MoE ({name}, {what}): paper yes; ours {fmt(hs)} vs {fmt(h)} over "
                    f"Megatron-LM" + ("" if np.isnan(greedy) else f" (greedy-swap planner {fmt(greedy)})")
                    + f" -> {claim(word, 'slower', r)}.")
            if model == QWEN3 and metric == "a2a_ms" and runs.skew_runs:
                per = {x: paired(f, "HD2-MoE-Smart", "HD2-MoE") for x, f in sorted(runs.skew_runs.items())}
                text += (" Skew sweep (same comparison): " + "; ".join(
                    f"skew {x:g}: {fmt(r2['median'], 3)}, {w}" for x, (w, r2) in per.items()) + ". The ordering "
                    + _count_holds(per, "slower") + ".")
            out.append(text)
    hs = {d: paired(runs.qwen3, f"H{d}", BASE) for d in (2, 3, 4)}
    faster = [d for d, (w, _) in hs.items() if w == "faster"]
    h2_tokens = sp(QWEN3, "H2[charge=tokens]")
    text = ("* Hierarchy without dedup not faster than flat (Qwen3): paper yes; ours H2..H4 "
            + ", ".join(f"{fmt(r['median'])} ({w})" for w, r in hs.values())
            + f" -> {'does not hold' if faster else 'holds'}; H2 with the paper's charge {fmt(h2_tokens)}.")
    if runs.skew_runs:
        per = {x: paired(f, "H2", BASE) for x, f in sorted(runs.skew_runs.items())}
        text += (" Skew sweep, H2 over Megatron-LM: " + "; ".join(f"skew {x:g}: {fmt(r['median'])}, {w}"
                                                                    for x, (w, r) in per.items())
                 + "; the largest flat split goes from " + " to ".join(
                     f"{_balance(f)['max_split_ratio']:.2f}x" for f in (runs.skew_runs[min(runs.skew_runs)],
                                                                         runs.skew_runs[max(runs.skew_runs)]))
                 + " the mean over the sweep.")
    out.append(text)
    paper_fn = {fn: paper_value("hiermoe_ablation", ablation="max_fn", setting=fn) for fn in ("smooth", "max", "lse")}
    gains = {fn: speedup(runs.ablation, s, "HD-MoE")["median"]
             for fn, s in (("smooth", "HierMoE"), ("max", "HierMoE[max_fn=max]"), ("lse", "HierMoE[max_fn=lse]"))}
    vs = {fn: paired(runs.ablation, "HierMoE", f"HierMoE[max_fn={fn}]") for fn in ("max", "lse")}
    pvs = {fn: paired(runs.persistent, "HierMoE", f"HierMoE[max_fn={fn}]") for fn in ("max", "lse")}
    words = [w for w, _ in vs.values()]
    verdict = ("holds" if all(w == "faster" for w in words) else "does not hold" if "slower" in words
               else "not shown: no difference from " + " and ".join(fn for fn, (w, _) in vs.items() if w == "no difference"))
    out.append(f"* Smooth-max the best max function: paper yes ({fmt(paper_fn['smooth'])} vs {fmt(paper_fn['max'])} / "
               f"{fmt(paper_fn['lse'])}); ours HierMoE over HD-MoE smooth {fmt(gains['smooth'], 3)}, max "
               f"{fmt(gains['max'], 3)}, LSE {fmt(gains['lse'], 3)}; smooth against max: {vs['max'][0]} "
               f"({_spread(vs['max'][1])}), against LSE: {vs['lse'][0]} ({_spread(vs['lse'][1])}) -> {verdict}. On a "
               f"persistent skew, smooth against max: {pvs['max'][0]} ({_spread(pvs['max'][1])}), against LSE: "
               f"{pvs['lse'][0]} ({_spread(pvs['lse'][1])}).")
    for label, frame in (("4 nodes, G = 32", runs.qwen3), ("1 node, G = 8", runs.node)):
        out.append(_dstar_line(label, frame))
    return out


def _count_holds(per: dict, expected: str) -> str:
    held = [x for x, (w, _) in per.items() if w == expected]
    against = [x for x, (w, _) in per.items() if w not in (expected, "no difference", "n/a")]
    return (f"holds at {len(held)} of {len(per)} skews" + (f" ({', '.join(f'{x:g}' for x in held)})" if held else "")
            + (f" and is reversed at {len(against)} ({', '.join(f'{x:g}' for x in against)})" if against else ""))


def _dstar_line(label: str, frame: pd.DataFrame) -> str:
    """Fig. 13's claim on one setting: HD-MoE against the best fixed dimension, with what d* picked
    (the recorded `dim` column) and how much of the difference is the all-reduce that agrees on d*
    (HD-MoE's time minus the fixed route it picked, same iteration and layer)."""
    per = _summary(frame).groupby("system")["a2a_ms"].median()
    fixed = {s: per[s] for s in fixed_dims(per.index) if s.startswith("HD")}
    best = min(fixed, key=fixed.get)
    gap = per["HD-MoE"] - fixed[best]
    rows = frame[frame["iteration"] >= frame["warmup"]]
    wide = rows.pivot_table(index=["iteration", "layer"], columns="system", values="a2a_ms")
    dims = rows[rows["system"] == "HD-MoE"].set_index(["iteration", "layer"])["dim"]
    agree = pd.Series([wide.loc[i, "HD-MoE"] - wide.loc[i, f"HD{d}"] for i, d in dims.items()], index=dims.index)
    fastest = sum(1 for i, d in dims.items() if wide.loc[i, f"HD{d}"] <= min(wide.loc[i, s] for s in fixed) + 1e-9)
    picks = dims.value_counts()
    held = abs(gap / fixed[best]) <= TOLERANCE
    return (f"* HD-MoE matches the best fixed dimension (Fig. 13, {label}): paper yes; ours HD-MoE {fmt(per['HD-MoE'])} ms "
            f"vs the best fixed {best} {fmt(fixed[best])} ms per layer per iteration ({pct(per['HD-MoE'], fixed[best])}) "
            f"-> {'holds' if held else 'does not hold'} within {100 * TOLERANCE:.0f}%. d* (the `dim` column) picks "
            + ", ".join(f"HD{d} in {n}" for d, n in picks.items()) + f" of {len(dims)} measured (iteration, layer) rows, "
            f"the fastest fixed route of its row in {fastest}; HD-MoE's time over the route it picked (same row; "
            f"modeled as the all-reduce that agrees on d*) is {fmt(float(agree.median()))} ms, "
            + (f"{100 * float(agree.median()) / gap:.0f}% of the difference." if gap > 0 else "while HD-MoE is not slower."))


def headline(runs: Runs, t4: pd.DataFrame, rows: pd.DataFrame) -> list[str]:
    """What does and does not reproduce, in numbers from the runs; each paper number counted once."""
    every = distinct(rows)
    close = every[_within(every)]
    agree = [reproduces(float(r["paper"]), float(r["ours"])) for _, r in close.iterrows()]
    causes = every[every["cause (ablations: one assumption changed, its run)"].str.contains(". Cause: ", regex=False)]
    t4_rows = distinct(rows[rows["paper source"] == "Table IV"])
    t4_above = int((t4_rows["ours"] > t4_rows["paper"]).sum())
    q = {s: speedup(runs.qwen3, s)["median"] for s in ("HD2-MoE", "HD-MoE", "HierMoE")}
    d = {s: speedup(runs.deepseek, s)["median"] for s in ("HD2-MoE", "HD-MoE", "HierMoE")}
    p = {(m, s): paper_value("hiermoe_fig11", system=s, baseline=BASE, model=m)
         for m in (QWEN3, DEEPSEEK) for s in ("HD-MoE", "HierMoE")}
    target = fit_target(runs.qwen3)
    e2e = speedup(runs.qwen3, "HierMoE", "HD-MoE", "e2e_ms")["median"]
    e2e_hd2 = speedup(runs.qwen3, "HierMoE", "HD2-MoE", "e2e_ms")["median"]
    lo10, hi10 = paper_range("hiermoe_fig10", system="HierMoE", baseline="HD2-MoE")
    lo_swap, hi_swap = paper_range("hiermoe_ablation")
    gain = speedup(runs.ablation, "HierMoE", "HD-MoE")["median"]
    ds = swap_gap_setting(DEEPSEEK, runs)
    pgain = speedup(runs.persistent, "HierMoE", "HD-MoE")["median"]
    top = max(runs.skew_runs) if runs.skew_runs else None
    tgain = speedup(runs.skew_runs[top], "HierMoE", "HD-MoE")["median"] if top is not None else np.nan
    n_total = int((rows["ours vs paper"] != "n/a").sum())
    return [
        f"* Of the {len(every)} distinct paper numbers compared below, {len(close)} are within "
        f"{100 * TOLERANCE:.0f}% of ours, {sum(agree)} of them also by their gains (the FSMoE report's rule, "
        f"`figures.verdicts`: {RULE[0].lower()}{RULE[1:-1]}). Counted once per system, baseline, metric and setting: the table's "
        f"{n_total} rows print some numbers several times (Fig. 11's value and its range, Table IV's default "
        f"column = the Qwen3 run, Sec. V-E's default HierMoE); the fitted one, Qwen3 HD2-MoE {fmt(target)}, left out. "
        f"Every gap above {100 * TOLERANCE:.0f}% lists the one-assumption ablations of its run; {len(causes)} of "
        f"them name one as the cause (it brings that number and every other number of the setting it changes "
        f"within {100 * TOLERANCE:.0f}%).",
        f"* Table IV: {int(_within(t4_rows).sum())} of {len(t4_rows)} distinct cells within {100 * TOLERANCE:.0f}% "
        f"(its K = 8, E = 128 and G = 32 columns are one setting, the Qwen3 run, counted once per system; the fitted "
        f"HD2-MoE cell left out); ours above the paper in {t4_above}.",
        f"* AlltoAll speedups over Megatron-LM (Fig. 11): Qwen3 HD2-MoE {fmt(q['HD2-MoE'])} (paper {fmt(target)}, the "
        f"value the routing skew was fitted to: {'at its lower bound, so not reached' if runs.fit_at_bound else 'reached'}"
        f"), HD-MoE {fmt(q['HD-MoE'])} (paper {fmt(p[(QWEN3, 'HD-MoE')])}), HierMoE {fmt(q['HierMoE'])} (paper "
        f"{fmt(p[(QWEN3, 'HierMoE')])}); DeepSeek-V3 HD-MoE {fmt(d['HD-MoE'])} (paper {fmt(p[(DEEPSEEK, 'HD-MoE')])}), "
        f"HierMoE {fmt(d['HierMoE'])} (paper {fmt(p[(DEEPSEEK, 'HierMoE')])}).",
        f"* The expert swap (HierD-ES), HierMoE over HD-MoE: {fmt(gain)}x on the fitted routing (the `ablation` "
        f"run's default HierMoE, paired per iteration; the Qwen3 run's medians give {fmt(q['HierMoE'] / q['HD-MoE'])}; paper "
        f"{fmt(lo_swap)}-{fmt(hi_swap)} in Sec. V-E), {fmt(pgain)}x on a persistent skew (skew "
        f"{runs.persistent['skew'].iloc[0]:g}, no drift)"
        + ("" if top is None else f", {fmt(tgain)}x at skew {top:g} with drift (skew sweep)")
        + f"; on DeepSeek-V3 {fmt(speedup(ds.run, 'HierMoE', 'HD-MoE')['median'])}x in the `{ds.run_name}` run "
          f"(paired per iteration; paper {fmt(ds.paper[0])}, {ds.paper_words})."
        + ("" if runs.swap_gap_text is None else " " + runs.swap_gap_text[0]),
        f"* End to end on Qwen3, HierMoE over HD-MoE {fmt(e2e)}, over HD2-MoE {fmt(e2e_hd2)} (paper: over HD2-MoE "
        f"{fmt(lo10)}-{fmt(hi10)}, a range over both models).",
        *deepseek_setting(runs),
    ]


def deepseek_setting(runs: Runs) -> list[str]:
    """What our DeepSeek-V3 runs assume that the paper does not state, read from the runs."""
    first = runs.deepseek.iloc[0]
    layers, moe = int(first["num_layers"]), int(first["moe_layers_total"])
    out = [f"* DeepSeek-V3 (6L, half) as run: {moe} of its {layers} layers are MoE (the model's first_k_dense_layers "
           f"= {layers - moe} kept; the paper does not say), routing node-limited as in DeepSeek-V3's config "
           f"(n_group {int(first['n_group'])}, topk_group {int(first['topk_group'])}: a token's experts lie in at most "
           f"{int(first['topk_group'])} of {int(first['n_group'])} expert groups; the paper does not say whether it "
           "was enabled)."]
    ab = runs.deepseek_ablation
    base = ab["defaults"]        # the same short run with the model as configured: one assumption changed
    out.append(f"  One assumption changed at a time, each against the same short run with the model as configured "
               f"(`deepseek-ablation`, {base['iteration'].nunique() - int(base['warmup'].iloc[0])} measured "
               f"iterations, {base['layer'].nunique()} layer):")
    if "ungrouped" in ab:
        f = ab["ungrouped"]
        out.append(f"  without the group limit, HD-MoE over Megatron-LM {fmt(speedup(f, 'HD-MoE')['median'])}, HierMoE "
                   f"{fmt(speedup(f, 'HierMoE')['median'])} (grouped: {fmt(speedup(base, 'HD-MoE')['median'])}, "
                   f"{fmt(speedup(base, 'HierMoE')['median'])});")
    if "dense0" in ab:
        f = ab["dense0"]
        out.append(f"  with all {int(f['moe_layers_total'].iloc[0])} layers MoE, HierMoE over Megatron-LM end to end "
                   f"{fmt(speedup(f, 'HierMoE', metric='e2e_ms')['median'])} (with {moe}: "
                   f"{fmt(speedup(base, 'HierMoE', metric='e2e_ms')['median'])}).")
    return out


def swap_section(runs: Runs) -> str:
    per = _summary(runs.qwen3).set_index(["system", "iteration"])
    lines = []
    for s in ("HierMoE", "HierMoE[swap_cost=exposed]", "HierMoE[swap_cost=shared]", "HD2-MoE-Smart",
              "HD2-MoE-Smart[swap_cost=exposed]", "SmartMoE"):
        if s not in per.index.get_level_values(0):
            continue
        g = per.loc[s]
        lines.append({"system": s, "experts moved per layer per plan": float(g["moved"].mean()),
                      "move link ms per iteration (all MoE layers)": float(g["swap_link_ms"].median()),
                      "link time / step": f"{100 * g['swap_link_ms'].median() / g['e2e_ms'].median():.1f}%",
                      "charged ms per iteration": float(g["swap_exposed_ms"].median()),
                      "charged / step": f"{100 * g['swap_exposed_ms'].median() / g['e2e_ms'].median():.2f}%"})
    table = _md_table(pd.DataFrame(lines))
    measured = runs.ablation[runs.ablation["iteration"] >= runs.ablation["warmup"]]
    plans = {s: int((measured[measured.system == s]["moved_experts"] > 0).sum())
             for s in ("HierMoE", "HierMoE[every=2]", "HierMoE[every=4]", "HierMoE[every=8]")
             if s in set(measured["system"])}
    meas = runs.swap.groupby("pair", sort=False).agg(repeats=("measured_ms", "size"),
                                                     measured_ms=("measured_ms", "median"),
                                                     bare_alltoall_ms=("transport_ms", "median"),
                                                     modeled_ms=("modeled_ms", "first"),
                                                     bytes_sent_per_expert=("bytes_per_expert", "first"),
                                                     bytes_per_expert_model=("bytes_per_expert_model", "first")).reset_index()
    meas["measured / modeled"] = meas["measured_ms"] / meas["modeled_ms"]
    meas["bare AlltoAll / modeled"] = meas["bare_alltoall_ms"] / meas["modeled_ms"]
    first = runs.swap.iloc[0]
    same = bool((meas["bytes_sent_per_expert"] == meas["bytes_per_expert_model"]).all())
    return "\n".join([
        "What a swap moves: one pair of experts per layer (HierD-ES) or every expert SmartMoE's plan moves, each "
        "with its bf16 weights, fp32 master weights and two Adam moments (14 bytes per parameter), point to point "
        "between its owners, a lone message having its link to itself; when: after the layer's backward, under the "
        "backward compute of the layers below (`swap_cost: overlap`, the default), every `every` iterations. "
        "Ablations: `exposed` charges the link time in full, `shared` also gives each move only one rank's share "
        "of its link (as inside an AlltoAll). Modeled, Qwen3 run (the paper reports about "
        f"{paper_value('hiermoe_swap', metric='swap_share_of_step'):g}% of the step for a swap):",
        "", table, "",
        "Swaps made in the swap-interval ablation (measured iterations, first layer): "
        + ", ".join(f"{s} {n}" for s, n in plans.items()) + ".", "",
        f"Measured on this machine (tier emu, {first['topology']} gloo ranks, experts of {first['model']}'s shape, "
        f"profile `{first['profile_path']}`): the migration sends "
        + ("exactly the bytes the model assumes" if same else "other bytes than the model assumes")
        + "; its time beside the model's prediction from this machine's calibration (Fig. 9, right) and the bare "
        "AlltoAll of the same bytes between the same ranks (the rest of the measured time is packing the state, "
        "unpacking it and the state check; medians over the `repeats` measured):", "", _md_table(meas, 2)])


SWAP_GAP_COLUMNS = ("skew", "swaps", "checkpoint", "converged", "maxvio", "max_split_ratio", "q_ms", "a2a_ms_same", "a2a_ms_next",
                    "a2a_ms_same_tokens", "a2a_ms_next_tokens", "first_step_rows_mean", "first_step_rows_max", "cross_node_swaps",
                    "cross_node_best_dq", "in_node_best_dq", "cross_node_lowering_share", "in_node_lowering_share",
                    "drift", "model", "topology", "E", "K", "G", "n_group", "topk_group")
PAPER_CHARGE = "final, paper's charge"
FIRST_MEAN = "first step's mean rows, final / 0 swaps"
FIRST_SPREAD = "first step's largest / mean split, 0 swaps -> final"
CROSS_NODE = "of them across nodes"


def _grouping(gap: pd.DataFrame) -> tuple[int, int]:
    """A sweep's (or run's) expert groups: (n_group, topk_group)."""
    return int(gap["n_group"].iloc[0]), int(gap["topk_group"].iloc[0])


def read_swap_gaps(paths: list[str]) -> dict[str, list[pd.DataFrame]]:
    """{model: its swap-gap sweeps, in the order given} in the report's model order, one sweep per
    model and routing (`_grouping`: a second routing of a model is an ablation of its node-limited
    routing); ValueError for a sweep of another model than the runs' or a second sweep of one
    model and routing."""
    gaps: dict[str, list[pd.DataFrame]] = {}
    for path in paths:
        gap = read_results(path, SWAP_GAP_COLUMNS, "impl.experiments.hiermoe.swap_gap")
        models = sorted(set(gap["model"]))
        if len(models) != 1 or models[0] not in MODEL_LABEL:
            raise ValueError(f"{path}: a swap-gap sweep of model {', '.join(models)}; the report reads one sweep of "
                             f"each of {', '.join(MODEL_LABEL)}")
        if len(gap[["n_group", "topk_group"]].drop_duplicates()) != 1:
            raise ValueError(f"{path}: a swap-gap sweep of several routings (n_group, topk_group); give one per file")
        groups, chosen = _grouping(gap)
        if any(_grouping(other) == (groups, chosen) for other in gaps.get(models[0], [])):
            raise ValueError(f"{path}: a second swap-gap sweep of {models[0]} with n_group {groups}, "
                             f"topk_group {chosen}; give one per model and routing")
        gaps.setdefault(models[0], []).append(gap)
    return {m: gaps[m] for m in MODEL_LABEL if m in gaps}


def swap_gap_table(gap: pd.DataFrame) -> pd.DataFrame:
    """One row per skew of the swap-gap sweep: HierMoE over HD-MoE (the placement at 0 swaps over
    the one after k swaps) at every checkpoint of the sweep and where the planner stopped; a path
    that stopped before a checkpoint keeps its last placement there."""
    checkpoints = sorted({int(k) for k in gap[gap["checkpoint"].astype(bool)]["swaps"]})
    rows = []
    for skew, g in gap.groupby("skew", sort=True):
        g = g.sort_values("swaps")
        base, last = g.iloc[0], g.iloc[-1]
        at = dict(zip(g["swaps"].astype(int), g["a2a_ms_next"]))
        row = {"skew": float(skew), "MaxVio": float(base["maxvio"]), "largest flat split / mean": float(base["max_split_ratio"])}
        for k in checkpoints:
            stopped = bool(last["converged"]) and k >= last["swaps"]
            row[f"after {k} swaps"] = (float(base["a2a_ms_next"] / (last["a2a_ms_next"] if stopped else at[k]))
                                       if stopped or k in at else np.nan)
        row["swaps made"] = f"{int(last['swaps'])}" + ("" if last["converged"] else " (cap)")
        row[CROSS_NODE] = int(last["cross_node_swaps"])
        row["final, next routing"] = float(base["a2a_ms_next"] / last["a2a_ms_next"])
        row["final, same routing"] = float(base["a2a_ms_same"] / last["a2a_ms_same"])
        row[PAPER_CHARGE] = float(base["a2a_ms_next_tokens"] / last["a2a_ms_next_tokens"])
        row["final, objective Q"] = float(base["q_ms"] / last["q_ms"])
        row[FIRST_MEAN] = float(last["first_step_rows_mean"] / base["first_step_rows_mean"])
        row[FIRST_SPREAD] = (f"{base['first_step_rows_max'] / base['first_step_rows_mean']:.3f} -> "
                             f"{last['first_step_rows_max'] / last['first_step_rows_mean']:.3f}")
        rows.append(row)
    return pd.DataFrame(rows)


def skew_needed(table: pd.DataFrame, target: float, column: str = "final, next routing") -> dict[str, float] | None:
    """The skew (and MaxVio) at which `column` first reaches `target`, linear between the sweep's
    points; None if no point of the sweep reaches it."""
    t = table.sort_values("skew").reset_index(drop=True)
    hit = t.index[t[column] >= target]
    if not len(hit):
        return None
    i = int(hit[0])
    if i == 0:
        return {"skew": float(t.loc[0, "skew"]), "MaxVio": float(t.loc[0, "MaxVio"])}
    a, b = t.loc[i - 1], t.loc[i]
    w = (target - a[column]) / (b[column] - a[column])
    return {k: float(a[k] + w * (b[k] - a[k])) for k in ("skew", "MaxVio")}


def _hd2_at_needed_skew(runs: Runs, need: dict[str, float] | None, gain: float) -> str:
    """Whether the skew the swap gain needs keeps the number the skew was fitted to: HD2-MoE over
    Megatron-LM on the skew sweep (linear between its points) at that skew, beside the paper's."""
    g = runs.skew[runs.skew["system"] == "HD2-MoE"].sort_values("skew")
    if need is None or g.empty or not g["skew"].min() <= need["skew"] <= g["skew"].max():
        return ""
    hd2 = float(np.interp(need["skew"], g["skew"], g["median"]))
    return (f" At that skew the skew sweep gives HD2-MoE over Megatron-LM {fmt(hd2)} (paper {fmt(fit_target(runs.qwen3))}, "
            f"the number the skew was fitted to), so under our model no one routing skew gives both the paper's "
            f"swap gain of {fmt(gain)} and its HD2-MoE." if abs(hd2 / fit_target(runs.qwen3) - 1) > TOLERANCE else
            f" At that skew the skew sweep gives HD2-MoE over Megatron-LM {fmt(hd2)} (paper "
            f"{fmt(fit_target(runs.qwen3))}): both hold at one skew.")


def _long_run_lines(runs: Runs, first: int, model: str) -> list[str]:
    """HierMoE over HD-MoE in the long runs of `model`, their first `first` iterations and their last
    third (paired per iteration): the swaps accumulating with the run's own staleness and drift."""
    out = []
    for name, frame in runs.long.items():
        if frame["model"].iloc[0] != model:
            continue
        n = int(frame["iteration"].max()) + 1
        early = speedup(frame[frame["iteration"] < first], "HierMoE", "HD-MoE")["median"]
        late = speedup(frame[frame["iteration"] >= n - n // 3], "HierMoE", "HD-MoE")["median"]
        out.append(f"* A run long enough to converge (`ablation-long{'' if name == 'fitted' else '-' + name}`, variant {name}: skew "
                   f"{frame['skew'].iloc[0]:g}, drift {frame['drift'].iloc[0]:g}, {n} iterations, one swap plan per iteration, "
                   f"planned on each iteration's routing and used from the next): HierMoE over HD-MoE "
                   f"{fmt(early, 3)} over its first {min(first, n)} iterations, {fmt(late, 3)} over its last {n // 3}.")
    return out


@dataclass(frozen=True)
class SwapGapSetting:
    """What one model's swap-gap sweep is read against: the sim run whose swaps it explains (at that
    run's skew) and the paper's swap gain for the model."""

    run: pd.DataFrame
    run_name: str
    skew: float
    skew_words: str               # how the text names the skew
    paper: tuple[float, ...]      # the paper's HierMoE over HD-MoE: a (low, high) range or one value
    paper_words: str              # where the paper states it


def swap_gap_setting(model: str, runs: Runs) -> SwapGapSetting:
    """Qwen3: the Sec. V-E ablation run at the fitted skew, against Sec. V-E's range (the ablations
    ran on Qwen3); DeepSeek-V3: the `deepseek` run at its skew, against Fig. 11's HierMoE over HD-MoE,
    the paper's only DeepSeek-V3 swap gain."""
    if model == QWEN3:
        return SwapGapSetting(runs.ablation, "ablation", runs.fitted_skew, "the fitted skew",
                              paper_range("hiermoe_ablation"), "Sec. V-E")
    hier, hd = (paper_value("hiermoe_fig11", system=s, baseline=BASE, model=model) for s in ("HierMoE", "HD-MoE"))
    return SwapGapSetting(runs.of(model), "deepseek", float(runs.of(model)["skew"].iloc[0]), "the `deepseek` run's skew",
                          (hier / hd,), f"Fig. 11: {fmt(hier)} / {fmt(hd)}")


def _routing_words(grouping: tuple[int, int]) -> str:
    groups, chosen = grouping
    return (f"node-limited (n_group {groups}, topk_group {chosen}: a token's experts lie in at most {chosen} of "
            f"{groups} expert groups)" if groups > 1 else "without expert groups")


@dataclass(frozen=True)
class AcrossNodes:
    """One swap path of a sweep (the skew nearest the one asked for), read for which swaps cross
    nodes: the swaps made and how many of them crossed, and of the single swaps each checkpoint's
    placement allows, the share across nodes that would lower Q (at 0 swaps; the largest on the
    path) and the best one across nodes and inside a node at 0 swaps (Q's relative change)."""

    skew: float
    swaps: int
    crossed: int
    share_start: float
    share_most: float
    best_across: float
    best_inside: float

    @classmethod
    def of(cls, gap: pd.DataFrame, skew: float) -> "AcrossNodes":
        at = float(gap["skew"].iloc[(gap["skew"] - skew).abs().argmin()])
        path = gap[gap["skew"] == at].sort_values("swaps")
        first, last = path.iloc[0], path.iloc[-1]
        return cls(at, int(last["swaps"]), int(last["cross_node_swaps"]), float(first["cross_node_lowering_share"]),
                   float(path["cross_node_lowering_share"].max()), float(first["cross_node_best_dq"]),
                   float(first["in_node_best_dq"]))


def _whole_groups(gap: pd.DataFrame) -> str:
    """Whether each expert group lies whole on one node under the identity placement (the sweeps'
    start), computed from E, n_group and the topology's nodes; '' when not (or no groups)."""
    first = gap.iloc[0]
    E, groups = int(first["E"]), int(first["n_group"])
    nodes = get_topology(str(first["topology"])).U[1]
    if groups <= 1 or E % groups or E % nodes or (E // nodes) % (E // groups):
        return ""
    return (f"; under the identity placement the swaps start from, each of its {groups} expert groups "
            f"({E // groups} consecutive experts) lies whole on one node ({E // nodes} experts per node), so a swap "
            f"across nodes splits a group that tokens select together")


def _across_nodes_lines(gap: pd.DataFrame, variants: list[pd.DataFrame], skew: float, where: str) -> list[str]:
    """Why the converged swaps cross nodes or not (`AcrossNodes`), and the same sweep under each
    other routing of the model (an ablation of node-limited routing), with what follows from them."""
    a = AcrossNodes.of(gap, skew)
    lines = [f"* Across nodes or not (Q of every single swap each checkpoint's placement allows): at {where}, at 0 "
             f"swaps {100 * a.share_start:.1f}% of the swaps across nodes would lower Q (the best across nodes "
             f"{100 * a.best_across:+.3f}%, the best inside a node {100 * a.best_inside:+.3f}%), at most "
             f"{100 * a.share_most:.1f}% at any checkpoint of the path; {a.crossed} of its {a.swaps} swaps cross nodes."]
    for variant in variants:
        v = AcrossNodes.of(variant, skew)
        line = (f"* Ablation, the same sweep with routing {_routing_words(_grouping(variant))}: at skew {v.skew:g}, "
                f"{v.crossed} of its {v.swaps} swaps cross nodes (routing as above: {a.crossed} of {a.swaps}); at 0 "
                f"swaps {100 * v.share_start:.1f}% of the swaps across nodes would lower Q (as above: "
                f"{100 * a.share_start:.1f}%), the best across nodes {100 * v.best_across:+.3f}%.")
        if _grouping(gap)[0] > 1 >= _grouping(variant)[0] and a.crossed == 0 == a.share_most < v.crossed:
            line += (" So the node-limited routing is what keeps the swaps inside nodes: with it no swap across nodes "
                     f"lowers Q at any checkpoint of the path, and none is made{_whole_groups(gap)}.")
        lines.append(line)
    return lines


def _swap_gap_model(model: str, sweeps: list[pd.DataFrame], runs: Runs) -> tuple[str, list[str]]:
    """(the headline's clause, the section's lines) of one model's swap-gap sweeps: the one with the
    routing of the model's run (else the first), and the others as ablations of its routing."""
    setting = swap_gap_setting(model, runs)
    gap = next((g for g in sweeps if _grouping(g) == _grouping(setting.run)), sweeps[0])
    variants = [g for g in sweeps if g is not gap]
    table = swap_gap_table(gap)
    at, where = setting.skew, f"{setting.skew_words} {setting.skew:g}"
    fitted = {c: float(np.interp(at, table["skew"], table[c])) for c in table.columns
              if c not in ("swaps made",) and table[c].dtype.kind == "f"}
    run = setting.run
    first_layer = run[(run["system"] == "HierMoE") & (run["layer"] == 0) & (run["iteration"] >= run["warmup"])]
    plans, measured = int((first_layer["moved_experts"] > 0).sum()), first_layer["iteration"].nunique()
    made = f"after {plans} swaps"
    need = {t: skew_needed(table, t) for t in setting.paper}

    def needed(t: float) -> str:
        n = need[t]
        return (f"{fmt(t)} needs skew {n['skew']:.2f} (MaxVio {n['MaxVio']:.2f})" if n is not None else
                f"{fmt(t)} is not reached up to skew {table['skew'].max():g} (MaxVio {table['MaxVio'].max():.2f})")

    paper = "-".join(fmt(t) for t in setting.paper) + f" ({setting.paper_words})"
    needs = "the paper's " + ", its ".join(needed(t) for t in setting.paper) + (
        ", both converged" if len(setting.paper) > 1 else ", converged")
    fit_row = table.iloc[(table["skew"] - at).abs().argmin()]
    label = MODEL_LABEL.get(model, model)
    clause = (f"{label}, at {where}: the swap converges at {fit_row['swaps made']} swaps to "
              f"{fmt(fitted['final, next routing'])} (objective Q {fmt(fitted['final, objective Q'])}); under our "
              f"model {needs}.")
    first = gap.iloc[0]
    routing = (_routing_words(_grouping(gap))
               + (f", as in the `{setting.run_name}` run" if _grouping(gap) == _grouping(run) else
                  f", unlike the `{setting.run_name}` run (n_group {int(run['n_group'].iloc[0])}, topk_group "
                  f"{int(run['topk_group'].iloc[0])})"))
    gain = speedup(run, "HierMoE", "HD-MoE")["median"]
    runs_made = (f"the `{setting.run_name}` run makes {plans} swaps in its first layer over its {measured} measured "
                 f"iterations (HierMoE over HD-MoE there {fmt(gain)}), and {plans} swaps on the same routing held fixed "
                 f"give {fmt(fitted[made])}; " if made in fitted else
                 f"the `{setting.run_name}` run makes {plans} swaps in its first layer over its {measured} measured "
                 f"iterations (HierMoE over HD-MoE there {fmt(gain)}); ")
    lines = [
        f"### {label}", "",
        f"E = {int(first['E'])}, K = {int(first['K'])}, G = {int(first['G'])} (`{first['topology']}`); routing {routing}.",
        "", _md_table(table, 3), "",
        f"* Swaps made: {runs_made}converged ({fit_row['swaps made']} swaps), {fmt(fitted['final, next routing'])} at "
        f"{where} (MaxVio {fitted['MaxVio']:.2f}), against the paper's {paper}.",
        *_long_run_lines(runs, plans, model),
        f"* Where the gain comes from: at {where} the route's first step (across nodes) carries "
        f"{100 * (1 - fitted[FIRST_MEAN]):.1f}% fewer duplicate-free rows per (holder, peer) on average after the "
        f"converged swaps (dedup: experts that tokens select together placed in one group), while its largest split "
        f"over the mean goes {fit_row[FIRST_SPREAD]} (balance); {fit_row[CROSS_NODE]} of its {fit_row['swaps made']} "
        f"swaps exchange experts on two nodes, the others stay inside one, where only the finer steps change.",
        *_across_nodes_lines(gap, variants, at, where),
        f"* Staleness (planned on one iteration, used on the next): converged, {fmt(fitted['final, same routing'], 3)} "
        f"on the routing planned on against {fmt(fitted['final, next routing'], 3)} on the next one.",
        f"* Objective against the model: converged, Q gains {fmt(fitted['final, objective Q'], 3)}, the modeled time "
        f"{fmt(fitted['final, same routing'], 3)} on the same routing under our charge, "
        f"{fmt(fitted[PAPER_CHARGE], 3)} on the next under the paper's.",
        "* What would have to be true for the paper's gain under our model, converged: "
        + "; ".join(needed(t) for t in setting.paper)
        + f" (the routing at {where} has MaxVio {fitted['MaxVio']:.2f}; the paper states no load statistics)."
        # the skew sweep, and the HD2-MoE number the skew was fitted to, are Qwen3's
        + (_hd2_at_needed_skew(runs, need[setting.paper[0]], setting.paper[0]) if model == QWEN3 else "")]
    return clause, lines


def swap_gap_lines(gaps: dict[str, list[pd.DataFrame]], runs: Runs) -> tuple[str, str]:
    """(the headline's sentence, the section) on what the swap can gain on our routing, from the
    swap-gap sweeps (`impl.experiments.hiermoe.swap_gap`), one or more per model (`read_swap_gaps`)."""
    parts = [_swap_gap_model(model, sweeps, runs) for model, sweeps in gaps.items()]
    sentence = ("Why (swap-gap sweep, swaps accumulated on a routing that stays): "
                + " ".join(clause for clause, _ in parts))
    drifts = sorted({float(d) for sweeps in gaps.values() for gap in sweeps for d in gap["drift"]})
    drift = "no drift" if drifts == [0.0] else "drift " + ", ".join(f"{d:g}" for d in drifts)
    section = "\n".join([
        "HierD-ES swaps one pair per layer and plan (Theorem 1), so its gain grows with the swaps made until no "
        "single swap lowers the objective, and it is bounded by what the routing leaves to fix. The sweep takes both "
        "limits of the runs away: per skew, one layer's routing with " + drift + ", HierD-ES planned again and again on "
        "it from the identity placement (d* of the current placement, as the runs plan) until it keeps the "
        "placement; HierMoE over HD-MoE is the modeled AlltoAll time at 0 swaps over the time after k, on the next "
        "iteration's routing (what a run that plans after its step sees; `same routing`: the routing planned on, "
        "no staleness), under our charge; `paper's charge`: the paper's Eqs. (1)-(5); `objective Q`: Eq. (8) at "
        "d*, what the planner predicts (`impl.experiments.hiermoe.swap_gap`, `results/raw/hiermoe_swap_gap`). One "
        "sweep per model, on the setting of that model's runs; the paper's swap gain is Sec. V-E's range for Qwen3 "
        "(its ablations) and Fig. 11's HierMoE over HD-MoE for DeepSeek-V3.", "",
        *(line for _, lines in parts for line in lines + [""])][:-1])
    return sentence, section


def deepep_section(runs: Runs) -> str:
    rows = []
    for label, frame in (("Qwen3, 4 nodes of the testbed (D = 4; `qwen3` run)", runs.qwen3),
                         ("DeepSeek-V3, 4 nodes of the testbed (D = 4; `deepseek` run)", runs.deepseek),
                         ("Qwen3, one node (D = 3; DeepEP's 'node' is a socket; `node` run, "
                          f"{runs.node['layer'].nunique()} layers, not Table IV's G = 8 column)", runs.node)):
        systems = set(frame["system"])
        row = {"setting": label}
        for s in ("DeepEP", "DeepEP[overlap=true]", "HD2-MoE", "HD-MoE", "HierMoE"):
            if s in systems:
                row[f"{s} over Megatron-LM"] = speedup(frame, s)["median"]
        if "HD-MoE" in systems and "DeepEP" in systems:
            row["HD-MoE over DeepEP"] = speedup(frame, "HD-MoE", "DeepEP")["median"]
        rows.append(row)
    skew = runs.skew[runs.skew["system"].isin(["DeepEP", "HD-MoE"])].pivot(index="skew", columns="system",
                                                                           values="median").reset_index()
    return "\n".join([
        "A DeepEP-style dispatcher (`baselines.deepep`, beyond the paper): node-level dedup to the same-index GPU, "
        "forwarding inside the node, one notify for all counts, node-limited routing enforced; "
        "`DeepEP[overlap=true]` pipelines its RDMA and forwarding (an assumption of the model). On the same "
        "iterations: " + "; ".join(_deepep_comparisons(runs)) + ". The scale-out sweep "
        "(`snakemake hiermoe_scaleout`, results/figures/hiermoe_scaleout.md) adds 32-1,024 GPUs.", "",
        _md_table(pd.DataFrame(rows)), "", "Against skew (Qwen3, speedups over Megatron-LM):", "",
        _md_table(skew)])


def _deepep_comparisons(runs: Runs) -> list[str]:
    """DeepEP against the dedup routes on the same iterations (paired ratios, `paired`)."""
    out = []
    for label, frame in (("Qwen3, 4 nodes", runs.qwen3), ("DeepSeek-V3, 4 nodes", runs.deepseek),
                         ("Qwen3, one node", runs.node)):
        for a, b in (("DeepEP", "HD2-MoE"), ("DeepEP", "HD-MoE"), ("DeepEP[overlap=true]", "HD-MoE")):
            word, r = paired(frame, a, b)
            if word != "n/a":
                out.append(f"{label}, {a} against {b}: {word} ({fmt(r['median'], 3)}, {_spread(r)})")
    return out


def fig12_numbers(frame: pd.DataFrame) -> str:
    layer0 = frame[(frame["layer"] == 0) & (frame["iteration"] >= frame["warmup"])]
    rows = []
    for s in (BASE, "HD-MoE", "HierMoE", "DeepEP"):
        g = layer0[layer0["system"] == s]["a2a_ms"]
        if g.empty:
            continue
        rows.append({"system": s, "mean ms": float(g.mean()), "std ms": float(g.std()),
                     "coefficient of variation": f"{100 * g.std() / g.mean():.1f}%",
                     "min-max ms": f"{g.min():.1f}-{g.max():.1f}"})
    return _md_table(pd.DataFrame(rows))


def table2_section(table2_csv: str | None, table2_md: str | None) -> str:
    if not table2_csv:
        return f"See [Table II]({Path(table2_md).name})." if table2_md else ""
    from figures.hiermoe_table2 import markdown_table2, read_table2_csv

    frame = read_table2_csv(table2_csv)
    body = markdown_table2(frame, source=table2_csv).split("\n", 2)[2]
    gaps, rounding = [], []
    for (r, k), cell in frame.groupby(["R", "K"], sort=False):
        ours, paper, closed = cell["measured"].median() * 100, cell["paper"].iloc[0] * 100, cell["expected"].iloc[0] * 100
        if abs(ours / paper - 1) > TOLERANCE:
            within = abs(ours - paper) <= 0.5          # the paper prints whole percents: +-0.5 pp
            rounding.append(within)
            gaps.append(f"R={r}, K={k}: paper {paper:.0f}%, ours {ours:.2f}%, closed form {closed:.2f}%"
                        + (" (within the paper's rounding, +-0.5 pp)" if within else " (beyond the paper's rounding)"))
    cause = ("" if not gaps else
             "\n\nCells more than 10% from the paper, with the closed form (uniform routing, E = "
             f"{frame['E'].iloc[0]}) computed in the same run: " + "; ".join(gaps) + ". "
             + f"{sum(rounding)} of these {len(gaps)} lie within the half percentage point the paper's whole percents "
               "leave open.")
    return f"[Table II figure and table]({Path(table2_md).name if table2_md else 'hiermoe_table2.md'})\n{body}{cause}"


def markdown_report(runs: Runs, t4: pd.DataFrame, fig9_md: str | None, table2: str, emu: Path | None) -> str:
    rows = paper_rows(runs, t4)
    first = runs.qwen3.groupby(["iteration", "layer"]).first()
    target = fit_target(runs.qwen3)
    out = ["# HierMoE: paper vs ours (sim tier)", "", NOTE + ".", "",
           "## What reproduces and what does not", "", *headline(runs, t4, rows), "",
           "Orderings the paper reports, on our runs:", "", *orderings(runs), "",
           "## Routing skew: the one fitted parameter", "",
           f"Routing skew is one explicit parameter of our token stream (`stream.skew`, "
           "`impl.experiments.hiermoe.workload`), recorded with every run. Its default was fitted to the paper's Qwen3 "
           f"HD2-MoE AlltoAll speedup ({fmt(target)}, Table IV's default column) on the skew sweep below: fitted "
           f"skew {runs.fitted_skew:g}"
           + (f" - at the sweep's bound: even uniform routing gives HD2-MoE more than {fmt(target)}, so that number is not "
              "reached and is left out of the comparison as the fitted one" if runs.fit_at_bound else "")
           + f". Our runs use skew {runs.qwen3['skew'].iloc[0]:g}: largest flat split {first['max_split_ratio'].median():.2f}x "
             f"the mean, MaxVio {first['maxvio'].median():.2f} (largest expert load over the mean, minus 1). "
             "Every other number is a prediction.", "",
           "![skew](hiermoe_skew.png)", "",
           _skew_table(runs.skew), "",
           "## Every paper number beside ours", "",
           "Speedups are medians over the measured iterations of the same routing. A range the paper states over both "
           "models is compared end to end: its low end with the lower of our two models, its high end with the "
           f"higher. Gaps above {100 * TOLERANCE:.0f}% carry the one-assumption ablations of their run (a variant "
           "name is its run's system; a modeling assumption is applied to both sides of the ratio). An ablation is "
           f"named as the cause of a gap only if it brings the number within {100 * TOLERANCE:.0f}% and also keeps "
           "within it every other number of the same setting (same run and metric) that it changes, printed or "
           "derived from two printed ones (for HierMoE over Megatron-LM beside HD-MoE over Megatron-LM: the swap "
           "gain, HierMoE over HD-MoE); otherwise the closest one is given and why it is not the cause.",
           "", _md_table(rows.drop(columns=["fitted", "key"])), "",
           "## Fig. 11: AlltoAll speedups", "", "![Fig. 11](hiermoe_fig11.png)", "",
           _speedup_table(runs, "a2a_ms"), "",
           "Tutel-2DH runs with Tutel's default capacity factor 1.0 (`capacity_factor` of Tutel's MoE layer, "
           "CAP_FACTOR 1.0 in microsoft/tutel `tutel/impls/moe_layer.py`): the paper states no setting, and with it "
           "every rank sends K x T rows padded per expert; tokens over the capacity are dropped (Megatron-LM is "
           "dropless). Dropless Tutel (capacity factor 0) and 1.25 are ablations in the runs.", "",
           "## Fig. 10: end-to-end speedups", "", "![Fig. 10](hiermoe_fig10.png)", "",
           _speedup_table(runs, "e2e_ms"), "", fig10_note(runs), "",
           "## Fig. 12: stability (the paper prints no numbers)", "", "![Fig. 12](hiermoe_fig12.png)", "",
           "First MoE layer of Qwen3 over the long ablation run (one layer, "
           f"{runs.ablation['iteration'].max() + 1} iterations), modeled AlltoAll ms per iteration:", "",
           fig12_numbers(runs.ablation), "",
           "## Fig. 13: hierarchy without and with dedup (the paper prints no numbers)", "",
           "![Fig. 13](hiermoe_fig13.png)", "", _fig13_table(runs), "",
           "## Table IV", "", "![Table IV](hiermoe_table4.png)", "",
           _md_table(t4[["system", "sweep", "setting", "paper", "ours", "ours_p5", "ours_p95"]]), "",
           *table4_profiles(runs), "",
           "## Ablations of Section V-E: HierMoE over HD-MoE", "", _ablation_table(runs), "",
           *(["## Why the swap gains less than the paper's: swaps accumulated on a routing that stays", "",
              runs.swap_gap_text[1], ""] if runs.swap_gap_text is not None else []),
           "## Expert swap: what it moves, when, and what it costs", "", swap_section(runs), "",
           "## Beyond the paper: a DeepEP-style dispatcher", "", deepep_section(runs), "",
           "## Table II and Fig. 9", "", table2, "",
           f"[Fig. 9: alpha-beta fits, paper vs this machine]({Path(fig9_md).name if fig9_md else 'hiermoe_fig9.md'})"
           + (f"\n\n{Path(fig9_md).read_text().split(chr(10), 2)[2]}" if fig9_md and Path(fig9_md).exists() else ""),
           "", "## Emulated-cluster validation", ""]
    if emu is None:
        out += ["(No emulated-cluster table was given: `--emu-md`, a `make emu` run's "
                "`emu_validation.md` or the committed reference.)"]
    elif emu.resolve() == EMU_REFERENCE:
        out += [f"No `make emu` run in this results folder; the committed reference "
                f"(`figures/reference/{EMU_REFERENCE.name}`, provenance in its header and in "
                "`figures/reference/README.md`) follows, demoted one heading level.", "",
                _demoted(EMU_REFERENCE.read_text())]
    else:
        out += [f"From `{emu}` (a `make emu` run), demoted one heading level.", "", _demoted(emu.read_text())]
    return "\n".join(out) + "\n"


# The emulated-cluster validation measured by `make emu` (about an hour, needs root): what the
# workflow includes when a results folder has no run of its own.
EMU_REFERENCE = Path(__file__).resolve().parent / "reference" / "emu_validation.md"


def _demoted(markdown: str) -> str:
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def _skew_table(sk: pd.DataFrame) -> str:
    """Speedups over Megatron-LM (median) per skew, one column per system, with the routing's balance."""
    wide = sk.pivot(index="skew", columns="system", values="median")
    bal = sk.drop_duplicates("skew").set_index("skew")[["max_split_ratio", "maxvio"]]
    return _md_table(bal.join(wide).reset_index())


def _speedup_table(runs: Runs, metric: str) -> str:
    rows = []
    for model in (DEEPSEEK, QWEN3):
        frame = runs.of(model)
        for s in (FIG11_SYSTEMS if metric == "a2a_ms" else FIG10_SYSTEMS):
            sp = speedup(frame, s, BASE, metric)
            rows.append({"model": MODEL_LABEL[model], "system": s, "ours (median)": sp["median"],
                         "ours p5-p95": f"{fmt(sp['p5'])}-{fmt(sp['p95'])}",
                         "over HD2-MoE": speedup(frame, s, "HD2-MoE", metric)["median"],
                         "over HD2-MoE-Smart": speedup(frame, s, "HD2-MoE-Smart", metric)["median"],
                         "over Tutel-2DH": speedup(frame, s, "Tutel-2DH", metric)["median"]})
    return _md_table(pd.DataFrame(rows))


def fig10_note(runs: Runs) -> str:
    """How the end-to-end step is modeled, from the runs' recorded compute profile."""
    profiles = sorted({str(p) for f in (runs.qwen3, runs.deepseek) for p in f["compute_profile"].unique()})
    return ("End to end is MODELED: AlltoAll plus compute with constants borrowed from the compute profile "
            + ", ".join(f"`{p}`" for p in profiles) + " (FSMoE's Testbed A, the same GPU class; the HierMoE paper "
            "gives none): GEMMs by its GEMM model, the attention core from " + ATTENTION_READING + ". The FSMoE "
            "digest's \"applied to an attention FLOP count, doubled for backward\" is read that way; the other "
            "reading (the entry is the backward time, the forward half of it) would count 1.5 x the entry instead of 3 x. Not "
            "modeled: the dense-gradient all-reduce and the optimizer step (the same for every system).")


def table4_profiles(runs: Runs) -> list[str]:
    """Which alpha-beta constants each Table IV column other than the main run's uses, from the
    profile's own source and notes."""
    main = str(runs.qwen3["profile"].iloc[0])
    out = []
    for (sweep, setting), frame in sorted(runs.table4.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        name, topology = str(frame["profile"].iloc[0]), str(frame["topology"].iloc[0])
        if name == main:
            continue
        profile = run_profile(name.split("@")[0], get_topology(topology))
        rekeyed = [line for line in profile.notes.splitlines() if line.startswith("Re-keyed to")]
        why = rekeyed[-1] if rekeyed else " ".join(profile.source.split())
        out.append(f"* {sweep} = {setting} (topology `{topology}`): profile `{profile.name}`. {why}")
    return (["Columns that do not run on the main run's constants (`" + main + "`):", "", *out] if out else [])


def _fig13_table(runs: Runs) -> str:
    rows = []
    for label, frame in (("4 nodes (G = 32, D = 4)", runs.qwen3), ("1 node (G = 8, D = 3)", runs.node)):
        per = _summary(frame).groupby("system", sort=False)["a2a_ms"].median()
        rows.append({"setting": label, **{s: per[s] for s in fixed_dims(per.index) + ["HD-MoE", "DeepEP"]
                                          if s in per.index}})
    return _md_table(pd.DataFrame(rows).astype(object).fillna("-"))


def _ablation_table(runs: Runs) -> str:
    paper, _ = read_paper_csv("hiermoe_ablation")
    rows = []
    for frame in (runs.ablation, runs.gamma):
        systems = sorted({s for s in frame["system"] if s.startswith("HierMoE")},
                         key=lambda s: (options_of(s).split("=")[0], float(re.sub(r"[^0-9.]", "", options_of(s)) or 0), s))
        for s in systems:
            if frame is runs.gamma and s == "HierMoE":
                continue
            opt = options_of(s) or "default (smooth-max, gamma 10, every 1)"
            key, _, value = opt.partition("=")
            p = paper[(paper["ablation"] == key) & (paper["setting"].astype(str) == value)]
            if key == "gamma":
                p = paper[paper["ablation"] == "gamma"]
            if not options_of(s):
                p = paper[(paper["ablation"] == "max_fn") & (paper["setting"] == "smooth")]
            ours = speedup(frame, s, "HD-MoE")
            rows.append({"variant": opt, "paper": "-".join(f"{v:.2f}" for v in sorted(set(p["value"]))) if len(p)
                         else "n/a", "ours (fitted routing)": ours["median"],
                         "p5-p95": f"{fmt(ours['p5'], 3)}-{fmt(ours['p95'], 3)}",
                         "ours (persistent skew)": speedup(runs.persistent, s, "HD-MoE")["median"],
                         "run (variant of `ablation`)": "gamma" if frame is runs.gamma else "fitted"})
    return _md_table(pd.DataFrame(rows), 3)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m figures.hiermoe_sim", description=cli.describe(__doc__))
    parser.add_argument("--qwen3", type=cli.input_file, required=True)
    parser.add_argument("--deepseek", type=cli.input_file, required=True)
    parser.add_argument("--node", type=cli.input_file, required=True, help="one-node run (Fig. 13 right)")
    parser.add_argument("--deepseek-ablation", type=cli.input_file, required=True,
                        help="DeepSeek-V3 settings changed one per variant (ungrouped, dense0) beside the same run "
                             "with the model as configured (defaults)")
    parser.add_argument("--table4", type=cli.input_file, required=True, help="Table IV run (one variant per column)")
    parser.add_argument("--ablation", type=cli.input_file, required=True,
                        help="Section V-E ablation run (variants fitted, gamma)")
    parser.add_argument("--ablation-persistent", type=cli.input_file, required=True,
                        help="the same on a persistent skew (variant persistent)")
    parser.add_argument("--ablation-long", type=cli.input_file, required=True,
                        help="HD-MoE and HierMoE over a long run (variant fitted)")
    parser.add_argument("--ablation-long-persistent", type=cli.input_file, required=True,
                        help="the same on a persistent skew (variant persistent)")
    parser.add_argument("--skew", type=cli.input_file, required=True, help="skew-sweep run (one variant per skew)")
    parser.add_argument("--swap", type=cli.input_file, required=True,
                        help="swap measurement CSV (impl.experiments.hiermoe.swap_measure)")
    parser.add_argument("--swap-gap", type=cli.input_file, required=True, nargs="+",
                        help="swap-gap sweep CSVs (impl.experiments.hiermoe.swap_gap), one per model and routing")
    parser.add_argument("--table2-csv", type=cli.input_file, help="Table II run CSV (its cells go into the report)")
    parser.add_argument("--table2-md", type=cli.input_file, help="Table II markdown (linked)")
    parser.add_argument("--fig9-md", type=cli.input_file, help="Fig. 9 markdown (linked and included)")
    parser.add_argument("--emu-md", type=cli.input_file,
                        help="emulated-cluster table to include (a `make emu` run's emu_validation.md, or "
                             "figures/reference/emu_validation.md)")
    parser.add_argument("--out-dir", required=True, type=cli.output_dir)
    args = parser.parse_args(argv)
    try:
        q3, ds, node = read_run(args.qwen3), read_run(args.deepseek), read_run(args.node)
        sweeps = list(variants_of(read_run(args.table4), args.table4).values())
        parts = variants_of(read_run(args.ablation), args.ablation, ("fitted", "gamma"))
        ablation, gamma = parts["fitted"], parts["gamma"]
        persistent = variants_of(read_run(args.ablation_persistent), args.ablation_persistent, ("persistent",))["persistent"]
        long_runs = {"fitted": variants_of(read_run(args.ablation_long), args.ablation_long, ("fitted",))["fitted"],
                     "persistent": variants_of(read_run(args.ablation_long_persistent), args.ablation_long_persistent,
                                               ("persistent",))["persistent"]}
        skews = list(variants_of(read_run(args.skew), args.skew).values())
        ds_ablation = variants_of(read_run(args.deepseek_ablation), args.deepseek_ablation,
                                  ("defaults", "ungrouped", "dense0"))
        swap = read_results(args.swap, ("pair", "measured_ms", "transport_ms", "modeled_ms", "bytes_per_expert",
                                        "bytes_per_expert_model", "topology", "model", "profile_path"),
                            "impl.experiments.hiermoe.swap_measure")
        swap_gap = read_swap_gaps(args.swap_gap)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    style.set_style()
    models = {DEEPSEEK: ds, QWEN3: q3}
    t4, t4_frames = table4_frame(q3, sweeps)
    sk = skew_frame(skews)
    target = fit_target(q3)
    fitted, at_bound = fit_skew(sk, target)
    runs = Runs(q3, ds, node, t4_frames, ablation, persistent, gamma, sk, fitted, at_bound, swap,
                {float(f["skew"].iloc[0]): f for f in skews}, ds_ablation, swap_gap, long_runs)
    for name, fig, source in (("fig10", plot_fig10(models), f"{args.deepseek}, {args.qwen3}"),
                              ("fig11", plot_fig11(models), f"{args.deepseek}, {args.qwen3}"),
                              ("fig12", plot_fig12(ablation), args.ablation),
                              ("fig13", plot_fig13({"4 nodes (G = 32, D = 4)": q3, "1 node (G = 8, D = 3)": node}),
                               f"{args.qwen3}, {args.node}"),
                              ("table4", plot_table4(t4), f"{args.qwen3}, {args.table4}"),
                              ("skew", plot_skew(sk, fitted, target), args.skew)):
        style.save(fig, out / f"hiermoe_{name}", source=source)
        plt.close(fig)
    table2 = table2_section(args.table2_csv, args.table2_md)
    atomic_write_text(out / "hiermoe_report.md", markdown_report(runs, t4, args.fig9_md, table2,
                                                                 Path(args.emu_md) if args.emu_md else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
