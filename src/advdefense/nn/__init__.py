"""Building blocks and backbones. Importing this package registers every architecture."""

from __future__ import annotations

from advdefense.nn.abs_cnn import AbsCNN, AbsCNNConfig, binarize
from advdefense.nn.madry_cnn import MadryCNN, MadryCNNConfig
from advdefense.nn.mlp import MLP, MLPAutoencoder
from advdefense.nn.resnet import ResNet, ResNetConfig, resnet_config

__all__ = [
    "MLP",
    "AbsCNN",
    "AbsCNNConfig",
    "MLPAutoencoder",
    "MadryCNN",
    "MadryCNNConfig",
    "ResNet",
    "ResNetConfig",
    "binarize",
    "resnet_config",
]
