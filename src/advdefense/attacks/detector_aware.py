"""Detector-aware (white-box) attacks on a classifier guarded by a :class:`Detector`.

Both attacks succeed on a sample only when the adversarial is misclassified (reaches the
target, when one is given) AND not rejected: its detector score is at most the threshold
(the detector's calibrated one unless another is passed). The detector's ``score`` must be
differentiable in the input (KDE is, through the embedding).

:class:`CarliniWagnerDetectorAttack` -- Carlini & Wagner 2017, "Adversarial examples are not
easily detected" (their attack on kernel density estimation), and the C&W-wb attack of Pang
et al. 2018 and PDM (Sec. 4.3, Appendix C). The L2 attack of Carlini & Wagner (S&P 2017):
variable ``w`` with ``x' = lower + (upper - lower) (tanh(w) + 1) / 2``, Adam, and per sample a
binary search over ``c`` (x10 until a success, then bisection), minimizing

    ||x' - x||_2^2 + c * (f(x') + relu(score(x') - threshold)),

``f`` the margin loss ``max(Z_y - max_{j != y} Z_j + kappa, 0)`` (untargeted; targeted:
``max(max_{j != t} Z_j - Z_t + kappa, 0)``) and ``score = -log KDE`` for the KDE detector: of
the target class in a targeted attack (Carlini & Wagner's ``KDE_t``), else of the predicted
class. In two phases, as in Carlini & Wagner's code for the KDE attack and Pang et
al.'s C&W-wb: phase 1 is the plain C&W L2 attack (no detector term), phase 2 starts Adam from
the phase-1 adversarial (the original image where phase 1 failed) with the detector term. The
distance is always to the original image (Pang et al.'s phase 2 measures it to the phase-1
adversarial instead). Per sample the smallest successful adversarial of either phase is
kept; where none succeeds, the phase-2 iterate that fools the classifier with the lowest
detector score is returned (Pang et al.'s fallback), else the phase-1 result, and ``success``
says which samples succeeded. Defaults: PDM Appendix C ("C&W-wb": 5000 / 10000 iterations and
3 / 3 binary search steps for phase 1 / phase 2, confidence 0) and Pang et al.'s code
(initial constant 1.0, Adam learning rate 0.01, early abort per sample). Pang et al. attack a random
target class (:func:`advdefense.attacks.jsma.random_targets`) and, in their code, the median
KDE density of the target class as the threshold; pass ``targets`` and ``threshold`` to do so.
Three additions of ours for samples that stay stuck (``class_weight`` on the class hinge, a
``guide`` detector that leads phase 2, ``starts`` where phase 2 begins): see the class and its
``__call__``.

:class:`OrthogonalPGD` -- Bryniarski et al. 2022, "Evading adversarial example detectors"
(ICLR 2022), and their released code: fixed-epsilon PGD (L-inf or L2) that, per sample
and step, follows the gradient of the classification objective while the sample is not yet
misclassified, and the gradient of the detector objective (``-score``) once it is, each
projected orthogonally to the other gradient (``g - (g . h / ||h||^2) h``; the flags
``project_classifier`` / ``project_detector`` of their code), so that to first order the step
does not undo the other constraint. "Misclassified" for this switch includes a margin of
``switch_margin`` in score units (0.05 in their code). Steps are ``sign(g)`` (L-inf) or
``g / ||g||_2`` (L2) times ``rel_stepsize * epsilon``, then projection onto the epsilon ball
and the bounds; no random start. Per sample the misclassified iterate with the lowest detector
score is kept (their code), so the sample succeeds iff that score is at most the threshold.
With both projections off it is their Selective PGD. Known limit: when the two
gradients are nearly parallel -- e.g. a class-conditional detector (KDE) whose score of the
current class grows exactly as the classifier margin shrinks, or an undetected region that
lies deeper inside the target class than ``switch_margin`` -- the projections remove the only
useful direction and the attack stalls; run Selective PGD and the C&W attack beside it and
keep the per-sample worst case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from advdefense.defenses.detector import Detector
from advdefense.defenses.kde import EmbeddingDetector, class_scores_and_embedding_scores
from advdefense.errors import InputError
from advdefense.modes import evaluation_mode
from advdefense.validation import check_images, check_labels, check_model_dtype, check_positive_int

__all__ = [
    "CarliniWagnerDetectorAttack",
    "DetectorAttackResult",
    "OrthogonalPGD",
    "misclassified_and_not_rejected",
]

ClassificationLoss = Literal["margin", "cross-entropy"]
DetectorClass = Literal["target", "predicted"]

_TINY = 1e-20
_TANH_SHRINK = 0.999999  # keeps arctanh finite at the bounds, as in Carlini & Wagner's code
_NO_UPPER_BOUND = 1e10


class DetectorAttackResult(NamedTuple):
    """``adversarials`` (like the images) and ``success`` (bool, N): misclassified (target
    reached, when targeted) and not rejected, from a fresh forward pass."""

    adversarials: torch.Tensor
    success: torch.Tensor


def _resolve_thresholds(
    detector: Detector, threshold: float | torch.Tensor | None, count: int, device: torch.device
) -> torch.Tensor:
    """Per-sample thresholds (float64, N): ``threshold`` or the detector's calibrated one."""
    if threshold is None:
        value: float | torch.Tensor = detector.require_threshold()
    else:
        value = threshold
    thresholds = torch.as_tensor(value, dtype=torch.float64, device=device)
    if thresholds.dim() == 0:
        thresholds = thresholds.expand(count)
    if thresholds.shape != (count,) or not bool(torch.isfinite(thresholds).all()):
        raise InputError(
            f"threshold must be a finite number or a vector of {count} finite numbers, got "
            f"shape {tuple(thresholds.shape)}"
        )
    return thresholds


def _check_inputs(
    classifier: nn.Module,
    detector: Detector,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor | None,
    bounds: tuple[float, float],
) -> None:
    if not isinstance(classifier, nn.Module):
        raise InputError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    if not isinstance(detector, Detector):
        raise InputError(f"detector must be a Detector, got {type(detector).__name__}")
    check_images(images, "images", bounds=bounds)
    check_model_dtype(images, classifier)
    check_labels(labels, "labels", batch_size=images.shape[0])
    if targets is not None:
        check_labels(targets, "targets", batch_size=images.shape[0])
        if bool((targets.cpu() == labels.cpu()).any()):
            raise InputError("targets must differ from labels for every sample")


def _check_bounds(bounds: tuple[float, float]) -> None:
    if len(bounds) != 2 or not (
        math.isfinite(bounds[0]) and math.isfinite(bounds[1]) and bounds[0] < bounds[1]
    ):
        raise InputError(f"bounds must be (lower, upper) with lower < upper, got {bounds}")


def _check_positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a positive number, got {value}")


def _check_differentiable(detector: Detector, images: torch.Tensor) -> None:
    """Raise unless ``detector.score`` has a gradient path from the input."""
    probe = images[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = detector.score(probe)
    if not score.requires_grad:
        raise InputError(
            f"{type(detector).__name__}.score is not differentiable in its input; a "
            "detector-aware gradient attack needs a differentiable score (or a surrogate)"
        )


def _class_scores(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    scores: torch.Tensor = classifier(images)
    return scores


def class_scores_and_score(
    classifier: nn.Module,
    detector: Detector,
    images: torch.Tensor,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's scores and the detector's score of ``images``, both differentiable;
    from one forward pass when the detector scores this very classifier's embedding (about
    half the cost of a detector-aware attack step), else from two. ``classes``: a
    class-conditional detector (an :class:`EmbeddingDetector`) scores under these classes
    instead of the predicted ones; other detectors score as always."""
    if isinstance(detector, EmbeddingDetector):
        if detector.classifier is classifier:
            return detector.class_scores_and_score(images, classes)
        _, score = detector.class_scores_and_score(images, classes)
        return _class_scores(classifier, images), score
    return _class_scores(classifier, images), detector.score(images)


def _class_scores_and_guided_scores(
    classifier: nn.Module,
    detector: Detector,
    guide: Detector,
    images: torch.Tensor,
    classes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class scores, the detector's and the guide's score (as :func:`class_scores_and_score`);
    from one embedding pass when both score this very classifier's embedding."""
    detectors = (detector, guide)
    if all(isinstance(d, EmbeddingDetector) and d.classifier is classifier for d in detectors):
        embedding_detectors = [d for d in detectors if isinstance(d, EmbeddingDetector)]
        scores, (score, guided) = class_scores_and_embedding_scores(
            classifier, embedding_detectors, images, classes
        )
        return scores, score, guided
    scores, score = class_scores_and_score(classifier, detector, images, classes)
    return scores, score, class_scores_and_score(classifier, guide, images, classes)[1]


def _other_best(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``max_{j != c} z_j`` per row."""
    return scores.scatter(1, classes[:, None], -math.inf).max(1).values


def _own(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return scores.gather(1, classes[:, None])[:, 0]


def _reaches(
    scores: torch.Tensor, classes: torch.Tensor, *, targeted: bool, margin: float
) -> torch.Tensor:
    """C&W's success test with confidence ``margin``: argmax of the scores with ``margin``
    taken from the target (targeted) or given to the label (untargeted)."""
    shift = torch.zeros_like(scores).scatter(1, classes[:, None], margin)
    if targeted:
        return (scores - shift).argmax(1) == classes
    return (scores + shift).argmax(1) != classes


@torch.no_grad()
def misclassified_and_not_rejected(
    classifier: nn.Module,
    detector: Detector,
    adversarials: torch.Tensor,
    labels: torch.Tensor,
    *,
    targets: torch.Tensor | None = None,
    threshold: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool (N): predicted class != label (== target when given) and score <= threshold."""
    check_labels(labels, "labels", batch_size=adversarials.shape[0])
    if targets is not None:
        check_labels(targets, "targets", batch_size=adversarials.shape[0])
    thresholds = _resolve_thresholds(
        detector, threshold, adversarials.shape[0], adversarials.device
    )
    with evaluation_mode(classifier), evaluation_mode(detector):
        predictions = _class_scores(classifier, adversarials).argmax(1)
        suspicion = detector.score(adversarials).to(torch.float64)
    if targets is None:
        fooled = predictions != labels.to(predictions.device)
    else:
        fooled = predictions == targets.to(predictions.device)
    not_rejected: torch.Tensor = suspicion <= thresholds
    return fooled & not_rejected


def _to_attack_space(images: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    lower, upper = bounds
    centered = (images - lower) / (upper - lower) * 2.0 - 1.0
    return torch.atanh(centered.clamp(-1.0, 1.0) * _TANH_SHRINK)


def _to_model_space(variable: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    lower, upper = bounds
    return (torch.tanh(variable) + 1.0) / 2.0 * (upper - lower) + lower


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Search:
    """Per-sample state carried across C&W phases: the best success and the fallback."""

    best: torch.Tensor
    best_distance: torch.Tensor
    fallback: torch.Tensor
    fallback_excess: torch.Tensor


@dataclass(frozen=True)
class _Phase:
    steps: int
    binary_search_steps: int
    learning_rate: float
    initial_const: float
    class_weight: float = 1.0


# (candidates, their rows in the batch) -> (class scores, detector term to descend, excess)
_DetectorExcess = Callable[
    [torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]

_ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as in Carlini & Wagner's code
_ADAM_EPSILON = 1e-8
_STALL_FACTOR = 0.9999  # C&W's early abort: the loss fell by less than 0.01% since the check


class _RowAdam:
    """Adam on the rows of ``variable`` that are still optimized (torch.optim.Adam's update).

    Rows only ever leave, so every row that steps has stepped at each earlier call and one
    step count serves them all; a row that leaves keeps its value.
    """

    def __init__(self, variable: torch.Tensor, learning_rate: float) -> None:
        self.variable = variable
        self.learning_rate = learning_rate
        self.first = torch.zeros_like(variable)
        self.second = torch.zeros_like(variable)
        self.count = 0

    def step(self, rows: torch.Tensor, gradient: torch.Tensor) -> None:
        """One Adam step on ``variable[rows]`` with their ``gradient``."""
        beta1, beta2 = _ADAM_BETAS
        self.count += 1
        first = self.first[rows].lerp_(gradient, 1.0 - beta1)
        second = self.second[rows].mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
        self.first[rows], self.second[rows] = first, second
        step_size = self.learning_rate / (1.0 - beta1**self.count)
        denominator = (second.sqrt() / math.sqrt(1.0 - beta2**self.count)).add_(_ADAM_EPSILON)
        self.variable[rows] = self.variable[rows].addcdiv_(first, denominator, value=-step_size)


def _carlini_wagner_phase(
    classifier: nn.Module,
    images: torch.Tensor,
    start: torch.Tensor,
    classes: torch.Tensor,
    phase: _Phase,
    search: _Search,
    *,
    targeted: bool,
    confidence: float,
    abort_early: bool,
    bounds: tuple[float, float],
    detector_excess: _DetectorExcess | None,
    bar: tqdm[Any] | None = None,
) -> None:
    """One C&W L2 binary search from ``start``, updating ``search`` in place.

    ``detector_excess(x, rows)`` gives the class scores, the detector term to descend and the
    detector's excess ``relu(score(x) - threshold)`` (both float64) of the candidates ``x`` of
    the batch's ``rows``, or is None for the plain attack; a success needs the C&W class
    condition and a zero excess. ``abort_early``: C&W's early abort, per sample. A sample
    stops when its loss fell by less than 0.01% over the last tenth of the steps and leaves
    the batch, so later steps cost less. Carlini & Wagner's and Cleverhans' code apply the
    test to the loss summed over a batch whose size defaults to one, which is this; summed
    over a larger batch it would keep every sample going until all stall at once. Samples
    are independent, so a batch gives what each sample would alone. ``bar`` advances by one
    per step (by the skipped ones once every sample stopped).
    """
    count = images.shape[0]
    device = images.device
    origin = _to_attack_space(start, bounds)
    const = torch.full((count,), phase.initial_const, dtype=torch.float64, device=device)
    lower_const = torch.zeros_like(const)
    upper_const = torch.full_like(const, _NO_UPPER_BOUND)
    check_every = max(1, phase.steps // 10)
    for outer in range(phase.binary_search_steps):
        if phase.binary_search_steps >= 10 and outer == phase.binary_search_steps - 1:
            const = upper_const.clone()  # C&W: the last of many searches retries the bound
        modifier = torch.zeros_like(origin)
        optimizer = _RowAdam(modifier, phase.learning_rate)
        found = torch.zeros(count, dtype=torch.bool, device=device)
        previous = torch.full_like(const, math.inf)
        rows = torch.arange(count, device=device)
        for step in range(phase.steps):
            with torch.enable_grad():
                moved = modifier[rows].requires_grad_(True)
                candidates = _to_model_space(origin[rows] + moved, bounds)
                if detector_excess is None:
                    scores = _class_scores(classifier, candidates)
                    excess = term = torch.zeros_like(const[rows])
                else:
                    scores, term, excess = detector_excess(candidates, rows)
                distance = (candidates - images[rows]).flatten(1).pow(2).sum(1)
                own, other = _own(scores, classes[rows]), _other_best(scores, classes[rows])
                margin = other - own if targeted else own - other
                class_loss = (margin + confidence).clamp_min(0.0).to(torch.float64)
                weighted = phase.class_weight * class_loss + term
                losses = distance.to(torch.float64) + const[rows] * weighted
                (gradient,) = torch.autograd.grad(losses.sum(), moved)
            with torch.no_grad():
                reached = _reaches(
                    scores.detach(), classes[rows], targeted=targeted, margin=confidence
                )
                excess = excess.detach()
                success = reached & (excess <= 0.0)
                found[rows[success]] = True
                size = distance.detach().to(torch.float64)
                improved = success & (size < search.best_distance[rows])
                search.best[rows[improved]] = candidates.detach()[improved]
                search.best_distance[rows[improved]] = size[improved]
                if detector_excess is not None:
                    closer = reached & (excess < search.fallback_excess[rows])
                    search.fallback[rows[closer]] = candidates.detach()[closer]
                    search.fallback_excess[rows[closer]] = excess[closer]
                if bar is not None:
                    bar.update(1)
                going = torch.ones_like(success)
                if abort_early and step % check_every == 0:
                    current = losses.detach()
                    going = ~(current > previous[rows] * _STALL_FACTOR)
                    previous[rows] = current
                    if not bool(going.any()):
                        if bar is not None:
                            bar.update(phase.steps - step - 1)
                        break
                rows, gradient = rows[going], gradient[going]
                optimizer.step(rows, gradient)
        upper_const = torch.where(found, torch.minimum(upper_const, const), upper_const)
        lower_const = torch.where(found, lower_const, torch.maximum(lower_const, const))
        bisect = upper_const < _NO_UPPER_BOUND / 10
        const = torch.where(bisect, (lower_const + upper_const) / 2.0, const * 10.0)


@dataclass(frozen=True)
class CarliniWagnerDetectorAttack:
    """C&W L2 attack on a classifier plus detector, in two phases (module docstring).

    ``steps`` / ``binary_search_steps`` / ``learning_rate`` / ``initial_const`` are phase 2's
    (with the detector term), the ``classifier_*`` ones phase 1's (plain C&W L2); set
    ``classifier_steps=0`` to skip phase 1. ``confidence`` is kappa, for both phases.
    ``detector_class``: under which class a class-conditional detector (KDE) scores in the
    targeted objective. "target" is Carlini & Wagner's ``-log KDE_t(x')``: the term stays the
    target's wherever the iterate is classified. "predicted" scores under the current
    prediction, which is the detector's own score. Its term jumps down wherever the iterate
    falls back to its own class, so phase 2 can settle there, fooling nobody. This is how it
    failed on our ResNets. The success test always uses the detector's own score, which is
    the target's once the target is reached. ``class_weight`` multiplies phase 2's class
    hinge: C&W weigh it like the detector term (1), but a detector term hundreds of nats above
    its threshold can then pull the iterate out of the target class, where it stays (an
    evading image of another class); a large weight makes the class a near-hard constraint,
    so the iterate slides along the target's side of the boundary instead.
    """

    steps: int = 10_000
    binary_search_steps: int = 3
    learning_rate: float = 1e-2
    initial_const: float = 1.0
    classifier_steps: int = 5_000
    classifier_binary_search_steps: int = 3
    classifier_learning_rate: float = 1e-2
    classifier_initial_const: float = 1.0
    confidence: float = 0.0
    abort_early: bool = True
    bounds: tuple[float, float] = (0.0, 1.0)
    detector_class: DetectorClass = "target"
    class_weight: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "steps")
        check_positive_int(self.binary_search_steps, "binary_search_steps")
        if self.detector_class not in ("target", "predicted"):
            raise InputError(
                f"detector_class must be 'target' or 'predicted', got {self.detector_class!r}"
            )
        check_positive_int(self.classifier_binary_search_steps, "classifier_binary_search_steps")
        if isinstance(self.classifier_steps, bool) or not (
            isinstance(self.classifier_steps, int) and self.classifier_steps >= 0
        ):
            raise InputError(
                f"classifier_steps must be a non-negative integer, got {self.classifier_steps!r}"
            )
        for name in (
            "learning_rate",
            "initial_const",
            "classifier_learning_rate",
            "classifier_initial_const",
            "class_weight",
        ):
            _check_positive(getattr(self, name), name)
        if not (math.isfinite(self.confidence) and self.confidence >= 0):
            raise InputError(f"confidence must be a non-negative number, got {self.confidence}")
        _check_bounds(self.bounds)

    def __call__(
        self,
        classifier: nn.Module,
        detector: Detector,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        threshold: float | torch.Tensor | None = None,
        guide: Detector | None = None,
        guide_threshold: float | torch.Tensor | None = None,
        starts: torch.Tensor | None = None,
        progress: bool = False,
    ) -> DetectorAttackResult:
        """Attack ``images`` (true ``labels``); untargeted unless ``targets`` are given.

        ``threshold`` (a number or one per sample) replaces the detector's calibrated one in
        both the objective and the success test. ``guide``: another detector on the same
        input (scored under the same classes); where its excess over ``guide_threshold``
        (default: its calibrated threshold) is positive, phase 2 descends that instead of
        the detector's, which takes over once the guide is satisfied; success is still the
        detector's alone. A smoother KDE (``KDEDetector.with_bandwidth``) so leads the
        iterate past the local modes that a narrow KDE has at isolated support points, whose
        pull would otherwise hold it there.
        ``starts``: where phase 2 begins instead of at phase 1's adversarials (phase 1 is
        skipped), e.g. images of the target class that the detector accepts. Phase 2 then
        draws them towards the originals while its penalties hold both conditions, so no
        local mode far from a success can hold the iterate; a start that already succeeds
        is the first best adversarial.
        ``progress`` shows a bar over both phases' optimization steps (tens of thousands at
        the defaults).
        """
        _check_inputs(classifier, detector, images, labels, targets, self.bounds)
        thresholds = _resolve_thresholds(detector, threshold, images.shape[0], images.device)
        guidance = None
        if guide is not None:
            if not isinstance(guide, Detector):
                raise InputError(f"guide must be a Detector, got {type(guide).__name__}")
            guidance = (
                guide,
                _resolve_thresholds(guide, guide_threshold, images.shape[0], images.device),
            )
        elif guide_threshold is not None:
            raise InputError("guide_threshold was given without a guide; pass guide=...")
        if starts is not None:
            check_images(starts, "starts", bounds=self.bounds)
            if starts.shape != images.shape:
                raise InputError(
                    f"starts must have the shape of images {tuple(images.shape)}, "
                    f"got {tuple(starts.shape)}"
                )
            starts = starts.detach().to(images.device, images.dtype)
        targeted = targets is not None
        classes = (targets if targets is not None else labels).to(images.device)
        images = images.detach()
        first_phase = 0 if starts is not None else self.classifier_steps
        total = (
            first_phase * self.classifier_binary_search_steps
            + self.steps * self.binary_search_steps
        )
        with (
            evaluation_mode(classifier),
            evaluation_mode(detector),
            tqdm(total=total, desc="C&W-wb", unit="step", disable=not progress, leave=False) as bar,
        ):
            _check_differentiable(detector, images)
            search = self._run(
                classifier, detector, images, classes, thresholds, targeted, guidance, starts, bar
            )
        succeeded = _rows(torch.isfinite(search.best_distance), images)
        adversarials = torch.where(succeeded, search.best, search.fallback)
        success = misclassified_and_not_rejected(
            classifier, detector, adversarials, labels, targets=targets, threshold=thresholds
        )
        return DetectorAttackResult(adversarials, success)

    def _run(
        self,
        classifier: nn.Module,
        detector: Detector,
        images: torch.Tensor,
        classes: torch.Tensor,
        thresholds: torch.Tensor,
        targeted: bool,
        guidance: tuple[Detector, torch.Tensor] | None,
        starts: torch.Tensor | None,
        bar: tqdm[Any],
    ) -> _Search:
        count = images.shape[0]
        infinite = torch.full((count,), math.inf, dtype=torch.float64, device=images.device)
        if starts is None:
            start, reached = self._first_phase(classifier, images, classes, targeted, bar)
        else:
            start = starts
            with torch.no_grad():
                scores = _class_scores(classifier, start)
            reached = _reaches(scores, classes, targeted=targeted, margin=self.confidence)
        with torch.no_grad():
            evades = reached & (detector.score(start).to(torch.float64) <= thresholds)
            distance = (start - images).flatten(1).pow(2).sum(1).to(torch.float64)
        search = _Search(
            start.clone(), torch.where(evades, distance, infinite), start.clone(), infinite.clone()
        )

        scored = classes if targeted and self.detector_class == "target" else None

        def excess(
            candidates: torch.Tensor, rows: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            classes_scored = None if scored is None else scored[rows]
            if guidance is None:
                scores, score = class_scores_and_score(
                    classifier, detector, candidates, classes_scored
                )
                own = (score.to(torch.float64) - thresholds[rows]).clamp_min(0.0)
                return scores, own, own
            guide, guide_thresholds = guidance
            scores, score, guided = _class_scores_and_guided_scores(
                classifier, detector, guide, candidates, classes_scored
            )
            own = (score.to(torch.float64) - thresholds[rows]).clamp_min(0.0)
            led = (guided.to(torch.float64) - guide_thresholds[rows]).clamp_min(0.0)
            return scores, torch.where(led > 0, led, own), own

        second = _Phase(
            self.steps,
            self.binary_search_steps,
            self.learning_rate,
            self.initial_const,
            self.class_weight,
        )
        self._phase(classifier, images, start, classes, second, search, targeted, excess, bar)
        return search

    def _first_phase(
        self,
        classifier: nn.Module,
        images: torch.Tensor,
        classes: torch.Tensor,
        targeted: bool,
        bar: tqdm[Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 1, plain C&W L2: its best adversarials (the originals where it failed) and
        which samples reached the class condition."""
        count = images.shape[0]
        infinite = torch.full((count,), math.inf, dtype=torch.float64, device=images.device)
        plain = _Search(images.clone(), infinite.clone(), images.clone(), infinite.clone())
        if self.classifier_steps > 0:
            first = _Phase(
                self.classifier_steps,
                self.classifier_binary_search_steps,
                self.classifier_learning_rate,
                self.classifier_initial_const,
            )
            self._phase(classifier, images, images, classes, first, plain, targeted, None, bar)
        return plain.best, torch.isfinite(plain.best_distance)

    def _phase(
        self,
        classifier: nn.Module,
        images: torch.Tensor,
        start: torch.Tensor,
        classes: torch.Tensor,
        phase: _Phase,
        search: _Search,
        targeted: bool,
        detector_excess: _DetectorExcess | None,
        bar: tqdm[Any],
    ) -> None:
        _carlini_wagner_phase(
            classifier,
            images,
            start,
            classes,
            phase,
            search,
            targeted=targeted,
            confidence=self.confidence,
            abort_early=self.abort_early,
            bounds=self.bounds,
            detector_excess=detector_excess,
            bar=bar,
        )


def _classification_objective(
    scores: torch.Tensor, classes: torch.Tensor, *, targeted: bool, loss: ClassificationLoss
) -> torch.Tensor:
    """Per sample, to be ascended: margin towards misclassification (or the target), or the
    cross-entropy of the label (minus that of the target)."""
    if loss == "margin":
        own, other = _own(scores, classes), _other_best(scores, classes)
        return own - other if targeted else other - own
    cross_entropy = torch.nn.functional.cross_entropy(scores, classes, reduction="none")
    return -cross_entropy if targeted else cross_entropy


def _without_component(vectors: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``v - (v . d / ||d||^2) d`` per row (N x F)."""
    dots = (vectors * directions).sum(1, keepdim=True)
    squared = directions.pow(2).sum(1, keepdim=True)
    return vectors - dots / (squared + _TINY) * directions


@dataclass(frozen=True)
class OrthogonalPGD:
    """Orthogonal PGD (Bryniarski et al. 2022) in ``norm`` at a fixed epsilon (module doc).

    Step size ``rel_stepsize * epsilon`` (their default 1/255 at epsilon 8/255 is 0.125);
    ``loss`` is the classification objective ("margin": C&W's margin, fine for scores that
    are not logits; "cross-entropy": their examples'). ``project_classifier=False,
    project_detector=False`` is Selective PGD.
    """

    norm: Literal["linf", "l2"] = "linf"
    steps: int = 100
    rel_stepsize: float = 0.125
    loss: ClassificationLoss = "margin"
    project_classifier: bool = True
    project_detector: bool = True
    switch_margin: float = 0.05
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise InputError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.loss not in ("margin", "cross-entropy"):
            raise InputError(f"loss must be 'margin' or 'cross-entropy', got {self.loss!r}")
        check_positive_int(self.steps, "steps")
        _check_positive(self.rel_stepsize, "rel_stepsize")
        if not (math.isfinite(self.switch_margin) and self.switch_margin >= 0):
            raise InputError(
                f"switch_margin must be a non-negative number, got {self.switch_margin}"
            )
        _check_bounds(self.bounds)

    def __call__(
        self,
        classifier: nn.Module,
        detector: Detector,
        images: torch.Tensor,
        labels: torch.Tensor,
        epsilon: float,
        *,
        targets: torch.Tensor | None = None,
        threshold: float | torch.Tensor | None = None,
    ) -> DetectorAttackResult:
        """Attack ``images`` (true ``labels``) within ``epsilon``; untargeted unless
        ``targets`` are given; ``threshold`` as in :class:`CarliniWagnerDetectorAttack`."""
        _check_inputs(classifier, detector, images, labels, targets, self.bounds)
        _check_positive(epsilon, "epsilon")
        thresholds = _resolve_thresholds(detector, threshold, images.shape[0], images.device)
        targeted = targets is not None
        classes = (targets if targets is not None else labels).to(images.device)
        images = images.detach()
        with evaluation_mode(classifier), evaluation_mode(detector):
            _check_differentiable(detector, images)
            best = self._run(classifier, detector, images, classes, float(epsilon), targeted)
        success = misclassified_and_not_rejected(
            classifier, detector, best, labels, targets=targets, threshold=thresholds
        )
        return DetectorAttackResult(best, success)

    def _run(
        self,
        classifier: nn.Module,
        detector: Detector,
        images: torch.Tensor,
        classes: torch.Tensor,
        epsilon: float,
        targeted: bool,
    ) -> torch.Tensor:
        lower, upper = self.bounds
        step_size = self.rel_stepsize * epsilon
        current = images.clone()
        best = images.clone()
        best_score = torch.full(
            (images.shape[0],), math.inf, dtype=torch.float64, device=images.device
        )
        for step in range(self.steps + 1):
            inputs = current.detach().requires_grad_(True)
            with torch.enable_grad():
                scores, suspicion = class_scores_and_score(classifier, detector, inputs)
                suspicion = suspicion.to(torch.float64)
                objective = _classification_objective(
                    scores, classes, targeted=targeted, loss=self.loss
                )
                (classifier_gradient,) = torch.autograd.grad(
                    objective.sum(), inputs, retain_graph=True
                )
                (detector_gradient,) = torch.autograd.grad((-suspicion).sum(), inputs)
            with torch.no_grad():
                scores, suspicion = scores.detach(), suspicion.detach()
                reached = _reaches(scores, classes, targeted=targeted, margin=0.0)
                better = reached & (suspicion < best_score)
                best[better] = current[better]
                best_score[better] = suspicion[better]
                if step == self.steps:
                    break
                fooled = _reaches(scores, classes, targeted=targeted, margin=self.switch_margin)
                toward_class = classifier_gradient.flatten(1)
                toward_evasion = detector_gradient.flatten(1).to(toward_class.dtype)
                if self.project_classifier:
                    toward_class = _without_component(toward_class, toward_evasion)
                if self.project_detector:
                    toward_evasion = _without_component(
                        toward_evasion, classifier_gradient.flatten(1)
                    )
                direction = torch.where(fooled[:, None], toward_evasion, toward_class)
                if self.norm == "linf":
                    direction = direction.sign()
                else:
                    norms = direction.norm(dim=1, keepdim=True)
                    direction = direction / (norms + _TINY)
                moved = current + step_size * direction.view_as(current)
                current = (images + self._project(moved - images, epsilon)).clamp(lower, upper)
        return best

    def _project(self, perturbation: torch.Tensor, epsilon: float) -> torch.Tensor:
        if self.norm == "linf":
            return perturbation.clamp(-epsilon, epsilon)
        norms = perturbation.flatten(1).norm(dim=1)
        factor = (epsilon / (norms + _TINY)).clamp(max=1.0)
        return perturbation * _rows(factor, perturbation)
