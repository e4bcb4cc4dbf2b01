"""When one of our speedups reproduces the paper's: the rule every report states and applies.

A ratio within TOLERANCE of the paper's is not enough near 1 (ours 1.01 against the paper's 1.12 is
within 10% while the gain is a twelfth of it), so the gains (speedup - 1) must also agree in sign
and within GAIN_TOLERANCE of the paper's gain, or GAIN_FLOOR when the paper's gain is tiny."""
from __future__ import annotations

__all__ = ["TOLERANCE", "GAIN_TOLERANCE", "GAIN_FLOOR", "RULE", "gap", "reproduces"]

TOLERANCE = 0.10
GAIN_TOLERANCE = 0.5
GAIN_FLOOR = 0.02

RULE = (f"A paper speedup reproduces when ours is within {TOLERANCE:.0%} of it and our gain (speedup - 1) has the "
        f"paper's sign and is within {GAIN_TOLERANCE:.0%} of the paper's gain (or {GAIN_FLOOR * 100:.0f} points, "
        "if larger), so that a small gain does not pass for a larger one.")


def gap(paper: float, ours: float) -> float:
    """Ours relative to the paper's (0.05: ours 5% higher)."""
    return ours / paper - 1 if paper else float("nan")


def reproduces(paper: float, ours: float) -> bool:
    gain_paper, gain_ours = paper - 1, ours - 1
    return (abs(gap(paper, ours)) <= TOLERANCE and (gain_ours > 0) == (gain_paper > 0)
            and abs(gain_ours - gain_paper) <= max(GAIN_TOLERANCE * abs(gain_paper), GAIN_FLOOR))
