"""The Davies-Bouldin index (PDM paper Sec. 3.5) against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from advdefense.errors import InputError
from advdefense.evaluation.clustering import davies_bouldin_index

# Three clusters in the plane:
#   A = {(0, 0), (2, 0)}:  centroid (1, 0),  scatter 1
#   B = {(10, 0), (10, 4)}: centroid (10, 2), scatter 2
#   C = {(0, 10)}:          centroid (0, 10), scatter 0
# centroid distances: AB = sqrt(85), AC = sqrt(101), BC = sqrt(164)
# R_AB = 3 / sqrt(85), R_AC = 1 / sqrt(101), R_BC = 2 / sqrt(164)
# worst partner: A -> B; B -> A (3 / sqrt(85) > 2 / sqrt(164));
#                C -> B (2 / sqrt(164) > 1 / sqrt(101))
POINTS = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 4.0], [0.0, 10.0]])
LABELS = torch.tensor([0, 0, 1, 1, 2])
BY_HAND = (2 * 3 / math.sqrt(85) + 2 / math.sqrt(164)) / 3


def test_davies_bouldin_matches_the_hand_computation() -> None:
    assert davies_bouldin_index(POINTS, LABELS) == pytest.approx(BY_HAND, rel=1e-12)
    one_dimension = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    assert davies_bouldin_index(one_dimension, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.2)


def test_davies_bouldin_invariances() -> None:
    order = torch.tensor([4, 2, 0, 3, 1])
    assert davies_bouldin_index(POINTS[order], LABELS[order]) == pytest.approx(BY_HAND)
    renamed = torch.tensor([7, 7, 3, 3, 5])  # label values do not matter, only the grouping
    assert davies_bouldin_index(POINTS, renamed) == pytest.approx(BY_HAND)
    moved = 3.5 * POINTS + torch.tensor([1.0, -2.0])  # scale and translation invariant
    assert davies_bouldin_index(moved.double(), LABELS) == pytest.approx(BY_HAND)


def test_davies_bouldin_collapse_and_errors() -> None:
    collapsed = torch.zeros(4, 3)  # every embedding the same point (a collapsed model)
    assert math.isinf(davies_bouldin_index(collapsed, torch.tensor([0, 0, 1, 1])))
    with pytest.raises(InputError, match="at least 2 clusters"):
        davies_bouldin_index(POINTS, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(InputError, match="N x D"):
        davies_bouldin_index(POINTS[0], LABELS)
    with pytest.raises(InputError, match="vector of 5"):
        davies_bouldin_index(POINTS, LABELS[:4])
    with pytest.raises(InputError, match="integers"):
        davies_bouldin_index(POINTS, LABELS.float())
    with pytest.raises(InputError, match="NaN"):
        davies_bouldin_index(torch.full((5, 2), math.nan), LABELS)
