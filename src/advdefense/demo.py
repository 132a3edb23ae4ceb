"""The ``advdefense demo`` pipeline: train the ABS-paper CNN and DIM, attack both, report.

It grows as defenses land. Today: on ``mnist-sample`` (4,000 real MNIST digits), the ABS CNN and
DIM (Denoised Internal Models, on a short schedule: ``DIM_DEMO_EPOCHS``) side by side, then
clean accuracy and FGSM, L-inf PGD (0.3), L2 PGD and L2 DeepFool (1.5) on the first ``n`` test
digits, in the harness's minimal mode (fixed-epsilon attacks on a 4-point grid). These are the
cheap attacks only: ``advdefense reproduce dim_mnist`` shows how far DIM falls under the paper's
suite and adaptive attacks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from advdefense.attacks.catalog import DEMO_ATTACKS, get_attack
from advdefense.attacks.norms import default_threshold
from advdefense.attacks.suites import AttackSuite
from advdefense.data import LabeledImages, load_dataset
from advdefense.defenses.dim import DIM
from advdefense.devices import seed_everything
from advdefense.evaluation.report import write_reports
from advdefense.evaluation.robustness import clean_accuracy
from advdefense.evaluation.run import RunConfig, RunResult, evaluate_models
from advdefense.io import save
from advdefense.nn.abs_cnn import AbsCNN
from advdefense.training.dim import DIMTrainingConfig, train_dim_family
from advdefense.training.loop import TrainingConfig, train_classifier
from advdefense.validation import check_positive_int

__all__ = ["DEMO_SUITE", "DIM_DEMO_EPOCHS", "DemoOptions", "DemoResult", "run_demo"]

# DIM's internal models train this many epochs, its denoiser half as many, at batch 32: the DIM
# recipe's mnist-sample schedule (100 / 50) cut to a few minutes on one core: 87.5% on the 1,000
# test digits (94.4% with the full schedule; 82.1% with 10 / 5), seed 0, measured with
# `advdefense train dim --dataset mnist-sample --epochs 20 --denoiser-epochs 10 --batch-size 32`.
DIM_DEMO_EPOCHS = 20

DEMO_SUITE = AttackSuite(
    name="demo",
    version="1",
    entries=tuple(get_attack(attack_id) for attack_id in DEMO_ATTACKS),
    description="FGSM and L-inf PGD at 0.3, L2 PGD and L2 DeepFool at 1.5 (Foolbox defaults)",
)


@dataclass(frozen=True)
class DemoOptions:
    """What the demo trains on and how much it evaluates."""

    out: Path = Path("runs/demo")
    dataset: str = "mnist-sample"
    epochs: int = 8
    dim_epochs: int = DIM_DEMO_EPOCHS
    n: int = 200
    seed: int = 0
    grid_points: int = 4
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files, its run and how long it took."""

    run: RunResult
    table: str
    model_dirs: dict[str, Path]
    files: dict[str, Path]
    seconds: float


def run_demo(options: DemoOptions) -> DemoResult:
    """Train and save both models, evaluate them, report; every file lands in ``options.out``."""
    check_positive_int(options.n, "n")
    check_positive_int(options.epochs, "epochs")
    check_positive_int(options.dim_epochs, "dim_epochs")
    started = time.perf_counter()
    seed_everything(options.seed)
    train = load_dataset(options.dataset, "train")
    test_images, test_labels = load_dataset(options.dataset, "test")
    test = LabeledImages(test_images[: options.n], test_labels[: options.n])
    models = {"cnn": _train_cnn(options, train), "dim": _train_dim(options, train)}
    model_dirs = {}
    for name, trained in models.items():
        metrics = {"test_accuracy": clean_accuracy(trained.model, test.images, test.labels)}
        if trained.train_accuracy is not None:
            metrics["train_accuracy"] = trained.train_accuracy
        model_dirs[name] = save(
            trained.model,
            options.out / "models" / name,
            dataset=options.dataset,
            training={**trained.training, "train_samples": int(train.images.shape[0])},
            seed=options.seed,
            metrics={**metrics, "test_samples": options.n},
        )
    config = RunConfig(
        dataset=options.dataset,
        split="test",
        indices=tuple(range(options.n)),
        suite=DEMO_SUITE.name,
        suite_version=DEMO_SUITE.version,
        mode="minimal",
        thresholds={norm: default_threshold(options.dataset, norm) for norm in DEMO_SUITE.norms()},
        seed=options.seed,
        batch_size=options.n,
        grid_points=options.grid_points,
    )
    run = evaluate_models(
        {name: trained.model for name, trained in models.items()},
        test.images,
        test.labels,
        DEMO_SUITE,
        config,
        options.out / "run",
        progress=options.progress,
        replace=True,  # the demo's own run: other options start it afresh
    )
    files = write_reports(run)
    seconds = time.perf_counter() - started
    return DemoResult(run, files["md"].read_text(), model_dirs, files, seconds)


class _Trained(NamedTuple):
    model: nn.Module
    training: dict[str, Any]
    train_accuracy: float | None


def _train_cnn(options: DemoOptions, train: LabeledImages) -> _Trained:
    """The ABS-paper CNN, trained with cross-entropy (the defenses' undefended baseline)."""
    model = AbsCNN().to(options.device)
    training = TrainingConfig(epochs=options.epochs, seed=options.seed)
    history = train_classifier(
        model,
        train.images,
        train.labels,
        training,
        device=options.device,
        progress=options.progress,
    )
    return _Trained(model, asdict(training), history.epochs[-1].accuracy)


def _train_dim(options: DemoOptions, train: LabeledImages) -> _Trained:
    """DIM (Sec. 3.2): the denoiser (Eq. 1) for half of ``options.dim_epochs``, then the
    internal models (Eq. 2) for all of them."""
    model = DIM().to(options.device)
    training = DIMTrainingConfig(
        denoiser_epochs=max(1, options.dim_epochs // 2),
        internal_epochs=options.dim_epochs,
        batch_size=32,
        seed=options.seed,
    )
    losses = train_dim_family(
        model,
        train.images,
        train.labels,
        training,
        device=options.device,
        progress=options.progress,
    )
    return _Trained(model.eval(), {**asdict(training), "final_losses": losses}, None)
