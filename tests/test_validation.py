"""Every public entry point rejects malformed input with a ValueError that names the problem."""

from __future__ import annotations

import pytest
import torch

from advdefense.errors import InputError
from advdefense.validation import (
    check_choices,
    check_images,
    check_labels,
    check_positive_int,
    check_probability,
)

GOOD = torch.rand(3, 1, 28, 28)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([[0.5]], "must be a torch.Tensor"),
        (torch.rand(1, 28, 28), "4 dimensions"),
        ((GOOD * 255).to(torch.uint8), "floating-point"),
        (torch.rand(0, 1, 28, 28), "empty batch"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN or infinite"),
        (torch.full((2, 1, 28, 28), float("inf")), "NaN or infinite"),
        (GOOD * 2, r"must lie in \[0.0, 1.0\]"),
        (GOOD - 0.5, r"must lie in \[0.0, 1.0\]"),
    ],
)
def test_check_images_rejects(images: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        check_images(images, "x")
    assert str(caught.value).startswith("x ")
    assert isinstance(caught.value, InputError)


def test_check_images_shape_constraints() -> None:
    assert check_images(GOOD, channels=1, height=28, width=28) is GOOD
    with pytest.raises(ValueError, match="must have 3 channels"):
        check_images(GOOD, channels=3)
    with pytest.raises(ValueError, match="must have 32 width"):
        check_images(GOOD, width=32)


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        ([1, 2], {}, "must be a torch.Tensor"),
        (torch.tensor([1, 2], dtype=torch.int32), {}, "torch.int64"),
        (torch.tensor([[1, 2]]), {}, "must be a vector"),
        (torch.tensor([], dtype=torch.int64), {}, "is empty"),
        (torch.tensor([1, 2]), {"batch_size": 3}, "2 entries but there are 3 images"),
        (torch.tensor([1, 10]), {"num_classes": 10}, r"\[0, 9\], got values in \[1, 10\]"),
        (torch.tensor([-1, 2]), {}, "got values in"),
    ],
)
def test_check_labels_rejects(labels: object, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_labels(labels, "y", **kwargs)


def test_check_labels_accepts() -> None:
    labels = torch.tensor([0, 9, 3])
    assert check_labels(labels, num_classes=10, batch_size=3) is labels


def test_scalar_checks() -> None:
    assert check_positive_int(3, "n") == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            check_positive_int(bad, "n")  # type: ignore[arg-type]
    assert check_probability(0.05, "fpr") == 0.05
    with pytest.raises(ValueError, match="fpr must lie in"):
        check_probability(1.5, "fpr")


def test_check_choices_names_the_unknown_and_the_choices() -> None:
    check_choices(["b", "a"], ("a", "b", "c"), "model")
    check_choices([], ("a",), "stage")
    with pytest.raises(InputError, match=r"unknown stage\(s\) x, y; choose from a, b$"):
        check_choices(["y", "a", "x"], iter(["a", "b"]), "stage")
