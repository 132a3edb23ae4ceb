"""The evaluation runner: every attack of a suite on every sample, resumable, re-checked.

Two modes (DESIGN.md §3; AutoAttack's protocol for the second):

* **minimal** — each attack looks for the smallest adversarial it can: Foolbox minimization
  attacks once, unbounded; fixed-epsilon attacks on a grid of epsilons up to the largest
  threshold, the smallest success kept. Stored per sample and attack: the distance (0 when the
  clean sample is already misclassified, +inf when never broken) and the adversarial's label.
* **fixed** — one norm and epsilon; the attacks run in order on the samples still robust, and
  each broken sample records the attack that broke it.

Both batch internally, run on the model's device, evaluate in eval mode and give the model
back in the caller's mode, clip every adversarial to [0, 1], re-check it with a fresh forward
pass, and count forward/backward calls and wall time per attack and batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from foolbox.models.pytorch import PyTorchModel
from torch import nn
from tqdm.auto import tqdm

from advdefense.attacks.adaptive import AllTargetsAttack
from advdefense.attacks.catalog import AttackEntry
from advdefense.attacks.norms import Norm, perturbation_norm
from advdefense.attacks.solver_watchdog import AttackStalledWarning, stalled_positions
from advdefense.attacks.starting_points import best_starting_points, run_attack
from advdefense.attacks.suites import AttackSuite
from advdefense.declaration import declaration_of
from advdefense.errors import InputError
from advdefense.evaluation.counting import CallCounter
from advdefense.evaluation.store import ResultStore, model_fingerprint, record_key
from advdefense.evaluation.targets import AttackTarget, attack_targets, refine_binarized
from advdefense.modes import attack_mode, device_of, evaluation_mode
from advdefense.validation import check_images, check_labels, check_model_dtype, check_positive_int

__all__ = [
    "CallCounter",
    "entry_settings",
    "plan_minimal_keys",
    "ran_with",
    "record_settled",
    "run_fixed",
    "run_minimal",
]

NORM_TOLERANCE = 1e-5
SKIPPED = "skipped:"  # an attack's error when it has nothing to run on (final, never retried)
ProgressFactory = Callable[..., Any]


@dataclass(frozen=True)
class RunContext:
    """What identifies one model's evaluation in the store."""

    model_name: str
    fingerprint: str
    defense_config: dict[str, Any]
    seed: int
    batch_size: int
    has_surrogates: bool = False


def _batch_seed(seed: int, attack_id: str, indices: Sequence[int]) -> int:
    text = f"{seed}:{attack_id}:{indices[0] if indices else -1}:{len(indices)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _context(
    model: nn.Module, model_name: str, seed: int, batch_size: int, defense_config: dict[str, Any]
) -> RunContext:
    """A defense's declaration is part of its identity: attacking it through other surrogates
    gives other results (plain classifiers keep the keys they always had)."""
    declaration = declaration_of(model)
    if not declaration.is_default:
        defense_config = {**defense_config, "declaration": declaration.to_json()}
    return RunContext(
        model_name,
        model_fingerprint(model),
        defense_config,
        seed,
        batch_size,
        bool(declaration.surrogates),
    )


#: Who picks among the candidates of an attack run on a surrogate (:func:`_selection_fields`);
#: run files record it per binarizing model, so entries finished before it are redone.
SURROGATE_SELECTION = "judged by the defended model"


def picks_among_candidates(entry: AttackEntry) -> bool:
    """Whether ``entry``, run on a defense's surrogates, keeps one of several adversarials per
    sample (restarts, or one per target class), so that who judges them matters."""
    factory = entry.factory
    picks = entry.restarts > 1 or (
        isinstance(factory, type) and issubclass(factory, AllTargetsAttack)
    )
    return picks and entry.uses_gradients and entry.score_view is None


def _selection_fields(context: RunContext, entry: AttackEntry) -> dict[str, Any]:
    """Key fields naming who picks among an attack's candidates on a surrogate.

    An entry with restarts, or an all-targets attack, keeps one of several adversarials per
    sample. Run on a surrogate, it picked by the surrogate's verdict until 2026-12-03, and so
    dropped adversarials that broke the defended model; now the defended model judges. Its
    records carry that in their key, so the older ones run again; nothing else changes key.
    """
    if context.has_surrogates and picks_among_candidates(entry):
        return {"selection": SURROGATE_SELECTION}
    return {}


def _entry_fields(entry: AttackEntry) -> dict[str, Any]:
    """What identifies the attack in a record (and its key): id, norm, class, parameters."""
    description = entry.to_json()
    return {
        "attack": entry.id,
        "norm": entry.norm,
        "attack_class": description["attack"],
        "parameters": description["parameters"],
        "restarts": entry.restarts,
        "start_from": entry.start_from,
    }


#: The fields of a record that say how its attack ran (its class may move between modules).
_SETTINGS = ("norm", "parameters", "restarts", "start_from")


def entry_settings(entry: AttackEntry) -> dict[str, Any]:
    """``entry``'s norm, parameters, restarts and starting points as a record stores them
    (through JSON, so tuples compare as lists)."""
    fields = json.loads(json.dumps(_entry_fields(entry)))
    return {field: fields[field] for field in _SETTINGS}


def ran_with(record: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """Whether ``record`` was computed with these :func:`entry_settings` (False after any of
    them changed under the same suite version)."""
    return all(record.get(field) == value for field, value in settings.items())


def _grid(threshold: float, points: int) -> list[float]:
    return [threshold * step / points for step in range(1, points + 1)]


def _check_label_range(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Labels must name one of the model's classes: a label beyond them makes every sample
    count as broken (decision attacks) or crashes (gradient attacks)."""
    check_model_dtype(images, model)
    with torch.no_grad(), evaluation_mode(model):
        classes = int(model(images[:1].to(device_of(model))).shape[1])
    check_labels(labels, "labels", batch_size=images.shape[0], num_classes=classes)


def _validated(images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int]) -> None:
    check_images(images, "images")
    check_labels(labels, "labels", batch_size=images.shape[0])
    if len(indices) != images.shape[0]:
        raise InputError(
            f"indices has {len(indices)} entries but there are {images.shape[0]} images"
        )


@torch.no_grad()
def _recheck(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    adversarials: torch.Tensor,
    norm: Norm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clipped adversarials, their distance to the inputs, their predicted labels)."""
    clipped = adversarials.clamp(0.0, 1.0)
    distances = perturbation_norm(clipped - images, norm)
    predicted = model(clipped).argmax(1)
    return clipped, distances, predicted


@torch.no_grad()
def _other_class_images(
    counter: CallCounter, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per sample, the L2-nearest image of the batch that the model assigns another class.

    A valid starting adversarial for decision-based attacks whatever the model; samples with no
    such neighbour get their own image back (not adversarial, so never chosen as a start).
    """
    predicted = counter(images).argmax(1)
    flat = images.flatten(1)
    distances = torch.cdist(flat, flat)
    distances[predicted[None, :] == labels[:, None]] = math.inf
    nearest = distances.argmin(1)
    has_neighbour = torch.isfinite(distances.min(1).values)
    return torch.where(has_neighbour.view(-1, *[1] * (images.dim() - 1)), images[nearest], images)


def _starting_points(
    candidates: list[torch.Tensor],
    entry: AttackEntry,
    counter: CallCounter,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The smallest misclassified candidate per sample, for attacks that need a start.

    Candidates are the adversarials earlier attacks found (all of them, or only those of
    ``entry.start_from``) plus the nearest image the model puts in another class, so a start
    exists for nearly every sample even when the attack's own initialisation would fail.
    """
    if not entry.needs_starting_point:
        return None, None
    pool = [*candidates, _other_class_images(counter, images, labels)]
    return best_starting_points(counter, images, labels, pool, entry.norm)


def _start_sources(entries: Sequence[AttackEntry], position: int) -> list[int]:
    """Positions of the earlier entries whose adversarials ``entries[position]`` starts from:
    none, the one named by ``start_from`` (when it ran before), or every earlier one."""
    entry = entries[position]
    if not entry.needs_starting_point:
        return []
    if entry.start_from is not None:
        return [i for i in range(position) if entries[i].id == entry.start_from]
    return list(range(position))


def _entry_grid(
    entry: AttackEntry, thresholds: dict[Norm, float], grid_points: int
) -> list[float] | None:
    """The epsilons a fixed-epsilon attack runs at in minimal mode (None: run unbounded)."""
    return None if entry.minimization else _grid(thresholds[entry.norm], grid_points)


def _minimal_key(
    context: RunContext, entry: AttackEntry, batch_indices: list[int], grid: list[float] | None
) -> str:
    return record_key(
        mode="minimal",
        model=context.fingerprint,
        defense=context.defense_config,
        indices=batch_indices,
        seed=context.seed,
        grid=grid,
        **_entry_fields(entry),
        **_selection_fields(context, entry),
    )


def record_settled(store: ResultStore, key: str) -> bool:
    """Whether record ``key`` is stored for good: a record whose attack raised on every target
    it ran on (out of memory, say) is computed again by the next run that reaches it."""
    record = store.get(key)
    if record is None:
        return False
    if "failed" in record:
        return not record["failed"]
    # written before the field existed: a single-target attack that raised
    error = record.get("error")
    return not (error and not error.startswith(SKIPPED) and len(record.get("targets", ())) == 1)


def plan_minimal_keys(
    model: nn.Module,
    suite: AttackSuite,
    indices: Sequence[int],
    *,
    thresholds: dict[Norm, float],
    grid_points: int = 8,
    batch_size: int = 100,
    seed: int = 0,
    defense_config: dict[str, Any] | None = None,
) -> list[str]:
    """The record keys :func:`run_minimal` will produce with these arguments, in its order,
    without running anything (so a run in progress can be reported on)."""
    context = _context(model, "", seed, batch_size, defense_config or {})
    indices = list(indices)
    return [
        _minimal_key(
            context,
            entry,
            indices[start : start + batch_size],
            _entry_grid(entry, thresholds, grid_points),
        )
        for start in range(0, len(indices), batch_size)
        for entry in suite.entries
    ]


def run_minimal(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    suite: AttackSuite,
    store: ResultStore,
    *,
    model_name: str,
    thresholds: dict[Norm, float],
    indices: Sequence[int] | None = None,
    grid_points: int = 8,
    batch_size: int = 100,
    seed: int = 0,
    defense_config: dict[str, Any] | None = None,
    progress: bool = True,
    keep_adversarials: bool = False,
) -> list[str]:
    """Minimal-distance evaluation of every suite entry; returns the record keys, in order.

    A finished record whose adversarials file is gone (:meth:`ResultStore.lost`) is redone
    where they are needed: just before an attack still to run that starts from them and, with
    ``keep_adversarials`` (a detector will score them), everywhere.
    """
    indices = list(range(images.shape[0])) if indices is None else list(indices)
    _validated(images, labels, indices)
    _check_label_range(model, images, labels)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(grid_points, "grid_points")
    missing = sorted({entry.norm for entry in suite.entries} - set(thresholds))
    if missing:
        raise InputError(f"no threshold given for norm(s) {', '.join(missing)}")
    store.check_samples(indices, images, labels)
    context = _context(model, model_name, seed, batch_size, defense_config or {})
    device = device_of(model)
    keys: list[str] = []
    ticker = _PassTicker()
    with attack_mode(model):
        counter = CallCounter(model, ticker)
        foolbox_model = PyTorchModel(counter, bounds=(0.0, 1.0), device=device)
        starts = range(0, images.shape[0], batch_size)
        for start in starts:
            batch_indices = indices[start : start + batch_size]
            batch = images[start : start + batch_size].to(device)
            batch_labels = labels[start : start + batch_size].to(device)
            batch_keys = [
                _minimal_key(
                    context, entry, batch_indices, _entry_grid(entry, thresholds, grid_points)
                )
                for entry in suite.entries
            ]
            bar = tqdm(
                suite.entries,
                desc=f"{model_name} batch {start // batch_size + 1}/{len(starts)}",
                unit="attack",
                disable=not progress,
                leave=False,
                mininterval=0,  # attacks are few and slow: show each one, skipped ones too
            )
            attack = _MinimalBatch(
                suite.entries,
                batch_keys,
                store,
                context,
                foolbox_model,
                counter,
                ticker,
                batch,
                batch_labels,
                batch_indices,
                thresholds,
                grid_points,
            )
            for position, (entry, key) in enumerate(zip(bar, batch_keys, strict=True)):
                ticker.start(bar, entry.id)
                keys.append(key)
                if record_settled(store, key) and not (keep_adversarials and store.lost(key)):
                    continue
                attack(position, bar)
    return keys


@dataclass(frozen=True)
class _MinimalBatch:
    """Computes the records of one batch of a minimal-mode run, entry by entry.

    A record whose adversarials are lost (a fresh checkout) is redone only when an entry about
    to run starts from it, just before that entry: an attack that needs no starting point (C&W,
    say, resumed from its finished surrogates) runs first. Every attack is seeded by the run's
    seed, its own id and its batch, and nothing outside that seeded call draws random numbers,
    so the order changes no result.
    """

    entries: Sequence[AttackEntry]
    keys: Sequence[str]
    store: ResultStore
    context: RunContext
    foolbox_model: PyTorchModel
    counter: CallCounter
    ticker: _PassTicker
    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int]
    thresholds: dict[Norm, float]
    grid_points: int

    def __call__(self, position: int, bar: tqdm[Any]) -> None:
        """Compute and append the record of ``entries[position]``, after redoing the lost
        records it starts from."""
        entry, key = self.entries[position], self.keys[position]
        sources = _start_sources(self.entries, position)
        for source in sources:
            if self.store.lost(self.keys[source]):
                self(source, bar)
        self.ticker.start(bar, entry.id)
        grid = _entry_grid(entry, self.thresholds, self.grid_points)
        earlier = [self.store.adversarials(self.keys[source]) for source in sources]
        candidates = [
            adversarials.to(self.images.device)
            for adversarials in earlier
            if adversarials is not None
        ]
        record, adversarials = _minimal_batch(
            entry,
            self.foolbox_model,
            self.counter,
            self.images,
            self.labels,
            grid,
            _starting_points(candidates, entry, self.counter, self.images, self.labels),
            _batch_seed(self.context.seed, entry.id, self.indices),
            _FinishedTargets(self.store, key),
        )
        self.store.append(
            {
                "key": key,
                "mode": "minimal",
                "model": self.context.model_name,
                "model_fingerprint": self.context.fingerprint,
                "indices": self.indices,
                "seed": self.context.seed,
                **_entry_fields(entry),
                **_selection_fields(self.context, entry),
                **record,
            },
            adversarials.cpu(),
        )


class _PassTicker:
    """Shows in a progress bar's postfix how many forward passes the running attack has made.

    One attack on one batch can run for an hour (C&W-hc: 9,000 steps); without this its bar
    would sit at 0/1 all along. Redrawn at most once per ``interval`` seconds.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.passes = 0
        self._bar: tqdm[Any] | None = None
        self._label = ""
        self._shown = 0.0

    def start(self, bar: tqdm[Any], label: str) -> None:
        """Count from zero for a new attack named ``label``, shown on ``bar``."""
        self._bar, self._label, self.passes = bar, label, 0
        self._shown = time.monotonic()
        bar.set_postfix_str(label)

    def __call__(self) -> None:
        self.passes += 1
        now = time.monotonic()
        if self._bar is not None and now - self._shown >= self.interval:
            self._shown = now
            self._bar.set_postfix_str(f"{self._label}, {self.passes:,} passes")


@dataclass(frozen=True)
class _Attacked:
    """Candidate adversarials of one attack on one batch, from every target it ran on."""

    candidates: list[tuple[int, torch.Tensor]]  # (epsilon position, adversarials)
    targets: list[str]
    error: str | None
    resumed_seconds: float = 0.0  # wall time of targets finished by an earlier, killed run
    solver_stalls: str | None = None  # samples whose solver was abandoned, per target
    failed: bool = False  # it raised on every target: nothing was attacked, a rerun retries it


@dataclass(frozen=True)
class _TargetRun:
    """What one target contributed to an attack: adversarials per epsilon, or an error; and the
    samples whose solver it abandoned."""

    adversarials: list[torch.Tensor]
    error: str | None
    forward_calls: int
    backward_calls: int
    seconds: float
    solver_stalls: str | None = None


@dataclass(frozen=True)
class _FinishedTargets:
    """The targets of record ``key`` already attacked, kept in the store until the record is
    written (:meth:`ResultStore.save_part`): a killed run resumes at the target it was on.
    Foolbox's C&W through each of biCNN's six surrogates takes longer than a working session.
    """

    store: ResultStore
    key: str

    def load(self, target: str) -> _TargetRun | None:
        saved = self.store.part(self.key, target)
        if saved is None:
            return None
        tensors, info = saved
        return _TargetRun(
            [tensors[f"epsilon_{position}"] for position in range(info["epsilons"])],
            info["error"],
            info["forward_calls"],
            info["backward_calls"],
            info["seconds"],
            info.get("solver_stalls"),
        )

    def save(self, target: str, run: _TargetRun) -> None:
        info = {
            "epsilons": len(run.adversarials),
            "error": run.error,
            "forward_calls": run.forward_calls,
            "backward_calls": run.backward_calls,
            "seconds": run.seconds,
            "solver_stalls": run.solver_stalls,
        }
        tensors = {f"epsilon_{i}": found for i, found in enumerate(run.adversarials)}
        self.store.save_part(self.key, target, tensors, info)


def _attack_targets(
    entry: AttackEntry,
    foolbox_model: PyTorchModel,
    counter: CallCounter,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: list[float | None],
    *,
    starting_points: torch.Tensor | None,
    mask: torch.Tensor | None,
    generator_seed: int,
    finished: _FinishedTargets | None = None,
) -> _Attacked:
    """Run the attack on every target the defense declares for it (see
    :mod:`advdefense.evaluation.targets`), refine binarized adversarials, and collect them.

    An attack that raises on a target (e.g. no gradient reaches the input) contributes nothing
    from it; its error is stored and flagged in the report, as are the samples whose solver
    it abandoned (its adversarials still count). No target at all (the model lacks
    the entry's score view) yields the clean images and an error saying so. With several
    targets, each finished one is kept in ``finished`` and taken from there on a rerun (every
    run of an attack is seeded by ``generator_seed`` alone, so the result is the same).
    """
    declaration = declaration_of(counter.model)
    targets = attack_targets(entry, declaration, foolbox_model, images.device, counter.on_forward)
    if not targets:
        return _Attacked(
            [(position, images.clone()) for position in range(len(epsilons))],
            [],
            f"{SKIPPED} the model declares no score view {entry.score_view!r}",
        )
    keep = finished if len(targets) > 1 else None
    candidates: list[tuple[int, torch.Tensor]] = []
    errors: list[str] = []
    stalls: list[str] = []
    resumed_seconds = 0.0
    for target in targets:
        run = None if keep is None else keep.load(target.name)
        if run is None:
            forward_before, backward_before = counter.forward_calls, counter.backward_calls
            started = time.perf_counter()
            adversarials, error, stalled = _run_on_target(
                entry,
                target,
                foolbox_model,
                images,
                labels,
                epsilons,
                starting_points=starting_points,
                mask=mask,
                generator_seed=generator_seed,
                binarization_threshold=declaration.binarization_threshold,
            )
            if target.counter is not None:
                counter.add(target.counter)
            run = _TargetRun(
                adversarials,
                error,
                counter.forward_calls - forward_before,
                counter.backward_calls - backward_before,
                time.perf_counter() - started,
                stalled,
            )
            if keep is not None and run.error is None:  # a target that raised is retried
                keep.save(target.name, run)
        else:
            counter.add_calls(run.forward_calls, run.backward_calls)
            resumed_seconds += run.seconds
        where = "" if len(targets) == 1 else f"[{target.name}] "
        if run.solver_stalls is not None:
            stalls.append(f"{where}{run.solver_stalls}")
        if run.error is not None:
            errors.append(f"{where}{run.error}")
        candidates.extend(enumerate(found.to(images.device) for found in run.adversarials))
    if not candidates:
        candidates = [(position, images.clone()) for position in range(len(epsilons))]
    return _Attacked(
        candidates,
        [t.name for t in targets],
        "; ".join(errors) or None,
        resumed_seconds,
        "; ".join(stalls) or None,
        failed=len(errors) == len(targets),
    )


def _run_on_target(
    entry: AttackEntry,
    target: AttackTarget,
    foolbox_model: PyTorchModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilons: list[float | None],
    *,
    starting_points: torch.Tensor | None,
    mask: torch.Tensor | None,
    generator_seed: int,
    binarization_threshold: float | None,
) -> tuple[list[torch.Tensor], str | None, str | None]:
    """The attack's adversarials per epsilon on one target (refined on ``foolbox_model`` when
    the defense binarizes), or none and the error it raised; and a note naming the samples
    whose solver it abandoned, if any."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("always", AttackStalledWarning)
            adversarials, _ = run_attack(
                entry,
                target.foolbox_model,
                images,
                labels,
                epsilons,
                starting_points=starting_points,
                mask=mask,
                generator_seed=generator_seed,
                judge=None if target.foolbox_model is foolbox_model else foolbox_model,
            )
        if binarization_threshold is not None:
            adversarials = [
                refine_binarized(foolbox_model, images, labels, found, binarization_threshold)
                for found in adversarials
            ]
    except Exception as error:  # recorded in the store and shown as a report flag
        return [], f"{type(error).__name__}: {error}", None
    return list(adversarials), None, _stall_note(caught, images)


def _stall_note(caught: list[warnings.WarningMessage], images: torch.Tensor) -> str | None:
    """The :class:`AttackStalledWarning` among ``caught`` as one note naming batch positions;
    every other warning is shown as usual."""
    notes = []
    for message in caught:
        stalled = message.message
        if not isinstance(stalled, AttackStalledWarning):
            warnings.showwarning(
                message.message, message.category, message.filename, message.lineno
            )
            continue
        positions = stalled_positions(stalled.originals, images.detach().cpu().numpy())
        notes.append(f"{stalled} [batch positions {positions}]")
    return "; ".join(notes) or None


def _minimal_batch(
    entry: AttackEntry,
    foolbox_model: PyTorchModel,
    counter: CallCounter,
    images: torch.Tensor,
    labels: torch.Tensor,
    grid: list[float] | None,
    start: tuple[torch.Tensor | None, torch.Tensor | None],
    batch_seed: int,
    finished: _FinishedTargets,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Run one attack on one batch; return its record fields and the chosen adversarials."""
    counter.reset()
    started = time.perf_counter()
    epsilons: list[float | None] = [None] if grid is None else list(grid)
    starting_points, mask = start
    attacked = _attack_targets(
        entry,
        foolbox_model,
        counter,
        images,
        labels,
        epsilons,
        starting_points=starting_points,
        mask=mask,
        generator_seed=batch_seed,
        finished=finished,
    )
    with torch.no_grad():
        clean_predicted = counter(images).argmax(1)
    count = images.shape[0]
    distances = torch.full((count,), math.inf, device=images.device)
    chosen = images.clone()
    chosen_labels = clean_predicted.clone()
    grid_hits = torch.zeros((len(epsilons), count), dtype=torch.bool, device=images.device)
    for position, adversarials in attacked.candidates:
        clipped, measured, predicted = _recheck(counter, images, labels, adversarials, entry.norm)
        success = predicted != labels
        if grid is not None:
            budget = grid[position] * (1 + NORM_TOLERANCE) + NORM_TOLERANCE
            success &= measured <= budget
            grid_hits[position] |= success
        better = success & (measured < distances)
        distances = torch.where(better, measured, distances)
        chosen[better] = clipped[better]
        chosen_labels = torch.where(better, predicted, chosen_labels)
    already_wrong = clean_predicted != labels
    distances[already_wrong] = 0.0
    chosen[already_wrong] = images[already_wrong]
    chosen_labels[already_wrong] = clean_predicted[already_wrong]
    forward_calls, backward_calls = counter.reset()
    record = {
        "distances": [float(d) for d in distances.cpu()],
        "adversarial_labels": [int(p) for p in chosen_labels.cpu()],
        "clean_correct": [bool(c) for c in (~already_wrong).cpu()],
        "grid": grid,
        "grid_success": [int(hits.sum()) for hits in grid_hits] if grid is not None else None,
        "started": None if mask is None else [bool(m) for m in mask.cpu()],
        "seconds": time.perf_counter() - started + attacked.resumed_seconds,
        "forward_calls": forward_calls,
        "backward_calls": backward_calls,
        "targets": attacked.targets,
        "error": attacked.error,
        **({"failed": True} if attacked.failed else {}),
        "solver_stalls": attacked.solver_stalls,
    }
    return record, chosen


def run_fixed(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    suite: AttackSuite,
    store: ResultStore,
    *,
    model_name: str,
    norm: Norm,
    epsilon: float,
    indices: Sequence[int] | None = None,
    batch_size: int = 100,
    seed: int = 0,
    defense_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[str]:
    """Fixed-epsilon evaluation: the suite's ``norm`` attacks in order, on what is still robust.

    Returns the record keys in order; :func:`advdefense.evaluation.summary.summarize_fixed`
    turns them into robust accuracy and the attack that broke each sample.
    """
    indices = list(range(images.shape[0])) if indices is None else list(indices)
    _validated(images, labels, indices)
    _check_label_range(model, images, labels)
    check_positive_int(batch_size, "batch_size")
    if not epsilon > 0:
        raise InputError(f"epsilon must be positive, got {epsilon}")
    entries = [entry for entry in suite.entries if entry.norm == norm]
    if not entries:
        raise InputError(f"suite {suite.name!r} has no {norm} attack")
    store.check_samples(indices, images, labels)
    context = _context(model, model_name, seed, batch_size, defense_config or {})
    binarizing = declaration_of(model).binarization_threshold is not None
    device = device_of(model)
    keys: list[str] = []
    position_of = {index: position for position, index in enumerate(indices)}
    ticker = _PassTicker()
    with attack_mode(model):
        counter = CallCounter(model, ticker)
        with torch.no_grad():
            clean_predicted = torch.cat(
                [
                    counter(images[s : s + batch_size].to(device)).argmax(1).cpu()
                    for s in range(0, images.shape[0], batch_size)
                ]
            )
        robust = [
            index
            for index, p, y in zip(indices, clean_predicted, labels, strict=True)
            if int(p) == int(y)
        ]
        foolbox_model = PyTorchModel(counter, bounds=(0.0, 1.0), device=device)
        bar = tqdm(
            entries,
            desc=f"{model_name} {norm} {epsilon:g}",
            unit="attack",
            disable=not progress,
            leave=False,
        )
        for entry in bar:
            ticker.start(bar, entry.id)
            unbounded = entry.minimization and binarizing
            # only the records this changes get a new field, so older ones stay valid
            unbounded_field = {"unbounded_candidate": True} if unbounded else {}
            survivors: list[int] = []
            for start in range(0, len(robust), batch_size):
                batch_indices = robust[start : start + batch_size]
                positions = [position_of[index] for index in batch_indices]
                batch = images[positions].to(device)
                batch_labels = labels[positions].to(device)
                key = record_key(
                    mode="fixed",
                    model=context.fingerprint,
                    defense=context.defense_config,
                    indices=batch_indices,
                    seed=seed,
                    epsilon=epsilon,
                    **unbounded_field,
                    **_entry_fields(entry),
                    **_selection_fields(context, entry),
                )
                keys.append(key)
                record = store.get(key)
                if record is None or not record_settled(store, key):
                    record = _fixed_batch(
                        entry,
                        foolbox_model,
                        counter,
                        batch,
                        batch_labels,
                        epsilon,
                        _starting_points([], entry, counter, batch, batch_labels),
                        _batch_seed(seed, entry.id, batch_indices),
                        _FinishedTargets(store, key),
                        unbounded_candidate=unbounded,
                    )
                    record = store.append(
                        {
                            "key": key,
                            "mode": "fixed",
                            "model": model_name,
                            "model_fingerprint": context.fingerprint,
                            "indices": batch_indices,
                            "seed": seed,
                            "epsilon": epsilon,
                            **unbounded_field,
                            **_entry_fields(entry),
                            **_selection_fields(context, entry),
                            **record,
                        },
                    )
                survivors.extend(
                    index
                    for index, broken in zip(batch_indices, record["broken"], strict=True)
                    if not broken
                )
            robust = survivors
    return keys


def _fixed_batch(
    entry: AttackEntry,
    foolbox_model: PyTorchModel,
    counter: CallCounter,
    images: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    start: tuple[torch.Tensor | None, torch.Tensor | None],
    batch_seed: int,
    finished: _FinishedTargets,
    *,
    unbounded_candidate: bool = False,
) -> dict[str, Any]:
    """Run one attack on one batch; a sample is broken by any candidate adversarial within
    ``epsilon``.

    ``unbounded_candidate`` (minimization attacks on a binarizing model) adds the attack's
    unbounded adversarial to the candidates: Foolbox scales a minimization attack's result down
    to ``epsilon`` before the binarization refinement sees it, and the scaled-down image often
    no longer crosses the threshold, while the unbounded one, refined, can land well within
    ``epsilon``. The same Foolbox run yields both, so the extra candidate costs one refinement.
    """
    counter.reset()
    started = time.perf_counter()
    starting_points, mask = start
    attacked = _attack_targets(
        entry,
        foolbox_model,
        counter,
        images,
        labels,
        [epsilon, None] if unbounded_candidate else [epsilon],
        starting_points=starting_points,
        mask=mask,
        generator_seed=batch_seed,
        finished=finished,
    )
    budget = epsilon * (1 + NORM_TOLERANCE) + NORM_TOLERANCE
    broken = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    measured = torch.full((images.shape[0],), math.inf, device=images.device)
    predicted: torch.Tensor | None = None
    for _, adversarials in attacked.candidates:
        _, distances, found_labels = _recheck(counter, images, labels, adversarials, entry.norm)
        success = (found_labels != labels) & (distances <= budget)
        better = success & (distances < measured)
        predicted = found_labels if predicted is None else predicted
        measured = torch.where(better, distances, measured)
        predicted = torch.where(better, found_labels, predicted)
        broken |= success
    assert predicted is not None  # _attack_targets always returns candidates
    forward_calls, backward_calls = counter.reset()
    return {
        "broken": [bool(b) for b in broken.cpu()],
        "distances": [
            float(d) if b else math.inf for d, b in zip(measured.cpu(), broken.cpu(), strict=True)
        ],
        "adversarial_labels": [int(p) for p in predicted.cpu()],
        "seconds": time.perf_counter() - started + attacked.resumed_seconds,
        "forward_calls": forward_calls,
        "backward_calls": backward_calls,
        "targets": attacked.targets,
        "error": attacked.error,
        **({"failed": True} if attacked.failed else {}),
        "solver_stalls": attacked.solver_stalls,
    }
