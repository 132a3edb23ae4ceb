"""The time limit on Brendel-Bethge's solver (bethgelab/foolbox#583: it can loop forever)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from foolbox.attacks.brendel_bethge import LinfinityBrendelBethgeAttack, LinfOptimizer
from foolbox.models.pytorch import PyTorchModel
from torch import nn

from advdefense.attacks.catalog import BB_SOLVER_TIMEOUT, AttackEntry, get_attack
from advdefense.attacks.solver_watchdog import (
    AttackStalledWarning,
    Solver,
    WatchedSolver,
    stalled_positions,
)
from advdefense.attacks.starting_points import best_starting_points, run_attack
from advdefense.attacks.suites import AttackSuite
from advdefense.errors import InputError
from advdefense.evaluation.runner import run_minimal
from advdefense.evaluation.sanity import result_flags
from advdefense.evaluation.store import ResultStore
from advdefense.evaluation.summary import summarize_minimal

TIMEOUT = 1.0  # seconds; the stalling solver below never returns, so any limit is reached


class _Stalls:
    """A solver that never returns for one original (``stalls_on``) and steps by +0.25 elsewhere."""

    def __init__(self, stalls_on: np.ndarray, solver: Solver | None = None) -> None:
        self.stalls_on = np.asarray(stalls_on, dtype=np.float64).ravel()
        self.solver = solver

    def solve(self, x0, x, b, min_, max_, c, r):  # type: ignore[no-untyped-def]
        if np.array_equal(np.asarray(x0, dtype=np.float64), self.stalls_on):
            while True:
                pass
        if self.solver is not None:
            return self.solver.solve(x0, x, b, min_, max_, c, r)
        return np.full_like(x0, 0.25)


class _Raises:
    def solve(self, *args: object) -> np.ndarray:
        raise ValueError("the solver's own error")


_Request = tuple[np.ndarray, np.ndarray, np.ndarray, float, float, float, float]


def _request(x0: np.ndarray) -> _Request:
    return x0, x0.copy(), np.ones_like(x0), 0.0, 1.0, 0.1, 0.5


def test_a_stalled_solve_is_abandoned_and_its_sample_skipped_from_then_on() -> None:
    batch = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    watched = WatchedSolver(_Stalls(batch[1]), TIMEOUT)
    try:
        assert np.array_equal(watched.solve(*_request(batch[0])), np.full(4, 0.25, np.float32))
        step = watched.solve(*_request(batch[1]))
        assert np.array_equal(step, np.zeros(4, np.float32))  # no step: Foolbox's "converged"
        assert watched._worker is None  # the stuck worker was killed
        assert np.array_equal(watched.solve(*_request(batch[1])), np.zeros(4, np.float32))
        assert watched._worker is None  # answered at once, without a worker
        assert np.array_equal(watched.solve(*_request(batch[2])), np.full(4, 0.25, np.float32))
        assert watched._worker is not None  # a fresh worker serves the other samples
    finally:
        watched.close()
    assert watched._worker is None
    assert stalled_positions(watched.stalled, batch) == [1]
    assert stalled_positions(watched.stalled, batch.astype(np.float64).reshape(3, 2, 2)) == [1]


def test_the_solvers_own_errors_reach_the_caller() -> None:
    watched = WatchedSolver(_Raises(), TIMEOUT)
    try:
        with pytest.raises(ValueError, match="the solver's own error"):
            watched.solve(*_request(np.zeros(3, np.float32)))
    finally:
        watched.close()
    with pytest.raises(ValueError, match="timeout"):
        WatchedSolver(_Raises(), 0.0)


def test_brendel_bethge_entries_are_watched_and_timeouts_are_checked() -> None:
    bb = [entry for entry in map(get_attack, _BB_IDS)]
    assert {entry.solver_timeout for entry in bb} == {BB_SOLVER_TIMEOUT}
    assert all("solver_timeout" not in entry.to_json() for entry in bb)  # not in record keys
    assert get_attack("l2-boundary").solver_timeout is None
    with pytest.raises(InputError, match="solver_timeout"):
        dataclasses.replace(bb[0], solver_timeout=-1.0)


_BB_IDS = (
    "l2-brendel-bethge",
    "linf-brendel-bethge",
    "l1-brendel-bethge",
    "l0-brendel-bethge-from-pgd",
    "l1-brendel-bethge-from-pgd",
    "l2-brendel-bethge-from-pgd",
    "linf-brendel-bethge-from-pgd",
)


def _toy(n: int = 8) -> tuple[nn.Module, PyTorchModel, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    linear = model[1]
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(3, 16, generator=generator))
        linear.bias.zero_()
    images = torch.rand(n, 1, 4, 4, generator=generator)
    with torch.no_grad():
        labels = model(images).argmax(1)
    return model, PyTorchModel(model, bounds=(0.0, 1.0)), images, labels


def _stalling_entry(stalls_on: torch.Tensor) -> AttackEntry:
    """L-inf Brendel-Bethge, 10 steps, whose real solver never returns on ``stalls_on``."""

    class StallingLinfBrendelBethge(LinfinityBrendelBethgeAttack):
        def instantiate_optimizer(self):  # type: ignore[no-untyped-def]
            return _Stalls(stalls_on.numpy(), LinfOptimizer())  # type: ignore[no-untyped-call]

    return dataclasses.replace(
        get_attack("linf-brendel-bethge"),
        factory=StallingLinfBrendelBethge,
        parameters={"steps": 10},
        solver_timeout=TIMEOUT,
    )


def test_run_attack_finishes_the_batch_when_one_sample_stalls() -> None:
    model, fmodel, images, labels = _toy()
    pgd = run_attack(get_attack("linf-pgd"), fmodel, images, labels, [1.0])
    starts, mask = best_starting_points(model, images, labels, pgd.adversarials, "linf")
    stuck = int(torch.nonzero(mask)[1])
    entry = _stalling_entry(images[stuck])
    with pytest.warns(AttackStalledWarning) as caught:
        result = run_attack(entry, fmodel, images, labels, [None], starts, mask)
    (stalled,) = [w.message for w in caught if isinstance(w.message, AttackStalledWarning)]
    assert stalled_positions(stalled.originals, images.numpy()) == [stuck]
    assert "bethgelab/foolbox#583" in str(stalled)
    assert bool(result.success[0][mask].all())  # the stuck sample keeps its start's adversarial
    distances = (result.adversarials[0] - images).abs().flatten(1).amax(1)
    start_distances = (starts - images).abs().flatten(1).amax(1)
    others = mask.clone()
    others[stuck] = False
    assert bool((distances[others] < start_distances[others]).any())  # the others went on


def test_the_report_flags_the_stalled_samples(tmp_path: Path) -> None:
    model, _, images, labels = _toy()
    stuck = 2
    suite = AttackSuite("t", "1", (get_attack("linf-pgd"), _stalling_entry(images[stuck])), "test")
    store = ResultStore(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttackStalledWarning)  # caught by the runner, not shown
        keys = run_minimal(
            model,
            images,
            labels,
            suite,
            store,
            model_name="toy",
            thresholds={"linf": 1.0},
            progress=False,
        )
    record = store.get(keys[-1])
    assert record is not None and record["error"] is None
    assert f"batch positions [{stuck}]" in record["solver_stalls"]
    summary = summarize_minimal(
        store, keys, model="toy", indices=range(len(images)), thresholds={"linf": 1.0}
    )
    flags = [flag for flag in result_flags(summary) if "did not return" in flag]
    assert len(flags) == 1 and flags[0].startswith("linf-brendel-bethge: ")
