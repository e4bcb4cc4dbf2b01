"""HierMoE Table II as a figure and as a markdown table: token duplication rate per number of
expert groups R and top-K; our measured rate (median over repeats, p5-p95 whiskers) beside the
closed form under uniform routing and the paper's value.

    python -m figures.hiermoe_table2 --csv results/hiermoe_table2/table2.csv \
        --out-pdf results/figures/hiermoe_table2.pdf --out-png results/figures/hiermoe_table2.png \
        --out-md results/figures/hiermoe_table2.md

Input is the tidy CSV of `impl.experiments.hiermoe.table2` (rates as fractions); nothing is computed here
beyond the median and percentiles of the repeats.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from figures import style
from figures.inputs import read_results
from impl.common import cli
from impl.common.paper import read_paper_csv
from impl.common.records import atomic_write_text, summarize

__all__ = ["REQUIRED_COLUMNS", "read_table2_csv", "plot_table2", "markdown_table2", "main"]

REQUIRED_COLUMNS = ("tier", "distribution", "E", "K", "R", "tokens", "repeat", "measured",
                    "expected", "paper", "paper_source")
OURS = "ours (measured)"
MODEL = "closed form (uniform)"
PAPER = "paper"
SERIES = (OURS, MODEL, PAPER)


def read_table2_csv(path: str | Path) -> pd.DataFrame:
    return read_results(path, REQUIRED_COLUMNS, "impl.experiments.hiermoe.table2")


def _setting(frame: pd.DataFrame) -> str:
    """One-line description of what was measured, from the CSV itself."""
    first = frame.iloc[0]
    return (f"tier: {first['tier']} (measured from routing masks, no communication); "
            f"E={first['E']}, {first['distribution']} top-K routing, {first['tokens']} tokens x "
            f"{frame['repeat'].nunique()} repeats")


def _long_form(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per bar sample: every repeat of ours, one row per cell for the references."""
    cells = frame.drop_duplicates(["R", "K"])
    parts = [
        frame.assign(series=OURS, rate_pct=frame["measured"] * 100),
        cells.assign(series=MODEL, rate_pct=cells["expected"] * 100),
        cells.dropna(subset=["paper"]).assign(series=PAPER, rate_pct=lambda c: c["paper"] * 100),
    ]
    return pd.concat(parts, ignore_index=True)[["R", "K", "series", "rate_pct"]]


def plot_table2(frame: pd.DataFrame):
    """One panel per R (coarsest grouping last, as in the paper's rows), bars per K."""
    style.set_style()
    long = _long_form(frame)
    group_counts = list(dict.fromkeys(frame["R"]))
    top_ks = sorted(frame["K"].unique())
    styles = {OURS: style.style_for("HierMoE"), MODEL: style.style_for("model"),
              PAPER: style.style_for("paper")}
    fig, axes = plt.subplots(1, len(group_counts), figsize=(style.PAGE_WIDTH, 2.9), squeeze=False)
    for ax, r in zip(axes[0], group_counts):
        sns.barplot(data=long[long["R"] == r], x="K", y="rate_pct", hue="series", order=top_ks,
                    hue_order=list(SERIES),
                    palette={name: st.color for name, st in styles.items()}, saturation=1.0, estimator="median", errorbar=("pi", 90),
                    capsize=0.15, err_kws={"linewidth": 0.8}, edgecolor="black", linewidth=0.5, ax=ax)
        style.apply_hatches(ax, styles)
        ax.set_title(f"R = {r} groups")
        ax.set_xlabel("top-K")
        ax.set_ylabel("duplication rate (%)" if ax is axes[0][0] else "")
        handles, labels = ax.get_legend_handles_labels()
        ax.get_legend().remove()
    fig.suptitle(f"HierMoE Table II, token duplication rate\n{_setting(frame)}", fontsize=8, y=0.99)
    legend = fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.89),
                        ncol=len(SERIES), frameon=False)
    style.hatch_legend(legend, styles)
    fig.tight_layout(rect=(0, 0, 1, 0.83))
    return fig


def markdown_table2(frame: pd.DataFrame, source: str = "") -> str:
    """Paper vs ours per cell, with differences in percentage points."""
    paper_name = frame["paper_source"].iloc[0]
    _, header = read_paper_csv(paper_name)
    lines = [
        "# HierMoE Table II: token duplication rate, paper vs ours",
        "",
        f"Ours: {_setting(frame)}. Rates in percent; ours is the median over repeats with the "
        "p5-p95 range; the closed form assumes uniform top-K routing without replacement; "
        "differences in percentage points (pp).",
        "",
        f"Paper: {header['citation']} {header['location']}; values: {header.get('precision', 'as printed')}.",
        "",
    ]
    if source:
        lines += [f"Drawn from `{source}`.", ""]
    lines += ["| R | K | paper (%) | ours (%) | ours p5-p95 (%) | closed form (%) | ours - paper (pp) "
              "| closed form - paper (pp) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    diffs = []
    for (r, k), cell in frame.groupby(["R", "K"], sort=False):
        ours = summarize(cell["measured"] * 100)
        expected = float(cell["expected"].iloc[0]) * 100
        paper = cell["paper"].iloc[0] * 100
        if pd.notna(paper):
            diffs.append(ours["median"] - paper)
            paper_cells = [f"{paper:.0f}", f"{ours['median'] - paper:+.2f}", f"{expected - paper:+.2f}"]
        else:
            paper_cells = ["n/a", "n/a", "n/a"]
        lines.append(f"| {r} | {k} | {paper_cells[0]} | {ours['median']:.2f} | "
                     f"{ours['p5']:.2f}-{ours['p95']:.2f} | {expected:.2f} | {paper_cells[1]} | {paper_cells[2]} |")
    if diffs:
        worst = max(diffs, key=abs)
        lines += ["", f"Largest difference from the paper: {worst:+.2f} pp; mean absolute difference "
                      f"{sum(abs(d) for d in diffs) / len(diffs):.2f} pp over {len(diffs)} cells."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m figures.hiermoe_table2", description=cli.describe(__doc__))
    parser.add_argument("--csv", required=True, type=cli.input_file, help="tidy CSV written by impl.experiments.hiermoe.table2")
    parser.add_argument("--out-pdf", required=True, type=cli.output_path)
    parser.add_argument("--out-png", required=True, type=cli.output_path)
    parser.add_argument("--out-md", required=True, type=cli.output_path, help="markdown table, paper vs ours")
    args = parser.parse_args(argv)
    pdf, png = Path(args.out_pdf), Path(args.out_png)
    if pdf.suffix != ".pdf" or png.suffix != ".png" or pdf.with_suffix("") != png.with_suffix(""):
        print(f"{parser.prog}: error: --out-pdf and --out-png must be X.pdf and X.png with the same X, "
              f"got {args.out_pdf!r} and {args.out_png!r}", file=sys.stderr)
        return 2
    try:
        frame = read_table2_csv(args.csv)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    fig = plot_table2(frame)
    style.save(fig, pdf, source=args.csv)
    plt.close(fig)
    atomic_write_text(args.out_md, markdown_table2(frame, source=args.csv))
    print(f"hiermoe_table2 figure -> {pdf}, {png}; table -> {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
