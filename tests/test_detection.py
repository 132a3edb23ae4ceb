"""Detectors, the rejecting classifier, its Foolbox criterion and the detection metrics."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from eagerpy.astensor import astensor
from eagerpy.tensor.tensor import Tensor as EagerTensor
from foolbox.attacks.projected_gradient_descent import L2ProjectedGradientDescentAttack
from foolbox.criteria import Misclassification
from foolbox.models.pytorch import PyTorchModel
from torch import nn

from advdefense.defenses.detector import (
    Detector,
    MisclassifiedAndNotRejected,
    RejectingClassifier,
    calibration_threshold,
)
from advdefense.errors import InputError
from advdefense.evaluation.detection import (
    detection_report,
    plot_roc,
    robust_accuracy_at_fpr,
    robust_under_rejection,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)


class Brightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5, else class 0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        score = 20 * (images.flatten(1).mean(1) - 0.5)
        return torch.stack([-score, score], dim=1)


class DistanceDetector(Detector):
    """Suspicion = L2 distance of the image from a clean mean."""

    def __init__(self, centre: float) -> None:
        super().__init__()
        self.centre = centre

    def score(self, images: torch.Tensor) -> torch.Tensor:
        distance: torch.Tensor = (images - self.centre).flatten(1).norm(dim=1)
        return distance


class ProjectionDetector(Detector):
    """Suspicion = a fixed random projection of the pixels (about Gaussian, no ties)."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.weights = nn.Parameter(torch.randn(pixels, generator=generator, dtype=torch.float64))
        self.dropout = nn.Dropout(0.0)

    def score(self, images: torch.Tensor) -> torch.Tensor:
        projection: torch.Tensor = self.dropout(images.flatten(1).to(torch.float64)) @ self.weights
        return projection


class PixelClassifier(nn.Module):
    """1 x 1 x 1 x 2 images: pixel 0 above 0.5 means class 1."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        score = 10 * (images[:, 0, 0, 0] - 0.5)
        return torch.stack([-score, score], dim=1)


class PixelDetector(Detector):
    """1 x 1 x 1 x 2 images: pixel 1 is the suspicion score."""

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, 1]


def _pixel_images(predictions: list[int], scores: list[float]) -> torch.Tensor:
    """Images that PixelClassifier labels ``predictions`` and PixelDetector scores ``scores``."""
    class_pixel = [0.75 if prediction == 1 else 0.25 for prediction in predictions]
    return torch.tensor([class_pixel, scores], dtype=torch.float32).T.reshape(-1, 1, 1, 2)


def _calibrated_pixel_detector(false_positive_rate: float = 0.3) -> PixelDetector:
    """Threshold 0.35: the 7th smallest of 0.05, 0.10, ..., 0.50 (3 of 10 lie above it)."""
    detector = PixelDetector()
    held_out = _pixel_images([0] * 10, [0.05 * k for k in range(1, 11)])
    detector.calibrate(held_out, false_positive_rate)
    return detector


def _clustered(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 around brightness 0.3, class 1 around 0.7, on 1 x 2 x 2 images."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    centres = (0.3 + 0.4 * labels.float()).view(n, 1, 1, 1)
    images = (centres + 0.05 * torch.randn(n, 1, 2, 2, generator=generator)).clamp(0, 1)
    return images, labels


# --- score metrics -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clean", "adversarial", "expected"),
    [
        # Pairs (adversarial > clean, ties 1/2): 2 -> 2.5, 3 -> 3.5, 4 -> 4, 5 -> 4; 14 of 16.
        ([0, 1, 2, 3], [2, 3, 4, 5], 14 / 16),
        ([0, 1, 2], [3, 4], 1.0),
        ([1, 2, 3], [1, 2, 3], 0.5),
        ([7, 7], [7], 0.5),
        ([5, 6], [1, 2], 0.0),
    ],
)
def test_roc_auc_known_values(
    clean: list[float], adversarial: list[float], expected: float
) -> None:
    assert roc_auc(clean, adversarial) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(torch.tensor(clean), np.array(adversarial)) == pytest.approx(expected)


def _pairwise_auc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    wins = sum(
        1.0 if a > c else 0.5 if a == c else 0.0 for c, a in itertools.product(clean, adversarial)
    )
    return wins / (clean.size * adversarial.size)


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_matches_brute_force_and_curve_area(seed: int) -> None:
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 12, size=40).astype(float)  # small integers: many ties
    adversarial = rng.integers(3, 15, size=25).astype(float)
    auc = roc_auc(clean, adversarial)
    assert auc == pytest.approx(_pairwise_auc(clean, adversarial), abs=1e-12)
    fpr, tpr, thresholds = roc_curve(clean, adversarial)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thresholds) < 0) and thresholds[-1] == -np.inf
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auc, abs=1e-12)
    for index in (0, len(thresholds) // 2, len(thresholds) - 1):
        assert fpr[index] == np.mean(clean > thresholds[index])
        assert tpr[index] == np.mean(adversarial > thresholds[index])


def test_tpr_at_fpr_uses_the_calibration_threshold() -> None:
    clean = np.arange(100.0)  # 5% FPR -> threshold 94, scores 95..99 rejected
    adversarial = np.array([93.0, 94.0, 94.5, 99.0, 150.0])
    assert tpr_at_fpr(clean, adversarial, 0.05) == pytest.approx(3 / 5)
    assert tpr_at_fpr(clean, adversarial, 0.01) == pytest.approx(2 / 5)  # threshold 98
    with pytest.raises(InputError, match="fpr"):
        tpr_at_fpr(clean, adversarial, 0.0)


@pytest.mark.parametrize(
    ("scores", "fpr", "threshold", "rejected"),
    [
        (list(range(100)), 0.05, 94, 5),
        (list(range(100)), 0.29, 70, 29),  # 0.29 * 100 is 28.999... in floating point
        (list(range(10)), 0.25, 7, 2),  # floor(2.5) = 2 may lie above
        ([0, 0, 0, 0, 1], 0.5, 0, 1),  # ties at the threshold: fewer rejected than allowed
    ],
)
def test_calibration_threshold_rule(
    scores: list[float], fpr: float, threshold: float, rejected: int
) -> None:
    tensor = torch.tensor(scores, dtype=torch.float64)
    assert calibration_threshold(tensor, fpr) == threshold
    assert int((tensor > threshold).sum()) == rejected


def test_calibration_threshold_warns_when_too_few_scores() -> None:
    with pytest.warns(UserWarning, match="too few"):
        assert calibration_threshold(torch.arange(10.0), 0.01) == 9.0


@pytest.mark.parametrize("bad", [[], [1.0, math.nan], [[1.0, 2.0]]])
def test_score_metrics_reject_bad_scores(bad: list[float]) -> None:
    with pytest.raises(InputError, match="clean_scores"):
        roc_auc(bad, [1.0])


# --- detector calibration ------------------------------------------------------------------


@pytest.mark.parametrize("false_positive_rate", [0.05, 0.01])
def test_calibration_hits_the_false_positive_rate(false_positive_rate: float) -> None:
    generator = torch.Generator().manual_seed(0)
    calibration = torch.rand(10_000, 1, 4, 4, generator=generator)
    held_out = torch.rand(10_000, 1, 4, 4, generator=generator)
    detector = ProjectionDetector(16).train()
    threshold = detector.calibrate(calibration, false_positive_rate, batch_size=3000)
    assert detector.training and detector.dropout.training  # modes restored
    assert detector.threshold == threshold
    assert detector.false_positive_rate == false_positive_rate
    # Exactly on the calibration data (continuous scores, no ties) ...
    assert float(detector.is_rejected(calibration).double().mean()) == false_positive_rate
    # ... and within sampling error on fresh data: the threshold's own error plus the held-out
    # binomial error, about sqrt(2 p (1 - p) / n); allow four standard deviations.
    tolerance = 4 * math.sqrt(2 * false_positive_rate * (1 - false_positive_rate) / 10_000)
    held_out_rate = float(detector.is_rejected(held_out).double().mean())
    assert abs(held_out_rate - false_positive_rate) < tolerance


def test_threshold_is_saved_with_the_weights() -> None:
    detector = _calibrated_pixel_detector()
    restored = PixelDetector()
    assert restored.threshold is None and restored.false_positive_rate is None
    restored.load_state_dict(detector.state_dict())
    assert restored.threshold == detector.threshold
    assert restored.false_positive_rate == pytest.approx(0.3)


def test_uncalibrated_detector_says_to_calibrate() -> None:
    detector = PixelDetector()
    images = _pixel_images([0, 1], [0.1, 0.2])
    with pytest.raises(InputError, match=r"call detector\.calibrate"):
        detector.is_rejected(images)
    with pytest.raises(InputError, match="calibrate"):
        RejectingClassifier(PixelClassifier(), detector)
    with pytest.raises(InputError, match="calibrate"):
        robust_accuracy_at_fpr(
            PixelClassifier(), detector, images, torch.tensor([0, 1]), images.clone()
        )


@pytest.mark.parametrize("bad_rate", [0.0, 1.0, 1.5, -0.1])
def test_calibrate_validates_its_arguments(bad_rate: float) -> None:
    detector = PixelDetector()
    with pytest.raises(InputError, match="false_positive_rate"):
        detector.calibrate(_pixel_images([0], [0.1]), bad_rate)
    with pytest.raises(InputError, match="clean_images"):
        detector.calibrate(torch.zeros(3, 2), 0.05)


def test_detector_is_abstract() -> None:
    with pytest.raises(TypeError):
        Detector()  # type: ignore[abstract]


# --- rejecting classifier ------------------------------------------------------------------


def test_rejecting_classifier_argmax_is_rejection() -> None:
    generator = torch.Generator().manual_seed(2)
    detector = DistanceDetector(0.5)
    detector.calibrate(_clustered(500, generator)[0], 0.05)
    model = RejectingClassifier(Brightness(), detector)
    images = torch.rand(300, 1, 2, 2, generator=generator)
    outputs = model(images)
    assert outputs.shape == (300, 3)
    assert torch.equal(outputs[:, :2], Brightness()(images))
    rejected = detector.is_rejected(images)
    assert 0 < int(rejected.sum()) < 300
    assert torch.equal(outputs.argmax(1) == 2, rejected)
    assert model.rejection_rate(images) == pytest.approx(float(rejected.float().mean()))


class LoudClassifier(nn.Module):
    """Huge class scores, so a tiny rejection margin is lost to float32 rounding."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.full((images.shape[0], 2), 1000.0) + images.flatten(1)[:, :1] * 0


def test_rejection_is_exact_at_the_threshold() -> None:
    detector = _calibrated_pixel_detector()
    threshold = torch.tensor(detector.threshold, dtype=torch.float32)
    just_above = float(torch.nextafter(threshold, torch.tensor(1.0)))
    images = _pixel_images([0, 0, 0], [float(threshold), just_above, 0.9])
    rejected = detector.is_rejected(images)
    assert rejected.tolist() == [False, True, True]
    outputs = RejectingClassifier(LoudClassifier(), detector)(images)
    assert torch.equal(outputs.argmax(1) == 2, rejected)


def test_gradients_flow_through_the_rejection_column() -> None:
    generator = torch.Generator().manual_seed(3)
    detector = DistanceDetector(0.5)
    detector.calibrate(_clustered(200, generator)[0], 0.05)
    scale = 3.0
    model = RejectingClassifier(Brightness(), detector, rejection_scale=scale)
    images = torch.rand(8, 1, 2, 2, generator=generator).requires_grad_(True)
    outputs = model(images)
    (rejection_gradient,) = torch.autograd.grad(outputs[:, 2].sum(), images, retain_graph=True)
    assert torch.isfinite(rejection_gradient).all() and rejection_gradient.abs().sum() > 0
    (class_gradient,) = torch.autograd.grad(
        outputs[:, :2].max(1).values.sum(), images, retain_graph=True
    )
    (score_gradient,) = torch.autograd.grad(detector.score(images).sum(), images)
    torch.testing.assert_close(rejection_gradient - class_gradient, scale * score_gradient)


def test_rejection_scale_must_be_positive() -> None:
    with pytest.raises(InputError, match="rejection_scale"):
        RejectingClassifier(PixelClassifier(), _calibrated_pixel_detector(), rejection_scale=0.0)


# --- Foolbox criterion ---------------------------------------------------------------------


def test_criterion_truth_table() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    outputs = torch.tensor(
        [
            [3.0, 1.0, 0.0],  # predicted 0 = label: not adversarial
            [1.0, 3.0, 0.0],  # predicted 1 != label, not rejected: adversarial
            [1.0, 0.0, 3.0],  # rejected: not adversarial
            [3.0, 1.0, 0.0],  # predicted 0 != label 1: adversarial
            [1.0, 3.0, 0.0],  # correct
            [0.0, 1.0, 3.0],  # rejected
        ]
    )
    expected = [False, True, False, True, False, False]
    criterion = MisclassifiedAndNotRejected(labels, num_classes=2)
    assert criterion(outputs, outputs).tolist() == expected  # torch in, torch out
    wrapped = criterion(astensor(outputs), astensor(outputs))
    assert isinstance(wrapped, EagerTensor) and wrapped.raw.tolist() == expected
    assert "num_classes=2" in repr(criterion)
    with pytest.raises(InputError, match="num_classes"):
        criterion(outputs[:, :2], outputs[:, :2])
    with pytest.raises(InputError, match="labels"):
        MisclassifiedAndNotRejected(torch.tensor([0, 2]), num_classes=2)


def test_foolbox_attack_on_the_rejecting_classifier() -> None:
    generator = torch.Generator().manual_seed(0)
    detector = DistanceDetector(0.5)
    detector.calibrate(_clustered(1000, generator)[0], 0.05)
    images, labels = _clustered(64, generator)
    model = RejectingClassifier(Brightness(), detector).eval()
    foolbox_model = PyTorchModel(model, bounds=(0.0, 1.0))
    criterion = MisclassifiedAndNotRejected(labels, num_classes=2)
    attack = L2ProjectedGradientDescentAttack(steps=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, adversarials, success = attack(foolbox_model, images, criterion, epsilons=[0.3, 0.5])
    counted_by_misclassification = 0
    for adversarial, succeeded in zip(adversarials, success, strict=True):
        with torch.no_grad():
            predicted = model(adversarial).argmax(1)
        assert torch.equal(succeeded, (predicted != labels) & (predicted != 2))
        assert torch.equal(succeeded, ~detector.is_rejected(adversarial) & (predicted != labels))
        naive = Misclassification(labels)(adversarial, model(adversarial))
        counted_by_misclassification += int((naive & ~succeeded).sum())
    assert int(success.sum()) > 0  # some adversarials evade the detector ...
    assert counted_by_misclassification > 0  # ... and plain Misclassification overcounts


# --- evaluation protocol -------------------------------------------------------------------


def test_detection_report_keeps_correct_clean_with_successful_adversarial() -> None:
    # sample: label, clean prediction, adversarial prediction, clean score, adversarial score
    table = [
        (0, 0, 1, 0.1, 0.6),  # kept
        (1, 1, 0, 0.4, 0.3),  # kept
        (0, 0, 0, 0.9, 0.95),  # attack failed: excluded
        (1, 0, 0, 0.8, 0.05),  # clean already wrong: excluded
        (0, 0, 1, 0.2, 0.7),  # kept
    ]
    labels = torch.tensor([row[0] for row in table])
    clean = _pixel_images([row[1] for row in table], [row[3] for row in table])
    adversarial = _pixel_images([row[2] for row in table], [row[4] for row in table])
    detector = _calibrated_pixel_detector()  # threshold 0.35
    result = detection_report(
        detector, PixelClassifier(), clean, labels, adversarial, fprs=(0.4, 0.9)
    )
    assert result.n_pairs == 3 and result.n_samples == 5
    # kept clean [0.1, 0.4, 0.2] vs adversarial [0.6, 0.3, 0.7]: 3 + 2 + 3 of 9 pairs
    assert result.auc == pytest.approx(8 / 9)
    # fpr 0.4 on 3 clean scores: 1 may lie above -> threshold 0.2 -> all 3 adversarials above
    # fpr 0.9: 2 may lie above -> threshold 0.1 -> all 3 above as well
    assert dict(result.tpr_at_fpr) == pytest.approx({0.4: 1.0, 0.9: 1.0})
    assert result.clean_false_rejection_rate == pytest.approx(3 / 5)  # 0.4, 0.9, 0.8 > 0.35
    low, high = result.tpr_interval(0.4)
    assert low < 1.0 == high
    uncalibrated = detection_report(
        PixelDetector(), PixelClassifier(), clean, labels, adversarial, fprs=(0.4,)
    )
    assert uncalibrated.clean_false_rejection_rate is None
    assert uncalibrated.auc == result.auc


def test_detection_report_needs_successful_pairs() -> None:
    images = _pixel_images([0, 1], [0.1, 0.2])
    with pytest.raises(InputError, match="nothing to detect"):
        detection_report(PixelDetector(), PixelClassifier(), images, torch.tensor([0, 1]), images)
    with pytest.raises(InputError, match="adversarial_images"):
        detection_report(
            PixelDetector(), PixelClassifier(), images, torch.tensor([0, 1]), images[:1]
        )


def test_robust_accuracy_at_fpr_hand_built() -> None:
    # sample: label, clean prediction, clean score, adversarial prediction, adversarial score
    table = [
        (0, 0, 0.1, 1, 0.6),  # robust: the adversarial is rejected
        (0, 0, 0.1, 0, 0.1),  # robust: the attack failed
        (0, 0, 0.1, 1, 0.2),  # broken: misclassified and not rejected
        (1, 1, 0.5, 1, 0.1),  # not robust: the clean image is rejected
        (1, 0, 0.1, 1, 0.1),  # not robust: the clean image is misclassified
        (1, 1, 0.1, 1, 0.9),  # robust: correct (and rejected)
    ]
    labels = torch.tensor([row[0] for row in table])
    clean = _pixel_images([row[1] for row in table], [row[2] for row in table])
    adversarial = _pixel_images([row[3] for row in table], [row[4] for row in table])
    detector = _calibrated_pixel_detector()  # threshold 0.35
    robust = robust_under_rejection(PixelClassifier(), detector, clean, labels, adversarial)
    assert robust.tolist() == [True, True, False, False, False, True]
    accuracy = robust_accuracy_at_fpr(PixelClassifier(), detector, clean, labels, adversarial)
    assert accuracy == pytest.approx(0.5)


def test_plot_roc(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    clean, adversarial = rng.normal(0, 1, 200), rng.normal(1, 1, 200)
    fpr, tpr, _ = roc_curve(clean, adversarial)
    path = plot_roc(
        {"detector": (fpr, tpr), "other": (fpr, fpr)},
        tmp_path / "figures" / "roc.png",
        aucs={"detector": roc_auc(clean, adversarial)},
    )
    assert path.exists() and path.stat().st_size > 0
    with pytest.raises(InputError, match="curves"):
        plot_roc({}, tmp_path / "empty.png")
