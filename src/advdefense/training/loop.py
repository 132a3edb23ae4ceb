"""The shared supervised training loop: mini-batches, Adam, seeding, progress bars."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from advdefense.devices import seed_everything
from advdefense.errors import InputError, UserError
from advdefense.modes import evaluation_mode
from advdefense.training.checkpoint import EpochCheckpoint, TrackedRun
from advdefense.training.graphs import CapturedStep, TrainingStep
from advdefense.validation import check_images, check_labels, check_model_dtype, check_positive_int

__all__ = [
    "BatchTransform",
    "EpochRecord",
    "TrainingConfig",
    "TrainingHistory",
    "train_classifier",
]

BatchTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(model, images, labels) -> images`` applied to each batch before the update."""


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of :func:`train_classifier`; stored verbatim in the checkpoint."""

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.optimizer not in ("adam", "sgd"):
            raise InputError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


@dataclass(frozen=True)
class EpochRecord:
    """Mean training loss and accuracy of one epoch."""

    epoch: int
    loss: float
    accuracy: float


@dataclass
class TrainingHistory:
    """Per-epoch records of one training run."""

    epochs: list[EpochRecord] = field(default_factory=list)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainingConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    batch_transform: BatchTransform | None = None,
    checkpoint: EpochCheckpoint | None = None,
    run_identity: Mapping[str, Any] | None = None,
    cuda_graph: bool = False,
) -> TrainingHistory:
    """Train ``model`` with cross-entropy on ``(images, labels)``; leave it in eval mode.

    ``batch_transform(model, images, labels)``, if given, replaces each (on-device) batch before
    the forward pass, e.g. with adversarial examples (Madry et al. 2018). It runs with the model
    in eval mode, so BatchNorm statistics are neither used from nor updated by the attack's
    forward passes and the attack targets the model as it will be evaluated; train mode is
    restored before the update. The recorded loss and accuracy are those on the transformed
    batches.

    With a ``checkpoint``, the state is saved after every epoch and a rerun of the same run
    resumes from its last finished epoch. The run's identity is the config, the model's class
    and config, the data, and ``run_identity`` (whatever else shapes it, such as the
    ``batch_transform``'s parameters); the caller removes the state once the model is saved.
    The learning rate is constant, so the state of a run asking for fewer epochs resumes into
    one asking for more: training longer continues instead of starting over.

    ``cuda_graph`` replays each full batch's step as a CUDA graph (:class:`CapturedStep`):
    the same updates, faster for small models on small batches (Madry's adversarial training:
    3.7 times on an H200, ``benchmarks/cuda_graph_training.py``). It needs a CUDA device and
    a ``batch_transform`` that never waits on the GPU
    (:func:`~advdefense.defenses.adversarial_training.madry_batch_transform` does not). It is
    not part of the run's identity: a run started on a GPU resumes on the CPU.
    """
    check_images(images, "images")
    check_model_dtype(images, model)
    check_labels(labels, "labels", batch_size=images.shape[0])
    device = device or next(model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise UserError(
            f"cuda_graph needs a CUDA device, got {device}; train on a GPU or without it"
        )
    generator = seed_everything(config.seed)
    model.to(device).train()
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(
            model.parameters(),
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            # the step count on the device, so that eager and graphed GPU runs update alike
            capturable=device.type == "cuda",
        )
    else:
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.learning_rate,
            momentum=0.9,
            weight_decay=config.weight_decay,
        )
    loss_function = nn.CrossEntropyLoss()
    model_config = getattr(model, "config", None)
    identity = {
        "trainer": "classifier",
        "config": asdict(config),
        "model": type(model).__name__,
        "model_config": (
            asdict(model_config)
            if is_dataclass(model_config) and not isinstance(model_config, type)
            else None
        ),
        **dict(run_identity or {}),
    }
    # a constant learning rate: a longer run continues a shorter one's state
    run = TrackedRun(
        checkpoint, identity, (images, labels), model, optimizer, generator, config.epochs
    )
    resumed = run.restore()
    history = TrainingHistory(resumed.records_as(EpochRecord))
    count = images.shape[0]
    batches_per_epoch = math.ceil(count / config.batch_size)
    step: TrainingStep = _training_step(model, optimizer, loss_function, batch_transform)
    if cuda_graph:
        step = CapturedStep(step, optimizer)
        images, labels = images.to(device), labels.to(device)  # no host copy per batch
    bar = tqdm(
        total=config.epochs * batches_per_epoch,
        initial=resumed.epochs_done * batches_per_epoch,
        desc="train",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    try:
        for epoch in range(resumed.epochs_done + 1, config.epochs + 1):
            order = torch.randperm(count, generator=generator).to(images.device)
            # summed on the device in float64, read once per epoch: no wait on each batch
            total_loss = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for start in range(0, count, config.batch_size):
                index = order[start : start + config.batch_size]
                batch_labels = labels[index].to(device)
                loss, logits = step(images[index].to(device), batch_labels)
                total_loss += loss.double() * index.numel()
                correct += (logits.argmax(1) == batch_labels).sum()
                bar.update(1)
            record = EpochRecord(epoch, float(total_loss) / count, int(correct) / count)
            history.epochs.append(record)
            run.save(history.epochs)
            bar.set_postfix(epoch=epoch, loss=f"{record.loss:.4f}", acc=f"{record.accuracy:.4f}")
    finally:
        bar.close()
        model.eval()
        if cuda_graph:
            optimizer.zero_grad(set_to_none=True)  # the graph's gradient buffers
    return history


def _training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_function: nn.Module,
    batch_transform: BatchTransform | None,
) -> TrainingStep:
    """One update on a batch, batch transform included; returns the loss and the logits."""

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_transform is not None:
            with evaluation_mode(model):
                images = batch_transform(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = loss_function(logits, labels)
        loss.backward()
        optimizer.step()
        return loss.detach(), logits.detach()

    return step
