"""Attack catalogue, suites, norms and thresholds, and running one attack entry."""

from __future__ import annotations

from advdefense.attacks.catalog import ATTACKS, DEMO_ATTACKS, AttackEntry, get_attack
from advdefense.attacks.norms import NORMS, Norm, default_threshold, perturbation_norm
from advdefense.attacks.starting_points import (
    AttackResult,
    best_starting_points,
    run_attack,
    run_with_starting_points,
)
from advdefense.attacks.suites import DIM42_TABLE_ORDER, SUITES, AttackSuite, get_suite

__all__ = [
    "ATTACKS",
    "DEMO_ATTACKS",
    "DIM42_TABLE_ORDER",
    "NORMS",
    "SUITES",
    "AttackEntry",
    "AttackResult",
    "AttackSuite",
    "Norm",
    "best_starting_points",
    "default_threshold",
    "get_attack",
    "get_suite",
    "perturbation_norm",
    "run_attack",
    "run_with_starting_points",
]
