"""What ``advdefense train ARCH`` builds and how it trains each architecture.

``cnn``: the ABS-paper CNN, cross-entropy (Adam). ``madry``: the Madry MNIST CNN trained on
PGD L-inf adversarial examples only (Madry et al. 2018). ``dim``, ``bidim``, ``im``,
``singleim``, ``dn-singleim``: the DIM family and its ablations (DIM paper Sec. 3.2, Table 2),
denoiser on Eq. 1 then internal models on Eq. 2. ``ce``, ``rce``, ``siamese-rvl``, ``pdm``: a
ResNet (``TrainOptions.arch``) on the objectives of the PDM paper's Table 1 (SGD, App. B).

Batch size and learning rate default per family: 64 and Adam 1e-3 for the CNNs and the DIM
family, 128 and SGD 0.1 for the PDM family (App. B of the PDM paper).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from advdefense.defenses.adversarial_training import PGDConfig, train_madry
from advdefense.defenses.dim import InternalModelClassifier
from advdefense.devices import seed_everything
from advdefense.errors import InputError
from advdefense.nn.abs_cnn import AbsCNN, AbsCNNConfig
from advdefense.nn.madry_cnn import MadryCNN, MadryCNNConfig
from advdefense.registry import get_architecture
from advdefense.training.checkpoint import EpochCheckpoint
from advdefense.training.dim import DIMTrainingConfig, train_dim_family
from advdefense.training.loop import TrainingConfig, train_classifier
from advdefense.training.pdm import LOSSES, PDMTrainingConfig, build_resnet, train_pdm
from advdefense.validation import check_positive_int

__all__ = ["DIM_FAMILY", "PDM_FAMILY", "TRAINABLE", "TrainOptions", "train_architecture"]

DIM_FAMILY = ("dim", "bidim", "im", "singleim", "dn-singleim")
PDM_FAMILY = LOSSES
TRAINABLE = ("cnn", "madry", *DIM_FAMILY, *PDM_FAMILY)
_ADAM_DEFAULTS = (64, 1e-3)
_SGD_DEFAULTS = (PDMTrainingConfig.batch_size, PDMTrainingConfig.learning_rate)


@dataclass(frozen=True)
class TrainOptions:
    """Command-line training options; each architecture uses the ones that apply to it."""

    epochs: int
    batch_size: int | None = None
    learning_rate: float | None = None
    seed: int = 0
    denoiser_epochs: int | None = None
    pgd: PGDConfig = field(default_factory=PGDConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    arch: str = "resnet20"
    weight_decay: float = PDMTrainingConfig.weight_decay
    variance_weight: float = PDMTrainingConfig.variance_weight
    classification_weight: float = PDMTrainingConfig.classification_weight
    siamese_weight: float = PDMTrainingConfig.siamese_weight
    warmup_epochs: int = PDMTrainingConfig.warmup_epochs
    checkpoint: EpochCheckpoint | None = None
    """Per-epoch resumable state (cnn, madry and the PDM family; DIM trains in one go)."""
    reference_accuracies: tuple[float, ...] = ()
    """An earlier run's training accuracy per epoch, to warn early when a retrain departs from
    it (the PDM family)."""
    num_classes: int | None = None
    """The dataset's number of classes (the PDM family; None: the largest label + 1, which a
    small training subset may lack)."""

    def resolved(self, architecture: str) -> TrainOptions:
        """These options with the family's default batch size and learning rate filled in."""
        batch_size, learning_rate = _SGD_DEFAULTS if architecture in PDM_FAMILY else _ADAM_DEFAULTS
        resolved = replace(
            self,
            batch_size=batch_size if self.batch_size is None else self.batch_size,
            learning_rate=learning_rate if self.learning_rate is None else self.learning_rate,
        )
        assert resolved.batch_size is not None and resolved.learning_rate is not None
        check_positive_int(resolved.batch_size, "batch_size (--batch-size)")
        if not math.isfinite(resolved.learning_rate) or resolved.learning_rate <= 0:
            raise InputError(
                f"learning_rate (--lr) must be finite and positive, got {resolved.learning_rate}"
            )
        return resolved


def train_architecture(
    architecture: str, images: torch.Tensor, labels: torch.Tensor, options: TrainOptions
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``architecture`` for ``images`` and train it; return it with its training record.

    Everything is seeded with ``options.seed`` before the model is built, so its initial weights
    depend on the seed alone, not on what the process drew from the global generators before.
    The record names the CPU threads of the process that finished the training
    (``torch_threads``): float sums, hence the weights, can depend on them.
    """
    if architecture not in TRAINABLE:
        raise InputError(f"cannot train {architecture!r}; trainable: {', '.join(TRAINABLE)}")
    model, record = _train(architecture, images, labels, options)
    return model, {**record, "torch_threads": torch.get_num_threads()}


def _train(
    architecture: str, images: torch.Tensor, labels: torch.Tensor, options: TrainOptions
) -> tuple[nn.Module, dict[str, Any]]:
    options = options.resolved(architecture)
    assert options.batch_size is not None and options.learning_rate is not None
    seed_everything(options.seed)
    if architecture in PDM_FAMILY:
        return _train_pdm_family(architecture, images, labels, options)
    if tuple(images.shape[1:]) != (1, 28, 28) and architecture != "cnn":
        raise InputError(f"{architecture} takes 1 x 28 x 28 images, got {tuple(images.shape[1:])}")
    if architecture in DIM_FAMILY:
        model_class = get_architecture(architecture)
        assert issubclass(model_class, InternalModelClassifier)
        dim_model = model_class(model_class.default_config())
        dim_config = DIMTrainingConfig(
            denoiser_epochs=(
                options.epochs if options.denoiser_epochs is None else options.denoiser_epochs
            ),
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
    # on a GPU, each step of these small models replays as a CUDA graph (same updates, faster)
    cuda_graph = options.device.type == "cuda"
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
            checkpoint=options.checkpoint,
            cuda_graph=cuda_graph,
        )
        record = {**asdict(training), "adversarial_training": asdict(options.pgd)}
    else:
        if tuple(images.shape[2:]) != (28, 28):
            raise InputError(f"cnn takes 28 x 28 images, got {tuple(images.shape[2:])}")
        model = AbsCNN(AbsCNNConfig(in_channels=int(images.shape[1])))
        history = train_classifier(
            model,
            images,
            labels,
            training,
            device=options.device,
            progress=options.progress,
            checkpoint=options.checkpoint,
            cuda_graph=cuda_graph,
        )
        record = asdict(training)
    return model, {
        **record,
        "cuda_graph": cuda_graph,
        "final_train_accuracy": history.epochs[-1].accuracy,
    }


def _train_pdm_family(
    loss: str, images: torch.Tensor, labels: torch.Tensor, options: TrainOptions
) -> tuple[nn.Module, dict[str, Any]]:
    assert options.batch_size is not None and options.learning_rate is not None
    model = build_resnet(
        options.arch,
        loss,
        in_channels=int(images.shape[1]),
        num_classes=int(labels.max()) + 1 if options.num_classes is None else options.num_classes,
        seed=options.seed,
    )
    config = PDMTrainingConfig(
        loss=loss,
        epochs=options.epochs,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        variance_weight=options.variance_weight,
        classification_weight=options.classification_weight,
        siamese_weight=options.siamese_weight,
        warmup_epochs=options.warmup_epochs,
        seed=options.seed,
    )
    model, history = train_pdm(
        model,
        images,
        labels,
        config,
        device=options.device,
        progress=options.progress,
        checkpoint=options.checkpoint,
        reference_accuracies=options.reference_accuracies,
    )
    seconds = sum(getattr(record, "seconds", 0.0) for record in history.epochs)
    return model, {
        **asdict(config),
        "arch": options.arch,
        "final_train_accuracy": history.epochs[-1].accuracy,
        "train_accuracy_per_epoch": [record.accuracy for record in history.epochs],
        "seconds": seconds,  # summed over the epochs, resumed ones included
    }
