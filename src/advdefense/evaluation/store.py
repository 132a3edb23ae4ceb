"""The resumable result store: one JSON line per model x attack x batch, appended as computed.

A record is written only when its batch is finished: the line (and the adversarials it refers
to, in a safetensors file written and renamed first) is appended, flushed and fsynced. A process
killed at any moment therefore loses at most the batch in flight; a torn last line is dropped
(and truncated away) when the store is opened again. Each record is keyed by a hash of
everything that determines it, so rerunning the same command skips what is done.

Several processes may write one store, each evaluating other models (two cores, two models):
every append, and the repair of a torn line on opening, holds a short exclusive lock, so lines
never interleave; :meth:`ResultStore.claim` keeps a second process off a model being evaluated.

A record that takes longer than a working session (an attack run through each of a binarizing
defense's six surrogates) may also keep finished *parts* under ``partial/<key>/``; a rerun picks
them up instead of starting the record again, and :meth:`ResultStore.append` deletes them once
the record is written.

A record is keyed by the sample *indices* it covers, so the store also keeps, in
``samples.json``, a short digest of each sample it has seen (:meth:`ResultStore.check_samples`):
a later run whose sample at a known index differs (another dataset, split or preprocessing) is
refused rather than handed records computed on other images.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from advdefense.atomic_files import save_tensors_atomically, write_atomically
from advdefense.errors import UserError

__all__ = ["ResultStore", "model_fingerprint", "record_key"]

RECORDS_FILE = "records.jsonl"
ADVERSARIALS_DIR = "adversarials"
APPEND_LOCK = ".records.lock"  # held while a line is appended or a torn one repaired
PARTIAL_DIR = "partial"
SAMPLES_FILE = "samples.json"


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


def sample_digests(images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """A short SHA-256 of each sample: its label and its pixels as float32."""
    pixels = images.detach().to("cpu", torch.float32).contiguous()
    return [
        hashlib.sha256(
            str(int(label)).encode() + b":" + image.reshape(-1).numpy().tobytes()
        ).hexdigest()[:16]
        for image, label in zip(pixels, labels.detach().cpu(), strict=True)
    ]


def record_key(**fields: Any) -> str:
    """A stable hash of JSON-serialisable ``fields`` (sorted keys, no whitespace)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ResultStore:
    """Append-only JSON-lines records in ``directory``, with their adversarials beside them.

    ``writable=True`` (the default) may be open in several processes at once; each claims the
    models it evaluates (:meth:`claim`), so two processes never compute the same records.
    Readers (reports) pass ``writable=False``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, writable: bool = True) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RECORDS_FILE
        self._records: dict[str, dict[str, Any]] = {}
        self._writable = writable
        self._claims: list[Any] = []
        if writable:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / ADVERSARIALS_DIR).mkdir(exist_ok=True)
            with self.exclusive():
                self._load(truncate_torn_line=True)
        else:
            self._load(truncate_torn_line=False)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the directory's short write lock (appends; other processes' run-file updates)."""
        with (self.directory / APPEND_LOCK).open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield  # closing the handle releases the lock

    def claim(self, model: str) -> None:
        """Reserve ``model`` for this process until :meth:`close` (a killed process frees it);
        a UserError if another process is evaluating it into this directory."""
        if not self._writable:
            raise UserError(f"the store in {self.directory} was opened read-only")
        path = self.directory / f".model-{record_key(model=model)[:16]}.lock"
        self._claims.append(
            _exclusive_lock(
                path,
                f"{model} is being evaluated into {self.directory} by another process; wait "
                "for it to finish or choose another --out",
            )
        )

    def _load(self, *, truncate_torn_line: bool) -> None:
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
        if valid_end != len(data) and truncate_torn_line:
            with self.path.open("r+b") as handle:
                handle.truncate(valid_end)

    def close(self) -> None:
        """Release the models claimed (records stay readable)."""
        for handle in self._claims:
            handle.close()
        self._claims.clear()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
        if not self._writable:
            raise UserError(f"the store in {self.directory} was opened read-only")
        key = str(record["key"])
        stored = dict(record)
        if adversarials is not None:
            name = f"{key}.safetensors"
            target = self.directory / ADVERSARIALS_DIR / name
            save_tensors_atomically(target, {"adversarials": adversarials})
            stored["adversarials_file"] = f"{ADVERSARIALS_DIR}/{name}"
        line = (json.dumps(stored, sort_keys=True, allow_nan=True) + "\n").encode()
        with self.exclusive(), self.path.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._records[key] = stored
        self._discard_parts(key)
        return stored

    def save_part(
        self, key: str, part: str, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]
    ) -> None:
        """Keep one finished ``part`` of record ``key`` (its ``tensors`` and JSON-able ``info``)
        until the record is appended, written and renamed so a kill leaves no torn file."""
        if not self._writable:
            raise UserError(f"the store in {self.directory} was opened read-only")
        target = self._part_path(key, part)
        target.parent.mkdir(parents=True, exist_ok=True)
        info_text = json.dumps(info, sort_keys=True, allow_nan=True)
        save_tensors_atomically(target, tensors, {"part": part, "info": info_text})

    def part(self, key: str, part: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The tensors and info :meth:`save_part` kept for ``part`` of record ``key``, if any."""
        path = self._part_path(key, part)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        if metadata.get("part") != part:  # a hash collision of two part names
            return None
        return tensors, json.loads(metadata["info"])

    def _part_path(self, key: str, part: str) -> Path:
        return self.directory / PARTIAL_DIR / key / f"{record_key(part=part)}.safetensors"

    def _discard_parts(self, key: str) -> None:
        shutil.rmtree(self.directory / PARTIAL_DIR / key, ignore_errors=True)

    def check_samples(
        self, indices: Sequence[int], images: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """Refuse samples other than those this store's records were computed on.

        The first run to see an index records its sample's digest in ``samples.json``; a later
        run whose sample at that index differs gets a UserError naming it, and nothing of the
        store is touched. (A store written before digests were kept adopts the first samples
        it is checked against.)
        """
        if not self._writable:
            raise UserError(f"the store in {self.directory} was opened read-only")
        digests = dict(zip((str(i) for i in indices), sample_digests(images, labels), strict=True))
        path = self.directory / SAMPLES_FILE
        with self.exclusive():
            try:
                known: dict[str, str] = json.loads(path.read_text())["digests"]
            except FileNotFoundError:
                known = {}
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserError(
                    f"{path} is unreadable ({error}); delete it to adopt the samples of this "
                    "run (only if they are the ones the records were computed on)"
                ) from None
            clashes = [
                index for index, digest in digests.items() if known.get(index, digest) != digest
            ]
            if clashes:
                more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
                raise UserError(
                    f"{self.directory} holds records computed on other samples: sample "
                    f"{clashes[0]}{more} differs from the one recorded there (another dataset, "
                    "split or preprocessing). Evaluate into another --out, or delete "
                    f"{self.directory} to start it afresh"
                )
            if set(digests) - set(known):
                merged = {**known, **digests}
                ordered = dict(sorted(merged.items(), key=lambda item: int(item[0])))
                text = json.dumps({"digests": ordered}, indent=0) + "\n"
                write_atomically(path, lambda temporary: temporary.write_text(text))

    def lost(self, key: str) -> bool:
        """Whether record ``key`` saved adversarials whose file is gone.

        Records are committed and their adversarials are not (too large), so a fresh checkout
        has the one without the other: reports still work, but work that reads adversarials
        (detection scores, later attacks' starting points) must redo the record first.
        """
        record = self._records.get(key)
        return (
            record is not None
            and "adversarials_file" in record
            and not (self.directory / record["adversarials_file"]).is_file()
        )

    def adversarials(self, key: str) -> torch.Tensor | None:
        """The adversarials saved with record ``key`` (None when it saved none)."""
        record = self._records.get(key)
        if record is None or "adversarials_file" not in record:
            return None
        if self.lost(key):
            raise UserError(
                f"{self.directory / record['adversarials_file']} is missing (adversarials are "
                f"not committed): run the evaluation again in {self.directory}, which redoes "
                "the records whose adversarials are needed"
            )
        return load_file(str(self.directory / record["adversarials_file"]))["adversarials"]


def _exclusive_lock(path: Path, refusal: str) -> Any:
    """Hold an exclusive advisory lock on ``path`` until the returned handle is closed/freed;
    a UserError saying ``refusal`` if another process holds it."""
    handle = path.open("a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(refusal) from None
    return handle


def _line_ends(data: bytes) -> Iterator[int]:
    start = 0
    while (end := data.find(b"\n", start)) != -1:
        yield end
        start = end + 1
