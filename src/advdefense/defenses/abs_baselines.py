"""The CNN and biCNN baselines from the published ABS-paper weights (Schott et al., ICLR 2019).

The DIM paper (App. A.1.3) loads these pre-trained models rather than training its own. The
weights are the ABS repository's PyTorch state dicts converted to safetensors with unchanged
tensor names (``shared/models/abs-mnist/README.md``); they are read with safetensors, never
unpickled.

biCNN decision: ``"bicnn"`` is ``binary_cnn.safetensors`` with input binarization
(``x >= 0.5 -> 1``). Those weights were published for binarized inputs, and the ABS paper's biCNN
is a CNN on binarized input; on the 1,000 ``mnist-sample`` test digits they score 99.5% binarized
against 99.0% for the vanilla weights binarized. The ABS repository's loader for its binary CNN
in fact loads ``vanilla_cnn`` (so DIM's biCNN column may be vanilla weights + binarization);
``load_abs_cnn(find_abs_weights("vanilla_cnn"), binarized=True)`` rebuilds that variant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from advdefense.errors import CheckpointError, UserError
from advdefense.io import state_dict_mismatches
from advdefense.nn.abs_cnn import AbsCNN, AbsCNNConfig

__all__ = [
    "ABS_BASELINES",
    "ABS_MODELS_ENV",
    "WeightsNotFoundError",
    "abs_weights_search_paths",
    "find_abs_weights",
    "load_abs_baseline",
    "load_abs_cnn",
]

ABS_MODELS_ENV = "ADVDEFENSE_ABS_MODELS"
"""Environment variable naming directories (``os.pathsep``-separated) holding the ABS weights."""

ABS_BASELINES: dict[str, tuple[str, bool]] = {
    "cnn": ("vanilla_cnn", False),
    "bicnn": ("binary_cnn", True),
}
"""Baseline name -> (weights file stem, binarized input); see the module docstring."""

_SUFFIX = ".safetensors"


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Published weights are missing from every searched directory."""


def abs_weights_search_paths(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories searched by :func:`find_abs_weights`, first match wins.

    ``root``, each entry of ``$ADVDEFENSE_ABS_MODELS``, then ``shared/models/abs-mnist`` inside
    and beside a source checkout of advdefense (``<checkout>/src/advdefense``).
    """
    paths: list[Path] = []
    if root is not None:
        paths.append(Path(root).expanduser())
    for entry in os.environ.get(ABS_MODELS_ENV, "").split(os.pathsep):
        if entry.strip():
            paths.append(Path(entry.strip()).expanduser())
    checkout = Path(__file__).resolve().parents[3]
    for base in (checkout, checkout.parent):
        paths.append(base / "shared" / "models" / "abs-mnist")
    unique: list[Path] = []
    for path in paths:
        if path not in unique:
            unique.append(path)
    return unique


def find_abs_weights(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Path of the published ABS weights file ``name`` (e.g. ``"vanilla_cnn"``)."""
    filename = name if name.endswith(_SUFFIX) else name + _SUFFIX
    searched = abs_weights_search_paths(root)
    for directory in searched:
        candidate = directory / filename
        if candidate.is_file():
            return candidate
    raise WeightsNotFoundError(
        f"ABS weights {filename} not found; looked in {', '.join(str(p) for p in searched)}. "
        f"Put the converted ABS-paper safetensors files in one of those directories, or point "
        f"${ABS_MODELS_ENV} (or the root argument) at the directory holding them"
    )


def load_abs_cnn(weights: str | os.PathLike[str], *, binarized: bool = False) -> AbsCNN:
    """Build an :class:`AbsCNN` from a published ABS safetensors file, in eval mode.

    Channel widths are read from the file (so ``transfer_cnn`` loads too); every tensor name and
    shape is checked, and ``binarized`` sets ``binarize_input`` (the biCNN).
    """
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"no ABS weights file at {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    # A BatchNorm step counter (saved by some conversions) plays no part at inference.
    state = {key: value for key, value in state.items() if not _is_step_counter(key)}
    model = AbsCNN(_config_from_state(state, path, binarized))
    expected = {
        key: value for key, value in model.state_dict().items() if not _is_step_counter(key)
    }
    problems = state_dict_mismatches(expected, state)
    if problems:
        raise CheckpointError(f"{path} is not an ABS-paper CNN state dict ({'; '.join(problems)})")
    full_state = model.state_dict()
    full_state.update({key: tensor.to(torch.float32) for key, tensor in state.items()})
    model.load_state_dict(full_state, strict=True)
    return model.eval()


def _is_step_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_abs_baseline(
    name: Literal["cnn", "bicnn"], root: str | os.PathLike[str] | None = None
) -> AbsCNN:
    """The DIM paper's "CNN" or "biCNN" column model (see :data:`ABS_BASELINES`)."""
    if name not in ABS_BASELINES:
        raise UserError(f"unknown ABS baseline {name!r}; choose one of {sorted(ABS_BASELINES)}")
    stem, binarized = ABS_BASELINES[name]
    return load_abs_cnn(find_abs_weights(stem, root), binarized=binarized)


def _config_from_state(state: dict[str, torch.Tensor], path: Path, binarized: bool) -> AbsCNNConfig:
    """Widths, input channels and classes from the four convolution weights."""
    shapes = []
    for index in range(4):
        key = f"conv_{index}.weight"
        tensor = state.get(key)
        if tensor is None or tensor.dim() != 4:
            raise CheckpointError(
                f"{path} lacks a 4-d tensor {key}; it is not an ABS-paper CNN state dict"
            )
        shapes.append(tuple(tensor.shape))
    widths = (shapes[0][0], shapes[1][0], shapes[2][0])
    return AbsCNNConfig(
        in_channels=shapes[0][1],
        num_classes=shapes[3][0],
        widths=widths,
        binarize_input=binarized,
    )
