"""Resumable training: the state after each epoch, in one safetensors file.

Long CPU runs (PDM on Fashion-MNIST, adversarial training) outlive a session. A trainer given
an :class:`EpochCheckpoint` saves, after every epoch, everything the next epoch depends on: the
model's state dict (BatchNorm buffers included), the optimizer's state (momentum buffers, Adam
moments), the trainer's and torch's random-number generator states (the CPU's, and the GPU's
when the model is on one), and the history so far.
Restarting the same run then continues from the last finished epoch and ends with the weights
an uninterrupted run would have produced.

The file is written to a temporary name and renamed into place, so an interrupted save leaves
the previous epoch's state intact. Tensors are safetensors; everything else is JSON in the
safetensors header, never pickle. Each state records the run's *identity* (hyperparameters,
architecture, a digest of the training data): a state from another run is refused with an
error naming what differs, not silently resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from advdefense.atomic_files import save_tensors_atomically
from advdefense.errors import CheckpointError, UserError
from advdefense.modes import device_of

__all__ = ["STATE_FILE", "EpochCheckpoint", "ResumedRun", "TrackedRun", "data_digest"]

STATE_FILE = "training-state.safetensors"
_FORMAT = 1
_MODEL = "model."
_OPTIMIZER = "optimizer."
#: Optimizer options that say how it runs, not what it computes: restored as built, not as saved.
_EXECUTION_OPTIONS = ("capturable", "differentiable", "foreach", "fused")
_GENERATOR = "generator"
_TORCH_RNG = "torch_rng"
_CUDA_RNG = "cuda_rng"

Record = TypeVar("Record")


def _cuda_device(model: nn.Module) -> torch.device | None:
    """The CUDA device ``model`` is on, or None."""
    device = device_of(model)
    return device if device.type == "cuda" else None


def data_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes (the training data's identity)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(flat.shape)}:{flat.dtype};".encode())
        digest.update(flat.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ResumedRun:
    """What :meth:`EpochCheckpoint.restore` recovered: epochs done and their records."""

    epochs_done: int
    records: list[dict[str, Any]]

    def records_as(self, record_type: type[Record]) -> list[Record]:
        """The records as ``record_type`` instances (the trainer's epoch dataclass)."""
        return [record_type(**record) for record in self.records]


@dataclasses.dataclass(frozen=True)
class EpochCheckpoint:
    """The directory where a training run keeps :data:`STATE_FILE` between epochs."""

    directory: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))

    @property
    def path(self) -> Path:
        """The state file."""
        return self.directory / STATE_FILE

    def save(
        self,
        *,
        identity: Mapping[str, Any],
        epochs_done: int,
        records: Sequence[Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
    ) -> None:
        """Write the state after ``epochs_done`` epochs (``records``: dataclasses, one each)."""
        tensors = {
            _MODEL + key: value.detach().cpu().contiguous()
            for key, value in model.state_dict().items()
        }
        optimizer_state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in optimizer_state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{_OPTIMIZER}{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        tensors[_GENERATOR] = generator.get_state()
        tensors[_TORCH_RNG] = torch.get_rng_state()
        cuda = _cuda_device(model)
        if cuda is not None:  # random starts of a GPU run (Madry's PGD) draw from it
            tensors[_CUDA_RNG] = torch.cuda.get_rng_state(cuda)
        header = {
            "format": _FORMAT,
            "identity": dict(identity),
            "epochs_done": epochs_done,
            "records": [dataclasses.asdict(record) for record in records],
            "optimizer_scalars": scalars,
            "param_groups": optimizer_state["param_groups"],
        }
        metadata = {"advdefense_training_state": json.dumps(header, sort_keys=True)}
        self.directory.mkdir(parents=True, exist_ok=True)
        save_tensors_atomically(self.path, tensors, metadata)

    def restore(
        self,
        *,
        identity: Mapping[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        extend_to: int | None = None,
    ) -> ResumedRun:
        """Load a saved state into the arguments; ``epochs_done`` is 0 when there is none.

        ``extend_to``: this run's number of epochs, given when its schedule does not depend on
        it (a constant learning rate): the identities are then compared without their
        ``config.epochs``, so the state of a shorter run resumes into this longer one, as if
        it had asked for ``extend_to`` epochs from the start. Raises
        :class:`~advdefense.errors.UserError` when the state belongs to a run with another
        ``identity`` or has more epochs done than ``extend_to``, and
        :class:`~advdefense.errors.CheckpointError` when the file is unreadable.
        """
        if not self.path.is_file():
            return ResumedRun(0, [])
        header, tensors = self._read()
        saved = header.get("identity", {})
        wanted = json.loads(json.dumps(dict(identity)))
        if extend_to is not None:
            saved, wanted = _without_epochs(saved), _without_epochs(wanted)
        if saved != wanted:
            differing = sorted(
                key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key)
            )
            raise UserError(
                f"{self.path} is the saved state of another training run (it differs in "
                f"{', '.join(differing)}); rerun with the settings it was made with to resume "
                "it, or delete the file to start over"
            )
        if extend_to is not None and int(header["epochs_done"]) > extend_to:
            raise UserError(
                f"{self.path} holds {header['epochs_done']} finished epochs, more than the "
                f"{extend_to} asked for; ask for at least {header['epochs_done']} epochs, "
                "or delete the file to start over"
            )
        prefix = len(_MODEL)
        model.load_state_dict(
            {key[prefix:]: value for key, value in tensors.items() if key.startswith(_MODEL)}
        )
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith(_OPTIMIZER):
                index, name = key[len(_OPTIMIZER) :].split(".", 1)
                state.setdefault(int(index), {})[name] = value
        for index, values in header["optimizer_scalars"].items():
            state.setdefault(int(index), {}).update(values)
        groups = [  # how this optimizer runs stays as built: a GPU run resumes on the CPU
            {**saved_group, **{key: group[key] for key in _EXECUTION_OPTIONS if key in group}}
            for saved_group, group in zip(
                header["param_groups"], optimizer.param_groups, strict=False
            )
        ]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        generator.set_state(tensors[_GENERATOR])
        torch.set_rng_state(tensors[_TORCH_RNG])
        cuda = _cuda_device(model)
        if cuda is not None and _CUDA_RNG in tensors:  # absent when saved on the CPU
            torch.cuda.set_rng_state(tensors[_CUDA_RNG], cuda)
        return ResumedRun(int(header["epochs_done"]), list(header["records"]))

    def remove(self) -> None:
        """Delete the state file (once the trained model is saved)."""
        self.path.unlink(missing_ok=True)

    def _read(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            header = json.loads(metadata["advdefense_training_state"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"{self.path} is not a readable training state ({error}); delete it to start "
                "the training over"
            ) from None
        if header.get("format") != _FORMAT:
            raise CheckpointError(
                f"{self.path} has training-state format {header.get('format')!r}, this version "
                f"reads {_FORMAT}; delete it to start the training over"
            )
        return header, tensors


def _without_epochs(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` without ``config.epochs``: what a longer run of the same schedule shares."""
    config = identity.get("config")
    if not isinstance(config, Mapping):
        return dict(identity)
    return {**identity, "config": {k: v for k, v in config.items() if k != "epochs"}}


@dataclasses.dataclass(frozen=True)
class TrackedRun:
    """A trainer's run bound to an optional checkpoint: :meth:`restore` once before the first
    epoch, :meth:`save` after each one. Without a checkpoint both do nothing. The identity
    gets the digest of ``data`` (the training tensors) under ``"data"``, computed once and
    only when there is a checkpoint. ``extend_to``: see :meth:`EpochCheckpoint.restore`."""

    checkpoint: EpochCheckpoint | None
    identity: Mapping[str, Any]
    data: tuple[torch.Tensor, ...]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    extend_to: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            identity = {**self.identity, "data": data_digest(*self.data)}
            object.__setattr__(self, "identity", identity)

    def restore(self) -> ResumedRun:
        """The saved state loaded into the model, optimizer and generator (if any)."""
        if self.checkpoint is None:
            return ResumedRun(0, [])
        return self.checkpoint.restore(
            identity=self.identity,
            model=self.model,
            optimizer=self.optimizer,
            generator=self.generator,
            extend_to=self.extend_to,
        )

    def save(self, records: Sequence[Any]) -> None:
        """Save the state after ``len(records)`` epochs (one record per epoch)."""
        if self.checkpoint is not None:
            self.checkpoint.save(
                identity=self.identity,
                epochs_done=len(records),
                records=records,
                model=self.model,
                optimizer=self.optimizer,
                generator=self.generator,
            )
