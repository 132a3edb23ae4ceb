"""DESIGN.md §3 rule 6: a detector's claim at ε implies a classifier's claim at ε/2.

Tramèr (2022, "Detecting Adversarial Examples Is (Nearly) As Hard As Classifying Them", §3)
turns a detector that is robust within ε into an (inefficient) classifier robust within ε/2 with
the same robust accuracy. A detector claiming more robust accuracy with rejection at ε than the
best known robust classifier reaches at ε/2 therefore claims a breakthrough in robust
classification: far more likely, its attacks were too weak. This module flags such claims.

The best known robust accuracy at ε/2 is rarely published, so a reference at ε_r ≤ ε/2 stands
in for it: robust accuracy falls as ε grows, so no known classifier beats at ε/2 what the best
one reaches at ε_r. Claims are checked only where such a reference exists; at smaller ε (e.g.
a CIFAR-10 L∞ claim at 8/255, whose ε/2 has no leaderboard) nothing is flagged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from advdefense.attacks.norms import Norm

__all__ = [
    "BEST_KNOWN_ROBUST_CLASSIFIERS",
    "ReferenceRobustness",
    "detection_claim_flags",
    "implied_classifier_flag",
]

#: Relative slack on ε when matching a reference (8/255 written as 0.0314 still counts).
_EPSILON_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ReferenceRobustness:
    """The highest robust accuracy a classifier is known to reach on ``dataset`` within
    ``epsilon`` in ``norm`` (AutoAttack, full test set), and where that number comes from."""

    dataset: str
    norm: Norm
    epsilon: float
    robust_accuracy: float  # a fraction in [0, 1]
    model: str
    source: str


#: RobustBench's leaderboards as of its model_info files (highest AutoAttack accuracy listed,
#: which keeps flags conservative). MNIST and Fashion-MNIST have no maintained leaderboard.
BEST_KNOWN_ROBUST_CLASSIFIERS: tuple[ReferenceRobustness, ...] = (
    ReferenceRobustness(
        "cifar10",
        "linf",
        8 / 255,
        0.7528,
        "MeanSparse WideResNet-94-16 (Amini et al. 2024)",
        "RobustBench model_info/cifar10/Linf/Amini2024MeanSparse_S-WRN-94-16.json",
    ),
    ReferenceRobustness(
        "cifar10",
        "l2",
        0.5,
        0.8728,
        "MeanSparse WideResNet-70-16 (Amini et al. 2024)",
        "RobustBench model_info/cifar10/L2/Amini2024MeanSparse_S-WRN-70-16.json",
    ),
)


def _bound(
    dataset: str, norm: Norm, epsilon: float, references: Iterable[ReferenceRobustness]
) -> ReferenceRobustness | None:
    """The lowest reference accuracy at a radius within ε/2 (the tightest valid bound)."""
    usable = [
        reference
        for reference in references
        if reference.dataset == dataset
        and reference.norm == norm
        and reference.epsilon <= epsilon / 2 * (1 + _EPSILON_TOLERANCE)
    ]
    return min(usable, key=lambda reference: reference.robust_accuracy, default=None)


def implied_classifier_flag(
    label: str,
    dataset: str,
    norm: Norm,
    epsilon: float,
    robust_accuracy: float,
    *,
    references: Iterable[ReferenceRobustness] = BEST_KNOWN_ROBUST_CLASSIFIERS,
) -> str | None:
    """A flag when ``robust_accuracy`` with rejection at ``epsilon`` exceeds what the best known
    robust classifier reaches at ε/2 (or below); None when it does not, or nothing is known.

    ``label`` names the claim in the flag, e.g. the attack it was measured under.
    """
    reference = _bound(dataset, norm, epsilon, references)
    if reference is None or robust_accuracy <= reference.robust_accuracy:
        return None
    return (
        f"{label}: robust accuracy with rejection {100 * robust_accuracy:.1f}% at {norm} "
        f"{epsilon:.4g} exceeds the best known robust classifier at {norm} "
        f"{reference.epsilon:.4g} <= ε/2 ({100 * reference.robust_accuracy:.2f}%, "
        f"{reference.model}; {reference.source}). By Tramèr 2022 the detector would imply a "
        "better robust classifier at ε/2 than any known: its attacks are likely too weak "
        "(add a detector-aware attack)"
    )


def detection_claim_flags(
    dataset: str,
    claims: Iterable[tuple[str, Norm, float, float]],
    *,
    references: Iterable[ReferenceRobustness] = BEST_KNOWN_ROBUST_CLASSIFIERS,
) -> list[str]:
    """Flags for (label, norm, ε, robust accuracy with rejection) claims of one detector."""
    known = tuple(references)
    flags = []
    for label, norm, epsilon, accuracy in claims:
        flag = implied_classifier_flag(label, dataset, norm, epsilon, accuracy, references=known)
        if flag is not None:
            flags.append(flag)
    return flags
