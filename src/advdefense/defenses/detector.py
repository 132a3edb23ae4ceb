"""Detectors, and the rejecting classifier that lets every attack target them.

A :class:`Detector` scores inputs (higher = more suspicious) and rejects those whose score lies
strictly above a threshold calibrated on held-out clean data at a stated false-positive rate
(Feinman et al. 2017, "Detecting adversarial samples from artifacts", Sec. 4). A
:class:`RejectingClassifier` composes a classifier and a calibrated detector into one model with
K + 1 outputs, the last meaning "rejected", so an attack must find an input that is misclassified
AND not rejected, the evaluation of Carlini & Wagner 2017 ("Adversarial examples are not easily
detected", Sec. 3). :class:`MisclassifiedAndNotRejected` is that success criterion for Foolbox.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import TypeVar

import torch
from eagerpy.astensor import astensor_
from eagerpy.framework import logical_and
from eagerpy.tensor.tensor import Tensor as EagerTensor
from foolbox.criteria import Misclassification
from torch import nn

from advdefense.errors import InputError
from advdefense.modes import device_of, evaluation_mode
from advdefense.validation import (
    check_images,
    check_labels,
    check_model_dtype,
    check_positive_int,
    check_probability,
)

__all__ = [
    "Detector",
    "MisclassifiedAndNotRejected",
    "RejectingClassifier",
    "calibration_threshold",
    "detector_scores",
]

T = TypeVar("T")


def calibration_threshold(clean_scores: torch.Tensor, false_positive_rate: float) -> float:
    """The rejection threshold for ``false_positive_rate`` on ``clean_scores``.

    Rule: with n clean scores and m = floor(n * fpr) the number allowed above the threshold, the
    threshold is the (n - m)-th smallest score (an order statistic, so one of the scores
    itself). A score is rejected when it is strictly greater than the threshold, so at most m
    clean scores, a fraction <= fpr, are rejected: exactly floor(n * fpr) / n when the scores
    have no ties at the threshold, fewer when they do. It is the smallest score with that
    property, i.e. the highest true-positive rate the fpr allows.
    """
    scores = _check_scores(clean_scores, "clean_scores")
    _check_open_rate(false_positive_rate, "false_positive_rate")
    count = scores.numel()
    allowed_above = math.floor(false_positive_rate * count + 1e-9)
    if allowed_above == 0:
        warnings.warn(
            f"{count} clean scores are too few for a false-positive rate of "
            f"{false_positive_rate}: the threshold is their maximum and the rate on fresh data "
            f"will be about 1/{count + 1}; calibrate on at least "
            f"{math.ceil(1 / false_positive_rate)} clean images",
            UserWarning,
            stacklevel=2,
        )
    ordered = torch.sort(scores.detach().flatten()).values
    return float(ordered[count - allowed_above - 1])


def _check_open_rate(value: float, name: str) -> float:
    check_probability(value, name)
    if not 0.0 < value < 1.0:
        raise InputError(f"{name} must lie strictly between 0 and 1, got {value}")
    return value


def _check_scores(scores: object, name: str, *, count: int | None = None) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise InputError(
            f"{name} must be a non-empty vector (one score per image), got shape "
            f"{tuple(scores.shape)}"
        )
    if count is not None and scores.numel() != count:
        raise InputError(f"{name} has {scores.numel()} entries but there are {count} images")
    if not bool(torch.isfinite(scores).all()):
        raise InputError(f"{name} contains {int((~torch.isfinite(scores)).sum())} NaN/inf values")
    return scores


class Detector(nn.Module, ABC):
    """Base class of adversarial-example detectors: ``score(images) -> N``, higher = suspicious.

    Subclasses implement :meth:`score`, differentiably where the method allows, so that
    detector-aware attacks can follow its gradient. The threshold and the rate it was calibrated
    for are buffers (NaN until :meth:`calibrate`), so they travel with the weights.
    """

    reject_threshold: torch.Tensor
    calibration_false_positive_rate: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        nan = torch.tensor(math.nan, dtype=torch.float64)
        self.register_buffer("reject_threshold", nan.clone())
        self.register_buffer("calibration_false_positive_rate", nan.clone())

    @abstractmethod
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """One suspicion score per image (N), higher meaning more likely adversarial."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.score(images)

    @property
    def threshold(self) -> float | None:
        """Scores strictly above this are rejected; None before :meth:`calibrate`."""
        value = float(self.reject_threshold)
        return None if math.isnan(value) else value

    @property
    def false_positive_rate(self) -> float | None:
        """The clean false-positive rate the threshold was calibrated for; None before."""
        value = float(self.calibration_false_positive_rate)
        return None if math.isnan(value) else value

    def calibrate(
        self, clean_images: torch.Tensor, false_positive_rate: float, *, batch_size: int = 500
    ) -> float:
        """Set and return the threshold for ``false_positive_rate`` on held-out clean images.

        Use clean data the evaluation does not attack (DESIGN §3 rule 1); the rule is that of
        :func:`calibration_threshold`, so at most that fraction of these images is rejected.
        """
        check_images(clean_images, "clean_images")
        _check_open_rate(false_positive_rate, "false_positive_rate")
        scores = detector_scores(self, clean_images, batch_size=batch_size)
        threshold = calibration_threshold(scores, false_positive_rate)
        self.reject_threshold.fill_(threshold)
        self.calibration_false_positive_rate.fill_(false_positive_rate)
        return threshold

    def require_threshold(self) -> float:
        """The threshold, or an :class:`InputError` saying to calibrate first."""
        threshold = self.threshold
        if threshold is None:
            raise InputError(
                f"{type(self).__name__} has no threshold yet: call "
                "detector.calibrate(held_out_clean_images, false_positive_rate) first"
            )
        return threshold

    def is_rejected(self, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
        """Bool vector (N): True where the score lies strictly above the threshold."""
        self.require_threshold()
        scores = detector_scores(self, images, batch_size=batch_size)
        return scores > self.reject_threshold.to(scores.device)


@torch.no_grad()
def detector_scores(
    detector: Detector, images: torch.Tensor, *, batch_size: int = 500
) -> torch.Tensor:
    """Scores of ``images`` (N, on the CPU) in batches, with the detector in eval mode."""
    check_images(images, "images")
    check_model_dtype(images, detector, forward=detector.score)
    check_positive_int(batch_size, "batch_size")
    device = device_of(detector)
    with evaluation_mode(detector):
        batches = [
            detector.score(images[start : start + batch_size].to(device)).cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    return _check_scores(torch.cat(batches), f"{type(detector).__name__}.score", count=len(images))


class RejectingClassifier(nn.Module):
    """A classifier with a reject option: N x (K + 1) scores, column K meaning "rejected".

    Column K is ``max_k scores_k + rejection_scale * (score(x) - threshold)``, so its argmax is
    K exactly when the detector rejects (score strictly above the threshold; a tie at the
    threshold goes to the class, as argmax returns the first maximum), and it is differentiable
    through both the classifier and the detector (Carlini & Wagner 2017, Sec. 3: attack the
    combined model, not the classifier alone).

    An attack with true label y succeeds only when the argmax is neither y nor K, so Foolbox's
    ``Misclassification(y)`` is NOT the right criterion (it counts rejected inputs as
    successes); use :class:`MisclassifiedAndNotRejected`.
    """

    def __init__(
        self, classifier: nn.Module, detector: Detector, *, rejection_scale: float = 1.0
    ) -> None:
        super().__init__()
        if not isinstance(detector, Detector):
            raise InputError(f"detector must be a Detector, got {type(detector).__name__}")
        detector.require_threshold()
        if not (math.isfinite(rejection_scale) and rejection_scale > 0):
            raise InputError(f"rejection_scale must be a positive number, got {rejection_scale}")
        self.classifier = classifier
        self.detector = detector
        self.rejection_scale = float(rejection_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.detector.require_threshold()
        class_scores: torch.Tensor = self.classifier(images)
        suspicion = self.detector.score(images)
        threshold = self.detector.reject_threshold.to(suspicion.dtype)
        best = class_scores.max(dim=1).values
        reject_score = best + self.rejection_scale * (suspicion - threshold).to(best.dtype)
        # In floating point, best + a tiny positive margin can round back to best; nudge it up
        # one ulp so that "argmax == K" and "rejected" agree exactly.
        rejected = suspicion > threshold
        ulp = torch.nextafter(best.detach(), torch.full_like(best, math.inf)) - best.detach()
        nudged = best + ulp
        reject_score = torch.where(rejected & (reject_score <= best), nudged, reject_score)
        return torch.cat([class_scores, reject_score.unsqueeze(1)], dim=1)

    def rejection_rate(self, images: torch.Tensor, *, batch_size: int = 500) -> float:
        """Fraction of ``images`` the detector rejects."""
        return float(self.detector.is_rejected(images, batch_size=batch_size).float().mean())


class MisclassifiedAndNotRejected(Misclassification):
    """Foolbox criterion for a :class:`RejectingClassifier`: argmax is neither the label nor K.

    It subclasses Foolbox's ``Misclassification`` (hence ``Criterion``) only because Foolbox's
    gradient attacks accept no other untargeted criterion; they take ``labels`` from it for
    their loss (cross-entropy over the K + 1 columns, which does not steer away from rejection:
    a detector-aware loss is the adaptive attack's job), while success is judged by
    :meth:`__call__` below.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        check_positive_int(num_classes, "num_classes")
        check_labels(labels, "labels", num_classes=num_classes)
        super().__init__(labels)
        self.num_classes = num_classes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.labels!r}, num_classes={self.num_classes})"

    def __call__(self, perturbed: T, outputs: T) -> T:
        outputs_, restore_type = astensor_(outputs)
        del perturbed
        if outputs_.shape[-1] != self.num_classes + 1:
            raise InputError(
                f"outputs must have num_classes + 1 = {self.num_classes + 1} columns (the last "
                f"meaning rejected), got shape {tuple(outputs_.shape)}; attack the "
                "RejectingClassifier, not the bare classifier"
            )
        classes = outputs_.argmax(axis=-1)
        misclassified = classes != self.labels
        not_rejected = classes != self.num_classes
        adversarial: EagerTensor = logical_and(misclassified, not_rejected)
        return restore_type(adversarial)
