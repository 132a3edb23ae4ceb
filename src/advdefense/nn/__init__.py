"""Building blocks and backbones. Importing this package registers every architecture."""

from __future__ import annotations

from advdefense.nn.abs_cnn import AbsCNN, AbsCNNConfig

__all__ = ["AbsCNN", "AbsCNNConfig"]
