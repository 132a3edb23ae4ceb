"""DIM family (Liu et al. 2022, Sec. 3.2, Appendix A.1.1): architecture, scores, training, I/O."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch import nn

import advdefense
from advdefense.data import load_dataset
from advdefense.defenses.dim import (
    DIM,
    BiDIM,
    DIMConfig,
    DnSingleHeadIM,
    InternalModelClassifier,
    InternalModels,
    SingleHeadIM,
)
from advdefense.errors import InputError
from advdefense.nn.mlp import MLP
from advdefense.registry import get_architecture, list_architectures
from advdefense.training.dim import (
    DIMTrainingConfig,
    add_training_noise,
    denoiser_loss,
    internal_models_loss,
    random_brightness,
    train_dim_family,
)

VARIANTS: dict[str, type[InternalModelClassifier]] = {
    "dim": DIM,
    "bidim": BiDIM,
    "im": InternalModels,
    "singleim": SingleHeadIM,
    "dn-singleim": DnSingleHeadIM,
}


def _layout(mlp: MLP) -> list[tuple[str, int, int] | str]:
    """Linear layers as (in, out) and activations by name, in order."""
    layout: list[tuple[str, int, int] | str] = []
    for module in mlp.layers:
        if isinstance(module, nn.Linear):
            layout.append(("linear", module.in_features, module.out_features))
        else:
            layout.append(type(module).__name__)
    return layout


def _expected_layout(widths: list[int], last: str | None) -> list[tuple[str, int, int] | str]:
    layout: list[tuple[str, int, int] | str] = []
    for index in range(len(widths) - 1):
        layout.append(("linear", widths[index], widths[index + 1]))
        if index < len(widths) - 2:
            layout.append("ReLU")
    if last is not None:
        layout.append(last)
    return layout


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist-sample", "train")
    return data.images[:200], data.labels[:200]


def test_registered_names() -> None:
    names = list_architectures()
    for name, cls in VARIANTS.items():
        assert name in names
        assert get_architecture(name) is cls


def test_dim_layer_widths_and_activations_follow_appendix_a11() -> None:
    model = DIM()
    assert model.denoiser is not None
    assert _layout(model.denoiser.encoder) == _expected_layout([784, 560, 280, 140, 70], None)
    assert _layout(model.denoiser.decoder) == _expected_layout([70, 140, 280, 560, 784], "Tanh")
    assert len(model.internal_models) == 10
    for internal in model.internal_models:
        assert _layout(internal.encoder) == _expected_layout([784, 256, 64, 12, 10], None)
        assert _layout(internal.decoder) == _expected_layout([10, 12, 64, 256, 784], "Tanh")


def test_single_head_shares_one_encoder_and_has_ten_decoders() -> None:
    model = SingleHeadIM()
    assert model.denoiser is None
    assert model.shared_encoder is not None
    assert _layout(model.shared_encoder) == _expected_layout([784, 256, 64, 12, 10], None)
    assert len(model.internal_models) == 10
    for decoder in model.internal_models:
        assert _layout(decoder) == _expected_layout([10, 12, 64, 256, 784], "Tanh")
    assert DnSingleHeadIM().denoiser is not None
    assert InternalModels().denoiser is None


def test_config_must_match_variant() -> None:
    with pytest.raises(InputError, match="binarize"):
        DIM(DIMConfig(binarize=True))
    with pytest.raises(InputError, match="use_denoiser"):
        InternalModels(DIMConfig())
    with pytest.raises(InputError, match="internal_encoder_widths"):
        DIMConfig(internal_encoder_widths=(100, 10))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_output_shapes(name: str) -> None:
    model = VARIANTS[name]().eval()
    images = torch.rand(3, 1, 28, 28)
    assert model(images).shape == (3, 10)
    assert model.denoise(images).shape == (3, 1, 28, 28)
    assert model.internal_outputs(images).shape == (3, 10, 784)
    assert model.predict(images).shape == (3,)


def test_public_helpers_validate_images() -> None:
    model = DIM().eval()
    with pytest.raises(InputError):
        model.denoise(torch.rand(3, 28, 28))
    with pytest.raises(InputError):
        model.internal_outputs(torch.rand(2, 1, 28, 28) + 1.0)


@pytest.mark.parametrize("name", ["dim", "dn-singleim", "im"])
def test_scores_are_relative_l1_intensities_eq3(name: str) -> None:
    torch.manual_seed(0)
    model = VARIANTS[name]().eval()
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        flat = images.flatten(1)
        if model.denoiser is not None:
            denoised = model.denoiser.decoder(model.denoiser.encoder(flat)).clamp(0, 1)
        else:
            denoised = flat
        expected = torch.stack(
            [
                internal(denoised).abs().sum(1)
                if model.shared_encoder is None
                else internal(model.shared_encoder(denoised)).abs().sum(1)
                for internal in model.internal_models
            ],
            dim=1,
        ) / denoised.abs().sum(1, keepdim=True)
        torch.testing.assert_close(model(images), expected)
        torch.testing.assert_close(model.denoise(images).flatten(1), denoised)


def test_a_black_denoised_image_keeps_the_argmax_and_sane_surrogate_gradients() -> None:
    """Eq. 3 divides by ||D(x)||_1, zero where biDIM's binarized D(x) is black: the floor of one
    pixel keeps the prediction of the raw intensities and gradients of ordinary size."""
    torch.manual_seed(0)
    model = BiDIM().eval()
    with torch.no_grad():  # a denoiser that outputs black: every decoder output near 0
        model.denoiser.decoder.layers[-2].bias.fill_(-20.0)
    images = torch.rand(2, 1, 28, 28, requires_grad=True)
    assert float(model.denoise(images).abs().sum()) == 0.0
    raw = model.scores(images, normalized=False)
    torch.testing.assert_close(model(images), raw)  # divided by the floor, 1.0
    surrogate = model.attack_declaration().surrogates["bpda-identity"]
    surrogate(images).max(1).values.sum().backward()
    assert images.grad is not None and float(images.grad.abs().max()) < 1e3


def test_bidim_binarizes_input_and_denoiser_output() -> None:
    torch.manual_seed(0)
    model = BiDIM().eval()
    above = torch.rand(2, 1, 28, 28) > 0.5
    low = torch.where(above, 0.5 + 0.5 * torch.rand(above.shape), 0.49 * torch.rand(above.shape))
    high = torch.where(above, 0.5 + 0.5 * torch.rand(above.shape), 0.49 * torch.rand(above.shape))
    assert not torch.equal(low, high)
    with torch.no_grad():
        assert torch.equal(model(low), model(high))
        denoised = model.denoise(low)
    assert set(denoised.unique().tolist()) <= {0.0, 1.0}
    # The same weights without binarization react to the difference.
    plain = DIM().eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.equal(plain(low), plain(high))


def test_dim_gradients_are_finite_and_non_zero() -> None:
    model = DIM().eval()
    images = torch.rand(3, 1, 28, 28, requires_grad=True)
    model(images)[:, 0].sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_load_round_trip_is_bit_identical(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = VARIANTS[name]().eval()
    training = DIMTrainingConfig(denoiser_epochs=1, internal_epochs=1)
    advdefense.save(model, tmp_path / name, training=asdict(training), seed=training.seed)
    loaded = advdefense.load(tmp_path / name)
    assert type(loaded) is type(model)
    assert loaded.config == model.config  # type: ignore[attr-defined]
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_training_noise_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.full((200, 1, 28, 28), 0.25)
    noise = add_training_noise(images, generator) - images
    flips = noise.round()  # |uniform| <= 0.5 < the gap to a +-1 flip plus uniform noise
    uniform = noise - flips
    assert float(uniform.min()) >= -0.5 and float(uniform.max()) <= 0.5
    assert float(uniform.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(uniform.var()) == pytest.approx(1 / 12, rel=0.03)
    assert set(flips.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert float((flips == 1).float().mean()) == pytest.approx(1 / 12, rel=0.05)
    assert float((flips == -1).float().mean()) == pytest.approx(1 / 12, rel=0.05)
    clipped = add_training_noise(images, generator, clip=True)
    assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0


def test_random_brightness_is_one_factor_per_image_in_unit_interval() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.ones(2000, 1, 28, 28)
    dimmed = random_brightness(images, generator)
    factors = dimmed.flatten(1)
    assert torch.equal(factors.min(1).values, factors.max(1).values)
    assert float(factors.min()) >= 0.0 and float(factors.max()) <= 1.0
    assert float(factors[:, 0].mean()) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("denoiser_epochs", 0),
        ("internal_epochs", -1),
        ("batch_size", 0),
        ("learning_rate", 0.0),
        ("uniform_noise", -0.1),
        ("l0_noise_probability", 0.6),
        ("seed", 1.5),
    ],
)
def test_training_config_validation(field: str, value: object) -> None:
    with pytest.raises(InputError, match=field):
        replace(DIMTrainingConfig(), **{field: value})


def test_training_rejects_bad_inputs(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    config = DIMTrainingConfig(denoiser_epochs=1, internal_epochs=1)
    with pytest.raises(InputError):
        train_dim_family(DIM(), images, labels[:10], config, progress=False)
    with pytest.raises(InputError):
        train_dim_family(nn.Linear(2, 2), images, labels, config, progress=False)  # type: ignore[arg-type]


def test_short_training_reduces_both_losses(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    torch.manual_seed(0)
    model = DIM()
    untrained = copy.deepcopy(model)
    config = DIMTrainingConfig(denoiser_epochs=2, internal_epochs=2, batch_size=32, seed=0)
    flat = images.flatten(1)

    def losses(candidate: DIM) -> tuple[float, float]:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(123)
            return (
                float(denoiser_loss(candidate, flat, generator, config)),
                float(internal_models_loss(candidate, flat, labels, generator, config)),
            )

    denoiser_before = losses(untrained)[0]
    final = train_dim_family(model, images, labels, config, progress=False)
    denoiser_after, internal_after = losses(model)
    assert set(final) == {"denoiser", "internal_models"}
    assert denoiser_after < denoiser_before
    # Eq. 2's targets are the denoiser's outputs, so compare both internal-model states
    # behind the same trained denoiser.
    assert model.denoiser is not None and untrained.denoiser is not None
    untrained.denoiser.load_state_dict(model.denoiser.state_dict())
    internal_before = losses(untrained)[1]
    assert internal_after < internal_before
    assert not model.training


def test_training_without_denoiser_is_seeded(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    config = DIMTrainingConfig(denoiser_epochs=1, internal_epochs=1, batch_size=64, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SingleHeadIM()
        runs.append((train_dim_family(model, images, labels, config, progress=False), model))
    assert set(runs[0][0]) == {"internal_models"}
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].state_dict().items():
        assert torch.equal(value, runs[1][1].state_dict()[key])


@pytest.mark.slow
def test_dim_learns_mnist_sample() -> None:
    """DIM trained on the 4,000 mnist-sample digits (5 denoiser / 30 internal epochs, batch 32).

    Measured on the 2-core CPU, seed 0: 81.9% on the 1,000 test digits in 490 s (batch 32);
    5 / 10 / 16 gave 81.4%. The paper reports 96% on full MNIST (60,000 digits); the bar here is
    a regression check on the small sample, not the paper's number.
    """
    train = load_dataset("mnist-sample", "train")
    test = load_dataset("mnist-sample", "test")
    torch.manual_seed(0)
    model = DIM()
    config = DIMTrainingConfig(denoiser_epochs=5, internal_epochs=30, batch_size=32, seed=0)
    start = time.perf_counter()
    train_dim_family(model, train.images, train.labels, config, progress=False)
    with torch.no_grad():
        accuracy = float((model(test.images).argmax(1) == test.labels).float().mean())
    print(f"DIM mnist-sample test accuracy {accuracy:.3f} in {time.perf_counter() - start:.0f} s")
    assert accuracy > 0.75
