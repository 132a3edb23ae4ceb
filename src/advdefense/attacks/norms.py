"""Perturbation norms and per-dataset thresholds (DIM paper Sec. 4; RobustBench for CIFAR)."""

from __future__ import annotations

from typing import Literal

import torch

from advdefense.errors import InputError

__all__ = ["NORMS", "NORM_ALIASES", "Norm", "default_threshold", "perturbation_norm"]

Norm = Literal["l0", "l1", "l2", "linf"]
NORMS: tuple[Norm, ...] = ("l0", "l1", "l2", "linf")
NORM_ALIASES: dict[str, Norm] = {
    **{norm: norm for norm in NORMS},
    "L0": "l0",
    "L1": "l1",
    "L2": "l2",
    "Linf": "linf",
}

_MNIST_LIKE = ("mnist", "mnist-sample", "fashion-mnist")
_CIFAR_LIKE = ("cifar10", "cifar100", "svhn")
_THRESHOLDS: dict[str, dict[Norm, float]] = {
    "mnist-like": {"l0": 12.0, "l1": 8.0, "l2": 1.5, "linf": 0.3},
    "cifar-like": {"l2": 0.5, "linf": 8 / 255},
}


def perturbation_norm(perturbation: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-sample norm of an N x ... perturbation; L0 counts changed pixels over all channels."""
    flat = perturbation.flatten(1)
    if norm == "l0":
        return (flat.abs() > 1e-8).sum(1).to(flat.dtype)
    if norm == "l1":
        return flat.abs().sum(1)
    if norm == "l2":
        l2: torch.Tensor = torch.linalg.vector_norm(flat, ord=2, dim=1)
        return l2
    if norm == "linf":
        return flat.abs().amax(1)
    raise InputError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def default_threshold(dataset: str, norm: Norm) -> float:
    """The threshold at which robust accuracy is reported for ``dataset`` and ``norm``."""
    family = (
        "mnist-like" if dataset in _MNIST_LIKE else "cifar-like" if dataset in _CIFAR_LIKE else None
    )
    if family is None or norm not in _THRESHOLDS[family]:
        raise InputError(
            f"no default {norm} threshold for dataset {dataset!r}; pass one, e.g. "
            f"--threshold {norm}=VALUE"
        )
    return _THRESHOLDS[family][norm]
