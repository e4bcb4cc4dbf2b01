"""One visual encoding for every figure of the suite.

Every system has one fixed colour and one fixed hatch in all figures, so a reader who has learnt
that HierMoE is the red cross-hatched bar finds it again everywhere, in colour or in greyscale
print. The paper's own numbers and our closed-form models are drawn with fixed reference styles
beside our measurements. Figures are written as PDF (TrueType, i.e. Type 42, fonts, which venues
accept) plus PNG, atomically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import seaborn as sns

from impl.common.records import atomic_output

__all__ = ["STYLE_SLOTS", "PAPER_SYSTEMS", "SYSTEM_ORDER", "SYSTEM_STYLES", "REFERENCE_STYLES", "HATCHES",
           "COLUMN_WIDTH", "PAGE_WIDTH", "Style", "set_style", "style_for", "apply_hatches", "hatch_legend",
           "baseline_line", "save"]

COLUMN_WIDTH = 3.4  # inches, one column of a two-column paper
PAGE_WIDTH = 7.0    # inches, both columns

# Each paper's systems with a fixed style (baselines first, the paper's own system last, under
# the names of the system registry, impl.experiments.systems) and their slots in the colour x
# hatch cycle. Kept here, not in the registry, so a figure depends on no paper's implementations
# (the registry's papers import theirs). DeepEP's slot 88: yellow and a hatch no other HierMoE
# system has (the greys belong to the paper's reference series).
STYLE_SLOTS: dict[str, dict[str, int]] = {
    "hiermoe": {"Megatron-LM": 0, "Tutel-2DH": 1, "SmartMoE": 2, "HD2-MoE": 3, "HD2-MoE-Smart": 4, "HD-MoE": 5,
                "HierMoE": 6, "DeepEP": 88},
    "fsmoe": {"DS-MoE": 7, "Tutel": 8, "Tutel-Improved": 9, "PipeMoE+Lina": 10, "FSMoE-No-IIO": 11, "FSMoE": 12},
    "scheinfer": {"llama.cpp": 13, "Fiddler": 14, "ScheInfer": 15},
}
PAPER_SYSTEMS: dict[str, tuple[str, ...]] = {paper: tuple(slots) for paper, slots in STYLE_SLOTS.items()}
_SLOTS: dict[str, int] = {name: i for slots in STYLE_SLOTS.values() for name, i in slots.items()}
SYSTEM_ORDER: tuple[str, ...] = tuple(sorted(_SLOTS, key=_SLOTS.get))

# Nine hatches against ten colours: 9 and 10 are coprime, so walking both lists with a system's
# style slot gives every system a distinct (colour, hatch) pair (slots below 90), and consecutive
# slots (one paper's figure) distinct colours and distinct hatches.
HATCHES: tuple[str, ...] = ("", "//", "\\\\", "xx", "..", "++", "oo", "**", "OO")
_PALETTE = sns.color_palette("colorblind", 10)


@dataclass(frozen=True)
class Style:
    color: tuple[float, float, float]
    hatch: str


SYSTEM_STYLES: dict[str, Style] = {
    name: Style(color=tuple(_PALETTE[i % len(_PALETTE)]), hatch=HATCHES[i % len(HATCHES)])
    for name, i in _SLOTS.items()
}

# Series drawn beside ours in every figure: the paper's reported numbers and our analytic models.
REFERENCE_STYLES: dict[str, Style] = {
    "paper": Style(color=(0.55, 0.55, 0.55), hatch="--"),
    "model": Style(color=(0.85, 0.85, 0.85), hatch="||"),
}


def style_for(name: str) -> Style:
    """The fixed style of a system ('HierMoE', ...) or reference series ('paper', 'model')."""
    if name in SYSTEM_STYLES:
        return SYSTEM_STYLES[name]
    if name in REFERENCE_STYLES:
        return REFERENCE_STYLES[name]
    raise ValueError(f"no style for {name!r}; known: {', '.join(SYSTEM_ORDER + tuple(REFERENCE_STYLES))}")


def set_style() -> None:
    """seaborn paper context, colorblind palette, Type 42 fonts in PDF and PS output."""
    sns.set_theme(context="paper", style="ticks", palette="colorblind",
                  rc={"pdf.fonttype": 42, "ps.fonttype": 42, "hatch.linewidth": 0.5,
                      "savefig.dpi": 200})


def apply_hatches(ax, styles: dict[str, Style]) -> None:
    """seaborn has no hatch argument: set each bar's hatch from its series, recognised by its
    fill colour (colours are distinct within a figure), and the legend handles' by their label.
    Matching by colour stays right when a series has no bars in some panel, where matching
    containers by position would shift."""
    def key(rgb) -> tuple:
        return tuple(round(float(c), 3) for c in rgb[:3])

    hatch_by_color = {key(st.color): st.hatch for st in styles.values()}
    for container in ax.containers:
        for bar in container:
            hatch = hatch_by_color.get(key(bar.get_facecolor()))
            if hatch is not None:
                bar.set_hatch(hatch)
    if ax.get_legend() is not None:
        hatch_legend(ax.get_legend(), styles)


def hatch_legend(legend, styles: dict[str, Style]) -> None:
    """Give each legend handle the hatch of the series its label names."""
    for handle, text in zip(legend.legend_handles, legend.get_texts()):
        if handle is not None and text.get_text() in styles:
            handle.set_hatch(styles[text.get_text()].hatch)


def baseline_line(ax, y: float = 1.0) -> None:
    """The dashed reference line of speedup plots (the baseline's own level)."""
    ax.axhline(y, ls="--", lw=0.8, color="black", zorder=0)


def save(fig, path: str | Path, source: str | None = None) -> tuple[Path, Path]:
    """Write `fig` as PDF and PNG beside each other (`path` with or without a suffix), each
    atomically; `source` (the CSV the figure was drawn from) is stored in both files' metadata."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".pdf", ".png") else path
    pdf, png = stem.with_name(stem.name + ".pdf"), stem.with_name(stem.name + ".png")
    note = f"drawn from {source}" if source else None
    with mpl.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}):
        with atomic_output(pdf) as tmp:
            fig.savefig(tmp, bbox_inches="tight",
                        metadata={"Subject": note, "CreationDate": None, "Creator": "moe-repro"})
        with atomic_output(png) as tmp:
            fig.savefig(tmp, bbox_inches="tight",
                        metadata={"Source": note or "", "Software": "moe-repro"})
    return pdf, png
