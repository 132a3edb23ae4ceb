"""Adaptive gradient attacks for defenses whose scores are not logits (DESIGN.md §3.4).

Cross-entropy on scores that are not logits (DIM's relative L1 intensities lie in [0, 1], so
their softmax is nearly flat) gives weak gradients. These attacks keep Foolbox's PGD (its random
start, steps, projection and clipping) and change only the loss:

* **margin** (Carlini & Wagner 2017, their f6): ``max_{j != c} z_j - z_c``;
* **DLR** (Croce & Hein 2020, Sec. 3): the margin divided by ``z_pi1 - z_pi3`` (untargeted) or
  by ``z_pi1 - (z_pi3 + z_pi4) / 2`` (targeted), with ``z_pi`` the scores sorted in decreasing
  order, so the loss is invariant to shifting and rescaling the scores.

Foolbox ascends the loss at the true label ``c = y`` when untargeted and descends it at the
target ``c = t`` when targeted, so one formula serves both. :class:`AllTargetsAttack` runs a
targeted attack towards each of the K - 1 other classes in turn and keeps, per sample, the
smallest successful adversarial (AutoAttack's targeted protocol, all targets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from eagerpy.astensor import astensor, astensor_
from eagerpy.tensor.tensor import Tensor
from foolbox.attacks.base import FixedEpsilonAttack, get_criterion, raise_if_kwargs
from foolbox.attacks.gradient_descent_base import BaseGradientDescent
from foolbox.attacks.projected_gradient_descent import (
    L2ProjectedGradientDescentAttack,
    LinfProjectedGradientDescentAttack,
)
from foolbox.criteria import Misclassification, TargetedMisclassification
from foolbox.distances import Distance
from foolbox.models.base import Model

from advdefense.errors import InputError

__all__ = [
    "AllTargetsAttack",
    "L2DLRAllTargetsAttack",
    "L2MarginAllTargetsAttack",
    "LinfDLRAllTargetsAttack",
    "LinfMarginAllTargetsAttack",
    "dlr_loss",
    "margin_loss",
]

_TINY = 1e-12


def _other_best(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``max_{j != c} z_j`` per row."""
    masked = scores.scatter(1, classes[:, None], -torch.inf)
    return masked.max(1).values


def margin_loss(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per sample ``max_{j != c} z_j - z_c`` (C&W's f6 without the confidence clamp)."""
    return _other_best(scores, classes) - scores.gather(1, classes[:, None])[:, 0]


def dlr_loss(scores: torch.Tensor, classes: torch.Tensor, *, targeted: bool) -> torch.Tensor:
    """Per sample DLR loss (Croce & Hein 2020, Eq. 6 and its targeted form); needs K >= 4
    when targeted, K >= 3 otherwise.

    Targeted, the numerator is ``max_{j != t} z_j - z_t`` rather than the paper's ``z_y - z_t``:
    the same while the true class ``y`` leads the others, and it keeps pushing once another
    class overtakes ``y`` (the scale is the paper's).
    """
    needed = 4 if targeted else 3
    if scores.shape[1] < needed:
        raise InputError(
            f"the {'targeted ' if targeted else ''}DLR loss needs at least {needed} classes, "
            f"the model has {scores.shape[1]}; use the margin-loss attacks instead"
        )
    ordered = scores.sort(1, descending=True).values
    if targeted:
        scale = ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3])
    else:
        scale = ordered[:, 0] - ordered[:, 2]
    return margin_loss(scores, classes) / (scale + _TINY)


class _MarginLoss(BaseGradientDescent):
    """Foolbox PGD with the margin loss instead of cross-entropy."""

    def get_loss_fn(self, model: Model, labels: Tensor) -> Callable[[Tensor], Tensor]:
        def loss_fn(inputs: Tensor) -> Tensor:
            scores = model(inputs).raw
            return astensor(margin_loss(scores, labels.raw).sum())

        return loss_fn


class _DLRLoss(BaseGradientDescent):
    """Foolbox PGD with the DLR loss; ``targeted`` is set by :class:`AllTargetsAttack`."""

    targeted = False

    def get_loss_fn(self, model: Model, labels: Tensor) -> Callable[[Tensor], Tensor]:
        def loss_fn(inputs: Tensor) -> Tensor:
            scores = model(inputs).raw
            return astensor(dlr_loss(scores, labels.raw, targeted=self.targeted).sum())

        return loss_fn


class LinfMarginPGD(_MarginLoss, LinfProjectedGradientDescentAttack):
    """L-inf PGD on the margin loss."""


class L2MarginPGD(_MarginLoss, L2ProjectedGradientDescentAttack):
    """L2 PGD on the margin loss."""


class LinfDLRPGD(_DLRLoss, LinfProjectedGradientDescentAttack):
    """L-inf PGD on the DLR loss."""


class L2DLRPGD(_DLRLoss, L2ProjectedGradientDescentAttack):
    """L2 PGD on the DLR loss."""


class AllTargetsAttack(FixedEpsilonAttack):
    """Targeted ``inner_class`` towards every other class; per sample the smallest success.

    Subclasses name the inner attack; keyword arguments go to it (e.g. ``steps``). Success is
    judged by ``judge`` when set (the defended model, when the attacked one is its surrogate:
    :func:`~advdefense.attacks.starting_points.run_attack` sets it), else by the attacked model.
    """

    inner_class: ClassVar[type[BaseGradientDescent]]
    judge: Model | None = None

    def __init__(self, **inner_parameters: Any) -> None:
        self.inner = self.inner_class(**inner_parameters)
        if isinstance(self.inner, _DLRLoss):
            self.inner.targeted = True

    @property
    def distance(self) -> Distance:
        return self.inner.distance

    def run(
        self,
        model: Model,
        inputs: Any,
        criterion: Any,
        *,
        epsilon: float,
        **kwargs: Any,
    ) -> Any:
        raise_if_kwargs(kwargs)
        images, restore_type = astensor_(inputs)
        untargeted = get_criterion(criterion)
        if not isinstance(untargeted, Misclassification):
            raise ValueError("AllTargetsAttack chooses its own targets: pass the true labels")
        labels = untargeted.labels.raw
        classes = int(model(images).shape[1])
        best = images.raw.clone()
        best_size = torch.full((images.shape[0],), torch.inf, device=labels.device)
        for offset in range(1, classes):
            targets = astensor((labels + offset) % classes)
            found = self.inner.run(
                model, images, TargetedMisclassification(targets), epsilon=epsilon
            )
            found = astensor(found)
            success = untargeted(found, (self.judge or model)(found)).raw
            size = self.distance(images, found).raw
            better = success & (size < best_size)
            best[better] = found.raw[better]
            best_size = torch.where(better, size, best_size)
        return restore_type(astensor(best))


class LinfMarginAllTargetsAttack(AllTargetsAttack):
    """L-inf PGD on the margin loss towards each of the K - 1 other classes."""

    inner_class = LinfMarginPGD


class L2MarginAllTargetsAttack(AllTargetsAttack):
    """L2 PGD on the margin loss towards each of the K - 1 other classes."""

    inner_class = L2MarginPGD


class LinfDLRAllTargetsAttack(AllTargetsAttack):
    """L-inf PGD on the targeted DLR loss towards each of the K - 1 other classes."""

    inner_class = LinfDLRPGD


class L2DLRAllTargetsAttack(AllTargetsAttack):
    """L2 PGD on the targeted DLR loss towards each of the K - 1 other classes."""

    inner_class = L2DLRPGD
