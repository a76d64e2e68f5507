"""Atomic writes leave no partial output and never replace a file before the new one is done."""

from __future__ import annotations

from pathlib import Path

import pytest

from deephemnma_bridge.errors import InputError
from deephemnma_bridge.fileutils import atomic_dir, atomic_path, check_not_input


def test_atomic_path_success_and_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.star"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix.endswith(".star")
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]


def test_atomic_dir(tmp_path: Path) -> None:
    target = tmp_path / "job"
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
        raise ValueError("fail")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


def test_check_not_input(tmp_path: Path) -> None:
    f = tmp_path / "in.star"
    f.write_text("x")
    check_not_input(tmp_path / "other.star", f)
    with pytest.raises(InputError, match="same file as the input"):
        check_not_input(tmp_path / "." / "in.star", f)
