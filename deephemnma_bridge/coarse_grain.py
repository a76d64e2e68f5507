"""Atoms -> elastic-network nodes: one node per residue (Cα / P) or every heavy atom.

Pseudoatoms of a map (residue ``PSE``, one atom each) are nodes at the residue level too.

Every atom of the model is assigned the node it moves with (``atom_node``): the node of its
residue for residue-level networks (so an all-atom density can follow a Cα deformation), itself
for heavy-atom networks, ``-1`` when its residue has no node. ``blocks`` groups consecutive
residues of a chain into rigid blocks for RTB.

Example
-------
>>> import numpy as np
>>> from deephemnma_bridge.structure import AtomicModel
>>> m = AtomicModel(np.eye(3) * 4, ["C"] * 3, ["CA"] * 3, ["ALA"] * 3, [1, 2, 3], [""] * 3,
...                 ["A"] * 3, [0, 1, 2], [0.0] * 3, [1.0] * 3, ["amino"] * 3)
>>> coarse_grain(m).coordinates_angstrom.shape
(3, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from .errors import InputError
from .structure import AtomicModel

__all__ = ["CoarseGrained", "coarse_grain"]

_MASSES = {"C": 12.011, "N": 14.007, "O": 15.999, "S": 32.06, "P": 30.974, "SE": 78.97}


@dataclass(frozen=True, eq=False)
class CoarseGrained:
    """M network nodes of a model with N atoms.

    Attributes
    ----------
    coordinates_angstrom : array (M, 3)
    masses : array (M,)
        1 for every node unless mass weighting was asked (then residue or atom masses, Da).
    node_residue : array (M,) int
        Residue index (``AtomicModel.residue_index``) of each node.
    node_chain : array (M,) of str
    atom_node : array (N,) int
        For every atom of the model, the node it moves with (-1: none).
    """

    coordinates_angstrom: NDArray[np.float64]
    masses: NDArray[np.float64]
    node_residue: NDArray[np.int64]
    node_chain: NDArray[np.object_]
    atom_node: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.coordinates_angstrom.shape[0])

    def blocks(self, residues_per_block: int = 10) -> NDArray[np.int64]:
        """Block id (M,) grouping ``residues_per_block`` consecutive residues of each chain."""
        if residues_per_block < 1:
            raise InputError(f"residues per block must be >= 1, got {residues_per_block}")
        new_chain = np.r_[True, self.node_chain[1:] != self.node_chain[:-1]]
        chain_id = np.cumsum(new_chain) - 1
        _, res_rank = np.unique(self.node_residue, return_inverse=True)
        start = np.full(int(chain_id.max()) + 1, np.iinfo(np.int64).max)
        np.minimum.at(start, chain_id, res_rank)
        local = (res_rank - start[chain_id]) // residues_per_block
        key = chain_id * (int(local.max()) + 1) + local
        _, block = np.unique(key, return_inverse=True)
        return block.astype(np.int64)


def coarse_grain(
    model: AtomicModel,
    *,
    nodes: Literal["ca", "heavy"] = "ca",
    chains: list[str] | None = None,
    mass_weighted: bool = False,
) -> CoarseGrained:
    """Nodes of ``model``: Cα of amino acids and P of nucleotides (``"ca"``), or heavy atoms.

    Raises
    ------
    InputError
        No Cα/P atom, fewer than 3 nodes, or two nodes at the same place (duplicate atoms).
    """
    if chains:
        model = model.select(np.isin(model.chain_ids, chains))
    if nodes == "ca":
        is_node = (
            ((model.atom_names == "CA") & (model.polymer_kind == "amino"))
            | ((model.atom_names == "P") & (model.polymer_kind == "nucleic"))
            | (model.polymer_kind == "pseudo")
        )
        # one node per residue: the first such atom
        idx = np.flatnonzero(is_node)
        _, first = np.unique(model.residue_index[idx], return_index=True)
        idx = idx[first]
        if idx.size == 0:
            raise InputError(
                f"{model.name}: no Cα (amino acid) or P (nucleotide) atom; use --nodes heavy"
            )
        node_of_residue = np.full(model.n_residues, -1, dtype=np.int64)
        node_of_residue[model.residue_index[idx]] = np.arange(idx.size)
        atom_node = node_of_residue[model.residue_index]
    elif nodes == "heavy":
        idx = np.flatnonzero(model.elements != "H")
        atom_node = np.full(len(model), -1, dtype=np.int64)
        atom_node[idx] = np.arange(idx.size)
    else:
        raise InputError(f"nodes must be 'ca' or 'heavy', got {nodes!r}")
    if idx.size < 3:
        raise InputError(
            f"{model.name}: only {idx.size} node(s); an elastic network needs at least 3 "
            "(a single residue has no internal motions at this level; use --nodes heavy)"
        )
    xyz = model.coordinates_angstrom[idx]
    pairs = cKDTree(xyz).query_pairs(0.01, output_type="ndarray")
    if len(pairs):
        i, j = pairs[0]
        raise InputError(
            f"{model.name}: atoms {model.atom_names[idx[i]]} of residue "
            f"{model.chain_ids[idx[i]]}{model.residue_numbers[idx[i]]} and "
            f"{model.chain_ids[idx[j]]}{model.residue_numbers[idx[j]]} overlap (duplicate atoms); "
            "remove the duplicates"
        )
    if mass_weighted:
        atom_mass = np.array([_MASSES.get(str(e), 12.011) for e in model.elements])
        masses: NDArray[np.float64] = np.bincount(
            atom_node[atom_node >= 0], weights=atom_mass[atom_node >= 0], minlength=idx.size
        ).astype(np.float64)
    else:
        masses = np.ones(idx.size)
    return CoarseGrained(
        coordinates_angstrom=xyz,
        masses=masses,
        node_residue=model.residue_index[idx],
        node_chain=np.asarray(model.chain_ids[idx], dtype=object),
        atom_node=atom_node,
    )
