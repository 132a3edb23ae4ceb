"""Shapes and behaviour of the building blocks."""

from __future__ import annotations

import torch

from advdefense.nn import AbsCNN, AbsCNNConfig


def test_abs_cnn_shapes_and_parameter_count() -> None:
    model = AbsCNN().eval()
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    # conv 1->20 k5, 20->70 k4, 70->256 k3, 256->10 k5, plus three BatchNorms.
    expected = (20 * 25 + 20) + (70 * 20 * 16 + 70) + (256 * 70 * 9 + 256) + (10 * 256 * 25 + 10)
    expected += 2 * (20 + 70 + 256)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_abs_cnn_gradients_are_finite_and_non_zero() -> None:
    model = AbsCNN(AbsCNNConfig(num_classes=4)).eval()
    images = torch.rand(3, 1, 28, 28, requires_grad=True)
    model(images)[:, 0].sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
