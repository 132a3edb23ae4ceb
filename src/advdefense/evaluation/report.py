"""Render evaluation runs as Markdown, CSV, JSON or HTML, and plot accuracy against epsilon.

The minimal-mode table follows the DIM paper's Table 1: rows are attacks grouped by norm,
columns are models, cells the accuracy at the norm's threshold with a 95% Wilson interval; per
norm a worst-case row "median / accuracy"; the last row is the minimal accuracy across attacks.
The JSON layout is documented in docs/report-format.md.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advdefense.attacks.norms import NORMS, Norm
from advdefense.errors import InputError
from advdefense.evaluation.detection import plot_roc
from advdefense.evaluation.detection_run import AttackDetection
from advdefense.evaluation.markdown import markdown_table
from advdefense.evaluation.metrics import wilson_interval
from advdefense.evaluation.plotting import new_figure, save_figure
from advdefense.evaluation.run import RunResult
from advdefense.evaluation.summary import FixedSummary, ModelSummary, NormResult

__all__ = [
    "FORMATS",
    "NORM_NAMES",
    "plot_accuracy_curves",
    "render",
    "report_json",
    "write_reports",
]

FORMATS = ("md", "csv", "json", "html")
NORM_NAMES: dict[Norm, str] = {"l0": "L0", "l1": "L1", "l2": "L2", "linf": "Linf"}
Row = tuple[str, list[str]]


def _percent(accuracy: float, n: int) -> str:
    if math.isnan(accuracy):
        return "—"
    low, high = wilson_interval(round(accuracy * n), n)
    return f"{100 * accuracy:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _distance(value: float) -> str:
    return "∞" if math.isinf(value) else "—" if math.isnan(value) else f"{value:.3g}"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _models(runs: Sequence[RunResult]) -> list[tuple[RunResult, ModelSummary | FixedSummary]]:
    pairs = [(run, summary) for run in runs for summary in run.summaries]
    if not pairs:
        raise InputError("nothing to report: the runs hold no evaluated model")
    modes = {run.config.mode for run in runs}
    if len(modes) > 1:
        raise InputError("cannot mix minimal-mode and fixed-mode runs in one table")
    return pairs


def _column_names(pairs: Sequence[tuple[RunResult, ModelSummary | FixedSummary]]) -> list[str]:
    """Each column's name: its model's, with its run directory where several runs hold a model
    of that name (two stages of one model side by side)."""
    counts: dict[str, int] = {}
    for _, summary in pairs:
        counts[summary.model] = counts.get(summary.model, 0) + 1
    names = [
        summary.model if counts[summary.model] == 1 else f"{summary.model} ({run.directory.name})"
        for run, summary in pairs
    ]
    return [
        name if names.count(name) == 1 else f"{name} [{position + 1}]"
        for position, name in enumerate(names)
    ]


def _threshold_heading(thresholds: Sequence[float | None]) -> str:
    """``ε = x``, or each column's ε where the runs side by side used different ones."""
    found = {value for value in thresholds if value is not None}
    if len(found) == 1:
        return f"ε = {found.pop():g}"
    return "ε by column: " + " / ".join("—" if t is None else f"{t:g}" for t in thresholds)


def _worst_case_cell(worst: NormResult | None, n: int) -> str:
    if worst is None:
        return "—"
    return f"{_distance(worst.median_distance)} / {_percent(worst.accuracy, n)}"


def _minimal_rows(pairs: list[tuple[RunResult, ModelSummary]]) -> list[Row]:
    rows: list[Row] = [("clean accuracy", [_percent(s.clean_accuracy, s.n) for _, s in pairs])]
    order: dict[str, Norm] = {}
    for _, summary in pairs:
        for attack_result in summary.attacks.values():
            order.setdefault(attack_result.attack_id, attack_result.norm)
    for norm in NORMS:
        ids = [attack_id for attack_id, n in order.items() if n == norm]
        if not ids:
            continue
        thresholds = [
            next((a.threshold for a in s.attacks.values() if a.norm == norm), None)
            for _, s in pairs
        ]
        heading = f"**{NORM_NAMES[norm]} attacks** ({_threshold_heading(thresholds)})"
        rows.append((heading, ["" for _ in pairs]))
        for attack_id in ids:
            cells = []
            for _, summary in pairs:
                attack = summary.attacks.get(attack_id)
                cells.append("—" if attack is None else _percent(attack.accuracy, summary.n))
            rows.append((attack_id, cells))
        cells = []
        for _, summary in pairs:
            worst = summary.norms.get(norm)
            cells.append(_worst_case_cell(worst, summary.n))
        rows.append((f"all {NORM_NAMES[norm]} attacks: median / accuracy", cells))
    rows.append(("minimal accuracy", [_percent(s.minimal_accuracy, s.n) for _, s in pairs]))
    return rows


def _fixed_rows(pairs: list[tuple[RunResult, FixedSummary]]) -> list[Row]:
    rows: list[Row] = [
        ("clean accuracy", [_percent(s.clean_accuracy, s.n) for _, s in pairs]),
        ("robust accuracy", [_percent(s.robust_accuracy, s.n) for _, s in pairs]),
    ]
    attack_ids = list(dict.fromkeys(a for _, s in pairs for a in s.seconds_by_attack))
    for attack_id in attack_ids:
        rows.append(
            (f"broken by {attack_id}", [str(s.broken_by.count(attack_id)) for _, s in pairs])
        )
    merged = [_robust_over_runs(run, summary, pairs) for run, summary in pairs]
    if any(count is not None for count in merged):
        cells = [
            "—" if count is None else _percent(count[0] / summary.n, summary.n)
            for count, (_, summary) in zip(merged, pairs, strict=True)
        ]
        rows.append(("robust against every run of the model (worst case)", cells))
    return rows


def _robust_over_runs(
    run: RunResult, summary: FixedSummary, pairs: Sequence[tuple[RunResult, FixedSummary]]
) -> tuple[int, int] | None:
    """(samples robust in every run, runs) over the runs of the same model name and weights,
    samples, norm and epsilon as ``summary`` (DESIGN.md §3.2: a sample is robust only if every
    attack fails); None when it is the only such run or its weights are unknown. The name
    counts too: a wrapper without weights of its own (biCNN around the CNN) shares the
    fingerprint of what it wraps."""

    def setting(r: RunResult, s: FixedSummary) -> tuple[Any, ...]:
        return (
            s.model,
            s.fingerprint,
            r.config.dataset,
            r.config.split,
            r.config.indices,
            s.norm,
            s.epsilon,
        )

    same = [s for r, s in pairs if s.fingerprint and setting(r, s) == setting(run, summary)]
    if len(same) < 2:
        return None
    robust = sum(all(s.broken_by[i] is None for s in same) for i in range(summary.n))
    return robust, len(same)


def _rows(pairs: list[tuple[RunResult, ModelSummary | FixedSummary]]) -> list[Row]:
    if isinstance(pairs[0][1], ModelSummary):
        return _minimal_rows(pairs)  # type: ignore[arg-type]
    return _fixed_rows(pairs)  # type: ignore[arg-type]


def _detection_rows(pairs: list[tuple[RunResult, ModelSummary | FixedSummary]]) -> list[Row]:
    """One row per attack: AUC, TPR at 5% and 1% FPR, the number of pairs and, with a calibrated
    threshold, robust accuracy under rejection, per column; then the clean false rejections."""
    found: dict[str, dict[int, AttackDetection]] = {}
    rejections: dict[int, float] = {}
    for column, (_, summary) in enumerate(pairs):
        if isinstance(summary, ModelSummary):
            for detection in summary.detection:
                found.setdefault(detection.attack_id, {})[column] = detection
                if detection.clean_false_rejection_rate is not None:
                    rejections[column] = detection.clean_false_rejection_rate
    rows: list[Row] = []
    for attack_id, by_column in found.items():
        cells = []
        for column in range(len(pairs)):
            d = by_column.get(column)
            robust = (
                ""
                if d is None or d.robust_accuracy_at_threshold is None
                else f"; robust with rejection {100 * d.robust_accuracy_at_threshold:.1f}%"
            )
            cells.append(
                "—"
                if d is None
                else f"{d.auc:.3f} / {100 * d.tpr[0.05]:.1f}% / {100 * d.tpr[0.01]:.1f}% "
                f"({d.pairs}){robust}"
            )
        rows.append((attack_id, cells))
    if rejections:
        cells = [
            f"{100 * rejections[c]:.1f}%" if c in rejections else "—" for c in range(len(pairs))
        ]
        rows.append(("clean false rejections at the threshold", cells))
    return rows


def _timing_rows(pairs: list[tuple[RunResult, ModelSummary | FixedSummary]]) -> list[Row]:
    rows: list[Row] = []
    seen: list[str] = []
    for _, summary in pairs:
        names = summary.attacks if isinstance(summary, ModelSummary) else summary.seconds_by_attack
        seen.extend(a for a in names if a not in seen)
    for attack_id in seen:
        cells = []
        for _, summary in pairs:
            if isinstance(summary, ModelSummary) and attack_id in summary.attacks:
                attack = summary.attacks[attack_id]
                cells.append(
                    f"{attack.seconds:.1f} s ({attack.forward_calls} fwd, "
                    f"{attack.backward_calls} bwd)"
                )
            elif isinstance(summary, FixedSummary) and attack_id in summary.seconds_by_attack:
                cells.append(f"{summary.seconds_by_attack[attack_id]:.1f} s")
            else:
                cells.append("—")
        rows.append((attack_id, cells))
    return rows


def _footer(runs: Sequence[RunResult]) -> list[str]:
    lines = []
    for run in runs:
        config = run.config
        versions = run.provenance.get("versions", {})
        mode = (
            config.mode
            if config.mode == "minimal"
            else (
                f"fixed, {NORM_NAMES[config.norm] if config.norm else '?'} ε = {config.epsilon:g}"
            )
        )
        lines.append(
            f"{run.directory}: {config.dataset}/{config.split}, n = {config.n}, seed = "
            f"{config.seed}, suite {config.suite} v{config.suite_version}, mode {mode}, "
            f"torch {versions.get('torch')}, foolbox {versions.get('foolbox')}, "
            f"advdefense {versions.get('advdefense')} ({run.provenance.get('git_commit')})"
        )
    return lines


def _flags(pairs: list[tuple[RunResult, ModelSummary | FixedSummary]]) -> list[str]:
    lines: list[str] = []
    for column, (_, summary) in zip(_column_names(pairs), pairs, strict=True):
        lines.extend(f"{column}: {flag}" for flag in summary.flags)
    return lines


def report_json(runs: Sequence[RunResult]) -> dict[str, Any]:
    """The JSON form (docs/report-format.md): run metadata and, per column (the model's name,
    with its run directory where several runs hold that name), its numbers."""
    pairs = _models(runs)
    first = runs[0].config
    models: dict[str, Any] = {}
    for column, (run, summary) in zip(_column_names(pairs), pairs, strict=True):
        if isinstance(summary, ModelSummary):
            models[column] = {
                "clean_accuracy": summary.clean_accuracy,
                "attacks": {
                    a.attack_id: {
                        "norm": NORM_NAMES[a.norm],
                        "threshold": a.threshold,
                        "accuracy": a.accuracy,
                        "median_distance": _finite(a.median_distance),
                        "seconds": a.seconds,
                        "forward_calls": a.forward_calls,
                        "backward_calls": a.backward_calls,
                    }
                    for a in summary.attacks.values()
                },
                "norms": {
                    NORM_NAMES[norm]: {
                        "threshold": r.threshold,
                        "accuracy": r.accuracy,
                        "median_distance": _finite(r.median_distance),
                    }
                    for norm, r in summary.norms.items()
                },
                "minimal_accuracy": summary.minimal_accuracy,
                "detection": {
                    d.attack_id: {
                        "auc": d.auc,
                        "pairs": d.pairs,
                        **{f"tpr_at_fpr_{rate:g}": tpr for rate, tpr in d.tpr.items()},
                        "robust_accuracy_at_threshold": d.robust_accuracy_at_threshold,
                        "clean_false_rejection_rate": d.clean_false_rejection_rate,
                    }
                    for d in summary.detection
                },
                "flags": list(summary.flags),
                "run": str(run.directory),
            }
        else:
            models[column] = {
                "clean_accuracy": summary.clean_accuracy,
                "norm": NORM_NAMES[summary.norm],
                "epsilon": summary.epsilon,
                "robust_accuracy": summary.robust_accuracy,
                "broken_by": {a: summary.broken_by.count(a) for a in summary.seconds_by_attack},
                "seconds": summary.seconds_by_attack,
                **_merged_json(run, summary, pairs),
                "flags": list(summary.flags),
                "run": str(run.directory),
            }
    return {
        "dataset": first.dataset,
        "split": first.split,
        "n": first.n,
        "seed": first.seed,
        "suite": first.suite,
        "suite_version": first.suite_version,
        "mode": first.mode,
        "versions": runs[0].provenance.get("versions", {}),
        "models": models,
    }


def _merged_json(
    run: RunResult, summary: FixedSummary, pairs: Sequence[tuple[RunResult, Any]]
) -> dict[str, Any]:
    fixed = [(r, s) for r, s in pairs if isinstance(s, FixedSummary)]
    merged = _robust_over_runs(run, summary, fixed)
    if merged is None:
        return {}
    return {"robust_accuracy_over_runs": merged[0] / summary.n, "runs_merged": merged[1]}


def render(runs: Sequence[RunResult], output_format: str) -> str:
    """All models of ``runs`` side by side in ``output_format`` (md, csv, json or html)."""
    if output_format not in FORMATS:
        raise InputError(f"unknown format {output_format!r}; choose one of {', '.join(FORMATS)}")
    if not runs:
        raise InputError("nothing to report: pass at least one run directory")
    if output_format == "json":
        return json.dumps(report_json(runs), indent=2) + "\n"
    pairs = _models(runs)
    header = ["", *_column_names(pairs)]
    rows = _rows(pairs)
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows([label, *cells] for label, cells in rows)
        return buffer.getvalue()
    timing, footer, flags = _timing_rows(pairs), _footer(runs), _flags(pairs)
    detection = _detection_rows(pairs)
    detection_md = (
        [
            "Detection (gray-box; pairs = clean-correct samples whose adversarial breaks the "
            "classifier within the threshold): AUC / TPR at 5% FPR / TPR at 1% FPR (pairs)",
            "",
            *_markdown_table(["attack", *header[1:]], detection),
            "",
        ]
        if detection
        else []
    )
    if output_format == "md":
        return "\n".join(
            [
                *_markdown_table(header, rows),
                "",
                "Cells: accuracy at the threshold [95% Wilson interval]; median distances over "
                "all samples (0 = misclassified clean, ∞ = never broken).",
                "",
                *detection_md,
                "Flags: " + ("none" if not flags else ""),
                *(f"- {flag}" for flag in flags),
                "",
                "Wall time per attack (forward/backward passes):",
                "",
                *_markdown_table(["attack", *header[1:]], timing),
                "",
                *(f"- {line}" for line in footer),
                "",
            ]
        )
    return _html(header, rows, timing, flags, footer, detection)


def _markdown_table(header: list[str], rows: list[Row]) -> list[str]:
    return markdown_table(header, ([label, *cells] for label, cells in rows))


def _html_table(header: list[str], rows: list[Row]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr><th>{html.escape(label.replace('**', ''))}</th>"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
        + "</tr>"
        for label, cells in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(
    header: list[str],
    rows: list[Row],
    timing: list[Row],
    flags: list[str],
    footer: list[str],
    detection: list[Row],
) -> str:
    items = "".join(f"<li>{html.escape(f)}</li>" for f in flags) or "<li>none</li>"
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in footer)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>advdefense report</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
        "</style></head><body>"
        + _html_table(header, rows)
        + (
            "<h3>Detection: AUC / TPR at 5% / TPR at 1% FPR (pairs)</h3>"
            + _html_table(["attack", *header[1:]], detection)
            if detection
            else ""
        )
        + f"<h3>Flags</h3><ul>{items}</ul><h3>Wall time</h3>"
        + _html_table(["attack", *header[1:]], timing)
        + f"<ul>{notes}</ul></body></html>\n"
    )


def plot_accuracy_curves(runs: Sequence[RunResult], path: str | Path) -> Path:
    """Worst-case accuracy vs epsilon, one panel per norm, one line per model (minimal mode)."""
    pairs = [(r, s) for r, s in _models(runs) if isinstance(s, ModelSummary)]
    if not pairs:
        raise InputError("accuracy-vs-epsilon plots need minimal-mode runs")
    norms = [n for n in NORMS if any(n in s.norms for _, s in pairs)]
    figure, axes = new_figure(len(norms), height=3.8)
    columns = _column_names(pairs)
    for axis, norm in zip(axes[0], norms, strict=True):
        for column, (_, summary) in zip(columns, pairs, strict=True):
            if norm in summary.norms:
                result = summary.norms[norm]
                epsilons, accuracies = zip(*result.curve(), strict=True)
                axis.plot(epsilons, [100 * a for a in accuracies], label=column)
                axis.axvline(result.threshold, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"all {NORM_NAMES[norm]} attacks")
        axis.set_xlabel("epsilon")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return save_figure(figure, path)


def write_reports(run: RunResult) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and (minimal mode) the accuracy plot into the run."""
    files = {"md": run.directory / "report.md", "json": run.directory / "report.json"}
    files["md"].write_text(render([run], "md"))
    files["json"].write_text(render([run], "json"))
    if run.config.mode == "minimal":
        files["plot"] = plot_accuracy_curves([run], run.directory / "accuracy_vs_epsilon.png")
    for summary in run.summaries:
        if isinstance(summary, ModelSummary) and summary.detection:
            files[f"roc-{summary.model}"] = plot_roc(
                {d.attack_id: (d.fpr_curve, d.tpr_curve) for d in summary.detection},
                run.directory / f"roc_{summary.model}.png",
                aucs={d.attack_id: d.auc for d in summary.detection},
            )
    return files
