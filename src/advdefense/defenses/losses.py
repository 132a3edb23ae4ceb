"""Training losses of the PDM defense and its baselines (Rozenberg et al., "Improved detection of
adversarial attacks via penetration distortion maximization", Sec. 3 and Algorithm 1).

* :func:`cross_entropy_loss`: the standard objective (CE).
* :func:`reverse_cross_entropy_loss`: RCE of Pang et al. 2018 ("Towards robust detection of
  adversarial examples", Sec. 3; PDM Sec. 3.3): cross-entropy against the "reverse" label
  ``R^y`` (0 on the true class, ``1 / (K - 1)`` on every other class). A model trained on it
  puts its *lowest* logit on the true class and predicts ``argmax(-Z)`` at test time, which
  :class:`advdefense.nn.resnet.ResNet` does with ``output="negated"``.
* :func:`siamese_cosine_loss`: ``|cos(z1, z2) - s|`` (PDM Sec. 3.1, Algorithm 1 line 17), with
  partners from :func:`sample_siamese_partners` (Algorithm 1 lines 5-14).
* :func:`reduce_variance_loss`: RVL, the mean distance of each class's embeddings to their
  centroid, averaged over classes (PDM Eq. 5, Algorithm 1 lines 18-22).

All losses are means over the batch, so they do not grow with the batch size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional

from advdefense.errors import InputError
from advdefense.validation import check_labels, check_probability

__all__ = [
    "SiamesePartners",
    "cross_entropy_loss",
    "reduce_variance_loss",
    "reverse_cross_entropy_loss",
    "reverse_labels",
    "sample_siamese_partners",
    "siamese_cosine_loss",
]


def _check_logits(logits: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"logits must be an N x K tensor with K >= 2 classes, got {shape}")
    checked = check_labels(
        labels, "labels", num_classes=logits.shape[1], batch_size=logits.shape[0]
    )
    return logits, checked


def _check_embeddings(embeddings: object, name: str) -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        shape = (
            tuple(embeddings.shape)
            if isinstance(embeddings, torch.Tensor)
            else type(embeddings).__name__
        )
        raise InputError(f"{name} must be an N x D tensor of embeddings, got {shape}")
    if not embeddings.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}")
    return embeddings


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``-log softmax(Z)_y`` (the "CE" baseline of PDM Table 1)."""
    logits, labels = _check_logits(logits, labels)
    return functional.cross_entropy(logits, labels)


def reverse_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The reverse one-hot labels ``R^y`` (N x K): 0 on ``y``, ``1 / (K - 1)`` elsewhere.

    PDM Sec. 3.3; Pang et al. 2018, Sec. 3.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    labels = check_labels(labels, "labels", num_classes=num_classes)
    other = 1.0 - functional.one_hot(labels, num_classes).to(torch.float32)
    return other / (num_classes - 1)


def reverse_cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean reverse cross-entropy ``-R^y . log softmax(Z)`` (PDM Sec. 3.3, ``L_RCE``).

    ``Z`` are the raw logits; minimizing this drives ``softmax(Z)`` towards ``R^y``, so the
    true class gets the smallest logit and the prediction is ``argmax(-Z)`` (Pang et al. 2018,
    Sec. 3).
    """
    logits, labels = _check_logits(logits, labels)
    targets = reverse_labels(labels, logits.shape[1]).to(logits.dtype)
    return -(targets * functional.log_softmax(logits, dim=1)).sum(dim=1).mean()


def siamese_cosine_loss(
    first: torch.Tensor, second: torch.Tensor, same_class: torch.Tensor
) -> torch.Tensor:
    """Mean ``|cos(z1, z2) - s|`` over the pairs (PDM Sec. 3.1, Algorithm 1 line 17).

    ``s`` (``same_class``) is 1 for pairs from one class and 0 otherwise. A zero embedding has
    cosine 0 with anything (``functional.cosine_similarity`` clamps the norms at 1e-8).
    """
    first = _check_embeddings(first, "first")
    second = _check_embeddings(second, "second")
    if first.shape[0] == 0:
        raise InputError("first and second are empty: the Siamese loss needs at least one pair")
    if first.shape != second.shape:
        raise InputError(
            f"first and second must have the same shape, got {tuple(first.shape)} and "
            f"{tuple(second.shape)}"
        )
    if not isinstance(same_class, torch.Tensor) or same_class.shape != first.shape[:1]:
        shape = (
            tuple(same_class.shape)
            if isinstance(same_class, torch.Tensor)
            else type(same_class).__name__
        )
        raise InputError(
            f"same_class must be a vector of {first.shape[0]} zeros and ones, got {shape}"
        )
    if not bool(((same_class == 0) | (same_class == 1)).all()):
        raise InputError(
            f"same_class must hold only zeros and ones (1: the pair shares its class), got "
            f"values {sorted({float(v) for v in same_class.tolist()})}"
        )
    cosine = functional.cosine_similarity(first, second, dim=1)
    return (cosine - same_class.to(cosine.dtype)).abs().mean()


class SiamesePartners(NamedTuple):
    """Partners drawn by :func:`sample_siamese_partners`."""

    indices: torch.Tensor
    """Index of each anchor's partner in the pool (int64, N)."""
    same_class: torch.Tensor
    """1.0 where the partner shares the anchor's class, else 0.0 (float32, N): the ``s``."""


def sample_siamese_partners(
    labels: torch.Tensor,
    pool_labels: torch.Tensor,
    same_class_probability: float,
    generator: torch.Generator,
) -> SiamesePartners:
    """Draw one Siamese partner per anchor from a pool (PDM Sec. 3.4, Algorithm 1 lines 5-14).

    For each anchor with label ``y``: with probability ``Q = same_class_probability`` the
    partner class is ``y`` (``s = 1``); otherwise it is drawn uniformly from the other classes
    present in the pool (``s = 0``). The partner is a uniform draw among the pool's members of
    that class. Algorithm 1 draws from the training set, so the pool is usually the whole
    training set, and a same-class draw may return the anchor itself (probability
    ``1 / n_y``, as in Algorithm 1, which does not exclude it).

    Edge rules: a class with a single member in the pool pairs with that member; when the pool
    holds only one class, every partner is a same-class partner (``s = 1``), since no other
    class exists to draw from. Every anchor's class must occur in the pool. Draws use the CPU
    ``generator``; the outputs are on the CPU.
    """
    labels = check_labels(labels, "labels")
    pool_labels = check_labels(pool_labels, "pool_labels")
    check_probability(same_class_probability, "same_class_probability")
    labels, pool_labels = labels.cpu(), pool_labels.cpu()
    order = torch.argsort(pool_labels, stable=True)
    present, counts = torch.unique(pool_labels, sorted=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.searchsorted(present, labels)
    found = (position < present.numel()) & (
        present[position.clamp(max=present.numel() - 1)] == labels
    )
    if not bool(found.all()):
        missing = sorted({int(label) for label in labels[~found]})
        raise InputError(
            f"labels hold classes {missing} that pool_labels lacks; every anchor's class must "
            "occur in the partner pool"
        )
    count = labels.numel()
    same = torch.rand(count, generator=generator) < same_class_probability
    if present.numel() == 1:
        same = torch.ones(count, dtype=torch.bool)
    # A uniform other class: skip the anchor's own position among the present classes.
    offset = torch.randint(0, max(present.numel() - 1, 1), (count,), generator=generator)
    other = offset + (offset >= position).long()
    partner_class = torch.where(same, position, other.clamp(max=present.numel() - 1))
    uniform = torch.rand(count, generator=generator, dtype=torch.float64)
    member = (uniform * counts[partner_class]).long().clamp(max=counts[partner_class] - 1)
    indices = order[starts[partner_class] + member]
    return SiamesePartners(indices, same.to(torch.float32))


def reduce_variance_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RVL: ``mean_c sigma_c`` with ``sigma_c = mean_i ||z_i^c - mu_c||_2`` (PDM Eq. 5).

    ``mu_c`` is the centroid of class ``c``'s embeddings in the batch, and the mean runs over
    the classes present in the batch (Eq. 5 writes the normalizer as ``1 / N_c``; the text
    says the per-class terms are "averaged", while Algorithm 1 line 22 sums them, i.e. this
    value times the number of classes present). A class with one member has ``sigma_c = 0``
    and still counts in the average, as in Eq. 5. The gradient at a zero distance is 0.
    """
    embeddings = _check_embeddings(embeddings, "embeddings")
    labels = check_labels(labels, "labels", batch_size=embeddings.shape[0])
    present, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    classes = present.numel()
    sums = embeddings.new_zeros(classes, embeddings.shape[1]).index_add(0, inverse, embeddings)
    centroids = sums / counts.unsqueeze(1).to(embeddings.dtype)
    distances = torch.linalg.vector_norm(embeddings - centroids[inverse], dim=1)
    per_class = embeddings.new_zeros(classes).index_add(0, inverse, distances)
    spreads = per_class / counts.to(embeddings.dtype)
    loss: torch.Tensor = spreads.mean()
    return loss
