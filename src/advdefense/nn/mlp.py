"""Fully connected building blocks: a multilayer perceptron and an MLP autoencoder.

Used by the DIM family (Liu et al. 2022, "Denoised Internal Models", Appendix A.1.1), whose denoiser
and internal models are both stacks of linear layers with ReLU between them and a chosen
activation (linear or Tanh) after the last one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["MLP", "Activation", "MLPAutoencoder"]

Activation = Literal["linear", "relu", "tanh", "sigmoid"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        known = ", ".join(sorted(_ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; choose one of {known}") from None


class MLP(nn.Module):
    """Linear layers of the given widths (``widths[0]`` inputs, ``widths[-1]`` outputs).

    ReLU follows every layer but the last, which is followed by ``last_activation``. The layers
    live in ``self.layers`` (an ``nn.Sequential``: Linear, ReLU, Linear, ..., Linear[, last]).
    """

    def __init__(self, widths: Sequence[int], last_activation: Activation = "linear") -> None:
        super().__init__()
        widths = tuple(widths)
        if len(widths) < 2 or any(isinstance(w, bool) or w <= 0 for w in widths):
            raise ValueError(f"an MLP needs at least two positive widths, got {widths}")
        self.widths = widths
        self.last_activation = last_activation
        modules: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            modules.append(nn.Linear(fan_in, fan_out))
            last = index == len(widths) - 2
            if not last:
                modules.append(nn.ReLU())
            elif last_activation != "linear":
                modules.append(_activation(last_activation))
        self.layers = nn.Sequential(*modules)

    def linear_layers(self) -> list[nn.Linear]:
        """The linear layers, in order."""
        return [module for module in self.layers if isinstance(module, nn.Linear)]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs: torch.Tensor = self.layers(inputs)
        return outputs


class MLPAutoencoder(nn.Module):
    """An MLP encoder followed by an MLP decoder; the code width must match.

    The encoder's last layer is linear (a free latent code) unless ``code_activation`` says
    otherwise; the decoder ends with ``output_activation``.
    """

    def __init__(
        self,
        encoder_widths: Sequence[int],
        decoder_widths: Sequence[int],
        *,
        code_activation: Activation = "linear",
        output_activation: Activation = "tanh",
    ) -> None:
        super().__init__()
        if tuple(encoder_widths)[-1:] != tuple(decoder_widths)[:1]:
            raise ValueError(
                f"the encoder's last width must equal the decoder's first, got "
                f"{tuple(encoder_widths)} and {tuple(decoder_widths)}"
            )
        self.encoder = MLP(encoder_widths, code_activation)
        self.decoder = MLP(decoder_widths, output_activation)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        decoded: torch.Tensor = self.decoder(self.encoder(inputs))
        return decoded
