"""Clean accuracy and robust accuracy over a grid of epsilons for one attack.

Every adversarial Foolbox returns is re-checked here: clipped to [0, 1], its norm measured
against the epsilon, and its label taken from a fresh forward pass, so an attack's own success
flag is never trusted. The model is evaluated in eval mode and given back in the caller's mode.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from foolbox.models.pytorch import PyTorchModel
from torch import nn
from tqdm.auto import tqdm

from advdefense.attacks.catalog import AttackEntry
from advdefense.attacks.norms import Norm, perturbation_norm
from advdefense.errors import InputError
from advdefense.modes import device_of, evaluation_mode
from advdefense.validation import check_images, check_labels, check_positive_int

__all__ = ["AttackOutcome", "clean_accuracy", "evaluate_attack", "evaluation_mode", "predict"]

_NORM_TOLERANCE = 1e-5


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (argmax of the scores) for ``images``, computed in batches."""
    check_images(images, "images")
    check_positive_int(batch_size, "batch_size")
    device = device_of(model)
    with evaluation_mode(model):
        predictions = [
            model(images[start : start + batch_size].to(device)).argmax(1).cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    return torch.cat(predictions)


def clean_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 500
) -> float:
    """Fraction of ``images`` classified as ``labels``."""
    check_labels(labels, "labels", batch_size=images.shape[0])
    correct = int((predict(model, images, batch_size=batch_size) == labels).sum())
    return correct / labels.numel()


@dataclass(frozen=True)
class AttackOutcome:
    """Per-sample result of one attack over an epsilon grid.

    ``robust[e, i]`` is True when sample ``i`` is classified correctly and the attack found no
    adversarial within ``epsilons[e]``.
    """

    attack_id: str
    norm: Norm
    epsilons: tuple[float, ...]
    robust: torch.Tensor
    seconds: float

    def accuracy_at(self, epsilon: float) -> float:
        """Robust accuracy at one of the grid's epsilons."""
        for index, value in enumerate(self.epsilons):
            if math.isclose(value, epsilon, rel_tol=1e-9, abs_tol=1e-12):
                return int(self.robust[index].sum()) / self.robust.shape[1]
        raise InputError(f"epsilon {epsilon} is not in this outcome's grid {self.epsilons}")

    def accuracy_curve(self) -> list[tuple[float, float]]:
        """(epsilon, robust accuracy) for every epsilon of the grid."""
        count = self.robust.shape[1]
        return [
            (eps, int(row.sum()) / count)
            for eps, row in zip(self.epsilons, self.robust, strict=True)
        ]


def evaluate_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: AttackEntry,
    epsilons: Sequence[float],
    *,
    batch_size: int = 200,
    progress: bool = True,
) -> AttackOutcome:
    """Run ``attack`` on ``model`` at every epsilon and re-check each adversarial."""
    check_images(images, "images")
    check_labels(labels, "labels", batch_size=images.shape[0])
    check_positive_int(batch_size, "batch_size")
    grid = tuple(sorted(float(eps) for eps in epsilons))
    if not grid or grid[0] < 0:
        raise InputError(f"epsilons must be a non-empty list of non-negative numbers, got {grid}")
    device = device_of(model)
    robust_batches = []
    started = time.perf_counter()
    with evaluation_mode(model):
        foolbox_model = PyTorchModel(model, bounds=(0.0, 1.0), device=device)
        foolbox_attack = attack.build()
        for start in tqdm(
            range(0, images.shape[0], batch_size),
            desc=attack.id,
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            batch = images[start : start + batch_size].to(device)
            batch_labels = labels[start : start + batch_size].to(device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                _, adversarials, _ = foolbox_attack(
                    foolbox_model, batch, batch_labels, epsilons=list(grid)
                )
            robust_batches.append(
                torch.stack(
                    [
                        _still_robust(model, batch, batch_labels, adversarial, attack.norm, eps)
                        for adversarial, eps in zip(adversarials, grid, strict=True)
                    ]
                )
            )
    robust = torch.cat(robust_batches, dim=1).cpu()
    # An adversarial found within a smaller epsilon lies within every larger one as well.
    robust = torch.cummin(robust.to(torch.uint8), dim=0).values.bool()
    return AttackOutcome(
        attack_id=attack.id,
        norm=attack.norm,
        epsilons=grid,
        robust=robust,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def _still_robust(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    adversarials: torch.Tensor,
    norm: Norm,
    epsilon: float,
) -> torch.Tensor:
    """True where the clean image is correct and the clipped adversarial is not a valid break."""
    adversarials = adversarials.clamp(0.0, 1.0)
    within_budget = (
        perturbation_norm(adversarials - images, norm)
        <= epsilon * (1 + _NORM_TOLERANCE) + _NORM_TOLERANCE
    )
    clean_correct: torch.Tensor = model(images).argmax(1) == labels
    adversarial_correct: torch.Tensor = model(adversarials).argmax(1) == labels
    broken = within_budget & ~adversarial_correct
    return (clean_correct & ~broken).cpu()
