"""Cluster-quality scores of embeddings: the Davies-Bouldin index (PDM paper, Sec. 3.5).

Davies & Bouldin (1979), "A cluster separation measure", with the choices the PDM paper and
scikit-learn make: the scatter of cluster ``i`` is the mean Euclidean distance of its points to
its centroid ``c_i``, ``S_i = mean_x ||x - c_i||_2`` (their ``q = 1``), the separation of two
clusters is the Euclidean distance of their centroids, ``M_ij = ||c_i - c_j||_2`` (``p = 2``),
and

    DB = (1 / k) sum_i max_{j != i} (S_i + S_j) / M_ij

over the ``k`` clusters present. Lower is better: tight clusters far apart. Two distinct
clusters with the same centroid make the index infinite (a collapsed embedding).
"""

from __future__ import annotations

import math

import torch

from advdefense.errors import InputError

__all__ = ["davies_bouldin_index"]


def davies_bouldin_index(points: torch.Tensor, labels: torch.Tensor) -> float:
    """The Davies-Bouldin index of N x D ``points`` grouped by ``labels`` (N integers).

    Computed in float64; needs at least two distinct labels. Returns ``inf`` when two clusters
    share a centroid (module docstring).
    """
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[0] == 0:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise InputError(f"points must be a non-empty N x D tensor, got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.shape != points.shape[:1]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputError(f"labels must be a vector of {points.shape[0]} integers, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    data = points.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(data).all()):
        raise InputError("points contain NaN or infinite values")
    classes, inverse = torch.unique(labels.detach().cpu(), return_inverse=True)
    count = classes.numel()
    if count < 2:
        raise InputError(f"the Davies-Bouldin index needs at least 2 clusters, got {count}")
    sizes = torch.bincount(inverse, minlength=count).to(torch.float64)
    centroids = torch.zeros(count, data.shape[1], dtype=torch.float64)
    centroids.index_add_(0, inverse, data)
    centroids /= sizes[:, None]
    spread = (data - centroids[inverse]).norm(dim=1)
    scatter = torch.zeros(count, dtype=torch.float64).index_add_(0, inverse, spread) / sizes
    separation = (centroids[:, None, :] - centroids[None, :, :]).norm(dim=2)
    off_diagonal = ~torch.eye(count, dtype=torch.bool)
    if bool((separation[off_diagonal] == 0).any()):
        return math.inf
    ratios = (scatter[:, None] + scatter[None, :]) / separation.masked_fill(~off_diagonal, 1.0)
    ratios = ratios.masked_fill(~off_diagonal, -math.inf)
    return float(ratios.max(dim=1).values.mean())
