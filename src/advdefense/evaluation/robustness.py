"""Predictions and clean accuracy, batched, in eval mode (the caller's mode restored)."""

from __future__ import annotations

import torch
from torch import nn

from advdefense.modes import device_of, evaluation_mode
from advdefense.validation import (
    check_images,
    check_labels,
    check_model_dtype,
    check_positive_int,
)

__all__ = ["clean_accuracy", "predict"]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (argmax of the scores) for ``images``, computed in batches."""
    check_images(images, "images")
    check_model_dtype(images, model)
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
