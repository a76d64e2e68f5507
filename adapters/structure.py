"""Atomic models through gemmi: PDB / mmCIF (also gzipped) in, multi-model PDB / mmCIF out.

`read_structure` keeps the first model (saying so when the file holds several; ``model_index``
picks another), resolves alternative locations (first conformer kept),
drops waters, ligands and hydrogens unless asked, and repairs element symbols that were guessed
from atom names in files without an element column (CHARMM-style files, whose ``CA`` would
otherwise be calcium): in amino-acid and nucleotide residues an atom typed as a metal or unknown
takes the element of its name's first letter.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import gemmi
import numpy as np

from deephemnma_bridge.errors import ParticleFileError
from deephemnma_bridge.fileutils import atomic_path
from deephemnma_bridge.structure import PSEUDOATOM_RESIDUE, AtomicModel

__all__ = ["read_structure", "write_models"]

_ORGANIC = {"C", "N", "O", "S", "P", "H", "D", "SE"}
# force-field residue names gemmi's table does not know (CHARMM / AMBER protonation states)
_EXTRA_AMINO = {"HSD", "HSE", "HSP", "HID", "HIE", "HIP", "CYX", "CYM", "ASH", "GLH", "LYN"}


def read_structure(
    path: str | os.PathLike[str],
    *,
    chains: Sequence[str] | None = None,
    keep_waters: bool = False,
    keep_ligands: bool = False,
    keep_hydrogens: bool = False,
    model_index: int = 0,
) -> AtomicModel:
    """Read one model (the first by default) of a PDB or mmCIF file.

    Parameters
    ----------
    chains : sequence of str, optional
        Keep only these chain names (author chain ids).
    model_index : int
        Which model of a multi-model file (NMR ensemble, trajectory) to read, 0-based; a
        warning names the model used whenever the file holds several.

    Raises
    ------
    ParticleFileError
        Missing, unreadable or empty file, or no atom left after the selection.
    """
    p = Path(path)
    if not p.is_file():
        raise ParticleFileError(f"{p}: no such model file")
    try:
        st = gemmi.read_structure(str(p))
    except Exception as err:
        raise ParticleFileError(f"{p}: not a readable PDB/mmCIF file ({err})") from err
    if len(st) == 0:
        raise ParticleFileError(f"{p}: the file holds no model")
    if not 0 <= model_index < len(st):
        raise ParticleFileError(
            f"{p}: model index {model_index} does not exist; the file holds {len(st)} model(s) "
            f"(0 to {len(st) - 1})"
        )
    if len(st) > 1:
        which = "the first" if model_index == 0 else f"index {model_index}"
        warnings.warn(
            f"{p}: {len(st)} models; using model {model_index + 1} ({which}, MODEL "
            f"{st[model_index].num}) and ignoring the others (to use another, save it alone, "
            "or read_structure(..., model_index=k))",
            UserWarning,
            stacklevel=2,
        )
    st.setup_entities()
    st.remove_alternative_conformations()
    if not keep_waters:
        st.remove_waters()
    model = st[model_index]
    xyz, elem, names, resn, resi, icode, chain_ids, rindex, bfac, occ, kind = (
        [] for _ in range(11)
    )
    r_count = 0
    wanted = set(chains) if chains else None
    for chain in model:
        if wanted is not None and chain.name not in wanted:
            continue
        for res in chain:
            info = gemmi.find_tabulated_residue(res.name)
            polymer = ""
            if (info is not None and info.is_amino_acid()) or res.name in _EXTRA_AMINO:
                polymer = "amino"
            elif info is not None and info.is_nucleic_acid():
                polymer = "nucleic"
            elif res.name == PSEUDOATOM_RESIDUE:
                polymer = "pseudo"
            if not polymer and not keep_ligands and not res.is_water():
                continue
            added = False
            for atom in res:
                element = atom.element.name.upper()
                if polymer and element not in _ORGANIC:
                    guess = atom.name.strip().lstrip("0123456789")[:1].upper()
                    element = guess if guess in _ORGANIC else element
                if element in ("H", "D") and not keep_hydrogens:
                    continue
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                elem.append(element)
                names.append(atom.name)
                resn.append(res.name)
                resi.append(res.seqid.num)
                icode.append(res.seqid.icode.strip())
                chain_ids.append(chain.name)
                rindex.append(r_count)
                bfac.append(atom.b_iso)
                occ.append(atom.occ)
                kind.append(polymer)
                added = True
            r_count += int(added)
    if not xyz:
        which = f" in chains {','.join(chains)}" if chains else ""
        raise ParticleFileError(f"{p}: no atoms{which} after removing waters/ligands/hydrogens")
    return AtomicModel(
        coordinates_angstrom=np.asarray(xyz),
        elements=np.asarray(elem, dtype=object),
        atom_names=np.asarray(names, dtype=object),
        residue_names=np.asarray(resn, dtype=object),
        residue_numbers=np.asarray(resi),
        insertion_codes=np.asarray(icode, dtype=object),
        chain_ids=np.asarray(chain_ids, dtype=object),
        residue_index=np.asarray(rindex),
        b_factors=np.asarray(bfac),
        occupancies=np.asarray(occ),
        polymer_kind=np.asarray(kind, dtype=object),
        name=str(p),
    )


def _structure(model: AtomicModel, frames: Sequence[np.ndarray]) -> gemmi.Structure:
    st = gemmi.Structure()
    st.name = Path(model.name).stem or "model"
    st.cell = gemmi.UnitCell(1, 1, 1, 90, 90, 90)
    for k, xyz in enumerate(frames, start=1):
        if xyz.shape != model.coordinates_angstrom.shape:
            raise ValueError(f"frame {k} has shape {xyz.shape}, model has {len(model)} atoms")
        gm = gemmi.Model(k)
        chain: gemmi.Chain | None = None
        res: gemmi.Residue | None = None
        last_res = -1
        for i in range(len(model)):
            cid = str(model.chain_ids[i]) or "A"
            if chain is None or chain.name != cid:
                if chain is not None:
                    if res is not None:
                        chain.add_residue(res)
                    gm.add_chain(chain)
                chain, res, last_res = gemmi.Chain(cid), None, -1
            if model.residue_index[i] != last_res:
                if res is not None:
                    chain.add_residue(res)
                res = gemmi.Residue()
                res.name = str(model.residue_names[i])
                res.seqid = gemmi.SeqId(
                    int(model.residue_numbers[i]), str(model.insertion_codes[i]) or " "
                )
                res.het_flag = "A" if model.polymer_kind[i] else "H"
                last_res = int(model.residue_index[i])
            atom = gemmi.Atom()
            atom.name = str(model.atom_names[i])
            atom.element = gemmi.Element(str(model.elements[i]))
            atom.pos = gemmi.Position(*map(float, xyz[i]))
            atom.b_iso = float(model.b_factors[i])
            atom.occ = float(model.occupancies[i])
            assert res is not None
            res.add_atom(atom)
        if chain is not None:
            if res is not None:
                chain.add_residue(res)
            gm.add_chain(chain)
        st.add_model(gm)
    st.setup_entities()
    return st


def write_models(
    path: str | os.PathLike[str],
    model: AtomicModel,
    coordinates: Sequence[np.ndarray] | None = None,
) -> None:
    """Write ``model`` (or one model per array in ``coordinates``) as PDB or mmCIF by extension.

    Several frames make a multi-model file that ChimeraX opens as a trajectory
    (``open file.pdb coordsets true``).
    """
    out = Path(path)
    frames = [model.coordinates_angstrom] if coordinates is None else list(coordinates)
    st = _structure(model, [np.asarray(f, dtype=np.float64) for f in frames])
    suffix = out.suffix.lower()
    with atomic_path(out) as tmp:
        if suffix in (".cif", ".mmcif"):
            st.make_mmcif_document().write_file(str(tmp))
        elif suffix in (".pdb", ".ent"):
            st.write_pdb(str(tmp))
        else:
            raise ValueError(f"{out}: write .pdb or .cif")
