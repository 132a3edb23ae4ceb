"""Denoised Internal Models (DIM, biDIM) and their ablations (Liu et al. 2022, MIR 19(5)).

A fully connected denoiser ``D`` (Sec. 3.2.1) feeds one autoencoder ``F_i`` per class
(Sec. 3.2.2); the score of class ``i`` is the relative L1 intensity of Eq. 3,
``||F_i(D(x))||_1 / ||D(x)||_1``, and the prediction its argmax (Eq. 4). Widths and activations
follow Appendix A.1.1. Registered architectures:

========================  ==============  ===========  ===========  ========
name                      class           denoiser     single head  binarize
========================  ==============  ===========  ===========  ========
``dim``                   DIM             yes          no           no
``bidim``                 BiDIM           yes          no           yes
``im``                    InternalModels  no           no           no
``singleim``              SingleHeadIM    no           yes          no
``dn-singleim``           DnSingleHeadIM  yes          yes          no
========================  ==============  ===========  ===========  ========

Choices the paper leaves open, recorded in :class:`DIMConfig`:

* ``clip_denoised=True``: the denoiser ends in Tanh, so it can output values in [-1, 0) although
  its targets (Eq. 1) lie in [0, 1]. Clamping to [0, 1] keeps Eq. 3's L1 norms sums of pixel
  intensities; the internal models are trained on the same clamped outputs, so training and
  inference match. The clamp is piecewise linear, so the scores stay differentiable.
* Binarization (biDIM, end of Sec. 3.2) maps ``x >= 0.5`` to 1: Appendix A.2 projects adversarial
  pixels to 0.5 "as long as it retains the same result under binarization", so 0.5 is binarized
  like 1. biDIM is trained exactly like DIM; binarization is applied at inference only.
* Eq. 2's indicator is written the wrong way round in the paper (``I_i(x) = 0`` for class i);
  the text is clear that ``F_i`` reconstructs its own class and outputs black otherwise, which is
  what :mod:`advdefense.training.dim` trains.
* A black ``D(x)`` makes Eq. 3 undefined; the denominator is floored at one pixel's intensity
  (1.0; the argmax is unchanged). biDIM's binarized ``D(x)`` is black on 46 of Fashion-MNIST's
  first 1,000 test images, and the earlier floor of ``1e-8`` (until 2026-12-03) scaled its
  surrogates' gradients there by about 1e8, which misleads attacks that use their size.

How to attack them (:meth:`InternalModelClassifier.attack_declaration`): biDIM's binarization
has zero gradient, so it declares the paper's sigmoid proxies (Appendix A.2) and BPDA with the
identity as surrogates, and its binarization threshold for the fine-tune projection. Every
variant offers the score view ``internal-intensity``, the un-normalized ``||F_i(D(x))||_1``
(same argmax as Eq. 3), for the internal attack: targeted, it maximizes
``||F_t|| - max_{j != t} ||F_j||`` (the margin form of ``||F_t|| - ||F_y||``, which it equals while
``y`` leads the other classes). Every model here is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from advdefense.declaration import AttackDeclaration, MethodView
from advdefense.errors import InputError
from advdefense.nn.binarization import Binarization, binarization_surrogates
from advdefense.nn.mlp import MLP, MLPAutoencoder
from advdefense.registry import register_model
from advdefense.validation import check_images, check_positive_int

__all__ = [
    "DIM",
    "BiDIM",
    "DIMConfig",
    "DnSingleHeadIM",
    "InternalModelClassifier",
    "InternalModels",
    "SingleHeadIM",
]

_MIN_DENOISED_INTENSITY = 1.0  # Eq. 3's denominator: one pixel at full intensity


@dataclass(frozen=True)
class DIMConfig:
    """Constructor arguments shared by the DIM family (Appendix A.1.1 defaults).

    ``use_denoiser``, ``single_head`` and ``binarize`` must match the class they configure;
    build the default of a class with ``Class.default_config()``.
    """

    use_denoiser: bool = True
    single_head: bool = False
    binarize: bool = False
    binarize_threshold: float = 0.5
    clip_denoised: bool = True
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (1, 28, 28)
    denoiser_encoder_widths: tuple[int, ...] = (784, 560, 280, 140, 70)
    denoiser_decoder_widths: tuple[int, ...] = (70, 140, 280, 560, 784)
    internal_encoder_widths: tuple[int, ...] = (784, 256, 64, 12, 10)
    internal_decoder_widths: tuple[int, ...] = (10, 12, 64, 256, 784)

    def __post_init__(self) -> None:
        for name in (
            "image_shape",
            "denoiser_encoder_widths",
            "denoiser_decoder_widths",
            "internal_encoder_widths",
            "internal_decoder_widths",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.image_shape) != 3:
            raise InputError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if check_positive_int(self.num_classes, "num_classes") < 2:
            raise InputError(f"num_classes must be at least 2, got {self.num_classes}")
        pixels = self.pixels
        for prefix in ("denoiser", "internal"):
            encoder = getattr(self, f"{prefix}_encoder_widths")
            decoder = getattr(self, f"{prefix}_decoder_widths")
            for part, widths in (("encoder", encoder), ("decoder", decoder)):
                for width in widths:
                    check_positive_int(width, f"{prefix}_{part}_widths entries")
            if len(encoder) < 2 or len(decoder) < 2 or encoder[0] != pixels:
                raise InputError(
                    f"{prefix}_encoder_widths must start with the {pixels} pixels, got {encoder}"
                )
            if decoder[-1] != pixels or encoder[-1] != decoder[0]:
                raise InputError(
                    f"{prefix}_decoder_widths must run from the code width {encoder[-1]} to the "
                    f"{pixels} pixels, got {decoder}"
                )
        if not 0.0 < self.binarize_threshold < 1.0:
            raise InputError(
                f"binarize_threshold must lie in (0, 1), got {self.binarize_threshold}"
            )

    @property
    def pixels(self) -> int:
        """Number of input values per image (C * H * W)."""
        return math.prod(self.image_shape)


class InternalModelClassifier(nn.Module):
    """Shared implementation of the DIM family; use one of the registered subclasses.

    ``forward`` maps N x C x H x W images in [0, 1] to N x K relative L1 intensities (Eq. 3);
    it does not validate its input, so attacks can call it at full speed.
    """

    config_class = DIMConfig
    uses_denoiser: ClassVar[bool] = True
    single_head: ClassVar[bool] = False
    binarizes: ClassVar[bool] = False

    @classmethod
    def default_config(cls) -> DIMConfig:
        """The paper's configuration of this variant."""
        return DIMConfig(
            use_denoiser=cls.uses_denoiser, single_head=cls.single_head, binarize=cls.binarizes
        )

    def __init__(self, config: DIMConfig | None = None) -> None:
        super().__init__()
        config = config or self.default_config()
        wanted = (self.uses_denoiser, self.single_head, self.binarizes)
        if (config.use_denoiser, config.single_head, config.binarize) != wanted:
            raise InputError(
                f"{type(self).__name__} needs use_denoiser={wanted[0]}, single_head={wanted[1]}, "
                f"binarize={wanted[2]}; got {config.use_denoiser}, {config.single_head}, "
                f"{config.binarize}. Start from {type(self).__name__}.default_config()"
            )
        self.config = config
        self.denoiser: MLPAutoencoder | None = (
            MLPAutoencoder(config.denoiser_encoder_widths, config.denoiser_decoder_widths)
            if config.use_denoiser
            else None
        )
        self.shared_encoder: MLP | None = None
        self.internal_models: nn.ModuleList
        if config.single_head:
            self.shared_encoder = MLP(config.internal_encoder_widths, "linear")
            self.internal_models = nn.ModuleList(
                MLP(config.internal_decoder_widths, "tanh") for _ in range(config.num_classes)
            )
        else:
            self.internal_models = nn.ModuleList(
                MLPAutoencoder(config.internal_encoder_widths, config.internal_decoder_widths)
                for _ in range(config.num_classes)
            )

    # -- differentiable pieces on flat N x P tensors (no validation; used by training too) --

    def apply_denoiser(self, flat: torch.Tensor) -> torch.Tensor:
        """``D`` of Sec. 3.2.1 on N x P inputs (clamped to [0, 1] if configured); identity
        for variants without a denoiser. No binarization."""
        if self.denoiser is None:
            return flat
        denoised: torch.Tensor = self.denoiser(flat)
        return denoised.clamp(0.0, 1.0) if self.config.clip_denoised else denoised

    def apply_internal_models(self, flat: torch.Tensor) -> torch.Tensor:
        """``F_i`` of Sec. 3.2.2 for every class on N x P inputs: N x K x P."""
        if self.shared_encoder is not None:
            code = self.shared_encoder(flat)
            return torch.stack([decoder(code) for decoder in self.internal_models], dim=1)
        return torch.stack([model(flat) for model in self.internal_models], dim=1)

    def _denoise_flat(
        self, images: torch.Tensor, binarization: Binarization | None = None
    ) -> torch.Tensor:
        flat = images.flatten(1)
        if not self.config.binarize:
            return self.apply_denoiser(flat)
        binarize = binarization or Binarization(self.config.binarize_threshold)
        denoised = self.apply_denoiser(binarize(flat))
        return binarize(denoised) if self.denoiser is not None else denoised

    # -- public API --

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Relative L1 intensities ``||F_i(D(x))||_1 / ||D(x)||_1`` (Eq. 3), N x K."""
        return self.scores(images)

    def scores(
        self,
        images: torch.Tensor,
        *,
        binarization: Binarization | None = None,
        normalized: bool = True,
    ) -> torch.Tensor:
        """Eq. 3 (``normalized``) or the raw intensities ``||F_i(D(x))||_1``; both have the same
        argmax. ``binarization`` replaces biDIM's hard threshold (a surrogate for attacks)."""
        denoised = self._denoise_flat(images, binarization)
        intensity = self.apply_internal_models(denoised).abs().sum(dim=2)
        if not normalized:
            return intensity
        return intensity / denoised.abs().sum(dim=1, keepdim=True).clamp_min(
            _MIN_DENOISED_INTENSITY
        )

    def attack_declaration(self) -> AttackDeclaration:
        """Surrogates (biDIM: sigmoid proxies and BPDA) and the ``internal-intensity`` view."""
        threshold = self.config.binarize_threshold
        view_binarization = Binarization(threshold, straight_through=True)
        views = {
            "internal-intensity": MethodView(
                self,
                "scores",
                normalized=False,
                binarization=view_binarization if self.config.binarize else None,
            )
        }
        if not self.config.binarize:
            return AttackDeclaration(score_views=views)
        return AttackDeclaration(
            differentiable=False,
            surrogates={
                b.name: MethodView(self, "scores", binarization=b)
                for b in binarization_surrogates(threshold)
            },
            score_views=views,
            binarization_threshold=threshold,
        )

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.config.image_shape
        return check_images(images, "images", channels=channels, height=height, width=width)

    def denoise(self, images: torch.Tensor) -> torch.Tensor:
        """``D(x)`` as N x C x H x W, binarized for biDIM; the input itself without denoiser."""
        images = self._checked(images)
        return self._denoise_flat(images).reshape(images.shape)

    def internal_outputs(self, images: torch.Tensor) -> torch.Tensor:
        """The internal models' reconstructions ``F_i(D(x))``, N x K x P (P = C * H * W)."""
        images = self._checked(images)
        return self.apply_internal_models(self._denoise_flat(images))

    def latent_codes(self, images: torch.Tensor) -> torch.Tensor:
        """The internal models' codes of ``D(x)`` (Fig. 3): N x K x code width, or N x 1 x code
        width for the single-head variants (one shared encoder)."""
        denoised = self._denoise_flat(self._checked(images))
        if self.shared_encoder is not None:
            code: torch.Tensor = self.shared_encoder(denoised)
            return code[:, None, :]
        encoders = [
            model.encoder for model in self.internal_models if isinstance(model, MLPAutoencoder)
        ]
        return torch.stack([encoder(denoised) for encoder in encoders], dim=1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted classes (Eq. 4), N int64."""
        return self.forward(self._checked(images)).argmax(dim=1)


@register_model("dim")
class DIM(InternalModelClassifier):
    """Denoised Internal Models: denoiser + one autoencoder per class (Sec. 3.2)."""


@register_model("bidim")
class BiDIM(InternalModelClassifier):
    """DIM with the input and the denoiser's output binarized at 0.5 (end of Sec. 3.2)."""

    binarizes = True


@register_model("im")
class InternalModels(InternalModelClassifier):
    """Ablation (Table 2): the internal models alone, without denoiser."""

    uses_denoiser = False


@register_model("singleim")
class SingleHeadIM(InternalModelClassifier):
    """Ablation (Table 2): one shared encoder and one decoder per class, no denoiser."""

    uses_denoiser = False
    single_head = True


@register_model("dn-singleim")
class DnSingleHeadIM(InternalModelClassifier):
    """Ablation (Table 2): the single-head internal model behind the denoiser."""

    single_head = True
