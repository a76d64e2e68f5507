"""Elastic network: node pairs within a cutoff (KD-tree), relative cutoffs, connectivity."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..errors import InputError

__all__ = ["check_connected", "connecting_cutoff", "contact_pairs", "relative_cutoff"]


def relative_cutoff(coordinates: NDArray[np.float64], *, percentile: float = 95.0) -> float:
    """The ``percentile`` of the distances (Å) from each node to its 3 nearest neighbours."""
    if not 0 < percentile <= 100:
        raise InputError(f"cutoff percentile must be in (0, 100], got {percentile}")
    k = min(4, len(coordinates))
    dist, _ = cKDTree(coordinates).query(coordinates, k=k)
    return float(np.percentile(dist[:, 1:], percentile))


def contact_pairs(coordinates: NDArray[np.float64], cutoff_angstrom: float) -> NDArray[np.int64]:
    """All pairs (P, 2) with i < j closer than ``cutoff_angstrom``."""
    if cutoff_angstrom <= 0:
        raise InputError(f"cutoff must be > 0 Å, got {cutoff_angstrom}")
    pairs = cKDTree(coordinates).query_pairs(cutoff_angstrom, output_type="ndarray")
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def check_connected(n_nodes: int, pairs: NDArray[np.int64], cutoff_angstrom: float) -> None:
    """Raise `InputError` when the network falls apart into several pieces."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_nodes, n_nodes))
    n_parts, labels = connected_components(graph, directed=False)
    if n_parts > 1:
        sizes = np.bincount(labels)
        raise InputError(
            f"the elastic network is disconnected at a cutoff of {cutoff_angstrom:.2f} Å "
            f"({n_parts} pieces, the smallest with {sizes.min()} node(s)); "
            "use a larger --cutoff"
        )


def connecting_cutoff(coordinates: NDArray[np.float64], start_angstrom: float) -> float:
    """The smallest cutoff >= ``start_angstrom`` that joins all nodes into one network.

    The longest edge of the Euclidean minimum spanning tree (found on the KD-tree graph,
    whose radius doubles until it is connected), nudged up by 0.1 %.
    """
    from scipy.sparse.csgraph import minimum_spanning_tree

    n = len(coordinates)
    tree = cKDTree(coordinates)
    radius = max(start_angstrom, 1e-3)
    while True:
        graph = tree.sparse_distance_matrix(tree, radius, output_type="coo_matrix")
        if connected_components(graph, directed=False)[0] == 1 or n < 2:
            break
        radius *= 2
    longest = float(minimum_spanning_tree(graph).max()) if n > 1 else 0.0
    return max(start_angstrom, longest * 1.001)
