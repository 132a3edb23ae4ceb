"""Recipe: the ABS-paper CNN trained on mnist-sample, under the demo's four attacks.

Run with ``advdefense reproduce cnn_mnist_sample [--n 1000] [--out results]``. Data: the
embedded MNIST sample (train 4,000 / test 1,000, split of ``default_rng(0)``); the first ``n``
test digits are attacked (default all 1,000). Writes ``<out>/cnn_mnist_sample/``: the model,
and in ``run/`` the resumable records, ``report.md``, ``report.json`` and
``accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from advdefense.demo import DemoOptions, run_demo

DEFAULT_N = 1000


def reproduce(out: Path, device: torch.device, seed: int, progress: bool, n: int | None) -> None:
    """Train, evaluate and report into ``out / "cnn_mnist_sample"``."""
    result = run_demo(
        DemoOptions(
            out=Path(out) / "cnn_mnist_sample",
            n=n or DEFAULT_N,
            seed=seed,
            device=device,
            progress=progress,
        )
    )
    print(result.table)
    print(
        f"wrote {', '.join(str(path) for path in result.files.values())} in {result.seconds:.0f} s"
    )
