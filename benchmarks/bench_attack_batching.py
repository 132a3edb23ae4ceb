"""How much batching speeds up attack evaluation: seconds per attack at two batch sizes.

Run: ``.venv/bin/python benchmarks/bench_attack_batching.py [--n 100]``. Both settings run in
the same process on the same 100 mnist-sample test digits and the same (randomly initialised,
seed 0) ABS CNN, so the printed ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from advdefense.attacks import get_attack
from advdefense.attacks.suites import AttackSuite
from advdefense.data import load_dataset
from advdefense.evaluation.runner import run_fixed
from advdefense.evaluation.store import ResultStore
from advdefense.nn import AbsCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100, help="test digits (default 100)")
    parser.add_argument("--small", type=int, default=10, help="small batch size (default 10)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AbsCNN().eval()
    images, labels = load_dataset("mnist-sample", "test")
    images, labels = images[: args.n], labels[: args.n]
    print(f"{'attack':<12} {'batch ' + str(args.small):>10} {'batch ' + str(args.n):>10} ratio")
    for attack_id, epsilon in (("fgsm", 0.3), ("l2-deepfool", 1.5)):
        entry = get_attack(attack_id)
        suite = AttackSuite(attack_id, "1", (entry,), "batching benchmark")
        seconds = []
        for batch_size in (args.small, args.n):
            with tempfile.TemporaryDirectory() as scratch, ResultStore(Path(scratch)) as store:
                started = time.perf_counter()
                run_fixed(
                    model,
                    images,
                    labels,
                    suite,
                    store,
                    model_name="abs-cnn",
                    norm=entry.norm,
                    epsilon=epsilon,
                    batch_size=batch_size,
                    progress=False,
                )
                seconds.append(time.perf_counter() - started)
        print(
            f"{attack_id:<12} {seconds[0]:>9.2f}s {seconds[1]:>9.2f}s "
            f"{seconds[0] / seconds[1]:.1f}x"
        )


if __name__ == "__main__":
    main()
