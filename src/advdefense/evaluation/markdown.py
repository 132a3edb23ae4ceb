"""Markdown cells and tables shared by the harness's reports and the reproduction recipes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from advdefense.evaluation.metrics import wilson_interval

__all__ = ["markdown_table", "percent_with_interval"]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, then one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def percent_with_interval(count: int, total: int) -> str:
    """``count / total`` in percent with its 95% Wilson interval, e.g. ``45.0 [38, 52]``;
    ``—`` when ``total`` is 0."""
    if total == 0:
        return "—"
    low, high = wilson_interval(count, total)
    shown = f"{_bound(100 * low, upward=False)}, {_bound(100 * high, upward=True)}"
    return f"{100 * count / total:.1f} [{shown}]"


def _bound(percent: float, *, upward: bool) -> str:
    """A bound rounded outwards (the shown interval contains the computed one): in whole
    percent, or to the first digit that keeps it off 0 or 100 where it is not there
    (0/1000 gives [0, 0.4], not [0, 0] or [0, 1])."""
    if abs(percent) < 1e-9 or abs(percent - 100) < 1e-9:
        return f"{round(percent):.0f}"
    distance = min(percent, 100 - percent)
    decimals = max(0, -math.floor(math.log10(distance))) if distance < 1 else 0
    scale = 10**decimals
    step = math.ceil if upward else math.floor
    value = step(percent * scale + (-1e-9 if upward else 1e-9)) / scale
    return f"{value:.{decimals}f}"
