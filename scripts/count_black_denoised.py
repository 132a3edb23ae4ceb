"""Count test images whose binarized DIM denoiser output is all black (Eq. 3's denominator 0).

Usage: ``python scripts/count_black_denoised.py MODEL_DIR DATASET [N ...]``, e.g.
``python scripts/count_black_denoised.py results/dim/fashion-mnist/models/bidim fashion-mnist
200 1000``: per N, among the first N test images, how many have an all-black binarized D(x)
and how many of those the model classifies correctly (the images where the floor of Eq. 3's
denominator matters; see ``advdefense.defenses.dim``).
"""

from __future__ import annotations

import argparse

import torch

import advdefense
from advdefense.data import load_dataset
from advdefense.defenses.dim import InternalModelClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("dataset")
    parser.add_argument("n", type=int, nargs="+")
    arguments = parser.parse_args()
    model = advdefense.load(arguments.model_dir).eval()
    if not isinstance(model, InternalModelClassifier):
        parser.error(f"{arguments.model_dir} holds a {type(model).__name__}, not a DIM model")
    test = load_dataset(arguments.dataset, "test")
    for n in arguments.n:
        images, labels = test.images[:n], test.labels[:n]
        with torch.no_grad():
            black = model.denoise(images).flatten(1).abs().sum(1) == 0
            correct = model(images).argmax(1) == labels
        print(
            f"first {n}: {int(black.sum())} all-black D(x), "
            f"{int((black & correct).sum())} of them classified correctly"
        )


if __name__ == "__main__":
    main()
