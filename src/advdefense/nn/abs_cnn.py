"""The CNN baseline of the ABS paper (Schott et al., ICLR 2019, Sec. 5 "CNN").

Four convolutions with kernels 5/4/3/5, strides 1/2/2/1 and 20/70/256/K channels, BatchNorm and
ELU after the first three, no padding: a 28 x 28 image shrinks to 24, 11, 5 and finally 1 x 1, so
the last convolution is the K-way linear read-out. Parameter names (``conv_0`` ... ``bn_2``)
match the published ABS weights, so those load into this module unchanged.

With ``binarize_input=True`` the module is the ABS paper's "Binary CNN" (biCNN): the input is
thresholded at 0.5 (``x >= 0.5 -> 1``, else 0) before the first convolution, as in the ABS
repository. The threshold is piecewise constant, so input gradients are exactly zero; the model
therefore declares itself non-differentiable (:meth:`AbsCNN.attack_declaration`) with the DIM
paper's sigmoid proxies and BPDA as surrogates (App. A.2), which the evaluation harness attacks
instead, judging every adversarial on the hard-threshold model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advdefense.declaration import AttackDeclaration, MethodView
from advdefense.nn.binarization import Binarization, binarization_surrogates
from advdefense.registry import register_model

__all__ = ["AbsCNN", "AbsCNNConfig", "binarize"]

BINARIZE_THRESHOLD = 0.5


@dataclass(frozen=True)
class AbsCNNConfig:
    """Constructor arguments of :class:`AbsCNN`."""

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, int, int] = (20, 70, 256)
    binarize_input: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))


@register_model("cnn")
class AbsCNN(nn.Module):
    """ABS-paper CNN for 1 x 28 x 28 inputs in [0, 1]; returns N x K logits."""

    config_class = AbsCNNConfig

    def __init__(self, config: AbsCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or AbsCNNConfig()
        first, second, third = self.config.widths
        self.conv_0 = nn.Conv2d(self.config.in_channels, first, kernel_size=5, stride=1)
        self.bn_0 = nn.BatchNorm2d(first)
        self.conv_1 = nn.Conv2d(first, second, kernel_size=4, stride=2)
        self.bn_1 = nn.BatchNorm2d(second)
        self.conv_2 = nn.Conv2d(second, third, kernel_size=3, stride=2)
        self.bn_2 = nn.BatchNorm2d(third)
        self.conv_3 = nn.Conv2d(third, self.config.num_classes, kernel_size=5, stride=1)
        self.activation = nn.ELU()

    def forward(
        self, images: torch.Tensor, *, binarization: Binarization | None = None
    ) -> torch.Tensor:
        """N x K logits; ``binarization`` replaces the hard threshold (biCNN only)."""
        if self.config.binarize_input:
            images = (binarization or Binarization(BINARIZE_THRESHOLD))(images)
        hidden = self.activation(self.bn_0(self.conv_0(images)))
        hidden = self.activation(self.bn_1(self.conv_1(hidden)))
        hidden = self.activation(self.bn_2(self.conv_2(hidden)))
        logits: torch.Tensor = self.conv_3(hidden)
        return logits.flatten(1)

    def attack_declaration(self) -> AttackDeclaration:
        """biCNN: not differentiable; attacked through its binarization surrogates."""
        if not self.config.binarize_input:
            return AttackDeclaration()
        surrogates = binarization_surrogates(BINARIZE_THRESHOLD)
        return AttackDeclaration(
            differentiable=False,
            surrogates={b.name: MethodView(self, "forward", binarization=b) for b in surrogates},
            binarization_threshold=BINARIZE_THRESHOLD,
        )


def binarize(images: torch.Tensor, threshold: float = BINARIZE_THRESHOLD) -> torch.Tensor:
    """``images >= threshold`` as 0/1 floats, attached to the graph with zero gradient."""
    return Binarization(threshold)(images)
