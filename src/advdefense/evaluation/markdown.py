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
    return f"{100 * count / total:.1f} [{100 * low:.0f}, {100 * high:.0f}]"
