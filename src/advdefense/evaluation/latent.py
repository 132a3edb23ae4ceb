"""Figures of latent spaces: t-SNE of each internal model's codes (DIM paper, Fig. 3)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from advdefense.errors import InputError
from advdefense.evaluation.plotting import new_figure, save_figure
from advdefense.evaluation.tsne import tsne

__all__ = ["plot_latent_tsne"]


def plot_latent_tsne(
    codes: torch.Tensor,
    labels: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    titles: list[str] | None = None,
    perplexity: float = 30.0,
    seed: int = 0,
) -> Path:
    """One t-SNE panel per latent space of N x M x C ``codes``, points coloured by label.

    For DIM, ``codes`` is ``model.latent_codes(images)`` and panel ``i`` is internal model
    ``F_i``: the paper expects class ``i`` to form one tight cluster there (Sec. 4, Fig. 3).
    """
    if codes.dim() != 3 or labels.shape != codes.shape[:1]:
        raise InputError(
            f"codes must be N x M x C with N labels, got {tuple(codes.shape)} and "
            f"{tuple(labels.shape)} labels"
        )
    spaces = codes.shape[1]
    titles = titles or [f"internal model {index}" for index in range(spaces)]
    columns = min(spaces, 5)
    rows = math.ceil(spaces / columns)
    figure, _ = new_figure(columns, width=3.2, height=3.2 * rows)
    figure.clear()
    axes = figure.subplots(rows, columns, squeeze=False)
    colours = [f"C{label}" for label in labels.tolist()]
    for space in range(spaces):
        axis = axes[space // columns][space % columns]
        layout = tsne(codes[:, space].detach().cpu(), perplexity=perplexity, seed=seed)
        axis.scatter(layout[:, 0], layout[:, 1], c=colours, s=3, linewidths=0)
        axis.set_title(titles[space], fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    for space in range(spaces, rows * columns):
        axes[space // columns][space % columns].axis("off")
    classes = sorted(set(labels.tolist()))
    handles = [
        axes[0][0].scatter([], [], c=f"C{label}", s=12, label=str(label)) for label in classes
    ]
    figure.legend(handles=handles, loc="lower center", ncol=len(classes), title="class", fontsize=8)
    return save_figure(figure, path, bottom=0.14 / rows)
