"""Kernel density detector on a classifier's embedding (Feinman et al. 2017, "Detecting
adversarial samples from artifacts", Sec. 3; the detector of the PDM paper, Sec. 4).

For each class ``c`` a Gaussian KDE is fitted to the embeddings ``phi(x_i)`` of up to 1,000
training samples of that class (all of them when fewer; the PDM paper, Sec. 4, uses 1,000 per
class). With bandwidth ``h`` and ``n_c`` support points in ``d`` dimensions,

    log p_c(z) = logsumexp_i(-||z - phi(x_i)||^2 / (2 h^2)) - log n_c - (d / 2) log(2 pi h^2),

a normalized density. Feinman et al. and Pang et al. 2018 average the unnormalized kernel
``exp(-||z - s||^2 / sigma^2)`` (``sigma^2 = 2 h^2``) with a bandwidth fixed per dataset; at a
given bandwidth the two scores differ by a constant, so they rank inputs alike, and the
normalization makes held-out likelihoods comparable across bandwidths.
The suspicion score is ``-log p_c(phi(x))`` under the class ``c`` the classifier predicts: an
input far from the training embeddings of its predicted class is suspicious. The log-sum-exp
never underflows, so the score stays finite and its input gradient non-zero, and it is
differentiable end to end (through ``classifier.embed``), so detector-aware attacks (Carlini &
Wagner 2017) can follow it. The predicted class is an argmax, piecewise constant.

The bandwidth is chosen on held-out clean data: the value of a grid that maximizes the mean
held-out log-likelihood under each sample's true class; the grid and the log-likelihoods are
recorded in the config. Calibrate the threshold (:meth:`Detector.calibrate`) on clean data that
was used neither for the bandwidth nor for the attacks.

The detector holds its classifier (any module with ``embed`` and ``scores_from_embedding``,
e.g. :class:`advdefense.nn.resnet.ResNet`) and is a registered model, so ``advdefense.save`` /
``advdefense.load`` store the classifier's weights, the support embeddings and the threshold as
tensors and everything else as JSON. :class:`EmbeddingDetector` is the shared base of the
detectors that act on this embedding (also :mod:`advdefense.defenses.mahalanobis`).

Known limits (Carlini & Wagner 2017, "Adversarial examples are not easily detected"):
a white-box attack that adds the density to its loss bypasses KDE on MNIST and CIFAR at a
modest extra distortion; report detector-aware attacks alongside the paper's gray-box numbers.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from advdefense.defenses.detector import Detector
from advdefense.errors import CheckpointError, InputError
from advdefense.modes import device_of, evaluation_mode
from advdefense.registry import architecture_name, get_architecture, register_model
from advdefense.validation import check_images, check_labels, check_model_dtype, check_positive_int

__all__ = [
    "EmbeddingClassifier",
    "EmbeddingDetector",
    "KDEDetector",
    "KDEDetectorConfig",
    "check_embedding_classifier",
    "class_scores_and_embedding_scores",
    "classifier_spec",
    "compute_embeddings",
    "gaussian_kde_log_density",
    "probe_dimensions",
    "rebuild_classifier",
    "select_per_class",
]

DEFAULT_SAMPLES_PER_CLASS = 1000
_GRID_EXPONENTS = tuple(k / 2 for k in range(-10, 7))  # bandwidth factors 2^-5 ... 2^3


class EmbeddingClassifier(Protocol):
    """What embedding detectors need of a classifier (:class:`advdefense.nn.resnet.ResNet`)."""

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...

    def scores_from_embedding(self, embedding: torch.Tensor) -> torch.Tensor: ...


def _interface(classifier: nn.Module) -> EmbeddingClassifier:
    return cast(EmbeddingClassifier, classifier)


def check_embedding_classifier(classifier: object) -> nn.Module:
    """``classifier`` as an ``nn.Module`` with ``embed`` and ``scores_from_embedding``."""
    if not isinstance(classifier, nn.Module):
        raise InputError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    for method in ("embed", "scores_from_embedding"):
        if not callable(getattr(classifier, method, None)):
            raise InputError(
                f"classifier must have a {method}() method ({type(classifier).__name__} has "
                "none); embedding detectors need embed(images) -> N x D and "
                "scores_from_embedding(embedding) -> N x K, as advdefense.nn.resnet.ResNet has"
            )
    return classifier


def classifier_spec(classifier: nn.Module) -> tuple[str, dict[str, Any]]:
    """The registered architecture name and config (as a dict) of ``classifier``."""
    name = architecture_name(classifier)
    config = getattr(classifier, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise InputError(f"{type(classifier).__name__} has no dataclass config to record")
    return name, dataclasses.asdict(config)


def rebuild_classifier(architecture: str, config: dict[str, Any]) -> nn.Module:
    """A fresh (untrained) instance of registered ``architecture`` built from ``config``."""
    model_class = get_architecture(architecture)
    config_class = model_class.config_class  # type: ignore[attr-defined]
    try:
        model_config = config_class(**config)
    except TypeError as error:
        raise CheckpointError(
            f"the recorded classifier config does not fit {config_class.__name__} ({error})"
        ) from None
    return check_embedding_classifier(model_class(model_config))


@torch.no_grad()
def compute_embeddings(
    classifier: nn.Module, images: torch.Tensor, *, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N x D) and predicted classes (N) of ``images``, in eval mode, on the CPU."""
    classifier = check_embedding_classifier(classifier)
    check_images(images, "images")
    check_model_dtype(images, classifier)
    check_positive_int(batch_size, "batch_size")
    device = device_of(classifier)
    embeddings, predictions = [], []
    with evaluation_mode(classifier):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            embedding = _interface(classifier).embed(batch)
            scores = _interface(classifier).scores_from_embedding(embedding)
            embeddings.append(embedding.cpu())
            predictions.append(scores.argmax(dim=1).cpu())
    return torch.cat(embeddings), torch.cat(predictions)


@torch.no_grad()
def probe_dimensions(classifier: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(embedding dimension D, number of classes K) of ``classifier``, from its first image."""
    classifier = check_embedding_classifier(classifier)
    check_images(images, "images")
    check_model_dtype(images, classifier)
    with evaluation_mode(classifier):
        embedding = _interface(classifier).embed(images[:1].to(device_of(classifier)))
        scores = _interface(classifier).scores_from_embedding(embedding)
    return int(embedding.shape[1]), int(scores.shape[1])


def select_per_class(
    labels: torch.Tensor, num_classes: int, max_per_class: int | None, generator: torch.Generator
) -> torch.Tensor:
    """Indices of up to ``max_per_class`` samples of each class, class by class.

    Within a class the samples are a uniform draw without replacement (``generator``), kept in
    their original order; all of them when the class has fewer (or ``max_per_class`` is None).
    Every class must have at least one sample.
    """
    check_positive_int(num_classes, "num_classes")
    if max_per_class is not None:
        check_positive_int(max_per_class, "max_per_class")
    labels = check_labels(labels, "labels", num_classes=num_classes).cpu()
    chosen = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        if members.numel() == 0:
            raise InputError(
                f"the training labels hold no sample of class {label}; every one of the "
                f"{num_classes} classes needs at least one"
            )
        if max_per_class is not None and members.numel() > max_per_class:
            pick = torch.randperm(members.numel(), generator=generator)[:max_per_class]
            members = members[pick.sort().values]
        chosen.append(members)
    return torch.cat(chosen)


def _squared_distances(queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``||q_n - s_m||^2`` (N x M) in float64, differentiable, never negative."""
    queries = queries.to(torch.float64)
    support = support.to(device=queries.device, dtype=torch.float64)
    cross = queries @ support.T
    squared = queries.pow(2).sum(1, keepdim=True) + support.pow(2).sum(1) - 2.0 * cross
    return squared.clamp_min(0.0)


def _log_density_from_distances(
    squared: torch.Tensor,
    support_labels: torch.Tensor,
    classes: torch.Tensor,
    class_counts: torch.Tensor,
    bandwidth: float,
    dimension: int,
) -> torch.Tensor:
    exponents = squared / (-2.0 * bandwidth**2)
    own_class = support_labels.to(classes.device).unsqueeze(0) == classes.unsqueeze(1)
    kernel_sum = exponents.masked_fill(~own_class, -math.inf).logsumexp(dim=1)
    counts = class_counts.to(device=classes.device, dtype=torch.float64)[classes]
    normalizer = 0.5 * dimension * math.log(2.0 * math.pi * bandwidth**2)
    return kernel_sum - counts.log() - normalizer


def gaussian_kde_log_density(
    embeddings: torch.Tensor,
    classes: torch.Tensor,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    bandwidth: float,
) -> torch.Tensor:
    """``log p_c(z)`` (float64, N) of each embedding under the KDE of its ``classes`` entry.

    ``p_c`` is the isotropic Gaussian KDE with ``bandwidth`` over the rows of ``support`` whose
    ``support_labels`` equal ``c`` (module docstring); computed with log-sum-exp.
    """
    if embeddings.dim() != 2 or support.dim() != 2 or embeddings.shape[1] != support.shape[1]:
        raise InputError(
            f"embeddings (N x D) and support (M x D) must agree on D, got "
            f"{tuple(embeddings.shape)} and {tuple(support.shape)}"
        )
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise InputError(f"bandwidth must be a positive number, got {bandwidth}")
    num_classes = int(support_labels.max()) + 1
    counts = torch.bincount(support_labels.cpu(), minlength=num_classes)
    check_labels(classes, "classes", num_classes=num_classes, batch_size=embeddings.shape[0])
    if bool((counts[classes.cpu()] == 0).any()):
        raise InputError("some classes in 'classes' have no support points")
    squared = _squared_distances(embeddings, support)
    return _log_density_from_distances(
        squared, support_labels, classes, counts, bandwidth, embeddings.shape[1]
    )


class EmbeddingDetector(Detector):
    """A :class:`Detector` scoring a classifier's embedding; holds the classifier as a module.

    With ``classifier=None`` (``advdefense.load``) the classifier is rebuilt, untrained, from
    the recorded ``architecture`` and ``classifier_config``; its weights come with the state
    dict. A given classifier must be that architecture.
    """

    def __init__(
        self, classifier: nn.Module | None, architecture: str, classifier_config: dict[str, Any]
    ) -> None:
        super().__init__()
        if classifier is None:
            classifier = rebuild_classifier(architecture, classifier_config)
        elif architecture_name(classifier) != architecture:
            raise InputError(
                f"classifier is a {architecture_name(classifier)!r} but the detector config "
                f"records {architecture!r}"
            )
        self.classifier = check_embedding_classifier(classifier)

    @abstractmethod
    def score_from_embedding(
        self, embedding: torch.Tensor, predicted: torch.Tensor
    ) -> torch.Tensor:
        """The score (float64, N) of images with this embedding and predicted class."""

    def class_scores_and_score(
        self, images: torch.Tensor, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's class scores and this detector's score from one forward pass, both
        differentiable: what a detector-aware attack needs at every step. The score is under
        the predicted class, or under ``classes`` when given (the score the image would have
        if it were classified so: Carlini & Wagner 2017's KDE of the attack's target)."""
        class_scores, (score,) = class_scores_and_embedding_scores(
            self.classifier, [self], images, classes
        )
        return class_scores, score

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return self.class_scores_and_score(images)[1]


def class_scores_and_embedding_scores(
    classifier: nn.Module,
    detectors: Sequence[EmbeddingDetector],
    images: torch.Tensor,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``classifier``'s class scores and each detector's score, all from one embedding pass
    (the detectors must score this classifier's embedding); under ``classes`` when given,
    else under the predicted classes (:meth:`EmbeddingDetector.class_scores_and_score`)."""
    embedding = _interface(classifier).embed(images)
    class_scores = _interface(classifier).scores_from_embedding(embedding)
    scored = class_scores.detach().argmax(dim=1) if classes is None else classes
    return class_scores, [
        detector.score_from_embedding(embedding, scored) for detector in detectors
    ]


@dataclass(frozen=True)
class KDEDetectorConfig:
    """Constructor arguments of :class:`KDEDetector`; :meth:`KDEDetector.fit` fills them in.

    ``class_counts[c]`` is the number of support embeddings of class ``c``; ``bandwidth_grid``
    and ``bandwidth_log_likelihoods`` record the selection (mean held-out log-likelihood per
    grid value).
    """

    classifier_architecture: str
    classifier_config: dict[str, Any]
    class_counts: tuple[int, ...]
    embedding_dim: int
    bandwidth: float
    bandwidth_grid: tuple[float, ...] = ()
    bandwidth_log_likelihoods: tuple[float, ...] = ()
    max_samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("class_counts", "bandwidth_grid", "bandwidth_log_likelihoods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.class_counts) < 2:
            raise InputError(f"class_counts must cover at least 2 classes, got {self.class_counts}")
        for count in self.class_counts:
            check_positive_int(count, "class_counts")
        check_positive_int(self.embedding_dim, "embedding_dim")
        check_positive_int(self.max_samples_per_class, "max_samples_per_class")
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise InputError(f"bandwidth must be a positive number, got {self.bandwidth}")
        if len(self.bandwidth_grid) != len(self.bandwidth_log_likelihoods):
            raise InputError(
                f"bandwidth_grid has {len(self.bandwidth_grid)} values but "
                f"bandwidth_log_likelihoods has {len(self.bandwidth_log_likelihoods)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)


@register_model("kde-detector")
class KDEDetector(EmbeddingDetector):
    """Class-conditional Gaussian KDE on the embedding (Feinman et al. 2017).

    ``score(x) = -log p_{predicted class}(classifier.embed(x))``. Build one with :meth:`fit`;
    the constructor alone (used by ``advdefense.load``) makes an unfitted shell whose
    classifier is rebuilt from the config when none is given.
    """

    config_class = KDEDetectorConfig
    support: torch.Tensor
    support_labels: torch.Tensor
    class_counts: torch.Tensor

    def __init__(self, config: KDEDetectorConfig, *, classifier: nn.Module | None = None) -> None:
        super().__init__(classifier, config.classifier_architecture, config.classifier_config)
        self.config = config
        counts = torch.tensor(config.class_counts, dtype=torch.int64)
        labels = torch.repeat_interleave(torch.arange(config.num_classes), counts)
        self.register_buffer("support", torch.zeros(int(counts.sum()), config.embedding_dim))
        self.register_buffer("support_labels", labels, persistent=False)
        self.register_buffer("class_counts", counts, persistent=False)

    @property
    def bandwidth(self) -> float:
        return self.config.bandwidth

    def with_bandwidth(self, bandwidth: float) -> KDEDetector:
        """This KDE at another ``bandwidth``, sharing the classifier and the support; not
        calibrated. A wider one is smooth where this one has a local mode at each isolated
        support point, so it can guide an attack into the dense part of a class."""
        smoothed = KDEDetector(
            dataclasses.replace(self.config, bandwidth=bandwidth), classifier=self.classifier
        )
        smoothed.support = self.support
        smoothed.support_labels = self.support_labels
        smoothed.class_counts = self.class_counts
        return smoothed.eval()

    def restricted(self, keep: torch.Tensor) -> KDEDetector:
        """This KDE summed over the support points where ``keep`` (a boolean mask over
        ``support``) is true, still divided by each class's full count; not calibrated.

        Its density is at most this KDE's, so its score is an upper bound on this one's: an
        input it scores at most ``t`` this KDE scores at most ``t`` too. Restricted to the
        support points in the dense part of each class, it has no local mode at the isolated
        ones, so it can lead an attack to where this KDE is dense. Every class keeps at least
        one support point (else its score would be infinite)."""
        if keep.dtype != torch.bool or keep.shape != (self.support.shape[0],):
            raise InputError(
                f"keep must be a boolean mask over the {self.support.shape[0]} support points, "
                f"got dtype {keep.dtype} and shape {tuple(keep.shape)}"
            )
        keep = keep.to(self.support.device)
        kept = torch.bincount(self.support_labels[keep].cpu(), minlength=self.config.num_classes)
        if bool((kept == 0).any()):
            empty = (kept == 0).nonzero().flatten().tolist()
            raise InputError(
                f"keep drops every support point of class(es) {empty}; keep at least one each"
            )
        subset = KDEDetector(self.config, classifier=self.classifier)
        subset.support = self.support[keep]
        subset.support_labels = self.support_labels[keep]
        subset.class_counts = self.class_counts
        return subset.eval()

    def support_scores(self, chunk: int = 1000) -> torch.Tensor:
        """Each support point's score under its own class (float64): the score of an input
        whose embedding sits exactly on it; ``chunk`` support points at a time."""
        with torch.no_grad():
            return torch.cat(
                [
                    self.score_from_embedding(
                        self.support[start : start + chunk],
                        self.support_labels[start : start + chunk],
                    )
                    for start in range(0, self.support.shape[0], chunk)
                ]
            )

    def log_density(self, embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``log p_c(z)`` (float64, N) of each embedding under its class in ``classes``."""
        squared = _squared_distances(embeddings, self.support)
        return _log_density_from_distances(
            squared,
            self.support_labels,
            classes,
            self.class_counts,
            self.config.bandwidth,
            self.config.embedding_dim,
        )

    def score_from_embedding(
        self, embedding: torch.Tensor, predicted: torch.Tensor
    ) -> torch.Tensor:
        """``-log p_c(embed(x))`` under the predicted class ``c`` (float64, N)."""
        return -self.log_density(embedding, predicted)

    @classmethod
    def fit(
        cls,
        classifier: nn.Module,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        held_out_images: torch.Tensor,
        held_out_labels: torch.Tensor,
        *,
        max_samples_per_class: int = DEFAULT_SAMPLES_PER_CLASS,
        bandwidths: Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 500,
    ) -> KDEDetector:
        """Fit the per-class KDEs on ``train_*`` and pick the bandwidth on ``held_out_*``.

        Up to ``max_samples_per_class`` training samples per class are drawn with a generator
        seeded by ``seed``. ``bandwidths`` is the grid to search; by default 17 values from
        2^-5 to 2^3 times a Silverman-style reference (pooled within-class standard deviation
        times ``(4 / ((d + 2) n))^(1 / (d + 4))``, ``n`` the mean class count). A warning says
        when the best value lies at the edge of the grid. The threshold is not set: call
        :meth:`calibrate` on other held-out clean data.
        """
        classifier = check_embedding_classifier(classifier)
        architecture, classifier_config = classifier_spec(classifier)
        check_images(train_images, "train_images")
        check_images(held_out_images, "held_out_images")
        check_positive_int(max_samples_per_class, "max_samples_per_class")
        _, num_classes = probe_dimensions(classifier, train_images)
        check_labels(
            train_labels,
            "train_labels",
            num_classes=num_classes,
            batch_size=train_images.shape[0],
        )
        check_labels(
            held_out_labels,
            "held_out_labels",
            num_classes=num_classes,
            batch_size=held_out_images.shape[0],
        )
        generator = torch.Generator().manual_seed(seed)
        chosen = select_per_class(train_labels, num_classes, max_samples_per_class, generator)
        support, _ = compute_embeddings(classifier, train_images[chosen], batch_size=batch_size)
        support_labels = train_labels.cpu()[chosen]
        counts = torch.bincount(support_labels, minlength=num_classes)
        held_out, _ = compute_embeddings(classifier, held_out_images, batch_size=batch_size)
        grid = (
            _default_grid(support, support_labels, counts)
            if bandwidths is None
            else _check_grid(bandwidths)
        )
        log_likelihoods = _held_out_log_likelihoods(
            held_out, held_out_labels.cpu(), support, support_labels, counts, grid, batch_size
        )
        best = max(range(len(grid)), key=lambda index: log_likelihoods[index])
        if len(grid) > 1 and best in (0, len(grid) - 1):
            side = "smallest" if best == 0 else "largest"
            warnings.warn(
                f"the selected KDE bandwidth {grid[best]:.4g} is the {side} of the grid; "
                "extend the grid (bandwidths=...) past it",
                UserWarning,
                stacklevel=2,
            )
        config = KDEDetectorConfig(
            classifier_architecture=architecture,
            classifier_config=classifier_config,
            class_counts=tuple(int(count) for count in counts),
            embedding_dim=int(support.shape[1]),
            bandwidth=grid[best],
            bandwidth_grid=tuple(grid),
            bandwidth_log_likelihoods=tuple(log_likelihoods),
            max_samples_per_class=max_samples_per_class,
            seed=seed,
        )
        detector = cls(config, classifier=classifier)
        detector.support.copy_(support)
        return detector.to(device_of(classifier)).eval()


def _check_grid(bandwidths: Sequence[float]) -> list[float]:
    grid = [float(value) for value in bandwidths]
    if not grid or any(not (math.isfinite(value) and value > 0) for value in grid):
        raise InputError(f"bandwidths must be a non-empty list of positive numbers, got {grid}")
    return grid


def _default_grid(
    support: torch.Tensor, support_labels: torch.Tensor, counts: torch.Tensor
) -> list[float]:
    """Factors 2^-5 ... 2^3 of a Silverman-style reference bandwidth (see ``fit``)."""
    support = support.to(torch.float64)
    num_classes = counts.numel()
    sums = torch.zeros(num_classes, support.shape[1], dtype=torch.float64)
    sums.index_add_(0, support_labels, support)
    centroids = sums / counts.unsqueeze(1).to(torch.float64)
    squared_deviation = float((support - centroids[support_labels]).pow(2).sum())
    degrees = max(support.shape[0] - num_classes, 1) * support.shape[1]
    spread = math.sqrt(squared_deviation / degrees)
    if spread == 0.0:
        spread = float(support.std()) or 1.0
    dimension = support.shape[1]
    mean_count = float(counts.to(torch.float64).mean())
    reference = spread * (4.0 / ((dimension + 2) * mean_count)) ** (1.0 / (dimension + 4))
    return [reference * 2.0**exponent for exponent in _GRID_EXPONENTS]


def _held_out_log_likelihoods(
    held_out: torch.Tensor,
    held_out_labels: torch.Tensor,
    support: torch.Tensor,
    support_labels: torch.Tensor,
    counts: torch.Tensor,
    grid: Sequence[float],
    batch_size: int,
) -> list[float]:
    """Mean ``log p_y(z)`` of the held-out embeddings under their true class, per bandwidth."""
    totals = torch.zeros(len(grid), dtype=torch.float64)
    for start in range(0, held_out.shape[0], batch_size):
        batch = held_out[start : start + batch_size]
        classes = held_out_labels[start : start + batch_size]
        squared = _squared_distances(batch, support)
        for index, bandwidth in enumerate(grid):
            totals[index] += _log_density_from_distances(
                squared, support_labels, classes, counts, bandwidth, held_out.shape[1]
            ).sum()
    return [float(total) / held_out.shape[0] for total in totals]
