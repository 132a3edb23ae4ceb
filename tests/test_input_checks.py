"""Bad settings of the models and their training get a clear InputError, not a silent
substitute, a NaN or a traceback from deep inside (audit of 2026-12-03)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import advdefense
from advdefense.attacks.suites import get_suite
from advdefense.defenses.adversarial_training import PGDConfig, pgd_linf
from advdefense.defenses.dim import DIMConfig
from advdefense.defenses.losses import siamese_cosine_loss
from advdefense.errors import InputError
from advdefense.evaluation.robustness import predict
from advdefense.evaluation.runner import run_fixed
from advdefense.evaluation.store import ResultStore
from advdefense.nn.abs_cnn import AbsCNN
from advdefense.nn.madry_cnn import MadryCNN
from advdefense.nn.resnet import ResNetConfig
from advdefense.training.architectures import TrainOptions, train_architecture
from advdefense.training.dim import add_training_noise
from advdefense.validation import check_model_dtype


def test_a_float64_model_loads_as_float64(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AbsCNN().double().eval()
    advdefense.save(model, tmp_path)
    loaded = advdefense.load(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_zero_denoiser_epochs_is_refused_not_replaced() -> None:
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8) % 2
    with pytest.raises(InputError, match="denoiser_epochs must be a positive integer, got 0"):
        train_architecture("dim", images, labels, TrainOptions(epochs=1, denoiser_epochs=0))


def test_pgd_checks_labels_against_the_model_and_its_switch() -> None:
    images = torch.rand(2, 1, 28, 28)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 9\], got values in \[0, 12\]"):
        pgd_linf(MadryCNN(), images, torch.tensor([0, 12]), PGDConfig(steps=1))
    with pytest.raises(InputError, match="random_start must be True or False"):
        PGDConfig(random_start="no")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"l0_probability": 0.7}, "at most 0.5"),
        ({"uniform_noise": -2.0}, "uniform_noise must be non-negative"),
        ({"uniform_noise": math.nan}, "uniform_noise must be non-negative"),
    ],
)
def test_training_noise_refuses_distributions_it_cannot_draw(
    options: dict[str, float], message: str
) -> None:
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(InputError, match=message):
        add_training_noise(torch.rand(2, 784), generator, **options)  # type: ignore[arg-type]


def test_resnet_config_refuses_nan_normalisation_and_shrinking_stages() -> None:
    with pytest.raises(InputError, match="input_mean must be finite"):
        ResNetConfig(input_mean=(math.nan,))
    with pytest.raises(InputError, match="input_std must be positive and finite"):
        ResNetConfig(input_std=(math.inf,))
    with pytest.raises(InputError, match="widths must not decrease"):
        ResNetConfig(widths=(8, 4, 2))


def test_siamese_loss_needs_zero_one_pair_labels() -> None:
    embeddings = torch.rand(2, 4)
    with pytest.raises(InputError, match=r"only zeros and ones .*\[-1\.0, 2\.0\]"):
        siamese_cosine_loss(embeddings, embeddings, torch.tensor([2.0, -1.0]))
    empty = torch.rand(0, 4)
    with pytest.raises(InputError, match="needs at least one pair"):  # not a silent NaN
        siamese_cosine_loss(empty, empty, torch.zeros(0))


def test_dim_config_refuses_non_integer_sizes() -> None:
    with pytest.raises(InputError, match=r"num_classes must be a positive integer, got 3\.0"):
        DIMConfig(num_classes=3.0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="internal_encoder_widths entries"):
        DIMConfig(internal_encoder_widths=(784, 0, 10))


def _float32_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()


def test_images_of_another_dtype_than_the_model_get_a_clear_error(tmp_path: Path) -> None:
    model = _float32_classifier()
    images, labels = torch.rand(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    message = r"images have dtype torch.float64 but the model's weights are torch.float32"
    with pytest.raises(InputError, match=message):
        predict(model, images)
    with pytest.raises(InputError, match=message):
        pgd_linf(model, images, labels, PGDConfig(epsilon=0.1, step_size=0.05, steps=1))
    with pytest.raises(InputError, match=r"images.to\(torch.float32\), or the model"):
        run_fixed(
            model,
            images,
            labels,
            get_suite("quick"),
            ResultStore(tmp_path),
            model_name="m",
            norm="linf",
            epsilon=0.1,
            progress=False,
        )
    assert predict(model, images.float()).shape == (4,)


class _CastingClassifier(torch.nn.Module):
    """Float64 weights that convert their input: any floating dtype works."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(torch.ones(16, 3, dtype=torch.float64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).double() @ self.weights


def test_models_that_take_any_dtype_are_not_refused() -> None:
    images = torch.rand(3, 1, 4, 4)
    check_model_dtype(images.double(), torch.nn.Flatten())
    check_model_dtype(images, _CastingClassifier())
    assert predict(_CastingClassifier(), images).shape == (3,)
