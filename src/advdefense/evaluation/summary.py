"""From stored records to the numbers a report shows (DIM paper Table 1; DESIGN.md §3.2).

Per attack: accuracy at the norm's threshold and the median distance. Per norm, the worst case
over its attacks ("All L2 attacks"): a sample is broken when any attack breaks it within the
threshold, and its minimal distance is the minimum over those attacks. Overall, the minimal
accuracy across attacks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from advdefense.attacks.norms import NORMS, Norm
from advdefense.errors import UserError
from advdefense.evaluation.store import ResultStore

__all__ = [
    "AttackResult",
    "FixedSummary",
    "ModelSummary",
    "NormResult",
    "accuracy_at",
    "broken_at",
    "summarize_fixed",
    "summarize_minimal",
]

NORM_TOLERANCE = 1e-5
FloatArray = npt.NDArray[np.float64]


def broken_at(distances: FloatArray, epsilon: float) -> npt.NDArray[np.bool_]:
    """Per sample: broken within ``epsilon`` (the norm check's float tolerance included)."""
    budget = epsilon * (1 + NORM_TOLERANCE) + NORM_TOLERANCE
    return np.asarray(distances) <= budget


def accuracy_at(distances: FloatArray, epsilon: float) -> float:
    """Fraction of samples whose minimal adversarial distance exceeds ``epsilon``."""
    if distances.size == 0:
        return math.nan
    return float(np.mean(~broken_at(distances, epsilon)))


def _median(distances: FloatArray) -> float:
    return float(np.median(distances)) if distances.size else math.nan


class _DistanceStatistics:
    """Accuracy at the threshold and median of ``distances`` (for the classes below)."""

    threshold: float
    distances: FloatArray

    @property
    def accuracy(self) -> float:
        return accuracy_at(self.distances, self.threshold)

    @property
    def median_distance(self) -> float:
        return _median(self.distances)


@dataclass(frozen=True)
class AttackResult(_DistanceStatistics):
    """One attack on every sample: distances (0 = clean error, inf = never broken) and costs."""

    attack_id: str
    norm: Norm
    threshold: float
    distances: FloatArray
    adversarial_labels: npt.NDArray[np.int64]
    seconds: float
    forward_calls: int
    backward_calls: int
    grid: tuple[float, ...] | None = None
    grid_success: tuple[int, ...] | None = None
    errors: tuple[str, ...] = ()
    solver_stalls: tuple[str, ...] = ()  # samples whose solver the attack abandoned


@dataclass(frozen=True)
class NormResult(_DistanceStatistics):
    """Worst case over every attack of one norm."""

    norm: Norm
    threshold: float
    distances: FloatArray

    def curve(self, points: int = 50) -> list[tuple[float, float]]:
        """(epsilon, worst-case accuracy) from 0 to twice the threshold."""
        top = 2 * self.threshold
        return [
            (top * k / (points - 1), accuracy_at(self.distances, top * k / (points - 1)))
            for k in range(points)
        ]


@dataclass(frozen=True)
class ModelSummary:
    """Everything the report shows for one model in minimal mode."""

    model: str
    n: int
    clean_accuracy: float
    attacks: dict[str, AttackResult]
    norms: dict[Norm, NormResult]
    flags: list[str] = field(default_factory=list)
    detection: list[Any] = field(default_factory=list)  # AttackDetection, when a detector ran
    pending: list[str] = field(default_factory=list)  # attacks without results yet (partial)
    fingerprint: str = ""  # the model's weights (run.json), so stages of one model can be merged

    @property
    def minimal_accuracy(self) -> float:
        """The lowest accuracy any single attack reached at its threshold."""
        return min((a.accuracy for a in self.attacks.values()), default=math.nan)


@dataclass(frozen=True)
class FixedSummary:
    """Fixed-epsilon result of one model: robust accuracy and who broke each sample."""

    model: str
    norm: Norm
    epsilon: float
    n: int
    clean_accuracy: float
    broken_by: list[str | None]  # per sample: "clean" (misclassified), an attack id, or None
    seconds_by_attack: dict[str, float]
    fingerprint: str = ""  # the model's weights (run.json), so runs of one model can be merged
    errors: dict[str, tuple[str, ...]] = field(default_factory=dict)  # attack id -> errors
    solver_stalls: dict[str, tuple[str, ...]] = field(default_factory=dict)  # attack id -> notes
    flags: list[str] = field(default_factory=list)  # filled by the run (sanity checks)

    @property
    def robust_accuracy(self) -> float:
        return sum(b is None for b in self.broken_by) / self.n if self.n else math.nan


@dataclass
class _Accumulator:
    """Per-attack fields filled in batch by batch."""

    norm: Norm
    distances: FloatArray
    labels: npt.NDArray[np.int64]
    grid: list[float] | None
    grid_success: list[int] | None = None
    seconds: float = 0.0
    forward_calls: int = 0
    backward_calls: int = 0
    errors: list[str] = field(default_factory=list)
    solver_stalls: list[str] = field(default_factory=list)

    def result(self, attack_id: str, threshold: float) -> AttackResult:
        if np.isnan(self.distances).any():
            raise UserError(f"attack {attack_id} has no result for some samples; rerun it")
        return AttackResult(
            attack_id,
            self.norm,
            threshold,
            self.distances,
            self.labels,
            self.seconds,
            self.forward_calls,
            self.backward_calls,
            tuple(self.grid) if self.grid else None,
            tuple(self.grid_success) if self.grid_success else None,
            tuple(dict.fromkeys(self.errors)),
            tuple(dict.fromkeys(self.solver_stalls)),
        )


def _record(store: ResultStore, key: str) -> dict[str, Any]:
    record = store.get(key)
    if record is None:
        raise UserError(f"record {key} is missing from {store.path}; rerun the evaluation")
    return record


def summarize_minimal(
    store: ResultStore,
    keys: Sequence[str],
    *,
    model: str,
    indices: Sequence[int],
    thresholds: dict[Norm, float],
    planned: Sequence[str] = (),
    allow_partial: bool = False,
    fingerprint: str = "",
) -> ModelSummary:
    """Assemble the per-sample distances of every attack from the records under ``keys``.

    With ``allow_partial``, keys without a record yet are skipped and every attack missing a
    batch is left out and listed in ``pending`` (``planned`` names the attack of each key).
    """
    position = {index: p for p, index in enumerate(indices)}
    n = len(indices)
    accumulators: dict[str, _Accumulator] = {}
    clean_correct = np.zeros(n, dtype=bool)
    seen = np.zeros(n, dtype=bool)
    pending: list[str] = []
    for number, key in enumerate(keys):
        if allow_partial and key not in store:
            attack_id = planned[number] if number < len(planned) else key
            pending.extend([attack_id] if attack_id not in pending else [])
            continue
        record = _record(store, key)
        slot = accumulators.setdefault(
            record["attack"],
            _Accumulator(
                record["norm"],
                np.full(n, np.nan),
                np.full(n, -1, dtype=np.int64),
                record.get("grid"),
            ),
        )
        where = [position[i] for i in record["indices"]]
        slot.distances[where] = record["distances"]
        slot.labels[where] = record["adversarial_labels"]
        clean_correct[where] = record["clean_correct"]
        seen[where] = True
        slot.seconds += record["seconds"]
        slot.forward_calls += record["forward_calls"]
        slot.backward_calls += record["backward_calls"]
        if record.get("error"):
            slot.errors.append(record["error"])
        if record.get("solver_stalls"):
            slot.solver_stalls.append(record["solver_stalls"])
        if record.get("grid_success") is not None:
            previous = slot.grid_success or [0] * len(record["grid_success"])
            slot.grid_success = [
                a + b for a, b in zip(previous, record["grid_success"], strict=True)
            ]
    if not seen.all():
        raise UserError(
            f"{int((~seen).sum())} of {n} samples have no finished attack yet; nothing to "
            "report for them (wait for the run, or rerun its command to resume)"
        )
    attacks = {
        attack_id: slot.result(attack_id, thresholds[slot.norm])
        for attack_id, slot in accumulators.items()
        if attack_id not in pending
    }
    norms: dict[Norm, NormResult] = {}
    for norm in NORMS:
        same = [a.distances for a in attacks.values() if a.norm == norm]
        if same:
            norms[norm] = NormResult(norm, thresholds[norm], np.min(np.stack(same), axis=0))
    accuracy = float(clean_correct.mean()) if n else math.nan
    summary = ModelSummary(model, n, accuracy, attacks, norms, fingerprint=fingerprint)
    summary.pending.extend(pending)
    return summary


def summarize_fixed(
    store: ResultStore,
    keys: Sequence[str],
    *,
    model: str,
    indices: Sequence[int],
    clean_correct: Sequence[bool],
    norm: Norm,
    epsilon: float,
    fingerprint: str = "",
) -> FixedSummary:
    """Robust accuracy at ``epsilon`` and, per sample, the first attack that broke it."""
    position = {index: p for p, index in enumerate(indices)}
    broken_by: list[str | None] = [None if ok else "clean" for ok in clean_correct]
    seconds: dict[str, float] = {}
    errors: dict[str, dict[str, None]] = {}
    stalls: dict[str, dict[str, None]] = {}
    for key in keys:
        record = _record(store, key)
        seconds[record["attack"]] = seconds.get(record["attack"], 0.0) + record["seconds"]
        if record.get("error"):
            errors.setdefault(record["attack"], {})[record["error"]] = None
        if record.get("solver_stalls"):
            stalls.setdefault(record["attack"], {})[record["solver_stalls"]] = None
        for index, broken in zip(record["indices"], record["broken"], strict=True):
            if broken and broken_by[position[index]] is None:
                broken_by[position[index]] = record["attack"]
    n = len(indices)
    clean = sum(clean_correct) / n if n else math.nan
    return FixedSummary(
        model,
        norm,
        epsilon,
        n,
        clean,
        broken_by,
        seconds,
        fingerprint,
        {attack: tuple(found) for attack, found in errors.items()},
        {attack: tuple(found) for attack, found in stalls.items()},
    )
