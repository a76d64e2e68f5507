"""The one internal pose convention of deephemnma_bridge, and conversions to the hosts'.

Internal convention (RELION's, ``../shared/docs/INTEROP.md`` sections 0 and 2):

* A rotation is the 3x3 matrix ``A`` of RELION's ``Euler_angles2matrix``: it **rotates the
  model**, a point ``r`` of the reference goes to ``r' = A r`` (column vectors), and the rotated
  model is projected along +z. ``A = Rz(-psi) Ry(-tilt) Rz(-rot)`` for ZYZ Euler angles
  ``(rot, tilt, psi)`` in degrees.
* A shift is RELION's origin ``o = (rlnOriginXAngst, rlnOriginYAngst)`` in Å: the observed image
  is the projection translated by **minus** the origin, ``I(x) = P(x + o)``.
* Image indices are 0-based (RELION's ``N@stack`` is 1-based; cryoSPARC's ``blob/idx`` 0-based).
* Quaternions are ``(w, x, y, z)`` of the same rotation ``A``, unit norm, canonical sign:
  ``w >= 0``, and when ``w == 0`` the first nonzero of ``x, y, z`` is positive.

cryoSPARC's ``alignments3D/pose`` is a right-handed axis-angle vector (radians) whose
Rodrigues matrix ``R_cs`` is the transpose of ``A``: ``A = R_cs.T``. Its
``alignments3D/shift`` has the same sign as RELION's origin, in pixels of
``alignments3D/psize_A``.

Example
-------
>>> import numpy as np
>>> A = euler_to_matrix(np.array([10.0, 20.0, 30.0]))
>>> np.allclose(matrix_to_euler(A), [10.0, 20.0, 30.0])
True
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial.transform import Rotation

__all__ = [
    "angle_between_rotations_degrees",
    "canonical_quaternion",
    "euler_to_matrix",
    "format_image_name",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "matrix_to_rotvec",
    "normalise_stack_name",
    "parse_image_name",
    "quaternion_to_matrix",
    "rotvec_to_matrix",
]

_FLT_EPSILON = float(np.finfo(np.float32).eps)


def _as_rotations(matrices: ArrayLike) -> NDArray[np.float64]:
    a = np.asarray(matrices, dtype=np.float64)
    if a.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must have shape (..., 3, 3), got {a.shape}")
    return a


def euler_to_matrix(angles_degrees: ArrayLike) -> NDArray[np.float64]:
    """RELION's ``Euler_angles2matrix``.

    Parameters
    ----------
    angles_degrees : array (..., 3)
        ``(rot, tilt, psi)`` in degrees, ZYZ.

    Returns
    -------
    array (..., 3, 3)
        Matrices ``A`` that left-multiply column vectors of model coordinates.
    """
    ang = np.deg2rad(np.asarray(angles_degrees, dtype=np.float64))
    if ang.shape[-1:] != (3,):
        raise ValueError(f"Euler angles must have shape (..., 3), got {ang.shape}")
    ca, cb, cg = np.cos(ang[..., 0]), np.cos(ang[..., 1]), np.cos(ang[..., 2])
    sa, sb, sg = np.sin(ang[..., 0]), np.sin(ang[..., 1]), np.sin(ang[..., 2])
    cc, cs = cb * ca, cb * sa
    a = np.empty((*ang.shape[:-1], 3, 3))
    a[..., 0, 0] = cg * cc - sg * sa
    a[..., 0, 1] = cg * cs + sg * ca
    a[..., 0, 2] = -cg * sb
    a[..., 1, 0] = -sg * cc - cg * sa
    a[..., 1, 1] = -sg * cs + cg * ca
    a[..., 1, 2] = sg * sb
    a[..., 2, 0] = sb * ca
    a[..., 2, 1] = sb * sa
    a[..., 2, 2] = cb
    return a


def matrix_to_euler(matrices: ArrayLike) -> NDArray[np.float64]:
    """RELION's ``Euler_matrix2angles``, vectorised.

    Parameters
    ----------
    matrices : array (..., 3, 3)
        RELION matrices ``A``.

    Returns
    -------
    array (..., 3)
        ``(rot, tilt, psi)`` in degrees with tilt in [0, 180] and rot, psi in (-180, 180].
        At tilt 0 or 180 (gimbal lock) rot is 0 and the whole in-plane angle goes to psi,
        as RELION does.
    """
    a = _as_rotations(matrices)
    abs_sb = np.sqrt(a[..., 0, 2] ** 2 + a[..., 1, 2] ** 2)
    regular = abs_sb > 16 * _FLT_EPSILON
    gamma = np.arctan2(a[..., 1, 2], -a[..., 0, 2])
    alpha = np.arctan2(a[..., 2, 1], a[..., 2, 0])
    sin_g = np.sin(gamma)
    cos_g = np.cos(gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        sign_small = np.sign(-a[..., 0, 2] / np.where(cos_g == 0, 1.0, cos_g))
    sign_large = np.where(sin_g > 0, np.sign(a[..., 1, 2]), -np.sign(a[..., 1, 2]))
    sign_sb = np.where(np.abs(sin_g) < _FLT_EPSILON, sign_small, sign_large)
    beta = np.arctan2(sign_sb * abs_sb, a[..., 2, 2])
    # gimbal lock: tilt 0 or 180
    up = a[..., 2, 2] > 0
    gamma_lock = np.where(
        up, np.arctan2(-a[..., 1, 0], a[..., 0, 0]), np.arctan2(a[..., 1, 0], -a[..., 0, 0])
    )
    beta_lock = np.where(up, 0.0, np.pi)
    alpha = np.where(regular, alpha, 0.0)
    beta = np.where(regular, beta, beta_lock)
    gamma = np.where(regular, gamma, gamma_lock)
    out = np.rad2deg(np.stack([alpha, beta, gamma], axis=-1))
    # map -180 to 180 so that the range is (-180, 180]
    out[..., 0] = np.where(out[..., 0] <= -180.0, out[..., 0] + 360.0, out[..., 0])
    out[..., 2] = np.where(out[..., 2] <= -180.0, out[..., 2] + 360.0, out[..., 2])
    return out


def rotvec_to_matrix(rotvec_radians: ArrayLike) -> NDArray[np.float64]:
    """cryoSPARC ``alignments3D/pose`` (axis-angle, radians) to the RELION matrix ``A``.

    Parameters
    ----------
    rotvec_radians : array (..., 3)

    Returns
    -------
    array (..., 3, 3)
        ``A = R_cs.T`` where ``R_cs`` is the Rodrigues matrix of the pose.
    """
    v = np.asarray(rotvec_radians, dtype=np.float64)
    if v.shape[-1:] != (3,):
        raise ValueError(f"rotation vectors must have shape (..., 3), got {v.shape}")
    flat = v.reshape(-1, 3)
    r = Rotation.from_rotvec(flat).as_matrix().transpose(0, 2, 1)
    return r.reshape((*v.shape[:-1], 3, 3))


def matrix_to_rotvec(matrices: ArrayLike) -> NDArray[np.float64]:
    """RELION matrix ``A`` to a cryoSPARC pose vector (radians), inverse of `rotvec_to_matrix`."""
    a = _as_rotations(matrices)
    flat = a.reshape(-1, 3, 3).transpose(0, 2, 1)
    v = Rotation.from_matrix(flat).as_rotvec()
    return v.reshape((*a.shape[:-2], 3))


def canonical_quaternion(q: ArrayLike) -> NDArray[np.float64]:
    """Normalise quaternions ``(..., 4)`` = (w, x, y, z) and fix their sign.

    ``w >= 0``; when ``w == 0`` the first nonzero of ``x, y, z`` is made positive, so that
    ``q`` and ``-q`` (the same rotation) map to one representative.
    """
    qa = np.asarray(q, dtype=np.float64)
    if qa.shape[-1:] != (4,):
        raise ValueError(f"quaternions must have shape (..., 4), got {qa.shape}")
    norm = np.linalg.norm(qa, axis=-1, keepdims=True)
    if np.any(norm == 0) or not np.all(np.isfinite(norm)):
        raise ValueError("quaternions must be finite and nonzero")
    qa = qa / norm
    tol = 1e-12
    # first component (in w, x, y, z order) whose magnitude exceeds tol decides the sign
    significant = np.abs(qa) > tol
    first = np.argmax(significant, axis=-1)
    lead = np.take_along_axis(qa, first[..., None], axis=-1)
    sign = np.where(lead < 0, -1.0, 1.0)
    return qa * sign


def matrix_to_quaternion(matrices: ArrayLike) -> NDArray[np.float64]:
    """RELION matrices ``(..., 3, 3)`` to canonical unit quaternions ``(..., 4)`` = (w, x, y, z).

    The quaternion is that of ``A`` itself (``q r q* = A r``).
    """
    a = _as_rotations(matrices)
    xyzw = Rotation.from_matrix(a.reshape(-1, 3, 3)).as_quat()
    wxyz = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    return canonical_quaternion(wxyz).reshape((*a.shape[:-2], 4))


def quaternion_to_matrix(q: ArrayLike) -> NDArray[np.float64]:
    """Quaternions ``(..., 4)`` = (w, x, y, z), any norm and sign, to matrices ``(..., 3, 3)``."""
    qa = canonical_quaternion(q)
    flat = qa.reshape(-1, 4)
    xyzw = np.concatenate([flat[:, 1:], flat[:, :1]], axis=1)
    return Rotation.from_quat(xyzw).as_matrix().reshape((*qa.shape[:-1], 3, 3))


def angle_between_rotations_degrees(a: ArrayLike, b: ArrayLike) -> NDArray[np.float64]:
    """Geodesic angle in degrees between rotation matrices ``a`` and ``b`` (..., 3, 3)."""
    ra, rb = _as_rotations(a), _as_rotations(b)
    rel = np.einsum("...ji,...jk->...ik", ra, rb)
    cos = (np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


_IMAGE_NAME = re.compile(r"^\s*(\d+)@(.+?)\s*$")


def parse_image_name(name: str) -> tuple[int, str]:
    """Split RELION's ``N@path`` into a 0-based index and the path.

    Any zero padding is accepted (``1@``, ``000001@``, ``00000001@``).

    Raises
    ------
    ValueError
        When ``name`` is not of the form ``N@path`` with ``N >= 1``.
    """
    m = _IMAGE_NAME.match(name)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"not a RELION image name of the form N@stack (N >= 1): {name!r}")
    return int(m.group(1)) - 1, m.group(2)


def format_image_name(index0: int, path: str, *, digits: int = 6) -> str:
    """Compose RELION's ``N@path`` from a 0-based index (6 digits as RELION <= 4.0 writes)."""
    if index0 < 0:
        raise ValueError(f"image index must be >= 0, got {index0}")
    return f"{index0 + 1:0{digits}d}@{path}"


_CS_UID_PREFIX = re.compile(r"^[0-9]{21}_")


def normalise_stack_name(path: str) -> str:
    """Key a stack path the same way in RELION and cryoSPARC files (INTEROP.md 6.1).

    Basename, a leading 21-digit cryoSPARC import uid and ``_`` removed, ``.mrc`` / ``.mrcs``
    removed, leading ``>`` removed.
    """
    p = path.strip().lstrip(">")
    base = p.replace("\\", "/").rsplit("/", 1)[-1]
    base = _CS_UID_PREFIX.sub("", base)
    for ext in (".mrcs", ".mrc"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return base
