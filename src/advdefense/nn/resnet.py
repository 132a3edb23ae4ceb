"""CIFAR-style ResNets of depth 6n + 2 (He et al. 2016, Sec. 4.2), v1 and pre-activation v2.

A 3 x 3 convolution with ``widths[0]`` channels, three stages of ``n`` basic blocks (two 3 x 3
convolutions each) with ``widths`` 16/32/64 channels, stride 2 at the start of stages 2 and 3,
global average pooling and one linear layer: ``6n + 2`` weighted layers (ResNet-20/32/56 for
n = 3/5/9). Spatial sizes follow the input, so 1 x 28 x 28 (28 -> 14 -> 7) and 3 x 32 x 32
(32 -> 16 -> 8) both work.

* ``version=1``: post-activation blocks (He et al. 2016, "Deep residual learning", Fig. 2).
* ``version=2``: pre-activation blocks (He et al. 2016, "Identity mappings", Fig. 4e) with a
  final BatchNorm + activation before pooling, as in the TensorFlow ResNet used by Pang et al.
  (2018) for reverse cross-entropy.

Shortcuts that change shape are parameter-free (option A of He et al. Sec. 4.2): stride-2
subsampling plus zero channels. Activations are Leaky-ReLU with slope 0.1 (PDM paper,
Appendix B). The pooled ``widths[2]``-dimensional vector is the embedding ("pre-logits",
PDM Sec. 3) on which the Siamese, reduce-variance and KDE terms act: :meth:`ResNet.embed`.

``output="negated"`` makes :meth:`ResNet.forward` return ``-Z(x)``, the negated logits: a model
trained with reverse cross-entropy puts its *lowest* logit on the true class and predicts with
``argmax(-Z)`` (Pang et al. 2018, Sec. 3: the test phase uses the negated logits), so
the saved classifier's argmax is its prediction. Training reads the raw logits through
:meth:`ResNet.logits_from_embedding`. Inputs are in [0, 1]; the per-channel normalization
``(x - input_mean) / input_std`` happens inside the module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from advdefense.errors import InputError
from advdefense.registry import register_model
from advdefense.validation import check_positive_int

__all__ = ["OUTPUTS", "ResNet", "ResNetConfig", "resnet_config"]

OUTPUTS = ("logits", "negated")


@dataclass(frozen=True)
class ResNetConfig:
    """Constructor arguments of :class:`ResNet` (defaults: ResNet-20 v1 for CIFAR-10)."""

    depth: int = 20
    version: int = 1
    in_channels: int = 3
    num_classes: int = 10
    widths: tuple[int, int, int] = (16, 32, 64)
    leaky_slope: float = 0.1
    output: str = "logits"
    input_mean: tuple[float, ...] = (0.5,)
    input_std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        for name in ("widths", "input_mean", "input_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        depth = self.depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise InputError(
                f"depth must be 6n + 2 for a positive integer n (8, 14, 20, 32, 56, 110, ...), "
                f"got {depth!r}"
            )
        if self.version not in (1, 2):
            raise InputError(
                f"version must be 1 (post-activation) or 2 (pre-activation), got {self.version!r}"
            )
        check_positive_int(self.in_channels, "in_channels")
        check_positive_int(self.num_classes, "num_classes")
        if len(self.widths) != 3:
            raise InputError(f"widths must hold three stage widths, got {self.widths!r}")
        for width in self.widths:
            check_positive_int(width, "widths")
        if list(self.widths) != sorted(self.widths):
            raise InputError(
                f"widths must not decrease from stage to stage (the option-A shortcuts pad "
                f"channels, they cannot drop them), got {self.widths!r}"
            )
        if not 0.0 <= self.leaky_slope < 1.0:
            raise InputError(f"leaky_slope must lie in [0, 1), got {self.leaky_slope}")
        if self.output not in OUTPUTS:
            raise InputError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        for name in ("input_mean", "input_std"):
            values = getattr(self, name)
            if len(values) not in (1, self.in_channels):
                raise InputError(
                    f"{name} must hold 1 or in_channels = {self.in_channels} values, got {values!r}"
                )
        if any(not 0 < value < math.inf for value in self.input_std):
            raise InputError(f"input_std must be positive and finite, got {self.input_std!r}")
        if any(not math.isfinite(value) for value in self.input_mean):
            raise InputError(f"input_mean must be finite, got {self.input_mean!r}")

    @property
    def blocks_per_stage(self) -> int:
        """``n`` in ``depth = 6n + 2``."""
        return (self.depth - 2) // 6

    @property
    def embedding_dim(self) -> int:
        """Width of the pooled embedding (the last stage's width)."""
        return self.widths[2]


def resnet_config(name: str, **overrides: Any) -> ResNetConfig:
    """A :class:`ResNetConfig` from a name such as ``resnet20``, ``resnet56`` or ``resnet32-v2``.

    ``overrides`` set the other fields (``in_channels``, ``num_classes``, ``output``, ...).
    """
    match = re.fullmatch(r"resnet(\d+)(?:-?v([12]))?", name)
    if match is None:
        raise InputError(
            f"unknown ResNet name {name!r}; expected resnetDEPTH or resnetDEPTH-v2 with "
            "DEPTH = 6n + 2, e.g. resnet20, resnet32, resnet56, resnet20-v2"
        )
    version = int(match.group(2) or 1)
    return ResNetConfig(depth=int(match.group(1)), version=version, **overrides)


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class _Shortcut(nn.Module):
    """Parameter-free shortcut (He et al. 2016, option A): subsample, then pad with zeros."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            hidden = hidden[:, :, :: self.stride, :: self.stride]
        if self.extra_channels > 0:
            before = self.extra_channels // 2
            after = self.extra_channels - before
            hidden = functional.pad(hidden, (0, 0, 0, 0, before, after))
        return hidden


class _BasicBlock(nn.Module):
    """Post-activation block (v1): act(x + BN(conv(act(BN(conv(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, slope: float) -> None:
        super().__init__()
        self.conv_0 = _conv3x3(in_channels, out_channels, stride)
        self.bn_0 = nn.BatchNorm2d(out_channels)
        self.conv_1 = _conv3x3(out_channels, out_channels, 1)
        self.bn_1 = nn.BatchNorm2d(out_channels)
        self.shortcut = _Shortcut(in_channels, out_channels, stride)
        self.activation = nn.LeakyReLU(slope)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        residual = self.activation(self.bn_0(self.conv_0(hidden)))
        residual = self.bn_1(self.conv_1(residual))
        output: torch.Tensor = self.activation(residual + self.shortcut(hidden))
        return output


class _PreActivationBlock(nn.Module):
    """Pre-activation block (v2): x + conv(act(BN(conv(act(BN(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, slope: float) -> None:
        super().__init__()
        self.bn_0 = nn.BatchNorm2d(in_channels)
        self.conv_0 = _conv3x3(in_channels, out_channels, stride)
        self.bn_1 = nn.BatchNorm2d(out_channels)
        self.conv_1 = _conv3x3(out_channels, out_channels, 1)
        self.shortcut = _Shortcut(in_channels, out_channels, stride)
        self.activation = nn.LeakyReLU(slope)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        residual = self.conv_0(self.activation(self.bn_0(hidden)))
        residual = self.conv_1(self.activation(self.bn_1(residual)))
        output: torch.Tensor = residual + self.shortcut(hidden)
        return output


@register_model("resnet")
class ResNet(nn.Module):
    """ResNet v1/v2 of depth 6n + 2 for C x H x W inputs in [0, 1]; returns N x K scores.

    :meth:`embed` gives the N x ``widths[2]`` pooled embedding, :meth:`logits_from_embedding`
    the raw logits ``Z`` and :meth:`scores_from_embedding` what :meth:`forward` returns (``Z``
    or ``-Z``, per ``config.output``).
    """

    config_class = ResNetConfig
    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, config: ResNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or ResNetConfig()
        widths = self.config.widths
        slope = self.config.leaky_slope
        shape = (1, -1, 1, 1)
        self.register_buffer(
            "input_mean", torch.tensor(self.config.input_mean).view(shape), persistent=False
        )
        self.register_buffer(
            "input_std", torch.tensor(self.config.input_std).view(shape), persistent=False
        )
        self.stem = _conv3x3(self.config.in_channels, widths[0], 1)
        block = _BasicBlock if self.config.version == 1 else _PreActivationBlock
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(self.config.blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(block(in_channels, width, stride, slope))
                in_channels = width
        self.blocks = nn.Sequential(*layers)
        # v1 normalizes the stem's output; v2 normalizes the last block's output instead.
        self.stem_bn = nn.BatchNorm2d(widths[0]) if self.config.version == 1 else None
        self.final_bn = nn.BatchNorm2d(widths[2]) if self.config.version == 2 else None
        self.activation = nn.LeakyReLU(slope)
        self.linear = nn.Linear(widths[2], self.config.num_classes)
        self._initialize(slope)

    def _initialize(self, slope: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, a=slope, mode="fan_out", nonlinearity="leaky_relu"
                )
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The N x ``widths[2]`` globally average-pooled embedding ("pre-logits")."""
        hidden = self.stem((images - self.input_mean) / self.input_std)
        if self.stem_bn is not None:
            hidden = self.activation(self.stem_bn(hidden))
        hidden = self.blocks(hidden)
        if self.final_bn is not None:
            hidden = self.activation(self.final_bn(hidden))
        embedding: torch.Tensor = hidden.mean(dim=(2, 3))
        return embedding

    def logits_from_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """The raw logits ``Z`` (N x K), the quantity the training losses act on."""
        logits: torch.Tensor = self.linear(embedding)
        return logits

    def scores_from_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """Class scores whose argmax is the prediction: ``Z``, or ``-Z`` for RCE models."""
        logits = self.logits_from_embedding(embedding)
        return -logits if self.config.output == "negated" else logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores_from_embedding(self.embed(images))
