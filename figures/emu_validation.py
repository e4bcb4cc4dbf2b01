"""Model against measurement on the emulated cluster: for every variant, topology and routing the
measured dispatch and combine (median of the repeats, p5-p95 bars) beside the cost model's
prediction from the emulated cluster's own calibration, and a markdown table with the error of
every prediction, the misses over 25 % flagged, and the measured speedup of every variant over
flat (the HierMoE-vs-flat ratio among them).

    python -m figures.emu_validation --csv results/raw/emu_validation/emu_validation.csv \
        --out results/figures/emu_validation.pdf --out-md results/figures/emu_validation.md

Everything is read from the CSV (`python -m impl.experiments.emu_validation table`), which also
carries its provenance (tier emu, network, host, date, versions, the model's version).
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

__all__ = ["TOLERANCE", "load", "ratios", "plot", "markdown", "main"]

TOLERANCE = 0.25   # a prediction further off than this needs a measured cause
STAGES = ("dispatch", "combine")


def load(path: str) -> pd.DataFrame:
    return read_results(path, ("topology", "routing", "variant", "system", "stage", "measured_ms", "predicted_ms",
                               "error", "busiest_link_ms", "busiest_link_error"),
                        "`python -m impl.experiments.emu_validation table`", comment="#")


def ratios(frame: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per topology and routing: baseline (dispatch + combine) over each variant's, measured and
    predicted (a speedup over the baseline: > 1 is faster)."""
    total = frame.groupby(["topology", "routing", "variant", "system"], sort=False)[["measured_ms", "predicted_ms"]].sum()
    rows = []
    for (topology, routing), cell in total.groupby(level=["topology", "routing"], sort=False):
        cell = cell.droplevel(["topology", "routing"])
        if baseline not in cell.index.get_level_values("variant"):
            raise ValueError(f"baseline {baseline!r} has no run on {topology} / {routing}")
        base = cell.xs(baseline, level="variant").iloc[0]
        for (variant, system), v in cell.iterrows():
            rows.append({"topology": topology, "routing": routing, "variant": variant, "system": system,
                         "measured_speedup": base.measured_ms / v.measured_ms,
                         "predicted_speedup": base.predicted_ms / v.predicted_ms})
    return pd.DataFrame(rows)


def _style(system: str):
    try:
        return style.style_for(system)
    except ValueError:
        return style.style_for("model")


def plot(frame: pd.DataFrame):
    """One panel per (topology, routing): per variant, measured dispatch and combine bars (p5-p95)
    with the predictions as black markers."""
    style.set_style()
    cells = list(frame.groupby(["topology", "routing"], sort=False).groups)
    cols = len({t for t, _ in cells})
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(style.PAGE_WIDTH, 2.3 * rows), squeeze=False, sharey=False)
    for ax, (topology, routing) in zip(axes.T.flat, sorted(cells)):
        cell = frame[(frame.topology == topology) & (frame.routing == routing)]
        systems = list(dict.fromkeys(cell.system))
        width = 0.38
        for i, stage in enumerate(STAGES):
            part = cell[cell.stage == stage].set_index("system").loc[systems]
            x = np.arange(len(systems)) + (i - 0.5) * width
            for xi, (system, r) in zip(x, part.iterrows()):
                st = _style(system)
                ax.bar(xi, r.measured_ms / 1e3, width, color=st.color, hatch=st.hatch, alpha=1.0 if i == 0 else 0.55,
                       edgecolor="black", linewidth=0.4)
                ax.errorbar(xi, r.measured_ms / 1e3, yerr=[[(r.measured_ms - r.measured_p5_ms) / 1e3],
                                                             [(r.measured_p95_ms - r.measured_ms) / 1e3]],
                            color="black", lw=0.6, capsize=1.5)
            ax.scatter(x, part.predicted_ms / 1e3, marker="_" if i == 0 else "x", color="black", s=40, zorder=3,
                       label=f"predicted {stage}")
        ax.set_xticks(np.arange(len(systems)), systems, rotation=30, ha="right", fontsize=6)
        ax.set_title(f"{topology} emulated, {routing} routing", fontsize=7)
        ax.set_ylabel("seconds (dispatch | combine)", fontsize=6)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=5, loc="upper right")
    fig.suptitle("Emulated cluster: measured (bars, left dispatch, right combine) vs modeled (markers)", fontsize=8)
    fig.tight_layout()
    return fig


def _span(values) -> str:
    lo, hi = int(min(values)), int(max(values))
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _ms(v: float) -> str:
    return f"{v / 1e3:.2f} s" if v >= 1e3 else f"{v:.0f} ms"


def markdown(frame: pd.DataFrame, baseline: str) -> str:
    first = frame.iloc[0]
    lines = ["# Emulated cluster: model against measurement", "",
             f"Tier emu: network namespaces, each node's link shaped with tc tbf to {first.rate} both ways "
             f"({first.network}); host {first.host}, {first.date}, torch {first.torch}, git {str(first.git_sha)[:10]}. "
             f"Measured: per row the median of {_span(frame.repeats)} repeats pooled from {_span(frame.runs)} "
             "independent runs (bench processes), each repeat the slowest rank's time (p5-p95 in brackets); "
             f"host load (1-min average) {frame.load_1m_min.min():.1f}-{frame.load_1m_max.max():.1f} on "
             f"{int(first.cpus)} cores shared with other work. Predicted: " + f"{first.model} (last changed {first.model_commit}) "
             f"with the emulated cluster's own calibration ({', '.join(sorted(set(frame.profile)))}). "
             f"Error = predicted / measured - 1; **bold** where it exceeds {TOLERANCE:.0%}.", ""]
    lines += ["Busiest link: a diagnostic beside the model, the same calibration with the node-crossing step "
              "charged by the bytes of the busiest node link instead of the padded buffer (fan x largest split); "
              "where it is close and the model is not, the padding is what the model gets wrong.", "",
              "| topology | routing | system | stage | measured | predicted | error | route (model) | busiest link (error) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in frame.itertuples():
        err = f"{r.error:+.0%}"
        err = f"**{err}**" if abs(r.error) > TOLERANCE else err
        lines.append(f"| {r.topology} | {r.routing} | {r.system} | {r.stage} | {_ms(r.measured_ms)} "
                     f"[{_ms(r.measured_p5_ms)}-{_ms(r.measured_p95_ms)}] | {_ms(r.predicted_ms)} | {err} | {r.route} "
                     f"| {_ms(r.busiest_link_ms)} ({r.busiest_link_error:+.0%}) |")
    speed = ratios(frame, baseline)
    base_name = frame[frame.variant == baseline].system.iloc[0]
    lines += ["", f"## Speedup over {base_name} (dispatch + combine)", "",
              f"{base_name} time / variant time; > 1 is faster than {base_name}.", "",
              "| topology | routing | system | measured | predicted |", "| --- | --- | --- | --- | --- |"]
    for r in speed.itertuples():
        lines.append(f"| {r.topology} | {r.routing} | {r.system} | {r.measured_speedup:.2f}x | {r.predicted_speedup:.2f}x |")
    swaps = frame[frame.swap_ms.notna()].drop_duplicates(["topology", "routing", "variant"]) \
        if "swap_ms" in frame else frame.iloc[0:0]
    if len(swaps):
        lines += ["", "Expert swap (planning every step, then moving the chosen experts with their state), measured "
                  "apart from dispatch and combine:", "",
                  "| topology | routing | system | swap per step |", "| --- | --- | --- | --- |"]
        lines += [f"| {r.topology} | {r.routing} | {r.system} | {_ms(r.swap_ms)} |" for r in swaps.itertuples()]
    misses = frame[frame.error.abs() > TOLERANCE]
    lines += ["", f"## Misses over {TOLERANCE:.0%}", "",
              f"{len(misses)} of {len(frame)} predictions miss by more than {TOLERANCE:.0%}."]
    same = (frame.cross_node_bytes_modeled - frame.cross_node_bytes_measured).abs() <= 1e-6 * frame.cross_node_bytes_measured
    lines += ["", "Bytes across nodes per stage, from the runs' exact routing, equal the traffic counters' in "
              f"{int(same.sum())} of {len(frame)} rows" + (" (all)." if same.all() else ".")]
    for r in misses.itertuples():
        lines.append("")
        lines.append(f"* {r.topology} {r.routing} {r.system} {r.stage}: measured {_ms(r.measured_ms)}, predicted "
                     f"{_ms(r.predicted_ms)} ({r.error:+.0%}). " + _cause(r))
    return "\n".join(lines) + "\n"


def _cause(r) -> str:
    """What the diagnostics of one miss say (all from the CSV)."""
    mb = lambda b: f"{b / 1e6:.0f} MB"  # noqa: E731
    if abs(r.busiest_link_error) <= TOLERANCE and r.padded_link_bytes > r.busiest_link_bytes:
        return (f"Cause: the model pads every split to the largest one (Eqs. 2-5): it charges {mb(r.padded_link_bytes)} "
                f"on every node link, while the busiest node link carried {mb(r.busiest_link_bytes)} (of "
                f"{mb(r.cross_node_bytes_measured)} across nodes, traffic counters); gloo sends the uneven splits as "
                f"they are and the time follows the busiest link: charged by it, the same calibration predicts "
                f"{_ms(r.busiest_link_ms)} ({r.busiest_link_error:+.0%}).")
    text = (f"Not the link volume: the busiest-link estimate is {_ms(r.busiest_link_ms)} ({r.busiest_link_error:+.0%}) "
            f"and the node links carried what the model charges ({mb(r.busiest_link_bytes)} on the busiest).")
    measured, model = _parse_steps(getattr(r, "measured_steps_ms", "")), _parse_steps(getattr(r, "model_steps_ms", ""))
    if measured and model:
        outside = r.measured_ms - sum(measured.values())
        parts = ", ".join(f"{step} {_ms(measured[step])} (model {_ms(model.get(step, 0.0))})" for step in sorted(measured))
        worst = max(measured, key=lambda step: measured[step] - model.get(step, 0.0))
        excess = measured[worst] - model.get(worst, 0.0)
        text += (f" Measured per step (median time in the step's AlltoAlls, metadata included): {parts}; outside "
                 f"the AlltoAlls {_ms(outside)}. The largest excess over the model is {worst} (+{_ms(excess)})")
        text += (", the step among the ranks of a node (over `lo`, on the CPUs shared by all ranks and other work: "
                 f"host load {r.load_1m_min:.1f}-{r.load_1m_max:.1f})." if worst.startswith("intra") else ".")
    else:
        text += f" No per-step times in these runs (host load {r.load_1m_min:.1f}-{r.load_1m_max:.1f})."
    return text


def _parse_steps(text) -> dict[str, float]:
    """'inter-1=1830;intra-1=460' -> {'inter-1': 1830.0, 'intra-1': 460.0}."""
    if not isinstance(text, str) or not text:
        return {}
    return {k: float(v) for k, v in (item.split("=") for item in text.split(";"))}


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m figures.emu_validation", description=cli.describe(__doc__))
    p.add_argument("--csv", required=True, type=cli.input_file, help="impl.experiments.emu_validation table output")
    p.add_argument("--baseline", default="flat", help="variant the speedups divide by")
    p.add_argument("--out", required=True, type=cli.output_path, help="figure path (PDF and PNG are written beside each other)")
    p.add_argument("--out-md", required=True, type=cli.output_path, help="markdown table")
    p.add_argument("--notes", default=None, type=cli.input_file, help="markdown appended to the table (the analysis of the misses)")
    args = p.parse_args(argv)
    try:
        frame = load(args.csv)
        text = markdown(frame, args.baseline)
        if args.notes:
            with open(args.notes) as f:
                text += "\n" + f.read()
    except (OSError, ValueError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    fig = plot(frame)
    style.save(fig, args.out, source=args.csv)
    atomic_write_text(args.out_md, text)
    print(f"wrote {args.out} (pdf, png) and {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
