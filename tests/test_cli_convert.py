"""deephemnma convert: .cs -> STAR (uid column, uid map, .mrcs links), STAR <-> .cs, 3.0 <-> 3.1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from conftest import shared
from cryosparc.dataset import Dataset

from deephemnma_bridge.adapters import read_particles
from deephemnma_bridge.adapters.images import resolve_stack
from deephemnma_bridge.cli import main
from deephemnma_bridge.conventions import euler_to_matrix, matrix_to_rotvec

J2 = "cryosparc/cryosparc_J2_particles_exported.cs"
ROODMUS = "relion/roodmus/Extract/job013/particles.star"


def _cs_project(root: Path, n: int = 6) -> Path:
    """A cryoSPARC project folder: an imported .mrc stack and a job output with 3D poses."""
    stack = root / "P1" / "J1" / "imported" / "000123456789012345678_mic1.mrc"
    stack.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with mrcfile.new(stack) as mrc:
        mrc.set_data(rng.normal(size=(n, 8, 8)).astype(np.float32))
    job = root / "P1" / "J5"
    job.mkdir()
    eulers = np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n), np.zeros(n)], axis=1)
    ds = Dataset({"uid": np.arange(1000, 1000 + n, dtype=np.uint64)})
    ds.add_fields(
        [
            ("blob/path", "O"),
            ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)),
            ("blob/psize_A", "<f4"),
            ("ctf/df1_A", "<f4"),
            ("ctf/df2_A", "<f4"),
            ("alignments3D/pose", "<f4", (3,)),
            ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/psize_A", "<f4"),
        ]
    )
    ds["blob/path"] = np.full(n, ">J1/imported/000123456789012345678_mic1.mrc", dtype=object)
    ds["blob/idx"] = np.arange(n)
    ds["blob/shape"] = np.full((n, 2), 8)
    ds["blob/psize_A"] = np.full(n, 2.0)
    ds["ctf/df1_A"] = rng.uniform(1e4, 2e4, n)
    ds["ctf/df2_A"] = rng.uniform(1e4, 2e4, n)
    ds["alignments3D/pose"] = matrix_to_rotvec(euler_to_matrix(eulers))
    ds["alignments3D/shift"] = rng.uniform(-2, 2, (n, 2))
    ds["alignments3D/psize_A"] = np.full(n, 2.0)
    ds.save(job / "J5_particles.cs")
    return job / "J5_particles.cs"


def test_cs_to_star_links_mrc_stacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cs = _cs_project(tmp_path / "cs")
    relion = tmp_path / "relion"
    (relion / "Import").mkdir(parents=True)
    monkeypatch.chdir(relion)
    assert main(["convert", str(cs), "Import/particles.star"]) == 0
    link = relion / "Import" / "stacks" / "J1" / "imported" / "000123456789012345678_mic1.mrcs"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == (tmp_path / "cs/P1/J1/imported/000123456789012345678_mic1.mrc")
    rows = starfile.read(relion / "Import" / "particles.star")["particles"]
    # names relative to the working directory (the RELION project), 1-based, .mrcs
    assert rows["rlnImageName"][0] == (
        "000001@Import/stacks/J1/imported/000123456789012345678_mic1.mrcs"
    )
    assert rows["dhnCsUid"].astype(str).tolist() == [str(u) for u in range(1000, 1006)]
    uid_map = pd.read_csv(relion / "Import" / "particles_uid_map.csv", dtype=str)
    assert list(uid_map.columns) == ["rlnImageName", "cs_uid", "cs_blob_path", "cs_blob_idx"]
    assert uid_map["cs_blob_path"][0] == ">J1/imported/000123456789012345678_mic1.mrc"
    assert uid_map["rlnImageName"].tolist() == rows["rlnImageName"].tolist()
    # the STAR file reads back with the same particles, poses and images reachable
    back = read_particles(relion / "Import" / "particles.star")
    orig = read_particles(cs)
    np.testing.assert_allclose(back.rotation_matrices, orig.rotation_matrices, atol=1e-6)
    np.testing.assert_allclose(back.shifts_angstrom, orig.shifts_angstrom, atol=1e-5)
    np.testing.assert_array_equal(back.image_indices, orig.image_indices)
    assert resolve_stack(str(back.image_paths[0]), back.search_dirs).resolve() == link.resolve()
    # and back to .cs with the original uids
    assert main(["convert", "Import/particles.star", str(tmp_path / "again.cs")]) == 0
    np.testing.assert_array_equal(read_particles(tmp_path / "again.cs").uids, orig.uids)


def test_cs_to_star_without_stacks_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.warns(UserWarning, match="image stack.* not found"):
        assert main(["convert", str(shared(J2)), str(tmp_path / "j2.star")]) == 0
    assert "read 22 particles" in capsys.readouterr().out
    rows = starfile.read(tmp_path / "j2.star")["particles"]
    assert len(rows) == 22
    assert rows["rlnImageName"][0].endswith(
        "@J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"
    )
    assert (tmp_path / "j2_uid_map.csv").is_file()
    assert not (tmp_path / "stacks").exists()


def test_star_cs_star_and_relion_versions(tmp_path: Path) -> None:
    src = shared(ROODMUS)
    assert main(["convert", str(src), str(tmp_path / "a.cs")]) == 0
    # the image names RELION had come back verbatim (no search for the stacks, no warning)
    assert main(["convert", str(tmp_path / "a.cs"), str(tmp_path / "b.star")]) == 0
    back = starfile.read(tmp_path / "b.star")["particles"]
    assert back["rlnImageName"].tolist() == starfile.read(src)["particles"]["rlnImageName"].tolist()
    assert main(["convert", str(tmp_path / "b.star"), str(tmp_path / "c30.star"),
                 "--relion-version", "3.0"]) == 0  # fmt: skip
    assert main(["convert", str(tmp_path / "c30.star"), str(tmp_path / "d.star")]) == 0
    original = starfile.read(src)["particles"]
    final = starfile.read(tmp_path / "d.star")["particles"]
    for column in original.columns:
        assert column in final.columns, column
    np.testing.assert_allclose(final["rlnCoordinateX"], original["rlnCoordinateX"])
    a, d = read_particles(src), read_particles(tmp_path / "d.star")
    np.testing.assert_allclose(d.rotation_matrices, a.rotation_matrices, atol=1e-5)
    np.testing.assert_allclose(d.shifts_angstrom, a.shifts_angstrom, atol=1e-4)
    np.testing.assert_allclose(d.defocus_u_angstrom, a.defocus_u_angstrom, rtol=1e-6)
    # repeated conversions give the same uids
    assert main(["convert", str(src), str(tmp_path / "e.cs")]) == 0
    np.testing.assert_array_equal(
        np.load(tmp_path / "e.cs")["uid"], np.load(tmp_path / "a.cs")["uid"]
    )


def test_convert_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "in.cs"
    copy.write_bytes(shared(J2).read_bytes())
    before = copy.read_bytes()
    assert main(["convert", str(copy), str(copy)]) == 2
    assert "same file as the input" in capsys.readouterr().err
    assert copy.read_bytes() == before
    assert main(["convert", str(tmp_path / "nope.cs"), str(tmp_path / "o.star")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["convert", str(shared("cryosparc/4k_dataset.cs")), str(tmp_path / "o.star")]) == 2
    assert "no particles" in capsys.readouterr().err
    assert main(["convert", str(copy), str(tmp_path / "o.txt")]) == 2
    assert not list(tmp_path.glob("o*"))


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(self: Dataset, file: Any, **kwargs: object) -> None:
        file.write(b"half")  # a partial file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(Dataset, "save", broken_save)
    # the CLI reports the OSError as one line and a non-zero exit status
    assert main(["convert", str(shared(ROODMUS)), str(tmp_path / "out.cs")]) != 0
    assert list(tmp_path.iterdir()) == []


def test_convert_star_30_to_31_and_back(tmp_path: Path) -> None:
    src = shared("relion/tomodrgn/10076_classD_32_sim.star")
    assert main(["convert", str(src), str(tmp_path / "a31.star")]) == 0
    assert (
        main(
            [
                "convert",
                str(tmp_path / "a31.star"),
                str(tmp_path / "a30.star"),
                "--relion-version",
                "3.0",
            ]
        )
        == 0
    )
    a, b = read_particles(src), read_particles(tmp_path / "a30.star", pixel_size_angstrom=None)
    np.testing.assert_allclose(a.shifts_angstrom, b.shifts_angstrom, atol=1e-9)
    np.testing.assert_allclose(a.rotation_matrices, b.rotation_matrices, atol=1e-9)
