"""Detection metrics: ROC AUC, TPR at fixed FPR, robust accuracy with a reject option.

The AUC protocol is that of the PDM and GCD papers (after Feinman et al. 2017, Sec. 4): keep
only the samples classified correctly when clean whose adversarial is misclassified, then
compare the detector's scores on those clean images (negatives) with its scores on their
adversarials (positives). Robust accuracy at a fixed FPR follows Carlini & Wagner 2017
("Adversarial examples are not easily detected"): an attack wins only with an input that is
misclassified and not rejected. Score metrics are pure functions; thresholds follow
:func:`advdefense.defenses.detector.calibration_threshold`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import rankdata
from torch import nn

from advdefense.defenses.detector import Detector, calibration_threshold, detector_scores
from advdefense.errors import InputError
from advdefense.evaluation.metrics import wilson_interval
from advdefense.evaluation.plotting import new_figure, save_figure
from advdefense.evaluation.robustness import predict
from advdefense.validation import check_images, check_labels, check_probability

__all__ = [
    "DetectionResult",
    "detection_report",
    "plot_roc",
    "robust_accuracy_at_fpr",
    "robust_under_rejection",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
]

Scores = torch.Tensor | npt.NDArray[Any] | Sequence[float]
FloatArray = npt.NDArray[np.float64]


def _as_scores(values: Scores, name: str) -> FloatArray:
    """A non-empty, finite, 1-D float64 array of detector scores."""
    if isinstance(values, torch.Tensor):
        array = values.detach().cpu().to(torch.float64).numpy()
    else:
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise InputError(f"{name} must be a vector of numbers: {error}") from None
    if array.ndim != 1 or array.size == 0:
        raise InputError(f"{name} must be a non-empty vector of scores, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{name} contains {int((~np.isfinite(array)).sum())} NaN/inf values")
    return array


def _check_rate(value: float, name: str) -> float:
    check_probability(value, name)
    if not 0.0 < value < 1.0:
        raise InputError(f"{name} must lie strictly between 0 and 1, got {value}")
    return value


def roc_auc(clean_scores: Scores, adversarial_scores: Scores) -> float:
    """Area under the ROC curve: P(adversarial score > clean score), ties counting 1/2.

    The Mann-Whitney U statistic over n_clean x n_adversarial pairs, computed from average
    ranks; equal to ``sklearn.metrics.roc_auc_score`` with adversarials as the positive class.
    """
    clean = _as_scores(clean_scores, "clean_scores")
    adversarial = _as_scores(adversarial_scores, "adversarial_scores")
    ranks = rankdata(np.concatenate([clean, adversarial]))  # ties get their average rank
    n_adversarial = adversarial.size
    u_statistic = float(ranks[clean.size :].sum()) - n_adversarial * (n_adversarial + 1) / 2
    return u_statistic / (clean.size * n_adversarial)


def roc_curve(
    clean_scores: Scores, adversarial_scores: Scores
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(fpr, tpr, thresholds) for every distinct threshold, from (0, 0) to (1, 1).

    ``fpr[i]`` and ``tpr[i]`` are the fractions of clean and adversarial scores strictly above
    ``thresholds[i]`` (the detector's rejection rule). Thresholds run from the largest score down
    to ``-inf``, so fpr and tpr are non-decreasing; the trapezoidal area is :func:`roc_auc`.
    """
    clean = np.sort(_as_scores(clean_scores, "clean_scores"))
    adversarial = np.sort(_as_scores(adversarial_scores, "adversarial_scores"))
    thresholds = np.append(np.unique(np.concatenate([clean, adversarial]))[::-1], -np.inf)
    fpr = (clean.size - np.searchsorted(clean, thresholds, side="right")) / clean.size
    tpr = (adversarial.size - np.searchsorted(adversarial, thresholds, side="right")) / (
        adversarial.size
    )
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def tpr_at_fpr(clean_scores: Scores, adversarial_scores: Scores, fpr: float) -> float:
    """Fraction of adversarial scores strictly above the threshold for ``fpr`` on the clean ones.

    The threshold is the one :meth:`Detector.calibrate` would choose on these clean scores (see
    :func:`~advdefense.defenses.detector.calibration_threshold`), so the clean rate it allows is
    at most ``fpr``: a point on or just left of ``fpr`` on :func:`roc_curve`, never interpolated.
    """
    clean = _as_scores(clean_scores, "clean_scores")
    adversarial = _as_scores(adversarial_scores, "adversarial_scores")
    _check_rate(fpr, "fpr")
    threshold = calibration_threshold(torch.from_numpy(clean), fpr)
    return float((adversarial > threshold).mean())


@dataclass(frozen=True)
class DetectionResult:
    """Detection metrics of one detector against one attack (PDM/GCD protocol).

    ``auc`` and ``tpr_at_fpr`` (false-positive rate -> true-positive rate) are measured on the
    ``n_pairs`` samples whose clean image is correct and whose adversarial is misclassified,
    out of ``n_samples``. ``clean_false_rejection_rate`` is the fraction of all clean images the
    detector's calibrated threshold rejects, None when it has not been calibrated.
    """

    auc: float
    tpr_at_fpr: Mapping[float, float]
    n_pairs: int
    n_samples: int
    clean_false_rejection_rate: float | None

    def tpr_interval(self, fpr: float) -> tuple[float, float]:
        """95% Wilson interval of the TPR at ``fpr`` over the ``n_pairs`` adversarials."""
        if fpr not in self.tpr_at_fpr:
            raise InputError(f"fpr {fpr} was not measured; choose one of {list(self.tpr_at_fpr)}")
        return wilson_interval(round(self.tpr_at_fpr[fpr] * self.n_pairs), self.n_pairs)


def _check_pairs(
    images: torch.Tensor, labels: torch.Tensor, adversarial_images: torch.Tensor, clean_name: str
) -> None:
    check_images(images, clean_name)
    check_images(adversarial_images, "adversarial_images")
    if adversarial_images.shape != images.shape:
        raise InputError(
            f"adversarial_images must match {clean_name} in shape (one adversarial per image), "
            f"got {tuple(adversarial_images.shape)} and {tuple(images.shape)}"
        )
    check_labels(labels, "labels", batch_size=images.shape[0])


def detection_report(
    detector: Detector,
    classifier: nn.Module,
    clean_images: torch.Tensor,
    labels: torch.Tensor,
    adversarial_images: torch.Tensor,
    *,
    fprs: Sequence[float] = (0.05, 0.01),
    batch_size: int = 500,
) -> DetectionResult:
    """AUC and TPR at each of ``fprs`` on correct clean images vs their successful adversarials.

    The TPR thresholds are set on the kept clean scores (points of this ROC curve, as in the
    papers); a deployed threshold comes from :meth:`Detector.calibrate` on held-out data and is
    judged with ``clean_false_rejection_rate`` and :func:`robust_accuracy_at_fpr`.
    """
    _check_pairs(clean_images, labels, adversarial_images, "clean_images")
    for fpr in fprs:
        _check_rate(fpr, "fprs")
    labels = labels.cpu()
    clean_correct = predict(classifier, clean_images, batch_size=batch_size) == labels
    adversarial_wrong = predict(classifier, adversarial_images, batch_size=batch_size) != labels
    keep = clean_correct & adversarial_wrong
    n_pairs = int(keep.sum())
    if n_pairs == 0:
        raise InputError(
            "no sample is correctly classified when clean with a misclassified adversarial, so "
            "there is nothing to detect; check that adversarial_images come from a successful "
            "attack on the same images"
        )
    clean_scores = detector_scores(detector, clean_images, batch_size=batch_size)
    kept_adversarials = adversarial_images[keep.to(adversarial_images.device)]
    adversarial_scores = detector_scores(detector, kept_adversarials, batch_size=batch_size)
    false_rejections = None
    if detector.threshold is not None:
        rejected = clean_scores > detector.reject_threshold.cpu()
        false_rejections = float(rejected.float().mean())
    kept_clean = clean_scores[keep]
    return DetectionResult(
        auc=roc_auc(kept_clean, adversarial_scores),
        tpr_at_fpr=MappingProxyType(
            {float(fpr): tpr_at_fpr(kept_clean, adversarial_scores, fpr) for fpr in fprs}
        ),
        n_pairs=n_pairs,
        n_samples=int(labels.numel()),
        clean_false_rejection_rate=false_rejections,
    )


def robust_under_rejection(
    classifier: nn.Module,
    detector: Detector,
    images: torch.Tensor,
    labels: torch.Tensor,
    adversarial_images: torch.Tensor,
    *,
    batch_size: int = 500,
) -> torch.Tensor:
    """Bool vector (N): which samples survive the attack with the detector's reject option.

    Sample i is robust when its clean image is correctly classified AND not rejected (a clean
    rejection is an error, DESIGN §3 rule 1), and its adversarial is correctly classified OR
    rejected (Carlini & Wagner 2017: the attack needs misclassified and not rejected). The
    detector must be calibrated on held-out clean data; the adversarials must already be
    within the attack's budget (this function measures no norms).
    """
    detector.require_threshold()
    _check_pairs(images, labels, adversarial_images, "images")
    labels = labels.cpu()
    clean_correct = predict(classifier, images, batch_size=batch_size) == labels
    clean_rejected = detector.is_rejected(images, batch_size=batch_size)
    adversarial_correct = predict(classifier, adversarial_images, batch_size=batch_size) == labels
    adversarial_rejected = detector.is_rejected(adversarial_images, batch_size=batch_size)
    return clean_correct & ~clean_rejected & (adversarial_correct | adversarial_rejected)


def robust_accuracy_at_fpr(
    classifier: nn.Module,
    detector: Detector,
    images: torch.Tensor,
    labels: torch.Tensor,
    adversarial_images: torch.Tensor,
    *,
    batch_size: int = 500,
) -> float:
    """Fraction of samples robust with the reject option at the detector's calibrated FPR.

    See :func:`robust_under_rejection` for the per-sample rule; combine several attacks by
    AND-ing their masks before averaging (worst case per sample, DESIGN §3 rule 2).
    """
    robust = robust_under_rejection(
        classifier, detector, images, labels, adversarial_images, batch_size=batch_size
    )
    return float(robust.float().mean())


def plot_roc(
    curves: Mapping[str, tuple[Scores, Scores]],
    path: str | Path,
    *,
    aucs: Mapping[str, float] | None = None,
) -> Path:
    """Plot ROC curves (label -> (fpr, tpr)) with the chance diagonal; saved to ``path``.

    Labels found in ``aucs`` get their AUC in the legend.
    """
    if not curves:
        raise InputError("curves is empty: pass at least one label -> (fpr, tpr)")
    figure, axes = new_figure(1, width=4.5, height=4.5)
    axis = axes[0][0]
    for label, (fpr, tpr) in curves.items():
        false_positives = _as_scores(fpr, f"curves[{label!r}] fpr")
        true_positives = _as_scores(tpr, f"curves[{label!r}] tpr")
        if false_positives.shape != true_positives.shape:
            raise InputError(
                f"curves[{label!r}] has {false_positives.size} fpr and {true_positives.size} tpr "
                "values; they must match"
            )
        shown = label if aucs is None or label not in aucs else f"{label} (AUC {aucs[label]:.3f})"
        axis.plot(false_positives, true_positives, label=shown)
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("false-positive rate (clean rejected)")
    axis.set_ylabel("true-positive rate (adversarial detected)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="lower right")
    return save_figure(figure, path)
