"""Input binarization and its differentiable stand-ins (DIM paper, Sec. 3.2 and Appendix A.2).

A hard threshold ``x >= t -> 1`` has zero gradient almost everywhere, so gradient attacks on a
binarizing model learn nothing. Two stand-ins make it attackable:

* the **sigmoid proxy** ``1 / (1 + exp(-alpha (x - t)))`` of Appendix A.2, which the DIM paper
  attacks for alpha in {10, 15, 20, 50, 100} (the paper writes ``exp(-alpha x)``; centring it on
  the threshold is what makes it a proxy of binarization at 0.5);
* **BPDA** with the identity (Athalye et al., ICML 2018, Sec. 4.1): the exact threshold in the
  forward pass, the identity's gradient in the backward pass (a straight-through estimator).

Adversarials found through a stand-in are always judged by the hard-threshold model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from advdefense.errors import InputError

__all__ = ["PAPER_SIGMOID_ALPHAS", "Binarization", "binarization_surrogates"]

PAPER_SIGMOID_ALPHAS: tuple[float, ...] = (10.0, 15.0, 20.0, 50.0, 100.0)


@dataclass(frozen=True)
class Binarization:
    """How ``x >= threshold`` is computed: exactly, by a sigmoid proxy, or straight through.

    Exactly one of ``sigmoid_alpha`` and ``straight_through`` may be set; neither means the hard
    threshold, whose output stays attached to the graph with a zero gradient (a gradient query
    returns zeros, the true gradient, instead of failing with "does not require grad").
    """

    threshold: float = 0.5
    sigmoid_alpha: float | None = None
    straight_through: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must lie in (0, 1), got {self.threshold}")
        if self.sigmoid_alpha is not None and not 0 < self.sigmoid_alpha < math.inf:
            raise InputError(
                f"sigmoid_alpha must be positive and finite, got {self.sigmoid_alpha} "
                "(for the hard threshold leave it None)"
            )
        if self.sigmoid_alpha is not None and self.straight_through:
            raise InputError("choose either sigmoid_alpha or straight_through, not both")

    @property
    def name(self) -> str:
        """``hard``, ``sigmoid-<alpha>`` or ``bpda-identity``."""
        if self.sigmoid_alpha is not None:
            return f"sigmoid-{self.sigmoid_alpha:g}"
        return "bpda-identity" if self.straight_through else "hard"

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if self.sigmoid_alpha is not None:
            return torch.sigmoid(self.sigmoid_alpha * (values - self.threshold))
        hard = (values >= self.threshold).to(values.dtype)
        if self.straight_through:
            return values + (hard - values).detach()
        return hard + values * 0.0


def binarization_surrogates(threshold: float = 0.5) -> tuple[Binarization, ...]:
    """The stand-ins a binarizing model is attacked through: the paper's five sigmoid proxies
    (Appendix A.2), then BPDA with the identity."""
    proxies = tuple(Binarization(threshold, sigmoid_alpha=alpha) for alpha in PAPER_SIGMOID_ALPHAS)
    return (*proxies, Binarization(threshold, straight_through=True))
