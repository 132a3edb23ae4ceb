"""Downloading dataset files with urllib: streamed, checksummed, placed atomically.

A file is streamed into a temporary file in the destination folder while its MD5 is computed;
only a complete download with the right checksum is moved to its final name (``os.replace``),
so the destination never holds a partial or wrong file.

Mirrors: each :class:`~advdefense.data.specs.RemoteFile` lists its URLs in order. Setting
``$ADVDEFENSE_MIRROR`` (or passing ``mirror=``) to a base URL makes ``<mirror>/<dataset>/<file>``
the first URL tried, so a copy of a data root served over HTTP (``python -m http.server`` in
the root) or a ``file://`` URL works as a mirror.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from advdefense.atomic_files import ordinary_permissions
from advdefense.data.paths import DATA_ENV_VAR, DEBIAN_DIRS
from advdefense.data.specs import DatasetSpec, RemoteFile
from advdefense.errors import CorruptFileError, DatasetNotFoundError, UserError

__all__ = [
    "MIRROR_ENV_VAR",
    "DownloadError",
    "candidate_urls",
    "download_file",
    "fetch_files",
    "missing_files_message",
]

logger = logging.getLogger(__name__)

#: Environment variable with a base URL tried before the canonical ones.
MIRROR_ENV_VAR = "ADVDEFENSE_MIRROR"

_CHUNK = 1 << 20
_SCHEMES = ("http", "https", "file", "ftp")


class DownloadError(DatasetNotFoundError):
    """One URL could not be fetched (HTTP error, unreachable host, connection dropped)."""

    def __init__(self, url: str, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(f"could not download {url}: {reason}")
        self.url = url
        self.reason = reason
        self.unreachable = unreachable


def _host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    md5: str,
    *,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` and check its MD5; returns ``dest``.

    Raises :class:`DownloadError` (a :class:`DatasetNotFoundError`) when the URL cannot be
    fetched and :class:`CorruptFileError` when the body is shorter than its Content-Length or
    its MD5 differs from ``md5``. Either way nothing is left at ``dest`` or next to it.
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise DownloadError(url, f"unsupported URL scheme {scheme!r}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, then renamed
            dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False
        )
    except OSError as exc:
        raise UserError(
            f"cannot write to {dest.parent} ({exc}); choose a writable data root with root= "
            f"or ${DATA_ENV_VAR}"
        ) from exc
    tmp_path = Path(tmp.name)
    try:
        with tmp:
            _stream(url, tmp, md5, dest, progress=progress, timeout=timeout)
        os.chmod(tmp_path, ordinary_permissions())  # temp files are private
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)
    return dest


def _open(url: str, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": "advdefense"})
    try:
        response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(url, f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        # a host that refuses or does not resolve is skipped for the other files; a missing
        # local file (file:// mirror) says nothing about the others
        remote = urllib.parse.urlsplit(url).scheme != "file"
        raise DownloadError(url, f"{reason}", unreachable=remote) from exc
    return response


def _stream(
    url: str, out: IO[bytes], md5: str, dest: Path, *, progress: bool, timeout: float
) -> None:
    """Copy ``url`` into ``out``; check length and MD5."""
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with _open(url, timeout) as response:
        length_header = response.headers.get("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None
        logger.info("downloading %s to %s", url, dest)
        with tqdm(
            total=expected,
            unit="B",
            unit_scale=True,
            desc=dest.name,
            disable=not (progress and sys.stderr.isatty()),
        ) as bar:
            try:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except http.client.IncompleteRead as exc:
                received += len(exc.partial)
                if expected is None:  # a chunked response cut off: no size to compare with
                    raise DownloadError(
                        url, f"connection closed mid-transfer after {received} bytes"
                    ) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(url, f"connection lost after {received} bytes: {exc}") from exc
    if expected is not None and received != expected:
        raise CorruptFileError(
            f"download of {url} is truncated: got {received} bytes, the server announced "
            f"{expected}; nothing was saved to {dest}"
        )
    actual = digest.hexdigest()
    if actual != md5:
        raise CorruptFileError(
            f"checksum mismatch for {url}: expected md5 {md5}, got {actual}; "
            f"nothing was saved to {dest}"
        )


def candidate_urls(remote: RemoteFile, dataset: str, mirror: str | None = None) -> list[str]:
    """URLs to try for ``remote``: ``<mirror>/<dataset>/<file>`` first (argument, else
    ``$ADVDEFENSE_MIRROR``), then the canonical URLs."""
    base = mirror if mirror is not None else os.environ.get(MIRROR_ENV_VAR, "")
    urls = []
    if base.strip():
        urls.append(f"{base.strip().rstrip('/')}/{dataset}/{remote.filename}")
    urls.extend(url for url in remote.urls if url not in urls)
    return urls


@dataclass
class _Failure:
    filename: str
    attempts: list[str]
    checksum: bool


def missing_files_message(
    spec: DatasetSpec,
    filenames: Iterable[str],
    directory: Path,
    attempts: Sequence[tuple[str, Sequence[str]]] = (),
    *,
    intro: str | None = None,
) -> str:
    """The one message for missing dataset files: what, which URLs were tried, where to put them."""
    names = list(filenames)
    lines = [intro or f"could not download {spec.name}: {', '.join(names)}"]
    for filename, tried in attempts:
        if tried:
            lines.append(f"  {filename}:")
            lines.extend(f"    {attempt}" for attempt in tried)
    lines.append(
        f"Download them yourself and put them in {directory}{os.sep} "
        f"(or in <dir>{os.sep}{spec.name}{os.sep} with ${DATA_ENV_VAR}=<dir>)."
    )
    if not attempts:
        urls = [url for name in names for url in _urls_for(spec, name)]
        if urls:
            lines.append("Sources: " + ", ".join(urls))
    if spec.name in DEBIAN_DIRS:
        lines.append(
            f"On Debian/Ubuntu: apt-get install dataset-{spec.name} "
            f"(installs them in {DEBIAN_DIRS[spec.name]}{os.sep})."
        )
    return "\n".join(lines)


def _urls_for(spec: DatasetSpec, name: str) -> tuple[str, ...]:
    try:
        return spec.remote(name).urls
    except KeyError:
        return ()


def fetch_files(
    spec: DatasetSpec,
    remotes: Sequence[RemoteFile],
    directory: Path,
    *,
    mirror: str | None = None,
    progress: bool = True,
    timeout: float = 60,
) -> dict[str, Path]:
    """Download each of ``remotes`` into ``directory``, trying its URLs in order.

    Returns filename -> path. When some file cannot be had from any URL, raises one error for
    all of them: :class:`CorruptFileError` if some URL served a wrong or truncated file,
    :class:`DatasetNotFoundError` otherwise. Hosts found unreachable are not tried again.
    """
    fetched: dict[str, Path] = {}
    failures: list[_Failure] = []
    unreachable: set[str] = set()
    for remote in remotes:
        failure = _Failure(remote.filename, [], checksum=False)
        for url in candidate_urls(remote, spec.name, mirror):
            if _host(url) in unreachable:
                failure.attempts.append(f"{url}: skipped, host unreachable")
                continue
            try:
                fetched[remote.filename] = download_file(
                    url, directory / remote.filename, remote.md5, progress=progress,
                    timeout=timeout,
                )  # fmt: skip
                break
            except DownloadError as exc:
                failure.attempts.append(f"{url}: {exc.reason}")
                if exc.unreachable:
                    unreachable.add(_host(url))
            except CorruptFileError as exc:
                failure.attempts.append(str(exc))
                failure.checksum = True
        else:
            failures.append(failure)
    if failures:
        attempts = [(f.filename, f.attempts) for f in failures]
        message = missing_files_message(spec, [f.filename for f in failures], directory, attempts)
        if any(f.checksum for f in failures):
            raise CorruptFileError(message)
        raise DatasetNotFoundError(message)
    return fetched
