"""Counting the batched forward and backward passes an attack makes (reported per record)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["CallCounter"]


class CallCounter(nn.Module):
    """Wraps a classifier and counts batched forward and backward passes through it.

    ``on_forward``, when given, is called after each forward pass (e.g. to show an attack's
    progress live).
    """

    def __init__(self, model: nn.Module, on_forward: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.model = model
        self.on_forward = on_forward
        self.forward_calls = 0
        self.backward_calls = 0
        self.training = model.training  # mirrors the model; never changes it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.forward_calls += 1
        scores: torch.Tensor = self.model(images)
        if scores.requires_grad:
            scores.register_hook(self._count_backward)  # type: ignore[no-untyped-call]
        if self.on_forward is not None:
            self.on_forward()
        return scores

    def _count_backward(self, gradient: torch.Tensor) -> None:
        self.backward_calls += 1

    def reset(self) -> tuple[int, int]:
        """Return (forward, backward) counts so far and start again from zero."""
        counts = (self.forward_calls, self.backward_calls)
        self.forward_calls = self.backward_calls = 0
        return counts

    def add(self, other: CallCounter) -> None:
        """Add ``other``'s counts to these (e.g. the calls an attack made on a surrogate)."""
        self.add_calls(other.forward_calls, other.backward_calls)

    def add_calls(self, forward_calls: int, backward_calls: int) -> None:
        """Add passes made elsewhere (e.g. by an earlier run that was killed)."""
        self.forward_calls += forward_calls
        self.backward_calls += backward_calls
