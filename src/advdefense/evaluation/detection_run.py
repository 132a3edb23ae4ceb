"""Detection results of a minimal-mode run (the PDM and GCD papers' protocol, gray-box).

For each attack, the pairs are the samples classified correctly when clean whose stored
adversarial breaks the classifier within the norm's threshold; the detector scores the clean
image and its adversarial. ROC AUC and TPR at 5% and 1% FPR are computed on those pairs. With
the detector's own calibrated threshold (set on held-out clean data), robust accuracy under
rejection counts a sample as robust when its clean image is classified correctly and not
rejected, and its adversarial either failed within the threshold or is rejected. The attacks
did not know the detector (gray-box): a detector-aware attack is a separate entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from advdefense.attacks.norms import Norm
from advdefense.defenses.detector import Detector, detector_scores
from advdefense.evaluation.detection import roc_auc, roc_curve, tpr_at_fpr
from advdefense.evaluation.store import ResultStore
from advdefense.evaluation.summary import NORM_TOLERANCE

__all__ = ["DETECTION_FPRS", "AttackDetection", "detection_scores", "summarize_detection"]

DETECTION_FPRS = (0.05, 0.01)


def detection_scores(
    detector: Detector,
    store: ResultStore,
    keys: Sequence[str],
    images: torch.Tensor,
    indices: Sequence[int],
    thresholds: dict[Norm, float],
) -> dict[str, Any]:
    """Detector scores of every clean image and of each attack's successful adversarials."""
    position = {index: p for p, index in enumerate(indices)}
    clean = detector_scores(detector, images)
    threshold = detector.threshold
    clean_rejected = [threshold is not None and float(s) > threshold for s in clean]
    attacks: dict[str, Any] = {}
    for key in keys:
        record = store.get(key)
        adversarials = store.adversarials(key)
        if record is None or adversarials is None:
            continue
        budget = thresholds[record["norm"]] * (1 + NORM_TOLERANCE) + NORM_TOLERANCE
        chosen = [
            row
            for row, (distance, correct) in enumerate(
                zip(record["distances"], record["clean_correct"], strict=True)
            )
            if correct and distance <= budget
        ]
        entry = attacks.setdefault(
            record["attack"], {"positions": [], "scores": [], "robust_under_rejection": 0}
        )
        scores = detector_scores(detector, adversarials[chosen]) if chosen else torch.empty(0)
        entry["positions"].extend(position[record["indices"][row]] for row in chosen)
        entry["scores"].extend(float(s) for s in scores)
        if threshold is not None:  # robust: clean correct and kept, adversarial failed or caught
            caught = {
                row: float(score) > threshold for row, score in zip(chosen, scores, strict=True)
            }
            entry["robust_under_rejection"] += sum(
                1
                for row, correct in enumerate(record["clean_correct"])
                if correct
                and not clean_rejected[position[record["indices"][row]]]
                and caught.get(row, True)
            )
    return {
        "detector": type(detector).__name__,
        "threshold": detector.threshold,
        "false_positive_rate": detector.false_positive_rate,
        "clean_scores": [float(s) for s in clean],
        "clean_false_rejection_rate": (
            sum(clean_rejected) / len(clean_rejected) if threshold is not None else None
        ),
        "attacks": attacks,
    }


@dataclass(frozen=True)
class AttackDetection:
    """Detection of one attack's successful adversarials."""

    attack_id: str
    pairs: int
    auc: float
    tpr: dict[float, float]
    fpr_curve: np.ndarray
    tpr_curve: np.ndarray
    robust_accuracy_at_threshold: float | None  # with the detector's calibrated threshold
    clean_false_rejection_rate: float | None  # of all n clean images, at that threshold


def summarize_detection(scores: dict[str, Any]) -> list[AttackDetection]:
    """AUC, TPR at each of :data:`DETECTION_FPRS` and the ROC curve, per attack with pairs."""
    clean = np.asarray(scores["clean_scores"], dtype=np.float64)
    calibrated = scores.get("threshold") is not None
    results = []
    for attack_id, entry in scores["attacks"].items():
        if not entry["positions"]:
            continue
        negatives = clean[entry["positions"]]
        positives = np.asarray(entry["scores"], dtype=np.float64)
        fpr, tpr, _ = roc_curve(negatives, positives)
        results.append(
            AttackDetection(
                attack_id,
                len(positives),
                roc_auc(negatives, positives),
                {rate: tpr_at_fpr(negatives, positives, rate) for rate in DETECTION_FPRS},
                fpr,
                tpr,
                entry["robust_under_rejection"] / clean.size if calibrated else None,
                scores.get("clean_false_rejection_rate"),
            )
        )
    return results
