"""The conformational space: PCA of mode amplitudes, groups of particles, selections.

PCA (scikit-learn) maps the amplitudes (n, M) to 2 or 3 coordinates; each axis's sign is fixed
so that its largest-magnitude loading is positive (deterministic), and the fitted space is
saved (mean, components) so that new particles project into the same space.

Groups (labels >= 1; 0 = in no group):

* ``bins``: quasi-uniform bins along PC1 (the paper's rule): the PC1 range (optionally
  without ``exclude_tails`` of the particles at each end) is cut into equal-width bins, and
  neighbouring bins are merged until every bin holds at least ``min_count`` particles;
* ``kmeans`` / ``gmm``: clusters of the PC coordinates (scikit-learn, seeded);
* selections by a box, a polygon (PC1-PC2) or an expression on the PC coordinates and
  amplitudes (``PC1 > 0 and A7 < 10``) give one extra subset.

Example
-------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> amps = rng.normal(size=(500, 3)) * [5, 2, 1]
>>> space = ConformationalSpace.fit(amps, [7, 8, 9], n_components=2)
>>> groups = bins_along(space.transform(amps)[:, 0], min_count=100)
>>> int(groups.min()) >= 1 and np.bincount(groups)[1:].min() >= 100
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from .errors import InputError
from .fileutils import atomic_path

__all__ = [
    "ConformationalSpace",
    "bins_along",
    "clusters",
    "select_box",
    "select_expression",
    "select_polygon",
]


@dataclass(frozen=True, eq=False)
class ConformationalSpace:
    """A fitted PCA of amplitudes: ``coords = (amplitudes - mean) @ components.T``."""

    mean: NDArray[np.float64]  # (M,)
    components: NDArray[np.float64]  # (k, M), unit rows
    explained_variance_ratio: NDArray[np.float64]  # (k,)
    std: NDArray[np.float64]  # (k,) standard deviation along each axis
    mode_numbers: tuple[int, ...]

    @classmethod
    def fit(
        cls, amplitudes: NDArray[np.floating], mode_numbers: list[int], n_components: int = 2
    ) -> ConformationalSpace:
        """PCA of finite rows; ``n_components`` is capped at the number of modes."""
        from sklearn.decomposition import PCA

        x = np.asarray(amplitudes, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(mode_numbers):
            raise InputError(f"amplitudes must be (n, {len(mode_numbers)}), got {x.shape}")
        finite = np.all(np.isfinite(x), axis=1)
        k = min(n_components, x.shape[1])
        if finite.sum() < k + 1:
            raise InputError(f"PCA needs more than {k} particles with amplitudes")
        pca = PCA(n_components=k, svd_solver="full").fit(x[finite])
        comps = pca.components_.copy()
        biggest = comps[np.arange(k), np.argmax(np.abs(comps), axis=1)]
        comps *= np.where(biggest < 0, -1.0, 1.0)[:, None]
        return cls(
            mean=pca.mean_.astype(np.float64),
            components=comps,
            explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float64),
            std=np.sqrt(pca.explained_variance_).astype(np.float64),
            mode_numbers=tuple(int(m) for m in mode_numbers),
        )

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, amplitudes: NDArray[np.floating]) -> NDArray[np.float64]:
        """PC coordinates (n, k) of amplitudes (n, M)."""
        x = np.asarray(amplitudes, dtype=np.float64)
        coords: NDArray[np.float64] = (x - self.mean) @ self.components.T
        return coords

    def amplitudes_at(self, coords: NDArray[np.floating]) -> NDArray[np.float64]:
        """Amplitudes (n, M) at PC coordinates (n, k) (the back-projection)."""
        out: NDArray[np.float64] = self.mean + np.asarray(coords) @ self.components
        return out

    def save(self, path: str | Path) -> None:
        meta = json.dumps({"mode_numbers": list(self.mode_numbers)})
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                mean=self.mean,
                components=self.components,
                std=self.std,
                explained_variance_ratio=self.explained_variance_ratio,
                meta=np.array(meta),
            )

    @classmethod
    def load(cls, path: str | Path) -> ConformationalSpace:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such PCA file")
        with np.load(p) as d:
            meta = json.loads(str(d["meta"]))
            return cls(
                d["mean"],
                d["components"],
                d["explained_variance_ratio"],
                d["std"],
                tuple(meta["mode_numbers"]),
            )


def bins_along(
    values: NDArray[np.floating],
    *,
    min_count: int,
    n_bins: int | None = None,
    exclude_tails: float = 0.0,
) -> NDArray[np.int64]:
    """Quasi-uniform bins along one axis, each holding at least ``min_count`` particles.

    Parameters
    ----------
    values : array (n,)
        E.g. PC1 of every particle.
    min_count : int
        Smallest group (the paper used 900 images).
    n_bins : int, optional
        Equal-width bins before merging (default: ``n // min_count``, at least 1).
    exclude_tails : float
        Fraction of particles left out at each end (group 0), e.g. 0.02.

    Returns
    -------
    labels : int array (n,), 1..G in increasing order of ``values``; 0 for excluded.
    """
    v = np.asarray(values, dtype=np.float64)
    if min_count < 1:
        raise InputError(f"the minimum group size must be >= 1, got {min_count}")
    if not 0 <= exclude_tails < 0.5:
        raise InputError(f"excluded tails must be in [0, 0.5), got {exclude_tails}")
    finite = np.isfinite(v)
    lo, hi = np.quantile(v[finite], [exclude_tails, 1 - exclude_tails]) if finite.any() else (0, 0)
    inside = finite & (v >= lo) & (v <= hi)
    if inside.sum() < min_count:
        raise InputError(
            f"only {int(inside.sum())} particles to group, fewer than the minimum group size "
            f"{min_count}; lower --min-count"
        )
    k = n_bins or max(1, int(inside.sum()) // min_count)
    edges = np.linspace(lo, hi, k + 1)
    which = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, k - 1)
    counts = np.bincount(which[inside], minlength=k)
    # merge neighbours, left to right, until each group reaches min_count; a short last group
    # joins the previous one
    group_of_bin = np.zeros(k, dtype=np.int64)
    group, running = 1, 0
    for b in range(k):
        group_of_bin[b] = group
        running += counts[b]
        if running >= min_count and b < k - 1:
            group, running = group + 1, 0
    if running < min_count and group > 1:
        group_of_bin[group_of_bin == group] = group - 1
    labels = np.where(inside, group_of_bin[which], 0)
    return labels.astype(np.int64)


def clusters(
    coords: NDArray[np.floating], *, method: str = "kmeans", k: int = 4, seed: int = 0
) -> NDArray[np.int64]:
    """KMeans or Gaussian-mixture labels 1..k, ordered by the clusters' mean PC1."""
    x = np.asarray(coords, dtype=np.float64)
    if k < 1 or k > len(x):
        raise InputError(f"--n-groups must be between 1 and the number of particles, got {k}")
    if method == "kmeans":
        from sklearn.cluster import KMeans

        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    elif method == "gmm":
        from sklearn.mixture import GaussianMixture

        raw = GaussianMixture(n_components=k, random_state=seed).fit(x).predict(x)
    else:
        raise InputError(f"clustering must be kmeans or gmm, got {method!r}")
    order = np.argsort([x[raw == c, 0].mean() if np.any(raw == c) else np.inf for c in range(k)])
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(1, k + 1)
    return rank[raw]


def select_box(frame: pd.DataFrame, box: dict[str, tuple[float, float]]) -> NDArray[np.bool_]:
    """Rows with ``lo <= frame[column] <= hi`` for every ``column: (lo, hi)``."""
    keep = np.ones(len(frame), dtype=bool)
    for column, (lo, hi) in box.items():
        if column not in frame.columns:
            raise InputError(f"--box: unknown axis {column!r}; use {', '.join(frame.columns)}")
        keep &= (frame[column].to_numpy() >= lo) & (frame[column].to_numpy() <= hi)
    return keep


def select_polygon(
    coords: NDArray[np.floating], vertices: list[tuple[float, float]]
) -> NDArray[np.bool_]:
    """Rows whose (PC1, PC2) lie inside the polygon (matplotlib's point-in-polygon)."""
    from matplotlib.path import Path as PolygonPath

    if len(vertices) < 3:
        raise InputError("--polygon needs at least 3 vertices: x1,y1;x2,y2;x3,y3")
    inside: NDArray[np.bool_] = PolygonPath(vertices).contains_points(np.asarray(coords)[:, :2])
    return inside


def select_expression(frame: pd.DataFrame, expression: str) -> NDArray[np.bool_]:
    """Rows where ``expression`` (pandas ``query`` syntax over PC1.., A<mode>..) holds."""
    try:
        result: Any = frame.eval(expression, engine="python")
    except Exception as exc:  # pandas raises many types for a bad expression
        raise InputError(
            f"--select {expression!r}: cannot evaluate ({exc}); use columns "
            f"{', '.join(frame.columns)}, e.g. 'PC1 > 0 and A7 < 5'"
        ) from exc
    values = np.asarray(result)
    if values.dtype != bool or values.shape != (len(frame),):
        raise InputError(f"--select {expression!r} must give True/False per particle")
    return values
