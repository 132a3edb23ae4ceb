"""Recipe: the DIM paper (Liu et al. 2022) reproduced with our harness, then attacked adaptively.

Run with ``advdefense reproduce dim_mnist [--n 1000] [--out results]``. For each dataset (full
MNIST when its files are present, else the embedded ``mnist-sample``; then Fashion-MNIST when
installed) it trains or loads the models of Tables 1 and 2 one by one, taking each through
stages 1 and 2 as soon as it exists, then runs stage 3 for every model (all resumable):

1. ``quick`` (minimal mode) on the first ``n`` test samples;
2. ``quick-adaptive`` in fixed mode at the L-inf and L2 thresholds on the same samples: the
   quick attacks first, then targeted margin/DLR PGD towards every other class and DIM's
   internal attack on what is still robust (DESIGN.md §3.4);
   ``convergence``, in fixed mode too: PGD, then PGD with 5x the steps and 5 random restarts
   on what PGD left (DESIGN.md §3.5: more steps or restarts should change little);
3. the paper's ``dim42`` suite (Foolbox defaults, nothing weakened) on the first
   ``min(n, 200)`` samples, cheapest attacks first: C&W, Boundary and Pointwise x 10 come last
   and take hours per model on 2 CPU cores; rerun the command to continue.

``--stages`` runs only some of them (``STAGES``), e.g. ``--stages dim42`` for the paper's
protocol alone; the models are trained or loaded either way. ``--norms`` restricts the fixed-mode
stages (adaptive, convergence) to some of ``FIXED_NORMS``: each norm writes its own run
directory, so ``--norms linf`` and ``--norms l2`` of one model can run side by side, one per
core (quick and dim42 attack every norm in one run and ignore it).

Binarizing models (biCNN, biDIM) declare the paper's sigmoid proxies and BPDA as surrogates;
the harness attacks those and refines every adversarial with the binarization projection
(Appendix A.2). After every stage the tables are rewritten, so a partial run still reports:
``<out>/dim/<dataset>/table1.md`` and ``table2.md`` (ours next to the paper's Tables 1 and 2,
difference column), ``true_robustness.md`` (paper protocol vs. worst case with the adaptive
attacks), ``fig3_latent_tsne.png`` (Fig. 3), the harness's own reports and plots in ``runs/``,
and the models in ``models/``.

Choices, stated in ``results/dim/README.md``: DIM training follows
:class:`advdefense.training.dim.DIMTrainingConfig` (denoiser 10 epochs, internal models 20,
batch 128, Adam 1e-3) on the full datasets and 50/100 epochs at batch 32 on mnist-sample (see
``DIM_TRAINING_SMALL``); biDIM shares DIM's weights (the paper binarizes at inference only); on
MNIST the CNN and biCNN are the published ABS-paper weights, on Fashion-MNIST our CNN trained
here, binarized at inference for biCNN; Madry adversarial training (PGD L-inf at the dataset's
L-inf threshold, 0.3 on MNIST and 0.1 on Fashion-MNIST, 40 x 0.01, random start, adversarial
examples only; resumable epoch by epoch) runs last because it is by far the most expensive.
Fashion-MNIST thresholds: L-inf 0.1 (the common choice for it), L0 12, L1 8, L2 1.5 (as MNIST).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import advdefense
from advdefense.attacks.norms import Norm
from advdefense.attacks.suites import get_suite
from advdefense.data import LabeledImages, load_dataset
from advdefense.defenses.abs_baselines import load_abs_baseline
from advdefense.defenses.adversarial_training import PGDConfig
from advdefense.defenses.dim import BiDIM, InternalModelClassifier
from advdefense.errors import DatasetNotFoundError, UserError
from advdefense.evaluation.latent import plot_latent_tsne
from advdefense.evaluation.markdown import markdown_table, percent_with_interval
from advdefense.evaluation.report import write_reports
from advdefense.evaluation.robustness import clean_accuracy
from advdefense.evaluation.run import (
    SURROGATE_CHOICE_FLAG,
    RunConfig,
    RunResult,
    archive_before_resize,
    evaluate_models,
    load_run,
)
from advdefense.evaluation.store import model_fingerprint
from advdefense.evaluation.summary import FixedSummary, ModelSummary, broken_at
from advdefense.modes import device_of
from advdefense.nn.abs_cnn import AbsCNN
from advdefense.training.architectures import TrainOptions, train_architecture
from advdefense.training.checkpoint import EpochCheckpoint
from advdefense.validation import check_choices, check_positive_int

DEFAULT_N = 1000
DIM42_N = 200
PAPER_FILE = Path(__file__).with_name("dim_mnist.paper.json")
MNIST_THRESHOLDS = {"l0": 12.0, "l1": 8.0, "l2": 1.5, "linf": 0.3}
THRESHOLDS = {
    "mnist": MNIST_THRESHOLDS,
    "mnist-sample": MNIST_THRESHOLDS,
    "fashion-mnist": {**MNIST_THRESHOLDS, "linf": 0.1},
}
# Run order: cheap models first, Madry (hours of adversarial training on a CPU) last.
MODELS = ("cnn", "bicnn", "dim", "bidim", "im", "singleim", "dn-singleim", "madry")
STAGES = ("quick", "adaptive", "convergence", "dim42")  # the module docstring's stages 1-3
# the fixed-mode stages: their suite, run at each norm's threshold into runs/<suite>-<norm>
FIXED_STAGES = {"adaptive": "quick-adaptive", "convergence": "convergence"}
# the fixed-mode stages' threat models, in the order they run
FIXED_NORMS: tuple[Norm, ...] = ("linf", "l2")
# DIMTrainingConfig's defaults make ~9,400 internal-model steps on 60,000 images. The sample's
# 4,000 images need more passes: measured on mnist-sample (seed 0), DIM reaches 81.1% test
# accuracy with 20/10 epochs at batch 128, 93.5% with 100/50 at 128, 94.3% with 100/50 at 32 and
# 94.8% with 300/100 at 128 (1.4x the time of 100/50 at 32).
DIM_TRAINING: dict[str, Any] = {"epochs": 20, "denoiser_epochs": 10, "batch_size": 128}
DIM_TRAINING_SMALL: dict[str, Any] = {"epochs": 100, "denoiser_epochs": 50, "batch_size": 32}
CNN_TRAINING: dict[str, Any] = {"epochs": 8, "batch_size": 64}
# Madry et al. train 100k steps of 50 (83 epochs of 60k); measured on mnist-sample (seed 0),
# against PGD-40 at 0.3: 61.5% / 69.5% / 73.5% on the first 200 test digits after 40 / 70 / 100
# epochs; on all 1,000: 64.7% after 70, 70.7% after 100.
MADRY_TRAINING: dict[str, Any] = {"epochs": 100, "batch_size": 50, "learning_rate": 1e-4}
# Constant-rate trainings (train_classifier): their state is kept next to the saved model, so a
# recipe asking for more epochs continues them instead of starting over.
EXTENDABLE = ("cnn", "madry")
TABLE_COLUMNS = {
    "table1": ("cnn", "bicnn", "madry", "bidim", "dim"),
    "table2": ("cnn", "singleim", "im", "dn-singleim", "dim", "bidim"),
}


@dataclass(frozen=True)
class Setting:
    """One dataset's evaluation: where it writes, what it attacks, at which thresholds."""

    dataset: str
    directory: Path
    images: torch.Tensor
    labels: torch.Tensor
    thresholds: dict[str, float]
    seed: int
    progress: bool
    fixed_norms: tuple[Norm, ...] = FIXED_NORMS  # what the fixed-mode stages run (--norms)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @property
    def dim42_n(self) -> int:
        return min(self.n, DIM42_N)

    def run_dir(self, name: str) -> Path:
        return self.directory / "runs" / name


def reproduce(
    out: Path,
    device: torch.device,
    seed: int,
    progress: bool,
    n: int | None,
    models: Sequence[str] = MODELS,
    datasets: Sequence[str] | None = None,
    stages: Sequence[str] = STAGES,
    norms: Sequence[str] = FIXED_NORMS,
) -> None:
    """Train or load the models, evaluate in three resumable stages, write the tables.

    ``models`` and ``datasets`` (``--models``, ``--datasets``) restrict the work and set its
    order, e.g. DIM and biDIM first, and Madry's adversarial training left for a machine with a
    GPU; ``stages`` (``--stages``) picks among ``STAGES`` and ``norms`` (``--norms``) among
    the fixed-mode stages' ``FIXED_NORMS``; the tables show what has run.
    """
    check_choices(models, MODELS, "model")
    check_choices(stages, STAGES, "stage")
    check_choices(norms, FIXED_NORMS, "norm")
    if n is not None:
        check_positive_int(n, "--n")
    chosen = list(dict.fromkeys(models))
    for dataset in datasets or _datasets():
        if dataset not in THRESHOLDS:
            raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(THRESHOLDS)}")
        directory = Path(out) / "dim" / dataset
        print(f"== {dataset} -> {directory}")
        train, test = load_dataset(dataset, "train"), load_dataset(dataset, "test")
        count = min(n or DEFAULT_N, int(test.images.shape[0]))
        setting = Setting(
            dataset,
            directory,
            test.images[:count],
            test.labels[:count],
            THRESHOLDS[dataset],
            seed,
            progress,
            tuple(norm for norm in FIXED_NORMS if norm in norms),
        )
        loaded: dict[str, nn.Module] = {}
        for name in chosen:  # each model through the cheap stages as soon as it exists
            loaded[name] = _model(name, dataset, directory / "models", train, test, device, seed)
            if name == "dim":
                _latent_figure(setting, loaded[name], test)
            for stage in ("quick", *FIXED_STAGES):
                if stage in stages:
                    _timed(stage, setting, name, loaded[name].to(device))
        if "dim42" in stages:
            for name, model in loaded.items():
                _timed("dim42", setting, name, model.to(device))


def _timed(stage: str, setting: Setting, name: str, model: nn.Module) -> None:
    started = time.perf_counter()
    _run_stage(stage, setting, name, model)
    print(f"{stage} {name}: {time.perf_counter() - started:.0f} s", flush=True)
    write_tables(setting)


def _latent_figure(setting: Setting, dim: nn.Module, test: LabeledImages) -> None:
    """Fig. 3: t-SNE of each internal model's codes of the first 1,000 test images.

    Beside the figure, ``fig3_latent_tsne.json`` names the model, the test images and the
    seed it was drawn from; the figure is redrawn whenever one of them changes (a retrained
    DIM), and kept otherwise (t-SNE of 10 x 1,000 codes takes minutes on a CPU)."""
    if not isinstance(dim, InternalModelClassifier):
        return
    path = setting.directory / "fig3_latent_tsne.png"
    images, labels = test.images[:1000], test.labels[:1000]
    drawn_from = {
        "model_fingerprint": model_fingerprint(dim),
        "test_samples": int(labels.numel()),
        "seed": setting.seed,
    }
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file() and json.loads(record.read_text()) == drawn_from:
        return
    with torch.no_grad():
        codes = dim.latent_codes(images.to(device_of(dim))).cpu()
    plot_latent_tsne(codes, labels, path, seed=setting.seed)
    record.write_text(json.dumps(drawn_from, indent=2) + "\n")
    print(f"wrote {path}")


def _datasets() -> list[str]:
    """Full MNIST when present (never downloaded here), else the sample; Fashion-MNIST if found."""
    found = []
    for name in ("mnist", "fashion-mnist"):
        try:
            load_dataset(name, "test", download=False)
            found.append(name)
        except DatasetNotFoundError:
            if name == "mnist":
                found.append("mnist-sample")
            else:
                print("fashion-mnist not found (apt-get install dataset-fashion-mnist): skipped")
    return found


def _model(
    name: str,
    dataset: str,
    models_dir: Path,
    train: LabeledImages,
    test: LabeledImages,
    device: torch.device,
    seed: int,
) -> nn.Module:
    """The saved model ``models_dir / name``; built or trained and saved first if missing."""
    path = models_dir / name
    dim_training = DIM_TRAINING_SMALL if dataset == "mnist-sample" else DIM_TRAINING
    settings = {"cnn": CNN_TRAINING, "madry": MADRY_TRAINING}.get(name, dim_training)
    if (path / "config.json").is_file() and not _continues(name, path, settings):
        return advdefense.load(path, device=device).eval()
    mnist = dataset in ("mnist", "mnist-sample")
    model: nn.Module
    training: dict[str, Any]
    if name in ("cnn", "bicnn") and mnist:
        model = load_abs_baseline("cnn" if name == "cnn" else "bicnn")
        training = {"source": "published ABS-paper weights (Schott et al. 2019)"}
    elif name == "bicnn":
        cnn = _model("cnn", dataset, models_dir, train, test, device, seed)
        assert isinstance(cnn, AbsCNN)
        model = AbsCNN(replace(cnn.config, binarize_input=True))
        model.load_state_dict(cnn.state_dict())
        training = {"source": "the cnn model's weights, binarized at inference"}
    elif name == "bidim":
        dim = _model("dim", dataset, models_dir, train, test, device, seed)
        model = BiDIM()
        model.load_state_dict(dim.state_dict())
        training = {"source": "the dim model's weights, binarized at inference (Sec. 3.2)"}
    else:
        print(f"training {name} on {dataset} with {settings}")
        options = TrainOptions(
            **settings,
            seed=seed,
            device=device,
            pgd=PGDConfig(epsilon=THRESHOLDS[dataset]["linf"]),  # madry: the L-inf threshold
            checkpoint=EpochCheckpoint(path),  # cnn and madry resume epoch by epoch
        )
        model, training = train_architecture(name, train.images, train.labels, options)
    model = model.to(device).eval()
    accuracy = clean_accuracy(model, test.images, test.labels)
    print(f"{name}: test accuracy {100 * accuracy:.2f}% (n = {test.images.shape[0]})")
    advdefense.save(
        model,
        path,
        dataset=dataset,
        training=training,
        seed=seed,
        metrics={"test_accuracy": accuracy, "test_samples": int(test.images.shape[0])},
    )
    if name not in EXTENDABLE:
        EpochCheckpoint(path).remove()
    _tell_if_runs_name_other_weights(models_dir.parent, name, model_fingerprint(model))
    return model


def _tell_if_runs_name_other_weights(directory: Path, name: str, fingerprint: str) -> None:
    """Say so when the runs under ``directory`` evaluated other weights under ``name``: their
    stages run again, and the tables mark them stale. When other runs name these very weights,
    the retrain repeated theirs and only the older runs are stale (an archived run at an
    earlier n, say); otherwise the machine differs from the first training's."""
    earlier: dict[str, str] = {}
    same: list[str] = []
    for run_file in sorted((directory / "runs").glob("*/run.json")):
        try:
            entry = json.loads(run_file.read_text())["models"].get(name) or {}
        except (OSError, json.JSONDecodeError, KeyError, AttributeError):
            continue
        if entry.get("fingerprint") == fingerprint:
            same.append(run_file.parent.name)
        elif entry.get("fingerprint") not in (None, ""):
            earlier[run_file.parent.name] = entry["fingerprint"][:8] + "…"
    if not earlier:
        return
    older = f"({', '.join(sorted(set(earlier.values())))} in {', '.join(earlier)})"
    if same:
        print(
            f"{name}: retrained bit for bit ({fingerprint[:8]}…, the weights {', '.join(same)} "
            f"name); older weights {older} stay marked stale until those stages run again"
        )
        return
    print(
        f"{name}: its new weights ({fingerprint[:8]}…) are not the ones its runs name {older}: "
        "those stages run again and the tables mark the old results stale. A retrain gives the "
        "same weights only with the torch thread count and CPU kernels of the first one "
        "(OMP_NUM_THREADS, ATEN_CPU_CAPABILITY: see the README)"
    )


def _continues(name: str, path: Path, settings: dict[str, Any]) -> bool:
    """Whether the saved constant-rate training at ``path`` continues to ``settings["epochs"]``.

    It does when it was saved after fewer epochs and its training state is kept; without the
    state it is used as saved, and the recipe says so (delete ``path`` to train it again)."""
    if name not in EXTENDABLE:
        return False
    saved = json.loads((path / "config.json").read_text()).get("training", {}).get("epochs")
    if not isinstance(saved, int) or saved >= settings["epochs"]:
        return False
    if not EpochCheckpoint(path).path.is_file():
        print(
            f"{name}: saved after {saved} epochs, the recipe asks for {settings['epochs']}, and "
            f"its training state is gone: used as saved (delete {path} to train it again)"
        )
        return False
    print(f"{name}: saved after {saved} epochs; continuing to {settings['epochs']}")
    return True


def _run_stage(stage: str, setting: Setting, name: str, model: nn.Module) -> None:
    """One model through one stage (skipping finished work), then the stage's reports."""
    if stage in FIXED_STAGES:
        suite = get_suite(FIXED_STAGES[stage])
        for norm in setting.fixed_norms:
            config = replace(_config(setting, suite.name, "fixed", setting.n), norm=norm)
            config = replace(config, epsilon=setting.thresholds[norm])
            _evaluate(setting, f"{suite.name}-{norm}", config, name, model)
        return
    count = setting.dim42_n if stage == "dim42" else setting.n
    _evaluate(setting, stage, _config(setting, stage, "minimal", count), name, model)


def _evaluate(setting: Setting, run: str, config: RunConfig, name: str, model: nn.Module) -> None:
    suite = get_suite(config.suite)
    images, labels = setting.images[: config.n], setting.labels[: config.n]
    run_dir = setting.run_dir(run)
    archive = archive_before_resize(run_dir, config)
    if archive is not None:  # the models not yet rerun at this n stay in the tables
        print(f"{run_dir} moves to n = {config.n}; its models at the old n: {archive}")
        write_reports(load_run(archive, partial=True))
    evaluate_models(  # a new suite version or n starts the run file afresh (records stay)
        {name: model},
        images,
        labels,
        suite,
        config,
        run_dir,
        progress=setting.progress,
        replace=True,
    )
    write_reports(load_run(run_dir, partial=True))


def _config(setting: Setting, suite: str, mode: str, count: int) -> RunConfig:
    return RunConfig(
        dataset=setting.dataset,
        split="test",
        indices=tuple(range(count)),
        suite=suite,
        suite_version=get_suite(suite).version,
        mode=mode,  # type: ignore[arg-type]
        thresholds=dict(setting.thresholds),
        seed=setting.seed,
    )


# ---- tables ----


def _load(run_dir: Path, skip_models: Collection[str] = ()) -> RunResult | None:
    if not (run_dir / "run.json").is_file():
        return None
    return load_run(run_dir, partial=True, skip_models=skip_models)


def _stage_summaries(setting: Setting, run: str) -> dict[str, ModelSummary | FixedSummary]:
    """Per model, its summary in ``runs/<run>`` or in an archive of it at another n
    (``<run>-n<n>``, :func:`archive_before_resize`): the one on the most samples, the current
    run's on a tie; an archive of other weights than the current run's is stale and unused."""
    directory = setting.run_dir(run)
    archives = [
        path
        for path in sorted(directory.parent.glob(f"{run}-n*"))
        if re.fullmatch(rf"{re.escape(run)}-n\d+", path.name)
    ]
    chosen: dict[str, ModelSummary | FixedSummary] = {}
    for run_dir in (directory, *archives):
        # an archive cannot beat a summary on as many samples: those models are not even read,
        # so one whose archived records are gone (rerun at the new n) warns of nothing
        archived_n = int(run_dir.name.rsplit("-n", 1)[1]) if run_dir in archives else 0
        loaded = _load(run_dir, [name for name, held in chosen.items() if held.n >= archived_n])
        for summary in loaded.summaries if loaded else []:
            held = chosen.get(summary.model)
            if held is None or (summary.n > held.n and summary.fingerprint == held.fingerprint):
                chosen[summary.model] = summary
    return chosen


def _minimal_summaries(setting: Setting, run: str) -> dict[str, ModelSummary]:
    summaries = _stage_summaries(setting, run).items()
    return {name: s for name, s in summaries if isinstance(s, ModelSummary)}


def _percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def _paper_cell(paper: dict[str, float] | None) -> str:
    if paper is None:
        return "—"
    if "median" in paper:
        return f"{paper['median']:g} / {paper['accuracy']:g}"
    return f"{paper['accuracy']:g}"


def _our_cell(summary: ModelSummary | None, row: str) -> tuple[str, float]:
    """(cell text, accuracy in percent or nan) of one of our models for one paper row."""
    if summary is None:
        return "not run", math.nan
    if row == "minimal":
        accuracy = summary.minimal_accuracy
        return _percent(accuracy) + ("*" if summary.pending else ""), 100 * accuracy
    if row.startswith("all-"):
        norm: Norm = row[4:]  # type: ignore[assignment]
        result = summary.norms.get(norm)
        if result is None:
            return "pending", math.nan
        partial = (
            "*"
            if any(summary_attack.startswith(norm + "-") for summary_attack in summary.pending)
            else ""
        )
        accuracy = 100 * result.accuracy
        return f"{result.median_distance:.2g} / {accuracy:.1f}{partial}", accuracy
    attack = summary.attacks.get(row)
    if attack is None:
        return "pending", math.nan
    return f"{100 * attack.accuracy:.1f}", 100 * attack.accuracy


def render_paper_table(
    table: str,
    summaries: dict[str, ModelSummary],
    n: int,
    dataset: str = "mnist",
    stale: Collection[str] = (),
) -> str:
    """One of the paper's tables: per model our value, the paper's, and ours minus the paper's.

    The paper ran MNIST only: on another dataset its numbers stand beside ours for orientation,
    without a difference (other images, and other thresholds where ours differ). Models in
    ``stale`` ran on other weights than their current ones: marked, and no difference."""
    paper = json.loads(PAPER_FILE.read_text())[table]
    columns = [c for c in paper["columns"] if c in TABLE_COLUMNS[table]]
    comparable = dataset in ("mnist", "mnist-sample")
    parts = ("ours", "paper", "Δ") if comparable else ("ours", "paper (MNIST)")
    header = ["attack"] + [f"{c} {part}" for c in columns for part in parts]
    rows = []
    for row, values in paper["rows"].items():
        cells = [row]
        for column in columns:
            ours, accuracy = _our_cell(summaries.get(column), row)
            if column in stale:
                ours, accuracy = f"{ours} (stale)", math.nan
            reference = values.get(column)
            cells += [ours, _paper_cell(reference)]
            if comparable:
                difference = (
                    "—"
                    if reference is None or math.isnan(accuracy)
                    else f"{accuracy - reference['accuracy']:+.1f}"
                )
                cells.append(difference + ("*" if ours.endswith("*") else ""))
        rows.append(cells)
    lines = [*markdown_table(header, rows), ""]
    lines.append(
        f"Ours: accuracy in percent on the first n = {n} test samples (dim42 suite, Foolbox "
        "3.3.4 defaults); `all-<norm>` rows: median distance / worst-case accuracy over all of "
        "that norm's dim42 attacks (not only the rows shown). `*`: some of that norm's attacks "
        "are still pending (a Δ so marked will change); `pending`: no result yet; (stale): "
        "the model was retrained after its dim42 run, which is redone by the next run of the "
        "stage. Paper: "
        "Tables 1 and 2 of the DIM paper (Table 2 gives no median distances, only accuracies)"
        + (
            "."
            if comparable
            else f", on MNIST: the paper never ran {dataset}, so no difference is shown (other "
            "images; our L∞ threshold here is not the paper's 0.3)."
        )
    )
    return "\n".join(lines) + "\n"


def _broken_within(distances: Any, threshold: float) -> list[bool]:
    return [bool(b) for b in broken_at(np.asarray(distances, dtype=np.float64), threshold)]


def _common_n(
    setting: Setting, summaries: Sequence[Mapping[Any, ModelSummary | FixedSummary]]
) -> int:
    """The n most of the table's quick and fixed-mode runs used (on a tie ``setting.n``, else
    the largest; ``setting.n`` if none ran): the runs' own n, so that a later command at
    another ``--n`` (dim42 at 200) does not relabel them."""
    counts = Counter(summary.n for runs in summaries for summary in runs.values())
    if not counts:
        return setting.n
    most = max(counts.values())
    return max(counts, key=lambda n: (counts[n] == most, n == setting.n, n))


def render_true_robustness(setting: Setting) -> str:
    """Per model and norm: paper protocol (dim42), quick, the fixed-mode stages (quick +
    adaptive; PGD and PGD 5x longer with restarts), and the worst case over them all."""
    dim42 = _minimal_summaries(setting, "dim42")
    quick = _minimal_summaries(setting, "quick")
    fixed: dict[str, dict[tuple[str, str], FixedSummary]] = {}
    for suite in FIXED_STAGES.values():
        for norm in FIXED_NORMS:
            for name, summary in _stage_summaries(setting, f"{suite}-{norm}").items():
                if isinstance(summary, FixedSummary):
                    fixed.setdefault(name, {})[suite, norm] = summary
    lines = [
        "| model | norm | ε | clean | paper protocol (dim42) | quick | quick + adaptive | "
        "PGD, then 5x steps and 5 restarts | worst case over the stages | "
        "the same, every sample |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    common_n = _common_n(setting, [quick, *fixed.values()])
    for name in MODELS:
        for norm in FIXED_NORMS:
            threshold = setting.thresholds[norm]
            found = [fixed.get(name, {}).get((suite, norm)) for suite in FIXED_STAGES.values()]
            paper, quick_summary, *kept = _same_weights(dim42.get(name), quick.get(name), *found)
            runs = (quick_summary, *kept)
            counts = sorted({s.n for s in runs if s is not None})
            label = name if counts in ([], [common_n]) else f"{name} (n = {_listed(counts)})"
            cells = [label, norm, f"{threshold:g}"]
            clean = quick_summary.clean_accuracy if quick_summary else math.nan
            cells.append(_percent(clean))
            stale = dim42.get(name) is not None and paper is None
            cells.append(_norm_cell(dim42.get(name), norm) + (" (stale)" if stale else ""))
            cells.append(_norm_cell(quick_summary, norm))
            for stage_run, held in zip(found, kept, strict=True):
                stale = stage_run is not None and held is None
                cells.append(_fixed_cell(stage_run) + (" (stale)" if stale else ""))
            for every_sample in (False, True):
                cells.append(
                    _worst_case_cell(
                        paper, quick_summary, kept, norm, threshold, every_sample=every_sample
                    )
                )
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Accuracy in percent [95% Wilson interval]. quick and the fixed-mode stages: first "
        f"n = {common_n} test samples of {setting.dataset} (a model's own n, where it "
        f"differs, beside its name); dim42: first {setting.dim42_n}. "
        "The fixed-mode stages run each attack only on what is still robust: quick + adaptive "
        "(DESIGN.md §3.4), and PGD followed by PGD with 5x the steps and 5 random restarts "
        "(§3.5's convergence check: the two should differ little). The worst case counts a "
        "sample as robust only if no attack of any stage broke it within ε, on the samples "
        f"every stage ran on (dim42's first {setting.dim42_n} once it ran): the true "
        "robustness next to the paper-protocol number. The same, every sample: on all the "
        f"samples of the other stages, dim42 counting on its first {setting.dim42_n}; a "
        "tighter interval, but most samples faced fewer attacks, so it leans high where "
        "dim42 is stronger than the other stages, and the first column where those samples "
        "are harder than the rest; of the two, the lower one is the cautious estimate. "
        "`*`: a stage is missing, stale or still has attacks pending. (stale): that stage ran "
        "on other weights of the model than its quick stage (the model was retrained since); "
        "it is left out of the worst case until it runs again. (surrogate-chosen): an attack of "
        "that stage ran on surrogates and kept per sample the candidate the surrogate judged "
        "adversarial (before 2026-12-03), possibly dropping breaks of the real model, so the "
        "cell may overstate robustness until the stage runs again. Each stage's sanity flags "
        "(DESIGN.md §3.5) are in its run's report.md under runs/."
    )
    return "\n".join(lines) + "\n"


def _same_weights(
    paper: ModelSummary | None, quick: ModelSummary | None, *fixed: FixedSummary | None
) -> tuple[Any, ...]:
    """The stages that ran on the model's current weights, the others as ``None``.

    The current weights are the quick stage's (the recipe runs it first on a new model), else
    the first fixed-mode stage's; a stage whose run names other weights is stale, and merging
    it into a worst case would mix two models."""
    stages = (quick, *fixed, paper)
    current = next((s.fingerprint for s in stages if s and s.fingerprint), "")

    def kept(stage: Any) -> Any:
        stale = stage is not None and current and stage.fingerprint not in ("", current)
        return None if stale else stage

    return (kept(paper), kept(quick), *(kept(stage) for stage in fixed))


def _listed(counts: list[int]) -> str:
    return " / ".join(str(count) for count in counts)


def _norm_cell(summary: ModelSummary | None, norm: str) -> str:
    if summary is None or norm not in summary.norms:
        return "not run"
    result = summary.norms[norm]
    robust = sum(not b for b in _broken_within(result.distances, result.threshold))
    partial = "*" if any(attack.startswith(norm + "-") for attack in summary.pending) else ""
    return percent_with_interval(robust, len(result.distances)) + partial


def _surrogate_chosen(summary: FixedSummary | None) -> bool:
    """Whether some record of ``summary`` kept candidates its surrogate chose (before the
    defended model judged them): its robust accuracy may be overstated."""
    return summary is not None and any(SURROGATE_CHOICE_FLAG in flag for flag in summary.flags)


def _fixed_cell(summary: FixedSummary | None) -> str:
    if summary is None:
        return "not run"
    cell = percent_with_interval(sum(b is None for b in summary.broken_by), summary.n)
    return cell + (" (surrogate-chosen)" if _surrogate_chosen(summary) else "")


def _worst_case_cell(
    paper: ModelSummary | None,
    quick: ModelSummary | None,
    fixed: Sequence[FixedSummary | None],
    norm: str,
    threshold: float,
    *,
    every_sample: bool = False,
) -> str:
    """Per sample, broken if any stage that ran on it broke it within ``threshold``.

    On the samples every stage ran on (dim42's first ones once it ran), or with
    ``every_sample`` on those of the other stages, dim42 counting on its first ones: more
    samples, fewer attacks on most of them. ``*`` when a stage is missing or partial."""

    def broken_within(summary: ModelSummary | None) -> list[bool] | None:
        if summary is None or norm not in summary.norms:
            return None
        return _broken_within(summary.norms[norm].distances, threshold)

    stages = [[b is not None for b in run.broken_by] for run in fixed if run is not None]
    quick_broken = broken_within(quick)
    stages += [quick_broken] if quick_broken is not None else []
    paper_broken = broken_within(paper)
    if not stages and paper_broken is None:
        return "not run"
    stages += [paper_broken] if paper_broken is not None else []
    others = stages[:-1] if paper_broken is not None else stages
    count = min(len(stage) for stage in (others if every_sample and others else stages))
    broken = [any(stage[index] for stage in stages if index < len(stage)) for index in range(count)]
    missing = paper is None or quick is None or None in fixed
    partial = any(s is not None and s.pending for s in (paper, quick)) or any(
        _surrogate_chosen(run) for run in fixed
    )
    marker = "*" if missing or partial else ""
    return percent_with_interval(sum(not b for b in broken), count) + marker


def write_tables(setting: Setting) -> None:
    """Rewrite table1.md, table2.md and true_robustness.md from whatever has run so far."""
    dim42 = _minimal_summaries(setting, "dim42")
    quick = _minimal_summaries(setting, "quick")
    stale = {
        name
        for name, summary in dim42.items()
        if _same_weights(summary, quick.get(name))[0] is None
    }
    for table in ("table1", "table2"):
        text = f"# {setting.dataset}: the DIM paper's {table.replace('table', 'Table ')}\n\n"
        text += render_paper_table(table, dim42, setting.dim42_n, setting.dataset, stale)
        (setting.directory / f"{table}.md").write_text(text)
    text = f"# {setting.dataset}: paper protocol vs. adaptive attacks\n\n"
    (setting.directory / "true_robustness.md").write_text(text + render_true_robustness(setting))
