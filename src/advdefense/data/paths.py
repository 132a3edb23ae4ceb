"""Where dataset files are looked for, and where downloads go.

Lookup order: the explicit ``root`` argument, then each directory in ``$ADVDEFENSE_DATA``
(``os.pathsep``-separated), then ``~/.cache/advdefense``. Inside a root every dataset has its own
folder named after it (``<root>/mnist/train-images-idx3-ubyte.gz``). Fashion-MNIST is also looked
for in Debian's ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``), which
holds the files directly.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DATA_ENV_VAR",
    "DEBIAN_DIRS",
    "data_search_paths",
    "default_cache_dir",
    "download_dir",
    "intended_download_dir",
]

#: Environment variable naming extra data roots.
DATA_ENV_VAR = "ADVDEFENSE_DATA"

#: System directories holding a dataset's files directly, by dataset name.
DEBIAN_DIRS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


def default_cache_dir() -> Path:
    """``~/.cache/advdefense`` (resolved from ``$HOME`` at call time)."""
    return Path.home() / ".cache" / "advdefense"


def _roots(root: str | os.PathLike[str] | None) -> list[Path]:
    roots: list[Path] = []
    if root is not None:
        roots.append(Path(root).expanduser())
    for entry in os.environ.get(DATA_ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            roots.append(Path(entry.strip()).expanduser())
    roots.append(default_cache_dir())
    unique: list[Path] = []
    for path in roots:
        if path not in unique:
            unique.append(path)
    return unique


def data_search_paths(
    root: str | os.PathLike[str] | None = None, dataset: str | None = None
) -> list[Path]:
    """Directories searched for data, first match wins.

    Without ``dataset``: the data roots (``root``, ``$ADVDEFENSE_DATA``, ``~/.cache/advdefense``).
    With ``dataset``: that dataset's folder in each root, plus system directories such as Debian's
    ``/usr/share/datasets/fashion-mnist`` for ``"fashion-mnist"``.
    """
    roots = _roots(root)
    if dataset is None:
        return roots
    dirs = [path / dataset for path in roots]
    system = DEBIAN_DIRS.get(dataset)
    if system is not None:
        dirs.append(system)
    return dirs


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def download_dir(dataset: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Folder downloads of ``dataset`` go to: ``<first writable root>/<dataset>``.

    Creates the folder. If no root is writable, returns the first candidate (the download will
    then fail with a message naming it).
    """
    candidates = [path / dataset for path in _roots(root)]
    for path in candidates:
        if _writable(path):
            return path
    return candidates[0]


def intended_download_dir(dataset: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Like :func:`download_dir` but creates nothing: the first root that exists or can be made."""
    for path in _roots(root):
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
            return path / dataset
    return _roots(root)[0] / dataset
