"""``deephemnma convert`` and ``deephemnma subset`` on real files, both directions."""

from __future__ import annotations

import os
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


def _fake_cryosparc_project(tmp_path: Path) -> Path:
    """A cryoSPARC-like project: J3/J3_particles.cs whose stack is a .mrc (as cryoSPARC writes)."""
    table = read_particles(shared("relion/simplecryoem/relion_proj_batch.star"))
    project = tmp_path / "P1"
    (project / "J2" / "extract").mkdir(parents=True)
    stack = project / "J2" / "extract" / "000012345678901234567_mic1_particles.mrc"
    os.symlink(shared("relion/simplecryoem/relion_proj_batch.mrcs"), stack)
    relative = "J2/extract/000012345678901234567_mic1_particles.mrc"
    cs_table = table.replace(image_paths=np.full(len(table), relative, dtype=object), source=None)
    (project / "J3").mkdir()
    from deephemnma_bridge.adapters import write_particles

    write_particles(cs_table, project / "J3" / "J3_particles.cs")
    return project / "J3" / "J3_particles.cs"


def test_convert_cs_to_star_links_mrcs_and_keeps_uids(tmp_path: Path) -> None:
    cs_path = _fake_cryosparc_project(tmp_path)
    out = tmp_path / "relion" / "particles.star"
    assert main(["convert", str(cs_path), str(out)]) == 0
    link = out.parent / "stacks" / "J2" / "extract" / "000012345678901234567_mic1_particles.mrcs"
    assert link.is_symlink() and link.resolve().name == "relion_proj_batch.mrcs"
    raw = starfile.read(out, always_dict=True)["particles"]
    assert (
        raw["rlnImageName"]
        .iloc[0]
        .endswith("stacks/J2/extract/000012345678901234567_mic1_particles.mrcs")
    )
    uid_map = pd.read_csv(out.parent / "particles_uid_map.csv")
    cs = read_particles(cs_path)
    assert uid_map["cs_uid"].astype(np.uint64).tolist() == cs.uids.tolist()
    star = read_particles(out)
    from deephemnma_bridge.adapters import ParticleImages

    np.testing.assert_array_equal(
        ParticleImages(star).read([0, 5]), ParticleImages(cs).read([0, 5])
    )


def test_subset_from_relion_back_to_cryosparc(tmp_path: Path) -> None:
    cs_path = shared(J2)
    star = tmp_path / "p.star"
    assert main(["convert", str(cs_path), str(star)]) == 0
    # a user keeps some rows in RELION (a Select job rewrites the file)
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[[1, 4, 7, 20]]
    starfile.write(blocks, tmp_path / "selected.star")
    out = tmp_path / "selected.cs"
    assert (
        main(
            [
                "subset",
                "--source",
                str(cs_path),
                "--select",
                str(tmp_path / "selected.star"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    original = np.load(cs_path)
    back = np.load(out)
    assert back.dtype == original.dtype
    for f in original.dtype.names or ():
        np.testing.assert_array_equal(back[f], original[f][[1, 4, 7, 20]])


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


def test_subset_fails_on_unmatched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = shared("relion/roodmus/Extract/job013/particles.star")
    b = shared("relion/simplecryoem/relion_proj_batch.star")
    assert (
        main(["subset", "--source", str(a), "--select", str(b), "--out", str(tmp_path / "x.star")])
        == 2
    )
    err = capsys.readouterr().err
    assert "24 of 24 selected particles are not in the source" in err
    assert not (tmp_path / "x.star").exists()


def test_convert_refuses_to_overwrite_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.star"
    src.write_bytes(shared("relion/isecc/test.star").read_bytes())
    before = src.read_bytes()
    assert main(["convert", str(src), str(src)]) == 2
    assert "same file as the input" in capsys.readouterr().err
    assert src.read_bytes() == before


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
