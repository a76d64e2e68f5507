"""Errors against the simulator's ground truth (``_dhnTrue…`` columns), as every report uses.

For a table with estimated poses and ``dhnAmplitude<m>`` columns: the angle between estimated
and true rotations (median and 90th percentile, degrees), the distance between estimated and
true origins (median, pixels), and per mode the Pearson correlation and the mean absolute
error divided by the simulated range. Grouped by ``dhnSource`` (hemnma / network) on request.
With ``symmetry`` (a Cn/Dn symbol in RELION's frame, or the group's matrices in the model's
frame, e.g. from `symmetry.find_symmetry_frame`), angles are modulo the group: a pose on a
symmetry-equivalent orientation of a (pseudo-)symmetric complex scores 0.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import ArrayLike

from .conventions import angle_between_rotations_degrees, euler_to_matrix
from .errors import InputError
from .particles import ParticleTable
from .symmetry import angle_between_rotations_modulo, point_group

__all__ = ["ground_truth_errors"]


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
