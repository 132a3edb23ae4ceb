"""The resumable result store: one JSON line per model x attack x batch, appended as computed.

A record is written only when its batch is finished: the line (and the adversarials it refers
to, in a safetensors file written and renamed first) is appended, flushed and fsynced. A process
killed at any moment therefore loses at most the batch in flight; a torn last line is dropped
(and truncated away) when the store is opened again. Each record is keyed by a hash of
everything that determines it, so rerunning the same command skips what is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["ResultStore", "model_fingerprint", "record_key"]

RECORDS_FILE = "records.jsonl"
ADVERSARIALS_DIR = "adversarials"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class name and every tensor of its state dict, in name order."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def record_key(**fields: Any) -> str:
    """A stable hash of JSON-serialisable ``fields`` (sorted keys, no whitespace)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ResultStore:
    """Append-only JSON-lines records in ``directory``, with their adversarials beside them."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / ADVERSARIALS_DIR).mkdir(exist_ok=True)
        self.path = self.directory / RECORDS_FILE
        self._records: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        """Read every complete record; cut a torn last line left by a killed writer."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        valid_end = 0
        for line_end in _line_ends(data):
            line = data[valid_end:line_end]
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(record, dict) and "key" in record:
                self._records[record["key"]] = record
            valid_end = line_end + 1
        if valid_end != len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(valid_end)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        """The record stored under ``key``, if any."""
        return self._records.get(key)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record, in the order written."""
        return iter(self._records.values())

    def append(
        self, record: Mapping[str, Any], adversarials: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Persist one finished record (which must carry a ``key``) and its adversarials."""
        key = str(record["key"])
        stored = dict(record)
        if adversarials is not None:
            name = f"{key}.safetensors"
            target = self.directory / ADVERSARIALS_DIR / name
            temporary = target.with_suffix(".tmp")
            save_file({"adversarials": adversarials.detach().cpu().contiguous()}, str(temporary))
            os.replace(temporary, target)
            stored["adversarials_file"] = f"{ADVERSARIALS_DIR}/{name}"
        line = (json.dumps(stored, sort_keys=True, allow_nan=True) + "\n").encode()
        with self.path.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._records[key] = stored
        return stored

    def adversarials(self, key: str) -> torch.Tensor | None:
        """The adversarials saved with record ``key`` (None when it saved none)."""
        record = self._records.get(key)
        if record is None or "adversarials_file" not in record:
            return None
        return load_file(str(self.directory / record["adversarials_file"]))["adversarials"]


def _line_ends(data: bytes) -> Iterator[int]:
    start = 0
    while (end := data.find(b"\n", start)) != -1:
        yield end
        start = end + 1
