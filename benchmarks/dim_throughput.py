"""Inference throughput of DIM and biDIM next to the ABS CNN (samples/s, batch 256, CPU).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dim_throughput.py [--repeats 7]
[--dim DIR] [--cnn DIR]``. All models classify the same 2,560 mnist-sample test digits
(10 batches of 256) in one process; the rounds alternate between the models so that load on a
shared machine hits all of them alike, and each model's median round is reported with its ratio
to the CNN's. Two columns: prediction only (``torch.no_grad``), and forward + backward to the
input with the weights frozen, which is what every gradient attack pays per step in the harness
(:func:`advdefense.modes.attack_mode`; for biDIM through its first declared
surrogate, the sigmoid proxy; an attack pays that once per surrogate). Weights do not change the
cost: with no ``--dim`` / ``--cnn`` the models keep their seed-0 initialisation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import advdefense
from advdefense.data import load_dataset
from advdefense.declaration import declaration_of
from advdefense.defenses.dim import DIM, BiDIM
from advdefense.modes import attack_mode
from advdefense.nn import AbsCNN

BATCH = 256
BATCHES = 10


def _predict(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(batch).argmax(dim=1)


def _gradient(model: nn.Module, batches: list[torch.Tensor]) -> None:
    surrogates = declaration_of(model).surrogates
    target = next(iter(surrogates.values())) if surrogates else model
    with attack_mode(model):  # as the harness attacks: weights frozen
        for batch in batches:
            inputs = batch.clone().requires_grad_(True)
            target(inputs).sum().backward()


def _rounds(
    models: dict[str, nn.Module],
    work: Callable[[nn.Module, list[torch.Tensor]], None],
    batches: list[torch.Tensor],
    repeats: int,
) -> dict[str, float]:
    """Median samples/s per model over ``repeats`` alternating rounds (after one warm-up)."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(repeats + 1):
        for name, model in models.items():
            started = time.perf_counter()
            work(model, batches)
            if round_index > 0:
                seconds[name].append(time.perf_counter() - started)
    samples = BATCH * len(batches)
    return {name: samples / statistics.median(times) for name, times in seconds.items()}


def _load(path: Path | None, default: nn.Module) -> nn.Module:
    return (advdefense.load(path) if path is not None else default).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--dim", type=Path, help="a saved DIM (default: seed-0 initialisation)")
    parser.add_argument("--cnn", type=Path, help="a saved CNN (default: seed-0 initialisation)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.manual_seed(0)
    dim = _load(args.dim, DIM())
    bidim = BiDIM()
    bidim.load_state_dict(dim.state_dict())  # biDIM is DIM's weights, binarized at inference
    models = {"cnn": _load(args.cnn, AbsCNN()), "dim": dim, "bidim": bidim.eval()}
    images = load_dataset("mnist-sample", "test").images
    needed = BATCH * BATCHES
    images = images.repeat(-(-needed // images.shape[0]), 1, 1, 1)[:needed]
    batches = list(torch.split(images, BATCH))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {BATCH}")
    predict = _rounds(models, _predict, batches, args.repeats)
    gradient = _rounds(models, _gradient, batches, args.repeats)
    print(f"{'model':<6} {'predict/s':>10} {'vs cnn':>7} {'fwd+bwd/s':>10} {'vs cnn':>7}")
    for name in models:
        print(
            f"{name:<6} {predict[name]:>10.0f} {predict[name] / predict['cnn']:>6.2f}x "
            f"{gradient[name]:>10.0f} {gradient[name] / gradient['cnn']:>6.2f}x"
        )


if __name__ == "__main__":
    main()
