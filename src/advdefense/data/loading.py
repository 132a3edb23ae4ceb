"""Finding, fetching, verifying and loading datasets."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from advdefense.data import readers
from advdefense.data.download import fetch_files, missing_files_message
from advdefense.data.integrity import FileStatus, check_file, require_ok
from advdefense.data.paths import data_search_paths, download_dir, intended_download_dir
from advdefense.data.specs import (
    MNIST_SAMPLE_SHA256,
    DatasetSpec,
    RemoteFile,
    get_spec,
    list_datasets,
)
from advdefense.errors import CorruptFileError, DatasetNotFoundError, InputError

__all__ = ["DatasetStatus", "LabeledImages", "fetch_dataset", "load_dataset", "verify_datasets"]

PathLike = str | os.PathLike[str]


class LabeledImages(NamedTuple):
    """Images (float32 N x C x H x W in [0, 1]) and their int64 labels (N)."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class DatasetStatus:
    """What :func:`verify_datasets` found for one dataset.

    ``path`` is the folder holding its files, or where a download would put them.
    """

    name: str
    found: bool
    path: Path | None
    files: tuple[FileStatus, ...]


# --- locating files --------------------------------------------------------------------------


def _variants(name: str) -> list[tuple[str, bool]]:
    """On-disk names for ``name``: (relative path, is the decompressed form of a .gz)."""
    if name.endswith(".gz") and not name.endswith(".tar.gz"):
        return [(name, False), (name[: -len(".gz")], True)]
    return [(name, False)]


def _locate(dirs: Iterable[Path], name: str) -> tuple[Path, bool] | None:
    for directory in dirs:
        for relative, decompressed in _variants(name):
            candidate = directory / relative
            if candidate.is_file():
                return candidate, decompressed
    return None


def _checksums(spec: DatasetSpec, name: str) -> tuple[str, str | None]:
    member = spec.extracted_file(name)
    if member is not None:
        return member.md5, None
    remote = spec.remote(name)
    return remote.md5, remote.payload_sha256


def _verify(spec: DatasetSpec, name: str, path: Path, decompressed: bool) -> None:
    md5, sha256 = _checksums(spec, name)
    require_ok(path, md5, sha256, decompressed=decompressed)


def _is_archive(spec: DatasetSpec, name: str) -> bool:
    return any(member.archive == name for member in spec.extracted)


def _writable_dir(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _resolve(
    spec: DatasetSpec,
    names: Iterable[str],
    root: PathLike | None,
    *,
    download: bool,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Verified local paths for ``names``, downloading and extracting what is missing."""
    dirs = data_search_paths(root, spec.name)
    names = list(names)
    resolved: dict[str, Path] = {}
    pending_members: list[str] = []
    needed_remote: list[str] = []
    for name in names:
        hit = _locate(dirs, name)
        if hit is not None:
            _verify(spec, name, *hit)
            resolved[name] = hit[0]
            continue
        member = spec.extracted_file(name)
        if member is None:
            needed_remote.append(name)
        else:
            pending_members.append(name)
            if member.archive not in needed_remote:
                needed_remote.append(member.archive)

    archives: dict[str, Path] = {}
    to_download: list[RemoteFile] = []
    for name in needed_remote:
        hit = _locate(dirs, name) if _is_archive(spec, name) else None
        if hit is not None:
            _verify(spec, name, *hit)
            archives[name] = hit[0]
        else:
            to_download.append(spec.remote(name))

    if to_download:
        missing = [remote.filename for remote in to_download]
        if not download:
            target = intended_download_dir(spec.name, root)
            raise DatasetNotFoundError(
                missing_files_message(
                    spec,
                    missing,
                    target,
                    intro=f"{spec.name} files not found: {', '.join(missing)} "
                    f"(looked in {', '.join(str(d) for d in dirs)}; download=False, "
                    "pass download=True to fetch them)",
                )
            )
        target = download_dir(spec.name, root)
        fetched = fetch_files(spec, to_download, target, mirror=mirror, progress=progress)
        for filename, path in fetched.items():
            if _is_archive(spec, filename):
                archives[filename] = path
            else:
                resolved[filename] = path

    extract_dirs: list[Path] = []
    for archive in archives.values():
        dest = archive.parent if _writable_dir(archive.parent) else download_dir(spec.name, root)
        readers.safe_extract_tar(archive, dest)
        extract_dirs.append(dest)
    for name in pending_members:
        hit = _locate([*extract_dirs, *dirs], name)
        if hit is None:
            member = spec.extracted_file(name)
            archive_name = member.archive if member else "its archive"
            raise CorruptFileError(
                f"{archive_name} does not contain {name}; delete the archive and run again to "
                "download a fresh copy"
            )
        _verify(spec, name, *hit)
        resolved[name] = hit[0]
    return resolved


def fetch_dataset(
    name: str,
    root: PathLike | None = None,
    *,
    splits: Iterable[str] | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Make the files of ``splits`` (default: train and test) available and verified.

    Downloads what no search path holds (see :func:`data_search_paths`) into the first writable
    root, extracts archives and checks every checksum. ``mirror`` is a base URL tried first as
    ``<mirror>/<name>/<file>``; by default ``$ADVDEFENSE_MIRROR``. Returns file name -> path.
    """
    spec = get_spec(name)
    wanted = list(spec.required_splits if splits is None else splits)
    names: list[str] = []
    for split in wanted:
        names.extend(n for n in spec.files_for_split(split) if n not in names)
    return _resolve(spec, names, root, download=True, mirror=mirror, progress=progress)


# --- loading ---------------------------------------------------------------------------------


def _load_arrays(
    spec: DatasetSpec, split: str, paths: dict[str, Path]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    files = [paths[name] for name in spec.files_for_split(split)]
    if spec.format == "idx":
        image_path, label_path = files
        images = readers.read_idx_images(image_path)
        labels = readers.read_idx_labels(label_path)
        if images.shape[0] != labels.shape[0]:
            raise CorruptFileError(
                f"{image_path} holds {images.shape[0]} images but {label_path} holds "
                f"{labels.shape[0]} labels; delete both and run again to download fresh copies"
            )
        expected = spec.split_size(split)
        if expected is not None and images.shape[0] != expected:
            raise CorruptFileError(
                f"{image_path} and {label_path} hold {images.shape[0]:,} samples, but the "
                f"{spec.name} {split} split has {expected:,}: they are damaged or another "
                "dataset's files; delete both and run again to download fresh copies"
            )
        return images[:, None, :, :], labels
    if spec.format == "cifar":
        key = "fine_labels" if spec.num_classes == 100 else "labels"
        batches = [readers.read_cifar_batch(path, key) for path in files]
        return (
            np.concatenate([images for images, _ in batches]),
            np.concatenate([labels for _, labels in batches]),
        )
    if spec.format == "svhn":
        return readers.read_svhn_mat(files[0])
    if spec.format == "mnist-sample":
        return readers.mnist_sample_split(split)
    raise AssertionError(f"unhandled dataset format {spec.format!r}")  # pragma: no cover


def load_dataset(
    name: str, split: str, root: PathLike | None = None, *, download: bool = True
) -> LabeledImages:
    """Load one split of a dataset as float32 images in [0, 1] and int64 labels.

    ``name``: one of ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` (fine labels),
    ``svhn``, ``mnist-sample`` (embedded, 4,000 train / 1,000 test). ``split``: ``train`` or
    ``test`` (``svhn`` also ``extra``). Files are looked for in ``root``, ``$ADVDEFENSE_DATA``
    and ``~/.cache/advdefense`` (see :func:`data_search_paths`) and downloaded when missing
    unless ``download=False``. Checksums are verified on first use in the process.
    """
    spec = get_spec(name)
    if not isinstance(split, str) or split not in spec.splits:
        raise InputError(
            f"unknown split {split!r} for dataset {spec.name!r}; "
            f"valid splits: {', '.join(spec.splits)}"
        )
    paths = _resolve(spec, spec.files_for_split(split), root, download=download)
    images, labels = _load_arrays(spec, split, paths)
    expected_shape = spec.image_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != expected_shape:
        raise CorruptFileError(
            f"{spec.name} {split} images have shape {tuple(images.shape[1:])}, expected "
            f"{expected_shape}; the files are not {spec.name}. Delete them and run again."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise CorruptFileError(
            f"{spec.name} {split} labels lie in [{labels.min()}, {labels.max()}], expected "
            f"[0, {spec.num_classes - 1}]; the files are not {spec.name}. "
            "Delete them and run again."
        )
    image_tensor = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    label_tensor = torch.from_numpy(np.array(labels, dtype=np.int64, copy=True))
    return LabeledImages(image_tensor, label_tensor)


# --- verification ----------------------------------------------------------------------------


#: File states a load accepts.
_USABLE = ("ok", "unverified")


def _sample_status() -> DatasetStatus:
    package, resource = readers.MNIST_SAMPLE_RESOURCE
    asset = importlib.resources.files(package).joinpath(resource)
    filename = resource.rsplit("/", 1)[-1]
    path = Path(str(asset)) if isinstance(asset, Path) else None
    digest = hashlib.sha256(asset.read_bytes()).hexdigest()
    if digest == MNIST_SAMPLE_SHA256:
        status = FileStatus(filename, path, "ok", "embedded in the package, sha256 verified")
    else:
        status = FileStatus(
            filename,
            path,
            "checksum-mismatch",
            f"expected sha256 {MNIST_SAMPLE_SHA256}, got {digest}; reinstall advdefense",
        )
    return DatasetStatus("mnist-sample", True, path.parent if path else None, (status,))


def _status_of(spec: DatasetSpec, dirs: list[Path], name: str) -> FileStatus:
    hit = _locate(dirs, name)
    if hit is None:
        return FileStatus(name, None, "missing", "not found")
    md5, sha256 = _checksums(spec, name)
    state, detail = check_file(hit[0], md5, sha256, decompressed=hit[1])
    return FileStatus(name, hit[0], state, detail)


def _splits_using(spec: DatasetSpec, name: str) -> list[str]:
    return [split for split in spec.splits if name in spec.files_for_split(split)]


def _dataset_status(spec: DatasetSpec, root: PathLike | None) -> DatasetStatus:
    dirs = data_search_paths(root, spec.name)
    statuses: list[FileStatus] = []
    usable: set[str] = set()  # names that a load can use, directly or by extracting
    for remote in spec.files:
        archive = _status_of(spec, dirs, remote.filename)
        members = [m.path for m in spec.extracted if m.archive == remote.filename]
        if not members:
            splits = _splits_using(spec, remote.filename)
            if archive.state == "missing" and not set(splits) & set(spec.required_splits):
                detail = f"not found (optional: split {', '.join(splits)})"
                archive = FileStatus(remote.filename, None, "missing", detail)
            statuses.append(archive)
            if archive.state in _USABLE:
                usable.add(remote.filename)
            continue
        extracted = [_status_of(spec, dirs, member) for member in members]
        usable.update(status.filename for status in extracted if status.state in _USABLE)
        if archive.state == "ok":
            usable.update(members)
        if archive.state != "missing" or not all(s.state == "ok" for s in extracted):
            statuses.append(archive)
        for status in extracted:
            if status.state != "missing":
                statuses.append(status)
            elif archive.state == "ok":
                detail = f"not extracted yet; unpacked from {remote.filename} on first load"
                statuses.append(FileStatus(status.filename, None, "missing", detail))
    required = {n for split in spec.required_splits for n in spec.files_for_split(split)}
    found = required <= usable
    located = [s.path for s in statuses if s.path is not None]
    path = intended_download_dir(spec.name, root)
    if located:
        holders = [d for d in dirs if any(d in p.parents for p in located)]
        path = holders[0] if holders else located[0].parent
    return DatasetStatus(spec.name, found, path, tuple(statuses))


def verify_datasets(root: PathLike | None = None) -> list[DatasetStatus]:
    """Report, for every dataset, whether its train and test files are present and intact.

    Downloads nothing and creates nothing; checksums are computed (and cached per process).
    """
    result = []
    for spec in list_datasets():
        if spec.format == "mnist-sample":
            result.append(_sample_status())
        else:
            result.append(_dataset_status(spec, root))
    return result
