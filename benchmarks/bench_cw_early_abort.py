"""What C&W-wb's per-sample early abort saves: seconds and image-steps, with and without it.

Run: ``.venv/bin/python benchmarks/bench_cw_early_abort.py [--dataset fashion-mnist]
[--model ce] [--n 10] [--steps 1000]`` after ``advdefense reproduce pdm`` has trained the model
and fitted its KDE (under ``results/pdm/<dataset>/models/``). Both settings attack the same
first ``n`` test images in one process, as the PDM recipe's white-box stage does (a random
target per sample, the KDE of the target class, its median clean score as the threshold),
with both phases at ``steps`` steps x 3 binary-search steps (the recipe: 5,000 / 10,000).
The early abort stops each sample once its loss fell by less than 0.01% over a tenth of the
steps, and the sample leaves the batch; without it every sample runs every step. Printed:
wall time, image-steps (rows through the classifier, summed over forward passes), successes
and the mean L2 distortion of the successes, for both, and the ratios.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import advdefense
from advdefense.attacks.detector_aware import CarliniWagnerDetectorAttack
from advdefense.attacks.jsma import random_targets
from advdefense.data import load_dataset
from advdefense.defenses.detector import detector_scores
from advdefense.defenses.kde import KDEDetector
from advdefense.errors import UserError
from advdefense.nn.resnet import ResNet


class _RowCounter(nn.Module):
    """``classifier`` (an embedding classifier, as the KDE needs), counting the rows of every
    embedding pass."""

    def __init__(self, classifier: ResNet) -> None:
        super().__init__()
        self.classifier = classifier
        self.rows = 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.rows += images.shape[0]
        embedding: torch.Tensor = self.classifier.embed(images)
        return embedding

    def scores_from_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.classifier.scores_from_embedding(embedding)
        return scores

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores_from_embedding(self.embed(images))


def _load(folder: Path) -> tuple[ResNet, KDEDetector]:
    if (
        not (folder / "config.json").is_file()
        or not (folder.parent / f"{folder.name}-kde").is_dir()
    ):
        raise UserError(
            f"no trained model and KDE under {folder} and {folder}-kde; train them first with "
            f"`advdefense reproduce pdm --datasets {folder.parent.parent.name} "
            f"--models {folder.name} --out {folder.parent.parent.parent.parent}`"
        )
    classifier = advdefense.load(folder).eval()
    if not isinstance(classifier, ResNet):
        raise UserError(f"{folder} holds a {type(classifier).__name__}, not a PDM-recipe ResNet")
    kde = advdefense.load(folder.parent / f"{folder.name}-kde")
    if not isinstance(kde, KDEDetector):
        raise UserError(f"{folder}-kde holds a {type(kde).__name__}, not a KDE detector")
    return classifier, kde


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="ce", help="ce, rce, siamese-rvl or pdm")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--n", type=int, default=10, help="test images (default 10)")
    parser.add_argument("--steps", type=int, default=1000, help="steps per search (both phases)")
    args = parser.parse_args()
    torch.manual_seed(0)
    classifier, kde = _load(args.results / "pdm" / args.dataset / "models" / args.model)
    counter = _RowCounter(classifier).eval()
    kde.classifier = counter  # one forward pass serves classifier and KDE, as in the recipe
    images, labels = load_dataset(args.dataset, "test")
    images, labels = images[: args.n], labels[: args.n]
    targets = random_targets(labels, kde.config.num_classes, torch.Generator().manual_seed(0))
    threshold = float(detector_scores(kde, images).median())
    attack = replace(CarliniWagnerDetectorAttack(), steps=args.steps, classifier_steps=args.steps)
    budget = args.n * args.steps * 3 * 2
    print(
        f"{args.dataset} {args.model}: first {args.n} test images, {args.steps} steps x 3 "
        f"binary-search steps per phase ({budget:,} image-steps at most), seed 0"
    )
    print(
        f"{'early abort':<12} {'seconds':>8} {'image-steps':>12} {'successes':>10} {'mean L2':>8}"
    )
    measured = []
    for abort_early in (True, False):
        counter.rows = 0
        started = time.perf_counter()
        result = replace(attack, abort_early=abort_early)(
            counter, kde, images, labels, targets=targets, threshold=threshold
        )
        seconds = time.perf_counter() - started
        distances = (result.adversarials - images).flatten(1).norm(dim=1)[result.success]
        mean = float(distances.mean()) if len(distances) else float("nan")
        successes = int(result.success.sum())
        print(
            f"{'per sample' if abort_early else 'off':<12} {seconds:>8.1f} {counter.rows:>12,} "
            f"{successes:>10} {mean:>8.3f}"
        )
        measured.append((seconds, counter.rows))
    (fast, fast_rows), (slow, slow_rows) = measured
    print(
        f"ratio (per sample / off): time {fast / slow:.2f}, image-steps {fast_rows / slow_rows:.2f}"
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
