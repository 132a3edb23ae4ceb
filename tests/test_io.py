"""advdefense.save / advdefense.load: safetensors + JSON, bit-identical, never pickle."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import advdefense
from advdefense.errors import CheckpointError
from advdefense.nn import AbsCNN, AbsCNNConfig

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
ABS_WEIGHTS = SHARED_MODELS / "abs-mnist" / "vanilla_cnn.safetensors"


def _trained_like_cnn() -> AbsCNN:
    torch.manual_seed(0)
    model = AbsCNN()
    model.train()
    model(torch.rand(16, 1, 28, 28))  # moves the BatchNorm running statistics off their init
    return model.eval()


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model = _trained_like_cnn()
    images = torch.rand(8, 1, 28, 28)
    advdefense.save(
        model,
        tmp_path / "cnn",
        dataset="mnist-sample",
        seed=3,
        training={"epochs": 2},
        metrics={"test_accuracy": 0.5},
    )
    loaded = advdefense.load(tmp_path / "cnn")
    assert isinstance(loaded, AbsCNN)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_config_records_provenance(tmp_path: Path) -> None:
    advdefense.save(
        _trained_like_cnn(),
        tmp_path,
        dataset="mnist-sample",
        seed=7,
        training={"epochs": 2},
        metrics={"test_accuracy": 0.5},
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "cnn"
    assert config["config"] == {
        "in_channels": 1,
        "num_classes": 10,
        "widths": [20, 70, 256],
        "binarize_input": False,
    }
    assert config["dataset"] == "mnist-sample"
    assert config["seed"] == 7
    assert config["training"] == {"epochs": 2}
    assert config["metrics"] == {"test_accuracy": 0.5}
    assert torch.__version__.startswith(config["provenance"]["versions"]["torch"])
    assert "git_commit" in config["provenance"]
    assert config["provenance"]["machine"] == {  # weights' last bits can depend on these
        "cpu": config["provenance"]["machine"]["cpu"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
    assert config["provenance"]["machine"]["cpu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):  # readable like any other file
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_non_default_config_round_trips(tmp_path: Path) -> None:
    model = AbsCNN(AbsCNNConfig(in_channels=3, num_classes=5, widths=(4, 6, 8)))
    advdefense.save(model, tmp_path)
    loaded = advdefense.load(tmp_path)
    assert isinstance(loaded, AbsCNN)
    assert loaded.config == model.config


def test_loading_a_pickle_file_fails_clearly(tmp_path: Path) -> None:
    torch_file = tmp_path / "model.pt"
    torch.save(AbsCNN().state_dict(), torch_file)
    with pytest.raises(CheckpointError, match="pickle-based checkpoint"):
        advdefense.load(torch_file)
    raw = tmp_path / "weights"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="never unpickles"):
        advdefense.load(raw)


def test_directory_with_only_pickles_names_them(tmp_path: Path) -> None:
    torch.save(AbsCNN().state_dict(), tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth.*never loads"):
        advdefense.load(tmp_path)


def test_unknown_architecture(tmp_path: Path) -> None:
    advdefense.save(AbsCNN(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"] = "no-such-net"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown architecture 'no-such-net'.*cnn"):
        advdefense.load(tmp_path)


def test_config_that_does_not_match_weights(tmp_path: Path) -> None:
    advdefense.save(AbsCNN(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["num_classes"] = 7
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors: conv_3\.bias \(10,\)"):
        advdefense.load(tmp_path)
    config["config"]["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit AbsCNNConfig"):
        advdefense.load(tmp_path)


def test_missing_and_extra_tensors(tmp_path: Path) -> None:
    advdefense.save(AbsCNN(), tmp_path)
    state = AbsCNN().state_dict()
    del state["conv_0.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensors: conv_0\.weight.*unexpected "
        r"tensors: extra\.weight",
    ):
        advdefense.load(tmp_path)


def test_corrupt_files(tmp_path: Path) -> None:
    advdefense.save(AbsCNN(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        advdefense.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        advdefense.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        advdefense.load(tmp_path / "missing")


def test_unregistered_model_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a registered architecture"):
        advdefense.save(nn.Linear(2, 2), tmp_path)


def test_register_model_requires_a_dataclass_config() -> None:
    with pytest.raises(TypeError, match="config_class"):

        @advdefense.register_model("broken")
        class Broken(nn.Module):
            pass


def test_plugin_architecture_round_trips(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class TinyConfig:
        width: int = 3

    @advdefense.register_model("test-tiny")
    class Tiny(nn.Module):
        config_class = TinyConfig

        def __init__(self, config: TinyConfig) -> None:
            super().__init__()
            self.config = config
            self.linear = nn.Linear(config.width, 2)

    model = Tiny(TinyConfig(width=5))
    advdefense.save(model, tmp_path)
    assert "test-tiny" in advdefense.list_architectures()
    loaded = advdefense.load(tmp_path)
    assert isinstance(loaded, Tiny)
    assert torch.equal(loaded.linear.weight, model.linear.weight)


@pytest.mark.skipif(not ABS_WEIGHTS.is_file(), reason=f"ABS weights not found at {ABS_WEIGHTS}")
def test_published_abs_cnn_weights_fit_our_cnn() -> None:
    from safetensors.torch import load_file

    model = AbsCNN()
    result = model.load_state_dict(load_file(str(ABS_WEIGHTS)), strict=False)
    assert not result.unexpected_keys
    assert all(key.endswith("num_batches_tracked") for key in result.missing_keys)


def test_weights_from_another_save_are_refused(tmp_path: Path) -> None:
    """A crash between writing the weights and config.json must not pair them silently."""
    advdefense.save(AbsCNN(), tmp_path / "first")
    advdefense.save(_trained_like_cnn(), tmp_path / "second")
    weights = (tmp_path / "second" / "model.safetensors").read_bytes()
    (tmp_path / "first" / "model.safetensors").write_bytes(weights)
    with pytest.raises(CheckpointError, match=r"not the weights file saved with config\.json"):
        advdefense.load(tmp_path / "first")


def test_checkpoint_without_weights_digest_still_loads(tmp_path: Path) -> None:
    """Checkpoints saved before the digest was recorded (e.g. committed ones) stay loadable."""
    model = _trained_like_cnn()
    advdefense.save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert len(config.pop("weights_sha256")) == 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = advdefense.load(tmp_path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor)


@pytest.mark.parametrize("version", ["1", 1.5, None, True, 0])
def test_malformed_format_version_names_the_file(tmp_path: Path, version: object) -> None:
    advdefense.save(AbsCNN(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = version
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json has format_version .*not a positive"):
        advdefense.load(tmp_path)


def test_invalid_config_values_name_the_file(tmp_path: Path) -> None:
    advdefense.save(AbsCNN(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"] = [1, 2]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: 'config' is list"):
        advdefense.load(tmp_path)
    config["config"] = {"num_classes": -3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    invalid = r"config\.json: its config (holds an invalid|cannot)"
    with pytest.raises(CheckpointError, match=invalid):
        advdefense.load(tmp_path)
