"""Running one catalogue entry: starting points, restarts, and re-checked results.

:func:`run_attack` is the one call an evaluation runner needs for any :class:`AttackEntry`:

- a minimization attack (``entry.minimization``) runs once, unbounded (``epsilons=[None]``), and
  its adversarial is then clipped to each epsilon; a fixed-epsilon attack runs once per epsilon;
- an attack that refines an adversarial (``entry.needs_starting_point``: Boundary,
  Brendel-Bethge, Pointwise) gets one per sample through ``starting_points=``. Foolbox's own
  fallback initialisations raise as soon as they fail on one input of the batch (the Boundary
  attack's failed on 8 of 50 MNIST digits for the ABS CNN), so, as Brendel et al. (2019) do, the
  runner starts these attacks from the best adversarial earlier attacks found
  (:func:`best_starting_points`); samples without one are not attacked and count as not broken;
- ``entry.restarts`` independent runs, each under its own seed, keep per sample the successful
  adversarial of smallest norm ("Pointwise x 10", DIM paper Table 3).

Every adversarial is clipped to the epsilon ball of ``entry.norm`` and to the model's bounds, and
success is decided by a fresh forward pass, never by the attack's own flag. When the attacked
model is a stand-in (a BPDA or sigmoid surrogate of a binarizing defense), ``judge=`` names the
defended model: its forward pass decides success, and so which restart, and for an
:class:`~advdefense.attacks.adaptive.AllTargetsAttack` which target, each sample keeps.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from eagerpy.astensor import astensor, astensor_
from foolbox.models.base import Model
from foolbox.types import Bounds

from advdefense.attacks.adaptive import AllTargetsAttack
from advdefense.attacks.catalog import AttackEntry
from advdefense.attacks.norms import Norm, perturbation_norm
from advdefense.attacks.solver_watchdog import watched_solver
from advdefense.errors import InputError
from advdefense.validation import check_images, check_labels

__all__ = ["AttackResult", "best_starting_points", "run_attack", "run_with_starting_points"]

Classifier = Callable[[torch.Tensor], torch.Tensor]
Epsilons = Sequence[float | None]

T = TypeVar("T")

_NORM_TOLERANCE = 1e-5  # relative and absolute slack when checking a norm against its epsilon


class AttackResult(NamedTuple):
    """What a Foolbox call returns, re-checked: one entry per epsilon.

    ``adversarials[e]`` is N x ... and lies within ``epsilons[e]`` (no clipping for ``None``) and
    the model's bounds; ``success[e, i]`` says whether sample ``i`` is misclassified there.
    """

    adversarials: list[torch.Tensor]
    success: torch.Tensor


@torch.no_grad()
def _misclassified(model: Classifier, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    predictions: torch.Tensor = model(inputs).argmax(1)
    return predictions != labels


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample mask broadcastable against ``like`` (N x ...)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _finite_rows(tensor: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(tensor).flatten(1).all(1)


def best_starting_points(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    norm: Norm,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the closest candidate in ``norm`` that ``model`` misclassifies.

    Candidates (each N x ..., e.g. the adversarials of earlier attacks) are clipped to ``bounds``
    and checked with a fresh forward pass. Returns the starting points (the image itself where
    no candidate qualifies) and a bool mask of the samples that have one.
    """
    best = images.clone()
    best_distance = torch.full((images.shape[0],), math.inf, device=images.device)
    for index, candidate in enumerate(candidates):
        if candidate.shape != images.shape:
            raise InputError(
                f"candidate {index} has shape {tuple(candidate.shape)}, "
                f"expected {tuple(images.shape)} like the images"
            )
        candidate = candidate.to(device=images.device, dtype=images.dtype)
        finite = _finite_rows(candidate)
        candidate = torch.where(_rows(finite, candidate), candidate, images).clamp(*bounds)
        valid = finite & _misclassified(model, candidate, labels)
        distance = perturbation_norm(candidate - images, norm).to(best_distance.dtype)
        better = valid & (distance < best_distance)
        best = torch.where(_rows(better, best), candidate, best)
        best_distance = torch.where(better, distance, best_distance)
    return best, torch.isfinite(best_distance)


def _project(
    images: torch.Tensor, adversarials: torch.Tensor, norm: Norm, epsilon: float
) -> torch.Tensor:
    """Clip the perturbation to the ``norm`` ball of radius ``epsilon`` (L0: keep the largest)."""
    delta = adversarials - images
    if norm == "linf":
        return images + delta.clamp(-epsilon, epsilon)
    if norm == "l0":
        flat = delta.flatten(1)
        keep = min(math.floor(epsilon + 1e-9), flat.shape[1])
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if keep > 0:
            mask.scatter_(1, flat.abs().topk(keep, dim=1).indices, True)
        return images + (flat * mask).view_as(delta)
    factor = (epsilon / perturbation_norm(delta, norm).clamp_min(1e-12)).clamp(max=1.0)
    return images + delta * _rows(factor, delta)


def _finalize(
    fmodel: Model,
    images: torch.Tensor,
    labels: torch.Tensor,
    adversarials: torch.Tensor,
    norm: Norm,
    epsilon: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip to epsilon and bounds; success from a fresh forward pass and the measured norm."""
    finite = _finite_rows(adversarials)
    clipped = torch.where(_rows(finite, adversarials), adversarials, images)
    if epsilon is not None:
        clipped = _project(images, clipped, norm, epsilon)
    lower, upper = fmodel.bounds
    clipped = clipped.clamp(lower, upper)
    success = finite & _misclassified(fmodel, clipped, labels)
    if epsilon is not None:
        distance = perturbation_norm(clipped - images, norm)
        success &= distance <= epsilon * (1 + _NORM_TOLERANCE) + _NORM_TOLERANCE
    return clipped, success


class _ZeroGradientFallback(Model):
    """``model`` with a zero-valued path from input to scores, so gradients are 0, not missing.

    A hard threshold (binarization) has zero gradient almost everywhere, but PyTorch builds no
    graph through it and Foolbox's gradient attacks then fail on a missing gradient. With this
    wrapper they see the true zero gradient and fail to find adversarials (gradient masking,
    which the sanity checks flag and BPDA addresses).
    """

    def __init__(self, model: Model) -> None:
        self._model = model
        self.data_format = getattr(model, "data_format", None)

    @property
    def bounds(self) -> Bounds:
        return self._model.bounds

    def __call__(self, inputs: T) -> T:
        x, restore_type = astensor_(inputs)
        scores = astensor(self._model(x))
        return restore_type(scores + 0.0 * x.flatten(1).sum(axis=1, keepdims=True))


def _with_input_gradient(fmodel: Model, images: torch.Tensor) -> Model:
    """``fmodel``, wrapped in :class:`_ZeroGradientFallback` if no gradient reaches its input."""
    probe = images[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = fmodel(probe)
        if scores.requires_grad:
            (gradient,) = torch.autograd.grad(scores.sum(), probe, allow_unused=True)
            if gradient is not None:
                return fmodel
    return _ZeroGradientFallback(fmodel)


def _foolbox_outputs(
    entry: AttackEntry,
    fmodel: Model,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: Epsilons,
    starting_points: torch.Tensor | None = None,
    judge: Model | None = None,
) -> list[torch.Tensor]:
    """One Foolbox call; the (unchecked) adversarial for each epsilon (an all-targets attack
    keeps per sample the target ``judge`` finds misclassified).

    With ``entry.solver_timeout`` the attack's solver runs under a time limit
    (:func:`~advdefense.attacks.solver_watchdog.watched_solver`), which warns with an
    :class:`~advdefense.attacks.solver_watchdog.AttackStalledWarning` if it abandons samples.
    """
    attack = entry.build()
    if isinstance(attack, AllTargetsAttack):
        attack.judge = judge
    fmodel = _with_input_gradient(fmodel, images)
    extra = {} if starting_points is None else {"starting_points": starting_points}
    with watched_solver(attack, entry.solver_timeout):
        if entry.minimization:
            # MinimizationAttack.__call__ forwards ``starting_points`` to ``run``.
            _, adversarials, _ = attack(fmodel, images, labels, epsilons=[None], **extra)
            return [adversarials[0]] * len(epsilons)
        _, clipped, _ = attack(fmodel, images, labels, epsilons=list(epsilons), **extra)
        return list(clipped)


def _finalize_all(
    entry: AttackEntry,
    fmodel: Model,
    images: torch.Tensor,
    labels: torch.Tensor,
    raw: list[torch.Tensor],
    epsilons: Epsilons,
) -> AttackResult:
    checked = [
        _finalize(fmodel, images, labels, adversarials, entry.norm, epsilon)
        for adversarials, epsilon in zip(raw, epsilons, strict=True)
    ]
    return AttackResult([adv for adv, _ in checked], torch.stack([ok for _, ok in checked]))


def run_with_starting_points(
    entry: AttackEntry,
    fmodel: Model,
    images: torch.Tensor,
    labels: torch.Tensor,
    starting_points: torch.Tensor,
    mask: torch.Tensor,
    epsilons: Epsilons,
    judge: Model | None = None,
) -> AttackResult:
    """One run of a starting-point attack on the samples ``mask`` selects.

    Samples outside ``mask``, or whose start is not misclassified (by ``fmodel``, the model
    the attack refines on), are not attacked: their adversarial is the input and their success
    False. A start equal to the input (a clean mistake) is returned as it is, at distance 0.
    Success is decided by ``judge`` (default ``fmodel``).
    """
    if not entry.needs_starting_point:
        raise InputError(f"attack {entry.id!r} does not take starting points; use run_attack")
    _check_starts(images, starting_points, mask)
    starts = starting_points.to(images.device).clamp(*fmodel.bounds)
    mask = mask.to(images.device)
    valid = mask & _finite_rows(starts) & _misclassified(fmodel, starts, labels)
    if bool((mask & ~valid).any()):
        warnings.warn(
            f"{entry.id}: {int((mask & ~valid).sum())} starting points are not misclassified "
            "(or not finite); those samples are not attacked",
            stacklevel=2,
        )
    active = valid & (perturbation_norm(starts - images, "linf") > 0)
    raw = [torch.where(_rows(valid, images), starts, images) for _ in epsilons]
    if bool(active.any()):
        index = active.nonzero().squeeze(1)
        outputs = _foolbox_outputs(
            entry, fmodel, images[index], labels[index], epsilons, starts[index], judge
        )
        for adversarials, output in zip(raw, outputs, strict=True):
            adversarials[index] = output.to(adversarials.dtype)
    result = _finalize_all(entry, judge or fmodel, images, labels, raw, epsilons)
    for adversarials in result.adversarials:
        adversarials[~valid] = images[~valid]
    return AttackResult(result.adversarials, result.success & valid)


def _check_starts(images: torch.Tensor, starting_points: torch.Tensor, mask: torch.Tensor) -> None:
    if starting_points.shape != images.shape:
        raise InputError(
            f"starting_points has shape {tuple(starting_points.shape)}, "
            f"expected {tuple(images.shape)} like the images"
        )
    if mask.dtype != torch.bool or mask.shape != (images.shape[0],):
        raise InputError(
            f"mask must be a bool vector of length {images.shape[0]}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )


def _check_epsilons(entry: AttackEntry, epsilons: Epsilons) -> tuple[float | None, ...]:
    grid = tuple(epsilons)
    if not grid:
        raise InputError("epsilons must not be empty; use [None] for an unbounded minimal search")
    for epsilon in grid:
        if epsilon is None:
            if not entry.minimization:
                raise InputError(
                    f"attack {entry.id!r} is a fixed-epsilon attack: give finite epsilons "
                    "(e.g. a grid up to the threshold) instead of None"
                )
        elif not (math.isfinite(epsilon) and epsilon >= 0):
            raise InputError(f"epsilons must be finite and >= 0 or None, got {epsilon!r}")
    return grid


def _restart_seed(generator_seed: int, restart: int) -> int:
    """Independent seeds per (seed, restart) pair, from NumPy's SeedSequence."""
    return int(np.random.SeedSequence([generator_seed, restart]).generate_state(1)[0])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU and CUDA) and NumPy's global RNG; restore both afterwards.

    Foolbox draws its noise from torch and Pointwise its pixel order from ``np.random``.
    """
    numpy_state = np.random.get_state()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


def _keep_better(
    images: torch.Tensor, norm: Norm, best: AttackResult, new: AttackResult
) -> AttackResult:
    """Per epsilon and sample, the successful result of smaller norm."""
    adversarials = []
    for index, (old, candidate) in enumerate(zip(best.adversarials, new.adversarials, strict=True)):
        closer = perturbation_norm(candidate - images, norm) < perturbation_norm(old - images, norm)
        take = new.success[index] & (~best.success[index] | closer)
        adversarials.append(torch.where(_rows(take, old), candidate, old))
    return AttackResult(adversarials, best.success | new.success)


def run_attack(
    entry: AttackEntry,
    fmodel: Model,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: Epsilons,
    starting_points: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    generator_seed: int = 0,
    judge: Model | None = None,
) -> AttackResult:
    """Run ``entry`` on a batch: build, seed, restart, start and re-check (see module doc).

    ``epsilons`` may contain ``None`` (unbounded) for minimization attacks only. Entries with
    ``needs_starting_point`` require ``starting_points`` (and optionally ``mask``, default all
    samples), e.g. from :func:`best_starting_points`; other entries refuse them. ``judge``
    (default ``fmodel``) decides success: pass the defended model when ``fmodel`` is its
    surrogate, so that no restart or target that breaks it is dropped for one that only
    fools the surrogate.
    """
    lower, upper = fmodel.bounds
    check_images(images, "images", bounds=(float(lower), float(upper)))
    check_labels(labels, "labels", batch_size=images.shape[0])
    grid = _check_epsilons(entry, epsilons)
    if entry.needs_starting_point and starting_points is None:
        raise InputError(
            f"attack {entry.id!r} needs starting points: pass the adversarials "
            + (f"of {entry.start_from!r}" if entry.start_from else "found by earlier attacks")
            + " through best_starting_points(...)"
        )
    if not entry.needs_starting_point and (starting_points is not None or mask is not None):
        raise InputError(f"attack {entry.id!r} does not take starting points")
    best: AttackResult | None = None
    for restart in range(entry.restarts):
        with _seeded(_restart_seed(generator_seed, restart)):
            if starting_points is None:
                raw = _foolbox_outputs(entry, fmodel, images, labels, grid, judge=judge)
                result = _finalize_all(entry, judge or fmodel, images, labels, raw, grid)
            else:
                if mask is None:
                    mask = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
                result = run_with_starting_points(
                    entry, fmodel, images, labels, starting_points, mask, grid, judge
                )
        best = result if best is None else _keep_better(images, entry.norm, best, result)
    assert best is not None  # restarts >= 1 is checked by AttackEntry
    return best
