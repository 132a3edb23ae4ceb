"""Render evaluation records as Markdown, CSV, JSON or HTML tables, and plot their curves.

Layout follows the DIM paper's Table 1: one row per attack grouped by norm, one column per
model, each cell the accuracy at the threshold, with the clean accuracy first.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from advdefense.attacks.norms import NORMS, Norm
from advdefense.errors import InputError
from advdefense.evaluation.metrics import wilson_interval
from advdefense.evaluation.record import EvaluationRecord

__all__ = ["FORMATS", "plot_accuracy_curves", "render"]

FORMATS = ("md", "csv", "json", "html")


Cell = tuple[float, int, int] | None  # (accuracy, robust count, n), None when not run


def _rows(records: Sequence[EvaluationRecord]) -> list[tuple[str, list[Cell]]]:
    """(row label, one cell per model) for the clean row and every attack, grouped by norm."""
    clean: list[Cell] = [
        (record.clean_accuracy, round(record.clean_accuracy * record.n), record.n)
        for record in records
    ]
    rows: list[tuple[str, list[Cell]]] = [("clean accuracy", clean)]
    attack_ids: dict[str, tuple[Norm, float]] = {}
    for record in records:
        for attack_id, summary in record.attacks.items():
            attack_ids.setdefault(attack_id, (summary.norm, summary.epsilon))
    for attack_id in sorted(attack_ids, key=lambda a: NORMS.index(attack_ids[a][0])):
        norm, epsilon = attack_ids[attack_id]
        cells: list[Cell] = []
        for record in records:
            found = record.attacks.get(attack_id)
            cells.append(None if found is None else (found.accuracy, found.robust, record.n))
        rows.append((f"{attack_id} ({norm}, ε={epsilon:g})", cells))
    return rows


def _format_cell(cell: Cell) -> str:
    if cell is None:
        return "—"
    accuracy, successes, total = cell
    low, high = wilson_interval(successes, total)
    return f"{100 * accuracy:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def render(records: Sequence[EvaluationRecord], output_format: str) -> str:
    """The records as one table in ``output_format`` (md, csv, json or html)."""
    if not records:
        raise InputError("nothing to report: pass at least one run directory")
    if output_format not in FORMATS:
        raise InputError(f"unknown format {output_format!r}; choose one of {', '.join(FORMATS)}")
    if output_format == "json":
        return json.dumps({record.model: record.to_json() for record in records}, indent=2) + "\n"
    header = ["", *(record.model for record in records)]
    rows = _rows(records)
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["row", "model", "accuracy", "ci95_low", "ci95_high", "n"])
        for label, cells in rows:
            for record, cell in zip(records, cells, strict=True):
                if cell is not None:
                    low, high = wilson_interval(cell[1], cell[2])
                    writer.writerow(
                        [
                            label,
                            record.model,
                            f"{cell[0]:.6f}",
                            f"{low:.6f}",
                            f"{high:.6f}",
                            cell[2],
                        ]
                    )
        return buffer.getvalue()
    footer = _footer(records)
    if output_format == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += [
            "| " + " | ".join([label, *map(_format_cell, cells)]) + " |" for label, cells in rows
        ]
        return "\n".join([*lines, "", footer, ""])
    body = "".join(
        "<tr><th>"
        + html.escape(label)
        + "</th>"
        + "".join(f"<td>{html.escape(_format_cell(cell))}</td>" for cell in cells)
        + "</tr>"
        for label, cells in rows
    )
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>advdefense report</title>"
        "</head><body><table border='1'><thead><tr>"
        + head
        + "</tr></thead><tbody>"
        + body
        + "</tbody></table><p>"
        + html.escape(footer)
        + "</p></body></html>\n"
    )


def _footer(records: Sequence[EvaluationRecord]) -> str:
    parts = []
    for record in records:
        seconds = sum(summary.seconds for summary in record.attacks.values())
        versions = record.provenance.get("versions", {})
        parts.append(
            f"{record.model}: {record.dataset}/{record.split}, n={record.n}, seed={record.seed}, "
            f"attack time {seconds:.1f} s, torch {versions.get('torch')}, "
            f"foolbox {versions.get('foolbox')}"
        )
    return "Cells: robust accuracy [95% Wilson interval]. " + "; ".join(parts)


def plot_accuracy_curves(records: Sequence[EvaluationRecord], path: Path) -> Path:
    """Accuracy vs epsilon, one panel per norm, one line per model and attack; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = [n for n in NORMS if any(s.norm == n for r in records for s in r.attacks.values())]
    figure, axes = plt.subplots(
        1, max(1, len(norms)), figsize=(5 * max(1, len(norms)), 4), squeeze=False
    )
    for axis, norm in zip(axes[0], norms, strict=False):
        for record in records:
            for attack_id, summary in record.attacks.items():
                if summary.norm != norm:
                    continue
                epsilons, accuracies = zip(*summary.curve, strict=True)
                label = attack_id if len(records) == 1 else f"{record.model}: {attack_id}"
                axis.plot(epsilons, [100 * a for a in accuracies], marker="o", label=label)
        axis.set_title(f"{norm.upper()} attacks")
        axis.set_xlabel("epsilon")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
