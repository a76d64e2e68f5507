"""deephemnma modes: models and maps in, a modes .npz, a table and ChimeraX animations out."""

from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import pytest
from conftest import shared

from deephemnma_bridge.cli import main
from deephemnma_bridge.nma import NormalModes


def test_modes_of_a_model_with_table_and_animations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "modes.npz"
    argv = ["modes", str(shared("structures/4ake.pdb")), "--chains", "A", "--out", str(out)]
    assert main([*argv, "--n-modes", "12", "--animate", str(tmp_path / "anim")]) == 0
    text = capsys.readouterr().out
    assert "214 nodes, cutoff 15.00 Å" in text
    assert "    7 " in text and "rigid body" in text
    modes = NormalModes.load(out)
    assert modes.mode_numbers.tolist() == list(range(1, 13))
    assert modes.atom_coordinates is not None and modes.atom_coordinates.shape == (1656, 3)
    files = sorted(p.name for p in (tmp_path / "anim").iterdir() if p.suffix == ".pdb")
    assert files == [f"mode_{m:03d}.pdb" for m in range(7, 13)]
    # a rerun does not replace the modes file or write into a folder it did not create
    assert main([*argv, "--n-modes", "12"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    again = ["modes", "--out", str(tmp_path / "m2.npz"), "--animate", str(other)]
    assert main(again) == 2
    assert "--overwrite" in capsys.readouterr().err and not (tmp_path / "m2.npz").exists()
    assert main([*argv, "--n-modes", "12", "--overwrite"]) == 0
    st = gemmi.read_structure(str(tmp_path / "anim" / "mode_007.pdb"))
    assert len(st) == 10 and st[0].count_atom_sites() == 1656
    first = np.array([c.atom.pos.tolist() for c in st[0].all()])
    last = np.array([c.atom.pos.tolist() for c in st[9].all()])
    # Cα moved from -q to +q: RMS displacement 2 * 3 Å
    ca = np.array([c.atom.name == "CA" for c in st[0].all()])
    rms = np.sqrt(np.mean(np.sum((last[ca] - first[ca]) ** 2, axis=1)))
    assert rms == pytest.approx(6.0, rel=1e-3)


def test_modes_of_a_map_and_of_the_default_model(tmp_path: Path) -> None:
    out = tmp_path / "map_modes.npz"
    assert main(["modes", str(shared("maps/EMD-3197.map")), "--out", str(out)]) == 0
    pseudo = tmp_path / "map_modes_pseudoatoms.cif"
    assert pseudo.is_file() and gemmi.read_structure(str(pseudo))[0].count_atom_sites() > 500
    modes = NormalModes.load(out)
    assert modes.settings["nodes"] == "pseudoatoms"
    assert np.all(np.abs(modes.eigenvalues[:6]) < 1e-8 * modes.eigenvalues[6])
    # the pseudoatom file is a model too
    assert main(["modes", str(pseudo), "--out", str(tmp_path / "again.npz")]) == 0
    assert main(["modes", "--out", str(tmp_path / "adk.npz"), "--rtb-block", "10"]) == 0
    adk = NormalModes.load(tmp_path / "adk.npz")
    assert adk.n_nodes == 214 and adk.settings["method"] == "rtb"


def test_modes_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(shared("structures/4ake.pdb"))
    assert main(["modes", model, "--out", str(tmp_path / "m.txt")]) == 2
    assert "must end in .npz" in capsys.readouterr().err
    assert main(["modes", model, "--out", str(tmp_path / "m.npz"), "--n-modes", "5000"]) == 2
    assert "5000 modes asked" in capsys.readouterr().err
    assert main(["modes", model, "--out", str(tmp_path / "m.npz"), "--cutoff", "4"]) == 2
    assert "larger --cutoff" in capsys.readouterr().err
    assert main(["modes", model, "--out", str(tmp_path / "m.npz"), "--chains", "Z"]) == 2
    assert "no atoms in chains Z" in capsys.readouterr().err
    ligand_only = tmp_path / "lig.pdb"
    ligand_only.write_text(
        "HETATM    1  C1  LIG A   1       0.000   0.000   0.000  1.00  0.00           C\nEND\n"
    )
    assert main(["modes", str(ligand_only), "--out", str(tmp_path / "m.npz")]) == 2
    assert "no atoms" in capsys.readouterr().err
    assert main(["modes", str(shared("maps/EMD-3197.map")), "--out", str(tmp_path / "m.npz"),
                 "--threshold", "100"]) == 2  # fmt: skip
    assert "no voxel above the threshold" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()
