"""Atomic writes leave no partial output and never replace a file before the new one is done."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from deephemnma_bridge.errors import InputError
from deephemnma_bridge.fileutils import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_path,
    check_not_input,
    check_output_dir,
    claim_output_dir,
    output_owner,
)


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
    with pytest.raises(ValueError), atomic_dir(target, command="align") as tmp:
        (tmp / "a.txt").write_text("x")
        raise ValueError("fail")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target, command="align") as tmp:
        (tmp / "a.txt").write_text("x")
    assert output_owner(target) == "align"
    with atomic_dir(target, command="align") as tmp:  # our own previous output: replaced
        (tmp / "b.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]
    # another command's output is not replaced without overwrite
    with pytest.raises(InputError, match="output of deephemnma align"):
        check_output_dir(target, command="analyze")
    check_output_dir(target, command="analyze", overwrite=True)


def test_outputs_get_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "job", command="align") as tmp:
            with atomic_path(tmp / "a.star") as f:
                f.write_text("x")
            (tmp / "b.txt").write_text("y")
        assert stat.S_IMODE((tmp_path / "job").stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "job" / "a.star").stat().st_mode) == 0o644
        os.umask(0o002)
        with atomic_path(tmp_path / "c.star") as f:
            f.write_text("x")
        assert stat.S_IMODE((tmp_path / "c.star").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_protected_folders_are_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    project = tmp_path / "project"
    (project / "Extract" / "job001").mkdir(parents=True)
    (project / "default_pipeline.star").write_text("data_pipeline_general\n")
    particles = project / "Extract" / "job001" / "particles.star"
    particles.write_text("data_\n")
    (project / "Extract" / "job001" / "notes.txt").write_text("mine")
    monkeypatch.chdir(project)
    before = _tree(project)
    cases = {
        project: "working directory",  # also the RELION project root
        project / "Extract": "holds the input",  # parent of an input
        project / "Extract" / "job001": "holds the input",  # the input's folder
        particles: "existing file",
        tmp_path: "working directory or a folder above it",
    }
    for out, reason in cases.items():
        with pytest.raises(InputError, match=reason):
            with atomic_dir(out, command="align", inputs=[particles], overwrite=overwrite):
                pass
    other = tmp_path / "other_project"
    other.mkdir()
    (other / "default_pipeline.star").write_text("x")
    with pytest.raises(InputError, match="RELION project"):
        check_output_dir(other, command="align", overwrite=overwrite)
    with pytest.raises(InputError, match="new folder name"):
        check_output_dir("", command="align", overwrite=overwrite)
    assert _tree(project) == before


def test_unmarked_folder_needs_overwrite(tmp_path: Path) -> None:
    user = tmp_path / "results"
    user.mkdir()
    (user / "precious.mrc").write_text("data")
    with pytest.raises(InputError, match="--overwrite"):
        with atomic_dir(user, command="analyze"):
            pass
    assert (user / "precious.mrc").read_text() == "data"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty, command="analyze") as tmp:
        (tmp / "x").write_text("1")
    assert output_owner(empty) == "analyze"
    with atomic_dir(user, command="analyze", overwrite=True) as tmp:
        (tmp / "x").write_text("1")
    assert not (user / "precious.mrc").exists()


def test_claim_output_dir_keeps_files(tmp_path: Path) -> None:
    out = claim_output_dir(tmp_path / "net", command="train")
    (out / "last.pt").write_text("checkpoint")
    assert claim_output_dir(out, command="train") == out  # rerun: resumes, nothing removed
    assert (out / "last.pt").read_text() == "checkpoint"
    with pytest.raises(InputError, match="output of deephemnma train"):
        claim_output_dir(out, command="run")


def test_check_not_input(tmp_path: Path) -> None:
    f = tmp_path / "in.star"
    f.write_text("x")
    check_not_input(tmp_path / "other.star", f)
    with pytest.raises(InputError, match="same file as the input"):
        check_not_input(tmp_path / "." / "in.star", f)


def test_other_ranks_wait_for_rank_0_s_claim(tmp_path: Path) -> None:
    """torchrun: the other ranks wait for rank 0's marker instead of judging the folder it is
    creating (a half-made folder looked like someone else's: the DDP test failed under load)."""
    import threading

    from deephemnma_bridge.fileutils import await_output_dir, claim_output_dir, output_owner

    out = tmp_path / "net"  # rank 0 creates it half a second later
    timer = threading.Timer(0.5, claim_output_dir, args=(out,), kwargs={"command": "train"})
    timer.start()
    try:
        assert await_output_dir(out, command="train", timeout_seconds=30) == out
    finally:
        timer.join()
    assert output_owner(out) == "train"
    with pytest.raises(InputError, match="rank 0 did not claim"):
        await_output_dir(tmp_path / "never", command="train", timeout_seconds=0.3)
