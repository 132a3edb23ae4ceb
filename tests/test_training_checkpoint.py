"""Resumable training: an interrupted run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from advdefense.cli import main
from advdefense.data import load_dataset
from advdefense.defenses.adversarial_training import PGDConfig, train_madry
from advdefense.errors import CheckpointError, UserError
from advdefense.nn.madry_cnn import MadryCNN, MadryCNNConfig
from advdefense.training.architectures import TrainOptions, train_architecture
from advdefense.training.checkpoint import STATE_FILE, EpochCheckpoint, data_digest
from advdefense.training.loop import TrainingConfig
from advdefense.training.pdm import PDMTrainingConfig, build_resnet, train_pdm


class _InterruptedError(Exception):
    pass


class _CrashAfterEpoch(EpochCheckpoint):
    """Saves like :class:`EpochCheckpoint`, then dies right after epoch ``crash_after``."""

    crash_after = 1

    def save(self, **kwargs: Any) -> None:
        super().save(**kwargs)
        if kwargs["epochs_done"] == self.crash_after:
            raise _InterruptedError


def _images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    images = torch.rand(count, 1, 28, 28, generator=generator) * 0.3
    for index, label in enumerate(labels.tolist()):
        images[index, :, 9 * label : 9 * label + 9] += 0.6  # a bright band per class
    return images.clamp(0, 1), labels


def _pdm_run(checkpoint: EpochCheckpoint | None) -> tuple[dict[str, torch.Tensor], list[Any]]:
    images, labels = _images(48, seed=0)
    model = build_resnet("resnet8", "pdm", in_channels=1, num_classes=3, seed=3)
    config = PDMTrainingConfig(loss="pdm", epochs=3, batch_size=16, learning_rate=0.05, seed=3)
    model, history = train_pdm(model, images, labels, config, progress=False, checkpoint=checkpoint)
    return model.state_dict(), history.epochs


def _madry_run(
    checkpoint: EpochCheckpoint | None, epochs: int = 3
) -> tuple[dict[str, torch.Tensor], list[Any]]:
    images, labels = _images(24, seed=1)
    torch.manual_seed(4)
    model = MadryCNN(MadryCNNConfig())
    history = train_madry(
        model,
        images,
        labels,
        TrainingConfig(epochs=epochs, batch_size=8, learning_rate=1e-3, seed=4),
        PGDConfig(epsilon=0.1, steps=2, step_size=0.05),
        progress=False,
        checkpoint=checkpoint,
    )
    return model.state_dict(), history.epochs


Run = Callable[[EpochCheckpoint | None], tuple[dict[str, torch.Tensor], list[Any]]]


@pytest.mark.parametrize("run", [_pdm_run, _madry_run], ids=["pdm-sgd-steps", "madry-adam"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, run: Run) -> None:
    """Momentum/Adam state, the step-decayed rate, shuffling, partner draws and PGD random
    starts all continue where they stopped (a resumed run is bit-identical)."""
    expected_state, expected_history = run(None)
    with pytest.raises(_InterruptedError):
        run(_CrashAfterEpoch(tmp_path))
    assert (tmp_path / STATE_FILE).is_file()
    state, history = run(EpochCheckpoint(tmp_path))
    untimed = [{**vars(record), "seconds": None} for record in history]
    assert untimed == [{**vars(record), "seconds": None} for record in expected_history]
    assert state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key


def test_a_finished_constant_rate_run_extends_to_more_epochs(tmp_path: Path) -> None:
    """Adam at a constant rate: 2 epochs, then asked for 3, ends where 3 from scratch end;
    a state with more epochs done than asked for is refused, not silently used."""
    expected_state, expected_history = _madry_run(None, epochs=3)
    _madry_run(EpochCheckpoint(tmp_path), epochs=2)
    state, history = _madry_run(EpochCheckpoint(tmp_path), epochs=3)
    untimed = [vars(record) for record in history]
    assert untimed == [vars(record) for record in expected_history]
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key
    with pytest.raises(UserError, match=r"3 finished epochs, more than the 2 asked for"):
        _madry_run(EpochCheckpoint(tmp_path), epochs=2)
    assert (tmp_path / STATE_FILE).is_file()


def test_the_state_file_is_safetensors_with_a_json_header(tmp_path: Path) -> None:
    with pytest.raises(_InterruptedError):
        _pdm_run(_CrashAfterEpoch(tmp_path))
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as handle:
        header = json.loads((handle.metadata() or {})["advdefense_training_state"])
        keys = set(handle.keys())
    assert header["epochs_done"] == 1 and len(header["records"]) == 1
    assert header["identity"]["config"]["loss"] == "pdm"
    assert {"generator", "torch_rng"} <= keys
    assert any(key.startswith("optimizer.") and "momentum" in key for key in keys)
    assert list(tmp_path.iterdir()) == [tmp_path / STATE_FILE]  # no temporary left behind


def test_a_state_from_another_run_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(_InterruptedError):
        _pdm_run(_CrashAfterEpoch(tmp_path))
    images, labels = _images(48, seed=0)
    model = build_resnet("resnet8", "pdm", in_channels=1, num_classes=3, seed=3)
    other = PDMTrainingConfig(loss="pdm", epochs=4, batch_size=16, learning_rate=0.05, seed=3)
    with pytest.raises(UserError, match=r"differs in config.*delete the file"):
        train_pdm(
            model, images, labels, other, progress=False, checkpoint=EpochCheckpoint(tmp_path)
        )
    config = PDMTrainingConfig(loss="pdm", epochs=3, batch_size=16, learning_rate=0.05, seed=3)
    with pytest.raises(UserError, match="differs in data"):
        train_pdm(
            model, images.flip(0), labels.flip(0), config, progress=False,
            checkpoint=EpochCheckpoint(tmp_path),
        )  # fmt: skip
    assert (tmp_path / STATE_FILE).is_file()  # nothing computed is lost


def test_an_unreadable_state_names_the_file_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"not a safetensors file")
    images, labels = _images(48, seed=0)
    model = build_resnet("resnet8", "pdm", in_channels=1, num_classes=3, seed=3)
    config = PDMTrainingConfig(loss="pdm", epochs=1, batch_size=16, seed=3)
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE}.*delete it"):
        train_pdm(
            model, images, labels, config, progress=False, checkpoint=EpochCheckpoint(tmp_path)
        )


def test_data_digest_sees_values_shapes_and_dtypes() -> None:
    images = torch.zeros(4, 2)
    assert data_digest(images) == data_digest(torch.zeros(4, 2))
    assert data_digest(images) != data_digest(torch.zeros(2, 4))
    assert data_digest(images) != data_digest(torch.zeros(4, 2, dtype=torch.float64))
    changed = images.clone()
    changed[3, 1] = 1e-7
    assert data_digest(images) != data_digest(changed)


def test_cli_train_removes_the_state_once_the_model_is_saved(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "cnn"
    argv = ["train", "cnn", "--dataset", "mnist-sample", "--epochs", "2", "--n-train", "64"]
    argv += ["--seed", "5", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert (out / "config.json").is_file() and not (out / STATE_FILE).exists()
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["torch_threads"] == torch.get_num_threads()  # the weights may depend on it
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    # An interrupted rerun: the same command's state after epoch 1, then the command again.
    images, labels = load_dataset("mnist-sample", "train")
    options = TrainOptions(epochs=2, seed=5, progress=False, checkpoint=_CrashAfterEpoch(out))
    with pytest.raises(_InterruptedError):
        train_architecture("cnn", images[:64], labels[:64], options)
    assert main(argv) == 0
    assert "resuming the interrupted training" in capsys.readouterr().out
    assert not (out / STATE_FILE).exists()
    assert (out / "model.safetensors").read_bytes() == first
