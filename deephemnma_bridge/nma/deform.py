"""Deform node coordinates along normal modes: ``r + sum_m q_m u_m``, numpy or torch.

One implementation serves both array libraries (``@`` and ``reshape`` behave alike), batched
over any leading dimensions of the amplitudes.

Example
-------
>>> import numpy as np
>>> xyz = np.zeros((2, 3))
>>> modes = np.zeros((1, 2, 3)); modes[0, :, 0] = 1 / np.sqrt(2)
>>> deform(xyz, modes, np.array([[np.sqrt(2)], [0.0]]))[:, 0, 0].tolist()
[1.0, 0.0]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch is imported by callers that use tensors, not here (fast CLI start)
    import torch

__all__ = ["deform", "deform_atoms"]

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")


def deform(coordinates: ArrayT, modes: ArrayT, amplitudes: ArrayT) -> ArrayT:
    """Deformed coordinates.

    Parameters
    ----------
    coordinates : array or tensor (N, 3)
        Reference node coordinates, Å.
    modes : array or tensor (M, N, 3)
        Mode vectors (unit norm over 3N), e.g. ``NormalModes.select([7, 8, 9]).vectors``.
    amplitudes : array or tensor (..., M)
        Amplitudes, Å; any leading (batch) shape.

    Returns
    -------
    array or tensor (..., N, 3), same library as the inputs.
    """
    if coordinates.ndim != 2 or coordinates.shape[1] != 3:
        raise ValueError(f"coordinates must have shape (N, 3), got {tuple(coordinates.shape)}")
    n = coordinates.shape[0]
    if modes.ndim != 3 or tuple(modes.shape[1:]) != (n, 3):
        raise ValueError(f"modes must have shape (M, {n}, 3), got {tuple(modes.shape)}")
    m = modes.shape[0]
    if amplitudes.ndim < 1 or amplitudes.shape[-1] != m:
        raise ValueError(f"amplitudes must have shape (..., {m}), got {tuple(amplitudes.shape)}")
    batch = tuple(amplitudes.shape[:-1])
    if m == 0:  # no modes: the reference, repeated over the batch
        return coordinates + 0 * amplitudes.sum(-1)[..., None, None]
    disp = (amplitudes.reshape(-1, m) @ modes.reshape(m, 3 * n)).reshape(*batch, n, 3)
    return coordinates + disp


def deform_atoms(
    atom_coordinates: np.ndarray,
    atom_node: np.ndarray,
    node_coordinates: np.ndarray,
    modes: np.ndarray,
    amplitudes: np.ndarray,
) -> np.ndarray:
    """Atoms (A, 3) moved with their nodes (``atom_node``; -1: the atom stays) for each row of
    ``amplitudes`` (B, M): returns (B, A, 3). The displacement of a node is that of `deform`."""
    atoms = np.asarray(atom_coordinates, dtype=np.float64)
    owner = np.asarray(atom_node, dtype=np.int64)
    nodes = np.asarray(node_coordinates, dtype=np.float64)
    moved = deform(nodes, np.asarray(modes, dtype=np.float64), np.atleast_2d(amplitudes))
    out = np.repeat(atoms[None], len(moved), axis=0)
    has = owner >= 0
    out[:, has] += (moved - nodes)[:, owner[has]]
    return out
