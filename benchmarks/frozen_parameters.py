"""What freezing the weights saves a Foolbox attack: gradient steps per second, side by side.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/frozen_parameters.py [--repeats 7]``.

Foolbox takes input gradients with eagerpy's ``loss.backward()``, which also computes every
weight's gradient unless the weights are frozen; the harness attacks inside
:func:`advdefense.modes.attack_mode`, which freezes them. For the ABS CNN, DIM and a ResNet-20
(seed-0 initialisation: weights do not change the cost) this times the step every Foolbox
gradient attack repeats (cross-entropy value and input gradient through ``PyTorchModel``, batch
100 of mnist-sample's test digits) with the weights trainable and frozen, in alternating rounds
in one process, so that load on a shared machine hits both alike; it reports each setting's
median round, their ratio, and whether the input gradients are bit for bit the same.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
from eagerpy.astensor import astensor
from eagerpy.framework import crossentropy, value_and_grad
from eagerpy.tensor.tensor import Tensor
from foolbox.models.pytorch import PyTorchModel
from torch import nn

from advdefense.data import load_dataset
from advdefense.defenses.dim import DIM
from advdefense.modes import attack_mode, evaluation_mode
from advdefense.nn import AbsCNN
from advdefense.nn.resnet import ResNet, resnet_config

BATCH = 100
STEPS = 5  # gradient steps per round


def _gradient_steps(model: nn.Module, images: Tensor, labels: Tensor) -> torch.Tensor:
    """``STEPS`` Foolbox gradient steps; the last input gradient."""
    foolbox_model = PyTorchModel(model, bounds=(0.0, 1.0))

    def loss(inputs: Tensor) -> Tensor:
        return crossentropy(foolbox_model(inputs), labels).sum()

    gradients = [value_and_grad(loss, images)[1] for _ in range(STEPS)]
    model.zero_grad(set_to_none=True)  # what a trainable model accumulated
    last: torch.Tensor = gradients[-1].raw
    return last


def _mode(model: nn.Module, frozen: bool) -> contextlib.AbstractContextManager[nn.Module]:
    return attack_mode(model) if frozen else evaluation_mode(model)


@contextlib.contextmanager
def _timed(seconds: list[float]) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.manual_seed(0)
    models = {
        "abs-cnn": AbsCNN(),
        "dim": DIM(),
        "resnet20": ResNet(resnet_config("resnet20", in_channels=1)),
    }
    data = load_dataset("mnist-sample", "test")
    images, labels = astensor(data.images[:BATCH]), astensor(data.labels[:BATCH])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {BATCH}")
    print(f"{'model':<9} {'trainable steps/s':>18} {'frozen steps/s':>15} {'ratio':>6}  same")
    for name, model in models.items():
        seconds: dict[bool, list[float]] = {False: [], True: []}
        gradients: dict[bool, torch.Tensor] = {}
        for round_index in range(args.repeats + 1):  # round 0 warms up
            for frozen in (False, True):
                with _mode(model, frozen), _timed(seconds[frozen]):
                    gradients[frozen] = _gradient_steps(model, images, labels)
                if round_index == 0:
                    seconds[frozen].clear()
        rate = {frozen: STEPS / statistics.median(times) for frozen, times in seconds.items()}
        same = torch.equal(gradients[False], gradients[True])
        print(
            f"{name:<9} {rate[False]:>18.2f} {rate[True]:>15.2f} "
            f"{rate[True] / rate[False]:>5.2f}x  {'yes' if same else 'NO'}"
        )


if __name__ == "__main__":
    main()
