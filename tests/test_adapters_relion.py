"""RELION STAR reader/writer on every real particle file: lossless round trips and known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from conftest import RELION_FILES, shared

from deephemnma_bridge.adapters import read_particles, write_particles
from deephemnma_bridge.particles import ParticleTable

FIELDS = (
    "image_indices",
    "shifts_angstrom",
    "defocus_u_angstrom",
    "defocus_v_angstrom",
    "defocus_angle_degrees",
    "voltage_kv",
    "spherical_aberration_mm",
    "amplitude_contrast",
    "phase_shift_degrees",
    "bfactor_angstrom2",
    "pixel_size_angstrom",
    "box_size_px",
    "optics_group",
)


def assert_same_table(a: ParticleTable, b: ParticleTable) -> None:
    assert len(a) == len(b)
    assert list(a.image_paths) == list(b.image_paths)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=1e-9)
    assert (a.rotation_matrices is None) == (b.rotation_matrices is None)
    if a.rotation_matrices is not None:
        np.testing.assert_allclose(a.rotation_matrices, b.rotation_matrices, atol=1e-9)
    for name in ("half_set", "class_number"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


def assert_same_columns(a: pd.DataFrame, b: pd.DataFrame, skip: tuple[str, ...] = ()) -> None:
    for col in a.columns:
        if col in skip:
            continue
        assert col in b.columns, f"column {col} lost"
        assert (a[col].astype(str).to_numpy() == b[col].astype(str).to_numpy()).all(), col


@pytest.mark.parametrize("relative", RELION_FILES)
def test_read_write_read_31_is_lossless(relative: str, tmp_path: Path) -> None:
    src = shared(relative)
    table = read_particles(src)
    out = tmp_path / "out.star"
    write_particles(table, out)
    text = out.read_bytes()
    assert b"\r" not in text and b"# version 30001" in text
    again = read_particles(out)
    assert_same_table(table, again)
    assert again.source is not None and table.source is not None
    assert again.source.format == "relion31"
    if table.source.format == "relion31":
        # every column verbatim, same order, optics identical
        assert list(again.source.rows.columns) == list(table.source.rows.columns)
        assert_same_columns(table.source.rows, again.source.rows)
        assert_same_columns(table.source.optics, again.source.optics)
    else:
        moved = (
            "rlnOriginX",
            "rlnOriginY",
            "rlnVoltage",
            "rlnSphericalAberration",
            "rlnAmplitudeContrast",
            "rlnMagnification",
            "rlnDetectorPixelSize",
        )
        assert_same_columns(table.source.rows, again.source.rows, skip=moved)
    # starfile (another reader) agrees
    blocks = starfile.read(out, always_dict=True)
    assert len(blocks["particles"]) == len(table)


@pytest.mark.parametrize("relative", RELION_FILES)
def test_read_write_read_30(relative: str, tmp_path: Path) -> None:
    table = read_particles(shared(relative))
    out = tmp_path / "out30.star"
    write_particles(table, out, relion_version="3.0")
    blocks = starfile.read(out, always_dict=True)
    assert list(blocks) == [""]
    labels = set(blocks[""].columns)
    assert not labels & {"rlnOpticsGroup", "rlnImagePixelSize", "rlnOriginXAngst"}
    assert all(label.startswith("rln") for label in labels)
    again = read_particles(out)
    assert_same_table(table, again)
    # and back to 3.1: geometry unchanged
    out31 = tmp_path / "back31.star"
    write_particles(again, out31)
    assert_same_table(table, read_particles(out31))


def test_known_values_relion_proj_batch() -> None:
    path = shared("relion/simplecryoem/relion_proj_batch.star")
    table = read_particles(path)
    raw = starfile.read(path, always_dict=True)["particles"]
    assert table.pixel_size_angstrom[0] == 3.54 and table.box_size_px[0] == 64
    np.testing.assert_allclose(raw["rlnOriginX"] * 3.54, raw["rlnOriginXAngst"], atol=1e-4)
    np.testing.assert_allclose(table.shifts_angstrom[:, 0], raw["rlnOriginXAngst"])
    np.testing.assert_array_equal(table.image_indices, np.arange(24))
    assert "_level_0" not in raw.columns or "level_0" in table.source.rows.columns


def test_known_values_relion30_tomodrgn() -> None:
    table = read_particles(shared("relion/tomodrgn/10076_classD_32_sim.star"))
    # 1e4 * DetectorPixelSize / default magnification 10,000
    np.testing.assert_allclose(table.pixel_size_angstrom, 13.1)
    assert table.box_size_px[0] == 32  # from the stack header, as RELION 3.1 does
    raw = starfile.read(shared("relion/tomodrgn/10076_classD_32_sim.star"))
    np.testing.assert_allclose(table.shifts_angstrom[:, 1], raw["rlnOriginY"] * 13.1)


def test_particles_before_optics_and_negative_tilt() -> None:
    table = read_particles(shared("relion/cryojax/test_starfile.star"))
    assert table.pixel_size_angstrom[0] == 12.0 and len(table) == 3
    assert table.image_indices.tolist() == [0, 1, 2]  # 7-digit indices
    assert table.rotation_matrices is not None


def test_vector_columns_kept_verbatim(tmp_path: Path) -> None:
    table = read_particles(shared("relion/isecc/test.star"))
    write_particles(table, tmp_path / "o.star")
    text = (tmp_path / "o.star").read_text()
    assert "[0.470415004546,0.416253693925,34.3861477546,0,0,10.7852815872]" in text


def test_subset_keeps_only_used_optics_and_extra_columns(tmp_path: Path) -> None:
    table = read_particles(shared("relion/roodmus/Extract/job013/particles.star"))
    sub = table.take([5, 2]).with_extra(dhnAmplitude7=np.array([1.5, -2.25]), dhnCost=[0.1, 0.2])
    write_particles(sub, tmp_path / "s.star")
    back = read_particles(tmp_path / "s.star")
    assert back.image_indices.tolist() == [table.image_indices[5], table.image_indices[2]]
    np.testing.assert_array_equal(back.extra["dhnAmplitude7"], [1.5, -2.25])
    # RELION 3.0 gets the side file instead of unknown labels
    write_particles(sub, tmp_path / "s30.star", relion_version="3.0")
    assert "dhn" not in (tmp_path / "s30.star").read_text()
    assert (tmp_path / "s30_dhn.csv").is_file()
    np.testing.assert_array_equal(
        read_particles(tmp_path / "s30.star").extra["dhnCost"], [0.1, 0.2]
    )


def test_poses_written_as_relion_angles(tmp_path: Path) -> None:
    table = read_particles(shared("relion/simplecryoem/relion_proj_batch.star"))
    rot = np.repeat(np.eye(3)[None], len(table), axis=0)
    moved = table.with_poses(rot, np.full((len(table), 2), 1.77))
    write_particles(moved, tmp_path / "p.star")
    raw = starfile.read(tmp_path / "p.star", always_dict=True)["particles"]
    np.testing.assert_allclose(raw[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]], 0.0)
    np.testing.assert_allclose(raw["rlnOriginXAngst"], 1.77)
    assert list(raw.columns) == list(table.source.rows.columns)
