"""EM map -> Gaussian pseudoatoms, the nodes of an elastic network for a map reference.

The map (above a threshold, or inside a mask) is approximated by a sum of isotropic Gaussians
of one width (default 1 voxel, the reference default) centred on voxel centres:
``V(x) ~ sum_k w_k G_sigma(x - p_k)`` with ``w_k >= 0``. Atoms are placed greedily: start
from a sub-lattice of the molecule's voxels, fit the non-negative weights (accelerated
projected gradient; the operator is a Gaussian filter of the deposited weights, so it is exact
and costs one ``scipy.ndimage.gaussian_filter`` per iteration), then add atoms where the
residual is largest, until the relative error ``||V - model|| / ||V||`` over the molecule is
below the target (default 5 %). Atoms whose weight falls to ~0 are dropped at the end.

Example
-------
>>> import numpy as np
>>> from deephemnma_bridge.structure import DensityMap
>>> data = np.zeros((16, 16, 16), np.float32); data[6:10, 5:11, 7:9] = 1.0
>>> from scipy.ndimage import binary_dilation, gaussian_filter, label
>>> m = DensityMap(gaussian_filter(data, 1.0), np.ones(3) * 2.0, np.zeros(3))
>>> atoms = pseudoatoms(m, threshold=0.05)
>>> bool(atoms.error <= 0.05)
True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import binary_dilation, gaussian_filter, label

from .errors import InputError
from .structure import PSEUDOATOM_RESIDUE, AtomicModel, DensityMap

__all__ = ["Pseudoatoms", "otsu_threshold", "pseudoatoms"]


@dataclass(frozen=True, eq=False)
class Pseudoatoms:
    """Gaussian pseudoatoms approximating a map.

    Attributes
    ----------
    coordinates_angstrom : array (K, 3)
        Centres (x, y, z), Å, in the map's frame (its origin honoured).
    weights : array (K,)
        Gaussian amplitudes (map units x voxel volume): ``sum_k w_k G`` with unit-sum G.
    sigma_angstrom : float
        Gaussian width (per axis, from ``sigma_voxels`` and the voxel size).
    error : float
        Final relative approximation error over the molecule.
    threshold : float
        Map value below which voxels were left out.
    """

    coordinates_angstrom: NDArray[np.float64]
    weights: NDArray[np.float64]
    sigma_angstrom: float
    error: float
    threshold: float

    def __len__(self) -> int:
        return int(self.coordinates_angstrom.shape[0])

    def as_model(self, name: str = "pseudoatoms") -> AtomicModel:
        """An `AtomicModel`: one carbon ``PSE`` residue per atom in chain A; occupancy = weight
        / max weight, B-factor = 8 pi^2 sigma^2 (the Gaussian's width)."""
        k = len(self)
        text = lambda v: np.full(k, v, dtype=object)  # noqa: E731
        return AtomicModel(
            coordinates_angstrom=self.coordinates_angstrom,
            elements=text("C"),
            atom_names=text("C"),
            residue_names=text(PSEUDOATOM_RESIDUE),
            residue_numbers=np.arange(1, k + 1),
            insertion_codes=text(""),
            chain_ids=text("A"),
            residue_index=np.arange(k),
            b_factors=np.full(k, 8 * np.pi**2 * self.sigma_angstrom**2),
            occupancies=self.weights / self.weights.max(),
            polymer_kind=text("pseudo"),
            name=name,
        )


def otsu_threshold(values: NDArray[np.floating], bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of ``values``."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _fit_weights(
    target: NDArray[np.float64],
    mask_idx: tuple[NDArray[np.int64], ...],
    atoms: NDArray[np.int64],
    weights: NDArray[np.float64],
    sigma_vox: NDArray[np.float64],
    iterations: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Non-negative least squares ``min ||target - A w||`` on the mask, by FISTA (step 1).

    ``A w`` = Gaussian filter (unit-sum kernel) of the weights deposited on their voxels; its
    operator norm is <= 1, so a unit step is safe. Returns (weights, model map).
    """
    shape = target.shape

    def forward(w: NDArray[np.float64]) -> NDArray[np.float64]:
        grid = np.zeros(shape)
        grid[atoms[:, 0], atoms[:, 1], atoms[:, 2]] = w
        out: NDArray[np.float64] = gaussian_filter(grid, sigma_vox, mode="constant", truncate=4.0)
        return out

    def adjoint(r: NDArray[np.float64]) -> NDArray[np.float64]:
        blurred = gaussian_filter(r, sigma_vox, mode="constant", truncate=4.0)
        return np.asarray(blurred[atoms[:, 0], atoms[:, 1], atoms[:, 2]])

    masked = np.zeros(shape, dtype=bool)
    masked[mask_idx] = True
    w, y, t = weights.copy(), weights.copy(), 1.0
    for _ in range(iterations):
        residual = np.where(masked, target - forward(y), 0.0)
        w_next = np.maximum(y + adjoint(residual), 0.0)
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, t_next
    return w, forward(w)


def pseudoatoms(
    density: DensityMap,
    *,
    threshold: float | None = None,
    mask: NDArray[np.bool_] | None = None,
    target_error: float = 0.05,
    sigma_voxels: float = 1.0,
    max_atoms: int = 200_000,
    largest_only: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> Pseudoatoms:
    """Approximate ``density`` by Gaussian pseudoatoms to ``target_error`` (module docstring).

    Parameters
    ----------
    threshold : float, optional
        Voxels below it are not part of the molecule (default: Otsu's threshold of the map).
    mask : bool array like ``density.data``, optional
        Voxels of the molecule (combined with the threshold when both are given).
    target_error : float
        Stop when ``||V - model|| / ||V||`` over the molecule is below this (default 0.05).
    sigma_voxels : float
        Gaussian width in voxels (default 1, the reference default).
    largest_only : bool
        Keep only the largest connected region above the threshold (default), so that specks
        of noise do not become loose pieces of the network.
    progress : callable(n_atoms, error), optional
        Called after each round.

    Warns
    -----
    UserWarning
        When the target error is not reached (an atom on every voxel, ``max_atoms``, or no
        further progress): the best approximation is returned with its error.

    Raises
    ------
    InputError
        Nothing above the threshold, or bad sizes or options.
    """
    data = np.asarray(density.data, dtype=np.float64)
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(f"{density.name or 'map'}: a 3D map is needed, got shape {data.shape}")
    if not 0 < target_error < 1:
        raise InputError(f"target error must be in (0, 1), got {target_error}")
    if sigma_voxels <= 0:
        raise InputError(f"pseudoatom sigma must be > 0 voxels, got {sigma_voxels}")
    level = otsu_threshold(data) if threshold is None else float(threshold)
    inside = data > level
    if mask is not None:
        if mask.shape != data.shape:
            raise InputError(f"the mask has shape {mask.shape}, the map {data.shape}")
        inside &= mask.astype(bool)
    if not inside.any():
        raise InputError(
            f"{density.name or 'map'}: no voxel above the threshold {level:.4g} "
            f"(map range {data.min():.4g} to {data.max():.4g}); lower --threshold"
        )
    if largest_only:  # specks of noise above the threshold would be loose network pieces
        labels, n_parts = label(inside)
        if n_parts > 1:
            inside = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    voxel = np.asarray(density.voxel_size_angstrom, dtype=np.float64)  # x, y, z
    sigma_angstrom = float(sigma_voxels * voxel.mean())
    sigma_vox = sigma_angstrom / voxel[::-1]  # (z, y, x) axes of the array
    target = np.where(inside, data, 0.0)
    mask_idx = np.nonzero(inside)
    norm = float(np.linalg.norm(target[mask_idx]))
    # start: every other voxel of the molecule (a sub-lattice), weights = the map there
    allowed = binary_dilation(inside)  # atoms may sit one voxel outside, to fit the edges
    candidates = np.argwhere(inside)
    stride = max(1, round(2 * sigma_voxels))
    start = np.all(candidates % stride == 0, axis=1)
    atoms = candidates[start] if start.any() else candidates[:1]
    is_atom = np.zeros(data.shape, dtype=bool)
    is_atom[tuple(atoms.T)] = True
    weights = target[tuple(atoms.T)] * float(stride**3)
    history: list[float] = []
    why = ""
    while True:
        weights, model = _fit_weights(target, mask_idx, atoms, weights, sigma_vox, 60)
        residual = np.where(inside, target - model, 0.0)
        error = float(np.linalg.norm(residual[mask_idx])) / norm
        history.append(error)
        if progress is not None:
            progress(len(atoms), error)
        free = allowed & ~is_atom
        if error <= target_error:
            break
        if not free.any():
            why = "with an atom on every voxel of the molecule"
        elif len(atoms) >= max_atoms:
            why = f"with {len(atoms)} atoms (--max-atoms)"
        elif len(history) > 3 and history[-1] > 0.995 * history[-4]:
            why = f"and stopped improving at {len(atoms)} atoms"
        if why:
            warnings.warn(
                f"{density.name or 'map'}: the pseudoatoms reach an error of {error:.3f}, not "
                f"{target_error}, {why}; a smaller --sigma fits finer detail",
                UserWarning,
                stacklevel=2,
            )
            break
        # add atoms where the map is most under-explained (blurred residual: also just outside)
        pull = gaussian_filter(residual, sigma_vox, mode="constant")
        free_idx = np.argwhere(free)
        gain = pull[tuple(free_idx.T)]
        n_add = min(len(free_idx), max(1, len(atoms) // 4), max_atoms - len(atoms))
        best = free_idx[np.argsort(-gain, kind="stable")[:n_add]]
        best = best[pull[tuple(best.T)] > 0]
        if len(best) == 0:
            why = "with no under-explained voxel left"
            continue
        atoms = np.concatenate([atoms, best])
        weights = np.concatenate([weights, np.maximum(residual[tuple(best.T)], 0.0)])
        is_atom[tuple(best.T)] = True
    keep = weights > 1e-6 * weights.max()
    atoms, weights = atoms[keep], weights[keep]
    xyz = atoms[:, ::-1].astype(np.float64) * voxel + np.asarray(density.origin_angstrom)
    return Pseudoatoms(
        coordinates_angstrom=xyz,
        weights=weights,
        sigma_angstrom=sigma_angstrom,
        error=error,
        threshold=level,
    )
