"""Mahalanobis detector on a classifier's embedding (Lee et al. 2018, "A simple unified
framework for detecting out-of-distribution samples and adversarial attacks", Sec. 2).

Class-conditional Gaussians with a shared (tied) covariance are fitted to the training
embeddings ``z_i = classifier.embed(x_i)`` (Lee et al. Eq. 1):

    mu_c = mean of the z_i of class c,
    Sigma = (1 / N) sum_c sum_{i in c} (z_i - mu_c)(z_i - mu_c)^T.

The confidence score of Lee et al. (Eq. 2) is ``M(x) = max_c -(z - mu_c)^T Sigma^-1 (z - mu_c)``,
the closest class (not the predicted one); the suspicion score here is ``-M(x)``, the smallest
squared Mahalanobis distance, so higher means more suspicious. It is differentiable w.r.t. the
input (a minimum of quadratics).

Numerics: ``Sigma`` is inverted in float64 through a Cholesky factorization of
``Sigma + ridge * (trace(Sigma) / d) * I``; the ridge (default 1e-6, relative to the mean
variance) keeps the inverse finite when the embedding is rank-deficient, as it can be after
PDM's reduce-variance loss shrinks the class clusters.

Not implemented from Lee et al.: the input pre-processing (a small FGSM-like step towards the
closest class) and the feature ensemble over several layers with a logistic-regression
combiner (Sec. 2.2): this is the single-layer score on the embedding shared with the KDE
detector, as a second baseline. Known limit: like KDE it is bypassed by detector-aware attacks
that add the score to their loss (Carlini & Wagner 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advdefense.defenses.kde import (
    EmbeddingDetector,
    check_embedding_classifier,
    classifier_spec,
    compute_embeddings,
    probe_dimensions,
    select_per_class,
)
from advdefense.errors import InputError
from advdefense.modes import device_of
from advdefense.registry import register_model
from advdefense.validation import check_images, check_labels, check_positive_int

__all__ = [
    "MahalanobisDetector",
    "MahalanobisDetectorConfig",
    "tied_gaussian_fit",
]

DEFAULT_RIDGE = 1e-6


@dataclass(frozen=True)
class MahalanobisDetectorConfig:
    """Constructor arguments of :class:`MahalanobisDetector`; ``fit`` fills them in."""

    classifier_architecture: str
    classifier_config: dict[str, Any]
    num_classes: int
    embedding_dim: int
    ridge: float = DEFAULT_RIDGE
    max_samples_per_class: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.num_classes, "num_classes")
        check_positive_int(self.embedding_dim, "embedding_dim")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise InputError(f"ridge must be a non-negative number, got {self.ridge}")
        if self.max_samples_per_class is not None:
            check_positive_int(self.max_samples_per_class, "max_samples_per_class")


def tied_gaussian_fit(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (K x D) and the ridge-regularized shared precision matrix (D x D), float64.

    Lee et al. 2018, Eq. 1, with ``Sigma + ridge * (trace(Sigma) / D) * I`` inverted through
    its Cholesky factor. Every class needs at least one embedding.
    """
    if embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise InputError(
            f"embeddings must be an N x D float tensor, got {tuple(embeddings.shape)} "
            f"of {embeddings.dtype}"
        )
    labels = check_labels(labels, "labels", num_classes=num_classes, batch_size=len(embeddings))
    if not (math.isfinite(ridge) and ridge >= 0):
        raise InputError(f"ridge must be a non-negative number, got {ridge}")
    data = embeddings.detach().to(torch.float64)
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise InputError(f"no embeddings of classes {empty}; every class needs at least one")
    sums = torch.zeros(num_classes, data.shape[1], dtype=torch.float64, device=data.device)
    sums.index_add_(0, labels.to(data.device), data)
    means = sums / counts.to(device=data.device, dtype=torch.float64).unsqueeze(1)
    centred = data - means[labels.to(data.device)]
    covariance = centred.T @ centred / data.shape[0]
    mean_variance = float(torch.trace(covariance)) / data.shape[1]
    if mean_variance <= 0.0:
        raise InputError(
            "every embedding equals its class mean, so the shared covariance is zero and the "
            "Mahalanobis distance is undefined"
        )
    identity = torch.eye(data.shape[1], dtype=torch.float64, device=data.device)
    regularized = covariance + ridge * mean_variance * identity
    factor, info = torch.linalg.cholesky_ex(regularized)
    if int(info) != 0:
        raise InputError(
            f"the shared covariance is not positive definite with ridge={ridge}; use a larger "
            "ridge (e.g. 1e-4)"
        )
    precision = torch.cholesky_inverse(factor)
    return means, (precision + precision.T) / 2


@register_model("mahalanobis-detector")
class MahalanobisDetector(EmbeddingDetector):
    """Tied-covariance Gaussian detector on the embedding (Lee et al. 2018, Eq. 1-2).

    ``score(x) = min_c (z - mu_c)^T Sigma^-1 (z - mu_c)`` with ``z = classifier.embed(x)``.
    Build one with :meth:`fit`; the constructor alone (used by ``advdefense.load``) makes an
    unfitted shell whose classifier is rebuilt from the config when none is given.
    """

    config_class = MahalanobisDetectorConfig
    class_means: torch.Tensor
    precision: torch.Tensor

    def __init__(
        self, config: MahalanobisDetectorConfig, *, classifier: nn.Module | None = None
    ) -> None:
        super().__init__(classifier, config.classifier_architecture, config.classifier_config)
        self.config = config
        dimension = config.embedding_dim
        self.register_buffer(
            "class_means", torch.zeros(config.num_classes, dimension, dtype=torch.float64)
        )
        self.register_buffer("precision", torch.eye(dimension, dtype=torch.float64))

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances (float64, N x K) of ``embeddings`` to each class mean."""
        centred = embeddings.to(torch.float64).unsqueeze(1) - self.class_means.unsqueeze(0)
        return torch.einsum("nkd,de,nke->nk", centred, self.precision, centred)

    def score_from_embedding(
        self, embedding: torch.Tensor, predicted: torch.Tensor
    ) -> torch.Tensor:
        """The smallest squared Mahalanobis distance over the classes (float64, N); the
        predicted class plays no part (Lee et al. 2018)."""
        return self.distances(embedding).min(dim=1).values

    @classmethod
    def fit(
        cls,
        classifier: nn.Module,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        *,
        ridge: float = DEFAULT_RIDGE,
        max_samples_per_class: int | None = None,
        seed: int = 0,
        batch_size: int = 500,
    ) -> MahalanobisDetector:
        """Fit the class means and shared covariance on the training embeddings.

        Lee et al. use the whole training set (``max_samples_per_class=None``); a cap draws
        that many samples per class with a generator seeded by ``seed``. The threshold is not
        set: call :meth:`calibrate` on held-out clean data.
        """
        classifier = check_embedding_classifier(classifier)
        architecture, classifier_config = classifier_spec(classifier)
        check_images(train_images, "train_images")
        _, num_classes = probe_dimensions(classifier, train_images)
        check_labels(
            train_labels, "train_labels", num_classes=num_classes, batch_size=len(train_images)
        )
        generator = torch.Generator().manual_seed(seed)
        chosen = select_per_class(train_labels, num_classes, max_samples_per_class, generator)
        embeddings, _ = compute_embeddings(classifier, train_images[chosen], batch_size=batch_size)
        means, precision = tied_gaussian_fit(
            embeddings, train_labels.cpu()[chosen], num_classes, ridge
        )
        config = MahalanobisDetectorConfig(
            classifier_architecture=architecture,
            classifier_config=classifier_config,
            num_classes=num_classes,
            embedding_dim=int(embeddings.shape[1]),
            ridge=ridge,
            max_samples_per_class=max_samples_per_class,
            seed=seed,
        )
        detector = cls(config, classifier=classifier)
        detector.class_means.copy_(means)
        detector.precision.copy_(precision)
        return detector.to(device_of(classifier)).eval()
