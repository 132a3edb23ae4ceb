"""t-SNE and the latent-space figure (DIM paper, Fig. 3)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from advdefense.defenses.dim import DIM, SingleHeadIM
from advdefense.errors import InputError
from advdefense.evaluation.latent import plot_latent_tsne
from advdefense.evaluation.tsne import affinities, tsne


def _clusters(per_cluster: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    centers = 10 * torch.randn(3, 8, generator=generator)
    points = torch.cat([c + torch.randn(per_cluster, 8, generator=generator) for c in centers])
    return points, torch.arange(3).repeat_interleave(per_cluster)


def test_affinities_are_a_symmetric_distribution_at_the_perplexity() -> None:
    points, _ = _clusters()
    joint = affinities(points.double(), 10.0)
    assert torch.allclose(joint, joint.T)
    assert joint.diagonal().eq(0).all()
    assert joint.sum().item() == pytest.approx(1.0, abs=1e-6)
    # every conditional row of a uniform-distance set has perplexity N - 1 whatever the target
    simplex = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(
        affinities(simplex, 3.0)[~torch.eye(6, dtype=torch.bool)],
        torch.tensor(1 / 30, dtype=torch.float64),
    )


def test_tsne_keeps_clusters_apart_and_is_deterministic() -> None:
    points, labels = _clusters()
    layout = tsne(points, perplexity=10, iterations=400)
    assert layout.shape == (90, 2) and torch.isfinite(layout).all()
    distances = torch.cdist(layout, layout).fill_diagonal_(math.inf)
    assert (labels[distances.argmin(1)] == labels).all()
    assert torch.equal(layout, tsne(points, perplexity=10, iterations=400))
    with pytest.raises(InputError, match="perplexity"):
        tsne(points, perplexity=500)
    with pytest.raises(InputError, match="N x D"):
        tsne(points[:3])


def test_latent_codes_and_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images = torch.rand(24, 1, 28, 28)
    labels = torch.arange(24) % 10
    codes = DIM().eval().latent_codes(images)
    assert codes.shape == (24, 10, 10)
    assert SingleHeadIM().eval().latent_codes(images).shape == (24, 1, 10)
    path = plot_latent_tsne(codes[:, :3], labels, tmp_path / "fig3.png", perplexity=5)
    assert path.stat().st_size > 1000
    with pytest.raises(InputError, match="N x M x C"):
        plot_latent_tsne(codes[:, 0], labels, tmp_path / "bad.png")
