"""Madry adversarial training, the Madry CNN, the biCNN switch and the published ABS baselines."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advdefense
from advdefense.data import load_dataset
from advdefense.defenses.abs_baselines import (
    ABS_MODELS_ENV,
    WeightsNotFoundError,
    find_abs_weights,
    load_abs_baseline,
    load_abs_cnn,
)
from advdefense.defenses.adversarial_training import (
    PGDConfig,
    madry_batch_transform,
    pgd_linf,
    train_madry,
)
from advdefense.errors import CheckpointError, InputError
from advdefense.nn.abs_cnn import AbsCNN, AbsCNNConfig
from advdefense.nn.madry_cnn import MadryCNN, MadryCNNConfig
from advdefense.training.loop import TrainingConfig, train_classifier

ABS_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "abs-mnist"
needs_abs_weights = pytest.mark.skipif(
    not (ABS_DIR / "vanilla_cnn.safetensors").is_file()
    or not (ABS_DIR / "binary_cnn.safetensors").is_file(),
    reason=f"published ABS weights not found in {ABS_DIR}",
)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)  # another long job shares the CPU


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def _sample(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_dataset("mnist-sample", split)
    return images[:count], labels[:count]


# ---------------------------------------------------------------- PGD


@pytest.mark.parametrize(
    "kwargs",
    [{"epsilon": 0.0}, {"epsilon": -0.1}, {"step_size": math.nan}, {"steps": 0}, {"steps": 1.5}],
)
def test_pgd_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(InputError):
        PGDConfig(**kwargs)  # type: ignore[arg-type]


def test_pgd_stays_in_ball_and_box_and_raises_the_loss() -> None:
    torch.manual_seed(0)
    model = MadryCNN().eval()
    images, labels = _sample("test", 32)
    config = PGDConfig(epsilon=0.1, steps=10, step_size=0.02)
    adversarial = pgd_linf(model, images, labels, config)
    assert not adversarial.requires_grad
    assert (adversarial - images).abs().max() <= 0.1 + 1e-6
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(images), labels)
        adversarial_loss = F.cross_entropy(model(adversarial), labels)
    assert adversarial_loss > clean_loss
    assert all(p.grad is None for p in model.parameters())


def test_pgd_random_start_depends_on_the_seed() -> None:
    torch.manual_seed(0)
    model = MadryCNN().eval()
    images, labels = _sample("test", 4)
    config = PGDConfig(epsilon=0.3, steps=1, step_size=0.01)

    def attack(seed: int) -> torch.Tensor:
        return pgd_linf(
            model, images, labels, config, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(attack(1), attack(1))
    assert not torch.equal(attack(1), attack(2))
    no_start = PGDConfig(epsilon=0.3, steps=1, step_size=0.01, random_start=False)
    assert torch.equal(
        pgd_linf(model, images, labels, no_start), pgd_linf(model, images, labels, no_start)
    )


def test_pgd_leaves_the_model_mode_alone() -> None:
    model = AbsCNN().train()
    images, labels = _sample("test", 4)
    pgd_linf(model, images, labels, PGDConfig(steps=1))
    assert model.training


# ---------------------------------------------------------------- training loop hook


def test_batch_transform_runs_once_per_batch_in_eval_mode() -> None:
    images, labels = _sample("train", 50)
    model = AbsCNN()
    modes_seen: list[bool] = []
    modes_at_update: list[bool] = []

    def transform(module: nn.Module, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        modes_seen.append(module.training)
        assert batch.shape[0] == targets.shape[0]
        return batch

    model.register_forward_pre_hook(lambda module, _: modes_at_update.append(module.training))
    config = TrainingConfig(epochs=2, batch_size=16, seed=0)
    train_classifier(model, images, labels, config, progress=False, batch_transform=transform)
    assert len(modes_seen) == 2 * math.ceil(50 / 16)
    assert not any(modes_seen)
    assert modes_at_update and all(modes_at_update)
    assert not model.training


def test_identity_transform_matches_plain_training() -> None:
    images, labels = _sample("train", 40)
    config = TrainingConfig(epochs=1, batch_size=16, seed=3)
    torch.manual_seed(0)
    plain, hooked = MadryCNN(), MadryCNN()
    hooked.load_state_dict(plain.state_dict())
    train_classifier(plain, images, labels, config, progress=False)
    train_classifier(
        hooked, images, labels, config, progress=False, batch_transform=lambda m, x, y: x
    )
    for key, value in plain.state_dict().items():
        assert torch.equal(value, hooked.state_dict()[key])


def test_train_madry_improves_robust_accuracy_on_its_training_digits() -> None:
    images, labels = _sample("train", 300)
    pgd = PGDConfig(epsilon=0.1, steps=5, step_size=0.03)
    training = TrainingConfig(epochs=1, batch_size=20, learning_rate=1e-3, seed=0)
    torch.manual_seed(0)
    model = MadryCNN()
    untrained = MadryCNN()
    untrained.load_state_dict(model.state_dict())
    untrained.eval()
    history = train_madry(model, images, labels, training, pgd, progress=False)
    assert not model.training
    assert len(history.epochs) == 1 and math.isfinite(history.epochs[0].loss)
    generator = torch.Generator().manual_seed(9)
    before = _accuracy(
        untrained, pgd_linf(untrained, images, labels, pgd, generator=generator), labels
    )
    after = _accuracy(model, pgd_linf(model, images, labels, pgd, generator=generator), labels)
    assert after > before + 0.1, (before, after)


def test_train_madry_works_with_abs_cnn() -> None:
    images, labels = _sample("train", 40)
    model = AbsCNN(AbsCNNConfig(widths=(8, 8, 16)))
    calls: list[int] = []
    transform = madry_batch_transform(PGDConfig(steps=2))

    def counting(module: nn.Module, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        adversarial = transform(module, batch, targets)
        assert (adversarial - batch).abs().max() <= 0.3 + 1e-6
        return adversarial

    config = TrainingConfig(epochs=1, batch_size=16)
    history = train_classifier(
        model, images, labels, config, progress=False, batch_transform=counting
    )
    assert calls == [16, 16, 8]
    assert math.isfinite(history.epochs[0].loss)
    history = train_madry(model, images, labels, config, PGDConfig(steps=2), progress=False)
    assert math.isfinite(history.epochs[0].loss)


# ---------------------------------------------------------------- Madry CNN


def test_madry_cnn_shapes_and_parameter_count() -> None:
    model = MadryCNN().eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    expected = (32 * 25 + 32) + (64 * 32 * 25 + 64) + (7 * 7 * 64 * 1024 + 1024) + (1024 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 3_274_634
    wide = MadryCNN(MadryCNNConfig(in_channels=3, num_classes=4, image_size=32))
    assert wide(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(InputError):
        MadryCNNConfig(image_size=30)


def test_madry_cnn_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MadryCNN().eval()
    advdefense.save(model, tmp_path / "madry")
    loaded = advdefense.load(tmp_path / "madry")
    assert isinstance(loaded, MadryCNN) and loaded.config == model.config
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


# ---------------------------------------------------------------- biCNN switch


def test_binarized_abs_cnn_thresholds_at_one_half() -> None:
    torch.manual_seed(0)
    plain = AbsCNN().eval()
    binary = AbsCNN(AbsCNNConfig(binarize_input=True)).eval()
    binary.load_state_dict(plain.state_dict())
    below, above = torch.full((1, 1, 28, 28), 0.49), torch.full((1, 1, 28, 28), 0.51)
    with torch.no_grad():
        assert torch.equal(binary(below), plain(torch.zeros_like(below)))
        assert torch.equal(binary(above), plain(torch.ones_like(above)))
        assert torch.equal(binary(torch.full_like(below, 0.5)), plain(torch.ones_like(below)))
        images = torch.rand(4, 1, 28, 28)
        same_side = torch.where(images >= 0.5, 0.5 + 0.5 * images, 0.49 * images)
        assert torch.equal(binary(images), binary(same_side))


def test_binarized_abs_cnn_has_zero_input_gradient() -> None:
    model = AbsCNN(AbsCNNConfig(binarize_input=True)).eval()
    images = torch.rand(2, 1, 28, 28, requires_grad=True)
    model(images)[:, 0].sum().backward()
    assert images.grad is not None and not images.grad.any()


def test_binarized_abs_cnn_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AbsCNN(AbsCNNConfig(binarize_input=True)).eval()
    advdefense.save(model, tmp_path / "bicnn")
    loaded = advdefense.load(tmp_path / "bicnn")
    assert isinstance(loaded, AbsCNN) and loaded.config.binarize_input
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


# ---------------------------------------------------------------- published ABS weights


def test_find_abs_weights_explains_where_to_put_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ABS_MODELS_ENV, str(tmp_path / "env"))
    with pytest.raises(WeightsNotFoundError, match=ABS_MODELS_ENV):
        find_abs_weights("no_such_model", root=tmp_path)
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "no_such_model.safetensors").write_bytes(b"")
    assert find_abs_weights("no_such_model", root=tmp_path) == (
        tmp_path / "env" / "no_such_model.safetensors"
    )


def test_load_abs_cnn_rejects_foreign_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError):
        load_abs_cnn(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        load_abs_cnn(garbage)
    state = {k: v for k, v in AbsCNN().state_dict().items() if "num_batches" not in k}
    del state["bn_1.running_var"]
    state["extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: bn_1\.running_var"):
        load_abs_cnn(tmp_path / "partial.safetensors")


def test_load_abs_cnn_accepts_batchnorm_step_counters(tmp_path: Path) -> None:
    """A conversion that kept ``num_batches_tracked`` is the same model: load it unchanged."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = AbsCNN().eval()
    state = model.state_dict()
    assert any(key.endswith("num_batches_tracked") for key in state)
    save_file(state, str(tmp_path / "with_counters.safetensors"))
    loaded = load_abs_cnn(tmp_path / "with_counters.safetensors")
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


@needs_abs_weights
def test_published_cnn_and_bicnn_accuracy_and_round_trip(tmp_path: Path) -> None:
    images, labels = load_dataset("mnist-sample", "test")
    cnn = load_abs_cnn(find_abs_weights("vanilla_cnn", root=ABS_DIR))
    assert not cnn.training and not cnn.config.binarize_input
    assert _accuracy(cnn, images, labels) > 0.98
    bicnn = load_abs_baseline("bicnn", root=ABS_DIR)
    assert bicnn.config.binarize_input
    assert _accuracy(bicnn, images, labels) > 0.98
    for name, model in (("cnn", cnn), ("bicnn", bicnn)):
        loaded = advdefense.load(advdefense.save(model, tmp_path / name))
        for key, value in model.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key])
        with torch.no_grad():
            assert torch.equal(model(images[:64]), loaded(images[:64]))


# ---------------------------------------------------------------- slow: full Madry PGD
