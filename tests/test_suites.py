"""Attack suites (DIM paper Table 3 and friends) and running one entry: starts, restarts, checks."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections import Counter
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import eagerpy as ep
import numpy as np
import pytest
import torch
from foolbox.attacks.additive_noise import L2AdditiveGaussianNoiseAttack
from foolbox.attacks.base import Attack, FixedEpsilonAttack, MinimizationAttack
from foolbox.attacks.ddn import DDNAttack
from foolbox.attacks.deepfool import L2DeepFoolAttack
from foolbox.attacks.fast_gradient_method import LinfFastGradientAttack
from foolbox.attacks.fast_minimum_norm import FMNAttackLp
from foolbox.attacks.projected_gradient_descent import (
    L2ProjectedGradientDescentAttack,
    LinfProjectedGradientDescentAttack,
)
from foolbox.distances import LpDistance, l2
from foolbox.models.pytorch import PyTorchModel
from torch import nn

from advdefense.attacks import (
    ATTACKS,
    DEMO_ATTACKS,
    DIM42_TABLE_ORDER,
    SUITES,
    AttackEntry,
    AttackResult,
    AttackSuite,
    best_starting_points,
    get_attack,
    get_suite,
    perturbation_norm,
    run_attack,
    run_with_starting_points,
)
from advdefense.errors import InputError, UserError
from advdefense.nn.binarization import Binarization

DIM42 = get_suite("dim42")
QUICK = get_suite("quick")
MINIMAL = get_suite("minimal")
EPSILONS = {"l0": 3.0, "l1": 1.0, "l2": 0.5, "linf": 0.1}
STARTING_POINT_IDS = {
    "l2-boundary",
    "l2-brendel-bethge",
    "linf-brendel-bethge",
    "l1-brendel-bethge",
    "l0-pointwise-x10",
}


# ---------------------------------------------------------------- composition of the suites


def test_dim42_has_the_papers_42_attacks() -> None:
    assert len(DIM42.entries) == 42
    assert Counter(entry.norm for entry in DIM42.entries) == {
        "l2": 22,
        "linf": 12,
        "l1": 6,
        "l0": 2,
    }
    assert len(set(DIM42.ids())) == 42
    assert set(DIM42.ids()) == set(DIM42_TABLE_ORDER)
    assert len(DIM42_TABLE_ORDER) == 42
    unnamed = [entry.id for entry in DIM42.entries if not entry.paper_name]
    assert unnamed == ["l2-linear-search-blended-uniform-noise"]  # inferred 22nd L2 row
    assert DIM42.norms() == ("l0", "l1", "l2", "linf")
    assert json.loads(json.dumps(DIM42.to_json()))["entries"][0]["id"] == DIM42.ids()[0]
    assert [entry.paper_name for entry in DIM42.entries_for("l0")] == [
        "SaltAndPepperAttack",
        "Pointwise \u00d7 10",
    ]


@pytest.mark.parametrize("entry", list(ATTACKS.values()), ids=list(ATTACKS))
def test_entries_are_foolbox_classes_with_derived_minimization(entry: AttackEntry) -> None:
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", entry.id)
    assert isinstance(entry.factory, type) and issubclass(entry.factory, Attack)
    assert entry.minimization == issubclass(entry.factory, MinimizationAttack)
    assert entry.minimization != issubclass(entry.factory, FixedEpsilonAttack)
    distance = entry.parameters.get("distance")
    if distance is not None:  # the norm of a FlexibleDistance attack matches the entry's
        assert isinstance(distance, LpDistance)
        assert entry.to_json()["parameters"]["distance"] == entry.norm
    json.dumps(entry.to_json())


def test_minimization_flag_spot_checks() -> None:
    assert get_attack("l2-ddn").minimization  # a MinimizationAttack since Foolbox 3.0
    assert get_attack("l2-carlini-wagner").minimization
    assert not get_attack("linf-pgd").minimization
    assert not get_attack("l2-repeated-gn").minimization


def test_dim42_keeps_foolbox_defaults() -> None:
    for entry in DIM42.entries:
        assert set(entry.parameters) <= {"distance"}, entry.id
    carlini_wagner = get_attack("l2-carlini-wagner").build()
    assert (carlini_wagner.steps, carlini_wagner.binary_search_steps) == (10_000, 9)
    assert get_attack("l2-boundary").build().steps == 25_000
    assert get_attack("l0-pointwise-x10").restarts == 10


def test_starting_point_attacks_match_the_foolbox_source() -> None:
    for entry in DIM42.entries:
        takes_starts = "starting_points" in inspect.signature(entry.factory.run).parameters
        assert entry.needs_starting_point == takes_starts, entry.id
    assert {e.id for e in DIM42.entries if e.needs_starting_point} == STARTING_POINT_IDS
    for entry in ATTACKS.values():
        if "BrendelBethge" in entry.factory.__name__:
            assert entry.requires == ("numba",)


def test_quick_contains_exactly_the_listed_attacks() -> None:
    assert {(entry.factory, entry.norm) for entry in QUICK.entries} == {
        (LinfFastGradientAttack, "linf"),
        (LinfProjectedGradientDescentAttack, "linf"),
        (L2ProjectedGradientDescentAttack, "l2"),
        (DDNAttack, "l2"),
        (L2DeepFoolAttack, "l2"),
        (L2AdditiveGaussianNoiseAttack, "l2"),
    }
    assert len(QUICK.entries) == 6
    assert set(QUICK.ids()) <= set(DIM42.ids())


def test_minimal_has_fmn_ddn_and_brendel_bethge_from_pgd() -> None:
    fmn_norms = {e.norm for e in MINIMAL.entries if issubclass(e.factory, FMNAttackLp)}
    assert fmn_norms == {"l0", "l1", "l2", "linf"}
    assert "l2-ddn" in MINIMAL.ids()
    brendel_bethge = [e for e in MINIMAL.entries if "BrendelBethge" in e.factory.__name__]
    assert {e.norm for e in brendel_bethge} == {"l0", "l1", "l2", "linf"}
    for entry in brendel_bethge:
        assert entry.start_from is not None
        assert "ProjectedGradientDescent" in MINIMAL.entry(entry.start_from).factory.__name__


@pytest.mark.parametrize("suite", list(SUITES.values()), ids=list(SUITES))
def test_cheap_attacks_first_expensive_last(suite: AttackSuite) -> None:
    costs = [entry.cost for entry in suite.entries]
    assert costs == sorted(costs)
    assert not suite.entries[0].needs_starting_point
    for position, entry in enumerate(suite.entries):
        if entry.needs_starting_point:
            earlier = suite.entries[:position]
            assert any(not e.needs_starting_point and e.cost < entry.cost for e in earlier)
            if entry.start_from is not None:
                assert entry.start_from in [e.id for e in earlier]


def test_dim42_runs_boundary_carlini_wagner_and_pointwise_last() -> None:
    assert set(DIM42.ids()[-3:]) == {"l2-boundary", "l2-carlini-wagner", "l0-pointwise-x10"}


def test_get_suite_and_suite_validation_errors() -> None:
    known = (
        "known suites: adaptive, convergence, dim42, minimal, pdm-graybox, quick, quick-adaptive"
    )
    with pytest.raises(InputError, match=known):
        get_suite("dim41")
    with pytest.raises(InputError, match="no attack"):
        QUICK.entry("l2-carlini-wagner")
    pgd, boundary = get_attack("l2-pgd"), get_attack("l2-boundary")
    with pytest.raises(InputError, match="unique"):
        AttackSuite("twice", "1", (pgd, pgd), "")
    with pytest.raises(InputError, match="cannot start"):
        AttackSuite("start", "1", (boundary, pgd), "")
    late = get_attack("l2-brendel-bethge-from-pgd")
    with pytest.raises(InputError, match="earlier entry"):
        AttackSuite("late", "1", (get_attack("linf-pgd"), late, pgd), "")


def test_restricted_suite_keeps_run_order_and_checks_its_ids() -> None:
    quick = get_suite("quick")
    alone = quick.restricted_to(["linf-pgd"])
    assert alone.ids() == ("linf-pgd",) and alone.name == "quick[linf-pgd]"
    assert alone.version == quick.version
    picked = quick.restricted_to(["l2-ddn", "linf-fgsm"])  # given out of order
    assert picked.ids() == tuple(i for i in quick.ids() if i in {"l2-ddn", "linf-fgsm"})
    assert picked.name == f"quick[{','.join(picked.ids())}]"
    with pytest.raises(InputError, match=r"no attack 'l2-cw'; its attacks: .*linf-pgd"):
        quick.restricted_to(["linf-pgd", "l2-cw"])
    with pytest.raises(InputError, match="earlier entry"):
        get_suite("minimal").restricted_to(["l2-fmn", "l2-brendel-bethge-from-pgd"])
    with pytest.raises(InputError, match="non-empty"):
        quick.restricted_to([])


def test_entry_validation_and_missing_dependency() -> None:
    pgd = get_attack("l2-pgd")
    with pytest.raises(InputError, match="restarts"):
        dataclasses.replace(pgd, restarts=0)
    with pytest.raises(InputError, match="needs_starting_point"):
        dataclasses.replace(pgd, start_from="linf-pgd")
    missing = dataclasses.replace(
        get_attack("l2-brendel-bethge"), requires=("advdefense_no_such_module",)
    )
    with pytest.raises(UserError, match="pip install advdefense_no_such_module"):
        missing.build()


def test_demo_ids_keep_their_meaning() -> None:
    assert DEMO_ATTACKS == ("fgsm", "linf-pgd", "l2-pgd", "l2-deepfool")
    assert get_attack("fgsm").factory is LinfFastGradientAttack
    assert get_attack("linf-pgd").factory is LinfProjectedGradientDescentAttack
    assert get_attack("l2-pgd").factory is L2ProjectedGradientDescentAttack
    assert get_attack("l2-deepfool").factory is L2DeepFoolAttack
    for attack_id in DEMO_ATTACKS:
        assert dict(get_attack(attack_id).parameters) == {}


# ---------------------------------------------------------------- running entries


def _setup(n: int = 8) -> tuple[nn.Module, PyTorchModel, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(3, 16, generator=generator))
        model[1].bias.zero_()
    images = torch.rand(n, 1, 4, 4, generator=generator)
    labels = model(images).argmax(1)
    return model, PyTorchModel(model, bounds=(0.0, 1.0)), images, labels


def _grid(entry: AttackEntry) -> list[float | None]:
    epsilon = EPSILONS[entry.norm]
    return [epsilon, None] if entry.minimization else [epsilon, 100 * epsilon]


def _assert_checked(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    entry: AttackEntry,
    epsilons: Sequence[float | None],
    result: AttackResult,
) -> None:
    """Shapes as Foolbox's; every success misclassified, within epsilon and the bounds."""
    assert len(result.adversarials) == len(epsilons)
    assert result.success.shape == (len(epsilons), images.shape[0])
    assert result.success.dtype == torch.bool
    for adversarials, epsilon, success in zip(
        result.adversarials, epsilons, result.success, strict=True
    ):
        assert adversarials.shape == images.shape
        assert float(adversarials.min()) >= 0.0 and float(adversarials.max()) <= 1.0
        with torch.no_grad():
            predictions = model(adversarials).argmax(1)
        assert bool((predictions[success] != labels[success]).all())
        if epsilon is not None:
            distances = perturbation_norm(adversarials - images, entry.norm)[success]
            assert bool((distances <= epsilon * (1 + 1e-4) + 1e-4).all())


_PLAIN_IDS = sorted(
    {e.id for suite in (QUICK, MINIMAL) for e in suite.entries if not e.needs_starting_point}
)


@pytest.mark.parametrize("attack_id", _PLAIN_IDS)
def test_run_attack_quick_and_minimal_entries(attack_id: str) -> None:
    model, fmodel, images, labels = _setup()
    entry = get_attack(attack_id)
    epsilons = _grid(entry)
    result = run_attack(entry, fmodel, images, labels, epsilons)
    _assert_checked(model, images, labels, entry, epsilons, result)
    if entry.factory is not L2AdditiveGaussianNoiseAttack:  # noise is too weak to count on
        assert bool(result.success[-1].any())
    assert bool((result.success[0] <= result.success[-1]).all())  # larger budget breaks more


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_convergence_entries_rerun_pgd_longer(norm: str) -> None:
    from advdefense.attacks.catalog import CONVERGENCE_FACTOR

    short, long = get_attack(f"{norm}-pgd"), get_attack(f"{norm}-pgd-long")
    assert long.checks_convergence_of == short.id and long.restarts == CONVERGENCE_FACTOR
    assert long.build().steps == CONVERGENCE_FACTOR * short.build().steps
    assert {short.id, long.id} <= {entry.id for entry in get_suite("convergence").entries}
    model, fmodel, images, labels = _setup()
    epsilons = [EPSILONS[norm]]
    short_result = run_attack(short, fmodel, images, labels, epsilons)
    long_result = run_attack(long, fmodel, images, labels, epsilons)
    _assert_checked(model, images, labels, long, epsilons, long_result)
    assert int(long_result.success[0].sum()) >= int(short_result.success[0].sum())


def _starts(
    model: nn.Module, fmodel: PyTorchModel, images: torch.Tensor, labels: torch.Tensor, norm: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    pgd = run_attack(get_attack("l2-pgd"), fmodel, images, labels, [2.0])
    return best_starting_points(model, images, labels, pgd.adversarials, norm)


def _fast(entry: AttackEntry, **parameters: Any) -> AttackEntry:
    """The entry with fewer steps, for tests only (the suites keep Foolbox defaults)."""
    return dataclasses.replace(entry, parameters={**entry.parameters, **parameters})


@pytest.mark.parametrize(
    ("attack_id", "parameters"),
    [("l2-boundary", {"steps": 50}), ("l0-pointwise-x10", {})],
)
def test_starting_point_attacks_only_break_started_samples(
    attack_id: str, parameters: dict[str, Any]
) -> None:
    model, fmodel, images, labels = _setup()
    entry = _fast(get_attack(attack_id), **parameters)
    starts, mask = _starts(model, fmodel, images, labels, entry.norm)
    assert int(mask.sum()) >= 4
    mask[torch.nonzero(mask)[0]] = False  # a sample that has a start but is left out
    epsilons = _grid(entry)
    result = run_attack(entry, fmodel, images, labels, epsilons, starts, mask)
    _assert_checked(model, images, labels, entry, epsilons, result)
    assert bool(result.success[-1].any())
    assert not bool(result.success[:, ~mask].any())
    for adversarials in result.adversarials:
        assert torch.equal(adversarials[~mask], images[~mask])
    if entry.minimization:  # the minimal adversarial is no farther than its start
        distances = perturbation_norm(result.adversarials[-1] - images, entry.norm)
        start_distances = perturbation_norm(starts - images, entry.norm)
        assert bool((distances[mask] <= start_distances[mask] + 1e-6).all())


def test_bad_starts_are_skipped_and_clean_mistakes_kept() -> None:
    model, fmodel, images, labels = _setup()
    entry = _fast(get_attack("l2-boundary"), steps=20)
    starts, mask = _starts(model, fmodel, images, labels, "l2")
    wrong = labels.clone()
    first, second = torch.nonzero(mask).squeeze(1)[:2].tolist()
    wrong[first] = (labels[first] + 1) % 3  # the clean image is already a mistake
    starts[first] = images[first]
    starts[second] = images[second]  # claimed start, but classified correctly
    with pytest.warns(UserWarning, match="1 starting points are not misclassified"):
        result = run_with_starting_points(entry, fmodel, images, wrong, starts, mask, [0.5])
    assert bool(result.success[0, first]) and torch.equal(
        result.adversarials[0][first], images[first]
    )
    assert not bool(result.success[0, second])


class _Binarized(nn.Module):
    """A hard threshold before a linear layer: no autograd path from the scores to the input."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.linear((images > 0.5).float())
        return scores


@pytest.mark.parametrize("attack_id", ["linf-fgsm", "l2-deepfool", "l2-ddn"])
def test_models_without_input_gradient_get_zero_gradients(attack_id: str) -> None:
    model, _, images, _ = _setup()
    binarized = _Binarized(model).eval()
    labels = binarized(images).argmax(1)
    entry = get_attack(attack_id)
    epsilons = _grid(entry)
    fmodel = PyTorchModel(binarized, bounds=(0.0, 1.0))
    result = run_attack(entry, fmodel, images, labels, epsilons)
    _assert_checked(binarized, images, labels, entry, epsilons, result)
    if attack_id in ("linf-fgsm", "l2-deepfool"):  # zero gradient: no step at all
        assert not bool(result.success.any())
        assert all(torch.equal(adversarials, images) for adversarials in result.adversarials)


def test_run_attack_argument_errors() -> None:
    _, fmodel, images, labels = _setup()
    with pytest.raises(InputError, match="fixed-epsilon attack"):
        run_attack(get_attack("linf-pgd"), fmodel, images, labels, [None])
    with pytest.raises(InputError, match="not be empty"):
        run_attack(get_attack("l2-ddn"), fmodel, images, labels, [])
    with pytest.raises(InputError, match="needs starting points"):
        run_attack(get_attack("l2-boundary"), fmodel, images, labels, [None])
    with pytest.raises(InputError, match="does not take starting points"):
        run_attack(get_attack("l2-ddn"), fmodel, images, labels, [None], starting_points=images)
    with pytest.raises(InputError, match="does not take starting points"):
        run_with_starting_points(
            get_attack("l2-ddn"), fmodel, images, labels, images, labels == labels, [None]
        )
    with pytest.raises(InputError, match="mask must be a bool vector"):
        run_attack(get_attack("l2-boundary"), fmodel, images, labels, [None], images, labels)


def test_best_starting_points_picks_the_closest_misclassified_candidate() -> None:
    model, fmodel, images, labels = _setup()
    far = run_attack(get_attack("l2-pgd"), fmodel, images, labels, [3.0]).adversarials[0]
    near = run_attack(get_attack("l2-ddn"), fmodel, images, labels, [None]).adversarials[0]
    broken = far.clone()
    broken[0] = float("nan")
    candidates = [images, broken, near * 1.5 - 0.25, near]  # the third leaves [0, 1]
    starts, mask = best_starting_points(model, images, labels, candidates, "l2")
    for i in range(images.shape[0]):
        best, best_distance = images[i], float("inf")
        for candidate in candidates:
            point = candidate[i].clamp(0, 1)
            if torch.isfinite(candidate[i]).all() and int(model(point[None]).argmax()) != labels[i]:
                distance = float((point - images[i]).norm())
                if distance < best_distance:
                    best, best_distance = point, distance
        assert bool(mask[i]) == (best_distance < float("inf"))
        assert torch.allclose(starts[i], best)
    assert bool(mask.any()) and float(starts.min()) >= 0 and float(starts.max()) <= 1
    with pytest.raises(InputError, match="candidate 0 has shape"):
        best_starting_points(model, images, labels, [images[:2]], "l2")


class _RandomScale(MinimizationAttack):
    """Moves each image a random fraction towards another image; records every output."""

    distance = l2
    outputs: ClassVar[list[torch.Tensor]] = []

    def run(
        self, model: Any, inputs: Any, criterion: Any, *, early_stop: Any = None, **kwargs: Any
    ) -> Any:
        images = inputs.raw  # Foolbox hands run() EagerPy tensors
        scale = 2 * torch.rand(images.shape[0], 1, 1, 1)
        output = (images + scale * (images.roll(1, 0) - images)).clamp(0, 1)
        self.outputs.append(output)
        return ep.astensor(output)


def test_restarts_keep_the_smallest_successful_adversarial() -> None:
    model, fmodel, images, labels = _setup()
    entry = AttackEntry(
        "random-scale", "l2", _RandomScale, MappingProxyType({}), "test double", restarts=6
    )
    _RandomScale.outputs.clear()
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    result = run_attack(entry, fmodel, images, labels, [None, 0.3], generator_seed=3)
    assert torch.equal(torch_state, torch.get_rng_state())  # the caller's RNG is untouched
    assert np.array_equal(numpy_state[1], np.random.get_state()[1])
    assert len(_RandomScale.outputs) == 6
    outputs = torch.stack(_RandomScale.outputs)  # restarts x N x ...
    with torch.no_grad():
        fooled = torch.stack([model(output).argmax(1) != labels for output in outputs])
    distances = torch.stack([perturbation_norm(output - images, "l2") for output in outputs])
    distances[~fooled] = float("inf")
    best = distances.argmin(0)
    assert torch.equal(result.success[0], fooled.any(0))
    assert bool(result.success[0].any()) and not bool(result.success[0].all())
    for i in torch.nonzero(result.success[0]).squeeze(1).tolist():
        assert torch.equal(result.adversarials[0][i], outputs[best[i], i])
    _assert_checked(model, images, labels, entry, [None, 0.3], result)
    again = run_attack(entry, fmodel, images, labels, [None, 0.3], generator_seed=3)
    assert all(
        torch.equal(a, b) for a, b in zip(result.adversarials, again.adversarials, strict=True)
    )


# ---------------------------------------------------------------- slow: numba compiles each norm


@pytest.mark.slow
@pytest.mark.parametrize(
    "attack_id",
    [
        "l2-brendel-bethge",
        "l1-brendel-bethge",
        "linf-brendel-bethge",
        "l0-brendel-bethge-from-pgd",
        "l2-brendel-bethge-from-pgd",
    ],
)
def test_brendel_bethge_from_starting_points(attack_id: str) -> None:
    model, fmodel, images, labels = _setup()
    entry = _fast(get_attack(attack_id), steps=10)
    if entry.start_from is not None:
        pgd = get_attack(entry.start_from)
        candidates = run_attack(pgd, fmodel, images, labels, [100 * EPSILONS[pgd.norm]])
        starts, mask = best_starting_points(
            model, images, labels, candidates.adversarials, entry.norm
        )
    else:
        starts, mask = _starts(model, fmodel, images, labels, entry.norm)
    mask[torch.nonzero(mask)[0]] = False
    epsilons = _grid(entry)
    result = run_attack(entry, fmodel, images, labels, epsilons, starts, mask)
    _assert_checked(model, images, labels, entry, epsilons, result)
    assert bool(result.success[-1].any())
    assert not bool(result.success[:, ~mask].any())


class _BinarizedLinear(nn.Module):
    """A linear classifier on its input thresholded at 0.5 (hard, or a sigmoid stand-in)."""

    def __init__(self, linear: nn.Linear, sigmoid_alpha: float | None) -> None:
        super().__init__()
        self.binarize = Binarization(0.5, sigmoid_alpha=sigmoid_alpha)
        self.linear = linear

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.binarize(images.flatten(1)))


@pytest.mark.parametrize(
    ("attack_id", "classes"), [("linf-pgd-long", 3), ("linf-margin-all-targets", 4)]
)
def test_the_defended_model_judges_what_a_surrogate_attack_keeps(
    attack_id: str, classes: int
) -> None:
    """Restarts and targets run on a sigmoid surrogate are chosen by the real hard-threshold
    model: the surrogate's verdict dropped about half of the real breaks (audit, 2026-12-03)."""
    torch.manual_seed(1)
    linear = nn.Linear(16, classes)
    real = _BinarizedLinear(linear, None).eval()
    surrogate = PyTorchModel(_BinarizedLinear(linear, 10.0).eval(), bounds=(0.0, 1.0))
    images = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = real(images).argmax(1)
    entry = _fast(get_attack(attack_id), steps=20)
    judged = run_attack(
        entry, surrogate, images, labels, [0.12], judge=PyTorchModel(real, bounds=(0.0, 1.0))
    )
    unjudged = run_attack(entry, surrogate, images, labels, [0.12])
    with torch.no_grad():
        breaks = real(judged.adversarials[0]).argmax(1) != labels
        breaks_before = real(unjudged.adversarials[0]).argmax(1) != labels
    assert torch.equal(judged.success[0], breaks)  # success is the real model's verdict
    assert int(breaks.sum()) > int(breaks_before.sum()) + 10
    assert bool((breaks | ~breaks_before).all())  # nothing the surrogate's choice broke is lost
    assert bool((perturbation_norm(judged.adversarials[0] - images, "linf") <= 0.12 + 1e-6).all())
