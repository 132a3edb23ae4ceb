"""The evaluation record: one model's clean and robust accuracies, with everything to rerun them.

Stored as ``results.json`` in a run directory; ``advdefense report`` renders one or more.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advdefense.attacks.catalog import get_attack
from advdefense.attacks.norms import Norm, default_threshold
from advdefense.errors import InputError, UserError
from advdefense.evaluation.robustness import clean_accuracy, evaluate_attack
from advdefense.provenance import provenance
from advdefense.validation import check_positive_int

__all__ = ["AttackSummary", "EvaluationRecord", "evaluate_model", "read_record", "write_record"]

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class AttackSummary:
    """Robust accuracy of one attack at its threshold, and the curve up to it."""

    norm: Norm
    epsilon: float
    accuracy: float
    robust: int
    curve: list[tuple[float, float]]
    seconds: float
    description: str


@dataclass(frozen=True)
class EvaluationRecord:
    """Clean and robust accuracy of one model on ``n`` samples of a dataset split."""

    model: str
    dataset: str
    split: str
    n: int
    seed: int
    clean_accuracy: float
    attacks: dict[str, AttackSummary]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvaluationRecord:
        attacks = {
            attack_id: AttackSummary(**{**summary, "curve": [tuple(p) for p in summary["curve"]]})
            for attack_id, summary in data["attacks"].items()
        }
        return cls(**{**data, "attacks": attacks})


def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack_ids: Sequence[str],
    *,
    model_name: str,
    dataset: str,
    split: str,
    seed: int,
    epsilons: dict[Norm, float] | None = None,
    batch_size: int = 200,
    curve_points: int = 4,
    progress: bool = True,
) -> EvaluationRecord:
    """Clean accuracy, then each attack on ``curve_points`` epsilons from 0 to its threshold.

    Fixed-epsilon attacks (PGD) run once per grid point, so the grid size multiplies their cost.
    """
    check_positive_int(curve_points - 1, "curve_points - 1")
    entries = [get_attack(attack_id) for attack_id in attack_ids]
    thresholds = dict(epsilons or {})
    summaries: dict[str, AttackSummary] = {}
    for entry in entries:
        threshold = thresholds.get(entry.norm)
        if threshold is None:
            threshold = default_threshold(dataset, entry.norm)
        if threshold <= 0:
            raise InputError(f"the {entry.norm} epsilon must be positive, got {threshold}")
        grid = [threshold * step / (curve_points - 1) for step in range(curve_points)]
        torch.manual_seed(seed)
        outcome = evaluate_attack(
            model, images, labels, entry, grid, batch_size=batch_size, progress=progress
        )
        final_row = outcome.robust[-1]
        summaries[entry.id] = AttackSummary(
            norm=entry.norm,
            epsilon=threshold,
            accuracy=outcome.accuracy_at(outcome.epsilons[-1]),
            robust=int(final_row.sum()),
            curve=outcome.accuracy_curve(),
            seconds=round(outcome.seconds, 3),
            description=entry.description,
        )
    return EvaluationRecord(
        model=model_name,
        dataset=dataset,
        split=split,
        n=int(images.shape[0]),
        seed=seed,
        clean_accuracy=clean_accuracy(model, images, labels),
        attacks=summaries,
        provenance=provenance(),
    )


def write_record(record: EvaluationRecord, directory: Path) -> Path:
    """Write ``results.json`` into ``directory`` (created if needed); return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULTS_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    temporary.replace(path)
    return path


def read_record(path: Path) -> EvaluationRecord:
    """Read a record from a run directory or a ``results.json`` file."""
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no evaluation results at {file}; run `advdefense evaluate` first")
    try:
        return EvaluationRecord.from_json(json.loads(file.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{file} is not an advdefense results file ({error})") from None
