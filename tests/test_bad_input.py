"""Bad particle files give errors that name the file, row or column; failed writes leave nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared

from deephemnma_bridge.adapters import (
    ParticleImages,
    read_particles,
    require_poses,
    write_particles,
)
from deephemnma_bridge.errors import ParticleFileError

GOOD = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
1 opticsGroup1 3.54 64 200 1.4 0.1

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnOpticsGroup #4
1@relion_proj_batch.mrcs 10000 10100 1
2@relion_proj_batch.mrcs 12000 12100 1
"""


def _write(tmp_path: Path, text: str, name: str = "p.star") -> Path:
    path = tmp_path / name
    path.write_text(text)
    stack = tmp_path / "relion_proj_batch.mrcs"
    if not stack.exists():
        stack.symlink_to(shared("relion/simplecryoem/relion_proj_batch.mrcs"))
    return path


def test_good_file_reads(tmp_path: Path) -> None:
    table = read_particles(_write(tmp_path, GOOD))
    assert len(table) == 2 and table.rotation_matrices is None
    assert ParticleImages(table).read([1, 0]).shape == (2, 64, 64)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("_rlnImageName #1", "_rlnMicrographName #1"), "no rlnImageName"),
        (lambda t: t.replace("12000 12100 1\n", "12000 12100 3\n"), "row 2 uses optics group 3"),
        (lambda t: t.replace("12000 12100 1\n", "12000 12100\n"), "row 2 has no value"),
        (lambda t: t.replace("12000 12100", "nan 12100"), "row 2 .*rlnDefocusU"),
        (lambda t: t.replace("12000 12100", "inf 12100"), "row 2 column rlnDefocusU"),
        (lambda t: t.replace("2@relion", "0@relion"), "row 2 rlnImageName"),
        (
            lambda t: t.replace("0.1\n", "0.1\n2 opticsGroup2 3.54 128 200 1.4 0.1\n", 1).replace(
                "12000 12100 1\n", "12000 12100 2\n"
            ),
            "different box sizes",
        ),
        (
            lambda t: t.replace("_rlnImagePixelSize #3", "_rlnMicrographPixelSizeX #3"),
            "no pixel size",
        ),
    ],
)
def test_bad_star_files(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, edit(GOOD))
    with pytest.raises(ParticleFileError, match=message) as exc:
        read_particles(path)
    assert str(path) in str(exc.value)


def test_missing_garbage_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(ParticleFileError, match="no such file"):
        read_particles(tmp_path / "none.star")
    garbage = tmp_path / "g.star"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ParticleFileError, match="g.star"):
        read_particles(garbage)
    with pytest.raises(ParticleFileError, match="unknown particle file type"):
        read_particles(tmp_path / "x.txt")


def test_image_errors(tmp_path: Path) -> None:
    table = read_particles(_write(tmp_path, GOOD.replace("2@relion", "99@relion")))
    with pytest.raises(ParticleFileError, match="row 2: image 99@relion_proj_batch.mrcs is beyond"):
        ParticleImages(table).read([0, 1])
    table = read_particles(_write(tmp_path, GOOD.replace("3.54 64", "3.54 32")))
    with pytest.raises(ParticleFileError, match="images are 64 px but the particle file says 32"):
        ParticleImages(table).read([0])
    table = read_particles(_write(tmp_path, GOOD.replace("@relion", "@elsewhere/relion")))
    with pytest.raises(ParticleFileError, match="not found .*project directory"):
        ParticleImages(table).read([0])


def test_nan_image(tmp_path: Path) -> None:
    from deephemnma_bridge.adapters import StackWriter

    with StackWriter(tmp_path / "nan.mrcs", box_size_px=8, pixel_size_angstrom=1.0) as w:
        w.append(np.zeros((1, 8, 8)))
        w.append(np.full((1, 8, 8), np.nan))
    text = GOOD.replace("relion_proj_batch.mrcs", "nan.mrcs").replace("3.54 64", "1.0 8")
    table = read_particles(_write(tmp_path, text, "n.star"))
    assert ParticleImages(table).read([0]).shape == (1, 8, 8)
    with pytest.raises(ParticleFileError, match="row 2: image 2@nan.mrcs contains NaN"):
        ParticleImages(table).read([0, 1])


def test_require_poses(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    with pytest.raises(ParticleFileError, match="no 3D poses"):
        require_poses(read_particles(path), path)


def test_failed_write_leaves_nothing_and_input_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _write(tmp_path, GOOD)
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    table = read_particles(src)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pandas.DataFrame.to_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        write_particles(table, tmp_path / "out.star")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.star", "relion_proj_batch.mrcs"]
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before
    with pytest.raises(Exception, match="same file as the input"):
        write_particles(table, src)
