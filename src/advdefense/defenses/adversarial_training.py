"""Adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018), for any classifier.

Each training batch is replaced by L-infinity PGD adversarial examples of the current model
(Madry et al. Sec. 2-4: min over weights of the max over the epsilon ball of the cross-entropy),
and the model is trained on those only. Madry's MNIST settings are the defaults of
:class:`PGDConfig`: epsilon 0.3, 40 steps of 0.01, uniform random start; their optimizer is Adam
with learning rate 1e-4, batches of 50, 100,000 iterations (:data:`MADRY_MNIST_TRAINING`).

The PGD here is a small on-device training-time attack. Evaluate trained models with the
evaluation suites (Foolbox attacks, several restarts), never with this function alone.
Known limits: robustness is specific to the L-infinity threat model it was trained for; the DIM
paper (Table 2) finds Madry's model weak under L0 and L2 decision-based attacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advdefense.errors import InputError
from advdefense.modes import evaluation_mode
from advdefense.training.checkpoint import EpochCheckpoint
from advdefense.training.loop import TrainingConfig, TrainingHistory, train_classifier
from advdefense.validation import check_images, check_labels, check_model_dtype, check_positive_int

__all__ = [
    "MADRY_MNIST_TRAINING",
    "PGDConfig",
    "madry_batch_transform",
    "pgd_linf",
    "train_madry",
]

MADRY_MNIST_TRAINING = TrainingConfig(epochs=84, batch_size=50, learning_rate=1e-4)
"""Madry et al.'s MNIST schedule: Adam 1e-4, batch 50, 100k iterations (~84 epochs of 60k)."""


@dataclass(frozen=True)
class PGDConfig:
    """L-infinity PGD parameters; defaults are Madry et al.'s MNIST attack (Sec. 4)."""

    epsilon: float = 0.3
    steps: int = 40
    step_size: float = 0.01
    random_start: bool = True

    def __post_init__(self) -> None:
        for name in ("epsilon", "step_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise InputError(f"{name} must be positive and finite, got {value}")
        check_positive_int(self.steps, "steps")
        if not isinstance(self.random_start, bool):
            raise InputError(f"random_start must be True or False, got {self.random_start!r}")


def pgd_linf(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: PGDConfig,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L-infinity PGD (Madry et al. 2018, Eq. 2): sign-gradient ascent on the
    cross-entropy, projected onto the epsilon ball around ``images`` and onto [0, 1] each step.

    The random start is uniform in the ball, drawn from ``generator`` (on its device) or from
    the global RNG of the images' device. The model's train/eval mode is left as it is and no
    parameter gradients are accumulated. Returns detached adversarial images.
    """
    check_images(images, "images")
    check_model_dtype(images, model)
    with torch.no_grad(), evaluation_mode(model):  # no BatchNorm statistics move
        classes = int(model(images[:1]).shape[1])
    check_labels(labels, "labels", batch_size=images.shape[0], num_classes=classes)
    return _pgd_linf(model, images, labels, config, generator)


def _pgd_linf(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: PGDConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """:func:`pgd_linf` without the input checks, which wait on the GPU: on checked batches,
    it never does, so it can be captured in a CUDA graph."""
    images = images.detach()
    lower = (images - config.epsilon).clamp_(min=0.0)
    upper = (images + config.epsilon).clamp_(max=1.0)
    adversarial = images.clone()
    if config.random_start:
        noise_device = generator.device if generator is not None else images.device
        noise = torch.rand(
            images.shape, generator=generator, device=noise_device, dtype=images.dtype
        ).to(images.device)
        adversarial = torch.min(torch.max(images + (2 * noise - 1) * config.epsilon, lower), upper)
    with torch.enable_grad():
        for _ in range(config.steps):
            adversarial.requires_grad_(True)
            loss = F.cross_entropy(model(adversarial), labels, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, adversarial)
            stepped = adversarial.detach() + config.step_size * gradient.sign()
            adversarial = torch.min(torch.max(stepped, lower), upper)
    return adversarial.detach()


def madry_batch_transform(
    config: PGDConfig, *, generator: torch.Generator | None = None
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``batch_transform`` for :func:`train_classifier` replacing batches by PGD examples.

    The batches are the trainer's, checked once there, so none is checked again here: the
    transform never waits on the GPU and can be captured in a CUDA graph."""

    def transform(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _pgd_linf(model, images, labels, config, generator)

    return transform


def train_madry(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    training: TrainingConfig,
    pgd: PGDConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    checkpoint: EpochCheckpoint | None = None,
    cuda_graph: bool = False,
) -> TrainingHistory:
    """Adversarially train ``model`` on PGD examples only (Madry et al. 2018); eval mode after.

    The attack runs with the model in eval mode (see :func:`train_classifier`); for
    BatchNorm-free models such as :class:`~advdefense.nn.madry_cnn.MadryCNN` this equals
    Madry's TF code, which attacks the training-mode graph. Random starts draw from the global
    RNG, seeded by ``training.seed``. The history's loss and accuracy are on the PGD examples.
    A ``checkpoint`` makes the run resumable epoch by epoch, and ``cuda_graph`` replays each
    step as a CUDA graph on a GPU (both: :func:`train_classifier`).
    """
    return train_classifier(
        model,
        images,
        labels,
        training,
        device=device,
        progress=progress,
        batch_transform=madry_batch_transform(pgd),
        checkpoint=checkpoint,
        run_identity={"adversarial_training": asdict(pgd)},
        cuda_graph=cuda_graph,
    )
