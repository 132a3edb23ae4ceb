"""Train/eval mode (and attack mode) handling shared by every layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["attack_mode", "device_of", "evaluation_mode"]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block; restore every submodule's mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`evaluation_mode` with every parameter frozen (``requires_grad`` False) for the
    block; both restored afterwards.

    An attack needs gradients with respect to its inputs only. Foolbox takes them with
    eagerpy's ``loss.backward()``, which would also compute (and accumulate) the gradient of
    every weight: about a third of a ResNet-20's gradient step on a CPU, measured by
    ``benchmarks/frozen_parameters.py``. The input gradients are the same either way."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    with evaluation_mode(model):
        try:
            for parameter, _ in flags:
                parameter.requires_grad_(False)
            yield model
        finally:
            for parameter, requires_grad in flags:
                parameter.requires_grad_(requires_grad)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a stateless module."""
    tensor: torch.Tensor | None = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
