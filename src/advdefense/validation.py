"""Input validation shared by every public entry point.

Each check raises :class:`~advdefense.errors.InputError` (a ``ValueError``) that names the
argument, what was expected and what came, so mistakes surface at the boundary instead of as a
stack trace deep inside a model or an attack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from advdefense.errors import InputError
from advdefense.modes import evaluation_mode

__all__ = [
    "check_choices",
    "check_images",
    "check_labels",
    "check_model_dtype",
    "check_positive_int",
    "check_probability",
]


def check_images(
    images: object,
    name: str = "images",
    *,
    channels: int | None = None,
    height: int | None = None,
    width: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Check a batch of images: a non-empty float N x C x H x W tensor, finite, within bounds."""
    if not isinstance(images, torch.Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor of shape N x C x H x W, got {type(images).__name__}"
        )
    if images.dim() != 4:
        raise InputError(
            f"{name} must have 4 dimensions (N x C x H x W), got {images.dim()} with shape "
            f"{tuple(images.shape)}; add a batch dimension with images.unsqueeze(0) for one image"
        )
    if not images.is_floating_point():
        raise InputError(
            f"{name} must be a floating-point tensor with values in [{bounds[0]}, {bounds[1]}], "
            f"got dtype {images.dtype}; convert uint8 pixels with images.float() / 255"
        )
    if images.shape[0] == 0:
        raise InputError(f"{name} is an empty batch (shape {tuple(images.shape)})")
    expected = {"channels": (1, channels), "height": (2, height), "width": (3, width)}
    for label, (axis, want) in expected.items():
        if want is not None and images.shape[axis] != want:
            raise InputError(
                f"{name} must have {want} {label} (dimension {axis}), got shape "
                f"{tuple(images.shape)}"
            )
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise InputError(f"{name} contains {bad} NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < bounds[0] or high > bounds[1]:
        raise InputError(
            f"{name} must lie in [{bounds[0]}, {bounds[1]}], got values in "
            f"[{low:.4g}, {high:.4g}]; "
            "models take unnormalized pixels (normalization lives inside the model)"
        )
    return images


def check_model_dtype(
    images: torch.Tensor,
    model: nn.Module,
    name: str = "images",
    *,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> None:
    """Check that ``model`` takes ``images`` of their dtype.

    Images of another floating dtype than the model's parameters fail deep inside the first
    layer ("mat1 and mat2 must have the same dtype"), unless the model converts them itself.
    So on a mismatch, ``forward`` (default: the model) runs on the first image, in eval mode
    without gradients, and a failure becomes an :class:`InputError` naming the fix.
    """
    weights = (tensor for tensor in model.parameters() if tensor.is_floating_point())
    reference = next(weights, None)
    if reference is None or images.dtype == reference.dtype:
        return
    try:
        with torch.no_grad(), evaluation_mode(model):
            (forward or model)(images[:1].to(reference.device))
    except RuntimeError as error:
        raise InputError(
            f"{name} have dtype {images.dtype} but the model's weights are {reference.dtype}, "
            f"and the model fails on them ({error}); convert the images with "
            f"{name}.to({reference.dtype}), or the model with model.to({images.dtype})"
        ) from error


def check_labels(
    labels: object,
    name: str = "labels",
    *,
    num_classes: int | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Check a batch of integer class labels: int64 vector, in [0, num_classes), matching N."""
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of int64, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise InputError(
            f"{name} must have dtype torch.int64, got {labels.dtype}; use labels.long()"
        )
    if labels.dim() != 1:
        raise InputError(
            f"{name} must be a vector (one label per image), got shape {tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        raise InputError(f"{name} is empty")
    if batch_size is not None and labels.shape[0] != batch_size:
        raise InputError(f"{name} has {labels.shape[0]} entries but there are {batch_size} images")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        upper = "" if num_classes is None else f", {num_classes - 1}"
        raise InputError(f"{name} must lie in [0{upper}], got values in [{low}, {high}]")
    return labels


def check_probability(value: float, name: str) -> float:
    """Check a number in [0, 1] (a rate, a fraction)."""
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_positive_int(value: int, name: str) -> int:
    """Check a strictly positive integer (a count, a batch size, a number of epochs)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_choices(given: Iterable[str], known: Iterable[str], kind: str) -> None:
    """Check that every one of ``given`` is among ``known`` (a recipe's models or stages)."""
    known = tuple(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InputError(f"unknown {kind}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
