"""The ``advdefense demo`` pipeline: train the ABS-paper CNN, attack it, write a report.

It grows as defenses land. Today: the CNN trained on ``mnist-sample`` (4,000 real MNIST digits),
then clean accuracy and FGSM, L-inf PGD (0.3), L2 PGD and L2 DeepFool (1.5) on the first ``n``
test digits, each on an epsilon grid up to the threshold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from advdefense.attacks.catalog import DEMO_ATTACKS
from advdefense.data import load_dataset
from advdefense.devices import seed_everything
from advdefense.evaluation.record import EvaluationRecord, evaluate_model, write_record
from advdefense.evaluation.report import plot_accuracy_curves, render
from advdefense.evaluation.robustness import clean_accuracy
from advdefense.io import save
from advdefense.nn.abs_cnn import AbsCNN
from advdefense.training.loop import TrainingConfig, train_classifier
from advdefense.validation import check_positive_int

__all__ = ["DemoOptions", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """What the demo trains on and how much it evaluates."""

    out: Path = Path("runs/demo")
    dataset: str = "mnist-sample"
    epochs: int = 8
    n: int = 200
    attacks: Sequence[str] = DEMO_ATTACKS
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files, its record and how long it took."""

    record: EvaluationRecord
    table: str
    model_dir: Path
    results_path: Path
    table_path: Path
    plot_path: Path
    seconds: float


def run_demo(options: DemoOptions) -> DemoResult:
    """Train, save, evaluate and report; every file lands in ``options.out``."""
    check_positive_int(options.n, "n")
    started = time.perf_counter()
    seed_everything(options.seed)
    train_images, train_labels = load_dataset(options.dataset, "train")
    test_images, test_labels = load_dataset(options.dataset, "test")
    test_images, test_labels = test_images[: options.n], test_labels[: options.n]

    model = AbsCNN().to(options.device)
    training = TrainingConfig(epochs=options.epochs, seed=options.seed)
    history = train_classifier(
        model,
        train_images,
        train_labels,
        training,
        device=options.device,
        progress=options.progress,
    )
    model_dir = save(
        model,
        options.out / "model",
        dataset=options.dataset,
        training={**asdict(training), "train_samples": int(train_images.shape[0])},
        seed=options.seed,
        metrics={
            "train_accuracy": history.epochs[-1].accuracy,
            "test_accuracy": clean_accuracy(model, test_images, test_labels),
            "test_samples": options.n,
        },
    )
    record = evaluate_model(
        model,
        test_images,
        test_labels,
        list(options.attacks),
        model_name="cnn",
        dataset=options.dataset,
        split="test",
        seed=options.seed,
        progress=options.progress,
    )
    results_path = write_record(record, options.out)
    table = render([record], "md")
    table_path = options.out / "results.md"
    table_path.write_text(table)
    plot_path = plot_accuracy_curves([record], options.out / "accuracy_vs_epsilon.png")
    return DemoResult(
        record,
        table,
        model_dir,
        results_path,
        table_path,
        plot_path,
        time.perf_counter() - started,
    )
