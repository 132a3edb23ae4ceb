"""Training steps replayed as CUDA graphs: the same arithmetic without the launch overhead.

A small model trained on small batches is bound by kernel launches, not by the GPU's arithmetic:
Madry et al.'s adversarial training makes 41 forward-backward passes of a 50-image batch per
update, a few microseconds of work each, behind tens of Python-issued launches each.
:class:`CapturedStep` records one whole training step (batch transform, forward, backward and
the optimizer's update) as a CUDA graph once and replays it for every later batch of the same
shape: PyTorch's "whole network capture" (``torch.cuda.graphs``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["CapturedStep", "TrainingStep"]

TrainingStep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(images, labels) -> (loss, logits)``: one update of the model, the optimizer included."""


class CapturedStep:
    """``step`` replayed as a CUDA graph for batches shaped like the first one.

    The first ``warmup`` calls run ``step`` eagerly on a side stream (the kernels' lazy set-up
    must be done before a capture); they are real updates on real batches, so nothing is spent
    twice. The next call records the graph and replays it; batches of another shape (a short
    last batch) run eagerly. ``step`` must not wait on the GPU (no ``.item()``, no branch on a
    tensor's value), must set the gradients to ``None`` before its backward pass, and must draw
    random numbers from the default CUDA generator, which a replay advances like an eager call.
    ``optimizer`` must be built with ``capturable=True`` where it has that option (Adam does).
    The loss and logits returned are the graph's own outputs, overwritten by the next call:
    read them before making it.
    """

    def __init__(
        self, step: TrainingStep, optimizer: torch.optim.Optimizer, *, warmup: int = 3
    ) -> None:
        self._step = step
        self._optimizer = optimizer
        self._warmup = warmup
        self._shape: torch.Size | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._shape is None:
            self._shape = images.shape
        if images.shape != self._shape:
            return self._step(images, labels)
        if self._graph is not None:
            return self._replay(images, labels)
        if self._warmup > 0:
            self._warmup -= 1
            return self._on_side_stream(images, labels)
        self._capture(images, labels)
        return self._replay(images, labels)

    def _on_side_stream(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stream = torch.cuda.Stream(device=images.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(stream):
            outputs = self._step(images, labels)
        torch.cuda.current_stream(images.device).wait_stream(stream)
        return outputs

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._inputs = (torch.empty_like(images), torch.empty_like(labels))
        self._optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records only: nothing runs until a replay
            self._outputs = self._step(*self._inputs)
        self._graph = graph

    def _replay(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._graph is not None and self._inputs is not None and self._outputs is not None
        self._inputs[0].copy_(images)
        self._inputs[1].copy_(labels)
        self._graph.replay()
        return self._outputs
