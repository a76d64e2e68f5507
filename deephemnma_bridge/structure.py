"""Atomic models as plain arrays (`AtomicModel`) and density maps (`DensityMap`).

Built by `deephemnma_bridge.adapters.structure` (gemmi) and `deephemnma_bridge.adapters.maps`
(mrcfile); the core only sees these arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["AtomicModel", "DensityMap"]


#: Residue name of Gaussian pseudoatoms written for a map (one atom per residue).
PSEUDOATOM_RESIDUE = "PSE"


@dataclass(frozen=True, eq=False)
class AtomicModel:
    """N atoms of one model.

    Attributes
    ----------
    coordinates_angstrom : array (N, 3)
    elements, atom_names, residue_names, chain_ids, insertion_codes : arrays (N,) of str
    residue_numbers : array (N,) int
        Author residue numbers.
    residue_index : array (N,) int
        0-based index of the atom's residue in file order (unique over chains).
    b_factors, occupancies : arrays (N,)
    polymer_kind : array (N,) of str
        ``"amino"``, ``"nucleic"`` or ``""`` (ligand, water, unknown) per atom.
    name : str
        Where the model came from.
    """

    coordinates_angstrom: NDArray[np.float64]
    elements: NDArray[Any]
    atom_names: NDArray[Any]
    residue_names: NDArray[Any]
    residue_numbers: NDArray[np.int64]
    insertion_codes: NDArray[Any]
    chain_ids: NDArray[Any]
    residue_index: NDArray[np.int64]
    b_factors: NDArray[np.float64]
    occupancies: NDArray[np.float64]
    polymer_kind: NDArray[Any]
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        xyz = np.asarray(self.coordinates_angstrom, dtype=np.float64)
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise ValueError(f"coordinates must have shape (N, 3), got {xyz.shape}")
        object.__setattr__(self, "coordinates_angstrom", xyz)
        n = xyz.shape[0]
        for name in (
            "elements",
            "atom_names",
            "residue_names",
            "insertion_codes",
            "chain_ids",
            "polymer_kind",
        ):
            arr = np.asarray(getattr(self, name), dtype=object)
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
            object.__setattr__(self, name, arr)
        for name in ("residue_numbers", "residue_index"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        for name in ("b_factors", "occupancies"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))

    def __len__(self) -> int:
        return int(self.coordinates_angstrom.shape[0])

    @property
    def n_residues(self) -> int:
        """Number of residues."""
        return int(self.residue_index.max()) + 1 if len(self) else 0

    def select(self, mask: NDArray[np.bool_]) -> AtomicModel:
        """The atoms where ``mask`` is True (residue indices renumbered from 0)."""
        m = np.asarray(mask, dtype=bool)
        _, new_index = np.unique(self.residue_index[m], return_inverse=True)
        return AtomicModel(
            coordinates_angstrom=self.coordinates_angstrom[m],
            elements=self.elements[m],
            atom_names=self.atom_names[m],
            residue_names=self.residue_names[m],
            residue_numbers=self.residue_numbers[m],
            insertion_codes=self.insertion_codes[m],
            chain_ids=self.chain_ids[m],
            residue_index=new_index,
            b_factors=self.b_factors[m],
            occupancies=self.occupancies[m],
            polymer_kind=self.polymer_kind[m],
            name=self.name,
            metadata=dict(self.metadata),
        )

    def with_coordinates(self, coordinates_angstrom: NDArray[np.float64]) -> AtomicModel:
        """The same atoms at other coordinates (N, 3)."""
        from dataclasses import replace

        return replace(self, coordinates_angstrom=np.asarray(coordinates_angstrom))


@dataclass(frozen=True, eq=False)
class DensityMap:
    """A 3D map: ``data`` (nz, ny, nx) with voxel sizes and the origin (Å) of voxel (0, 0, 0)."""

    data: NDArray[np.float32]
    voxel_size_angstrom: NDArray[np.float64]  # (x, y, z)
    origin_angstrom: NDArray[np.float64]  # (x, y, z) of voxel index (0, 0, 0)
    name: str = ""

    def voxel_coordinates(self) -> NDArray[np.float64]:
        """(nz, ny, nx, 3) Cartesian coordinates (x, y, z) in Å of every voxel centre."""
        nz, ny, nx = self.data.shape
        z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        xyz = np.stack([x, y, z], axis=-1).astype(np.float64)
        return xyz * np.asarray(self.voxel_size_angstrom) + np.asarray(self.origin_angstrom)
