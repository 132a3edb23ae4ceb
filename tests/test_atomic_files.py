"""Atomic writes: whole files or none, with the permissions of any new file (not 0600)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from advdefense.atomic_files import ordinary_permissions, save_tensors_atomically, write_atomically
from advdefense.evaluation.store import ResultStore


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_tensors_are_written_whole_with_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "state.safetensors"
    values = torch.arange(6.0).view(2, 3).t()  # not contiguous
    save_tensors_atomically(target, {"values": values}, {"note": "kept"})
    with safe_open(str(target), framework="pt") as handle:
        assert handle.metadata() == {"note": "kept"}
        assert torch.equal(handle.get_tensor("values"), values)
    assert _mode(target) == ordinary_permissions()
    assert [path.name for path in tmp_path.iterdir()] == ["state.safetensors"]


def test_ordinary_permissions_follow_the_umask() -> None:
    previous = os.umask(0o027)
    try:
        assert ordinary_permissions() == 0o640
        assert os.umask(0o027) == 0o027  # reading it left it as it was
    finally:
        os.umask(previous)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_text("old")

    def fail(temporary: Path) -> None:
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["config.json"]


def test_the_store_writes_adversarials_and_parts_readable_by_others(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.save_part("k", "sigmoid-10", {"epsilon_0": torch.ones(2, 3)}, {"n": 2})
        store.append({"key": "a"}, adversarials=torch.zeros(2, 1, 2, 2))
    written = sorted(tmp_path.rglob("*.safetensors"))
    assert len(written) == 2
    assert {_mode(path) for path in written} == {ordinary_permissions()}
