"""Beyond the paper: AlltoAll speedups over Megatron-LM from 32 to 1,024 GPUs for D = 2..4 (one
panel per depth), from `impl.experiments.hiermoe.scaleout`, and a markdown table of the
crossovers (where one system overtakes another).

    python -m figures.hiermoe_scaleout --csv scaleout.csv --out results/figures/hiermoe_scaleout \
        --out-md results/figures/hiermoe_scaleout.md
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from figures import style  # noqa: E402
from figures.inputs import read_results  # noqa: E402
from impl.common import cli  # noqa: E402
from impl.common.records import atomic_write_text  # noqa: E402
from impl.experiments.hiermoe.scaleout import crossovers  # noqa: E402

__all__ = ["plot_scaleout", "markdown_scaleout", "main"]


def _style(system: str):
    """The system's fixed style; the ablation routes without one (H2) take the reference grey."""
    name = system.split("[")[0]
    return style.style_for(name if name in style.SYSTEM_STYLES else "model")


def plot_scaleout(frame: pd.DataFrame):
    depths = sorted(frame["D"].unique())
    fig, axes = plt.subplots(1, len(depths), figsize=(style.PAGE_WIDTH, 3.0), sharey=True)
    for ax, D in zip(np.atleast_1d(axes), depths):
        part = frame[frame["D"] == D]
        for system, g in part.groupby("system", sort=False):
            if system == "Megatron-LM":
                continue
            q = g.groupby("G")["speedup"]
            med, lo, hi = q.median(), q.quantile(0.05), q.quantile(0.95)
            ax.errorbar(med.index, med, yerr=[med - lo, hi - med], marker="o", ms=3, capsize=2, lw=1,
                        color=_style(system).color, ls="--" if "[" in system else "-", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(part["G"].unique()), [str(g) for g in sorted(part["G"].unique())], fontsize=7)
        ax.set(title=f"D = {D}", xlabel="GPUs (8 per node)")
        style.baseline_line(ax)
    np.atleast_1d(axes)[0].set_ylabel("AlltoAll speedup over Megatron-LM")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=7, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("Scale-out (beyond the paper; tier sim, MODELED with the testbed's constants EXTRAPOLATED to more "
                 "nodes; uniform routing)", fontsize=7, y=1.0, va="bottom")
    return fig


def markdown_scaleout(frame: pd.DataFrame, source: str) -> str:
    med = frame.groupby(["D", "G", "system"])["speedup"].median().unstack("system").reset_index()
    dims = frame[frame["system"] == "HD-MoE"].groupby(["D", "G"])["dim"].agg(lambda s: s.mode().iloc[0])
    med["d* of HD-MoE"] = [int(dims[(r.D, r.G)]) for r in med.itertuples()]
    cross = crossovers(frame)
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731

    def table(df):
        lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
        lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
        return "\n".join(lines)

    return "\n".join([
        "# HierMoE beyond the paper: scale-out", "",
        f"Tier sim, times MODELED with the HierMoE testbed's alpha-beta constants EXTRAPOLATED to more nodes "
        f"(`impl.experiments.hiermoe.scaleout`); uniform routing, E = {int(frame['E'].iloc[0] / frame['G'].iloc[0])} "
        f"experts per GPU, K = {int(frame['K'].iloc[0])}, {frame['seed'].nunique()} routing samples per point; "
        f"drawn from `{source}`.", "",
        "![scale-out](hiermoe_scaleout.png)", "",
        "AlltoAll speedup over Megatron-LM (median over samples):", "", table(med), "",
        "Crossovers: time of `than` over time of `faster` at every G (above 1: `faster` is faster), and where the "
        "order changes:", "", table(cross), ""])


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m figures.hiermoe_scaleout", description=cli.describe(__doc__))
    parser.add_argument("--csv", required=True, type=cli.input_file)
    parser.add_argument("--out", required=True, type=cli.output_path, help="figure path without suffix (PDF and PNG)")
    parser.add_argument("--out-md", required=True, type=cli.output_path)
    args = parser.parse_args(argv)
    try:
        frame = read_results(args.csv, ("G", "D", "system", "speedup", "a2a_ms"), "impl.experiments.hiermoe.scaleout")
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    style.set_style()
    fig = plot_scaleout(frame)
    style.save(fig, args.out, source=args.csv)
    atomic_write_text(args.out_md, markdown_scaleout(frame, args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
