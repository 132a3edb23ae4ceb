"""Harness overhead over raw Foolbox, and fixed-mode speedup over minimal mode.

Run: ``.venv/bin/python benchmarks/harness_overhead.py [--n 100] [--model runs/cnn]``.

(a) Foolbox called directly on the same batches, the same attacks and the same epsilon grid as
(b) the harness in minimal mode (re-checks, distances, store writes). Prints b / a (target
<= 1.10). Then the L2 attacks of the suite in fixed mode at epsilon 1.5 against minimal mode,
with both robust accuracies, and the speedup. Everything runs in one process, side by side, on
the first n mnist-sample test digits; the model is the saved one given, else the ABS CNN
trained for 2 epochs here (seed 0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from foolbox.models.pytorch import PyTorchModel

import advdefense
from advdefense.attacks.suites import AttackSuite, get_suite
from advdefense.data import load_dataset
from advdefense.evaluation.robustness import predict
from advdefense.evaluation.runner import run_fixed, run_minimal
from advdefense.evaluation.store import ResultStore
from advdefense.evaluation.summary import summarize_fixed, summarize_minimal
from advdefense.nn import AbsCNN
from advdefense.training import TrainingConfig, train_classifier

THRESHOLDS = {"l0": 12.0, "l1": 8.0, "l2": 1.5, "linf": 0.3}


def _model(path: Path | None) -> torch.nn.Module:
    if path is not None:
        return advdefense.load(path)
    images, labels = load_dataset("mnist-sample", "train")
    model = AbsCNN()
    train_classifier(model, images, labels, TrainingConfig(epochs=2), progress=False)
    return model.eval()


def _foolbox_directly(
    model: torch.nn.Module,
    suite: AttackSuite,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    grid_points: int,
) -> float:
    foolbox_model = PyTorchModel(model, bounds=(0.0, 1.0))
    started = time.perf_counter()
    for entry in suite.entries:
        top = THRESHOLDS[entry.norm]
        epsilons = (
            None
            if entry.minimization
            else [top * k / grid_points for k in range(1, grid_points + 1)]
        )
        attack = entry.build()
        for start in range(0, images.shape[0], batch_size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                attack(
                    foolbox_model,
                    images[start : start + batch_size],
                    labels[start : start + batch_size],
                    epsilons=epsilons,
                )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--grid-points", type=int, default=4)
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    model = _model(args.model)
    images, labels = load_dataset("mnist-sample", "test")
    images, labels = images[: args.n], labels[: args.n]
    suite = get_suite(args.suite)
    thresholds = {norm: THRESHOLDS[norm] for norm in suite.norms()}
    print(
        f"suite {suite.name}, n = {args.n}, batch {args.batch_size}, "
        f"grid {args.grid_points}, torch threads {torch.get_num_threads()}"
    )

    direct = _foolbox_directly(model, suite, images, labels, args.batch_size, args.grid_points)
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        run_minimal(
            model,
            images,
            labels,
            suite,
            ResultStore(directory),
            model_name="m",
            thresholds=thresholds,
            batch_size=args.batch_size,
            grid_points=args.grid_points,
            progress=False,
        )
        harness = time.perf_counter() - started
    print(
        f"(a) Foolbox directly: {direct:.1f} s  (b) harness, minimal mode: {harness:.1f} s  "
        f"b/a = {harness / direct:.3f}"
    )

    l2_suite = AttackSuite("l2", "1", suite.entries_for("l2"), "the suite's L2 attacks")
    with tempfile.TemporaryDirectory() as directory:
        store = ResultStore(directory)
        started = time.perf_counter()
        keys = run_minimal(
            model,
            images,
            labels,
            l2_suite,
            store,
            model_name="m",
            thresholds={"l2": 1.5},
            batch_size=args.batch_size,
            grid_points=args.grid_points,
            progress=False,
        )
        minimal_seconds = time.perf_counter() - started
        minimal = (
            summarize_minimal(store, keys, model="m", indices=range(args.n), thresholds={"l2": 1.5})
            .norms["l2"]
            .accuracy
        )
        started = time.perf_counter()
        keys = run_fixed(
            model,
            images,
            labels,
            l2_suite,
            store,
            model_name="m",
            norm="l2",
            epsilon=1.5,
            batch_size=args.batch_size,
            progress=False,
        )
        fixed_seconds = time.perf_counter() - started
        clean_correct = [bool(c) for c in predict(model, images) == labels]
        fixed = summarize_fixed(
            store,
            keys,
            model="m",
            indices=range(args.n),
            clean_correct=clean_correct,
            norm="l2",
            epsilon=1.5,
        ).robust_accuracy
    print(
        f"L2 at 1.5: minimal mode {minimal_seconds:.1f} s (robust accuracy {minimal:.3f}), "
        f"fixed mode {fixed_seconds:.1f} s (robust accuracy {fixed:.3f}), "
        f"speedup {minimal_seconds / fixed_seconds:.2f}x"
    )


if __name__ == "__main__":
    main()
