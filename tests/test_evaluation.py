"""Robust-accuracy evaluation: re-checked adversarials, sanity properties, reports."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import torch
from torch import nn

from advdefense.attacks import get_attack
from advdefense.attacks.catalog import AttackEntry
from advdefense.errors import InputError
from advdefense.evaluation.metrics import wilson_interval
from advdefense.evaluation.record import evaluate_model, read_record, write_record
from advdefense.evaluation.report import plot_accuracy_curves, render
from advdefense.evaluation.robustness import (
    clean_accuracy,
    evaluate_attack,
    evaluation_mode,
    predict,
)


class Brightness(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5, else class 0: easy to reason about."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.dropout = nn.Dropout(0.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        score = self.scale * (images.flatten(1).mean(1) - 0.5)
        return torch.stack([-score, score], dim=1)


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    levels = torch.linspace(0.05, 0.95, n)
    images = levels.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    images += 0.01 * torch.rand(images.shape, generator=generator) - 0.005
    images = images.clamp(0, 1)
    labels = (levels > 0.5).long()
    labels[:3] = 1 - labels[:3]  # three clean mistakes
    return images, labels


def test_predict_and_clean_accuracy() -> None:
    images, labels = _data()
    model = Brightness()
    assert torch.equal(predict(model, images, batch_size=7), (images.mean((1, 2, 3)) > 0.5).long())
    assert clean_accuracy(model, images, labels) == pytest.approx(37 / 40)


def test_evaluation_mode_restores_each_submodule() -> None:
    model = Brightness().train()
    model.dropout.eval()
    with evaluation_mode(model):
        assert not model.training and not model.dropout.training
    assert model.training and not model.dropout.training


@pytest.mark.parametrize("attack_id", ["fgsm", "linf-pgd", "l2-pgd", "l2-deepfool"])
def test_curve_sanity(attack_id: str) -> None:
    images, labels = _data()
    model = Brightness().train()
    torch.manual_seed(0)
    outcome = evaluate_attack(
        model,
        images,
        labels,
        get_attack(attack_id),
        [0.0, 0.05, 0.2, 1.0, 4.0],
        batch_size=16,
        progress=False,
    )
    assert model.training, "the caller's mode must be restored"
    curve = [accuracy for _, accuracy in outcome.accuracy_curve()]
    assert curve[0] == pytest.approx(clean_accuracy(model, images, labels))
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(curve)), curve
    assert curve[-1] == 0.0, "an unbounded attack must break every sample of this model"
    assert outcome.robust.shape == (5, 40)
    assert outcome.seconds > 0


class _LyingAttack:
    """Claims success with adversarials far outside the budget and with values out of [0, 1]."""

    def __call__(
        self, model: Any, images: torch.Tensor, labels: torch.Tensor, *, epsilons: list[float]
    ) -> tuple[Any, list[torch.Tensor], torch.Tensor]:
        fake = [1.0 - images + 0.5 for _ in epsilons]
        return fake, fake, torch.ones(len(epsilons), images.shape[0], dtype=torch.bool)


def test_adversarials_are_rechecked_not_trusted() -> None:
    images, labels = _data()
    entry = AttackEntry("liar", "linf", _LyingAttack, MappingProxyType({}), "test double")
    outcome = evaluate_attack(Brightness(), images, labels, entry, [0.01], progress=False)
    assert outcome.accuracy_at(0.01) == pytest.approx(37 / 40)
    with pytest.raises(InputError, match="not in this outcome's grid"):
        outcome.accuracy_at(0.3)


def test_bad_epsilons_and_inputs() -> None:
    images, labels = _data()
    with pytest.raises(InputError, match="epsilons"):
        evaluate_attack(Brightness(), images, labels, get_attack("fgsm"), [], progress=False)
    with pytest.raises(InputError, match="labels has 39 entries"):
        evaluate_attack(Brightness(), images, labels[1:], get_attack("fgsm"), [0.1], progress=False)
    with pytest.raises(InputError, match="unknown attack 'nope'"):
        get_attack("nope")


def test_wilson_interval() -> None:
    low, high = wilson_interval(95, 100)
    assert low == pytest.approx(0.8882, abs=1e-3)
    assert high == pytest.approx(0.9785, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_record_report_and_plot(tmp_path: Path) -> None:
    images, labels = _data()
    record = evaluate_model(
        Brightness(),
        images,
        labels,
        ["fgsm", "l2-pgd"],
        model_name="bright",
        dataset="mnist-sample",
        split="test",
        seed=0,
        epsilons={"linf": 0.2},
        progress=False,
    )
    assert record.attacks["fgsm"].epsilon == 0.2
    assert record.attacks["l2-pgd"].epsilon == 1.5
    assert record.attacks["fgsm"].curve[0][1] == pytest.approx(record.clean_accuracy)
    write_record(record, tmp_path / "run")
    again = read_record(tmp_path / "run")
    assert again == record
    markdown = render([record, again], "md")
    assert "| clean accuracy | 92.5% [" in markdown
    assert markdown.index("fgsm (linf") > markdown.index("l2-pgd (l2")  # grouped by norm
    assert "n=40, seed=0" in markdown
    rows = render([record], "csv").splitlines()
    assert rows[0] == "row,model,accuracy,ci95_low,ci95_high,n"
    assert rows[1].startswith("clean accuracy,bright,0.925000,0.80")
    assert json.loads(render([record], "json"))["bright"]["clean_accuracy"] == 0.925
    assert "<table" in render([record], "html")
    with pytest.raises(InputError, match="unknown format"):
        render([record], "pdf")
    plot = plot_accuracy_curves([record], tmp_path / "plot.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
