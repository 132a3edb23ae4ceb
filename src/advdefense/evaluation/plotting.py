"""Matplotlib on a headless backend: create a figure, save it atomically, free it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["new_figure", "save_figure"]


def new_figure(columns: int = 1, *, width: float = 4.5, height: float = 4.0) -> tuple[Any, Any]:
    """A figure with one row of ``columns`` axes (a 1 x columns array), on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)


def save_figure(figure: Any, path: str | os.PathLike[str], *, bottom: float = 0.0) -> Path:
    """Lay out (keeping the lowest ``bottom`` fraction free, e.g. for a figure legend), save as
    PNG (creating parent folders) and close ``figure``; return the path."""
    import matplotlib.pyplot as plt

    figure.tight_layout(rect=(0.0, bottom, 1.0, 1.0))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
