"""The ``advdefense demo`` pipeline: train the ABS-paper CNN, attack it, write a report.

It grows as defenses land. Today: the CNN trained on ``mnist-sample`` (4,000 real MNIST digits),
then clean accuracy and FGSM, L-inf PGD (0.3), L2 PGD and L2 DeepFool (1.5) on the first ``n``
test digits, in the harness's minimal mode (fixed-epsilon attacks on a 4-point grid).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from advdefense.attacks.catalog import DEMO_ATTACKS, get_attack
from advdefense.attacks.norms import default_threshold
from advdefense.attacks.suites import AttackSuite
from advdefense.data import load_dataset
from advdefense.devices import seed_everything
from advdefense.evaluation.report import write_reports
from advdefense.evaluation.robustness import clean_accuracy
from advdefense.evaluation.run import RunConfig, RunResult, evaluate_models
from advdefense.io import save
from advdefense.nn.abs_cnn import AbsCNN
from advdefense.training.loop import TrainingConfig, train_classifier
from advdefense.validation import check_positive_int

__all__ = ["DEMO_SUITE", "DemoOptions", "DemoResult", "run_demo"]

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
    model_dir: Path
    files: dict[str, Path]
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
        {"cnn": model},
        test_images,
        test_labels,
        DEMO_SUITE,
        config,
        options.out / "run",
        progress=options.progress,
    )
    files = write_reports(run)
    return DemoResult(run, files["md"].read_text(), model_dir, files, time.perf_counter() - started)
