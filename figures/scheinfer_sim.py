"""ScheInfer figures: (a) speedup of ScheInfer over llama.cpp and over Fiddler per phase and model
(sim tier, MODELED) with the paper's stated ranges beside ours, (b) CC / CG / GG fractions by phase
and model (MODELED), (c) a three-lane timeline of one layer per policy from MEASURED events of our
HybridEngine (its 'layers' and 'fiddler' policies are llama.cpp's and Fiddler's placements run by
our engine, not those programs), and (d) a markdown report paper vs ours with the reasons for the
gaps, and, where the sim ran it, ScheInfer under the other reading of its GG placement beside the
headline's (`gg_section`).

    python -m figures.scheinfer_sim --sim SIM.csv --timeline scheinfer.json fiddler.json layers.json \
        [--timeline-log generate.log ...] [--gpu-bench B.csv --gpu-bench-record B.json \
        --gpu-hardware H.yaml] --out-dir results/figures

With a bench measured on a GPU (workflows/scripts/gpu_check.sh: its CSV and run record, and the
hardware class it measured there), the report gains a section with the measured tok/s and
ratios beside the paper's ranges and the sim tier's prediction for the same model, budget and
hardware (`impl.experiments.scheinfer.sim.predict_bench`).

Speedups are computed here from the sim CSV (impl.experiments.scheinfer.sim): tok/s of ScheInfer
over the baseline's on the same (hardware, model, phase). Timeline JSONs are
`python -m impl.experiments.scheinfer generate --timeline` outputs; their logs say which device
ran the GPU lanes.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from baselines.llamacpp.policy import OFFLOAD_MIN_BATCH  # noqa: E402
from figures import style  # noqa: E402
from figures.inputs import read_results  # noqa: E402
from impl.common import cli  # noqa: E402
from impl.common.paper import read_paper_csv  # noqa: E402
from impl.common.records import atomic_write_text, read_record  # noqa: E402

__all__ = ["speedups", "gg_variants", "variant_speedups", "gg_section", "plot_speedup", "plot_partition",
           "plot_timeline", "report", "gpu_section", "main"]

PHASES = ("prefill", "decode", "overall")
BASELINES = ("llama.cpp", "Fiddler")
MODEL_LABEL = {"mixtral-8x7b": "Mixtral-8x7B", "llama2-7b": "LLaMA-2-7B", "llama2-13b": "LLaMA-2-13B",
               "qwen1.5-moe-a2.7b": "Qwen1.5-MoE", "phi-3.5-moe": "Phi-3.5-MoE"}
BAND_COLORS = {"cc": "#4c72b0", "cg": "#dd8452", "gg": "#55a868"}
LANES = (("cpu", "CPU"), ("h2d", "PCIe (H2D)"), ("gpu", "GPU"))
# the timeline's rows are our engine under each policy: the baselines' placements, not the baselines
POLICY_LABEL = {"layers": "engine policy 'layers' (llama.cpp-style offload)",
                "fiddler": "engine policy 'fiddler' (Fiddler-style)", "scheinfer": "engine policy 'scheinfer'"}


def _modeled(what: str) -> str:
    return (f"tier sim: {what} MODELED with the engine's cost model on ASSUMED hardware classes "
            "(spec sheets x assumed efficiencies); the paper's machines are unknown")


NOTE = _modeled("tok/s")


def read_sim(path: str) -> pd.DataFrame:
    return read_results(path, ("hardware", "model", "system", "phase", "tokens_per_s", "cc_frac", "cg_frac", "gg_frac"),
                        "impl.experiments.scheinfer.sim")


def speedups(frame: pd.DataFrame, system: str = "ScheInfer") -> pd.DataFrame:
    """Rows (hardware, model, phase, baseline, speedup) of `system` over each baseline present."""
    wide = frame.pivot_table(index=["hardware", "model", "phase"], columns="system", values="tokens_per_s")
    rows = []
    for base in BASELINES:
        if base not in wide.columns:
            continue
        s = (wide[system] / wide[base]).dropna()
        rows += [{"hardware": h, "model": m, "phase": p, "baseline": base, "speedup": v} for (h, m, p), v in s.items()]
    return pd.DataFrame(rows)


def _paper_ranges() -> tuple[dict[str, tuple[float, float]], dict]:
    table, header = read_paper_csv("scheinfer_speedup")
    out = {}
    for phase, g in table.groupby("phase"):
        out[phase] = (float(g[g["bound"] == "low"]["value"].iloc[0]), float(g[g["bound"] == "high"]["value"].iloc[0]))
    return out, header


def plot_speedup(frame: pd.DataFrame):
    sp = speedups(frame)
    paper, _ = _paper_ranges()
    hws = list(dict.fromkeys(frame["hardware"]))
    models = list(dict.fromkeys(frame["model"]))
    st, ref = style.style_for("ScheInfer"), style.style_for("paper")
    fig, axes = plt.subplots(len(BASELINES), len(PHASES), figsize=(style.PAGE_WIDTH, 4.6), sharex=True)
    width = 0.8 / max(1, len(hws))
    for r, base in enumerate(BASELINES):
        for c, phase in enumerate(PHASES):
            ax = axes[r, c]
            lo, hi = paper[phase]
            ax.axhspan(lo, hi, color=ref.color, alpha=0.25, lw=0, zorder=0)
            for j, hw in enumerate(hws):
                g = sp[(sp["baseline"] == base) & (sp["phase"] == phase) & (sp["hardware"] == hw)].set_index("model")
                ys = [g["speedup"].get(m, np.nan) for m in models]
                ax.bar(np.arange(len(models)) - 0.4 + width * (j + 0.5), ys, width=width, color=st.color,
                       alpha=1.0 - 0.28 * j, hatch=style.HATCHES[(j + 1) % len(style.HATCHES)],
                       edgecolor="black", lw=0.4, label=hw if (r, c) == (0, 0) else None)
                for x, y in zip(np.arange(len(models)) - 0.4 + width * (j + 0.5), ys):
                    if np.isnan(y):
                        ax.text(x, 0.05, "n/a", rotation=90, fontsize=5, ha="center", va="bottom")
            style.baseline_line(ax)
            ax.set_title(f"{phase} vs {base}", fontsize=8)
            ax.set_xticks(range(len(models)), [MODEL_LABEL.get(m, m) for m in models], rotation=35, ha="right",
                          fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
        axes[r, 0].set_ylabel(f"ScheInfer speedup\nover {base}", fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(plt.Rectangle((0, 0), 1, 1, fc=ref.color, alpha=0.25, lw=0))
    labels.append("paper: stated range (all models, 3 unknown machines)")
    fig.legend(handles, labels, loc="upper center", ncol=2, frameon=False, fontsize=6, bbox_to_anchor=(0.5, 1.04))
    fig.suptitle(f"ScheInfer speedups ({NOTE};\nn/a: Fiddler runs MoE models only; Fiddler on models other than "
                 f"{', '.join(_label(m) for m in FIDDLER_MODELS)}: our port of its policy)", fontsize=6, y=-0.01)
    fig.tight_layout()
    return fig


def plot_partition(frame: pd.DataFrame):
    sch = frame[(frame["system"] == "ScheInfer") & frame["phase"].isin(["prefill", "decode"])]
    hws = list(dict.fromkeys(sch["hardware"]))
    models = list(dict.fromkeys(sch["model"]))
    fig, axes = plt.subplots(1, len(hws), figsize=(style.PAGE_WIDTH, 2.6), sharey=True)
    for ax, hw in zip(np.atleast_1d(axes), hws):
        g = sch[sch["hardware"] == hw]
        xs, labels = [], []
        for i, m in enumerate(models):
            for k, phase in enumerate(("prefill", "decode")):
                row = g[(g["model"] == m) & (g["phase"] == phase)]
                if row.empty:
                    continue
                x = i * 2.6 + k
                bottom = 0.0
                for band in ("cc", "cg", "gg"):
                    v = float(row[f"{band}_frac"].iloc[0])
                    ax.bar(x, v, bottom=bottom, color=BAND_COLORS[band], edgecolor="black", lw=0.3,
                           hatch="//" if phase == "decode" else "", label=band.upper() if (i, k) == (0, 0) else None)
                    bottom += v
                xs.append(x)
                labels.append(f"{MODEL_LABEL.get(m, m)} {'P' if phase == 'prefill' else 'D'}")
        ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=5)
        ax.set_title(hw, fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
    np.atleast_1d(axes)[0].set_ylabel("fraction of active FFN rows", fontsize=7)
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, frameon=False, fontsize=6, bbox_to_anchor=(0.5, 1.06))
    fig.suptitle("ScheInfer CC / CG / GG fractions (the partition its policy plans), prefill (P) vs decode "
                 f"(D; hatched)\n{_modeled('fractions')}", fontsize=6, y=-0.02)
    fig.tight_layout()
    return fig


def read_timeline(path: str) -> pd.DataFrame:
    events = pd.DataFrame(json.loads(Path(path).read_text()))
    for col in ("lane", "band", "layer", "phase", "start", "end"):
        if col not in events.columns:
            raise ValueError(f"{path}: missing key {col!r}; is it a 'generate --timeline' output?")
    return events


def _one_layer(events: pd.DataFrame, phase: str, layer: int) -> pd.DataFrame:
    """The events of `layer` in the last forward call of `phase` (calls are told apart by the
    layer index going back to 0 between consecutive events)."""
    ev = events[events["phase"] == phase].sort_values("start").reset_index(drop=True)
    if ev.empty:
        return ev
    call = (ev["layer"].diff().fillna(0) < 0).cumsum()
    ev = ev[call == call.max()]
    ev = ev[ev["layer"] == layer]
    return ev.assign(t0=(ev["start"] - ev["start"].min()) * 1e6, t1=(ev["end"] - ev["start"].min()) * 1e6)


def plot_timeline(timelines: dict[str, pd.DataFrame], device: str, layer: int = 0, model: str = "small generated"):
    fig, axes = plt.subplots(len(timelines), 2, figsize=(style.PAGE_WIDTH, 1.1 * len(timelines) + 0.8),
                             squeeze=False)
    for r, (policy, events) in enumerate(timelines.items()):
        for c, phase in enumerate(("prefill", "decode")):
            ax = axes[r, c]
            ev = _one_layer(events, phase, layer)
            for y, (lane, label) in enumerate(LANES):
                for e in ev[ev["lane"] == lane].itertuples():
                    ax.barh(y, e.t1 - e.t0, left=e.t0, height=0.6, color=BAND_COLORS[e.band], edgecolor="black",
                            lw=0.3)
            ax.set_yticks(range(len(LANES)), [label for _, label in LANES], fontsize=6)
            ax.set_ylim(-0.6, len(LANES) - 0.4)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=6)
            span = float(ev["t1"].max()) if len(ev) else 0.0
            ax.set_title(f"{POLICY_LABEL.get(policy, policy)}: {phase}, layer {layer} ({span:.0f} us)", fontsize=7)
            if r == len(timelines) - 1:
                ax.set_xlabel("time since the layer's first band (us, measured)", fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, fc=BAND_COLORS[b], ec="black", lw=0.3) for b in BAND_COLORS]
    fig.legend(handles, [b.upper() for b in BAND_COLORS], loc="upper center", ncol=3, frameon=False, fontsize=6,
               bbox_to_anchor=(0.5, 1.03))
    emulated = device != "cuda"
    fig.suptitle(f"MEASURED lane events of our HybridEngine on a {model} GGUF, one run per engine policy "
                 "('layers' and 'fiddler' place weights as llama.cpp and Fiddler do; they are not those programs); "
                 + ("GPU and PCIe lanes EMULATED on CPU (no CUDA device): all lanes share this CPU"
                    if emulated else f"device {device}"), fontsize=6, y=-0.01, wrap=True)
    fig.tight_layout()
    return fig


def _device_of(logs: list[str]) -> str:
    for path in logs:
        m = re.search(r"device (\S+),", Path(path).read_text())
        if m:
            return m.group(1).split(":")[0]
    return "unknown"


# Fiddler's code supports Mixtral only (src/fiddler/mixtral.py): on other models its rows are our port of its policy
FIDDLER_MODELS = ("mixtral-8x7b",)
TIME_PARTS = {"ffn_s": "FFN time (CPU, PCIe and GPU lanes)", "nonffn_s": "attention + LM head time",
              "act_s": "activation transfer time"}


def _label(model: str) -> str:
    return MODEL_LABEL.get(model, model)


def _span(values, fmt: str = "{:.2f}x") -> str:
    lo, hi = float(min(values)), float(max(values))
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def _pct(values) -> str:
    return _span([100 * v for v in values], "{:.0f} %")


def _fiddler_name(model: str) -> str:
    return "Fiddler" if model in FIDDLER_MODELS else "our port of Fiddler's policy"


# scheinfer.md 3.3 step 1 reads both ways; the sim runs the headline by its gg_mode and may run the
# other reading beside it (impl.experiments.scheinfer.sim.GG_VARIANTS)
GG_READING = {
    "uniform": "the same tile-snapped fraction of every FFN resident (\"spread evenly over layers\")",
    "popularity": "whole FFNs resident in decreasing popularity (\"by expert popularity for MoE as Fiddler "
                  "does\"), the popularity counted (impl.scheinfer.policy.PopularityCounter) on the same routing "
                  "it then runs: an oracle, like Fiddler's here"}


def _headline_gg(frame: pd.DataFrame) -> str:
    return str(frame[frame["system"] == "ScheInfer"]["gg_mode"].iloc[0])


def gg_variants(frame: pd.DataFrame) -> dict[str, str]:
    """System -> gg_mode of ScheInfer's GG ablations ('ScheInfer[GG <mode>]') whose reading is not
    the headline's."""
    if "gg_mode" not in frame.columns:
        return {}
    rows = frame[frame["system"].str.startswith("ScheInfer[GG ")]
    head = _headline_gg(frame)
    return {s: m for s, m in rows.groupby("system", sort=False)["gg_mode"].first().items() if m != head}


def variant_speedups(frame: pd.DataFrame) -> dict[str, tuple[str, pd.DataFrame]]:
    """Each of `gg_variants`: system -> (its gg_mode, its `speedups`), computed once for every
    section of the report that shows them."""
    return {system: (mode, speedups(frame, system)) for system, mode in gg_variants(frame).items()}


def _verdict(speedup: pd.Series, hardware: pd.Series) -> str:
    """Whether a set of speedups (one per hardware class) is a win, a loss or both."""
    won = speedup >= 1
    if won.all():
        return "a win"
    if not won.any():
        return "still a loss"
    return f"a win on {', '.join(hardware[won])}, a loss on {', '.join(hardware[~won])}"


def _why(frame: pd.DataFrame, sp: pd.DataFrame, variants: dict[str, tuple[str, pd.DataFrame]]) -> list[str]:
    """The 'why ours differ' bullets, each computed from the sim CSV (or stating what was run);
    `variants`: `variant_speedups`."""
    paper, _ = _paper_ranges()
    first = frame.iloc[0]
    P = int(first["prompt_tokens"])
    out = ["* **Machines.** The paper's three environments are not public; ours are assumed desktop classes "
           "(workflows/config/experiments/scheinfer_hardware.yaml), spec-sheet peaks times assumed efficiencies."]
    pre = sp[sp["phase"] == "prefill"]["speedup"]
    text = f"* **Prefill.** Our prompt is {P} tokens; our prefill speedups reach {pre.max():.2f}x (the paper's stated " \
           f"upper end: {paper['prefill'][1]:.2f}x)."
    lay = frame[(frame["system"] == "llama.cpp") & (frame["phase"] == "prefill")]
    if len(lay):
        text += (f" llama.cpp copies {_pct(lay['cg_frac'])} of its active prefill FFN rows to the GPU (ggml's offload "
                 f"of CPU layers at >= {OFFLOAD_MIN_BATCH} tokens) and computes {_pct(lay['cc_frac'])} on the CPU, the copies at the "
                 "hardware class's pinned PCIe bandwidth.")
    out.append(text)
    for model, g in frame.groupby("model", sort=False):
        hws = [h for h, gh in g.groupby("hardware", sort=False) if (gh["resident_frac"] >= 1).all()]
        s = sp[(sp["model"] == model) & sp["hardware"].isin(hws) & (sp["baseline"] == "llama.cpp")]["speedup"]
        if hws and len(s):
            out.append(f"* **All FFN rows resident.** {_label(model)} on {', '.join(hws)}: every system keeps all FFN "
                       f"rows on the GPU (resident_frac = 1), so ScheInfer over llama.cpp is {_span(s)} there.")
    keys = ["hardware", "model", "phase"]
    losses = sp[(sp["speedup"] < 1) & sp["phase"].isin(["prefill", "decode"])]     # overall: their sum
    for (model, base, phase), g in losses.groupby(["model", "baseline", "phase"], sort=False):
        hws = list(g["hardware"])
        pick = lambda system: frame[(frame["system"] == system) & (frame["model"] == model)  # noqa: E731
                                    & (frame["phase"] == phase) & frame["hardware"].isin(hws)].set_index(keys)
        ours, theirs = pick("ScheInfer"), pick(base)
        excess = {c: float((ours[c] - theirs[c]).sum()) for c in TIME_PARTS}
        worst = max(excess, key=excess.get)
        name = _fiddler_name(model) if base == "Fiddler" else base
        text = (f"* **{_label(model)} {phase}: ScheInfer {_span(g['speedup'])} of {name}** ({', '.join(hws)}). Most of "
                f"the gap is {TIME_PARTS[worst]}: ScheInfer's is {_span(ours[worst] / theirs[worst])} of the baseline's. "
                f"Of the active FFN rows in {phase}, ScheInfer holds {_pct(ours['gg_frac'])} resident (GG), "
                f"{_pct(ours['cc_frac'])} on the CPU (CC), {_pct(ours['cg_frac'])} copied (CG); the baseline "
                f"{_pct(theirs['gg_frac'])}, {_pct(theirs['cc_frac'])}, {_pct(theirs['cg_frac'])}.")
        if base == "Fiddler":
            text += (" Fiddler ranks whole experts by a popularity counted on the same routing it then runs (an "
                     f"oracle); ScheInfer's resident rows are gg_mode '{ours['gg_mode'].iloc[0]}'.")
        for system, (mode, v) in variants.items():
            alt = pick(system)
            v = v[(v["model"] == model) & (v["baseline"] == base) & (v["phase"] == phase)
                  & v["hardware"].isin(hws)].reset_index(drop=True)
            if len(alt) and len(v):
                text += (f" Under the other reading of step 1, GG by {mode} ({system}), ScheInfer is {_span(v['speedup'])} "
                         f"of the baseline here: {_verdict(v['speedup'], v['hardware'])}"
                         f"{', so this conclusion turns on the reading' if (v['speedup'] >= 1).any() else ''}; its "
                         f"{TIME_PARTS[worst]} is {_span(alt[worst] / theirs[worst])} of the baseline's and it holds "
                         f"{_pct(alt['gg_frac'])} of the active FFN rows resident.")
        out.append(text)
    for system, (mode, v) in variants.items():
        v = v.merge(sp, on=["hardware", "model", "phase", "baseline"], suffixes=("", "_headline"))
        v = v[(v["speedup"] < 1) & (v["speedup_headline"] >= 1) & v["phase"].isin(["prefill", "decode"])]
        for (model, base, phase), g in v.groupby(["model", "baseline", "phase"], sort=False):
            name = _fiddler_name(model) if base == "Fiddler" else base
            out.append(f"* **{_label(model)} {phase}, GG by {mode}: ScheInfer {_span(g['speedup'])} of {name}** "
                       f"({', '.join(g['hardware'])}), where the headline (gg_mode '{_headline_gg(frame)}') is "
                       f"{_span(g['speedup_headline'])}.")
    lay = frame[(frame["system"] == "llama.cpp") & (frame["phase"] == "decode")]
    sch = frame[(frame["system"] == "ScheInfer") & (frame["phase"] == "decode")]
    if len(lay):
        per_model = "; ".join(
            f"{_label(m)} {_span(g['gpu_layers'], '{:.0f}')} of {int(g['num_layers'].iloc[0])}, head on the "
            + ("GPU" if g["head_on_gpu"].all() else "CPU" if not g["head_on_gpu"].any() else
               "GPU on " + ", ".join(g[g["head_on_gpu"]]["hardware"]))
            for m, g in lay.groupby("model", sort=False))
        out.append("* **llama.cpp's placement (-ngl N).** The output head on the GPU first, then the last N - 1 whole "
                   "layers (attention, norms, router and KV cache with their FFNs), N the most that fit; the other "
                   "layers' attention runs on the CPU; token embeddings on the CPU. Layers on "
                   f"the GPU: {per_model}. Attention + head take {_pct(lay['nonffn_s'] / lay['time_s'])} of its decode "
                   f"time ({_pct(sch['nonffn_s'] / sch['time_s'])} of ScheInfer's, whose non-FFN weights are all on "
                   "the GPU).")
    out.append("* **Cost model.** Our per-layer time is the engine's linear lane model (partition.py) with no "
               "cross-layer CG prefetch; the paper's cost functions and solver are not public.")
    ports = [m for m in dict.fromkeys(frame[frame["system"] == "Fiddler"]["model"]) if m not in FIDDLER_MODELS]
    if ports:
        out.append("* **Fiddler.** Fiddler's code supports Mixtral only; on "
                   f"{', '.join(_label(m) for m in ports)} the Fiddler rows are our port of its policy (whole "
                   "experts resident by popularity, a shared expert counting every token; each other expert on the "
                   "CPU or copied, whichever the cost model says is faster).")
    routing = str(first["routing"])
    out.append(f"* **Routing.** '{routing}': " + (
        "the models' routing functions with seeded random router weights on synthetic tokens, not trained "
        "routers on real prompts." if routing == "gate" else
        "every expert gets n * k / E prefill tokens and k experts rotate per decode step (no real router)."))
    return out


def gg_section(frame: pd.DataFrame, sp: pd.DataFrame, variants: dict[str, tuple[str, pd.DataFrame]]) -> list[str]:
    """Per model and phase, ScheInfer under the other reading of GG (each of `variants`:
    `variant_speedups`) over llama.cpp and over Fiddler beside the headline's, min-max over the
    hardware classes."""
    head, out = _headline_gg(frame), []
    tps = frame.pivot_table(index=["hardware", "model", "phase"], columns="system", values="tokens_per_s")
    for system, (mode, alt) in variants.items():
        gain = (tps[system] / tps["ScheInfer"]).dropna().rename("gain").reset_index()
        models = list(dict.fromkeys(alt["model"]))
        out += ["", f"## ScheInfer with GG by {mode} (ablation: the other reading)", "",
                f"The headline ('ScheInfer' everywhere else in this report) keeps its GG rows by gg_mode '{head}': "
                f"{GG_READING[head]}. scheinfer.md 3.3 step 1 also reads '{mode}': {GG_READING[mode]}. {system} is "
                f"ScheInfer with that placement and the same CC / CG scheduling; run on "
                f"{', '.join(_label(m) for m in models)}; min-max over the hardware classes "
                f"({', '.join(dict.fromkeys(alt['hardware']))}). {NOTE}.", "",
                "FFN work on resident rows: the share of the active FFN rows times their tokens that GG computes.",
                "", f"| model | phase | over llama.cpp: headline / GG {mode} | over Fiddler: headline / GG {mode} "
                f"| GG {mode} over headline (tok/s) | FFN work on resident rows: headline / GG {mode} / Fiddler |",
                "|---|---|---|---|---|---|"]
        for label, which in [*((_label(m), [m]) for m in models), ("all of these", models)]:
            for phase in PHASES:
                def of(rows: pd.DataFrame, column: str) -> pd.Series:
                    return rows[(rows["phase"] == phase) & rows["model"].isin(which)][column]
                speed = [of(g[g["baseline"] == base], "speedup") for base in BASELINES for g in (sp, alt)]
                work = [of(frame[frame["system"] == s_], "gg_work_frac") for s_ in ("ScheInfer", system, "Fiddler")]
                ported = [m for m in which if m not in FIDDLER_MODELS]
                port = "" if not ported else " (port)" if len(ported) == len(which) else " (port on some)"
                cells = [_span(v) if len(v) else "n/a" for v in speed]
                out.append(f"| {label} | {phase} | {cells[0]} / {cells[1]} | {cells[2]} / {cells[3]}{port} | "
                           f"{_span(of(gain, 'gain'))} | " + " / ".join(_pct(w) if len(w) else "n/a" for w in work) + " |")
    return out


def report(frame: pd.DataFrame) -> str:
    sp, variants = speedups(frame), variant_speedups(frame)
    paper, header = _paper_ranges()
    lines = ["# ScheInfer: paper vs ours", "",
             f"Ours: {NOTE}. Prompt {int(frame['prompt_tokens'].iloc[0])} tokens, "
             f"{int(frame['decode_tokens'].iloc[0])} decode steps, batch 1, routing "
             f"'{frame['routing'].iloc[0]}', 16-bit weights. ScheInfer's GG rows (scheinfer.md 3.3 step 1): gg_mode "
             f"'{_headline_gg(frame)}', {GG_READING[_headline_gg(frame)]}"
             + (f"; the other reading beside it below ({', '.join(variants)})." if variants else "."),
             f"Paper: {header['citation']}; {header['location']}. The paper states only these ranges "
             "(over its models, both baselines and three machines); no per-model number is public.", "",
             "| phase | paper (stated range) | ours vs llama.cpp (min-max) | ours vs llama.cpp, MoE models | "
             "ours vs Fiddler (min-max) |",
             "|---|---|---|---|---|"]
    moe = set(sp[sp["baseline"] == "Fiddler"]["model"])          # Fiddler runs on the MoE models only
    for phase in PHASES:
        cells = []
        for base, models_in in (("llama.cpp", None), ("llama.cpp", moe), ("Fiddler", None)):
            g = sp[(sp["phase"] == phase) & (sp["baseline"] == base)]
            g = (g if models_in is None else g[g["model"].isin(models_in)])["speedup"]
            cells.append(f"{g.min():.2f}x-{g.max():.2f}x" if len(g) else "n/a")
        lo, hi = paper[phase]
        lines.append(f"| {phase} | {lo:.2f}x-{hi:.2f}x | {' | '.join(cells)} |")
    ports = [m for m in dict.fromkeys(sp[sp["baseline"] == "Fiddler"]["model"]) if m not in FIDDLER_MODELS]
    if ports:
        lines += ["", f"Fiddler column: Fiddler's policy on {', '.join(_label(m) for m in FIDDLER_MODELS)}, the "
                  f"only model Fiddler supports; on {', '.join(_label(m) for m in ports)} our port of Fiddler's "
                  "policy (marked 'port' below)."]
    lines += ["", "## Ours per hardware class and model", "",
              "| hardware | model | phase | vs llama.cpp | vs Fiddler | ScheInfer tok/s |", "|---|---|---|---|---|---|"]
    tps = frame[frame["system"] == "ScheInfer"].set_index(["hardware", "model", "phase"])["tokens_per_s"]
    wide = sp.pivot_table(index=["hardware", "model", "phase"], columns="baseline", values="speedup")
    for (h, m, p), row in wide.iterrows():
        cell = lambda b: f"{row[b]:.2f}x" if b in row and pd.notna(row[b]) else "n/a"  # noqa: E731
        fid = cell("Fiddler") + (" (port)" if cell("Fiddler") != "n/a" and m not in FIDDLER_MODELS else "")
        lines.append(f"| {h} | {m} | {p} | {cell('llama.cpp')} | {fid} | {tps[(h, m, p)]:.1f} |")
    lines += gg_section(frame, sp, variants)
    lines += ["", "## Why ours differ from the paper", "", *_why(frame, sp, variants), "",
              "Timeline figure: measured lane events of our HybridEngine on a small generated model, one run "
              "per engine policy: 'layers' and 'fiddler' are llama.cpp's layer offload and Fiddler's expert "
              "placement run by our engine (not llama.cpp or Fiddler themselves); each run has a run record "
              "(results/raw/scheinfer_timeline/<policy>.record.json). Without a CUDA device the GPU and PCIe "
              "lanes are emulated on the CPU, so it shows the schedule (which band runs where, overlap or "
              "not), not GPU speed."]
    return "\n".join(lines) + "\n"


def _command(command) -> str:
    """A record's command line as one would type it (python -m for a module's __main__)."""
    if isinstance(command, str):
        return command
    args = [Path(command[0]).name, *command[1:]] if command else []
    parts = Path(args[1]).parent.parts if len(args) > 1 and args[1].endswith("__main__.py") else ()
    if "impl" in parts:                  # recorded in another checkout: the module path from its package
        args[1:2] = ["-m", ".".join(parts[len(parts) - parts[::-1].index("impl") - 1:])]
    return shlex.join(args)


BENCH_COLUMNS = ("round", "system", "prompt_tokens", "n_predict", "prefill_tok_s", "decode_tok_s", "device")


def _fiddler_profile(popularity: dict) -> str:
    """What Fiddler's resident experts were chosen by in a measured bench (its record's `popularity`)."""
    used_by = popularity.get("used_by", ["fiddler"])
    if not used_by:
        return ""
    whose = " and ".join("Fiddler's resident experts" if p == "fiddler" else f"{p}'s resident rows (GG by popularity)"
                         for p in used_by)
    if not popularity.get("tokens"):
        why = "--popularity-tokens 0" if "tokens" in popularity else "no popularity profile in this record"
        return f"{whose[0].upper()}{whose[1:]}: key order ({why})."
    how = popularity.get("calibration_prompt")
    source = (f" of {Path(how['text_file']).name} (sha256 {how['sha256'][:12]})" if how.get("kind") == "text" else
              f" ({how['kind']})") if isinstance(how, dict) else ""
    return (f"{whose[0].upper()}{whose[1:]}: the most popular on a calibration prompt of {popularity['tokens']} "
            f"tokens{source}{', none of the measured ones' if popularity.get('differs_from_measured_prompts') else ''} (profiled in {popularity.get('seconds', float('nan')):.1f} s outside "
            "the timings).")


def gpu_section(bench_csv: str, bench_record: str, hardware_yaml: str) -> str:
    """The measured bench beside the paper's ranges and the sim tier's prediction of it: per prompt
    length and phase, ScheInfer over Fiddler and over llama.cpp (each offload setting measured;
    the fastest one is what a user would run), measured medians over the bench's rounds."""
    from impl.experiments.scheinfer.sim import load_hardware, predict_bench
    from impl.scheinfer.config import DecoderConfig

    bench = read_results(bench_csv, BENCH_COLUMNS, "python -m impl.experiments.scheinfer bench")
    try:
        record = read_record(bench_record)
        cfg = DecoderConfig.from_dict(record["model"]["decoder_config"])
        budget = int(record["extra"]["budget"]["gpu_mem_bytes"])
        device, tier, git, when = record["topology"]["device"], record["tier"], record["git"], record["timestamp"]
        command, matmul = _command(record["command"]), record["extra"].get("gpu_fp32_matmul", {})
        popularity = record["extra"].get("popularity") or {}
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{bench_record}: not a bench run record (python -m impl.experiments.scheinfer bench "
                         f"--out-record) with the model's decoder_config, budget and provenance ({e!r})") from None
    classes = load_hardware(hardware_yaml)
    if len(classes) != 1:
        raise ValueError(f"{hardware_yaml}: expected the one hardware class gpu_check measured, found {len(classes)}")
    [hw] = classes.values()
    prompts = sorted(int(n) for n in bench["prompt_tokens"].unique())
    n_predict = int(bench["n_predict"].iloc[0])
    pred = predict_bench(cfg, hw, budget, prompts, n_predict, policies=("scheinfer", "fiddler", "layers"))
    med = bench.groupby(["system", "prompt_tokens"])[["prefill_tok_s", "decode_tok_s"]].median()
    llama = sorted(s for s in bench["system"].unique() if s.startswith("llama.cpp"))
    paper, _ = _paper_ranges()
    lines = ["", f"## Measured on {device} (tier {tier})", "",
             f"`{command}` at {(git.get('sha') or '?')[:12]}"
             f"{' (uncommitted changes)' if git.get('dirty') else ''}, {when[:19]}: a generated "
             f"{cfg.arch} model ({cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, hidden {cfg.hidden}, "
             f"expert width {cfg.moe_ffn_hidden}, F32 weights) under a {budget / 2**20:.0f} MiB budget for FFN rows and "
             f"staging, {int(bench['round'].nunique())} rounds (medians). GPU float32 products: ours "
             f"{matmul.get('ours', '?')}, llama.cpp {matmul.get('llama.cpp', '?')}. Predicted: the sim tier on the "
             f"hardware class measured in the same run ({hw.name}), same model, budget and lengths (MODELED; its "
             f"llama.cpp is whole-layer offload). {_fiddler_profile(popularity)}", "",
             "| prompt | phase | ScheInfer tok/s | over Fiddler: measured / predicted | over llama.cpp (best setting): "
             "measured / predicted | paper range |", "|---|---|---|---|---|---|"]
    for n in prompts:
        p = pred[pred["prompt_tokens"] == n].set_index(["policy", "phase"])["tokens_per_s"]
        for phase in ("prefill", "decode"):
            col = f"{phase}_tok_s"
            ours = med[col].get(("scheinfer", n))
            fid = med[col].get(("fiddler", n))
            best = max((med[col].get((s, n)) for s in llama if (s, n) in med.index), default=None)
            ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"  # noqa: E731
            lo, hi = paper[phase]
            lines.append(f"| {n} | {phase} | {ours:.1f} | {ratio(ours, fid)} / {ratio(p[('scheinfer', phase)], p[('fiddler', phase)])} | "
                         f"{ratio(ours, best)} / {ratio(p[('scheinfer', phase)], p[('layers', phase)])} | "
                         f"{lo:.2f}x-{hi:.2f}x |" if ours is not None else f"| {n} | {phase} | n/a | | | |")
    if llama:
        lines += ["", "llama.cpp per offload setting (measured tok/s, prefill / decode, per prompt length): "
                  + "; ".join(f"{s}: " + ", ".join(f"{n}: {med['prefill_tok_s'].get((s, n), float('nan')):.1f} / "
                                                  f"{med['decode_tok_s'].get((s, n), float('nan')):.1f}" for n in prompts)
                              for s in llama) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m figures.scheinfer_sim", description=cli.describe(__doc__))
    ap.add_argument("--sim", required=True, type=cli.input_file, help="impl.experiments.scheinfer.sim CSV")
    ap.add_argument("--timeline", nargs="+", required=True, type=cli.input_file, help="generate --timeline JSONs named <policy>.json")
    ap.add_argument("--timeline-log", nargs="*", default=[], type=cli.input_file, help="the generate runs' stdout (device line)")
    ap.add_argument("--timeline-model", default="small generated", help="what the timeline model is, for the caption")
    ap.add_argument("--gpu-bench", type=cli.input_file, help="a bench CSV measured on a GPU (gpu_check.sh stage c)")
    ap.add_argument("--gpu-bench-record", type=cli.input_file, help="its run record")
    ap.add_argument("--gpu-hardware", type=cli.input_file, help="the hardware class measured in the same run (stage d)")
    ap.add_argument("--out-dir", required=True, type=cli.output_dir)
    args = ap.parse_args(argv)
    gpu = (args.gpu_bench, args.gpu_bench_record, args.gpu_hardware)
    try:
        if any(gpu) and not all(gpu):
            raise ValueError("--gpu-bench, --gpu-bench-record and --gpu-hardware go together (one measured run)")
        frame = read_sim(args.sim)
        timelines = {Path(p).stem: read_timeline(p) for p in args.timeline}
        measured = gpu_section(*gpu) if all(gpu) else ""
    except (OSError, ValueError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    style.set_style()
    for name, fig in (("scheinfer_speedup", plot_speedup(frame)), ("scheinfer_partition", plot_partition(frame)),
                      ("scheinfer_timeline", plot_timeline(timelines, _device_of(args.timeline_log), model=args.timeline_model))):
        style.save(fig, out / name, source=args.sim if name != "scheinfer_timeline" else ",".join(args.timeline))
        plt.close(fig)
    atomic_write_text(out / "scheinfer_report.md", report(frame) + measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
