"""Damaged or misleading input: a clear error naming the row, never wrong values."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from conftest import shared
from cryosparc.dataset import Dataset

from deephemnma_bridge.adapters import (
    ParticleImages,
    read_particles,
    read_stack_header,
    write_particles,
)
from deephemnma_bridge.cli import main
from deephemnma_bridge.errors import ParticleFileError

CRYOJAX = "relion/cryojax/test_starfile.star"


def _edited(tmp_path: Path, old: str, new: str, relative: str = CRYOJAX) -> Path:
    text = shared(relative).read_text()
    assert old in text
    out = tmp_path / "edited.star"
    out.write_text(text.replace(old, new, 1))
    return out


def test_31_file_without_optics_keeps_its_angstrom_origins(tmp_path: Path) -> None:
    text = shared(CRYOJAX).read_text()
    path = tmp_path / "no_optics.star"
    path.write_text(text[: text.index("data_optics")])
    with pytest.raises(ParticleFileError, match="3.1.*without its data_optics"):
        read_particles(path)
    table = read_particles(path, pixel_size_angstrom=12.0)
    assert table.source is not None and table.source.format == "relion31"
    np.testing.assert_array_equal(table.shifts_angstrom[0], [32.056030, -21.564449])
    # and convert --pixel-size (what the error advises) carries them
    assert main(["convert", str(path), str(tmp_path / "o.star"), "--pixel-size", "12"]) == 0
    rows = starfile.read(tmp_path / "o.star")["particles"]
    assert rows["rlnOriginXAngst"].tolist()[0] == 32.056030


def test_float_blob_idx_is_an_error(tmp_path: Path) -> None:
    ds = Dataset({"uid": np.arange(3, dtype=np.uint64)})
    ds.add_fields([("blob/path", "O"), ("blob/idx", "<f4"), ("blob/psize_A", "<f4")])
    ds["blob/path"] = np.full(3, "s.mrc", dtype=object)
    ds["blob/idx"] = np.array([0.0, 1.5, 2.0])
    ds["blob/psize_A"] = np.ones(3)
    ds.save(tmp_path / "p.cs")
    with pytest.raises(ParticleFileError, match=r"blob/idx of row 2 .*1\.5"):
        read_particles(tmp_path / "p.cs")


def test_two_stacks_with_one_name_get_two_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "P1" / "J1"
    stacks = {"a/x.mrc": project / "a" / "x.mrc", "../../a/x.mrc": tmp_path / "a" / "x.mrc"}
    for k, path in enumerate(stacks.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        with mrcfile.new(path) as mrc:
            mrc.set_data(np.full((2, 4, 4), float(k), dtype=np.float32))
    ds = Dataset({"uid": np.arange(4, dtype=np.uint64)})
    ds.add_fields([("blob/path", "O"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4")])
    ds["blob/path"] = np.array(
        ["a/x.mrc", "a/x.mrc", "../../a/x.mrc", "../../a/x.mrc"], dtype=object
    )
    ds["blob/idx"] = np.array([0, 1, 0, 1])
    ds["blob/psize_A"] = np.ones(4)
    ds.save(project / "J1_particles.cs")
    monkeypatch.chdir(project)
    assert main(["convert", "J1_particles.cs", "out/p.star"]) == 0
    assert "2 .mrc stack(s) linked" in capsys.readouterr().out
    table = read_particles(project / "out" / "p.star")
    images = ParticleImages(table).read(np.arange(4))
    np.testing.assert_array_equal(images[:, 0, 0], [0.0, 0.0, 1.0, 1.0])  # each its own stack


def test_star_truncated_inside_its_last_value(tmp_path: Path) -> None:
    text = shared(CRYOJAX).read_text()
    cut = tmp_path / "cut.star"
    cut.write_text(text.rstrip("\n")[:-3])  # "0.100000" -> "0.100"
    with pytest.raises(ParticleFileError, match="row 1 of table 'optics'.*truncated"):
        read_particles(cut)
    particles_end = text.index("data_optics")
    cut.write_text(text[:particles_end].rstrip("\n")[:-4])  # "...@000000.mrcs" -> "...@000000."
    with pytest.raises(ParticleFileError, match="row 3 of table 'particles'"):
        read_particles(cut, pixel_size_angstrom=1.0)
    # a complete file that merely lacks its final newline (Warp writes such files) still reads
    whole = shared("relion/cryocat/relion_3.0.star")
    assert not whole.read_bytes().endswith(b"\n")
    assert len(read_particles(whole)) == 3


def test_image_name_pointing_at_a_non_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 50)
    star = tmp_path / "data" / "p.star"
    star.parent.mkdir()
    star.write_text(_edited(tmp_path, "0000002@000000.mrcs", "1@../secret.txt").read_text())
    assert main(["convert", str(star), str(tmp_path / "o.cs")]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "not an MRC image stack" in err
    assert not (tmp_path / "o.cs").exists()
    # the other spelling (stack@N) is refused when reading, naming the row
    bad = _edited(tmp_path, "0000001@000000.mrcs", "../../../../etc/passwd@1")
    with pytest.raises(ParticleFileError, match="row 1 rlnImageName"):
        read_particles(bad)


def test_text_in_a_number_column(tmp_path: Path) -> None:
    bad = _edited(tmp_path, "10061.054688", "abc")
    with pytest.raises(ParticleFileError, match="row 1 column rlnDefocusU is 'abc'"):
        read_particles(bad)


def test_duplicated_column(tmp_path: Path) -> None:
    bad = _edited(tmp_path, "_rlnAnglePsi #9", "_rlnAngleTilt #9")
    with pytest.raises(ParticleFileError, match="column _rlnAngleTilt twice"):
        read_particles(bad)


def test_row_with_a_missing_value(tmp_path: Path) -> None:
    bad = _edited(tmp_path, "1.000000\t2.000000\t0.000000\t0000002", "1.000000\t2.000000\t0000002")
    with pytest.raises(ParticleFileError, match="row 2 has no value for column"):
        read_particles(bad)


@pytest.mark.parametrize("size", [100, 1024, 1024 + 4 * 16])
def test_corrupt_or_short_mrc_header(tmp_path: Path, size: int) -> None:
    good = tmp_path / "good.mrcs"
    with mrcfile.new(good) as mrc:
        mrc.set_data(np.zeros((3, 8, 8), dtype=np.float32))
    bad = tmp_path / "bad.mrcs"
    bad.write_bytes(good.read_bytes()[:size])
    with pytest.raises(ParticleFileError, match="bad.mrcs"):
        read_stack_header(bad)
    table = read_particles(shared(CRYOJAX)).replace(
        image_paths=np.full(3, str(bad), dtype=object), search_dirs=()
    )
    with pytest.raises(ParticleFileError, match="bad.mrcs"):
        ParticleImages(table, check_finite=False).read([0])


def test_garbage_mrc_header(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.mrcs"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ParticleFileError, match="garbage.mrcs"):
        read_stack_header(bad)


def _empty_from(relative: str, out: Path) -> None:
    table = read_particles(shared(relative))
    write_particles(table.take([]), out)


def test_empty_star_keeps_the_optics_rows(tmp_path: Path) -> None:
    _empty_from("relion/roodmus/Select/job009/particles.star", tmp_path / "outliers.star")
    blocks = starfile.read(tmp_path / "outliers.star", always_dict=True)
    assert len(blocks["optics"]) == 1 and len(blocks["particles"]) == 0
    assert "rlnImageName" in blocks["particles"].columns


@pytest.mark.skipif(shutil.which("relion_star_handler") is None, reason="RELION not installed")
@pytest.mark.parametrize(
    "relative", [CRYOJAX, "relion/isecc/test.star", "relion/simplecryoem/pyem.star"]
)
def test_relion_reads_what_we_write(tmp_path: Path, relative: str) -> None:
    outputs = [tmp_path / "empty.star", tmp_path / "full.star"]
    _empty_from(relative, outputs[0])
    write_particles(read_particles(shared(relative)), outputs[1])
    for out in outputs:
        done = subprocess.run(
            ["relion_star_handler", "--i", str(out), "--o", str(tmp_path / "again.star")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 0 and "ERROR" not in done.stdout + done.stderr, done.stderr


def test_a_missing_value_of_ours_is_written_as_nan_and_read_back(tmp_path: Path) -> None:
    """A failed particle's _dhnCost (or a HEMNMA particle's _dhnConfidence) is NaN: written as
    the token nan (an empty token made the row look truncated), read back as NaN; in a RELION
    column or a short row it is still an error."""
    table = read_particles(shared("relion/simplecryoem/relion_proj_batch.star"))
    cost = np.full(len(table), 0.3)
    cost[1] = np.nan
    out = tmp_path / "p.star"
    write_particles(table.with_extra(dhnCost=cost), out)
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("000002@"))
    assert row.split("\t")[-1] == "nan"
    back = np.asarray(read_particles(out).extra["dhnCost"], dtype=float)
    assert np.isnan(back[1]) and np.all(back[np.arange(len(back)) != 1] == 0.3)
    text = out.read_text().replace(row, row.replace("\tnan", ""))
    (tmp_path / "short.star").write_text(text)
    with pytest.raises(ParticleFileError, match="row 2"):
        read_particles(tmp_path / "short.star")


def test_stack_reads_match_the_memory_map_in_any_order(tmp_path: Path) -> None:
    """`ParticleImages.read` takes runs of consecutive images with one read each: rows in any
    order, repeated, and split over runs give exactly the memory map's images."""
    from deephemnma_bridge import api

    with pytest.warns(UserWarning, match="may leave"):  # a small box, for speed
        sim = api.simulate(
            out=tmp_path / "sim", n_particles=12, box_px=32, pixel_size_angstrom=3.0, seed=2,
            device="cpu", progress=False, log=None,
        )  # fmt: skip
    table = sim.particles
    with mrcfile.open(tmp_path / "sim" / "particles.mrcs") as mrc:
        stack = np.asarray(mrc.data).copy()
    # out of order and repeated (runs through a buffer); in file order, whole or in runs
    # (read straight into the output)
    for rows in ([5, 1, 2, 3, 9, 9, 0, 11, 10, 4], list(range(12)), [0, 1, 2, 7, 8, 9, 11]):
        got = ParticleImages(table).read(np.array(rows))
        np.testing.assert_array_equal(got, stack[np.asarray(table.image_indices)[rows]])
