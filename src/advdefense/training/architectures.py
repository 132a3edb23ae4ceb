"""What ``advdefense train ARCH`` builds and how it trains each architecture.

``cnn``: the ABS-paper CNN, cross-entropy (Adam). ``madry``: the Madry MNIST CNN trained on
PGD L-inf adversarial examples only (Madry et al. 2018). ``dim``, ``bidim``, ``im``,
``singleim``, ``dn-singleim``: the DIM family and its ablations (DIM paper Sec. 3.2, Table 2),
denoiser on Eq. 1 then internal models on Eq. 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from advdefense.defenses.adversarial_training import PGDConfig, train_madry
from advdefense.defenses.dim import InternalModelClassifier
from advdefense.errors import InputError
from advdefense.nn.abs_cnn import AbsCNN, AbsCNNConfig
from advdefense.nn.madry_cnn import MadryCNN, MadryCNNConfig
from advdefense.registry import get_architecture
from advdefense.training.dim import DIMTrainingConfig, train_dim_family
from advdefense.training.loop import TrainingConfig, train_classifier

__all__ = ["DIM_FAMILY", "TRAINABLE", "TrainOptions", "train_architecture"]

DIM_FAMILY = ("dim", "bidim", "im", "singleim", "dn-singleim")
TRAINABLE = ("cnn", "madry", *DIM_FAMILY)


@dataclass(frozen=True)
class TrainOptions:
    """Command-line training options; each architecture uses the ones that apply to it."""

    epochs: int
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0
    denoiser_epochs: int | None = None
    pgd: PGDConfig = field(default_factory=PGDConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True


def train_architecture(
    architecture: str, images: torch.Tensor, labels: torch.Tensor, options: TrainOptions
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``architecture`` for ``images`` and train it; return it with its training record."""
    if architecture not in TRAINABLE:
        raise InputError(f"cannot train {architecture!r}; trainable: {', '.join(TRAINABLE)}")
    if tuple(images.shape[1:]) != (1, 28, 28) and architecture != "cnn":
        raise InputError(f"{architecture} takes 1 x 28 x 28 images, got {tuple(images.shape[1:])}")
    if architecture in DIM_FAMILY:
        model_class = get_architecture(architecture)
        assert issubclass(model_class, InternalModelClassifier)
        dim_model = model_class(model_class.default_config())
        dim_config = DIMTrainingConfig(
            denoiser_epochs=options.denoiser_epochs or options.epochs,
            internal_epochs=options.epochs,
            batch_size=options.batch_size,
            learning_rate=options.learning_rate,
            seed=options.seed,
        )
        losses = train_dim_family(
            dim_model, images, labels, dim_config, device=options.device, progress=options.progress
        )
        return dim_model, {**asdict(dim_config), "final_losses": losses}
    training = TrainingConfig(
        epochs=options.epochs,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        seed=options.seed,
    )
    model: nn.Module
    if architecture == "madry":
        model = MadryCNN(MadryCNNConfig(in_channels=int(images.shape[1])))
        history = train_madry(
            model,
            images,
            labels,
            training,
            options.pgd,
            device=options.device,
            progress=options.progress,
        )
        record = {**asdict(training), "adversarial_training": asdict(options.pgd)}
    else:
        if tuple(images.shape[2:]) != (28, 28):
            raise InputError(f"cnn takes 28 x 28 images, got {tuple(images.shape[2:])}")
        model = AbsCNN(AbsCNNConfig(in_channels=int(images.shape[1])))
        history = train_classifier(
            model, images, labels, training, device=options.device, progress=options.progress
        )
        record = asdict(training)
    return model, {**record, "final_train_accuracy": history.epochs[-1].accuracy}
