"""How much CUDA graphs speed up Madry adversarial training: seconds per epoch, eager vs graphed.

Run on a machine with a CUDA GPU: ``python benchmarks/cuda_graph_training.py [--epochs 2]``.
Both runs train the same Madry CNN (seed 0) with Madry et al.'s MNIST settings (PGD-40, epsilon
0.3, steps of 0.01, batches of 50, Adam 1e-4) on the 4,000 mnist-sample training digits, in the
same process, one after the other, so the printed ratio is measured side by side. Each run's
first epoch includes the lazy CUDA set-up (and the capture); the ratio is taken on the last.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from advdefense.data import load_dataset
from advdefense.defenses.adversarial_training import PGDConfig, train_madry
from advdefense.nn.madry_cnn import MadryCNN, MadryCNNConfig
from advdefense.training.checkpoint import ResumedRun
from advdefense.training.loop import TrainingConfig


class _EpochClock:
    """Seconds per epoch, read at the training loop's per-epoch checkpoint calls."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = time.perf_counter()

    def restore(self, **_: object) -> ResumedRun:
        return ResumedRun(0, [])

    def save(self, **_: object) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms first"
    )
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU; none is visible")
    device = torch.device("cuda")
    images, labels = load_dataset("mnist-sample", "train")
    config = TrainingConfig(epochs=args.epochs, batch_size=50, learning_rate=1e-4, seed=0)
    print(f"{'run':<8} " + " ".join(f"{'epoch ' + str(e + 1):>9}" for e in range(args.epochs)))
    last = {}
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        model = MadryCNN(MadryCNNConfig(in_channels=1))
        clock = _EpochClock()
        train_madry(
            model,
            images,
            labels,
            config,
            PGDConfig(),
            device=device,
            progress=False,
            checkpoint=clock,  # type: ignore[arg-type]
            cuda_graph=cuda_graph,
        )
        name = "graphed" if cuda_graph else "eager"
        last[name] = clock.seconds[-1]
        print(f"{name:<8} " + " ".join(f"{s:>8.2f}s" for s in clock.seconds))
    print(
        f"speed-up on the last epoch: {last['eager'] / last['graphed']:.1f}x "
        f"({images.shape[0]} digits, {torch.cuda.get_device_name()})"
    )


if __name__ == "__main__":
    main()
