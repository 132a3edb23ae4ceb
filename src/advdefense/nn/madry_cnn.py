"""The MNIST network of Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks" (ICLR 2018), as in their ``mnist_challenge`` TensorFlow model.

conv 5x5 (32) + ReLU, max-pool 2, conv 5x5 (64) + ReLU, max-pool 2, FC 1024 + ReLU, FC K. The
convolutions use padding 2 ("SAME" in the TF code), so a 28 x 28 image becomes 14 x 14 and then
7 x 7 before the fully connected layers. No BatchNorm and no dropout: train and eval mode agree.
The DIM paper (App. A.1.2) uses this architecture for its "Madry" baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advdefense.errors import InputError
from advdefense.registry import register_model
from advdefense.validation import check_positive_int

__all__ = ["MadryCNN", "MadryCNNConfig"]


@dataclass(frozen=True)
class MadryCNNConfig:
    """Constructor arguments of :class:`MadryCNN`; ``image_size`` must be divisible by 4."""

    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 28
    channels: tuple[int, int] = (32, 64)
    hidden_units: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        for name in ("in_channels", "num_classes", "image_size", "hidden_units"):
            check_positive_int(getattr(self, name), name)
        if len(self.channels) != 2:
            raise InputError(f"channels must hold two widths, got {self.channels!r}")
        for width in self.channels:
            check_positive_int(width, "channels")
        if self.image_size % 4:
            raise InputError(
                f"image_size must be divisible by 4 (two 2x2 max-pools), got {self.image_size}"
            )


@register_model("madry-cnn")
class MadryCNN(nn.Module):
    """Madry et al. (2018) MNIST CNN for C x S x S inputs in [0, 1]; returns N x K logits."""

    config_class = MadryCNNConfig

    def __init__(self, config: MadryCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or MadryCNNConfig()
        first, second = self.config.channels
        pooled = self.config.image_size // 4
        self.conv_0 = nn.Conv2d(self.config.in_channels, first, kernel_size=5, padding=2)
        self.conv_1 = nn.Conv2d(first, second, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc_0 = nn.Linear(second * pooled * pooled, self.config.hidden_units)
        self.fc_1 = nn.Linear(self.config.hidden_units, self.config.num_classes)
        self.activation = nn.ReLU()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.pool(self.activation(self.conv_0(images)))
        hidden = self.pool(self.activation(self.conv_1(hidden)))
        hidden = self.activation(self.fc_0(hidden.flatten(1)))
        logits: torch.Tensor = self.fc_1(hidden)
        return logits
