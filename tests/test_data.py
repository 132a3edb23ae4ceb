"""Tests for advdefense.data: real file formats written small, a local HTTP server, no network."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import torch

from advdefense.data import (
    DATASETS,
    DatasetSpec,
    DatasetStatus,
    ExtractedFile,
    LabeledImages,
    RemoteFile,
    data_search_paths,
    download_file,
    fetch_dataset,
    integrity,
    list_datasets,
    load_dataset,
    paths,
    readers,
    specs,
    verify_datasets,
)
from advdefense.data.download import DownloadError
from advdefense.errors import CorruptFileError, DatasetNotFoundError, InputError, UserError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


# --- helpers ---------------------------------------------------------------------------------


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fake_idx_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_fake_mnist(directory: Path, n: int = 12, seed: int = 0, *, gz: bool = True) -> None:
    suffix = ".gz" if gz else ""
    for prefix, count in (("train", n), ("t10k", n // 2)):
        images, labels = fake_idx_split(count, seed + (prefix == "t10k"))
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


def patch_spec(monkeypatch: pytest.MonkeyPatch, spec: DatasetSpec) -> None:
    monkeypatch.setitem(specs._REGISTRY, spec.name, spec)


def mnist_spec_for(directory: Path, base_url: str | None = None) -> DatasetSpec:
    """The mnist spec with checksums of the fake files in ``directory`` (and URLs at base_url)."""
    spec = DATASETS["mnist"]
    files = tuple(
        RemoteFile(
            f.filename,
            (base_url + f.filename,) if base_url else f.urls,
            md5_of(directory / f.filename),
        )
        for f in spec.files
    )
    return dataclasses.replace(spec, files=files, split_sizes=())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tmp_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test away from the real cache, $ADVDEFENSE_DATA, mirrors and Debian data."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ADVDEFENSE_DATA", str(tmp_path / "envdata"))
    monkeypatch.delenv("ADVDEFENSE_MIRROR", raising=False)
    monkeypatch.setitem(paths.DEBIAN_DIRS, "fashion-mnist", tmp_path / "no-debian")
    return tmp_path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/truncated/"):
            body = b"x" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 5000))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/chunked-cut/"):  # chunked, closed inside the second chunk
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"400\r\n" + b"y" * 0x400 + b"\r\n" + b"400\r\n" + b"y" * 10)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server serving ``tmp_path/served``; yields (base URL, served dir)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(_Handler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# --- specs -----------------------------------------------------------------------------------


def test_specs_are_consistent() -> None:
    names = [spec.name for spec in list_datasets()]
    assert names == ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "mnist-sample"]
    assert set(DATASETS) == set(names)
    for spec in list_datasets():
        assert len(spec.class_names) == spec.num_classes
        assert len(set(spec.class_names)) == spec.num_classes
        assert len(spec.image_shape) == 3
        assert spec.license and spec.citation and spec.source
        for remote in spec.files:
            assert len(remote.md5) == 32 and int(remote.md5, 16) >= 0
            assert remote.urls and all(u.endswith(remote.filename) for u in remote.urls)
        for split in spec.splits:
            for name in spec.files_for_split(split):
                assert spec.extracted_file(name) is not None or spec.remote(name)
        assert {split for split, _ in spec.split_sizes} <= set(spec.splits)
    for name in ("mnist", "fashion-mnist"):  # raw copies are checked by their sample count
        assert DATASETS[name].split_size("train") == 60_000
        assert DATASETS[name].split_size("test") == 10_000
    assert DATASETS["mnist"].files[0].urls[0].startswith("https://ossci-datasets.s3")
    assert all(f.payload_sha256 for f in DATASETS["fashion-mnist"].files)
    assert DATASETS["svhn"].splits == ("train", "test", "extra")
    with pytest.raises(TypeError):
        DATASETS["mnist"] = DATASETS["svhn"]  # type: ignore[index]


def test_unknown_name_and_split_list_valid_values() -> None:
    with pytest.raises(InputError, match="valid names: mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet", "train")
    with pytest.raises(InputError, match="valid splits: train, test"):
        load_dataset("mnist-sample", "extra")
    with pytest.raises(InputError, match="train, test, extra"):
        load_dataset("svhn", "val")


# --- IDX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_gz_and_raw(tmp_path: Path, suffix: str) -> None:
    images, labels = fake_idx_split(5, seed=1)
    img = write_idx(tmp_path / f"images{suffix}", images)
    lab = write_idx(tmp_path / f"labels{suffix}", labels)
    out = readers.read_idx_images(img)
    assert out.dtype == np.uint8 and out.shape == (5, 28, 28)
    np.testing.assert_array_equal(out, images)
    out_labels = readers.read_idx_labels(lab)
    assert out_labels.dtype == np.int64
    np.testing.assert_array_equal(out_labels, labels)


def test_idx_truncated_payload(tmp_path: Path) -> None:
    data = idx_bytes(fake_idx_split(4, seed=2)[0])
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(data[:-10]))
    with pytest.raises(CorruptFileError, match=r"truncated.*delete it") as info:
        readers.read_idx_images(path)
    assert str(path) in str(info.value)


def test_idx_truncated_header_and_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(CorruptFileError, match="header"):
        readers.read_idx_images(path)
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8)) + b"junk")
    with pytest.raises(CorruptFileError, match="trailing"):
        readers.read_idx_images(path)


def test_idx_garbage_and_cut_gzip(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(CorruptFileError, match="gzip"):
        readers.read_idx_images(garbage)
    bad_stream = tmp_path / "bad-stream.gz"
    bad_stream.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(300))
    with pytest.raises(CorruptFileError, match="cannot decompress"):
        readers.read_idx_images(bad_stream)
    cut = tmp_path / "cut.gz"
    full = gzip.compress(idx_bytes(fake_idx_split(50, seed=3)[0]))
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(CorruptFileError, match=r"cut\.gz.*cannot decompress"):
        readers.read_idx_images(cut)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    labels = write_idx(tmp_path / "labels.gz", np.arange(5, dtype=np.uint8))
    with pytest.raises(CorruptFileError, match="magic number is 0x00000801, expected 0x00000803"):
        readers.read_idx_images(labels)
    images = write_idx(tmp_path / "images.gz", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(CorruptFileError, match="expected 0x00000801"):
        readers.read_idx_labels(images)
    text = tmp_path / "text"
    text.write_bytes(b"hello world, not idx")
    with pytest.raises(CorruptFileError, match="not an IDX file"):
        readers.read_idx(text)


def test_idx_image_label_count_mismatch(isolated: Path) -> None:
    root = isolated / "root"
    write_fake_mnist(root / "mnist", gz=False)
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(CorruptFileError, match=r"6 images but .* 3 labels"):
        load_dataset("mnist", "test", root=root, download=False)


# --- CIFAR -----------------------------------------------------------------------------------


def cifar_batch(n: int, seed: int, label_key: str, *, bytes_keys: bool) -> dict[Any, Any]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {"batch_label": "fake", "data": data, label_key: labels}
    if bytes_keys:
        return {k.encode(): v for k, v in batch.items()}
    return dict(batch)


def write_pickle(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_read_cifar_batch(tmp_path: Path, bytes_keys: bool) -> None:
    batch = cifar_batch(4, seed=0, label_key="labels", bytes_keys=bytes_keys)
    path = write_pickle(tmp_path / "data_batch_1", batch)
    images, labels = readers.read_cifar_batch(path)
    data = batch[b"data" if bytes_keys else "data"]
    assert isinstance(data, np.ndarray)
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.uint8
    # CHW order: channel c, row h, column w is column c*1024 + h*32 + w
    assert images[2, 1, 5, 7] == data[2, 1 * 1024 + 5 * 32 + 7]
    assert (
        labels.dtype == np.int64 and labels.tolist() == batch[b"labels" if bytes_keys else "labels"]
    )


def test_read_cifar100_fine_labels(tmp_path: Path) -> None:
    batch = cifar_batch(3, seed=1, label_key="fine_labels", bytes_keys=True)
    batch[b"coarse_labels"] = [0, 0, 0]
    path = write_pickle(tmp_path / "train", batch)
    _, labels = readers.read_cifar_batch(path, "fine_labels")
    assert labels.tolist() == batch[b"fine_labels"]
    with pytest.raises(CorruptFileError, match="missing key 'labels'"):
        readers.read_cifar_batch(path, "labels")


def test_cifar_batch_bad_content(tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError, match="expected a dict"):
        readers.read_cifar_batch(write_pickle(tmp_path / "a", [1, 2, 3]))
    bad_shape = {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}
    with pytest.raises(CorruptFileError, match="3072"):
        readers.read_cifar_batch(write_pickle(tmp_path / "b", bad_shape))
    cut = tmp_path / "c"
    cut.write_bytes(pickle.dumps(cifar_batch(2, 0, "labels", bytes_keys=False), protocol=2)[:500])
    with pytest.raises(CorruptFileError, match="cannot unpickle"):
        readers.read_cifar_batch(cut)


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_SystemCall, _EvalCall])
def test_restricted_unpickler_refuses_code(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [payload(marker)]}
    path = write_pickle(tmp_path / "data_batch_1", evil)
    refused = r"refusing to unpickle (posix|os|nt|builtins|__builtin__)\.(system|eval)"
    with pytest.raises(CorruptFileError, match=refused):
        readers.read_cifar_batch(path)
    with pytest.raises(CorruptFileError, match="refusing"):
        readers.load_pickle(path)
    assert not marker.exists()


def test_restricted_unpickler_refuses_codecs_tricks(tmp_path: Path) -> None:
    # _codecs.encode is admitted only with latin1, which is how protocol 2 stores bytes
    path = tmp_path / "rot13"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(CorruptFileError, match=r"refusing _codecs\.encode with encoding 'rot13'"):
        readers.load_pickle(path)
    latin = tmp_path / "latin1"
    latin.write_bytes(pickle.dumps(b"\xff\x00bytes", protocol=2))
    assert b"_codecs" in latin.read_bytes()
    assert readers.load_pickle(latin) == b"\xff\x00bytes"


def test_restricted_unpickler_reads_python2_numpy_pickle(tmp_path: Path) -> None:
    # what the original CIFAR batches contain: a Python 2 pickle naming numpy.core, str data
    path = tmp_path / "py2"
    path.write_bytes(
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        b"(K\x01K\x02\x85cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNN"
        b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x02\x07\x09tb."
    )
    array = readers.load_pickle(path)
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8
    assert array.tolist() == [7, 9]


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("member", ["../escape", "/abs/escape", "a/../../escape"])
def test_safe_extract_rejects_path_traversal(tmp_path: Path, member: str) -> None:
    archive = make_tar(tmp_path / "evil.tar.gz", {"ok.txt": b"fine", member: b"evil"})
    dest = tmp_path / "out" / "inner"
    with pytest.raises(CorruptFileError, match="unsafe archive members"):
        readers.safe_extract_tar(archive, dest)
    assert not (tmp_path / "out" / "escape").exists()
    assert not (dest / "ok.txt").exists()


def test_safe_extract_rejects_symlink(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(CorruptFileError, match="unsafe"):
        readers.safe_extract_tar(archive, tmp_path / "out")


def build_fake_cifar10(directory: Path, n: int = 3) -> tuple[DatasetSpec, dict[str, bytes]]:
    """A real cifar-10-python.tar.gz with tiny batches in ``directory``, and its spec."""
    members: dict[str, bytes] = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = cifar_batch(n, seed=i, label_key="labels", bytes_keys=False)
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, protocol=2)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": ["a"]}, protocol=2)
    directory.mkdir(parents=True, exist_ok=True)
    archive = make_tar(directory / "cifar-10-python.tar.gz", members)
    base = DATASETS["cifar10"]
    spec = dataclasses.replace(
        base,
        files=(dataclasses.replace(base.files[0], md5=md5_of(archive)),),
        extracted=tuple(
            ExtractedFile(m.path, hashlib.md5(members[m.path]).hexdigest(), m.archive)
            for m in base.extracted
        ),
    )
    return spec, members


def test_cifar10_from_archive_end_to_end(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = isolated / "root"
    spec, members = build_fake_cifar10(root / "cifar10")
    patch_spec(monkeypatch, spec)
    statuses = {s.name: s for s in verify_datasets(root)}
    assert statuses["cifar10"].found
    assert any("not extracted yet" in f.detail for f in statuses["cifar10"].files)

    x, y = load_dataset("cifar10", "train", root=root, download=False)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (15,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    first = pickle.loads(members["cifar-10-batches-py/data_batch_1"])
    np.testing.assert_allclose(
        x[0].numpy(), first["data"][0].reshape(3, 32, 32).astype(np.float32) / 255, rtol=1e-6
    )
    assert y[:3].tolist() == first["labels"]
    assert (root / "cifar10" / "cifar-10-python.tar.gz").is_file()  # archive kept
    assert (root / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in (root / "cifar10").iterdir() if p.name.startswith(".extract")]

    xt, _ = load_dataset("cifar10", "test", root=root, download=False)
    assert xt.shape == (3, 3, 32, 32)
    status = {s.name: s for s in verify_datasets(root)}["cifar10"]
    assert status.found and status.path == root / "cifar10"
    assert all(f.state == "ok" for f in status.files)


def test_cifar10_download_via_mirror_argument(
    server: tuple[str, Path], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    spec, _ = build_fake_cifar10(served / "cifar10")
    dead = f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz"
    patch_spec(
        monkeypatch,
        dataclasses.replace(spec, files=(dataclasses.replace(spec.files[0], urls=(dead,)),)),
    )
    root = isolated / "root"
    fetched = fetch_dataset("cifar10", root, mirror=url, progress=False)
    assert set(fetched) == {
        m.path for m in spec.extracted if m.path != "cifar-10-batches-py/batches.meta"
    }
    archive = root / "cifar10" / "cifar-10-python.tar.gz"
    assert archive.is_file() and (archive.stat().st_mode & 0o777) == 0o666 & ~current_umask()
    x, y = load_dataset("cifar10", "test", root=root, download=False)
    assert x.shape == (3, 3, 32, 32) and y.shape == (3,)


def test_cifar_extracted_folder_without_archive(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = isolated / "root"
    spec, _ = build_fake_cifar10(root / "cifar10")
    patch_spec(monkeypatch, spec)
    readers.safe_extract_tar(root / "cifar10" / "cifar-10-python.tar.gz", root / "cifar10")
    (root / "cifar10" / "cifar-10-python.tar.gz").unlink()
    x, _ = load_dataset("cifar10", "test", root=root, download=False)
    assert x.shape == (3, 3, 32, 32)
    status = {s.name: s for s in verify_datasets(root)}["cifar10"]
    assert status.found
    assert "cifar-10-python.tar.gz" not in [f.filename for f in status.files]


# --- SVHN ------------------------------------------------------------------------------------


def write_svhn(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10, 10 is digit 0
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"X": x, "y": y})
    return x, y


def test_read_svhn_mat(tmp_path: Path) -> None:
    x, _ = write_svhn(tmp_path / "test_32x32.mat", n=12, seed=0)
    images, labels = readers.read_svhn_mat(tmp_path / "test_32x32.mat")
    assert images.shape == (12, 3, 32, 32) and images.dtype == np.uint8
    assert images[4, 2, 10, 20] == x[10, 20, 2, 4]
    assert labels.dtype == np.int64
    assert labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"MATLAB garbage" * 20)
    with pytest.raises(CorruptFileError, match=r"bad\.mat"):
        readers.read_svhn_mat(bad)


def test_svhn_load_dataset(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = isolated / "root"
    write_svhn(root / "svhn" / "train_32x32.mat", n=10, seed=1)
    write_svhn(root / "svhn" / "test_32x32.mat", n=5, seed=2)
    base = DATASETS["svhn"]
    files = tuple(
        dataclasses.replace(f, md5=md5_of(root / "svhn" / f.filename)) if i < 2 else f
        for i, f in enumerate(base.files)
    )
    patch_spec(monkeypatch, dataclasses.replace(base, files=files))
    x, y = load_dataset("svhn", "train", root=root, download=False)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    status = {s.name: s for s in verify_datasets(root)}["svhn"]
    assert status.found  # extra is optional
    extra = next(f for f in status.files if f.filename == "extra_32x32.mat")
    assert extra.state == "missing" and "optional" in extra.detail


# --- checksums -------------------------------------------------------------------------------


def test_checksum_mismatch_on_load(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = isolated / "root"
    write_fake_mnist(root / "mnist")
    patch_spec(monkeypatch, mnist_spec_for(root / "mnist"))
    load_dataset("mnist", "test", root=root, download=False)
    path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.full(6, 3, np.uint8))))
    with pytest.raises(CorruptFileError) as info:
        load_dataset("mnist", "test", root=root, download=False)
    message = str(info.value)
    assert str(path) in message and "expected md5" in message and "Delete it" in message
    status = {s.name: s for s in verify_datasets(root)}["mnist"]
    assert not status.found
    assert [f.state for f in status.files if f.path == path] == ["checksum-mismatch"]


def test_checksums_are_cached(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = isolated / "root"
    write_fake_mnist(root / "mnist")
    patch_spec(monkeypatch, mnist_spec_for(root / "mnist"))
    calls: list[str] = []
    real = integrity.file_digest

    def counting(path: str | os.PathLike[str], algorithm: str = "md5") -> str:
        calls.append(str(path))
        return real(path, algorithm)

    monkeypatch.setattr(integrity, "file_digest", counting)
    load_dataset("mnist", "train", root=root, download=False)
    assert len(calls) == 2
    load_dataset("mnist", "train", root=root, download=False)
    assert len(calls) == 2


def test_recompressed_gz_verified_by_payload(tmp_path: Path) -> None:
    payload = idx_bytes(np.arange(20, dtype=np.uint8).reshape(5, 2, 2))
    original = tmp_path / "a.gz"
    original.write_bytes(gzip.compress(payload, compresslevel=1, mtime=0))
    recompressed = tmp_path / "b.gz"
    recompressed.write_bytes(gzip.compress(payload, compresslevel=9, mtime=123))
    md5 = md5_of(original)
    sha = hashlib.sha256(payload).hexdigest()
    assert integrity.check_file(original, md5, sha) == ("ok", "md5 verified")
    assert integrity.check_file(recompressed, md5, sha) == ("ok", "recompressed, content verified")
    assert integrity.check_file(recompressed, md5)[0] == "checksum-mismatch"
    assert integrity.check_file(recompressed, md5, "0" * 64)[0] == "checksum-mismatch"
    raw = tmp_path / "raw"
    raw.write_bytes(payload)
    assert integrity.check_file(raw, md5, sha, decompressed=True)[0] == "ok"
    assert integrity.check_file(tmp_path / "none", md5)[0] == "missing"


# --- downloads -------------------------------------------------------------------------------


def test_download_good_file(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    content = os.urandom(3 * 1024 * 1024 + 17)
    (served / "blob.bin").write_bytes(content)
    dest = tmp_path / "dl" / "blob.bin"
    result = download_file(url + "blob.bin", dest, hashlib.md5(content).hexdigest(), progress=False)
    assert result == dest and dest.read_bytes() == content
    assert tmp_leftovers(dest.parent) == []


def test_download_wrong_checksum(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    (served / "blob.bin").write_bytes(b"content")
    dest = tmp_path / "dl" / "blob.bin"
    with pytest.raises(CorruptFileError, match=f"expected md5 {'0' * 32}, got"):
        download_file(url + "blob.bin", dest, "0" * 32, progress=False)
    assert not dest.exists() and tmp_leftovers(dest.parent) == []


def test_download_truncated(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "dl" / "blob.bin"
    with pytest.raises(CorruptFileError, match="truncated"):
        download_file(url + "truncated/blob.bin", dest, "0" * 32, progress=False, timeout=10)
    assert not dest.exists() and tmp_leftovers(dest.parent) == []


def test_download_cut_chunked_response(server: tuple[str, Path], tmp_path: Path) -> None:
    """Without a Content-Length the cut is a lost connection, not an announced size."""
    url, _ = server
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(DownloadError, match=r"connection closed mid-transfer after 10[23]4 bytes"):
        download_file(url + "chunked-cut/blob.bin", dest, "0" * 32, progress=False, timeout=10)
    assert not dest.exists()


def test_download_404_names_file_and_directory(
    server: tuple[str, Path], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    write_fake_mnist(served)
    spec = mnist_spec_for(served, url + "nothing-here/")
    patch_spec(monkeypatch, spec)
    root = isolated / "root"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "test", root=root)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "HTTP 404" in message and url + "nothing-here/t10k-images-idx3-ubyte.gz" in message
    assert f"put them in {root / 'mnist'}" in message
    assert not list((root / "mnist").iterdir())


def test_download_mirror_checksum_then_fail(
    server: tuple[str, Path], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    write_fake_mnist(served)
    spec = mnist_spec_for(served, url)
    bad = dataclasses.replace(spec.files[2], md5="1" * 32)
    patch_spec(monkeypatch, dataclasses.replace(spec, files=(*spec.files[:2], bad, spec.files[3])))
    with pytest.raises(CorruptFileError, match=f"expected md5 {'1' * 32}"):
        load_dataset("mnist", "test", root=isolated / "root")
    assert not (isolated / "root" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()


def test_mnist_end_to_end_download(
    server: tuple[str, Path], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    write_fake_mnist(served, n=20)
    patch_spec(monkeypatch, mnist_spec_for(served, url))
    root = isolated / "root"
    x, y = load_dataset("mnist", "test", root=root)
    assert isinstance(x, torch.Tensor) and x.shape == (10, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    images, labels = fake_idx_split(10, seed=1)
    np.testing.assert_allclose(x[:, 0].numpy() * 255, images, atol=1e-4)
    assert y.tolist() == labels.tolist()
    target = root / "mnist"
    assert sorted(p.name for p in target.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    status = {s.name: s for s in verify_datasets(root)}["mnist"]
    assert not status.found  # train split not downloaded yet
    fetched = fetch_dataset("mnist", root, progress=False)
    assert set(fetched) == set(MNIST_FILES)
    assert {s.name: s for s in verify_datasets(root)}["mnist"].found


def test_mirror_env_var_tried_first(
    server: tuple[str, Path], isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = server
    write_fake_mnist(served / "mnist")
    spec = mnist_spec_for(served / "mnist", f"http://127.0.0.1:{free_port()}/unreachable/")
    patch_spec(monkeypatch, spec)
    monkeypatch.setenv("ADVDEFENSE_MIRROR", url.rstrip("/"))
    x, _ = load_dataset("mnist", "test", root=isolated / "root")
    assert x.shape == (6, 1, 28, 28)
    # default download dir is the first writable root: $ADVDEFENSE_DATA when no root is given
    monkeypatch.setenv("ADVDEFENSE_DATA", str(isolated / "env"))
    load_dataset("mnist", "train")
    assert (isolated / "env" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_file_url_mirror(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = isolated / "mirror"
    write_fake_mnist(mirror / "mnist")
    spec = mnist_spec_for(mirror / "mnist")
    (mirror / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv("ADVDEFENSE_MIRROR", mirror.as_uri())
    patch_spec(monkeypatch, mnist_spec_for_missing(f"http://127.0.0.1:{free_port()}/", spec))
    x, _ = load_dataset("mnist", "train", root=isolated / "root")
    assert x.shape == (12, 1, 28, 28)
    with pytest.raises(DatasetNotFoundError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_dataset("mnist", "test", root=isolated / "root")


def test_offline_gives_one_error(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = mnist_spec_for_missing(f"http://127.0.0.1:{free_port()}/")
    patch_spec(monkeypatch, spec)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "train", root=isolated / "root")
    message = str(info.value)
    assert message.startswith("could not download mnist: train-images-idx3-ubyte.gz")
    assert "skipped, host unreachable" in message
    assert str(isolated / "root" / "mnist") in message


def mnist_spec_for_missing(base_url: str, spec: DatasetSpec | None = None) -> DatasetSpec:
    spec = spec or DATASETS["mnist"]
    return dataclasses.replace(
        spec, files=tuple(dataclasses.replace(f, urls=(base_url + f.filename,)) for f in spec.files)
    )


def test_download_false_missing(isolated: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"download=False") as info:
        load_dataset("fashion-mnist", "test", root=isolated / "root", download=False)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert not (isolated / "root").exists()


def test_unwritable_download_dir(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = isolated / "file"
    blocker.write_text("not a dir")
    with pytest.raises(UserError, match="cannot write"):
        download_file("http://127.0.0.1:1/x", blocker / "sub" / "x", "0" * 32, progress=False)


# --- lookup order ----------------------------------------------------------------------------


def test_search_paths_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home_cache = isolated / "home" / ".cache" / "advdefense"
    assert data_search_paths() == [isolated / "envdata", home_cache]
    assert data_search_paths(isolated / "r") == [isolated / "r", isolated / "envdata", home_cache]
    monkeypatch.delenv("ADVDEFENSE_DATA")
    assert data_search_paths() == [home_cache]
    monkeypatch.setitem(paths.DEBIAN_DIRS, "fashion-mnist", DEBIAN_FASHION)
    assert data_search_paths("/x", "fashion-mnist") == [
        Path("/x/fashion-mnist"),
        home_cache / "fashion-mnist",
        DEBIAN_FASHION,
    ]
    assert data_search_paths("/x", "mnist") == [Path("/x/mnist"), home_cache / "mnist"]


def test_explicit_root_wins_over_env(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # raw IDX files: MNIST publishes no checksum of the decompressed content, so both load
    patch_spec(monkeypatch, dataclasses.replace(DATASETS["mnist"], split_sizes=()))
    env_root, explicit = isolated / "envdata", isolated / "explicit"
    write_fake_mnist(env_root / "mnist", n=12, seed=10, gz=False)
    write_fake_mnist(explicit / "mnist", n=16, seed=20, gz=False)
    assert load_dataset("mnist", "train", download=False).images.shape[0] == 12
    assert load_dataset("mnist", "train", root=explicit, download=False).images.shape[0] == 16
    status = {s.name: s for s in verify_datasets(explicit)}["mnist"]
    assert status.found and status.path == explicit / "mnist"
    assert {f.state for f in status.files} == {"unverified"}
    assert all("not verified" in f.detail for f in status.files)
    # the home cache comes last
    monkeypatch.delenv("ADVDEFENSE_DATA")
    write_fake_mnist(isolated / "home" / ".cache" / "advdefense" / "mnist", n=8, gz=False)
    assert load_dataset("mnist", "train", download=False).images.shape[0] == 8


def test_unverified_copy_with_wrong_sample_count_is_refused(isolated: Path) -> None:
    """An uncompressed copy cannot be checksummed, so its sample count is what is checked."""
    root = isolated / "root"
    write_fake_mnist(root / "mnist", n=12, gz=False)
    with pytest.raises(
        CorruptFileError,
        match=r"hold 12 samples, but the mnist train split "
        r"has 60,000.*delete both",
    ):
        load_dataset("mnist", "train", root=root, download=False)
    status = {s.name: s for s in verify_datasets(root)}["mnist"]
    assert {f.state for f in status.files} == {"unverified"}


# --- real data -------------------------------------------------------------------------------


def test_fashion_mnist_debian(monkeypatch: pytest.MonkeyPatch) -> None:
    if not all((DEBIAN_FASHION / name).is_file() for name in MNIST_FILES):
        pytest.skip(f"{DEBIAN_FASHION} not present (apt-get install dataset-fashion-mnist)")
    monkeypatch.setitem(paths.DEBIAN_DIRS, "fashion-mnist", DEBIAN_FASHION)
    x, y = load_dataset("fashion-mnist", "train", download=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = load_dataset("fashion-mnist", "test", download=False)
    assert xt.shape == (10000, 1, 28, 28) and sorted(set(yt.tolist())) == list(range(10))
    assert float(xt.min()) >= 0.0 and float(xt.max()) <= 1.0
    status = {s.name: s for s in verify_datasets()}["fashion-mnist"]
    assert status.found and status.path == DEBIAN_FASHION
    assert all(f.state == "ok" for f in status.files)
    assert {f.detail for f in status.files} <= {"recompressed, content verified", "md5 verified"}


# --- mnist-sample ----------------------------------------------------------------------------


def test_mnist_sample_asset_sha256() -> None:
    package, resource = readers.MNIST_SAMPLE_RESOURCE
    import importlib.resources

    raw = importlib.resources.files(package).joinpath(resource).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == (
        "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
    )


def test_mnist_sample_split() -> None:
    train = load_dataset("mnist-sample", "train")
    test = load_dataset("mnist-sample", "test")
    assert isinstance(train, LabeledImages)
    x, y = train
    assert x.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10)) and set(test.labels.tolist()) == set(range(10))
    assert torch.bincount(torch.cat([y, test.labels])).tolist() == [500] * 10
    # disjoint, and follows the documented permutation
    table = readers.read_mnist_sample()
    perm = np.random.default_rng(0).permutation(5000)
    assert len(set(perm[:4000]) & set(perm[4000:])) == 0
    np.testing.assert_array_equal(test.labels.numpy(), table[perm[4000:], 784])
    np.testing.assert_allclose(
        test.images[0, 0].numpy() * 255, table[perm[4000], :784].reshape(28, 28), atol=1e-4
    )
    flat_train = {bytes(r) for r in (x.reshape(4000, -1) * 255).round().to(torch.uint8).numpy()}
    flat_test = [
        bytes(r) for r in (test.images.reshape(1000, -1) * 255).round().to(torch.uint8).numpy()
    ]
    assert sum(r in flat_train for r in flat_test) <= 5  # at most a few duplicate digits


def test_mnist_sample_deterministic_and_fresh() -> None:
    a = load_dataset("mnist-sample", "test")
    a.images.fill_(0.5)
    a.labels.fill_(3)
    b = load_dataset("mnist-sample", "test")
    assert not torch.equal(b.images, a.images) and not torch.equal(b.labels, a.labels)
    c = load_dataset("mnist-sample", "test")
    assert torch.equal(b.images, c.images) and torch.equal(b.labels, c.labels)
    assert not readers.read_mnist_sample().flags.writeable


# --- verify_datasets -------------------------------------------------------------------------


def test_verify_datasets_lists_all(isolated: Path) -> None:
    write_fake_mnist(isolated / "envdata" / "mnist")
    statuses = verify_datasets()
    assert [s.name for s in statuses] == [spec.name for spec in list_datasets()]
    assert all(isinstance(s, DatasetStatus) for s in statuses)
    by_name = {s.name: s for s in statuses}
    assert by_name["mnist-sample"].found
    assert by_name["mnist-sample"].files[0].state == "ok"
    mnist = by_name["mnist"]  # fake files: present, but not the published ones
    assert mnist.path == isolated / "envdata" / "mnist" and not mnist.found
    assert {f.state for f in mnist.files} == {"checksum-mismatch"}
    cifar = by_name["cifar10"]
    assert not cifar.found and cifar.path == isolated / "envdata" / "cifar10"
    assert [(f.filename, f.state, f.path) for f in cifar.files] == [
        ("cifar-10-python.tar.gz", "missing", None)
    ]
    # nothing was created or downloaded
    assert not (isolated / "envdata" / "cifar10").exists()
    assert not (isolated / "home" / ".cache").exists()


def test_verify_datasets_explicit_root_path(isolated: Path) -> None:
    root = isolated / "root"
    statuses = {s.name: s for s in verify_datasets(root)}
    assert statuses["svhn"].path == root / "svhn" and not statuses["svhn"].found
    assert not root.exists()
