"""deephemnma subset: selections made in RELION go back to cryoSPARC (uids kept) and vice versa."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from conftest import shared
from cryosparc.dataset import Dataset

from deephemnma_bridge.adapters import read_particles
from deephemnma_bridge.cli import main

J2 = "cryosparc/cryosparc_J2_particles_exported.cs"
ROODMUS = "relion/roodmus/Extract/job013/particles.star"
DROP = [1, 4, 5, 17]


def _j2_star(tmp_path: Path) -> Path:
    """J2 converted to STAR, as a user would hand it to RELION (stacks absent: a warning)."""
    with pytest.warns(UserWarning, match="not found"):
        assert main(["convert", str(shared(J2)), str(tmp_path / "j2.star")]) == 0
    return tmp_path / "j2.star"


def _edit_in_relion(star: Path, out: Path, *, drop_uid_column: bool = False) -> None:
    """Drop rows with starfile/pandas as a RELION Subset selection would."""
    blocks = starfile.read(star, always_dict=True)
    particles = blocks["particles"].drop(index=DROP)
    if drop_uid_column:
        particles = particles.drop(columns=["dhnCsUid"])
    starfile.write({"optics": blocks["optics"], "particles": particles}, out)


@pytest.mark.parametrize(
    ("drop_uid_column", "how"),
    [(False, "cryoSPARC uid"), (True, "stack name and image index")],
)
def test_relion_selection_back_to_cryosparc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], drop_uid_column: bool, how: str
) -> None:
    star = _j2_star(tmp_path)
    _edit_in_relion(star, tmp_path / "picked.star", drop_uid_column=drop_uid_column)
    capsys.readouterr()
    argv = ["subset", "--source", str(shared(J2)), "--select", str(tmp_path / "picked.star")]
    assert main([*argv, "--out", str(tmp_path / "picked.cs")]) == 0
    assert f"matched 18 of 18 selected particles by {how}" in capsys.readouterr().out
    original = np.load(shared(J2))
    keep = np.setdiff1d(np.arange(len(original)), DROP)
    got = np.load(tmp_path / "picked.cs")
    assert got.dtype.names == original.dtype.names
    for field in original.dtype.names or ():
        np.testing.assert_array_equal(got[field], original[field][keep], err_msg=field)


def test_cryosparc_selection_back_to_relion(tmp_path: Path) -> None:
    # a RELION file goes to cryoSPARC, a subset is picked there (rows of the .cs kept) ...
    src = shared(ROODMUS)
    assert main(["convert", str(src), str(tmp_path / "all.cs")]) == 0
    records = Dataset.load(tmp_path / "all.cs")
    keep = np.arange(0, len(records), 3)
    Dataset(np.load(tmp_path / "all.cs")[keep[::-1]]).save(tmp_path / "picked.cs")  # any order
    # ... and comes back as the original STAR rows, every column, in the source's order
    argv = ["subset", "--source", str(src), "--select", str(tmp_path / "picked.cs")]
    assert main([*argv, "--out", str(tmp_path / "picked.star")]) == 0
    original = starfile.read(src, always_dict=True)
    got = starfile.read(tmp_path / "picked.star", always_dict=True)
    expected = original["particles"].iloc[keep].reset_index(drop=True)
    pd.testing.assert_frame_equal(got["particles"], expected)
    pd.testing.assert_frame_equal(got["optics"], original["optics"])


def test_cryosparc_selection_of_a_converted_file_uses_uids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = _j2_star(tmp_path)
    raw = np.load(shared(J2))
    Dataset(raw[[0, 3, 9]]).save(tmp_path / "sel.cs")
    capsys.readouterr()
    argv = ["subset", "--source", str(star), "--select", str(tmp_path / "sel.cs")]
    assert main([*argv, "--out", str(tmp_path / "sel.star")]) == 0
    assert "by cryoSPARC uid" in capsys.readouterr().out
    table = read_particles(tmp_path / "sel.star")
    assert table.extra["dhnCsUid"].astype(np.uint64).tolist() == raw["uid"][[0, 3, 9]].tolist()


def test_subset_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = shared(ROODMUS)
    blocks = starfile.read(src, always_dict=True)
    part = blocks["particles"].iloc[:10].copy()
    part.loc[part.index[:3], "rlnImageName"] = [
        "000999@Extract/job013/Micrographs/nowhere.mrcs"
    ] * 3
    starfile.write({"optics": blocks["optics"], "particles": part}, tmp_path / "bad.star")
    argv = ["subset", "--source", str(src), "--select", str(tmp_path / "bad.star")]
    assert main([*argv, "--out", str(tmp_path / "o.star")]) == 2
    err = capsys.readouterr().err
    assert "3 of 10 selected particles are not in the source" in err
    assert "nowhere:998" in err
    assert not (tmp_path / "o.star").exists()
    assert main(["subset", "--source", str(src), "--select", str(src), "--out", str(src)]) == 2
    assert "same file as the input" in capsys.readouterr().err


def test_subset_by_stack_and_index_without_uids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = shared("relion/roodmus/Extract/job013/particles.star")
    # cryoSPARC imported the same particles: new uids, paths with a 21-digit prefix, 0-based idx
    table = read_particles(full)
    imported = table.take([3, 10, 11]).replace(
        image_paths=np.array(
            [
                f"J9/imported/012345678901234567890_{Path(p).name}"
                for p in table.image_paths[[3, 10, 11]]
            ],
            dtype=object,
        ),
        source=None,
        uids=np.array([11, 22, 33], dtype=np.uint64),
    )
    from deephemnma_bridge.adapters import write_particles

    write_particles(imported, tmp_path / "imported.cs")
    ds = Dataset.load(tmp_path / "imported.cs")
    assert len(ds) == 3
    out = tmp_path / "sub.star"
    assert (
        main(
            [
                "subset",
                "--source",
                str(full),
                "--select",
                str(tmp_path / "imported.cs"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "by stack name and image index" in capsys.readouterr().out
    rows = starfile.read(out, always_dict=True)["particles"]
    original = starfile.read(full, always_dict=True)["particles"]
    assert rows["rlnImageName"].tolist() == original["rlnImageName"].iloc[[3, 10, 11]].tolist()
    assert list(rows.columns) == list(original.columns)
