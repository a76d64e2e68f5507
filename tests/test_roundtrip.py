"""Round trips through convert and subset on every real particle file lose and change nothing.

STAR -> .cs -> STAR, .cs -> STAR -> .cs, RELION 3.0 <-> 3.1 and ``subset`` are run on each file
of ../shared/data; every column (STAR, optics values joined per particle) or field (.cs) of the
original must come back with exactly the same values, in the same row order, with the same uids.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from conftest import CRYOSPARC_FILES, RELION_FILES, shared
from cryosparc.dataset import Dataset

from deephemnma_bridge.adapters import read_particles, write_particles
from deephemnma_bridge.cli import main
from deephemnma_bridge.conventions import euler_to_matrix, matrix_to_rotvec
from deephemnma_bridge.errors import ParticleFileError


def _flat(path: Path) -> pd.DataFrame:
    """The particle table of a STAR file with its optics values joined to each particle."""
    blocks = starfile.read(path, always_dict=True)
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "particles" in loops:
        rows = loops["particles"].copy()
    else:
        rows = max((v for k, v in loops.items() if k != "optics"), key=len).copy()
    optics = loops.get("optics")
    if optics is not None and "rlnOpticsGroup" in rows.columns:
        by_group = optics.set_index("rlnOpticsGroup")
        for col in by_group.columns:
            if col not in rows.columns:
                rows[col] = by_group[col].reindex(rows["rlnOpticsGroup"].to_numpy()).to_numpy()
    return rows


def _is_30(path: Path) -> bool:
    return "optics" not in starfile.read(path, always_dict=True)


def assert_same_star(original: Path, back: Path) -> None:
    a, b = _flat(original), _flat(back)
    assert len(a) == len(b)
    for col in a.columns:
        assert col in b.columns, f"{col} lost"
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x):
            assert pd.api.types.is_numeric_dtype(y), col
            np.testing.assert_array_equal(x.to_numpy(), y.to_numpy(), err_msg=col)
        else:  # strings (image names, vectors, names): the same text, row by row
            assert x.astype(str).tolist() == y.astype(str).tolist(), col


def assert_same_cs(original: Path, back: Path) -> None:
    a, b = np.load(original), np.load(back)
    assert len(a) == len(b)
    np.testing.assert_array_equal(a["uid"], b["uid"])  # same uids, same order
    for name in a.dtype.names or ():
        assert name in (b.dtype.names or ()), f"{name} lost"
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _run(argv: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # stacks of the real files are not here
        assert main(argv) == 0


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("relative", RELION_FILES)
def test_star_to_cs_to_star(relative: str, tmp_path: Path) -> None:
    src = shared(relative)
    version = ["--relion-version", "3.0"] if _is_30(src) else []
    _run(["convert", str(src), str(tmp_path / "a.cs")])
    _run(["convert", str(tmp_path / "a.cs"), str(tmp_path / "b.star"), *version])
    assert_same_star(src, tmp_path / "b.star")


@pytest.mark.parametrize("relative", RELION_FILES)
def test_relion_30_31_and_back(relative: str, tmp_path: Path) -> None:
    src = shared(relative)
    there, back = ("3.1", "3.0") if _is_30(src) else ("3.0", "3.1")
    _run(["convert", str(src), str(tmp_path / "there.star"), "--relion-version", there])
    _run(["convert", str(tmp_path / "there.star"), str(tmp_path / "back.star"),
          "--relion-version", back])  # fmt: skip
    assert_same_star(src, tmp_path / "back.star")


@pytest.mark.parametrize("relative", RELION_FILES)
def test_subset_of_star(relative: str, tmp_path: Path) -> None:
    src = shared(relative)
    version = ["--relion-version", "3.0"] if _is_30(src) else []
    _run(["subset", "--source", str(src), "--select", str(src), "--out", "s.star", *version])
    assert_same_star(src, tmp_path / "s.star")


@pytest.mark.parametrize("relative", CRYOSPARC_FILES)
def test_cs_to_star_to_cs(
    relative: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = shared(relative)
    _run(["convert", str(src), "a.star"])
    out = capsys.readouterr().out
    # the fields STAR cannot hold are named, with where they went
    assert "ctf/anisomag" in out and "a_dhn.cs" in out
    _run(["convert", "a.star", "b.cs"])
    assert_same_cs(src, tmp_path / "b.cs")
    # and through RELION 3.0 too (side files for both)
    _run(["convert", str(src), "c30.star", "--relion-version", "3.0"])
    _run(["convert", "c30.star", "d.cs"])
    assert_same_cs(src, tmp_path / "d.cs")


@pytest.mark.parametrize("relative", CRYOSPARC_FILES)
def test_subset_of_cs(relative: str, tmp_path: Path) -> None:
    src = shared(relative)
    _run(["subset", "--source", str(src), "--select", str(src), "--out", "s.cs"])
    assert_same_cs(src, tmp_path / "s.cs")


def test_empty_cs_schema_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    src = shared("cryosparc/4k_dataset.cs")  # a real 0-row particle schema: nothing to convert
    assert main(["convert", str(src), "a.star"]) == 2
    assert "no particles" in capsys.readouterr().err
    assert not Path("a.star").exists()


def test_untouched_euler_angles_keep_their_values(tmp_path: Path) -> None:
    src = shared("relion/cryojax/test_starfile.star")  # tilt -130.707275: an unusual triplet
    _run(["convert", str(src), "a.cs"])
    _run(["convert", "a.cs", "b.star"])
    tilt = starfile.read(tmp_path / "b.star")["particles"]["rlnAngleTilt"]
    assert tilt.tolist() == starfile.read(src)["particles"]["rlnAngleTilt"].tolist()
    assert tilt.iloc[2] == -130.707275


def test_convert_names_what_relion_30_cannot_hold(capsys: pytest.CaptureFixture[str]) -> None:
    src = shared("relion/isecc/test.star")
    _run(["convert", str(src), "o30.star", "--relion-version", "3.0"])
    out = capsys.readouterr().out
    assert "rlnOpticsGroup" in out and "o30_dhn.csv" in out
    side = pd.read_csv("o30_dhn.csv")
    assert {"rlnOddZernike", "rlnMagMat00", "rlnMicrographOriginalPixelSize"} <= set(side.columns)


def _cs_with_big_rotvecs(path: Path, n: int = 8) -> np.ndarray:
    rng = np.random.default_rng(3)
    eulers = np.stack(
        [rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], 1
    )
    pose = matrix_to_rotvec(euler_to_matrix(eulers))
    # the same rotations written with |v| > pi (as cryoSPARC may): v - 2 pi v/|v|
    norm = np.linalg.norm(pose, axis=1, keepdims=True)
    pose = (pose * (1 - 2 * np.pi / norm)).astype(np.float32)
    assert (np.linalg.norm(pose, axis=1) > np.pi).all()
    ds = Dataset({"uid": np.arange(50, 50 + n, dtype=np.uint64)})
    ds.add_fields(
        [
            ("blob/path", "O"),
            ("blob/idx", "<u4"),
            ("blob/psize_A", "<f4"),
            ("alignments3D/pose", "<f4", (3,)),
            ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/psize_A", "<f4"),
        ]
    )
    ds["blob/path"] = np.full(n, "J1/s.mrc", dtype=object)
    ds["blob/idx"] = np.arange(n)
    ds["blob/psize_A"] = np.full(n, 1.3)
    ds["alignments3D/pose"] = pose
    ds["alignments3D/shift"] = rng.normal(size=(n, 2))
    ds["alignments3D/psize_A"] = np.full(n, 1.3)
    ds.save(path)
    return pose


def test_subset_keeps_pose_vectors_exactly(tmp_path: Path) -> None:
    pose = _cs_with_big_rotvecs(tmp_path / "full.cs")
    _run(["subset", "--source", "full.cs", "--select", "full.cs", "--out", "sub.cs"])
    np.testing.assert_array_equal(np.load(tmp_path / "sub.cs")["alignments3D/pose"], pose)
    # through a STAR file (RELION's Euler angles) and back: the same vectors
    _run(["convert", "full.cs", "p.star"])
    _run(["convert", "p.star", "back.cs"])
    assert_same_cs(tmp_path / "full.cs", tmp_path / "back.cs")


def test_changed_values_are_written(tmp_path: Path) -> None:
    """A value that did change is written: the round trip keeps only what nobody changed."""
    src = shared("relion/roodmus/Extract/job013/particles.star")
    table = read_particles(src)
    turned = table.rotation_matrices[:, ::-1, :] * np.array([1, 1, -1])[:, None]
    from deephemnma_bridge.adapters import write_particles

    write_particles(table.with_poses(turned).take([0, 1]), tmp_path / "t.cs")
    back = read_particles(tmp_path / "t.cs")
    np.testing.assert_allclose(back.rotation_matrices, turned[:2], atol=1e-6)
    write_particles(back, tmp_path / "t.star")
    again = read_particles(tmp_path / "t.star")
    np.testing.assert_allclose(again.rotation_matrices, turned[:2], atol=1e-6)
    with pytest.raises(ParticleFileError):
        read_particles(tmp_path / "missing.star")


_TOKEN = re.compile(r"\"[^\"]*\"|'[^']*'|\S+")


def _row_tokens(path: Path) -> list[list[str]]:
    """The value tokens of every loop row of a STAR file, in order."""
    rows, in_loop = [], False
    for line in path.read_text().split("\n"):
        text = line.strip()
        if text.startswith(("data_", "#")) or not text:
            in_loop = in_loop and not text.startswith("data_")
            continue
        if text.startswith("loop_"):
            in_loop = True
        elif in_loop and not text.startswith("_"):
            rows.append(_TOKEN.findall(text))
    return rows


@pytest.mark.parametrize(
    ("relative", "version"),
    [
        ("relion/roodmus/Extract/job013/particles.star", "3.1"),
        ("relion/roodmus/Extract/job007/particles.star", "3.1"),
        ("relion/tomodrgn/10076_classD_32_sim.star", "3.0"),
        ("relion/simplecryoem/pyem.star", "3.1"),
    ],
)
def test_untouched_numbers_keep_their_text(relative: str, version: str, tmp_path: Path) -> None:
    """``1.000000`` stays ``1.000000`` (not ``1.0``) in columns nobody changed: convert and
    subset write back the source's fixed-decimal format wherever it gives the value exactly."""
    src = shared(relative)
    out = tmp_path / "out.star"
    assert main(["convert", str(src), str(out), "--relion-version", version]) == 0
    # (a 3.0 file may get columns RELION needs appended, e.g. rlnImageSize: compare the source's)
    assert [r[: len(s)] for r, s in zip(_row_tokens(out), _row_tokens(src))] == _row_tokens(src)
    part = tmp_path / "part.star"
    keep = read_particles(src).take(np.arange(0, len(read_particles(src)), 2))
    write_particles(keep, part, relion_version=version)
    picked = tmp_path / "picked.star"
    argv = ["subset", "--source", str(src), "--select", str(part), "--out", str(picked)]
    assert main([*argv, "--relion-version", version]) == 0
    source_rows = _row_tokens(src)
    n_optics = len(source_rows) - len(read_particles(src))
    expected = source_rows[:n_optics] + source_rows[n_optics:][::2]
    assert [r[: len(e)] for r, e in zip(_row_tokens(picked), expected)] == expected
    assert len(_row_tokens(picked)) == len(expected)
