"""Atomic file writes with ordinary permissions.

A write goes to a temporary file next to its destination, which then replaces the destination
in one rename: a kill leaves the old file or none, never a torn one. Temporary files are created
private (mode 0600, by ``tempfile`` and by safetensors alike); the result gets the permissions
any new file of the process would have (``0666`` less the umask), so that models, records and
training states written by one user stay readable by the others who share them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["ordinary_permissions", "save_tensors_atomically", "write_atomically"]


def ordinary_permissions() -> int:
    """The mode a new file of this process gets: ``0666`` less the umask."""
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(destination: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary)``, then move the temporary file onto ``destination``."""
    handle, name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, ordinary_permissions())
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def save_tensors_atomically(
    destination: Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (moved to the CPU, made contiguous) as the safetensors file
    ``destination``, with ``metadata`` in its header."""
    stored = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    header = dict(metadata) if metadata is not None else None
    write_atomically(destination, lambda temporary: save_file(stored, str(temporary), header))
