"""Atomic models through gemmi: every real structure reads; CHARMM files keep carbon CA."""

from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import pytest
from conftest import shared

from deephemnma_bridge.adapters.structure import read_structure, write_models
from deephemnma_bridge.errors import ParticleFileError

STRUCTURES = {
    # file: (residues, CA carbons, P atoms) after dropping waters, ligands, hydrogens
    "4ake.pdb": (428, 428, 0),
    "4ake.cif": (428, 428, 0),
    "1ake.pdb": (428, 428, 0),
    "1ake_chimerax.cif": (428, 428, 0),
    "adk_open_charmm.pdb": (214, 214, 0),
    "adk_closed_charmm.pdb": (214, 214, 0),
    "4yvs.cif": (3405, 3405, 0),
    "7pbl.pdb": (1948, 1918, 30),
    "4upy.pdb": (948, 611, 335),
}


@pytest.mark.parametrize(("name", "expected"), STRUCTURES.items())
def test_real_structures(name: str, expected: tuple[int, int, int]) -> None:
    model = read_structure(shared(f"structures/{name}"))
    ca = int(((model.atom_names == "CA") & (model.elements == "C")).sum())
    assert (model.n_residues, ca, int((model.atom_names == "P").sum())) == expected
    assert not np.isin(model.elements, ["H", "D", "CA"]).any()  # no hydrogens, no calcium


def test_chain_selection_and_options() -> None:
    path = shared("structures/4ake.pdb")
    a = read_structure(path, chains=["A"])
    assert a.n_residues == 214 and set(a.chain_ids) == {"A"}
    with_water = read_structure(path, chains=["A"], keep_waters=True)
    assert len(with_water) > len(a) and "HOH" in set(with_water.residue_names)
    with_h = read_structure(shared("structures/7pbl.pdb"), keep_hydrogens=True)
    assert (with_h.elements == "H").sum() > 15000
    with pytest.raises(ParticleFileError, match="no atoms in chains Z"):
        read_structure(path, chains=["Z"])


def test_charmm_file_matches_pdb_ca_rmsd() -> None:
    charmm = read_structure(shared("structures/adk_open_charmm.pdb"))
    pdb = read_structure(shared("structures/4ake.pdb"), chains=["A"])
    a = charmm.coordinates_angstrom[charmm.atom_names == "CA"]
    b = pdb.coordinates_angstrom[pdb.atom_names == "CA"]
    sup = gemmi.superpose_positions(
        [gemmi.Position(*x) for x in a], [gemmi.Position(*x) for x in b]
    )
    assert sup.rmsd == pytest.approx(0.610, abs=0.01)  # PROVENANCE.md value


def test_write_multimodel_pdb_and_cif(tmp_path: Path) -> None:
    model = read_structure(shared("structures/4ake.pdb"), chains=["A"])
    frames = [model.coordinates_angstrom + k for k in range(3)]
    write_models(tmp_path / "traj.pdb", model, frames)
    write_models(tmp_path / "one.cif", model)
    st = gemmi.read_structure(str(tmp_path / "traj.pdb"))
    assert len(st) == 3 and st[2].count_atom_sites() == len(model)
    back = read_structure(tmp_path / "one.cif")
    np.testing.assert_allclose(back.coordinates_angstrom, model.coordinates_angstrom, atol=1e-3)
    assert list(back.elements) == list(model.elements)


def test_bad_model_files(tmp_path: Path) -> None:
    with pytest.raises(ParticleFileError, match="no such model file"):
        read_structure(tmp_path / "none.pdb")
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\nloop_\n_atom_site.id\n")
    with pytest.raises(ParticleFileError, match="bad.cif"):
        read_structure(bad)
