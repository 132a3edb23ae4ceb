"""DESIGN §3 rule 6: detector claims checked against the best known robust classifier at ε/2."""

from __future__ import annotations

import numpy as np
import pytest

from advdefense.evaluation.detection_run import AttackDetection
from advdefense.evaluation.detector_claims import (
    BEST_KNOWN_ROBUST_CLASSIFIERS,
    ReferenceRobustness,
    detection_claim_flags,
    implied_classifier_flag,
)
from advdefense.evaluation.run import RunConfig, _detection_claim_flags
from advdefense.evaluation.summary import AttackResult, ModelSummary


def test_claim_above_the_best_classifier_at_half_epsilon_is_flagged() -> None:
    flag = implied_classifier_flag("pgd", "cifar10", "linf", 16 / 255, 0.80)
    assert flag is not None
    assert "pgd: robust accuracy with rejection 80.0% at linf 0.06275" in flag
    assert "75.28%" in flag and "Amini2024MeanSparse_S-WRN-94-16.json" in flag
    assert "Tramèr 2022" in flag and "too weak" in flag


@pytest.mark.parametrize(
    ("dataset", "norm", "epsilon", "accuracy"),
    [
        ("cifar10", "linf", 16 / 255, 0.70),  # below the reference: a plausible claim
        ("cifar10", "linf", 16 / 255, 0.7528),  # equal is not above
        ("cifar10", "linf", 8 / 255, 0.99),  # ε/2 = 4/255: no reference at or below it
        ("cifar10", "l2", 0.5, 0.99),
        ("fashion-mnist", "linf", 0.3, 0.99),  # no leaderboard for the dataset
        ("cifar10", "l1", 20.0, 0.99),  # nor for the norm
    ],
)
def test_no_flag_without_a_valid_reference_or_excess(
    dataset: str, norm: str, epsilon: float, accuracy: float
) -> None:
    assert implied_classifier_flag("a", dataset, norm, epsilon, accuracy) is None  # type: ignore[arg-type]


def test_l2_reference_and_rounded_epsilon() -> None:
    assert implied_classifier_flag("cw", "cifar10", "l2", 1.0, 0.90) is not None
    assert implied_classifier_flag("cw", "cifar10", "l2", 1.0, 0.87) is None
    # 16/255 written to four decimals still reaches the 8/255 reference
    assert implied_classifier_flag("pgd", "cifar10", "linf", 0.0627, 0.80) is not None


def test_the_tightest_usable_reference_bounds_the_claim() -> None:
    references = (
        ReferenceRobustness("toy", "linf", 0.1, 0.9, "A", "a.json"),
        ReferenceRobustness("toy", "linf", 0.2, 0.6, "B", "b.json"),
        ReferenceRobustness("toy", "linf", 0.3, 0.1, "C", "c.json"),  # above ε/2: unusable
    )
    flags = detection_claim_flags(
        "toy", [("x", "linf", 0.4, 0.7), ("y", "linf", 0.4, 0.5)], references=references
    )
    assert len(flags) == 1 and flags[0].startswith("x:") and "(60.00%, B; b.json)" in flags[0]


def test_references_are_fractions_with_their_source() -> None:
    for reference in BEST_KNOWN_ROBUST_CLASSIFIERS:
        assert 0 < reference.robust_accuracy < 1 and reference.epsilon > 0
        assert reference.source.startswith("RobustBench model_info/")


def _summary(accuracy_with_rejection: float | None) -> ModelSummary:
    n = 10
    attack = AttackResult(
        "linf-pgd", "linf", 16 / 255, np.full(n, np.inf), np.zeros(n, np.int64), 1.0, 1, 0
    )
    detection = AttackDetection(
        "linf-pgd", 5, 0.9, {0.05: 0.5}, np.zeros(2), np.ones(2), accuracy_with_rejection, 0.05
    )
    return ModelSummary("pdm", n, 0.9, {"linf-pgd": attack}, {}, detection=[detection])


@pytest.mark.parametrize(("dataset", "flagged"), [("cifar10", True), ("fashion-mnist", False)])
def test_harness_flags_detection_claims(dataset: str, flagged: bool) -> None:
    config = RunConfig(dataset, "test", tuple(range(10)), "s", "1", "minimal", {"linf": 16 / 255})
    flags = _detection_claim_flags(_summary(0.9), config)
    assert (len(flags) == 1) is flagged
    assert _detection_claim_flags(_summary(None), config) == []  # uncalibrated detector
