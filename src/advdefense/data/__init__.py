"""Image classification datasets: lookup, verified download and loading.

>>> from advdefense.data import load_dataset
>>> x, y = load_dataset("mnist-sample", "test")  # embedded, no download
>>> x.shape, x.dtype, y.dtype
(torch.Size([1000, 1, 28, 28]), torch.float32, torch.int64)

Where files are looked for (first match wins): the ``root`` argument, ``$ADVDEFENSE_DATA``,
``~/.cache/advdefense`` (each holding one folder per dataset, e.g. ``<root>/mnist/``), and for
Fashion-MNIST Debian's ``/usr/share/datasets/fashion-mnist/``. Missing files are downloaded
into the first writable of those roots, from the published URLs; ``$ADVDEFENSE_MIRROR`` (or
``fetch_dataset(..., mirror=URL)``) names a base URL tried first as ``<URL>/<dataset>/<file>``.
Every file's checksum is verified on first use in a process.
"""

from __future__ import annotations

from advdefense.data.download import MIRROR_ENV_VAR, DownloadError, download_file
from advdefense.data.integrity import FileState, FileStatus
from advdefense.data.loading import (
    DatasetStatus,
    LabeledImages,
    fetch_dataset,
    load_dataset,
    verify_datasets,
)
from advdefense.data.paths import DATA_ENV_VAR, data_search_paths
from advdefense.data.specs import (
    DATASETS,
    DatasetSpec,
    ExtractedFile,
    RemoteFile,
    get_spec,
    list_datasets,
)

__all__ = [
    "DATASETS",
    "DATA_ENV_VAR",
    "MIRROR_ENV_VAR",
    "DatasetSpec",
    "DatasetStatus",
    "DownloadError",
    "ExtractedFile",
    "FileState",
    "FileStatus",
    "LabeledImages",
    "RemoteFile",
    "data_search_paths",
    "download_file",
    "fetch_dataset",
    "get_spec",
    "list_datasets",
    "load_dataset",
    "verify_datasets",
]
