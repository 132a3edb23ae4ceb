"""The Jacobian-based saliency map attack, JSMA (Papernot et al. 2016, "The limitations of deep
learning in adversarial settings", Algorithms 2 and 3: the crafting loop and the saliency map
over pairs of features), which Foolbox 3 lacks.

Targeted and L0: from ``x`` it changes two input features per iteration, the pair chosen by
the saliency map over pairs (increasing features when ``theta > 0``): with
``J = dF/dx`` and target ``t``, for every pair ``(p, q)`` of the search domain

    alpha = J_tp + J_tq,    beta = sum_{j != t} (J_jp + J_jq),

admissible when ``alpha > 0`` and ``beta < 0`` (``alpha < 0`` and ``beta > 0`` when
``theta < 0``), and the pair maximizing ``-alpha * beta`` is modified by ``theta`` (clipped to
the bounds) and removed from the domain. The loop stops when the model predicts
``t``, after ``max_iterations = min(max_iterations, floor(gamma * features / 2))`` iterations,
when fewer than two features remain, or when no pair is admissible. Features are the elements
of the input (every channel of every pixel), as in the paper and in Cleverhans.

Defaults follow Cleverhans v2.1 ``SaliencyMapMethod`` (the implementation the PDM paper used,
Sec. 4): ``theta = 1.0``, ``gamma = 1.0`` (its class defaults; its MNIST tutorial uses
``gamma = 0.1``), bounds [0, 1], the Jacobian of the softmax probabilities
(``scores="probabilities"``; ``"logits"`` is Carlini & Wagner's JSMA-Z), and an initial domain
of the features strictly inside the bound ``theta`` moves towards. The PDM paper (Appendix C)
caps the attack at 100 iterations (``max_iterations``). Untargeted use (PDM Sec. 4): as
Cleverhans does when ``y_target`` is None, each sample gets a target drawn uniformly from the
classes other than its label (:func:`random_targets`), and the attack stops on reaching that
target, not at the first misclassification; what counts as success is the caller's rule (the
evaluation harness counts any misclassification, as for every untargeted attack).

One deliberate difference from Cleverhans' vectorized code: a sample with no admissible pair
stops (Cleverhans' ``argmax`` of an all-zero score map then modifies feature 0 twice, an
artefact outside the paper's algorithm). Ties between pairs go to the first pair ``p < q`` in
lexicographic order, as Cleverhans' row-major ``argmax`` does.

The pair map is vectorized over the batch with broadcasting (``alpha_p + alpha_q`` for all
pairs at once), in chunks of samples so that one chunk holds at most about 2^24 pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar

import torch
from eagerpy.astensor import astensor, astensor_
from foolbox.attacks.base import MinimizationAttack, get_criterion, raise_if_kwargs
from foolbox.criteria import Misclassification, TargetedMisclassification
from foolbox.distances import Distance, l0
from foolbox.models.base import Model
from torch import nn

from advdefense.defenses.detector import MisclassifiedAndNotRejected
from advdefense.errors import InputError
from advdefense.modes import evaluation_mode
from advdefense.validation import check_images, check_labels, check_model_dtype, check_positive_int

__all__ = [
    "JSMAResult",
    "SaliencyMapAttack",
    "ScoreSpace",
    "best_pairs",
    "iteration_budget",
    "random_targets",
    "saliency_map_attack",
]

T = TypeVar("T")
ScoreSpace = Literal["probabilities", "logits"]
Classifier = Callable[[torch.Tensor], torch.Tensor]

_PAIRS_PER_CHUNK = 1 << 24


class JSMAResult(NamedTuple):
    """What :func:`saliency_map_attack` returns.

    ``adversarials`` (like the images); ``reached_target`` (bool, N): the model predicts the
    target on the adversarial; ``pairs`` (int64, N x max_iterations x 2): the features (flat
    indices into one image) modified at each iteration, ``p < q``, -1 after the sample stopped;
    ``iterations`` (int64, N): how many pairs were modified.
    """

    adversarials: torch.Tensor
    reached_target: torch.Tensor
    pairs: torch.Tensor
    iterations: torch.Tensor


def random_targets(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A target per sample, uniform over the ``num_classes - 1`` classes other than its label.

    Cleverhans' untargeted JSMA: the label's one-hot vector rolled by ``randint(1, K - 1)``.
    Draws from ``generator`` (on the CPU), or from PyTorch's global generator when None.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    check_labels(labels, "labels", num_classes=num_classes)
    offsets = torch.randint(1, num_classes, (labels.shape[0],), generator=generator)
    return (labels + offsets.to(labels.device)) % num_classes


def _check_parameters(theta: float, gamma: float, max_iterations: int, scores: str) -> None:
    if not (math.isfinite(theta) and theta != 0.0):
        raise InputError(f"theta must be a finite non-zero number, got {theta}")
    if not (math.isfinite(gamma) and 0.0 < gamma <= 1.0):
        raise InputError(
            f"gamma (max fraction of features changed) must lie in (0, 1], got {gamma}"
        )
    check_positive_int(max_iterations, "max_iterations")
    if scores not in ("probabilities", "logits"):
        raise InputError(f"scores must be 'probabilities' or 'logits', got {scores!r}")


def iteration_budget(num_features: int, gamma: float, max_iterations: int) -> int:
    """``min(max_iterations, floor(gamma * num_features / 2))``: two features per iteration."""
    return min(max_iterations, math.floor(gamma * num_features / 2 + 1e-9))


def _target_and_other_gradients(
    classifier: Classifier, images: torch.Tensor, targets: torch.Tensor, scores: ScoreSpace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions, and per sample ``dF_t/dx`` and ``d(sum_{j != t} F_j)/dx`` (flattened)."""
    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        outputs = classifier(inputs)
        values = outputs.softmax(1) if scores == "probabilities" else outputs
        is_target = torch.nn.functional.one_hot(targets, values.shape[1]).to(torch.bool)
        target_values = values.masked_fill(~is_target, 0.0).sum(1)
        other_values = values.masked_fill(is_target, 0.0).sum(1)
        (target_gradient,) = torch.autograd.grad(target_values.sum(), inputs, retain_graph=True)
        (other_gradient,) = torch.autograd.grad(other_values.sum(), inputs)
    predictions = outputs.detach().argmax(1)
    return predictions, target_gradient.flatten(1), other_gradient.flatten(1)


def best_pairs(
    target_gradient: torch.Tensor,
    other_gradient: torch.Tensor,
    domain: torch.Tensor,
    *,
    increase: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The saliency map over pairs (Papernot et al. 2016), for a batch.

    All inputs are N x F (``domain`` bool). Returns ``first``, ``second`` (int64, N, with
    ``first < second``) and ``found`` (bool, N: some pair of the domain was admissible).
    """
    count, features = target_gradient.shape
    upper = torch.ones(features, features, dtype=torch.bool, device=domain.device).triu(1)
    chunk = max(1, _PAIRS_PER_CHUNK // max(features * features, 1))
    firsts, seconds, founds = [], [], []
    for start in range(0, count, chunk):
        alpha = target_gradient[start : start + chunk]
        beta = other_gradient[start : start + chunk]
        inside = domain[start : start + chunk]
        alpha_pairs = alpha.unsqueeze(2) + alpha.unsqueeze(1)
        beta_pairs = beta.unsqueeze(2) + beta.unsqueeze(1)
        if increase:
            admissible = (alpha_pairs > 0) & (beta_pairs < 0)
        else:
            admissible = (alpha_pairs < 0) & (beta_pairs > 0)
        admissible &= inside.unsqueeze(2) & inside.unsqueeze(1) & upper
        saliency = torch.where(admissible, -alpha_pairs * beta_pairs, -math.inf).flatten(1)
        best = saliency.argmax(1)
        firsts.append(torch.div(best, features, rounding_mode="floor"))
        seconds.append(best % features)
        founds.append(admissible.flatten(1).any(1))
    return torch.cat(firsts), torch.cat(seconds), torch.cat(founds)


@torch.no_grad()
def saliency_map_attack(
    classifier: Classifier,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    theta: float = 1.0,
    gamma: float = 1.0,
    max_iterations: int = 100,
    scores: ScoreSpace = "probabilities",
    bounds: tuple[float, float] = (0.0, 1.0),
) -> JSMAResult:
    """Targeted JSMA with the pair saliency map on a batch (module docstring).

    ``classifier`` maps images to class scores (logits; the softmax is taken here when
    ``scores="probabilities"``); an ``nn.Module`` is run in eval mode. ``targets`` (int64, N)
    are the classes to reach; use :func:`random_targets` for Cleverhans' untargeted mode.
    """
    _check_parameters(theta, gamma, max_iterations, scores)
    lower, upper = float(bounds[0]), float(bounds[1])
    if not lower < upper:
        raise InputError(f"bounds must be (lower, upper) with lower < upper, got {bounds}")
    check_images(images, "images", bounds=(lower, upper))
    check_labels(targets, "targets", batch_size=images.shape[0])
    if isinstance(classifier, nn.Module):
        check_model_dtype(images, classifier)
        with evaluation_mode(classifier):
            return _attack(
                classifier, images, targets, theta, gamma, max_iterations, scores, (lower, upper)
            )
    return _attack(
        classifier, images, targets, theta, gamma, max_iterations, scores, (lower, upper)
    )


def _attack(
    classifier: Classifier,
    images: torch.Tensor,
    targets: torch.Tensor,
    theta: float,
    gamma: float,
    max_iterations: int,
    scores: ScoreSpace,
    bounds: tuple[float, float],
) -> JSMAResult:
    lower, upper = bounds
    increase = theta > 0
    count = images.shape[0]
    adversarials = images.detach().clone().flatten(1)
    features = adversarials.shape[1]
    budget = iteration_budget(features, gamma, max_iterations)
    targets = targets.to(images.device)
    domain = adversarials < upper if increase else adversarials > lower
    running = torch.ones(count, dtype=torch.bool, device=images.device)
    pairs = torch.full((count, budget, 2), -1, dtype=torch.int64, device=images.device)
    iterations = torch.zeros(count, dtype=torch.int64, device=images.device)
    for step in range(budget):
        active = torch.nonzero(running).flatten()
        if active.numel() == 0:
            break
        current = adversarials[active].view(-1, *images.shape[1:])
        predictions, target_gradient, other_gradient = _target_and_other_gradients(
            classifier, current, targets[active], scores
        )
        go_on = (predictions != targets[active]) & (domain[active].sum(1) >= 2)
        first, second, found = best_pairs(
            target_gradient, other_gradient, domain[active], increase=increase
        )
        go_on &= found
        running[active] = go_on
        chosen = active[go_on]
        if chosen.numel() == 0:
            break
        first, second = first[go_on], second[go_on]
        for index in (first, second):
            moved = adversarials[chosen, index] + theta
            adversarials[chosen, index] = moved.clamp(lower, upper)
            domain[chosen, index] = False
        pairs[chosen, step, 0] = first
        pairs[chosen, step, 1] = second
        iterations[chosen] += 1
    adversarials = adversarials.view_as(images)
    reached = _predict(classifier, adversarials) == targets
    return JSMAResult(adversarials, reached, pairs, iterations)


def _predict(classifier: Classifier, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        predictions: torch.Tensor = classifier(images).argmax(1)
    return predictions


class SaliencyMapAttack(MinimizationAttack):
    """JSMA as a Foolbox 3 ``MinimizationAttack`` (L0; run with ``epsilons=None``).

    With ``TargetedMisclassification`` it attacks the given targets; with ``Misclassification``
    (or :class:`MisclassifiedAndNotRejected`) it draws a random other class per sample
    (:func:`random_targets`) from a generator seeded with ``seed``, or, when ``seed`` is None,
    from PyTorch's global generator, which the harness seeds per run and restart. Parameters:
    see :func:`saliency_map_attack`; defaults are Cleverhans' and PDM Appendix C's.
    """

    def __init__(
        self,
        *,
        theta: float = 1.0,
        gamma: float = 1.0,
        max_iterations: int = 100,
        scores: ScoreSpace = "probabilities",
        seed: int | None = None,
    ) -> None:
        _check_parameters(theta, gamma, max_iterations, scores)
        self.theta = float(theta)
        self.gamma = float(gamma)
        self.max_iterations = max_iterations
        self.scores: ScoreSpace = scores
        self.seed = seed

    @property
    def distance(self) -> Distance:
        return l0

    def run(
        self,
        model: Model,
        inputs: T,
        criterion: Any,
        *,
        early_stop: float | None = None,
        **kwargs: Any,
    ) -> T:
        raise_if_kwargs(kwargs)
        del early_stop
        images_, restore_type = astensor_(inputs)
        images: torch.Tensor = images_.raw
        criterion_ = get_criterion(criterion)

        def classify(batch: torch.Tensor) -> torch.Tensor:
            outputs: torch.Tensor = model(batch)
            return outputs

        if isinstance(criterion_, TargetedMisclassification):
            targets = criterion_.target_classes.raw
        elif isinstance(criterion_, Misclassification):
            labels = criterion_.labels.raw
            if isinstance(criterion_, MisclassifiedAndNotRejected):
                num_classes = criterion_.num_classes
            else:
                num_classes = int(_outputs_width(classify, images))
            generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
            targets = random_targets(labels, num_classes, generator)
        else:
            raise InputError(
                f"SaliencyMapAttack needs a Misclassification or TargetedMisclassification "
                f"criterion, got {type(criterion_).__name__}"
            )
        result = saliency_map_attack(
            classify,
            images,
            targets.to(images.device),
            theta=self.theta,
            gamma=self.gamma,
            max_iterations=self.max_iterations,
            scores=self.scores,
            bounds=(float(model.bounds[0]), float(model.bounds[1])),
        )
        return restore_type(astensor(result.adversarials))


def _outputs_width(classifier: Classifier, images: torch.Tensor) -> int:
    with torch.no_grad():
        return int(classifier(images[:1]).shape[1])
