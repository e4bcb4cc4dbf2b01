"""HierMoE Fig. 9: alpha-beta models of the AlltoAll kinds. Left, the paper's seven fitted lines
(its 32-GPU A6000 testbed; the paper publishes the fits, not the points). Right, our own
calibration of the current machine (`python -m impl.common.calibrate`): measured medians with
min-max bars and the least-squares lines, with r^2. Also a markdown table of both fits.

    python -m figures.hiermoe_fig9 --profile resources/calibration/2x2-gloo.yaml \
        --out results/figures/hiermoe_fig9 --out-md results/figures/hiermoe_fig9.md

The two panels are different hardware: they are not expected to agree, only to be linear.
"""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from figures import style  # noqa: E402
from impl.common import cli  # noqa: E402
from impl.common.paper import read_paper_csv  # noqa: E402
from impl.common.records import atomic_write_text  # noqa: E402

__all__ = ["paper_fits", "calibrated_fits", "plot_fig9", "markdown_fig9", "main"]

STEP_ORDER = ("flat", "inter-1", "intra-1", "inter-2", "intra-2", "inter-3", "intra-3")


def paper_fits() -> tuple[pd.DataFrame, dict]:
    table, header = read_paper_csv("hiermoe_fig9")
    wide = table.pivot_table(index=["step", "kind"], columns="parameter", values="value").reset_index()
    return wide.sort_values("step", key=lambda s: s.map(STEP_ORDER.index)), header


def calibrated_fits(profile_path: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(fits, points, profile) of the a2a kinds of a calibrated profile YAML."""
    with open(profile_path) as f:
        profile = yaml.safe_load(f)
    comm = profile.get("comm", {}).get("a2a", {})
    measurements = profile.get("measurements", {})
    if not comm or not measurements:
        raise ValueError(f"{profile_path}: not a calibrated profile (needs comm.a2a and measurements); "
                         "write one with `python -m impl.common.calibrate`")
    fits = pd.DataFrame([{"step": step, **{k: fit[k] for k in ("alpha", "beta", "r2")}}
                         for step, fit in comm.items()])
    points = []
    for key, m in measurements.items():
        kind, _, step = key.partition("/")
        if kind != "a2a":
            continue
        for n, med, lo, hi in zip(m["nbytes"], m["median_ms"], m["min_ms"], m["max_ms"]):
            points.append({"step": step, "nbytes": n, "median_ms": med, "min_ms": lo, "max_ms": hi})
    return fits, pd.DataFrame(points), profile


POOR_FIT_R2 = 0.95   # a fit below this r^2 is drawn dashed and flagged (figure and table)


def plot_fig9(paper: pd.DataFrame, fits: pd.DataFrame, points: pd.DataFrame, profile: dict):
    """Left, log-log: the seven paper lines span three orders of magnitude in time, and the fast
    intra-node kinds would sit on top of each other near zero on linear axes. Right, linear: our
    sweep covers one decade."""
    style.set_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(style.PAGE_WIDTH, 3.2))
    colors = dict(zip(STEP_ORDER, plt.get_cmap("tab10").colors))
    sizes = np.logspace(np.log10(64 * 2**10), np.log10(256 * 2**20), 60)
    for row in paper.itertuples():
        left.plot(sizes / 2**20, row.alpha + row.beta * sizes, color=colors[row.step],
                  label=f"{row.step} (r²={row.r2:.4f})")
    left.set(title="paper: 32 x RTX A6000 testbed (fits only)", xlabel="per-rank buffer (MiB)",
             ylabel="time (ms)", xscale="log", yscale="log")
    left.legend(fontsize=6, frameon=False)
    poor = []
    for fit in fits.itertuples():
        pts = points[points["step"] == fit.step]
        c = colors.get(fit.step, "black")
        right.errorbar(pts["nbytes"] / 2**20, pts["median_ms"],
                       yerr=[pts["median_ms"] - pts["min_ms"], pts["max_ms"] - pts["median_ms"]],
                       fmt="o", ms=3, color=c, capsize=2, lw=0.8)
        xs = np.linspace(0, pts["nbytes"].max(), 40)
        bad = fit.r2 < POOR_FIT_R2
        poor += [fit.step] if bad else []
        right.plot(xs / 2**20, fit.alpha + fit.beta * xs, color=c, ls="--" if bad else "-",
                   label=f"{fit.step} (r²={fit.r2:.3f}{', POOR FIT' if bad else ''})")
    prov = profile.get("provenance", {})
    right.set(title=f"ours: {profile.get('topology')} over {prov.get('backend', '?')} on {prov.get('host', '?')} "
                    "(tier emu)", xlabel="per-rank buffer (MiB)", ylabel="time (ms)", ylim=(0, None))
    right.legend(fontsize=6, frameon=False, loc="lower right")
    if poor:
        right.text(0.02, 0.98, f"warning: r² < {POOR_FIT_R2} for {', '.join(poor)}\n(dashed: the line is a poor "
                   "model of the points)", transform=right.transAxes, fontsize=6, va="top", color="firebrick")
    fig.suptitle("HierMoE Fig. 9: alpha-beta models of AlltoAll (markers: measured median, min-max; "
                 "lines: least-squares fit)", fontsize=8)
    fig.tight_layout()
    return fig


def markdown_fig9(paper: pd.DataFrame, header: dict, fits: pd.DataFrame, profile: dict, source: str) -> str:
    prov = profile.get("provenance", {})
    lines = ["# HierMoE Fig. 9: alpha-beta fits, paper vs ours", "",
             f"Paper: {header['citation']} {header['location']}; {header['setup']}.", "",
             f"Ours: tier emu, calibrated by `{prov.get('command', '?')}` on host {prov.get('host', '?')} "
             f"({prov.get('platform', '?')}), torch {prov.get('torch', '?')}, backend {prov.get('backend', '?')}, "
             f"{prov.get('world_size', '?')} ranks, {prov.get('date', '?')}; read from `{source}`.", "",
             "Different hardware: the values are not expected to agree. What carries over is the form "
             "t = alpha + beta * n; its r² is the check.", "",
             "| step | paper alpha (ms) | paper beta (ms/B) | paper r² | ours alpha (ms) | ours beta (ms/B) | ours r² |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    ours = {row.step: row for row in fits.itertuples()}
    for row in paper.itertuples():
        o = ours.get(row.step)
        cells = (f"{o.alpha:.3g} | {o.beta:.3g} | {o.r2:.4f}" if o else "n/a | n/a | n/a")
        lines.append(f"| {row.step} | {row.alpha:.3g} | {row.beta:.3g} | {row.r2:.6f} | {cells} |")
    for step, o in ours.items():
        if step not in set(paper["step"]):
            lines.append(f"| {step} | n/a | n/a | n/a | {o.alpha:.3g} | {o.beta:.3g} | {o.r2:.4f} |")
    poor = [f"{step} (r² = {o.r2:.3f})" for step, o in ours.items() if o.r2 < POOR_FIT_R2]
    if poor:
        lines += ["", f"**Warning:** our fits of {', '.join(poor)} have r² below {POOR_FIT_R2}: on this machine a "
                      "straight line is a poor model of those points (a busy or oversubscribed host); treat their "
                      "alpha and beta as rough."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m figures.hiermoe_fig9", description=cli.describe(__doc__))
    parser.add_argument("--profile", required=True, type=cli.input_file, help="calibrated profile YAML (impl.common.calibrate)")
    parser.add_argument("--out", required=True, type=cli.output_path, help="figure path without suffix (PDF and PNG are written)")
    parser.add_argument("--out-md", required=True, type=cli.output_path)
    args = parser.parse_args(argv)
    try:
        paper, header = paper_fits()
        fits, points, profile = calibrated_fits(args.profile)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    fig = plot_fig9(paper, fits, points, profile)
    style.save(fig, args.out, source=args.profile)
    atomic_write_text(args.out_md, markdown_fig9(paper, header, fits, profile, args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
