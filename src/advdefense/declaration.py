"""How a defense must be attacked: the declaration the evaluation harness reads (DESIGN.md §1).

A classifier becomes a *defense* by defining ``attack_declaration() -> AttackDeclaration``. The
harness then applies the adaptive machinery itself (Carlini et al. 2019; Tramer et al. 2020):

* ``surrogates``: differentiable stand-ins every gradient-based attack runs on instead of the
  model (BPDA, Athalye et al. 2018); each attack runs once per surrogate and the per-sample best
  adversarial is kept. Every adversarial is judged by the real model.
* ``score_views``: other scores with the same decisions as the model, for attacks whose loss is
  designed for the defense (e.g. DIM's un-normalized internal-model intensities). An attack
  entry that names a view runs on it; a model without that view skips the entry.
* ``binarization_threshold``: the model binarizes its input at this value, so every adversarial
  is refined by Foolbox's ``BinarizationRefinementAttack`` (the DIM paper's fine-tune
  projection, Appendix A.2) before it is judged.

A model without the method is an ordinary differentiable, deterministic classifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

__all__ = ["AttackDeclaration", "MethodView", "declaration_of"]


@dataclass(frozen=True)
class AttackDeclaration:
    """What the harness must know to attack a defense (see the module docstring)."""

    differentiable: bool = True
    randomized: bool = False
    surrogates: Mapping[str, nn.Module] = field(default_factory=lambda: MappingProxyType({}))
    score_views: Mapping[str, nn.Module] = field(default_factory=lambda: MappingProxyType({}))
    binarization_threshold: float | None = None

    @property
    def is_default(self) -> bool:
        """True for a plain differentiable, deterministic classifier."""
        return self == AttackDeclaration()

    def to_json(self) -> dict[str, Any]:
        """The declaration's identity (names, not weights), for run records and their keys."""
        return {
            "differentiable": self.differentiable,
            "randomized": self.randomized,
            "surrogates": sorted(self.surrogates),
            "score_views": sorted(self.score_views),
            "binarization_threshold": self.binarization_threshold,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AttackDeclaration):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(self.to_json()))


def declaration_of(model: nn.Module) -> AttackDeclaration:
    """The model's declaration, or the default one when it declares nothing."""
    declare = getattr(model, "attack_declaration", None)
    if declare is None:
        return AttackDeclaration()
    declaration = declare()
    if not isinstance(declaration, AttackDeclaration):
        raise TypeError(
            f"{type(model).__name__}.attack_declaration() must return an AttackDeclaration, "
            f"got {type(declaration).__name__}"
        )
    return declaration


class MethodView(nn.Module):
    """A module whose forward is ``getattr(model, method)(images, **options)``.

    Surrogates and score views are views of one model (shared weights, nothing copied), e.g.
    ``MethodView(dim, "scores", binarization=Binarization(sigmoid_alpha=10))``.
    """

    def __init__(self, model: nn.Module, method: str, **options: Any) -> None:
        super().__init__()
        if not callable(getattr(model, method, None)):
            raise TypeError(f"{type(model).__name__} has no method {method!r}")
        self.model = model
        self.method = method
        self.options = dict(options)
        self.training = model.training

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = getattr(self.model, self.method)(images, **self.options)
        return scores
