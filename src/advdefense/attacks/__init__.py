"""Attack catalogue, norms and thresholds."""

from __future__ import annotations

from advdefense.attacks.catalog import ATTACKS, DEMO_ATTACKS, AttackEntry, get_attack
from advdefense.attacks.norms import NORMS, Norm, default_threshold, perturbation_norm

__all__ = [
    "ATTACKS",
    "DEMO_ATTACKS",
    "NORMS",
    "AttackEntry",
    "Norm",
    "default_threshold",
    "get_attack",
    "perturbation_norm",
]
