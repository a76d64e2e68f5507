"""The anisotropic network model (Tirion) Hessian, assembled sparse and vectorised."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import coo_matrix, csr_matrix

__all__ = ["anm_hessian"]


def anm_hessian(
    coordinates: NDArray[np.float64],
    pairs: NDArray[np.int64],
    *,
    spring_constant: float = 1.0,
) -> csr_matrix:
    """Sparse 3N x 3N Hessian of equal springs on ``pairs`` (P, 2).

    Off-diagonal block (i, j) = -k d d^T / |d|^2 with d = r_j - r_i; diagonal blocks are minus
    the sum of their row's off-diagonal blocks (so rigid motions have zero energy).
    """
    n = coordinates.shape[0]
    i, j = pairs[:, 0], pairs[:, 1]
    d = coordinates[j] - coordinates[i]
    block = (
        -spring_constant
        * np.einsum("pa,pb->pab", d, d)
        / np.einsum("pa,pa->p", d, d)[:, None, None]
    )  # (P, 3, 3)
    a = np.arange(3)
    ra, cb = np.meshgrid(a, a, indexing="ij")
    rows_off = (3 * i[:, None, None] + ra).ravel(), (3 * j[:, None, None] + ra).ravel()
    cols_off = (3 * j[:, None, None] + cb).ravel(), (3 * i[:, None, None] + cb).ravel()
    flat = block.reshape(-1)
    rows = np.concatenate([rows_off[0], rows_off[1], rows_off[0], rows_off[1]])
    cols = np.concatenate(
        [
            cols_off[0],
            cols_off[1],
            (3 * i[:, None, None] + cb).ravel(),
            (3 * j[:, None, None] + cb).ravel(),
        ]
    )
    data = np.concatenate([flat, flat, -flat, -flat])
    return coo_matrix((data, (rows, cols)), shape=(3 * n, 3 * n)).tocsr()
