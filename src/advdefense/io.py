"""Save and load models as safetensors weights plus a JSON config, never pickle.

A saved model is a directory::

    model.safetensors   the state dict (tensor names and values, nothing executable)
    config.json         architecture name, constructor config, dataset, training
                        hyperparameters, seed, library versions, git commit, metrics, and the
                        SHA-256 of model.safetensors (so a weights file from another save,
                        e.g. one interrupted between the two writes, is refused on load)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from advdefense.atomic_files import save_tensors_atomically, write_atomically
from advdefense.data.integrity import file_digest
from advdefense.errors import CheckpointError
from advdefense.provenance import provenance
from advdefense.registry import architecture_name, get_architecture

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "WEIGHTS_FILE", "load", "load_config", "save"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1

_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".net"}


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    training: Mapping[str, Any] | None = None,
    seed: int | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` (a registered architecture) to the directory ``path``; return it.

    Both files are written to temporary names and renamed into place, so an interrupted save
    never leaves a half-written file behind; config.json, written last, records the weights'
    SHA-256, so weights paired with another save's config are refused by :func:`load`.
    """
    name = architecture_name(model)
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save to {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    save_tensors_atomically(directory / WEIGHTS_FILE, state)
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": name,
        "config": dataclasses.asdict(model.config),  # type: ignore[call-overload]
        "dataset": dataset,
        "training": dict(training or {}),
        "seed": seed,
        "metrics": dict(metrics or {}),
        "provenance": provenance(),
        "weights_sha256": file_digest(directory / WEIGHTS_FILE, "sha256"),
    }
    text = json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_atomically(directory / CONFIG_FILE, lambda temporary: temporary.write_text(text))
    return directory


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``config.json`` of a saved model directory."""
    directory = _checked_directory(Path(path))
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or "architecture" not in config or "config" not in config:
        raise CheckpointError(
            f"{config_path} lacks 'architecture' or 'config'; it was not written by advdefense.save"
        )
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{config_path} has format_version {version!r}, not a positive integer; the file "
            "was edited or damaged: save the model again"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format version {version}, newer than this advdefense "
            f"understands ({FORMAT_VERSION}); upgrade advdefense"
        )
    return config


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved in directory ``path``, in eval mode, on ``device``."""
    directory = Path(path)
    config = load_config(directory)
    model_class = get_architecture(str(config["architecture"]))
    config_class = model_class.config_class  # type: ignore[attr-defined]
    config_path = directory / CONFIG_FILE
    if not isinstance(config["config"], dict):
        raise CheckpointError(
            f"{config_path}: 'config' is {type(config['config']).__name__}, not an object of "
            f"{config_class.__name__} fields; the file was edited or damaged: save the model again"
        )
    try:
        model_config = config_class(**config["config"])
    except TypeError as error:
        raise CheckpointError(
            f"{config_path}: its config does not fit {config_class.__name__} "
            f"({error}); was it saved by another advdefense version?"
        ) from None
    except ValueError as error:  # InputError from the config's own checks
        raise CheckpointError(
            f"{config_path}: its config holds an invalid value ({error}); the file was edited "
            "or damaged: save the model again"
        ) from None
    try:
        model = model_class(model_config)
    except (ValueError, TypeError, RuntimeError) as error:  # e.g. InputError, negative sizes
        raise CheckpointError(
            f"{config_path}: its config cannot build {model_class.__name__} ({error}); the file "
            "was edited or damaged: save the model again"
        ) from None
    weights_path = directory / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file ({error}); save the model again"
        ) from None
    _check_state_matches(model, state, weights_path)
    _check_weights_digest(config, weights_path)
    floating = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
    if len(floating) == 1:  # a model saved in float64 (or half) comes back as it was saved
        model = model.to(dtype=floating.pop())
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _check_weights_digest(config: Mapping[str, Any], weights_path: Path) -> None:
    """Refuse weights other than those saved with this config.json (checkpoints saved before
    the digest was recorded carry none and are accepted)."""
    expected = config.get("weights_sha256")
    if expected is None:
        return
    try:
        actual = file_digest(weights_path, "sha256")
    except OSError as error:
        raise CheckpointError(f"{weights_path} cannot be read ({error})") from None
    if actual != expected:
        raise CheckpointError(
            f"{weights_path} is not the weights file saved with {CONFIG_FILE} (SHA-256 "
            f"{actual[:16]}..., the config records {str(expected)[:16]}...): the save was "
            "interrupted or the file was replaced; save the model again"
        )


def _checked_directory(directory: Path) -> Path:
    """Refuse pickle files and half-written directories with a message naming the fix."""
    if directory.is_file():
        if directory.suffix in _PICKLE_SUFFIXES or _looks_like_pickle(directory):
            raise CheckpointError(
                f"{directory} is a pickle-based checkpoint (torch.save / pickle); advdefense "
                "never unpickles files, because unpickling can run arbitrary code. Load it in a "
                "trusted session, rebuild the model and call advdefense.save(model, DIR)"
            )
        raise CheckpointError(
            f"{directory} is a file; advdefense.load expects a directory holding "
            f"{WEIGHTS_FILE} and {CONFIG_FILE}"
        )
    if not directory.is_dir():
        raise CheckpointError(f"no saved model at {directory}: the directory does not exist")
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (directory / name).is_file()]
    if missing:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = (
            f"; it holds pickle-based files ({', '.join(pickles)}), which advdefense never "
            "loads: rebuild the model in a trusted session and call advdefense.save"
            if pickles
            else ""
        )
        raise CheckpointError(f"{directory} lacks {' and '.join(missing)}{hint}")
    return directory


def _looks_like_pickle(path: Path) -> bool:
    """True for a raw pickle (protocol 2+ opcode) or a torch.save zip archive."""
    with path.open("rb") as handle:
        head = handle.read(4)
    return head[:1] == b"\x80" or head[:2] == b"PK"


def state_dict_mismatches(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> list[str]:
    """What keeps ``state`` from loading where ``expected`` is wanted: missing, unexpected and
    mis-shaped tensors, one phrase each (empty when it fits)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in sorted(set(expected) & set(state))
        if state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {', '.join(misshaped)}")
    return problems


def _check_state_matches(
    model: nn.Module, state: Mapping[str, torch.Tensor], weights_path: Path
) -> None:
    problems = state_dict_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{weights_path} does not match the architecture in {CONFIG_FILE} "
            f"({'; '.join(problems)}); the two files come from different models"
        )


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in config.json")
