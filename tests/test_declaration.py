"""Defense declarations: binarization surrogates (BPDA), score views, adaptive losses, and how
the harness uses them (DESIGN.md §1 and §3.4)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import eagerpy as ep
import pytest
import torch
from foolbox.attacks.base import MinimizationAttack
from foolbox.distances import l2
from foolbox.models.pytorch import PyTorchModel
from torch import nn

from advdefense.attacks import get_attack
from advdefense.attacks.adaptive import LinfMarginAllTargetsAttack, dlr_loss, margin_loss
from advdefense.attacks.catalog import AttackEntry
from advdefense.attacks.starting_points import run_attack
from advdefense.attacks.suites import AttackSuite, get_suite
from advdefense.declaration import AttackDeclaration, MethodView, declaration_of
from advdefense.defenses.dim import DIM, BiDIM
from advdefense.errors import InputError
from advdefense.evaluation import runner
from advdefense.evaluation.runner import run_fixed, run_minimal
from advdefense.evaluation.sanity import model_flags
from advdefense.evaluation.store import ResultStore
from advdefense.evaluation.summary import summarize_minimal
from advdefense.evaluation.targets import refine_binarized
from advdefense.nn.abs_cnn import AbsCNN, AbsCNNConfig
from advdefense.nn.binarization import Binarization, binarization_surrogates

SURROGATE_NAMES = {
    "sigmoid-10",
    "sigmoid-15",
    "sigmoid-20",
    "sigmoid-50",
    "sigmoid-100",
    "bpda-identity",
}


class BinarizedBrightness(nn.Module):
    """Class 1 when more than half the pixels are >= 0.5 (a binarizing toy defense)."""

    def __init__(self, declare: bool = True) -> None:
        super().__init__()
        self.declare = declare

    def forward(
        self, images: torch.Tensor, *, binarization: Binarization | None = None
    ) -> torch.Tensor:
        score = 20.0 * ((binarization or Binarization())(images).flatten(1).mean(1) - 0.5)
        return torch.stack([-score, score], dim=1)

    def attack_declaration(self) -> AttackDeclaration:
        if not self.declare:
            return AttackDeclaration()
        return AttackDeclaration(
            differentiable=False,
            surrogates={
                b.name: MethodView(self, "forward", binarization=b)
                for b in binarization_surrogates()
            },
            binarization_threshold=0.5,
        )


def _levels(n: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    levels = torch.linspace(0.1, 0.9, n)
    images = levels.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return images, (levels >= 0.5).long(), levels


def test_binarization_values_and_gradients() -> None:
    values = torch.tensor([0.2, 0.5, 0.7], requires_grad=True)
    assert Binarization()(values).tolist() == [0.0, 1.0, 1.0]
    (hard_gradient,) = torch.autograd.grad(Binarization()(values).sum(), values)
    assert hard_gradient.tolist() == [0.0, 0.0, 0.0]
    straight = Binarization(straight_through=True)
    assert straight(values).tolist() == [0.0, 1.0, 1.0]
    (identity_gradient,) = torch.autograd.grad(straight(values).sum(), values)
    assert identity_gradient.tolist() == [1.0, 1.0, 1.0]
    sigmoid = Binarization(sigmoid_alpha=10.0)
    assert sigmoid(values)[1].item() == pytest.approx(0.5)
    assert sigmoid(values)[0].item() == pytest.approx(1 / (1 + math.exp(3.0)))
    assert [b.name for b in binarization_surrogates()] == [
        "sigmoid-10",
        "sigmoid-15",
        "sigmoid-20",
        "sigmoid-50",
        "sigmoid-100",
        "bpda-identity",
    ]
    with pytest.raises(InputError, match="not both"):
        Binarization(sigmoid_alpha=10.0, straight_through=True)
    with pytest.raises(InputError, match="threshold"):
        Binarization(threshold=1.5)
    with pytest.raises(InputError, match="positive and finite"):  # inf * 0 would give NaN
        Binarization(sigmoid_alpha=math.inf)


def test_declarations_of_the_binarizing_models() -> None:
    assert declaration_of(nn.Linear(2, 2)).is_default
    assert declaration_of(AbsCNN()).is_default
    bicnn = declaration_of(AbsCNN(AbsCNNConfig(binarize_input=True)))
    assert not bicnn.differentiable and set(bicnn.surrogates) == SURROGATE_NAMES
    assert bicnn.binarization_threshold == 0.5
    bidim = declaration_of(BiDIM().eval())
    assert set(bidim.surrogates) == SURROGATE_NAMES
    assert set(declaration_of(DIM()).score_views) == {"internal-intensity"}
    assert declaration_of(DIM()).surrogates == {}


@pytest.mark.parametrize("model_class", [DIM, BiDIM])
def test_dim_views_keep_the_decisions(model_class: type[DIM]) -> None:
    torch.manual_seed(0)
    model = model_class().eval()
    images = torch.rand(16, 1, 28, 28)
    declaration = declaration_of(model)
    with torch.no_grad():
        predicted = model(images).argmax(1)
        intensity = declaration.score_views["internal-intensity"](images)
    assert torch.equal(intensity.argmax(1), predicted)
    assert torch.allclose(model.scores(images, normalized=False), intensity)
    if declaration.surrogates:
        straight = declaration.surrogates["bpda-identity"]
        with torch.no_grad():
            assert torch.equal(straight(images), model(images))
        inputs = images.clone().requires_grad_(True)
        for surrogate in declaration.surrogates.values():
            (gradient,) = torch.autograd.grad(surrogate(inputs).max(1).values.sum(), inputs)
            assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_zero_gradient_flag_only_without_surrogates() -> None:
    images, labels, _ = _levels()
    undeclared = model_flags(BinarizedBrightness(declare=False), images, labels)
    assert any("zero input gradients" in flag for flag in undeclared)
    assert model_flags(BinarizedBrightness().eval(), images, labels) == []


def test_refinement_keeps_the_binarized_decision_and_moves_closer() -> None:
    torch.manual_seed(0)
    model = AbsCNN(AbsCNNConfig(binarize_input=True)).eval()
    foolbox_model = PyTorchModel(model, bounds=(0.0, 1.0))
    images = torch.rand(8, 1, 28, 28)
    far = (images + 0.4 * torch.randn_like(images)).clamp(0, 1)
    labels = model(images).argmax(1)
    refined = refine_binarized(foolbox_model, images, labels, far, 0.5)
    with torch.no_grad():
        assert torch.equal(model(refined).argmax(1), model(far).argmax(1))
    assert ((refined - images).abs() <= (far - images).abs() + 1e-7).all()
    flipped = (far >= 0.5) != (images >= 0.5)
    assert torch.equal((refined >= 0.5), (far >= 0.5))
    assert torch.allclose(refined[~flipped], images[~flipped])


def _binary_minimal(
    images: torch.Tensor,
    labels: torch.Tensor,
    suite: AttackSuite,
    store: ResultStore,
    *,
    grid_points: int,
    progress: bool,
) -> list[str]:
    """``suite`` in minimal mode on the declared binarizing toy defense."""
    return run_minimal(
        BinarizedBrightness(),
        images,
        labels,
        suite,
        store,
        model_name="binary",
        thresholds={"linf": 0.3, "l2": 1.5},
        grid_points=grid_points,
        progress=progress,
    )


def test_harness_attacks_the_surrogates_and_judges_the_real_model(tmp_path: Path) -> None:
    images, labels, levels = _levels()
    suite = AttackSuite("t", "1", (get_attack("linf-pgd"), get_attack("l2-gn")), "test")
    store = ResultStore(tmp_path)
    keys = _binary_minimal(images, labels, suite, store, grid_points=6, progress=False)
    pgd, noise = (store.get(key) for key in keys)
    assert pgd is not None and noise is not None
    assert set(pgd["targets"]) == SURROGATE_NAMES and pgd["error"] is None
    assert noise["targets"] == ["model"]  # not gradient-based: the model itself
    summary = summarize_minimal(
        store, keys, model="binary", indices=range(12), thresholds={"linf": 0.3, "l2": 1.5}
    )
    distances = torch.tensor(summary.attacks["linf-pgd"].distances, dtype=torch.float32)
    reachable = (levels - 0.5).abs() < 0.3 - 0.3 / 6
    # through the surrogates PGD breaks what the budget allows; the refinement then puts each
    # changed pixel just across the threshold, so the distance is about |level - 0.5|
    assert torch.isfinite(distances[reachable]).all()
    assert torch.allclose(
        distances[reachable], (levels[reachable] - 0.5).abs(), atol=0.3 / 6 + 1e-6
    )
    adversarials = store.adversarials(keys[0])
    assert adversarials is not None
    with torch.no_grad():
        assert (BinarizedBrightness()(adversarials).argmax(1) != labels)[reachable].all()


class _KilledAt:
    """``run_attack`` that raises KeyboardInterrupt (a kill) on its ``at``-th call."""

    def __init__(self, at: int | None) -> None:
        self.at, self.calls = at, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return run_attack(*args, **kwargs)


@pytest.mark.parametrize("mode", ["minimal", "fixed"])
def test_a_killed_attack_resumes_at_the_surrogate_it_was_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    images, labels, _ = _levels()
    suite = AttackSuite("t", "1", (get_attack("linf-pgd"),), "test")

    def attack(store: ResultStore, run_attack: _KilledAt) -> str:
        monkeypatch.setattr(runner, "run_attack", run_attack)
        if mode == "minimal":
            (key,) = _binary_minimal(images, labels, suite, store, grid_points=2, progress=False)
            return key
        (key,) = run_fixed(
            BinarizedBrightness(),
            images,
            labels,
            suite,
            store,
            model_name="binary",
            norm="linf",
            epsilon=0.3,
            progress=False,
        )
        return key

    whole = ResultStore(tmp_path / "whole")
    reference = whole.get(attack(whole, _KilledAt(None)))
    store = ResultStore(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        attack(store, _KilledAt(4))  # killed while on the fourth of six surrogates
    assert len(store) == 0
    assert len(list((tmp_path / "killed" / "partial").glob("*/*.safetensors"))) == 3
    rerun = _KilledAt(None)
    record = store.get(attack(store, rerun))
    assert rerun.calls == len(SURROGATE_NAMES) - 3  # the three finished ones are not redone
    assert reference is not None and record is not None
    for field in ("distances", "adversarial_labels", "forward_calls", "backward_calls"):
        assert record[field] == reference[field], field
    assert record["targets"] == reference["targets"]
    assert record["seconds"] > 0
    assert not list((tmp_path / "killed" / "partial").glob("*/*"))  # parts gone with the record
    if mode == "minimal":
        resumed, uninterrupted = (
            store.adversarials(record["key"]),
            whole.adversarials(reference["key"]),
        )
        assert resumed is not None and uninterrupted is not None
        assert torch.equal(resumed, uninterrupted)


def _recording_tickers(monkeypatch: pytest.MonkeyPatch) -> list[runner._PassTicker]:
    """The harness's pass tickers, redrawing at every pass, collected as they are made."""
    made: list[runner._PassTicker] = []

    class Recording(runner._PassTicker):
        def __init__(self) -> None:
            super().__init__(interval=0.0)
            made.append(self)

    monkeypatch.setattr(runner, "_PassTicker", Recording)
    return made


def _undeclared_linf(
    images: torch.Tensor,
    labels: torch.Tensor,
    suite: AttackSuite,
    store: ResultStore,
    *,
    progress: bool,
) -> list[str]:
    """``suite``'s L-inf attacks at 0.3 in fixed mode on the toy defense with no declaration."""
    return run_fixed(
        BinarizedBrightness(declare=False),
        images,
        labels,
        suite,
        store,
        model_name="plain",
        norm="linf",
        epsilon=0.3,
        progress=progress,
    )


def test_attack_bars_count_passes_live_surrogates_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tickers = _recording_tickers(monkeypatch)
    images, labels, _ = _levels()
    suite = AttackSuite("t", "1", (get_attack("linf-pgd"),), "test")
    store = ResultStore(tmp_path)
    (key,) = _binary_minimal(images, labels, suite, store, grid_points=2, progress=True)
    record = store.get(key)
    assert record is not None and set(record["targets"]) == SURROGATE_NAMES
    (ticker,) = tickers
    # every pass of the attack is shown, those through the six surrogates included
    assert ticker.passes == record["forward_calls"] > len(SURROGATE_NAMES)
    assert ticker._bar is not None
    assert ticker._bar.postfix == f"linf-pgd, {ticker.passes:,} passes"


def test_fixed_mode_bar_counts_passes_per_attack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tickers = _recording_tickers(monkeypatch)
    images, labels, _ = _levels(6)
    suite = AttackSuite("t", "1", (get_attack("fgsm"), get_attack("linf-pgd")), "test")
    store = ResultStore(tmp_path)
    # no gradient reaches the input: both attacks run on all six
    fgsm_key, pgd_key = _undeclared_linf(images, labels, suite, store, progress=True)
    fgsm, pgd = store.get(fgsm_key), store.get(pgd_key)
    assert fgsm is not None and pgd is not None
    (ticker,) = tickers
    # the count starts again with each attack
    assert ticker.passes == pgd["forward_calls"] > fgsm["forward_calls"]
    assert ticker._bar is not None
    assert ticker._bar.postfix == f"linf-pgd, {ticker.passes:,} passes"


def test_declared_runs_get_their_own_keys(tmp_path: Path) -> None:
    images, labels, _ = _levels(4)
    suite = AttackSuite("t", "1", (get_attack("fgsm"),), "test")
    arguments = {"thresholds": {"linf": 0.3}, "grid_points": 2, "progress": False}
    with ResultStore(tmp_path) as store:
        declared = run_minimal(
            BinarizedBrightness(), images, labels, suite, store, model_name="a", **arguments
        )
        plain = run_minimal(
            BinarizedBrightness(declare=False),
            images,
            labels,
            suite,
            store,
            model_name="b",
            **arguments,
        )
    assert declared != plain


def test_entries_needing_a_missing_score_view_are_skipped(tmp_path: Path) -> None:
    images, labels, _ = _levels(6)
    suite = AttackSuite("t", "1", (get_attack("linf-internal-all-targets"),), "test")
    store = ResultStore(tmp_path)
    (key,) = _undeclared_linf(images, labels, suite, store, progress=False)
    record = store.get(key)
    assert record is not None and not any(record["broken"])
    assert "no score view 'internal-intensity'" in record["error"]


def test_margin_and_dlr_losses_by_hand() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0]])
    assert margin_loss(scores, torch.tensor([0])).item() == pytest.approx(2.0)
    assert margin_loss(scores, torch.tensor([1])).item() == pytest.approx(-1.0)
    # untargeted DLR: margin / (z_pi1 - z_pi3) = 2 / (3 - 1)
    assert dlr_loss(scores, torch.tensor([0]), targeted=False).item() == pytest.approx(1.0)
    four = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    # targeted DLR at c = 1: (4 - 1) / (4 - (2 + 1) / 2)
    assert dlr_loss(four, torch.tensor([1]), targeted=True).item() == pytest.approx(3 / 2.5)
    # invariant to shifting and scaling the scores
    assert dlr_loss(7 * four + 3, torch.tensor([1]), targeted=True).item() == pytest.approx(1.2)
    with pytest.raises(InputError, match="targeted DLR loss needs at least 4 classes"):
        dlr_loss(scores, torch.tensor([0]), targeted=True)
    with pytest.raises(InputError, match=r"DLR loss needs at least 3 classes.*margin"):
        dlr_loss(scores[:, :2], torch.tensor([0]), targeted=False)


def test_all_targets_attack_breaks_what_the_budget_allows() -> None:
    torch.manual_seed(0)
    # class k scores the mean of row k of a 4 x 4 image: any class is reachable
    model = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (4, 4)), _RowMeans()).eval()
    images = torch.full((6, 1, 4, 4), 0.5)
    images[:, 0, 0, :] = 0.6  # class 0 leads by 0.1 everywhere
    labels = torch.zeros(6, dtype=torch.long)
    foolbox_model = PyTorchModel(model, bounds=(0.0, 1.0))
    attack = LinfMarginAllTargetsAttack(steps=40)
    _, clipped, success = attack(foolbox_model, images, labels, epsilons=[0.02, 0.2])
    assert not bool(success[0].any()) and bool(success[1].all())
    assert (clipped[1] - images).abs().max() <= 0.2 + 1e-6


class _RowMeans(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(2)


def test_adaptive_suite() -> None:
    adaptive = get_suite("adaptive")
    assert {entry.norm for entry in adaptive.entries} == {"linf", "l2"}
    assert all(entry.uses_gradients for entry in adaptive.entries)
    internal = [entry for entry in adaptive.entries if entry.score_view is not None]
    assert {entry.id for entry in internal} == {
        "linf-internal-all-targets",
        "l2-internal-all-targets",
    }
    assert not get_attack("l2-boundary").uses_gradients
    assert get_attack("l2-carlini-wagner").uses_gradients


class _Overshoot(MinimizationAttack):
    """Moves the 12 pixels at 0.45 up by 0.1 and the 4 at 0.05 by 0.3: adversarial for
    ``BinarizedBrightness`` (12 of 16 pixels cross 0.5), but far from minimal."""

    distance = l2

    def run(self, model: Any, inputs: Any, criterion: Any, **kwargs: Any) -> Any:
        x, restore = ep.astensor_(inputs)
        return restore(x + ep.where(x > 0.25, 0.1, 0.3))


def test_fixed_mode_refines_the_unbounded_adversarial_of_a_minimization_attack(
    tmp_path: Path,
) -> None:
    images = torch.full((3, 1, 4, 4), 0.45)
    images[:, :, 0, :] = 0.05
    labels = torch.zeros(3, dtype=torch.long)
    entry = AttackEntry("l2-overshoot", "l2", _Overshoot, {}, "overshoots, then refined")
    suite = AttackSuite("t", "1", (entry,), "test")
    arguments: dict[str, Any] = {"model_name": "b", "norm": "l2", "progress": False}
    # Scaled down to 0.3 (x 0.43) no pixel crosses 0.5; unbounded and refined, the 12 pixels
    # move to 0.5 only: L2 = sqrt(12) * 0.05 = 0.17.
    binarizing = ResultStore(tmp_path / "binarizing")
    (key,) = run_fixed(
        BinarizedBrightness(), images, labels, suite, binarizing, epsilon=0.3, **arguments
    )
    record = binarizing.get(key)
    assert record is not None and record["unbounded_candidate"] and all(record["broken"])
    assert record["distances"] == pytest.approx([math.sqrt(12) * 0.05] * 3, rel=1e-3)
    # without a binarization declaration there is nothing to refine: the 0.3 candidate fails
    plain = ResultStore(tmp_path / "plain")
    (plain_key,) = run_fixed(
        BinarizedBrightness(declare=False), images, labels, suite, plain, epsilon=0.3, **arguments
    )
    plain_record = plain.get(plain_key)
    assert plain_record is not None and not any(plain_record["broken"])
    assert "unbounded_candidate" not in plain_record and plain_key != key
