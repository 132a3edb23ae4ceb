"""Named attacks: an id, a norm and a factory for a Foolbox 3 attack with its parameters.

The full suites of the papers (``dim42``, ``minimal``) build on these entries; the ``demo`` list
is what ``advdefense demo`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from foolbox.attacks.deepfool import L2DeepFoolAttack
from foolbox.attacks.fast_gradient_method import LinfFastGradientAttack
from foolbox.attacks.projected_gradient_descent import (
    L2ProjectedGradientDescentAttack,
    LinfProjectedGradientDescentAttack,
)

from advdefense.attacks.norms import Norm
from advdefense.errors import InputError

__all__ = ["ATTACKS", "DEMO_ATTACKS", "AttackEntry", "get_attack"]


@dataclass(frozen=True)
class AttackEntry:
    """One attack configuration; ``build()`` returns a fresh Foolbox attack object."""

    id: str
    norm: Norm
    factory: Callable[..., Any]
    parameters: Mapping[str, Any]
    description: str

    def build(self) -> Any:
        return self.factory(**self.parameters)


def _entry(
    id: str, norm: Norm, factory: Callable[..., Any], description: str, **parameters: Any
) -> AttackEntry:
    return AttackEntry(id, norm, factory, MappingProxyType(parameters), description)


ATTACKS: Mapping[str, AttackEntry] = MappingProxyType(
    {
        entry.id: entry
        for entry in (
            _entry(
                "fgsm",
                "linf",
                LinfFastGradientAttack,
                "Fast gradient sign method (Goodfellow 2015)",
            ),
            _entry(
                "linf-pgd",
                "linf",
                LinfProjectedGradientDescentAttack,
                "L-inf PGD with random start, 40 steps (Madry 2018; Foolbox defaults)",
            ),
            _entry(
                "l2-pgd",
                "l2",
                L2ProjectedGradientDescentAttack,
                "L2 PGD with random start, 50 steps (Foolbox defaults)",
            ),
            _entry(
                "l2-deepfool",
                "l2",
                L2DeepFoolAttack,
                "L2 DeepFool, 50 steps, overshoot 0.02 (Moosavi-Dezfooli 2016; Foolbox defaults)",
            ),
        )
    }
)

DEMO_ATTACKS: tuple[str, ...] = ("fgsm", "linf-pgd", "l2-pgd", "l2-deepfool")


def get_attack(attack_id: str) -> AttackEntry:
    """The catalogue entry ``attack_id``, or an error listing the known ids."""
    try:
        return ATTACKS[attack_id]
    except KeyError:
        raise InputError(
            f"unknown attack {attack_id!r}; known attacks: {', '.join(sorted(ATTACKS))}"
        ) from None
