"""Exact t-SNE (van der Maaten & Hinton, JMLR 2008) for figures of a few thousand points.

Sec. 2-3 of the paper: Gaussian conditionals ``p_{j|i}`` whose bandwidths are binary-searched
to a target perplexity, symmetrized ``p_ij = (p_{j|i} + p_{i|j}) / 2n``; Student-t similarities
``q_ij`` in 2-D; gradient descent on KL(P || Q) with momentum 0.5 then 0.8, early exaggeration
of P (x12, the first 250 iterations, as in the authors' reference settings) and per-parameter
gains (Jacobs 1988). O(n^2) memory and time: meant for the ~1,000 points of a figure.
"""

from __future__ import annotations

import math

import torch

from advdefense.errors import InputError

__all__ = ["affinities", "tsne"]

_TINY = 1e-12


def affinities(points: torch.Tensor, perplexity: float, *, tolerance: float = 1e-5) -> torch.Tensor:
    """Symmetric joint probabilities ``P`` (n x n, zero diagonal, summing to 1)."""
    count = points.shape[0]
    squared = torch.cdist(points, points).square()
    target = math.log(perplexity)
    low = torch.zeros(count, dtype=points.dtype)
    high = torch.full((count,), math.inf, dtype=points.dtype)
    beta = torch.ones(count, dtype=points.dtype)  # precision 1 / (2 sigma^2) per point
    eye = torch.eye(count, dtype=torch.bool)
    for _ in range(200):
        logits = (-squared * beta[:, None]).masked_fill(eye, -math.inf)
        conditional = torch.softmax(logits, dim=1)
        entropy = -(conditional * torch.log(conditional + _TINY)).sum(1)
        if bool(((entropy - target).abs() < tolerance).all()):
            break
        too_flat = entropy > target  # bandwidth too wide: raise the precision
        low = torch.where(too_flat, beta, low)
        high = torch.where(too_flat, high, beta)
        beta = torch.where(torch.isinf(high), beta * 2, (low + high) / 2)
    joint = (conditional + conditional.T) / (2 * count)
    return joint.clamp_min(_TINY).masked_fill(eye, 0.0)


def tsne(
    points: torch.Tensor,
    *,
    perplexity: float = 30.0,
    iterations: int = 1000,
    learning_rate: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Embed N x D ``points`` in 2-D; deterministic for a given ``seed``.

    ``learning_rate`` defaults to ``max(N / 12, 50)`` (Belkina et al. 2019's rule for the
    exaggeration phase).
    """
    if points.dim() != 2 or points.shape[0] < 5:
        raise InputError(f"tsne needs an N x D tensor with N >= 5, got {tuple(points.shape)}")
    if not 1 < perplexity < points.shape[0]:
        raise InputError(f"perplexity must lie in (1, N = {points.shape[0]}), got {perplexity}")
    data = points.detach().to(torch.float64)
    data = (data - data.mean(0)) / data.std().clamp_min(_TINY)
    joint = affinities(data, perplexity)
    count = data.shape[0]
    rate = learning_rate or max(count / 12, 50.0)
    generator = torch.Generator().manual_seed(seed)
    layout = 1e-4 * torch.randn(count, 2, generator=generator, dtype=torch.float64)
    velocity = torch.zeros_like(layout)
    gains = torch.ones_like(layout)
    exaggeration_steps = min(250, iterations // 4)
    for step in range(iterations):
        scale = 12.0 if step < exaggeration_steps else 1.0
        momentum = 0.5 if step < exaggeration_steps else 0.8
        kernel = 1.0 / (1.0 + torch.cdist(layout, layout).square())
        kernel.fill_diagonal_(0.0)
        similarity = (kernel / kernel.sum()).clamp_min(_TINY)
        weights = (scale * joint - similarity) * kernel
        gradient = 4.0 * (weights.sum(1, keepdim=True) * layout - weights @ layout)
        same_sign = (gradient > 0) == (velocity > 0)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min(0.01)
        velocity = momentum * velocity - rate * gains * gradient
        layout = layout + velocity
        layout = layout - layout.mean(0)
    return layout.to(points.dtype)
