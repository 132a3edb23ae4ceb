"""Checksums of dataset files, computed once per process per file version.

Results are cached by (path, modification time, size), so loading the same dataset twice does
not rehash it, while a replaced file is checked again.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from advdefense.errors import CorruptFileError, UserError

__all__ = ["FileState", "FileStatus", "check_file", "file_digest", "require_ok"]

FileState = Literal["ok", "unverified", "missing", "checksum-mismatch", "unreadable"]
""""unverified": an uncompressed copy of a ``.gz`` whose content checksum is not published;
usable, and only its sample count is checked (on load)."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileStatus:
    """State of one dataset file as seen by :func:`~advdefense.data.verify_datasets`."""

    filename: str
    path: Path | None
    state: FileState
    detail: str


def file_digest(path: str | os.PathLike[str], algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_sha256(path: str) -> str | None:
    """SHA-256 of a gzip file's decompressed content, or None if it does not decompress."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        return None
    return digest.hexdigest()


@lru_cache(maxsize=512)
def _check_cached(
    path: str,
    mtime_ns: int,
    size: int,
    md5: str,
    payload_sha256: str | None,
    decompressed: bool,
) -> tuple[FileState, str]:
    del mtime_ns, size  # part of the cache key only
    try:
        if decompressed:
            if payload_sha256 is None:
                return "unverified", (
                    "uncompressed copy; only the .gz checksum is published, so its content is "
                    "not verified (its sample count is checked on load); keep the .gz instead "
                    "to verify it"
                )
            actual = file_digest(path, "sha256")
            if actual == payload_sha256:
                return "ok", "uncompressed copy, content verified (sha256)"
            return "checksum-mismatch", f"expected sha256 {payload_sha256}, got {actual}"
        actual = file_digest(path, "md5")
        if actual == md5:
            return "ok", "md5 verified"
        if payload_sha256 is not None:
            payload = _payload_sha256(path)
            if payload == payload_sha256:
                return "ok", "recompressed, content verified"
            return "checksum-mismatch", (
                f"expected md5 {md5}, got {actual}; decompressed content does not match either"
            )
        return "checksum-mismatch", f"expected md5 {md5}, got {actual}"
    except OSError as exc:
        return "unreadable", f"{type(exc).__name__}: {exc}"


def check_file(
    path: str | os.PathLike[str],
    md5: str,
    payload_sha256: str | None = None,
    *,
    decompressed: bool = False,
) -> tuple[FileState, str]:
    """Verify ``path``; returns (state, detail). Never raises for I/O problems.

    ``md5`` is the checksum of the file as published. A ``.gz`` whose MD5 differs but whose
    decompressed content has ``payload_sha256`` is "ok" (recompressed copy). With
    ``decompressed=True`` the file is the uncompressed form of a published ``.gz`` and only
    ``payload_sha256`` can verify it.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing", "file not found"
    except OSError as exc:
        return "unreadable", f"{type(exc).__name__}: {exc}"
    return _check_cached(
        str(path.resolve()), stat.st_mtime_ns, stat.st_size, md5, payload_sha256, decompressed
    )


def require_ok(
    path: str | os.PathLike[str],
    md5: str,
    payload_sha256: str | None = None,
    *,
    decompressed: bool = False,
) -> None:
    """Like :func:`check_file` but raise when the file is not usable ("ok" and "unverified"
    files are).

    :class:`CorruptFileError` on a checksum mismatch, :class:`UserError` when it cannot be read.
    """
    state, detail = check_file(path, md5, payload_sha256, decompressed=decompressed)
    if state == "checksum-mismatch":
        raise CorruptFileError(
            f"{path} has the wrong checksum ({detail}); it is damaged or a different file. "
            "Delete it and run again to download a fresh copy."
        )
    if state not in ("ok", "unverified"):
        raise UserError(f"cannot read {path} ({detail}); check that it exists and is readable")
