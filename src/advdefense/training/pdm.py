"""Training recipe of PDM and its baselines (Rozenberg et al., Sec. 3.4, Algorithm 1, App. B).

Four objectives on a :class:`~advdefense.nn.resnet.ResNet`, selected by
``PDMTrainingConfig.loss`` (the columns of the paper's Table 1):

==============  ==========================================================  ================
loss            objective per mini-batch                                    model output
==============  ==========================================================  ================
``ce``          CE(anchors)                                                 ``logits``
``rce``         RCE(anchors) (Pang et al. 2018)                             ``negated``
``siamese-rvl`` CE(anchors) + CE(partners) + Siamese + RVL                  ``logits``
``pdm``         RCE(anchors) + RCE(partners) + Siamese + RVL (Algorithm 1)  ``negated``
==============  ==========================================================  ================

Each term is weighted (``classification_weight``, ``siamese_weight``, ``variance_weight``; all
1 as in Algorithm 1 line 23). Partners come from the whole training set
(:func:`~advdefense.defenses.losses.sample_siamese_partners`, ``Q = 0.5``); the Siamese loss
compares anchor and partner embeddings, RVL acts on the anchors' embeddings (Algorithm 1 lines
15-22), and the classification loss acts on the raw logits ``Z``. A model trained with RCE must
have ``output="negated"`` so that its saved forward predicts ``argmax(-Z)``
(:func:`output_for_loss`, :func:`build_resnet`).

Appendix B gives: SGD, initial learning rate 0.1, L2 weight regularization 0.002, batch 128,
80 epochs on MNIST and 400 on CIFAR-10, ResNet-56, Leaky-ReLU 0.1. These are the defaults of
:class:`PDMTrainingConfig` except ``epochs`` (80; the recipe scales it). Choices the paper does
not state, recorded in the config:

* ``momentum=0.9`` and a step decay ``lr_decay=0.1`` at ``lr_milestones=(0.5, 0.75)`` of the
  total steps: Pang et al.'s RCE code (which PDM credits) uses momentum 0.9 and divides the
  rate by 10 at 10k and 15k of 20k steps on MNIST (40k/60k/80k of 90k on CIFAR-10).
* ``weight_decay=0.002`` is applied as SGD weight decay to convolution and linear weights only
  (not to BatchNorm parameters or biases), i.e. a penalty ``0.001 * ||w||^2`` (TensorFlow's
  ``l2_loss`` convention); a Keras ``l2(0.002)`` regularizer would equal ``weight_decay=0.004``.
* RVL is averaged over the classes in the batch (Eq. 5's text), not summed (Algorithm 1).
* Anchors and partners go through the network in one forward pass of ``2 x batch_size``
  images, so BatchNorm statistics are shared by the two Siamese branches.
* No data augmentation (the paper mentions none).
* ``warmup_epochs`` (default 0, as in Algorithm 1) trains the classification term alone for
  that many epochs before the Siamese and RVL terms join (:meth:`PDMTrainingConfig.for_epoch`).
  RCE's gradient on the logits is about ``K - 1`` times smaller than CE's near the uniform start
  (``softmax - R^y`` against ``softmax - onehot``), so with Algorithm 1's weights the Siamese
  term shapes the embedding; on Fashion-MNIST it merges similar classes (shirt, pullover, coat).
  A 2-epoch warm-up did not prevent that; lighter pair terms help more
  (``results/pdm/README.md``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from advdefense.defenses.losses import (
    cross_entropy_loss,
    reduce_variance_loss,
    reverse_cross_entropy_loss,
    sample_siamese_partners,
    siamese_cosine_loss,
)
from advdefense.devices import seed_everything
from advdefense.errors import InputError, UserError
from advdefense.nn.resnet import ResNet, resnet_config
from advdefense.training.checkpoint import EpochCheckpoint, TrackedRun
from advdefense.training.loop import EpochRecord, TrainingHistory
from advdefense.validation import (
    check_images,
    check_labels,
    check_positive_int,
    check_probability,
)

__all__ = [
    "LOSSES",
    "PDMEpochRecord",
    "PDMLossTerms",
    "PDMTrainingConfig",
    "build_resnet",
    "output_for_loss",
    "pdm_objective",
    "train_pdm",
]

LOSSES = ("ce", "rce", "siamese-rvl", "pdm")


def output_for_loss(loss: str) -> str:
    """The ResNet ``output`` a model trained with ``loss`` needs: ``negated`` after RCE."""
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {LOSSES}, got {loss!r}")
    return "negated" if loss in ("rce", "pdm") else "logits"


@dataclass(frozen=True)
class PDMTrainingConfig:
    """Hyperparameters of :func:`train_pdm` (App. B defaults; see the module docstring)."""

    loss: str = "pdm"
    epochs: int = 80
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-3
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_decay: float = 0.1
    same_class_probability: float = 0.5
    classification_weight: float = 1.0
    siamese_weight: float = 1.0
    variance_weight: float = 1.0
    warmup_epochs: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        output_for_loss(self.loss)
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        for name in ("learning_rate", "lr_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, got {value}")
        for name in (
            "momentum",
            "weight_decay",
            "classification_weight",
            "siamese_weight",
            "variance_weight",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be a non-negative number, got {value}")
        if any(not 0.0 < fraction < 1.0 for fraction in self.lr_milestones) or list(
            self.lr_milestones
        ) != sorted(self.lr_milestones):
            raise InputError(
                "lr_milestones must be increasing fractions of the training steps in (0, 1), "
                f"got {self.lr_milestones}"
            )
        check_probability(self.same_class_probability, "same_class_probability")
        if (
            isinstance(self.warmup_epochs, bool)
            or not isinstance(self.warmup_epochs, int)
            or not 0 <= self.warmup_epochs < self.epochs
        ):
            raise InputError(
                f"warmup_epochs must be an integer in [0, epochs - 1] = [0, {self.epochs - 1}], "
                f"got {self.warmup_epochs!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")

    @property
    def uses_pairs(self) -> bool:
        """Whether the objective has the Siamese and RVL terms (and so partner images)."""
        return self.loss in ("siamese-rvl", "pdm")

    def for_epoch(self, epoch: int) -> PDMTrainingConfig:
        """The objective of epoch ``epoch`` (1-based): during the first ``warmup_epochs`` the
        Siamese and RVL weights are 0, so only the classification term trains."""
        if epoch > self.warmup_epochs:
            return self
        return replace(self, siamese_weight=0.0, variance_weight=0.0, warmup_epochs=0)


@dataclass(frozen=True)
class PDMEpochRecord(EpochRecord):
    """One epoch's means: total loss, its terms, anchor accuracy, the last learning rate, and
    the epoch's wall time (a resumed run's total is the sum over its records)."""

    classification_loss: float
    siamese_loss: float
    variance_loss: float
    learning_rate: float
    seconds: float


class PDMLossTerms(NamedTuple):
    """The weighted objective of one batch and its (unweighted) terms."""

    total: torch.Tensor
    classification: torch.Tensor
    siamese: torch.Tensor
    variance: torch.Tensor
    anchor_scores: torch.Tensor
    """The anchors' class scores (argmax = prediction), detached."""


def build_resnet(
    architecture: str, loss: str, *, in_channels: int, num_classes: int, seed: int
) -> ResNet:
    """A freshly initialized ResNet (``resnet20``, ``resnet56``, ``resnet32-v2``, ...) whose
    ``output`` suits ``loss``, with its weights drawn after seeding with ``seed``."""
    config = resnet_config(
        architecture,
        in_channels=in_channels,
        num_classes=num_classes,
        output=output_for_loss(loss),
    )
    seed_everything(seed)
    return ResNet(config)


def pdm_objective(
    model: ResNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: PDMTrainingConfig,
    partner_images: torch.Tensor | None = None,
    partner_labels: torch.Tensor | None = None,
    same_class: torch.Tensor | None = None,
) -> PDMLossTerms:
    """The objective of ``config.loss`` on one batch (Algorithm 1 line 23 for ``pdm``).

    The partner arguments are needed for ``siamese-rvl`` and ``pdm`` only; anchors and
    partners share one forward pass. Unused terms are zero.
    """
    classify = reverse_cross_entropy_loss if config.loss in ("rce", "pdm") else cross_entropy_loss
    count = images.shape[0]
    if config.uses_pairs:
        if partner_images is None or partner_labels is None or same_class is None:
            raise InputError(
                f"loss {config.loss!r} needs partner_images, partner_labels and same_class"
            )
        embeddings = model.embed(torch.cat([images, partner_images]))
        logits = model.logits_from_embedding(embeddings)
        anchors, partners = embeddings[:count], embeddings[count:]
        classification = classify(logits[:count], labels) + classify(logits[count:], partner_labels)
        siamese = siamese_cosine_loss(anchors, partners, same_class)
        variance = reduce_variance_loss(anchors, labels)
    else:
        anchors = model.embed(images)
        logits = model.logits_from_embedding(anchors)
        classification = classify(logits, labels)
        siamese = variance = logits.new_zeros(())
    total = (
        config.classification_weight * classification
        + config.siamese_weight * siamese
        + config.variance_weight * variance
    )
    scores = model.scores_from_embedding(anchors[:count].detach())
    return PDMLossTerms(total, classification, siamese, variance, scores.detach())


def _optimizer(model: nn.Module, config: PDMTrainingConfig) -> torch.optim.SGD:
    """SGD with weight decay on convolution and linear weights only (module docstring)."""
    decayed = [parameter for parameter in model.parameters() if parameter.dim() > 1]
    plain = [parameter for parameter in model.parameters() if parameter.dim() <= 1]
    return torch.optim.SGD(
        [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        momentum=config.momentum,
    )


def train_pdm(
    model: ResNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: PDMTrainingConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    checkpoint: EpochCheckpoint | None = None,
    reference_accuracies: Sequence[float] = (),
) -> tuple[ResNet, TrainingHistory]:
    """Train ``model`` on ``(images, labels)`` with ``config.loss``; return it and its history.

    ``model.config.output`` must match the loss (:func:`output_for_loss`). Shuffling and
    partner draws use a generator seeded with ``config.seed``; seed before building the model
    (:func:`build_resnet`) for reproducible weights. The history holds one
    :class:`PDMEpochRecord` per epoch. The model is left in eval mode on ``device``.
    With a ``checkpoint``, the state is saved after every epoch and an interrupted run with
    the same config, architecture and data resumes from its last finished epoch; the caller
    removes the state once the model is saved. ``reference_accuracies``, an earlier run's
    training accuracy per epoch, makes the first epoch that departs from it warn: the weights
    will not be that run's (other torch threads or CPU kernels), an hour before the end.
    """
    if not isinstance(model, ResNet):
        raise InputError(f"model must be an advdefense ResNet, got {type(model).__name__}")
    if not isinstance(config, PDMTrainingConfig):
        raise InputError(f"config must be a PDMTrainingConfig, got {type(config).__name__}")
    expected_output = output_for_loss(config.loss)
    if model.config.output != expected_output:
        raise InputError(
            f"loss {config.loss!r} needs a ResNet with output={expected_output!r}, got "
            f"output={model.config.output!r}; build it with build_resnet(...) or "
            f"ResNetConfig(output={expected_output!r})"
        )
    check_images(images, "images", channels=model.config.in_channels)
    check_labels(labels, "labels", num_classes=model.config.num_classes, batch_size=len(images))
    device = device or next(model.parameters()).device
    generator = seed_everything(config.seed)
    model.to(device).train()
    optimizer = _optimizer(model, config)
    count = images.shape[0]
    batches_per_epoch = math.ceil(count / config.batch_size)
    total_steps = config.epochs * batches_per_epoch
    milestones = sorted({round(fraction * total_steps) for fraction in config.lr_milestones})
    identity = {
        "trainer": "pdm",
        "config": asdict(config),
        "model": asdict(model.config),
    }
    run = TrackedRun(checkpoint, identity, (images, labels), model, optimizer, generator)
    resumed = run.restore()
    pool_labels = labels.cpu()
    history = TrainingHistory()
    history.epochs.extend(resumed.records_as(PDMEpochRecord))
    step = resumed.epochs_done * batches_per_epoch
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"train {config.loss}",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    try:
        for epoch in range(resumed.epochs_done + 1, config.epochs + 1):
            epoch_started = time.perf_counter()
            order = torch.randperm(count, generator=generator)
            sums = torch.zeros(4, dtype=torch.float64)
            correct, rate = 0, config.learning_rate
            epoch_config = config.for_epoch(epoch)
            for start in range(0, count, config.batch_size):
                index = order[start : start + config.batch_size]
                batch_labels = pool_labels[index]
                partner_images = partner_labels = same_class = None
                if config.uses_pairs:
                    partners = sample_siamese_partners(
                        batch_labels, pool_labels, config.same_class_probability, generator
                    )
                    partner_images = images[partners.indices].to(device)
                    partner_labels = pool_labels[partners.indices].to(device)
                    same_class = partners.same_class.to(device)
                optimizer.zero_grad(set_to_none=True)
                terms = pdm_objective(
                    model,
                    images[index].to(device),
                    batch_labels.to(device),
                    epoch_config,
                    partner_images,
                    partner_labels,
                    same_class,
                )
                if not bool(torch.isfinite(terms.total)):
                    raise UserError(
                        f"training diverged at epoch {epoch} (loss {float(terms.total)}); "
                        "lower learning_rate"
                    )
                terms.total.backward()  # type: ignore[no-untyped-call]
                rate = config.learning_rate * config.lr_decay ** sum(
                    step >= milestone for milestone in milestones
                )
                for group in optimizer.param_groups:
                    group["lr"] = rate
                optimizer.step()
                step += 1
                values = (terms.total, terms.classification, terms.siamese, terms.variance)
                sums += torch.tensor([float(value.detach()) for value in values]) * len(index)
                correct += int((terms.anchor_scores.argmax(1).cpu() == batch_labels).sum())
                bar.update(1)
            means = (sums / count).tolist()
            record = PDMEpochRecord(
                epoch=epoch,
                loss=means[0],
                accuracy=correct / count,
                classification_loss=means[1],
                siamese_loss=means[2],
                variance_loss=means[3],
                learning_rate=rate,
                seconds=time.perf_counter() - epoch_started,
            )
            history.epochs.append(record)
            run.save(history.epochs)
            _warn_on_departure(record, reference_accuracies, history)
            bar.set_postfix(epoch=epoch, loss=f"{record.loss:.4f}", acc=f"{record.accuracy:.4f}")
    finally:
        bar.close()
        model.eval()
    _warn_if_near_chance(history, model.config.num_classes, config)
    return model, history


def _warn_on_departure(
    record: PDMEpochRecord, reference: Sequence[float], history: TrainingHistory
) -> None:
    """Warn at the first epoch whose training accuracy differs from ``reference``'s."""
    earlier = [r for r in history.epochs if r.epoch < record.epoch]
    if record.epoch > len(reference) or any(
        r.epoch <= len(reference) and r.accuracy != reference[r.epoch - 1] for r in earlier
    ):
        return  # nothing to compare, or already reported
    if record.accuracy != reference[record.epoch - 1]:
        warnings.warn(
            f"epoch {record.epoch}: training accuracy {record.accuracy:.6f}, not the "
            f"{reference[record.epoch - 1]:.6f} of the run this one repeats, so the weights "
            "will differ from that run's and what was computed on them is redone; a retrain "
            "repeats a run only with its torch thread count and CPU kernels (OMP_NUM_THREADS, "
            "ATEN_CPU_CAPABILITY)",
            stacklevel=3,
        )


def _warn_if_near_chance(
    history: TrainingHistory, num_classes: int, config: PDMTrainingConfig
) -> None:
    """Warn when the last epoch's training accuracy is below twice chance level."""
    accuracy = history.epochs[-1].accuracy
    if accuracy < 2.0 / num_classes:
        hint = (
            "; with the RVL term the embeddings may have collapsed to one point (RVL is "
            "minimized by any constant embedding): train longer or lower variance_weight"
            if config.uses_pairs and config.variance_weight > 0
            else "; train longer or check the learning rate"
        )
        warnings.warn(
            f"{config.loss} training ended at accuracy {accuracy:.3f}, near chance "
            f"({1 / num_classes:.3f}){hint}",
            UserWarning,
            stacklevel=3,
        )
