"""Training recipe of the DIM family (Liu et al. 2022, Sec. 3.2 Eq. 1-2, Appendix A.1.1).

Two stages, each with Adam (lr 1e-3) on mean squared error:

1. the denoiser ``D`` reconstructs clean images from noisy ones (Eq. 1); skipped for the
   variants without denoiser;
2. the internal models learn, from noisy (and dimmed) versions of the frozen denoiser's output
   ``z = D(x + noise)``, to reproduce ``z`` for their own class and a black image otherwise
   (Eq. 2, with the indicator the right way round). Without denoiser, ``z`` is the clean image.

Noise at every stage (Appendix A.1.1): uniform noise in [-0.5, 0.5] per pixel plus L0 noise
(+1 with probability 1/12, -1 with probability 1/12, per pixel); the internal models' inputs are
then multiplied by a per-image brightness factor drawn from [0, 1].

Choices the paper leaves open, recorded in :class:`DIMTrainingConfig`:

* ``clip_noisy_inputs=False``: noisy inputs are not clipped to [0, 1]; the paper describes
  additive noise only, and clipping would erase most of the +-1 L0 noise (a +1 on a white pixel
  or a -1 on a black one would vanish).
* ``denoiser_epochs=10, internal_epochs=20, batch_size=128``: not given in the paper. The
  internal models see each class as only 10% of their positives, so they get more epochs.
* The internal models' target is the denoiser's output ``z`` (Eq. 2 applies the indicator to the
  same ``x`` that is fed in), so they learn to reproduce what they receive at inference.
* The denoiser is trained on its raw Tanh output (the inference-time clamp to [0, 1] would
  block gradients of out-of-range pixels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from advdefense.defenses.dim import InternalModelClassifier
from advdefense.devices import seed_everything
from advdefense.errors import InputError
from advdefense.validation import (
    check_images,
    check_labels,
    check_positive_int,
    check_probability,
)

__all__ = [
    "DIMTrainingConfig",
    "add_training_noise",
    "denoiser_loss",
    "internal_models_loss",
    "random_brightness",
    "train_dim_family",
]


@dataclass(frozen=True)
class DIMTrainingConfig:
    """Hyperparameters of :func:`train_dim_family`; save with ``training=asdict(config)``."""

    denoiser_epochs: int = 10
    internal_epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3
    uniform_noise: float = 0.5
    l0_noise_probability: float = 1 / 12
    brightness: bool = True
    clip_noisy_inputs: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.denoiser_epochs, "denoiser_epochs")
        check_positive_int(self.internal_epochs, "internal_epochs")
        check_positive_int(self.batch_size, "batch_size")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")
        _check_noise(self.uniform_noise, self.l0_noise_probability, "l0_noise_probability")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an integer, got {self.seed!r}")


def _check_noise(uniform_noise: float, l0_probability: float, l0_name: str) -> None:
    if not math.isfinite(uniform_noise) or uniform_noise < 0:
        raise InputError(f"uniform_noise must be non-negative, got {uniform_noise}")
    check_probability(l0_probability, l0_name)
    if l0_probability > 0.5:
        raise InputError(
            f"{l0_name} is the chance of +1 and, separately, of -1, so it must be at most 0.5, "
            f"got {l0_probability}"
        )


def _uniform(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) values drawn from the (CPU) ``generator``, on ``like``'s device."""
    values = torch.rand(shape, generator=generator, device=generator.device)
    return values.to(device=like.device, dtype=like.dtype)


def add_training_noise(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    uniform_noise: float = 0.5,
    l0_probability: float = 1 / 12,
    clip: bool = False,
) -> torch.Tensor:
    """``images`` plus U[-uniform_noise, uniform_noise] noise and +-1 L0 noise per value
    (+1 with probability ``l0_probability``, -1 with the same probability); Appendix A.1.1."""
    _check_noise(uniform_noise, l0_probability, "l0_probability")
    uniform = (2.0 * _uniform(images.shape, generator, images) - 1.0) * uniform_noise
    draw = _uniform(images.shape, generator, images)
    flips = (draw < l0_probability).to(images.dtype) - (draw >= 1.0 - l0_probability).to(
        images.dtype
    )
    noisy = images + uniform + flips
    return noisy.clamp(0.0, 1.0) if clip else noisy


def random_brightness(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Multiply each image (first dimension) by its own factor drawn from U[0, 1]."""
    shape = (images.shape[0],) + (1,) * (images.dim() - 1)
    return images * _uniform(torch.Size(shape), generator, images)


def _noisy(
    images: torch.Tensor, generator: torch.Generator, config: DIMTrainingConfig
) -> torch.Tensor:
    return add_training_noise(
        images,
        generator,
        uniform_noise=config.uniform_noise,
        l0_probability=config.l0_noise_probability,
        clip=config.clip_noisy_inputs,
    )


def denoiser_loss(
    model: InternalModelClassifier,
    flat_images: torch.Tensor,
    generator: torch.Generator,
    config: DIMTrainingConfig,
) -> torch.Tensor:
    """Eq. 1 on a batch of flattened clean images: MSE of ``D(x + noise)`` against ``x``."""
    if model.denoiser is None:
        raise InputError(f"{type(model).__name__} has no denoiser to train")
    reconstruction: torch.Tensor = model.denoiser(_noisy(flat_images, generator, config))
    return functional.mse_loss(reconstruction, flat_images)


def internal_models_loss(
    model: InternalModelClassifier,
    flat_images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    config: DIMTrainingConfig,
) -> torch.Tensor:
    """Eq. 2 averaged over the K internal models, on the frozen denoiser's outputs."""
    with torch.no_grad():
        if model.denoiser is None:
            denoised = flat_images
        else:
            denoised = model.apply_denoiser(_noisy(flat_images, generator, config))
    inputs = _noisy(denoised, generator, config)
    if config.brightness:
        inputs = random_brightness(inputs, generator)
    outputs = model.apply_internal_models(inputs)
    own_class = functional.one_hot(labels, model.config.num_classes).to(denoised.dtype)
    targets = own_class.unsqueeze(2) * denoised.unsqueeze(1)
    return functional.mse_loss(outputs, targets)


def _run_stage(
    name: str,
    parameters: Iterator[nn.Parameter],
    epochs: int,
    count: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    config: DIMTrainingConfig,
    generator: torch.Generator,
    progress: bool,
) -> float:
    """Adam over shuffled mini-batches; return the last epoch's mean loss."""
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    batches = math.ceil(count / config.batch_size)
    bar = tqdm(total=epochs * batches, desc=name, unit="batch", disable=not progress, leave=False)
    epoch_loss = math.nan
    try:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(count, generator=generator)
            total = 0.0
            for start in range(0, count, config.batch_size):
                index = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss(index)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total += float(loss.detach()) * index.numel()
                bar.update(1)
            epoch_loss = total / count
            bar.set_postfix(epoch=epoch, loss=f"{epoch_loss:.4f}")
    finally:
        bar.close()
    return epoch_loss


def train_dim_family(
    model: InternalModelClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: DIMTrainingConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train the denoiser (Eq. 1), then the internal models (Eq. 2); return final losses.

    The keys are ``denoiser`` (absent without denoiser) and ``internal_models``: the mean
    training loss of each stage's last epoch. The model is left in eval mode on ``device``.
    """
    if not isinstance(model, InternalModelClassifier):
        raise InputError(
            f"model must be a DIM-family model, got {type(model).__name__}; see "
            "advdefense.defenses.dim"
        )
    channels, height, width = model.config.image_shape
    check_images(images, "images", channels=channels, height=height, width=width)
    check_labels(labels, "labels", num_classes=model.config.num_classes, batch_size=len(images))
    if not isinstance(config, DIMTrainingConfig):
        raise InputError(f"config must be a DIMTrainingConfig, got {type(config).__name__}")
    device = device or next(model.parameters()).device
    generator = seed_everything(config.seed)
    model.to(device).eval()
    flat_images = images.flatten(1)
    count = flat_images.shape[0]

    def batch(index: torch.Tensor) -> torch.Tensor:
        return flat_images[index].to(device)

    losses: dict[str, float] = {}
    try:
        if model.denoiser is not None:
            denoiser = model.denoiser
            denoiser.train()
            losses["denoiser"] = _run_stage(
                "denoiser",
                denoiser.parameters(),
                config.denoiser_epochs,
                count,
                lambda index: denoiser_loss(model, batch(index), generator, config),
                config,
                generator,
                progress,
            )
            denoiser.eval()
        internal = [p for name, p in model.named_parameters() if not name.startswith("denoiser.")]
        model.internal_models.train()
        if model.shared_encoder is not None:
            model.shared_encoder.train()
        losses["internal_models"] = _run_stage(
            "internal models",
            iter(internal),
            config.internal_epochs,
            count,
            lambda index: internal_models_loss(
                model, batch(index), labels[index].to(device), generator, config
            ),
            config,
            generator,
            progress,
        )
    finally:
        model.eval()
    return losses
