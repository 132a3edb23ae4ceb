"""Automatic sanity checks whose failures appear as flags in every report (DESIGN.md §3.5).

Model checks run on clean samples before any attack; result checks read the summary. A flag is
a short sentence naming what looks wrong; an empty list means nothing did.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from advdefense.attacks.catalog import ATTACKS, CONVERGENCE_FACTOR, AttackEntry
from advdefense.attacks.norms import Norm
from advdefense.declaration import declaration_of
from advdefense.evaluation.summary import AttackResult, FixedSummary, ModelSummary, broken_at
from advdefense.modes import device_of, evaluation_mode

__all__ = ["model_flags", "result_flags"]

UNBOUNDED_SUCCESS = 0.98
SUCCESS_DROP_TOLERANCE = 0.01


def model_flags(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Checks on the model itself, on a few clean samples (the model's mode is restored).

    Gradients are checked on what gradient attacks differentiate: the model, or the surrogates
    of a defense that declares some (:mod:`advdefense.declaration`); the harness keeps the best
    result over surrogates, so a sample is flagged only when every surrogate's gradient is zero.
    """
    flags = []
    if model.training:
        flags.append("model was handed over in training mode (evaluated in eval mode)")
    device = device_of(model)
    images = images[:32].to(device)
    labels = labels[:32].to(device)
    with evaluation_mode(model):
        with torch.no_grad():
            first, second = model(images), model(images)
        if not torch.equal(first, second):
            flags.append("randomized output: two identical forward passes differ (use EOT attacks)")
        rows = first.sum(1)
        if bool((first >= 0).all()) and torch.allclose(rows, torch.ones_like(rows), atol=1e-4):
            flags.append(
                "outputs look like probabilities (rows are non-negative and sum to 1): "
                "gradient attacks on softmax outputs can vanish; return logits"
            )
        declaration = declaration_of(model)
        attacked = dict(declaration.surrogates) or {"": model}
        no_gradient = torch.ones(len(images), dtype=torch.bool, device=device)
        for name, target in attacked.items():
            gradient = _input_gradient(target, images, labels)
            if not bool(torch.isfinite(gradient).all()):
                where = f" through surrogate {name}" if name else ""
                flags.append(f"input gradients{where} on clean samples are not finite")
            no_gradient &= gradient.flatten(1).abs().sum(1) == 0
        if bool(no_gradient.any()):
            where = " through every surrogate" if declaration.surrogates else ""
            hint = "a better surrogate" if declaration.surrogates else "a BPDA surrogate"
            flags.append(
                f"zero input gradients{where} on {int(no_gradient.sum())} of {len(images)} "
                f"clean samples (gradient masking? declare {hint} in attack_declaration)"
            )
    return flags


def _input_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The cross-entropy gradient at the inputs (zeros where no gradient reaches them)."""
    inputs = images.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(model(inputs), labels)
        (gradient,) = torch.autograd.grad(loss, inputs, allow_unused=True)
    return torch.zeros_like(inputs) if gradient is None else gradient


def _failure_flags(attack_id: str, errors: Sequence[str], stalls: Sequence[str]) -> list[str]:
    """Batches an attack raised on, and samples whose solver it abandoned."""
    return [
        *(
            f"{attack_id} raised on some batches (counted as not broken; rerunning the command "
            f"retries a batch it raised on everywhere): {e}"
            for e in errors
        ),
        *(f"{attack_id}: {stalled}" for stalled in stalls),
    ]


def fixed_result_flags(summary: FixedSummary) -> list[str]:
    """Checks on a fixed-mode evaluation's records."""
    failures = [
        flag
        for attack_id in summary.seconds_by_attack
        for flag in _failure_flags(
            attack_id,
            summary.errors.get(attack_id, ()),
            summary.solver_stalls.get(attack_id, ()),
        )
    ]
    return [*failures, *_fixed_convergence_flags(summary)]


def _fixed_convergence_flags(summary: FixedSummary) -> list[str]:
    """§3.5 in fixed mode: a ``*-pgd-long`` entry run after the attack it reruns attacks only
    the samples that one (and any before it) left robust, so each sample it breaks is one
    more than the shorter run broke."""
    order = list(summary.seconds_by_attack)  # the run's attack order
    flags = []
    for position, attack_id in enumerate(order):
        entry = ATTACKS.get(attack_id)
        shorter = entry.checks_convergence_of if entry is not None else None
        if shorter is None or shorter not in order[:position]:
            continue
        extra = summary.broken_by.count(attack_id)
        if extra > _tolerance(summary):
            flags.append(_not_converged(shorter, attack_id, extra, summary.n))
    return flags


def result_flags(summary: ModelSummary) -> list[str]:
    """Checks on the evaluation's results."""
    flags = []
    if summary.pending:
        flags.append(
            f"incomplete run: no results yet for {', '.join(summary.pending)} (left out of "
            "every number, including the worst case)"
        )
    for attack in summary.attacks.values():
        flags.extend(_failure_flags(attack.attack_id, attack.errors, attack.solver_stalls))
        zero = float((attack.distances > 0).mean()) if attack.distances.size else math.nan
        if not math.isclose(zero, summary.clean_accuracy, abs_tol=1e-9):
            flags.append(
                f"{attack.attack_id}: accuracy at epsilon 0 ({zero:.3f}) differs from clean "
                f"accuracy ({summary.clean_accuracy:.3f})"
            )
        # Random starts and noise draws make a sample or two flip between grid points; a drop
        # of more than 1% of the samples means the attack itself is unreliable on this model.
        if attack.grid_success is not None and any(
            earlier - later > _tolerance(summary)
            for earlier, later in itertools.pairwise(attack.grid_success)
        ):
            flags.append(
                f"{attack.attack_id}: raw success fell as epsilon grew "
                f"({list(attack.grid_success)}): the attack is unreliable on this model"
            )
    for norm, result in summary.norms.items():
        unbounded = [a for a in summary.attacks.values() if a.norm == norm and a.grid is None]
        if not unbounded or not result.distances.size:
            continue
        success = float(math.fsum(1 for d in result.distances if math.isfinite(d)))
        rate = success / result.distances.size
        if rate < UNBOUNDED_SUCCESS:
            flags.append(
                f"{norm}: unbounded attacks broke only {100 * rate:.1f}% of samples "
                "(expected ~100%): gradient masking or too few iterations"
            )
    flags.extend(_ordering_flags(summary))
    flags.extend(_convergence_flags(summary))
    return flags


def _tolerance(summary: ModelSummary | FixedSummary) -> float:
    """Samples by which two attacks (or grid points) may differ by chance: max(1, 1% of n)."""
    return max(1.0, SUCCESS_DROP_TOLERANCE * summary.n)


def _convergence_flags(summary: ModelSummary) -> list[str]:
    """More steps and restarts must change little (DESIGN.md §3.5): each ``*-pgd-long`` entry
    against the attack it reruns, when both ran."""
    flags = []
    for result in summary.attacks.values():
        entry = ATTACKS.get(result.attack_id)
        if entry is None or entry.checks_convergence_of not in summary.attacks:
            continue
        shorter = summary.attacks[entry.checks_convergence_of]
        extra = _broken(result) - _broken(shorter)
        if extra > _tolerance(summary):
            flags.append(_not_converged(shorter.attack_id, result.attack_id, extra, summary.n))
    return flags


def _not_converged(shorter: str, longer: str, extra: int, n: int) -> str:
    return (
        f"{shorter} has not converged: {longer} ({CONVERGENCE_FACTOR}x the steps, "
        f"{CONVERGENCE_FACTOR} restarts) breaks {extra} more of {n} samples within the "
        "threshold; the worst case counts both, but give the other iterative attacks more "
        "steps too"
    )


def _ordering_flags(summary: ModelSummary) -> list[str]:
    """Per norm, at its threshold: iterative gradient attacks must beat single-step ones, and
    white-box attacks must beat black-box ones (Carlini et al. 2019's checklist; DESIGN.md §3.5).

    Either failing means the gradients mislead the attacks (masking, a bad surrogate) or the
    iterative attacks are misconfigured. Attacks not in the catalogue are not compared.
    """
    by_norm: dict[Norm, list[tuple[AttackEntry, AttackResult]]] = defaultdict(list)
    for result in summary.attacks.values():
        entry = ATTACKS.get(result.attack_id)
        if entry is not None and result.distances.size:
            by_norm[result.norm].append((entry, result))
    tolerance = _tolerance(summary)
    flags = []
    for norm, pairs in by_norm.items():
        white_box_pairs = [(entry, result) for entry, result in pairs if entry.uses_gradients]
        white_box = [result for _, result in white_box_pairs]
        iterative = [result for entry, result in white_box_pairs if not entry.single_step]
        single_step = [result for entry, result in pairs if entry.single_step]
        black_box = [result for entry, result in pairs if entry.black_box]
        flags += _beaten(
            norm,
            single_step,
            iterative,
            ("single step", "iterative gradient attack"),
            "gradient masking, or too few steps or a bad step size",
            tolerance,
        )
        flags += _beaten(
            norm,
            black_box,
            white_box,
            ("black box", "white-box attack"),
            "the gradients mislead the white-box attacks (masking? try BPDA, EOT, margin losses)",
            tolerance,
        )
    return flags


def _beaten(
    norm: Norm,
    weaker: Sequence[AttackResult],
    stronger: Sequence[AttackResult],
    kinds: tuple[str, str],
    hint: str,
    tolerance: float,
) -> list[str]:
    """Flags for each of ``weaker`` that breaks more than ``tolerance`` samples more, within the
    threshold, than the strongest of ``stronger`` (the one breaking the most)."""
    if not stronger:
        return []
    best = max(stronger, key=_broken)
    flags = []
    for result in weaker:
        if _broken(result) - _broken(best) > tolerance:
            flags.append(
                f"{norm}: {result.attack_id} ({kinds[0]}) leaves {100 * result.accuracy:.1f}% "
                f"where the strongest {kinds[1]}, {best.attack_id}, leaves "
                f"{100 * best.accuracy:.1f}%: {hint}"
            )
    return flags


def _broken(result: AttackResult) -> int:
    """How many samples ``result`` breaks within its threshold."""
    return int(broken_at(result.distances, result.threshold).sum())
