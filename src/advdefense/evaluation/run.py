"""One evaluation run: models x suite on the first n samples of a split, in a run directory.

``RUN/records.jsonl`` and ``RUN/adversarials/`` hold the resumable store; ``RUN/run.json``
holds the run's configuration, each model's fingerprint, sanity flags and record keys, so
:func:`load_run` can rebuild every number without the models.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from advdefense.atomic_files import write_atomically
from advdefense.attacks.catalog import ATTACKS
from advdefense.attacks.norms import NORM_ALIASES, Norm
from advdefense.attacks.suites import AttackSuite
from advdefense.declaration import declaration_of
from advdefense.defenses.detector import Detector
from advdefense.errors import InputError, UserError
from advdefense.evaluation.detection_run import detection_scores, summarize_detection
from advdefense.evaluation.detector_claims import detection_claim_flags
from advdefense.evaluation.robustness import predict
from advdefense.evaluation.runner import (
    SURROGATE_SELECTION,
    entry_settings,
    picks_among_candidates,
    plan_minimal_keys,
    ran_with,
    record_settled,
    run_fixed,
    run_minimal,
)
from advdefense.evaluation.sanity import fixed_result_flags, model_flags, result_flags
from advdefense.evaluation.store import (
    RECORDS_FILE,
    SAMPLES_FILE,
    ResultStore,
    model_fingerprint,
)
from advdefense.evaluation.summary import (
    FixedSummary,
    ModelSummary,
    summarize_fixed,
    summarize_minimal,
)
from advdefense.provenance import provenance
from advdefense.validation import check_positive_int

__all__ = [
    "RunConfig",
    "RunResult",
    "archive_before_resize",
    "evaluate_models",
    "first_indices",
    "load_run",
]

RUN_FILE = "run.json"
CONFIGURATION_LOCK = ".configuration.lock"
Mode = Literal["minimal", "fixed"]


@dataclass(frozen=True)
class RunConfig:
    """What was evaluated and how; stored in ``run.json``."""

    dataset: str
    split: str
    indices: tuple[int, ...]
    suite: str
    suite_version: str
    mode: Mode
    thresholds: dict[str, float]
    seed: int = 0
    batch_size: int = 100
    grid_points: int = 8
    norm: Norm | None = None
    epsilon: float | None = None

    @property
    def n(self) -> int:
        return len(self.indices)

    def norm_thresholds(self) -> dict[Norm, float]:
        """``thresholds`` keyed by norm (JSON round trips turn the keys into plain strings)."""
        result: dict[Norm, float] = {}
        for name, value in self.thresholds.items():
            if name not in NORM_ALIASES:
                raise UserError(f"unknown norm {name!r} in the run's thresholds")
            result[NORM_ALIASES[name]] = float(value)
        return result


@dataclass(frozen=True)
class RunResult:
    """A run's configuration and, per model, its summary (minimal or fixed mode)."""

    directory: Path
    config: RunConfig
    summaries: list[ModelSummary | FixedSummary]
    provenance: dict[str, Any]


def evaluate_models(
    models: Mapping[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    suite: AttackSuite,
    config: RunConfig,
    directory: str | os.PathLike[str],
    *,
    detectors: Mapping[str, Detector] | None = None,
    progress: bool = True,
    replace: bool = False,
) -> RunResult:
    """Evaluate every model (resuming finished work in ``directory``); return the summaries.

    ``detectors`` maps model names to a detector for that model: in minimal mode the detector
    scores each clean image and each attack's successful adversarials (gray-box detection,
    reported as ROC AUC and TPR at 5% and 1% FPR).

    A run directory holds one configuration. When ``directory`` already holds models evaluated
    under another one, ``replace=True`` starts its run file afresh for this configuration
    (the records stay and are reused wherever they match); otherwise a UserError names the
    difference. Everything is checked before the run file is touched.
    """
    if not models:
        raise InputError("models is empty: pass at least one model to evaluate")
    if len(config.indices) != images.shape[0]:
        raise InputError(f"config has {config.n} indices but there are {images.shape[0]} images")
    if config.mode == "fixed" and (config.norm is None or config.epsilon is None):
        raise InputError("fixed mode needs a norm and an epsilon (e.g. --norm L2 --eps 1.5)")
    detectors = dict(detectors or {})
    unknown = sorted(set(detectors) - set(models))
    if unknown:
        raise InputError(f"detectors given for unknown models: {', '.join(unknown)}")
    if detectors and config.mode != "minimal":
        raise InputError("detection is evaluated in minimal mode only (--mode minimal)")
    _check_configuration(config, suite)
    run_dir = Path(directory)
    if not replace:
        _refuse_other_configuration(run_dir, config)
    with ResultStore(run_dir) as store:
        store.check_samples(config.indices, images, labels)  # before a finished model is skipped
        with _configuration_held(store, config):
            for name in models:
                store.claim(name)
            _evaluate_into(
                store, models, images, labels, suite, config, detectors, progress=progress
            )
    # other models of the run may be unfinished (an earlier process was killed): report them
    # as partial, flagged, rather than fail after this evaluation has finished
    return load_run(run_dir, partial=True)


def _check_configuration(config: RunConfig, suite: AttackSuite) -> None:
    """What the runner would refuse, refused before anything is written."""
    check_positive_int(config.batch_size, "batch_size (--batch-size)")
    check_positive_int(config.grid_points, "grid_points (--grid-points)")
    thresholds = config.norm_thresholds()
    bad = {
        norm: value for norm, value in thresholds.items() if not math.isfinite(value) or value <= 0
    }
    if bad:
        raise InputError(
            "thresholds must be finite and positive, got "
            + ", ".join(f"{norm}={value}" for norm, value in bad.items())
        )
    if config.mode == "fixed":
        assert config.norm is not None and config.epsilon is not None
        if not math.isfinite(config.epsilon) or config.epsilon <= 0:
            raise InputError(f"--eps must be finite and positive, got {config.epsilon}")
        if not any(entry.norm == config.norm for entry in suite.entries):
            raise InputError(
                f"suite {suite.name!r} has no {config.norm} attack; choose a suite with one "
                f"(its norms: {', '.join(suite.norms())}) or another --norm"
            )
        return
    missing = sorted({entry.norm for entry in suite.entries} - set(thresholds))
    if missing:
        raise InputError(
            f"no threshold given for norm(s) {', '.join(missing)}; pass --threshold NORM=VALUE"
        )


def _refuse_other_configuration(run_dir: Path, config: RunConfig) -> None:
    """A UserError when ``run_dir`` holds models evaluated under another configuration."""
    try:
        payload = json.loads((run_dir / RUN_FILE).read_text())
        old, models = dict(payload["config"]), dict(payload["models"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return
    new = json.loads(json.dumps(asdict(config)))
    if not models or old == new:
        return
    changed = [
        f"{field} {_shown(field, old.get(field))} -> {_shown(field, value)}"
        for field, value in new.items()
        if old.get(field) != value
    ]
    raise UserError(
        f"{run_dir} holds {', '.join(sorted(models))} evaluated under another configuration "
        f"({'; '.join(changed)}); evaluate into another --out, or pass --replace to start its "
        "run file afresh for this one (its records are kept and reused where they match)"
    )


def _shown(field: str, value: Any) -> str:
    return f"n={len(value)}" if field == "indices" and isinstance(value, list) else repr(value)


def _evaluate_into(
    store: ResultStore,
    models: Mapping[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    suite: AttackSuite,
    config: RunConfig,
    detectors: Mapping[str, Detector],
    *,
    progress: bool,
) -> None:
    run_dir = store.directory
    thresholds = config.norm_thresholds()
    entries = _models_already_in(run_dir, config)
    for name, model in models.items():
        identity = _identity(model, detectors.get(name))
        if _finished(entries.get(name), identity, store, suite):
            continue  # its records and detection stand (adversarials may not be checked out)
        flags = model_flags(model, images, labels)
        if config.mode == "minimal":
            planned = plan_minimal_keys(
                model,
                suite,
                config.indices,
                thresholds=thresholds,
                grid_points=config.grid_points,
                batch_size=config.batch_size,
                seed=config.seed,
            )
            entries[name] = {
                **identity,
                "flags": flags,
                "keys": planned,
                "attacks": _planned_attacks(suite, config),
                "clean_correct": None,
                "detection": None,
                "complete": False,
            }
            _write_run_entry(store, config, name, entries[name])
            keys = run_minimal(
                model,
                images,
                labels,
                suite,
                store,
                model_name=name,
                thresholds=thresholds,
                indices=config.indices,
                grid_points=config.grid_points,
                batch_size=config.batch_size,
                seed=config.seed,
                progress=progress,
                keep_adversarials=name in detectors,
            )
            clean_correct = None
        else:
            assert config.norm is not None and config.epsilon is not None
            keys = run_fixed(
                model,
                images,
                labels,
                suite,
                store,
                model_name=name,
                norm=config.norm,
                epsilon=config.epsilon,
                indices=config.indices,
                batch_size=config.batch_size,
                seed=config.seed,
                progress=progress,
            )
            clean_correct = [bool(c) for c in (predict(model, images) == labels)]
        detection = None
        if name in detectors:
            detection = detection_scores(
                detectors[name], store, keys, images, config.indices, thresholds
            )
        entries[name] = {
            "complete": True,
            "attacks": _planned_attacks(suite, config) if config.mode == "minimal" else None,
            "detection": detection,
            **identity,
            "flags": flags,
            "keys": keys,
            "clean_correct": clean_correct,
        }
        _write_run_entry(store, config, name, entries[name])


#: Identity fields an entry must carry to count as finished: entries written before them were
#: computed otherwise (:data:`~advdefense.evaluation.runner.SURROGATE_SELECTION`).
_REQUIRED_IDENTITY = ("surrogate_selection",)


def _identity(model: nn.Module, detector: Detector | None) -> dict[str, str]:
    """What a finished entry was computed from: the model's and its detector's fingerprints,
    and for a defense attacked through surrogates, how their candidates were chosen."""
    identity = {"fingerprint": model_fingerprint(model)}
    if detector is not None:
        identity["detector_fingerprint"] = model_fingerprint(detector)
    if declaration_of(model).surrogates:
        identity["surrogate_selection"] = SURROGATE_SELECTION
    return identity


def _finished(
    entry: Mapping[str, Any] | None,
    identity: Mapping[str, str],
    store: ResultStore,
    suite: AttackSuite,
) -> bool:
    """Whether ``entry`` (from the run file, same configuration) is complete for ``identity``
    with every record in ``store``, each computed by the attack of that id in ``suite`` as it
    is now (an attack whose parameters changed under the same suite version runs again).

    An entry finished without detection is unfinished when a detector is now given; entries
    written before detector fingerprints were recorded match on the model alone (the recipes
    refit a detector only when its model changes)."""
    if entry is None or not entry.get("complete"):
        return False
    if not all(record_settled(store, key) for key in entry.get("keys", [])):
        return False
    settings = {attack.id: entry_settings(attack) for attack in suite.entries}
    for key in entry.get("keys", []):
        record = store.get(key) or {}
        current = settings.get(record.get("attack", ""))
        if current is None or not ran_with(record, current):
            return False
    if "detector_fingerprint" in identity and entry.get("detection") is None:
        return False  # finished without a detector: its detection is still to compute
    return all(
        entry.get(field, None if field in _REQUIRED_IDENTITY else value) == value
        for field, value in identity.items()
    )


def _planned_attacks(suite: AttackSuite, config: RunConfig) -> list[str]:
    """The attack id of each planned minimal-mode key, in the same order."""
    batches = range(0, config.n, config.batch_size)
    return [entry.id for _ in batches for entry in suite.entries]


def _models_already_in(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """Models an earlier command evaluated into ``run_dir`` under the same configuration."""
    if not _same_configuration(run_dir, config):
        return {}
    try:
        return dict(json.loads((run_dir / RUN_FILE).read_text())["models"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def archive_before_resize(directory: str | os.PathLike[str], config: RunConfig) -> Path | None:
    """Before ``directory`` is evaluated at another n: keep its run as ``<name>-n<old n>``.

    A run directory holds one configuration, so evaluating it on more (or fewer) samples,
    everything else equal, starts a new ``run.json`` holding only the models evaluated since
    (their records are reused batch by batch for the samples in common). The archive, a
    sibling directory with the old ``run.json`` and a copy of the records, keeps the models
    evaluated at the old n reportable by :func:`load_run` meanwhile; it merges into an
    earlier archive at that n. Returns the archive, or None when there was nothing to keep.
    """
    run_dir = Path(directory)
    try:
        payload = json.loads((run_dir / RUN_FILE).read_text())
        old = dict(payload["config"])
        models = dict(payload["models"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    new = json.loads(json.dumps(asdict(config)))
    old_n = len(old.get("indices", ()))
    same_but_n = {k: v for k, v in old.items() if k != "indices"} == {
        k: v for k, v in new.items() if k != "indices"
    }
    if not models or not same_but_n or old_n == len(new["indices"]):
        return None
    archive = run_dir.parent / f"{run_dir.name}-n{old_n}"
    archive.mkdir(exist_ok=True)
    try:
        earlier = json.loads((archive / RUN_FILE).read_text())
        if earlier["config"] == old:
            models = {**earlier["models"], **models}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    for name in (RECORDS_FILE, SAMPLES_FILE):  # both only grow: supersets of the archive's
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, archive / name)
    payload = {**payload, "models": models}
    text = json.dumps(payload, indent=1) + "\n"
    write_atomically(archive / RUN_FILE, lambda temporary: temporary.write_text(text))
    return archive


@contextmanager
def _configuration_held(store: ResultStore, config: RunConfig) -> Iterator[None]:
    """Let processes of ``config`` share the run directory; refuse one of another configuration
    (which would start the run file afresh) while any of them runs, and vice versa."""
    run_dir = store.directory
    with (run_dir / CONFIGURATION_LOCK).open("a") as handle:
        with store.exclusive():
            same = not (run_dir / RUN_FILE).exists() or _same_configuration(run_dir, config)
        try:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if same else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{run_dir} is being evaluated by another process with another configuration "
                "(suite, samples, mode, thresholds or seed); wait for it to finish or choose "
                "another --out"
            ) from None
        if not same:  # start the run file for this configuration, then share it
            with store.exclusive():
                _write_run_file(run_dir, config, {})
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        yield


def _same_configuration(run_dir: Path, config: RunConfig) -> bool:
    try:
        payload = json.loads((run_dir / RUN_FILE).read_text())
        return bool(payload["config"] == json.loads(json.dumps(asdict(config))))
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False


def _write_run_entry(store: ResultStore, config: RunConfig, name: str, entry: Any) -> None:
    """Set ``name``'s entry in the run file, keeping what other processes wrote there since."""
    with store.exclusive():
        models = _models_already_in(store.directory, config)
        _write_run_file(store.directory, config, {**models, name: entry})


def _write_run_file(run_dir: Path, config: RunConfig, models: dict[str, Any]) -> None:
    payload = {"config": asdict(config), "models": models, "provenance": provenance()}
    text = json.dumps(payload, indent=1) + "\n"
    write_atomically(run_dir / RUN_FILE, lambda temporary: temporary.write_text(text))


def load_run(
    directory: str | os.PathLike[str],
    *,
    partial: bool = False,
    skip_models: Collection[str] = (),
) -> RunResult:
    """Rebuild a run's summaries from ``run.json`` and its record store.

    ``partial=True`` reports a run still in progress (or interrupted): attacks whose records are
    not all written yet are left out and named in each summary's ``pending`` list and flags; an
    unfinished model with samples no attack has reached yet is left out with a warning.
    ``skip_models`` are neither read nor reported (a caller that has them from elsewhere).
    """
    run_dir = Path(directory)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise UserError(
            f"{run_dir} is not an evaluation run (no {RUN_FILE}); run "
            "`advdefense evaluate --out DIR` first"
        )
    try:
        payload = json.loads(run_file.read_text())
        raw = payload["config"]
        config = RunConfig(**{**raw, "indices": tuple(raw["indices"])})
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{run_file} is not an advdefense run file ({error})") from None
    store = ResultStore(run_dir, writable=False)
    summaries: list[ModelSummary | FixedSummary] = []
    for name, entry in payload["models"].items():
        if name in skip_models:
            continue
        try:
            summaries.append(_summarize_model(store, config, run_dir, name, entry, partial))
        except UserError as error:
            if not partial:
                raise
            # unfinished, or its records are gone (a fresh checkout keeps run.json, not the
            # records): rerunning its evaluation restores it
            warnings.warn(
                f"{name} left out of the partial report of {run_dir}: {error}", stacklevel=2
            )
    return RunResult(run_dir, config, summaries, payload.get("provenance", {}))


def _summarize_model(
    store: ResultStore,
    config: RunConfig,
    run_dir: Path,
    name: str,
    entry: dict[str, Any],
    partial: bool,
) -> ModelSummary | FixedSummary:
    """One model's summary from its ``run.json`` entry and the records (UserError if missing)."""
    if config.mode == "fixed":
        assert config.norm is not None and config.epsilon is not None
        fixed = summarize_fixed(
            store,
            entry["keys"],
            model=name,
            indices=config.indices,
            clean_correct=entry["clean_correct"],
            norm=config.norm,
            epsilon=config.epsilon,
            fingerprint=entry.get("fingerprint", ""),
        )
        fixed.flags.extend(
            [*entry["flags"], *fixed_result_flags(fixed), *_surrogate_choice_flags(store, entry)]
        )
        return fixed
    if not entry.get("complete", True) and not partial:
        raise UserError(
            f"the evaluation of {name} in {run_dir} has not finished; rerun its command "
            "to resume, or pass --partial to report what is done"
        )
    summary = summarize_minimal(
        store,
        entry["keys"],
        model=name,
        indices=config.indices,
        thresholds=config.norm_thresholds(),
        planned=entry.get("attacks") or (),
        allow_partial=partial,
        fingerprint=entry.get("fingerprint", ""),
    )
    if entry.get("detection"):
        summary.detection.extend(summarize_detection(entry["detection"]))
    summary.flags.extend(
        [
            *entry["flags"],
            *result_flags(summary),
            *_detection_claim_flags(summary, config),
            *_surrogate_choice_flags(store, entry),
        ]
    )
    return summary


#: The flag of records whose candidates a surrogate chose (:func:`_surrogate_choice_flags`).
SURROGATE_CHOICE_FLAG = "kept per sample the candidate its surrogate judged adversarial"


def _surrogate_choice_flags(store: ResultStore, entry: Mapping[str, Any]) -> list[str]:
    """Flag records written before the defended model judged an attack's candidates on a
    surrogate (restarts, all-targets attacks; :func:`runner._selection_fields`): they may have
    dropped adversarials that broke the defended model."""
    attacks: dict[str, None] = {}
    for key in entry.get("keys", []):
        record = store.get(key)
        if record is None or "selection" in record:
            continue
        catalogued = ATTACKS.get(record["attack"])
        on_surrogates = record.get("targets") not in (None, ["model"])
        if on_surrogates and catalogued is not None and picks_among_candidates(catalogued):
            attacks[record["attack"]] = None
    if not attacks:
        return []
    return [
        f"{', '.join(attacks)}: ran on surrogates and {SURROGATE_CHOICE_FLAG} (before "
        "2026-12-03), so it may have dropped adversarials that break the defended model and "
        "robust accuracy may be overstated; rerun the command to redo these records"
    ]


def _detection_claim_flags(summary: ModelSummary, config: RunConfig) -> list[str]:
    """DESIGN §3 rule 6 on each attack's robust accuracy with rejection at its threshold."""
    claims = []
    for detection in summary.detection:
        attack = summary.attacks.get(detection.attack_id)
        if attack is not None and detection.robust_accuracy_at_threshold is not None:
            claims.append(
                (
                    detection.attack_id,
                    attack.norm,
                    attack.threshold,
                    detection.robust_accuracy_at_threshold,
                )
            )
    return detection_claim_flags(config.dataset, claims)


def first_indices(n: int, available: int, indices_file: Path | None = None) -> tuple[int, ...]:
    """The first ``n`` sample indices, or those listed in ``indices_file`` (JSON or lines)."""
    if indices_file is None:
        if n > available:
            raise InputError(f"--n {n} exceeds the {available} samples of this split")
        return tuple(range(n))
    try:
        text = indices_file.read_text()
    except OSError as error:
        raise InputError(f"--indices {indices_file}: cannot read it ({error.strerror})") from None
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else text.split()
        indices = tuple(int(v) for v in values)
    except (ValueError, json.JSONDecodeError) as error:
        raise InputError(
            f"{indices_file}: expected a JSON list or one index per line ({error})"
        ) from None
    bad = [i for i in indices if not 0 <= i < available]
    if bad or not indices or len(set(indices)) != len(indices):
        raise InputError(
            f"{indices_file}: indices must be distinct, non-empty, in [0, "
            f"{available}); bad: {bad[:5]}"
        )
    return indices[:n] if n else indices
