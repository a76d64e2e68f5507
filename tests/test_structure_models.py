"""Multi-model PDB / mmCIF files: the model used is named, another can be picked."""

from __future__ import annotations

import warnings
from pathlib import Path

import gemmi
import numpy as np
import pytest

from deephemnma_bridge.adapters.structure import read_structure
from deephemnma_bridge.errors import ParticleFileError


def _write(path: Path, n_models: int) -> list[np.ndarray]:
    """A 5-residue poly-Ala CA trace, model k shifted by 10*k Å in x; returns each model's xyz."""
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(1, 1, 1, 90, 90, 90)
    frames = []
    for k in range(n_models):
        model = gemmi.Model(k + 1)
        chain = gemmi.Chain("A")
        xyz = np.array([[3.8 * i + 10.0 * k, 0.5 * i, 0.0] for i in range(5)])
        for i, pos in enumerate(xyz):
            res = gemmi.Residue()
            res.name, res.seqid = "ALA", gemmi.SeqId(i + 1, " ")
            atom = gemmi.Atom()
            atom.name, atom.element = "CA", gemmi.Element("C")
            atom.pos = gemmi.Position(*pos)
            res.add_atom(atom)
            chain.add_residue(res)
        model.add_chain(chain)
        st.add_model(model)
        frames.append(xyz)
    st.setup_entities()
    if path.suffix == ".cif":
        st.make_mmcif_document().write_file(str(path))
    else:
        st.write_pdb(str(path))
    return frames


@pytest.mark.parametrize("suffix", [".cif", ".pdb"])
def test_several_models_are_reported(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ensemble{suffix}"
    frames = _write(path, 2)
    with pytest.warns(UserWarning, match=r"2 models; using model 1 \(the first") as record:
        first = read_structure(path)
    assert str(path) in str(record[0].message)
    np.testing.assert_allclose(first.coordinates_angstrom, frames[0], atol=1e-3)
    with pytest.warns(UserWarning, match=r"2 models; using model 2 \(index 1, MODEL 2\)"):
        second = read_structure(path, model_index=1)
    np.testing.assert_allclose(second.coordinates_angstrom, frames[1], atol=1e-3)
    with pytest.raises(ParticleFileError, match="holds 2 model"):
        read_structure(path, model_index=2)


def test_single_model_is_read_silently(tmp_path: Path) -> None:
    path = tmp_path / "one.cif"
    frames = _write(path, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = read_structure(path)
    np.testing.assert_allclose(model.coordinates_angstrom, frames[0], atol=1e-3)
