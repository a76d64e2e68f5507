"""Point-group symmetry (Cn, Dn) of the reference: the group's rotations, folding poses onto
one representative, and angles between poses modulo the group.

Convention (RELION's ``symmetries.cpp``, ``--sym Cn`` / ``Dn``): the n-fold axis is z; Dn adds
a 2-fold axis along x. Group elements are rotation matrices ``g`` acting on model coordinates
(relative to the rotation centre) like poses do (``conventions``: ``r' = A r``). As a set the
group does not depend on the sense of rotation, so only the axes matter.

A model ``X`` is symmetric when ``g X = X`` for every ``g`` of ``G``. Then the pose ``A`` and
every pose ``A g`` project ``X`` to the same image (``A g X = A X``): the poses equivalent to
``A`` are ``{A g : g in G}``. `fold_poses` picks one of them, the one nearest a reference pose
(the identity by default), so equivalent poses fold to the same matrix; in RELION's Euler
angles a Cn element is a change of ``rot`` by a multiple of 360/n.

A model taken from the PDB rarely has its axis along z: `find_symmetry_frame` finds the
model's own axes (principal axes for the n-fold axis, a scan for the Dn 2-fold) and
``point_group(symbol, frame)`` gives the group in that frame, ``F g F^T``.

A pseudo-symmetric complex (copies of one subunit in different states, e.g. an AAA+ ring
around its substrate) is far from invariant node by node, yet its copies look alike at low
resolution: `half_step_deviation` (the group turned by half its n-fold step, poses that are no
symmetry) gives the level of no symmetry to compare `symmetry_deviation` with.

Example
-------
>>> import numpy as np
>>> G = point_group("C4")
>>> A = point_group("C4")[1]  # a quarter turn about z: equivalent to the identity
>>> bool(np.allclose(fold_poses(A[None], G)[0][0], np.eye(3)))
True
>>> float(angle_between_rotations_modulo(np.eye(3), A, G).round(6))
0.0
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from .errors import InputError

__all__ = [
    "angle_between_rotations_modulo",
    "find_symmetry_frame",
    "fold_poses",
    "group_order",
    "half_step_deviation",
    "node_spacing",
    "parse_symmetry",
    "point_group",
    "symmetry_deviation",
]

_SYMBOL = re.compile(r"^\s*([CcDd])\s*(\d+)\s*$")


def parse_symmetry(symbol: str) -> tuple[str, int]:
    """``"C5"`` -> ``("C", 5)``; ``"d7"`` -> ``("D", 7)``. Only cyclic and dihedral groups.

    Raises `InputError` for anything else (T, O, I, helical, n < 1)."""
    m = _SYMBOL.match(str(symbol))
    if m is None or int(m.group(2)) < 1:
        raise InputError(
            f"symmetry {symbol!r}: expected Cn or Dn with n >= 1 (e.g. C1, C5, D2); "
            "tetrahedral, octahedral, icosahedral and helical symmetry are not supported"
        )
    return m.group(1).upper(), int(m.group(2))


def group_order(symbol: str) -> int:
    """Number of elements: n for Cn, 2n for Dn."""
    kind, n = parse_symmetry(symbol)
    return n if kind == "C" else 2 * n


def _rz(angle: float) -> NDArray[np.float64]:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _as_frame(frame: ArrayLike) -> NDArray[np.float64]:
    f = np.asarray(frame, dtype=np.float64)
    if f.shape != (3, 3) or not np.allclose(f @ f.T, np.eye(3), atol=1e-6):
        raise ValueError("frame must be a 3x3 rotation matrix (orthonormal columns)")
    if np.linalg.det(f) < 0:
        raise ValueError("frame must be a proper rotation (determinant +1)")
    return f


def point_group(symbol: str, frame: ArrayLike | None = None) -> NDArray[np.float64]:
    """The rotations (|G|, 3, 3) of Cn or Dn, identity first.

    Cn: ``Rz(360 k / n)``, k = 0..n-1. Dn: those, then ``Rx(180) Rz(360 k / n)``. With
    ``frame`` F (a rotation whose columns are the group's x, y, z axes in model coordinates),
    ``F g F^T``: the n-fold axis is ``F[:, 2]``, the Dn 2-fold ``F[:, 0]``.
    """
    kind, n = parse_symmetry(symbol)
    cyclic = [_rz(2.0 * np.pi * k / n) for k in range(n)]
    elements = list(cyclic)
    if kind == "D":
        flip = np.diag([1.0, -1.0, -1.0])  # Rx(180)
        elements += [flip @ g for g in cyclic]
    group = np.stack(elements)
    group[np.abs(group) < 1e-15] = 0.0
    if frame is not None:
        f = _as_frame(frame)
        group = np.einsum("ij,gjk,lk->gil", f, group, f)
    return group


def _check_group(group: ArrayLike) -> NDArray[np.float64]:
    g = np.asarray(group, dtype=np.float64)
    if g.ndim != 3 or g.shape[1:] != (3, 3) or len(g) == 0:
        raise ValueError(f"a group must be rotation matrices (n, 3, 3), got shape {g.shape}")
    return g


def fold_poses(
    rotations: ArrayLike,
    group: ArrayLike,
    reference: ArrayLike | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Fold RELION poses ``A`` (..., 3, 3) onto one representative of ``{A g : g in group}``.

    The representative is the ``A g`` with the smallest angle to ``reference`` (a pose, or
    poses broadcastable with ``rotations``; default the identity); on an exact tie the first
    element of ``group``. Equivalent poses fold to the same matrix, and folding twice changes
    nothing.

    Returns
    -------
    folded : array (..., 3, 3)
        ``A g``.
    index : array (...) int
        Which element of ``group`` was applied (0: the identity when ``group`` comes from
        `point_group`, i.e. the pose is unchanged).
    """
    a = np.asarray(rotations, dtype=np.float64)
    if a.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must have shape (..., 3, 3), got {a.shape}")
    g = _check_group(group)
    m = a if reference is None else np.einsum("...ji,...jk->...ik", np.asarray(reference), a)
    # trace(R^T A g) = cos-like score of the angle between R and A g: the largest is nearest
    score = np.einsum("...ij,gji->...g", m, g)
    index = np.argmax(score - 1e-9 * np.arange(len(g)), axis=-1)  # ties: the first element
    folded = np.einsum("...ij,...jk->...ik", a, g[index])
    return folded, index.astype(np.int64)


def angle_between_rotations_modulo(
    a: ArrayLike, b: ArrayLike, group: ArrayLike
) -> NDArray[np.float64]:
    """``min over g of angle(a, b g)`` in degrees, for poses (..., 3, 3) of a model with the
    symmetry ``group``: 0 for equivalent poses. With the trivial group, the plain angle."""
    ra = np.asarray(a, dtype=np.float64)
    rb = np.asarray(b, dtype=np.float64)
    g = _check_group(group)
    rel = np.einsum("...ji,...jk->...ik", ra, rb)
    best = np.einsum("...ij,gji->...g", rel, g).max(axis=-1)
    return np.rad2deg(np.arccos(np.clip((best - 1.0) / 2.0, -1.0, 1.0)))


def _queries(coordinates: NDArray[np.float64], max_points: int) -> NDArray[np.float64]:
    stride = max(1, int(np.ceil(len(coordinates) / max_points)))
    return coordinates[::stride]


def symmetry_deviation(
    coordinates: ArrayLike, group: ArrayLike, *, max_points: int = 4000
) -> float:
    """How far ``coordinates`` (N, 3; relative to the rotation centre) are from being
    invariant under ``group``: the RMS distance (Å) from each moved node ``g r`` to the nearest
    node, over every ``g`` but the identity (0 for an exactly symmetric model, about the node
    spacing for none). Up to ``max_points`` nodes are moved (an even subsample)."""
    x = np.asarray(coordinates, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3 or len(x) < 2:
        raise ValueError(f"coordinates must be (N >= 2, 3), got {x.shape}")
    g = _check_group(group)
    moved = [gi for gi in g if not np.allclose(gi, np.eye(3), atol=1e-9)]
    if not moved:
        return 0.0
    tree = cKDTree(x)
    q = _queries(x, max_points)
    d2 = [tree.query(q @ gi.T)[0] ** 2 for gi in moved]
    return float(np.sqrt(np.mean(np.concatenate(d2))))


def half_step_deviation(
    coordinates: ArrayLike, symbol: str, frame: ArrayLike | None = None
) -> float:
    """`symmetry_deviation` of ``coordinates`` under the group ``symbol`` (in ``frame``) turned
    by half its n-fold step about the n-fold axis (``g Rz(180/n)``: rotations of the same
    kinds that are no symmetry): the deviation of an asymmetric arrangement, which a
    pseudo-symmetric model's own group clearly beats (7PBL, near-C6: 3.9 Å vs 5.5 Å), and an
    asymmetric model's does not (adenylate kinase, C5: 5.3 Å vs 4.9 Å)."""
    _, n = parse_symmetry(symbol)
    f = np.eye(3) if frame is None else _as_frame(frame)
    turn = f @ _rz(np.pi / n) @ f.T
    turned = np.einsum("gij,jk->gik", point_group(symbol, f), turn)
    return symmetry_deviation(coordinates, turned)


def node_spacing(coordinates: ArrayLike) -> float:
    """Median distance (Å) from a node to its nearest other node."""
    x = np.asarray(coordinates, dtype=np.float64)
    d, _ = cKDTree(x).query(_queries(x, 4000), k=2)
    return float(np.median(d[:, 1]))


def _perpendicular_basis(axis: NDArray[np.float64]) -> NDArray[np.float64]:
    """A rotation matrix whose third column is ``axis`` (unit)."""
    z = axis / np.linalg.norm(axis)
    helper = np.eye(3)[int(np.argmin(np.abs(z)))]
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


def find_symmetry_frame(coordinates: ArrayLike, symbol: str) -> tuple[NDArray[np.float64], float]:
    """The frame F (see `point_group`) in which ``coordinates`` (N, 3; relative to the
    rotation centre) are closest to having the symmetry ``symbol``, and that deviation (Å,
    `symmetry_deviation`).

    The n-fold axis is taken among the three principal axes of the nodes (a pseudo-symmetric
    complex has its axis there); for Dn the 2-fold axis is scanned in the perpendicular plane
    (1° steps, then 0.1°). The identity frame (RELION's convention) is kept when it does as well.
    """
    kind, n = parse_symmetry(symbol)
    x = np.asarray(coordinates, dtype=np.float64)
    candidates = [np.eye(3)]
    _, vectors = np.linalg.eigh(x.T @ x)
    candidates += [_perpendicular_basis(vectors[:, j]) for j in range(3)]
    best_frame, best = np.eye(3), np.inf
    for frame in candidates:
        if kind == "D":
            frame = _best_two_fold(x, frame, n)
        deviation = symmetry_deviation(x, point_group(symbol, frame))
        if deviation < best - 1e-9:
            best_frame, best = frame, deviation
    return best_frame, best


def _best_two_fold(
    x: NDArray[np.float64], frame: NDArray[np.float64], n: int
) -> NDArray[np.float64]:
    """Rotate ``frame`` about its z axis so that its x axis is the best 2-fold axis."""

    def turned(phi_degrees: float) -> NDArray[np.float64]:
        return frame @ _rz(np.deg2rad(phi_degrees))

    def score(phi_degrees: float) -> float:
        f = turned(phi_degrees)
        flip = f @ np.diag([1.0, -1.0, -1.0]) @ f.T
        return symmetry_deviation(x, flip[None], max_points=1000)

    span = 180.0 / n  # the n 2-fold axes of Dn are 180/n degrees apart
    coarse = np.arange(0.0, span, 1.0)
    phi = float(coarse[int(np.argmin([score(p) for p in coarse]))])
    fine = phi + np.arange(-1.0, 1.0001, 0.1)
    phi = float(fine[int(np.argmin([score(p) for p in fine]))])
    return turned(phi)
