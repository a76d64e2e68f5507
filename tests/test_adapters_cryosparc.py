"""cryoSPARC .cs reader/writer: real exported file, poses, passthrough, cross-format round trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared
from cryosparc.dataset import CSDAT_FORMAT, Dataset
from numpy.lib.recfunctions import repack_fields
from scipy.spatial.transform import Rotation

from deephemnma_bridge.adapters import read_particles, write_particles
from deephemnma_bridge.adapters.cryosparc import find_passthrough, stable_uids
from deephemnma_bridge.conventions import euler_to_matrix

J2 = "cryosparc/cryosparc_J2_particles_exported.cs"


def _records(path: Path) -> np.ndarray:
    return np.load(path)


def test_reads_exported_file() -> None:
    table = read_particles(shared(J2))
    raw = _records(shared(J2))
    assert len(table) == 22
    np.testing.assert_array_equal(table.uids, raw["uid"])
    assert table.image_paths[0] == "J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs"
    np.testing.assert_array_equal(table.image_indices, raw["blob/idx"])
    np.testing.assert_allclose(table.defocus_angle_degrees, np.rad2deg(raw["ctf/df_angle_rad"]))
    np.testing.assert_allclose(table.defocus_u_angstrom, raw["ctf/df1_A"])
    np.testing.assert_array_equal(table.optics_group, raw["ctf/exp_group_id"] + 1)
    assert table.box_size_px[0] == 300
    assert table.rotation_matrices is None  # alignments2D only


def test_cs_round_trip_keeps_every_field(tmp_path: Path) -> None:
    table = read_particles(shared(J2))
    write_particles(table, tmp_path / "o.cs")
    a, b = _records(shared(J2)), _records(tmp_path / "o.cs")
    assert a.dtype.names == b.dtype.names
    for f in a.dtype.names or ():
        np.testing.assert_array_equal(a[f], b[f])


def test_poses_follow_interop_formulas(tmp_path: Path) -> None:
    table = read_particles(shared(J2))
    rng = np.random.default_rng(3)
    eulers = np.stack(
        [rng.uniform(-180, 180, 22), rng.uniform(0, 180, 22), rng.uniform(-180, 180, 22)], axis=1
    )
    shifts = rng.uniform(-5, 5, (22, 2))
    posed = table.with_poses(euler_to_matrix(eulers), shifts)
    write_particles(posed, tmp_path / "p.cs")
    raw = _records(tmp_path / "p.cs")
    # pose = Rotation.from_euler("ZYZ", eulers).as_rotvec(); shift (px) = origin Å / psize
    expected = Rotation.from_euler("ZYZ", eulers, degrees=True)
    got = Rotation.from_rotvec(raw["alignments3D/pose"].astype(np.float64))
    assert np.rad2deg((expected.inv() * got).magnitude()).max() < 1e-3
    np.testing.assert_allclose(
        raw["alignments3D/shift"], shifts / raw["blob/psize_A"][:, None], rtol=1e-5
    )
    back = read_particles(tmp_path / "p.cs")
    np.testing.assert_allclose(back.rotation_matrices, posed.rotation_matrices, atol=1e-6)
    np.testing.assert_allclose(back.shifts_angstrom, shifts, atol=1e-5)


def test_csdat_format_and_passthrough(tmp_path: Path) -> None:
    raw = _records(shared(J2))
    names = raw.dtype.names or ()
    main = Dataset(repack_fields(raw[[n for n in names if not n.startswith("ctf/")]]))
    passthrough = Dataset(
        repack_fields(raw[["uid"] + [n for n in names if n.startswith("ctf/")]])[::-1].copy()
    )
    job = tmp_path / "J7"
    job.mkdir()
    main.save(job / "J7_particles.cs", format=CSDAT_FORMAT)
    passthrough.save(job / "J7_passthrough_particles.cs")
    assert find_passthrough(job / "J7_particles.cs") == [job / "J7_passthrough_particles.cs"]
    table = read_particles(job / "J7_particles.cs")
    np.testing.assert_array_equal(table.uids, raw["uid"])  # main file's order kept
    np.testing.assert_allclose(table.defocus_u_angstrom, raw["ctf/df1_A"])
    # a passthrough from another job misses uids: clear error
    other = Dataset(repack_fields(raw[["uid", "ctf/df1_A"]])[:5].copy())
    other.save(tmp_path / "other.cs")
    with pytest.raises(Exception, match="no row for uid"):
        read_particles(job / "J7_particles.cs", passthrough=[tmp_path / "other.cs"])


def test_star_to_cs_to_star_loses_no_column(tmp_path: Path) -> None:
    table = read_particles(shared("relion/roodmus/Extract/job013/particles.star"))
    write_particles(table, tmp_path / "a.cs")
    cs = read_particles(tmp_path / "a.cs")
    np.testing.assert_array_equal(cs.uids, stable_uids(table))
    write_particles(cs, tmp_path / "b.star")
    back = read_particles(tmp_path / "b.star")
    for col in table.source.rows.columns:
        assert col in back.source.rows.columns, col
    for col in table.source.optics.columns:
        assert col in back.source.optics.columns, col
    np.testing.assert_allclose(back.rotation_matrices, table.rotation_matrices, atol=1e-6)
    np.testing.assert_allclose(back.shifts_angstrom, table.shifts_angstrom, atol=1e-5)
    np.testing.assert_array_equal(back.class_number, table.class_number)
    a, b = table.source.rows, back.source.rows
    assert (a["rlnMicrographName"].to_numpy() == b["rlnMicrographName"].to_numpy()).all()
    np.testing.assert_allclose(a["rlnCoordinateX"], b["rlnCoordinateX"])
    # the uids survive a STAR trip: converting back gives the same uids
    write_particles(back, tmp_path / "c.cs")
    np.testing.assert_array_equal(read_particles(tmp_path / "c.cs").uids, cs.uids)


def test_empty_cs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no particles"):
        read_particles(shared("cryosparc/4k_dataset.cs"))


def test_cs_bad_inputs(tmp_path: Path) -> None:
    garbage = tmp_path / "g.cs"
    garbage.write_bytes(b"not a numpy file")
    with pytest.raises(Exception, match="not a readable cryoSPARC"):
        read_particles(garbage)
    with pytest.raises(Exception, match="no such file"):
        read_particles(tmp_path / "missing.cs")
    raw = _records(shared(J2)).copy()
    raw["ctf/df1_A"][3] = np.nan
    np.save(tmp_path / "nan.npy", raw)
    shutil.move(tmp_path / "nan.npy", tmp_path / "nan.cs")
    with pytest.raises(Exception, match=r"field ctf/df1_A of row 4"):
        read_particles(tmp_path / "nan.cs")
    names = [n for n in raw.dtype.names or () if n != "blob/path"]
    np.save(tmp_path / "nb.npy", repack_fields(raw[names]))
    shutil.move(tmp_path / "nb.npy", tmp_path / "nb.cs")
    with pytest.raises(Exception, match="blob/path is missing"):
        read_particles(tmp_path / "nb.cs")


def test_versioned_output_name_finds_its_passthrough(tmp_path: Path) -> None:
    main = tmp_path / "cryosparc_P3_J12_004_particles_selected.cs"
    main.write_bytes(b"")
    assert find_passthrough(main) == []
    sibling = tmp_path / "J12_passthrough_particles_selected.cs"
    sibling.write_bytes(b"")
    (tmp_path / "J13_passthrough_particles_selected.cs").write_bytes(b"")
    assert find_passthrough(main) == [sibling]
    assert find_passthrough(sibling) == []


def test_alignment_pixel_size_differs_warns(tmp_path: Path) -> None:
    raw = _records(shared(J2))
    ds = Dataset(raw)
    ds.add_fields([("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))])
    ds.add_fields([("alignments3D/psize_A", "<f4")])
    ds["alignments3D/pose"] = np.zeros((22, 3))
    ds["alignments3D/shift"] = np.ones((22, 2))
    ds["alignments3D/psize_A"] = np.full(22, 2.0)
    ds.save(tmp_path / "binned.cs")
    with pytest.warns(UserWarning, match="differs from blob/psize_A"):
        table = read_particles(tmp_path / "binned.cs")
    np.testing.assert_allclose(table.shifts_angstrom, 2.0)  # pixels of alignments3D/psize_A
    np.testing.assert_allclose(table.rotation_matrices, np.broadcast_to(np.eye(3), (22, 3, 3)))


def test_extras_and_output_guard(tmp_path: Path) -> None:
    table = read_particles(shared(J2))
    cost = np.linspace(0, 1, 22)
    scored = table.with_extra(dhnCost=cost, dhnGroup=np.arange(22) % 3)
    write_particles(scored, tmp_path / "s.cs")
    raw = _records(tmp_path / "s.cs")
    np.testing.assert_allclose(raw["dhn/dhnCost"], cost)
    back = read_particles(tmp_path / "s.cs")
    np.testing.assert_allclose(back.extra["dhnCost"], cost)
    np.testing.assert_array_equal(back.extra["dhnGroup"], np.arange(22) % 3)
    # the alignments2D fields are carried unchanged
    np.testing.assert_array_equal(
        raw["alignments2D/pose"], _records(shared(J2))["alignments2D/pose"]
    )
    copy = tmp_path / "copy.cs"
    shutil.copy(shared(J2), copy)
    before = copy.read_bytes()
    with pytest.raises(Exception, match="same file as the input"):
        write_particles(read_particles(copy), copy)
    assert copy.read_bytes() == before
