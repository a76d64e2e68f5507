"""Errors against the simulator's ground truth (``_dhnTrue…`` columns), as every report uses.

For a table with estimated poses and ``dhnAmplitude<m>`` columns: the angle between estimated
and true rotations (median and 90th percentile, degrees), the distance between estimated and
true origins (median, pixels), and per mode the Pearson correlation and the mean absolute
error divided by the simulated range. Grouped by ``dhnSource`` (hemnma / network) on request.
With ``symmetry`` (a Cn/Dn symbol in RELION's frame, or the group's matrices in the model's
frame, e.g. from `symmetry.find_symmetry_frame`), angles are modulo the group: a pose on a
symmetry-equivalent orientation of a (pseudo-)symmetric complex scores 0. `frame_offset`
separates a global rotation of all poses (a reference in another frame) from the per-particle
errors.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .conventions import angle_between_rotations_degrees, euler_to_matrix
from .errors import InputError
from .particles import ParticleTable
from .symmetry import angle_between_rotations_modulo, point_group

__all__ = ["frame_offset", "ground_truth_errors"]


def ground_truth_errors(
    table: ParticleTable,
    *,
    by_source: bool = False,
    symmetry: str | ArrayLike | None = None,
) -> dict[str, dict[str, float]]:
    """``{group: {"n", "angle_median", "angle_p90", "shift_px", "r<m>", "mae<m>"}}``; the group
    is ``"all"`` unless ``by_source``.

    ``symmetry``: ``"C5"``, ``"D2"``... (axes of RELION's convention: n-fold along z, Dn 2-fold
    along x) or rotation matrices (n, 3, 3) of the group in the model's frame; the angles are
    then ``min over g of angle(estimated, true g)``. Amplitudes are compared as they are."""
    needed = [f"dhnTrueAngle{a}" for a in ("Rot", "Tilt", "Psi")]
    needed += ["dhnTrueOriginXAngst", "dhnTrueOriginYAngst"]
    missing = [k for k in needed if k not in table.extra]
    if missing or table.rotation_matrices is None:
        raise InputError("no ground truth (_dhnTrue… columns) or no estimated poses to compare")
    truth = euler_to_matrix(np.stack([np.asarray(table.extra[k], dtype=float)
                                      for k in needed[:3]], axis=1))  # fmt: skip
    if symmetry is None:
        angles = angle_between_rotations_degrees(table.rotation_matrices, truth)
    else:
        group = point_group(symmetry) if isinstance(symmetry, str) else symmetry
        angles = angle_between_rotations_modulo(table.rotation_matrices, truth, group)
    origin = np.stack([np.asarray(table.extra[k], dtype=float) for k in needed[3:]], axis=1)
    shift = np.linalg.norm(table.shifts_angstrom - origin, axis=1) / table.pixel_size_angstrom
    modes = sorted(int(m.group(1)) for k in table.extra
                   if (m := re.fullmatch(r"dhnAmplitude(\d+)", k)))  # fmt: skip
    source = np.full(len(table), "all", dtype=object)
    if by_source and "dhnSource" in table.extra:
        source = np.asarray(table.extra["dhnSource"]).astype(str).astype(object)
    out: dict[str, dict[str, float]] = {}
    for name in sorted(set(source.tolist())):
        sel = source == name
        row = {
            "n": float(sel.sum()),
            "angle_median": float(np.median(angles[sel])),
            "angle_p90": float(np.percentile(angles[sel], 90)),
            "shift_px": float(np.median(shift[sel])),
        }
        for mode in modes:
            key = f"dhnTrueAmplitude{mode}"
            if key not in table.extra:
                continue
            est = np.asarray(table.extra[f"dhnAmplitude{mode}"], dtype=float)[sel]
            true = np.asarray(table.extra[key], dtype=float)[sel]
            row[f"r{mode}"] = float(np.corrcoef(est, true)[0, 1]) if sel.sum() > 1 else float("nan")
            spread = float(np.ptp(true)) if sel.any() else 0.0
            row[f"mae{mode}"] = (
                float(np.mean(np.abs(est - true)) / spread) if spread else float("nan")
            )
        out[name] = row
    return out


def frame_offset(
    found: ArrayLike, true: ArrayLike, *, keep: float = 0.7, passes: int = 3
) -> tuple[float, NDArray[np.float64]]:
    """The global rotation ``G`` that best maps the true poses on the found ones, and the
    errors left once it is taken out.

    A reference in another frame than the simulator's (e.g. a model fitted into a map and
    superposed back) turns every found pose by the same ``G``: ``A_found ~ A_true G``. ``G`` is
    the chordal mean of ``A_true^T A_found`` (the rotation nearest their sum), over the best
    ``keep`` fraction of the particles, re-estimated ``passes`` times (a few particles on wrong
    poses do not pull it).

    Parameters
    ----------
    found, true : arrays (n, 3, 3)
        Found and true rotation matrices (RELION's convention).

    Returns
    -------
    angle : float
        The rotation angle of ``G``, degrees.
    left : array (n,)
        Each particle's angle (°) between ``A_found`` and ``A_true G``.
    """
    a = np.asarray(found, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if a.shape != t.shape or a.ndim != 3 or a.shape[1:] != (3, 3) or not len(a):
        raise InputError(f"frame_offset needs two (n, 3, 3) arrays, got {a.shape} and {t.shape}")
    if not 0 < keep <= 1 or passes < 1:
        raise InputError(f"keep must be in (0, 1] and passes >= 1, got {keep}, {passes}")
    chosen = np.ones(len(a), dtype=bool)
    g = np.eye(3)
    for _ in range(passes):
        u, _, vt = np.linalg.svd(np.einsum("nji,njk->ik", t[chosen], a[chosen]))
        g = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
        left = np.asarray(angle_between_rotations_degrees(a, t @ g))
        chosen = left <= np.percentile(left, 100 * keep)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(g) - 1) / 2, -1.0, 1.0))))
    return angle, left
