"""Why C&W-wb samples stay stuck: the two traps in ``results/pdm/README.md``, measured.

Run after ``advdefense reproduce pdm`` (it needs the recipe's models and C&W-wb caches)::

    python scripts/diagnose_pdm_whitebox.py results/pdm/mnist-sample [--model rce --sample 3]

1. **Leaving the target class**: from a failed sample's last adversarial, plain normalized
   gradient descent on its KDE score under the target class (step 0.01 in L2, 300 steps),
   printing the score, the prediction and the gradient norm every 50 steps (from round 2's
   adversarial by default, the last before the guided round). When the score
   reaches the threshold only through other classes, the KDE term pulls C&W-wb out of the
   target class.
2. **Local modes at lone support points**: the score of every support point under its own class
   (the score an iterate sitting exactly on it would get), next to the C&W-wb threshold, and
   the distance from each support point to its nearest same-class neighbour in units of the
   bandwidth. Support points that score above the threshold are modes an attack can settle on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import advdefense
from advdefense.defenses.kde import KDEDetector

QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def _kde(directory: Path, model: str) -> KDEDetector:
    kde = advdefense.load(directory / "models" / f"{model}-kde")
    if not isinstance(kde, KDEDetector):
        raise SystemExit(f"{directory}/models/{model}-kde is not a KDE detector")
    return kde.eval()


def leave_the_target(directory: Path, model: str, sample: int, round_index: int) -> None:
    """Trap 1 on ``sample`` (a test index) of ``model``, from its adversarial of the
    ``round_index``-th round that attacked it."""
    state = json.loads((directory / "runs" / "whitebox" / f"{model}.json").read_text())
    rounds = [
        (batch, index)
        for current in state["rounds"]
        for batch in current["batches"].values()
        for index in (batch["indices"].index(sample),)
        if sample in batch["indices"]
    ]
    if not rounds:
        raise SystemExit(f"sample {sample} was not attacked in {model}'s C&W-wb cache")
    batch, position = rounds[min(round_index, len(rounds) - 1)]
    adversarials = load_file(str(directory / "runs/whitebox/adversarials" / batch["adversarials"]))
    image = adversarials["adversarials"][position : position + 1].clone()
    target = torch.tensor([batch["targets"][position]])
    kde = _kde(directory, model)
    print(
        f"{model}, sample {sample}: label {batch['labels'][position]}, target {int(target)}, "
        f"threshold {state['thresholds'][sample]:.2f}, success {batch['success'][position]}"
    )
    for step in range(301):
        image.requires_grad_(True)
        scores, score = kde.class_scores_and_score(image, target)
        (gradient,) = torch.autograd.grad(score.sum(), image)
        if step % 50 == 0:
            print(
                f"  step {step:3d}: score under the target {float(score.detach()):9.2f}, "
                f"predicted "
                f"{int(scores.argmax(1))}, gradient norm {float(gradient.norm()):.1f}"
            )
        with torch.no_grad():
            image = (image - 0.01 * gradient / (gradient.norm() + 1e-12)).clamp(0.0, 1.0)


def lone_modes(directory: Path, model: str) -> None:
    """Trap 2: how the support points of ``model``'s KDE score under their own class."""
    kde = _kde(directory, model)
    scores = kde.support_scores()
    with torch.no_grad():
        distances = torch.cdist(kde.support.double(), kde.support.double())
        same = kde.support_labels[:, None] == kde.support_labels[None, :]
        distances = distances.masked_fill(~same, torch.inf).fill_diagonal_(torch.inf)
        nearest = distances.min(1).values / kde.bandwidth
    state = json.loads((directory / "runs" / "whitebox" / f"{model}.json").read_text())
    levels = torch.tensor(QUANTILES, dtype=torch.float64)
    print(f"{model}: {kde.support.shape[0]} support points, bandwidth {kde.bandwidth:.4f}")
    print(f"  threshold (median clean score) {state['thresholds'][0]:.2f}")
    print(f"  support points' own scores at quantiles {QUANTILES}:")
    print("   ", [round(float(value), 2) for value in torch.quantile(scores, levels)])
    above = int((scores > state["thresholds"][0]).sum())
    print(f"  {above} of them score above the threshold")
    print("  nearest same-class neighbour / bandwidth, 10th / 50th / 90th percentile:")
    print("   ", [round(float(value), 2) for value in torch.quantile(nearest, levels[1:4])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="e.g. results/pdm/mnist-sample")
    parser.add_argument("--model", default="rce", help="the model of trap 1 (default rce)")
    parser.add_argument("--sample", type=int, default=3, help="its sample (default 3)")
    parser.add_argument(
        "--round", type=int, default=2, help="from its adversarial of this round (default 2)"
    )
    parser.add_argument("--modes-of", default="pdm", help="the model of trap 2 (default pdm)")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    leave_the_target(arguments.directory, arguments.model, arguments.sample, arguments.round)
    lone_modes(arguments.directory, arguments.modes_of)


if __name__ == "__main__":
    main()
