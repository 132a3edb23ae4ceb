"""Markdown cells and tables shared by the harness's reports and the reproduction recipes."""

from __future__ import annotations

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
    return f"{100 * count / total:.1f} [{_bound(100 * low)}, {_bound(100 * high)}]"


def _bound(percent: float) -> str:
    """A bound in whole percent, or finer where rounding would reach 0 or 100 without being
    there (0/1000 gives [0, 0.4], not [0, 0])."""
    whole = f"{percent:.0f}"
    exact = min(abs(percent), abs(percent - 100)) < 1e-9  # 0 or 100 up to rounding error
    if whole == "0" and not exact:
        return f"{percent:.1g}"
    if whole == "100" and not exact:
        return f"{percent:.1f}" if f"{percent:.1f}" != "100.0" else f"{percent:.2f}"
    return whole
