"""Why PDM training stalls near 68% on Fashion-MNIST: which loss term merges which classes.

Trains variants of the PDM objective on the first ``--n-train`` training images and, for each,
prints its per-epoch loss terms and then, on the first ``--n-test`` test images: per-class
accuracy, the class pairs it confuses most, the cosine between class centroids of the
embedding (Siamese pairs of different classes are trained towards 0), and the mean embedding
norm per class. On the last training batch it also prints the gradient norm of each loss term
and the cosine between the classification and Siamese gradients::

    python scripts/diagnose_pdm_plateau.py --dataset fashion-mnist --n-train 10000 --epochs 6 \
        --variants pdm,siamese-rvl,pdm:siamese=0 --out runs/pdm-plateau.json

A variant is ``LOSS[:key=value,...]`` with keys ``classification``, ``siamese``, ``variance``
(term weights), ``q`` (the same-class probability) and ``warmup`` (epochs of the classification
term alone); the defaults are the recipe's (Siamese 1, RVL 0.1, Q 0.5, no warm-up). Variants are
separated by commas (or semicolons).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional

from advdefense.data import load_dataset
from advdefense.defenses.losses import sample_siamese_partners
from advdefense.nn.resnet import ResNet
from advdefense.training.pdm import (
    LOSSES,
    PDMEpochRecord,
    PDMTrainingConfig,
    build_resnet,
    pdm_objective,
    train_pdm,
)

RECIPE_VARIANCE_WEIGHT = 0.1  # recipes/pdm.py's VARIANCE_WEIGHT (a test keeps them equal)
LOSSES_WITH_PAIRS = tuple(loss for loss in LOSSES if PDMTrainingConfig(loss=loss).uses_pairs)

KEYS = {
    "classification": "classification_weight",
    "siamese": "siamese_weight",
    "variance": "variance_weight",
    "q": "same_class_probability",
    "warmup": "warmup_epochs",
}


def parse_variant(text: str, epochs: int, seed: int) -> PDMTrainingConfig:
    """``pdm:siamese=0,variance=0.1`` -> the recipe's config with those fields replaced."""
    loss, _, options = text.partition(":")
    fields: dict[str, Any] = {
        "loss": loss,
        "epochs": epochs,
        "seed": seed,
        "variance_weight": RECIPE_VARIANCE_WEIGHT if loss in LOSSES_WITH_PAIRS else 1.0,
    }
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key not in KEYS:
            raise SystemExit(f"unknown variant option {key!r}; use one of {sorted(KEYS)}")
        fields[KEYS[key]] = int(value) if key == "warmup" else float(value)
    return PDMTrainingConfig(**fields)


def split_variants(text: str) -> list[str]:
    """``"pdm,pdm:siamese=0.1,variance=0.01"`` -> ``["pdm", "pdm:siamese=0.1,variance=0.01"]``:
    a comma starts a new variant unless what follows is another ``key=value`` option."""
    variants: list[str] = []
    for token in filter(None, (part.strip() for part in re.split(r"[;,]", text))):
        if "=" in token and ":" not in token and variants:
            variants[-1] += ("," if ":" in variants[-1] else ":") + token
        else:
            variants.append(token)
    return variants


def _embeddings(model: ResNet, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.embed(chunk) for chunk in torch.split(images, 500)])


def test_statistics(model: ResNet, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Per-class accuracy, top confusions, centroid cosines and norms on a test subset."""
    embeddings = _embeddings(model, images)
    with torch.no_grad():
        predictions = model.scores_from_embedding(embeddings).argmax(1)
    classes = int(labels.max()) + 1
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    off = confusion.clone()
    off.fill_diagonal_(0)
    top = sorted(
        ((int(off[a, b]), a, b) for a in range(classes) for b in range(classes) if off[a, b]),
        reverse=True,
    )[:6]
    centroids = torch.stack([embeddings[labels == c].mean(0) for c in range(classes)])
    cosines = functional.cosine_similarity(centroids.unsqueeze(1), centroids.unsqueeze(0), dim=2)
    norms = [float(embeddings[labels == c].norm(dim=1).mean()) for c in range(classes)]
    return {
        "accuracy": float((predictions == labels).double().mean()),
        "per_class_accuracy": [round(value, 3) for value in per_class],
        "top_confusions": [{"true": a, "predicted": b, "count": n} for n, a, b in top],
        "centroid_cosine": [[round(float(v), 3) for v in row] for row in cosines],
        "mean_norm": [round(value, 3) for value in norms],
        "dead_dimensions": int((embeddings.abs().max(0).values < 1e-6).sum()),
    }


def gradient_terms(
    model: ResNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: PDMTrainingConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Gradient norm of each weighted term on one batch, and cos(classification, Siamese)."""
    partners = sample_siamese_partners(labels, labels, config.same_class_probability, generator)
    model.train()
    terms = pdm_objective(
        model,
        images,
        labels,
        config,
        images[partners.indices],
        labels[partners.indices],
        partners.same_class,
    )
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    weighted = {
        "classification": config.classification_weight * terms.classification,
        "siamese": config.siamese_weight * terms.siamese,
        "variance": config.variance_weight * terms.variance,
    }
    flat: dict[str, torch.Tensor] = {}
    for name, value in weighted.items():
        if not value.requires_grad:
            continue
        grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        flat[name] = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).flatten()
                for g, p in zip(grads, parameters, strict=True)
            ]
        )
    model.eval()
    result = {f"{name}_gradient_norm": float(vector.norm()) for name, vector in flat.items()}
    if "classification" in flat and "siamese" in flat:
        result["cos_classification_siamese"] = float(
            functional.cosine_similarity(flat["classification"], flat["siamese"], dim=0)
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="pdm,siamese-rvl,pdm:siamese=0")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of all results")
    args = parser.parse_args()

    train, test = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    images, labels = train.images[: args.n_train], train.labels[: args.n_train]
    test_images, test_labels = test.images[: args.n_test], test.labels[: args.n_test]
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for variant in split_variants(args.variants):
        config = parse_variant(variant, args.epochs, args.seed)
        key = f"{variant}|{args.dataset}|n={args.n_train}|epochs={args.epochs}|seed={args.seed}"
        if key in results:
            print(f"{key}: cached")
            continue
        model = build_resnet(
            args.arch, config.loss, in_channels=images.shape[1], num_classes=10, seed=config.seed
        )
        model, history = train_pdm(model, images, labels, config)
        generator = torch.Generator().manual_seed(config.seed)
        records = [record for record in history.epochs if isinstance(record, PDMEpochRecord)]
        entry: dict[str, Any] = {
            "config": {k: v for k, v in vars(config).items() if k != "lr_milestones"},
            "epochs": [
                {
                    "accuracy": round(record.accuracy, 4),
                    "classification": round(record.classification_loss, 4),
                    "siamese": round(record.siamese_loss, 4),
                    "variance": round(record.variance_loss, 4),
                }
                for record in records
            ],
            "test": test_statistics(model, test_images, test_labels),
            "gradients": gradient_terms(model, images[:128], labels[:128], config, generator)
            if config.uses_pairs
            else {},
        }
        results[key] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(key)
        for epoch, record in enumerate(entry["epochs"], 1):
            print(f"  epoch {epoch}: {record}")
        stats = entry["test"]
        print(f"  test accuracy {stats['accuracy']:.4f}; per class {stats['per_class_accuracy']}")
        print(f"  top confusions {stats['top_confusions']}")
        print(f"  mean norm per class {stats['mean_norm']}; dead dims {stats['dead_dimensions']}")
        print(f"  gradients {entry['gradients']}")


if __name__ == "__main__":
    main()
