"""Readers for the on-disk formats: IDX, CIFAR python batches, SVHN ``.mat``, the embedded CSV.

Each reader returns numpy arrays (uint8 images, int64 labels) and raises
:class:`~advdefense.errors.CorruptFileError` naming the file when its content is not what the
format promises.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.resources
import io
import os
import pickle
import tarfile
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt

from advdefense.data.specs import MNIST_SAMPLE_SHA256
from advdefense.errors import CorruptFileError, InputError

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_SAMPLE_RESOURCE",
    "RestrictedUnpickler",
    "load_pickle",
    "mnist_sample_split",
    "read_cifar_batch",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_mnist_sample",
    "read_svhn_mat",
    "safe_extract_tar",
]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

#: Location of the embedded MNIST sample inside the package.
MNIST_SAMPLE_RESOURCE = ("advdefense.data", "assets/mnist_5k.csv.gz")

_FIX = "delete it and run again to download a fresh copy"

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

UInt8Array = npt.NDArray[np.uint8]
Int64Array = npt.NDArray[np.int64]


def _corrupt(path: str | os.PathLike[str], problem: str) -> CorruptFileError:
    return CorruptFileError(
        f"{path}: {problem}; the file is damaged or not what its name says, {_FIX}"
    )


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        if path.suffix == ".gz":
            raise _corrupt(path, "not a gzip file (bad header)")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"cannot decompress ({type(exc).__name__}: {exc})") from exc


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> npt.NDArray[Any]:
    """Read an IDX file (``.gz`` or uncompressed) into an array of the shape its header gives."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise _corrupt(path, f"only {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise _corrupt(path, f"IDX magic number is 0x{magic:08x}, expected 0x{expected_magic:08x}")
    type_code, ndim = data[2], data[3]
    if data[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise _corrupt(path, f"not an IDX file (magic number 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _corrupt(path, f"truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise _corrupt(
            path,
            f"IDX payload {what}: header says dims {dims} ({expected} bytes), found {payload}",
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx_images(path: str | os.PathLike[str]) -> UInt8Array:
    """Read an IDX image file (magic 0x00000803): uint8 array N x H x W."""
    array = read_idx(path, IDX_IMAGES_MAGIC)
    return array.astype(np.uint8, copy=False)


def read_idx_labels(path: str | os.PathLike[str]) -> Int64Array:
    """Read an IDX label file (magic 0x00000801): int64 vector of length N."""
    array = read_idx(path, IDX_LABELS_MAGIC)
    return array.astype(np.int64)


# --- CIFAR python batches -------------------------------------------------------------------


def _numpy_attr(module: str, name: str) -> Any:
    # numpy 2 renamed numpy.core to numpy._core; old pickles name the former.
    for candidate in (module.replace("numpy.core", "numpy._core", 1), module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} is not available in this numpy")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes with protocol < 3 as _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only plain containers, bytes/str and numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, ...) is refused with
    :class:`~advdefense.errors.CorruptFileError` before it can be called.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, path: str | os.PathLike[str]) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allow-listed numpy and codecs globals."""
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_attr(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise CorruptFileError(
            f"{self._path}: refusing to unpickle {module}.{name}; CIFAR batches hold only numpy "
            f"arrays and plain containers, so the file is corrupt or malicious, {_FIX}"
        )


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`."""
    path = Path(path)
    with path.open("rb") as handle:
        try:
            return RestrictedUnpickler(handle, path).load()
        except CorruptFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
                IndexError, AttributeError) as exc:  # fmt: skip
            raise _corrupt(path, f"cannot unpickle ({type(exc).__name__}: {exc})") from exc


def _get_key(batch: dict[Any, Any], key: str) -> Any:
    for candidate in (key, key.encode("latin1")):
        if candidate in batch:
            return batch[candidate]
    raise KeyError(key)


def read_cifar_batch(
    path: str | os.PathLike[str], label_key: str = "labels"
) -> tuple[UInt8Array, Int64Array]:
    """Read one CIFAR python batch: uint8 images N x 3 x 32 x 32 and int64 labels.

    ``label_key`` is ``"labels"`` for CIFAR-10 and ``"fine_labels"`` for CIFAR-100.
    """
    batch = load_pickle(path)
    if not isinstance(batch, dict):
        raise _corrupt(path, f"expected a dict in the pickle, found {type(batch).__name__}")
    try:
        data = _get_key(batch, "data")
        labels = _get_key(batch, label_key)
    except KeyError as exc:
        raise _corrupt(path, f"missing key {exc.args[0]!r} in the CIFAR batch") from exc
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise _corrupt(path, "'data' is not a uint8 N x 3072 array")
    if data.shape[1] != 3 * 32 * 32:
        raise _corrupt(path, f"'data' has {data.shape[1]} columns, expected 3072")
    try:
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise _corrupt(path, f"{label_key!r} is not a list of integers") from exc
    if label_array.shape[0] != data.shape[0]:
        raise _corrupt(
            path, f"{data.shape[0]} images but {label_array.shape[0]} labels in {label_key!r}"
        )
    return data.reshape(-1, 3, 32, 32).copy(), label_array


def _is_safe_member(member: tarfile.TarInfo) -> bool:
    name = PurePosixPath(member.name)
    return not name.is_absolute() and ".." not in name.parts and (member.isfile() or member.isdir())


def safe_extract_tar(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Path]:
    """Extract regular files of a ``.tar.gz`` into ``dest``; return the extracted file paths.

    Members with absolute paths or ``..`` components, links and devices are rejected
    (:class:`CorruptFileError`). Files are unpacked into a temporary folder next to ``dest``
    and moved into place one by one, so an interrupted extraction leaves no partial file.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    extracted: list[Path] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if not _is_safe_member(m)]
            if bad:
                raise _corrupt(archive, f"unsafe archive members {bad[:5]}")
            with tempfile.TemporaryDirectory(dir=dest, prefix=".extract-") as tmp:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(tmp, members=members)  # members checked above
                for member in members:
                    if not member.isfile():
                        continue
                    target = dest / member.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(Path(tmp) / member.name, target)
                    extracted.append(target)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _corrupt(archive, f"cannot extract ({type(exc).__name__}: {exc})") from exc
    return extracted


# --- SVHN ------------------------------------------------------------------------------------


def read_svhn_mat(path: str | os.PathLike[str]) -> tuple[UInt8Array, Int64Array]:
    """Read an SVHN ``*_32x32.mat``: uint8 images N x 3 x 32 x 32, labels 0-9 (10 means 0)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = Path(path)
    try:
        mat = loadmat(str(path))
    except (MatReadError, ValueError, TypeError, NotImplementedError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"cannot read MATLAB file ({type(exc).__name__}: {exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise _corrupt(path, "missing variable 'X' or 'y'")
    images, labels = mat["X"], mat["y"]
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[2] != 3:
        raise _corrupt(path, f"'X' must be H x W x 3 x N, got shape {np.shape(images)}")
    if images.dtype != np.uint8:
        raise _corrupt(path, f"'X' must be uint8, got {images.dtype}")
    label_array = np.asarray(labels).reshape(-1).astype(np.int64)
    if label_array.shape[0] != images.shape[3]:
        raise _corrupt(path, f"{images.shape[3]} images but {label_array.shape[0]} labels")
    label_array[label_array == 10] = 0
    if label_array.size and (label_array.min() < 0 or label_array.max() > 9):
        raise _corrupt(path, f"labels outside 1-10: {np.unique(label_array).tolist()}")
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), label_array


# --- embedded MNIST sample -------------------------------------------------------------------


@lru_cache(maxsize=1)
def read_mnist_sample() -> UInt8Array:
    """The embedded 5,000-digit CSV as a read-only uint8 array 5000 x 785 (pixels, then label)."""
    package, resource = MNIST_SAMPLE_RESOURCE
    raw = importlib.resources.files(package).joinpath(resource).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SAMPLE_SHA256:
        raise CorruptFileError(
            f"the embedded MNIST sample {resource} has sha256 {digest}, expected "
            f"{MNIST_SAMPLE_SHA256}; reinstall advdefense"
        )
    text = gzip.decompress(raw).decode("ascii")
    array = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.uint8, ndmin=2)
    if array.shape != (5000, 785):
        raise CorruptFileError(f"the embedded MNIST sample has shape {array.shape}; reinstall")
    array.setflags(write=False)
    return array


@lru_cache(maxsize=1)
def _mnist_sample_permutation() -> npt.NDArray[np.intp]:
    perm = np.random.default_rng(0).permutation(5000)
    perm.setflags(write=False)
    return perm


def mnist_sample_split(split: str) -> tuple[UInt8Array, Int64Array]:
    """Fresh copies of the fixed split: images N x 1 x 28 x 28 uint8, int64 labels.

    ``perm = numpy.random.default_rng(0).permutation(5000)``; train is ``perm[:4000]``, test is
    ``perm[4000:]``.
    """
    perm = _mnist_sample_permutation()
    if split == "train":
        rows = perm[:4000]
    elif split == "test":
        rows = perm[4000:]
    else:
        raise InputError(f"unknown split {split!r} for dataset 'mnist-sample'; valid: train, test")
    table = read_mnist_sample()[rows]  # fancy indexing copies
    images = np.ascontiguousarray(table[:, :784]).reshape(-1, 1, 28, 28)
    return images, table[:, 784].astype(np.int64)
