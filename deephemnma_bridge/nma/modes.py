"""Normal modes of an elastic network: the `NormalModes` result and `compute_normal_modes`.

Conventions (binding for the whole package): modes are numbered from 1, modes 1-6 are the
rigid-body motions (three translations, then three rotations about the centroid), every
vector is unit-norm over the 3N coordinates, and amplitude ``q`` displaces node ``i`` by
``q * u_i`` Å (so the RMS displacement is ``|q| / sqrt(N)``). The sign of each flexible mode
is fixed by a deterministic rule: its largest-magnitude component is positive.

Solvers
-------
``dense``
    LAPACK ``eigh`` on the dense 3N x 3N Hessian, lowest ``n`` eigenpairs only. Small models.
``sparse``
    ARPACK in shift-invert mode around a small negative shift, with a sparse LU factorisation
    of the Hessian (never dense). Exact ANM modes at any size that fits the factorisation.
``rtb``
    Rotation-translation blocks (Tama et al. 2000): the Hessian is projected onto the six
    rigid-body motions of each block of consecutive residues (``P^T H P`` with a sparse P) and
    the small projected problem is solved, then expanded back (``u = P v``).
``auto``
    ``dense`` up to 1,000 nodes, ``sparse`` above.

Example
-------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> xyz = np.cumsum(rng.normal(size=(60, 3)) * 2.2, axis=0)
>>> modes = compute_normal_modes(xyz, n_modes=10, cutoff_angstrom=12.0)
>>> modes.mode_numbers[:7].tolist()
[1, 2, 3, 4, 5, 6, 7]
>>> bool(np.all(np.abs(modes.eigenvalues[:6]) < 1e-6 * modes.eigenvalues[6]))
True
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray
from scipy.sparse.linalg import LinearOperator, eigsh, splu

from ..errors import InputError
from ..fileutils import atomic_path
from .hessian import anm_hessian
from .network import check_connected, connecting_cutoff, contact_pairs, relative_cutoff

__all__ = [
    "DEFAULT_CUTOFF_ANGSTROM",
    "DEFAULT_MIN_COLLECTIVITY",
    "DEFAULT_N_AUTO_MODES",
    "FloppyNetworkError",
    "NormalModes",
    "check_modes_match",
    "collectivity",
    "compute_normal_modes",
    "fix_signs",
    "parse_mode_numbers",
    "rigid_body_basis",
    "rtb_projection",
    "select_collective_modes",
]

Method = Literal["auto", "dense", "sparse", "rtb"]
DENSE_MAX_NODES = 1000
#: Default absolute cutoffs (Å) by node type; pseudoatoms use the relative (percentile) cutoff.
DEFAULT_CUTOFF_ANGSTROM = {"ca": 15.0, "heavy": 8.0}
_FORMAT = "deephemnma-modes/1"
#: ``--use-modes auto``: modes with a collectivity below this are local (a loop, a terminus).
#: Modes 7-20 of 4AKE chain A, 7PBL and 4YVS: the collective ones are 0.23-0.78, the local
#: ones 0.001-0.002 (7PBL modes 7 and 15: one loop) and 0.10-0.14 (4AKE modes 17 and 19).
DEFAULT_MIN_COLLECTIVITY = 0.2
#: ``--use-modes auto``: how many modes are chosen.
DEFAULT_N_AUTO_MODES = 3


class FloppyNetworkError(InputError):
    """The network has more than six zero-energy modes at this cutoff."""


@dataclass(frozen=True, eq=False)
class NormalModes:
    """Lowest normal modes of one elastic network.

    Attributes
    ----------
    coordinates : array (N, 3)
        Node coordinates, Å.
    eigenvalues : array (n,)
        Squared frequencies (spring constant 1), ascending; the first six are ~0.
    vectors : array (n, N, 3)
        Unit-norm mode vectors.
    mode_numbers : array (n,) int
        1-based; 1-6 rigid body.
    collectivity : array (n,)
        Brüschweiler's collectivity in (0, 1].
    settings : dict
        How the modes were computed (cutoff, solver, blocks, model path...), JSON-serialisable.
    atom_coordinates, atom_node, atom_elements : arrays or None
        Optional all-atom model that follows the nodes (``atom_node[i]`` is the node atom ``i``
        moves with, -1 for none): used to render all-atom densities.
    """

    coordinates: NDArray[np.float64]
    eigenvalues: NDArray[np.float64]
    vectors: NDArray[np.float64]
    mode_numbers: NDArray[np.int64]
    collectivity: NDArray[np.float64]
    settings: dict[str, Any] = field(default_factory=dict)
    atom_coordinates: NDArray[np.float64] | None = None
    atom_node: NDArray[np.int64] | None = None
    atom_elements: NDArray[np.str_] | None = None

    def __post_init__(self) -> None:
        n_nodes = self.coordinates.shape[0]
        n = self.eigenvalues.shape[0]
        if self.coordinates.shape != (n_nodes, 3):
            raise ValueError(f"coordinates must be (N, 3), got {self.coordinates.shape}")
        if self.vectors.shape != (n, n_nodes, 3):
            raise ValueError(f"vectors must be ({n}, {n_nodes}, 3), got {self.vectors.shape}")
        if self.mode_numbers.shape != (n,) or self.collectivity.shape != (n,):
            raise ValueError("mode_numbers and collectivity need one value per mode")

    def __len__(self) -> int:
        return int(self.eigenvalues.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.coordinates.shape[0])

    @property
    def rotation_centre(self) -> NDArray[np.float64]:
        """The point poses rotate about (Å): the map's centre for modes of a map
        (``settings["map_centre_angstrom"]``), else the nodes' centroid."""
        centre = self.settings.get("map_centre_angstrom")
        if centre is not None:
            return np.asarray(centre, dtype=np.float64)
        return np.asarray(self.coordinates, dtype=np.float64).mean(axis=0)

    def select(self, mode_numbers: ArrayLike) -> NormalModes:
        """The modes with these 1-based numbers, in the order given."""
        wanted = np.atleast_1d(np.asarray(mode_numbers, dtype=np.int64))
        index = {int(m): k for k, m in enumerate(self.mode_numbers)}
        missing = [int(m) for m in wanted if int(m) not in index]
        if missing:
            raise InputError(
                f"mode(s) {missing} not available: these modes are numbered "
                f"{int(self.mode_numbers.min())}-{int(self.mode_numbers.max())}"
            )
        k = np.array([index[int(m)] for m in wanted], dtype=np.int64)
        return replace(
            self,
            eigenvalues=self.eigenvalues[k],
            vectors=self.vectors[k],
            mode_numbers=self.mode_numbers[k],
            collectivity=self.collectivity[k],
        )

    def save(self, path: str | Path) -> None:
        """Write one ``.npz`` (atomically): arrays under their attribute names + settings JSON."""
        arrays: dict[str, Any] = {
            "coordinates": self.coordinates,
            "eigenvalues": self.eigenvalues,
            "vectors": self.vectors,
            "mode_numbers": self.mode_numbers,
            "collectivity": self.collectivity,
            "settings": np.array(json.dumps({"format": _FORMAT, **self.settings})),
        }
        for name in ("atom_coordinates", "atom_node", "atom_elements"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value) if name != "atom_elements" else value.astype(str)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def fingerprint(self) -> str:
        """``"<nodes>:<radius of gyration, Å>"``: which network the modes belong to, unchanged by
        translation (simulate saves modes centred) and by recomputing the same modes."""
        xyz = np.asarray(self.coordinates, dtype=np.float64)
        rg = float(np.sqrt(((xyz - xyz.mean(axis=0)) ** 2).sum(axis=1).mean()))
        return f"{len(xyz)}:{rg:.3f}"

    @classmethod
    def load(cls, path: str | Path) -> NormalModes:
        """Read a file written by `save` (or any ``.npz`` with the five required arrays)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such modes file")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a modes .npz file ({exc})") from exc
        try:
            return cls._from_npz(path, data)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(
                f"{path}: not a usable modes file ({exc}); write it with `deephemnma modes`"
            ) from None

    @classmethod
    def _from_npz(cls, path: Path, data: Any) -> NormalModes:
        with data:
            required = ("coordinates", "eigenvalues", "vectors", "mode_numbers", "collectivity")
            missing = [k for k in required if k not in data.files]
            if missing:
                raise InputError(
                    f"{path}: missing {', '.join(missing)}; write it with `deephemnma modes`"
                )
            settings = json.loads(str(data["settings"])) if "settings" in data.files else {}
            settings.pop("format", None)
            optional = {
                k: data[k] for k in ("atom_coordinates", "atom_node", "atom_elements") if k in data
            }
            try:
                return cls(
                    coordinates=np.asarray(data["coordinates"], dtype=np.float64),
                    eigenvalues=np.asarray(data["eigenvalues"], dtype=np.float64),
                    vectors=np.asarray(data["vectors"], dtype=np.float64),
                    mode_numbers=np.asarray(data["mode_numbers"], dtype=np.int64),
                    collectivity=np.asarray(data["collectivity"], dtype=np.float64),
                    settings=settings,
                    **optional,
                )
            except ValueError as exc:
                raise InputError(f"{path}: inconsistent modes file ({exc})") from exc


def check_modes_match(modes: NormalModes, recorded: str, modes_path: Any, what: str) -> None:
    """Raise `InputError` when ``recorded`` (a `NormalModes.fingerprint`) is not ``modes``'s.

    Same node count and radii of gyration within 0.05 Å (a few 0.001 Å of rounding) match."""
    ours = modes.fingerprint()
    try:
        n_rec, rg_rec = recorded.split(":")
        same = int(n_rec) == modes.n_nodes and abs(float(rg_rec) - float(ours.split(":")[1])) < 0.05
    except ValueError:
        same = False
    if not same:
        raise InputError(
            f"--modes {modes_path} is not the modes file {what} used (nodes:radius of gyration "
            f"{ours} here, {recorded} there); give the modes file of the same model"
        )


def parse_mode_numbers(text: str) -> list[int]:
    """Mode numbers written as ``7,8,9``, ``7-12`` or ``7-9,12`` (ranges inclusive).

    Raises ``ValueError`` (with what was expected) for anything else, a number below 1 or a
    mode named twice."""
    values: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:
            raise ValueError(f"expected mode numbers like 7,8,9 or 7-12, got {text!r}") from None
        if last < first:
            raise ValueError(f"mode range {part!r} runs backwards in {text!r}")
        values.extend(range(first, last + 1))
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ValueError(f"mode numbers must be distinct and >= 1, got {text!r}")
    return values


def collectivity(
    vectors: NDArray[np.float64], masses: NDArray[np.float64] | None = None
) -> NDArray[np.float64]:
    """Brüschweiler's collectivity ``exp(-sum p_i log p_i) / N`` of modes (n, N, 3)."""
    sq = np.einsum("mna,mna->mn", vectors, vectors)
    if masses is not None:
        sq = sq / masses[None, :]
    p = sq / sq.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return np.exp(entropy) / vectors.shape[1]


def select_collective_modes(
    mode_numbers: ArrayLike,
    collectivity: ArrayLike,
    *,
    n_modes: int = DEFAULT_N_AUTO_MODES,
    min_collectivity: float = DEFAULT_MIN_COLLECTIVITY,
) -> list[int]:
    """The ``n_modes`` lowest flexible modes (numbers > 6) whose collectivity is at least
    ``min_collectivity``, in ascending mode number (= ascending eigenvalue).

    Raises `InputError` when fewer qualify, naming how many did and what to change.

    >>> select_collective_modes([6, 7, 8, 9, 10], [0.8, 0.001, 0.4, 0.7, 0.5], n_modes=2)
    [8, 9]
    """
    numbers = np.asarray(mode_numbers, dtype=np.int64).reshape(-1)
    coll = np.asarray(collectivity, dtype=np.float64).reshape(-1)
    if numbers.shape != coll.shape:
        raise ValueError(
            f"one collectivity per mode needed: {numbers.shape[0]} modes, {coll.shape[0]} values"
        )
    if n_modes < 1:
        raise InputError(f"the number of modes to choose must be >= 1, got {n_modes}")
    if not 0.0 <= min_collectivity <= 1.0:
        raise InputError(f"the collectivity threshold must be in [0, 1], got {min_collectivity}")
    order = np.argsort(numbers, kind="stable")
    numbers, coll = numbers[order], coll[order]
    flexible = numbers > 6
    ok = flexible & np.isfinite(coll) & (coll >= min_collectivity)
    chosen = [int(m) for m in numbers[ok][:n_modes]]
    if len(chosen) < n_modes:
        n_flex = int(flexible.sum())
        raise InputError(
            f"only {len(chosen)} of the {n_flex} flexible modes "
            f"({', '.join(str(int(m)) for m in numbers[flexible]) or 'none'}) have a "
            f"collectivity >= {min_collectivity:g}, {n_modes} were asked: compute more modes "
            "(deephemnma modes --n-modes), lower --min-collectivity or --n-auto-modes, or give "
            "--use-modes explicitly"
        )
    return chosen


def fix_signs(vectors: NDArray[np.float64]) -> NDArray[np.float64]:
    """Flip each mode (n, N, 3) so its largest-magnitude component (first on ties) is > 0."""
    flat = vectors.reshape(len(vectors), -1)
    biggest = flat[np.arange(len(flat)), np.argmax(np.abs(flat), axis=1)]
    signs = np.where(biggest < 0, -1.0, 1.0)
    return vectors * signs[:, None, None]


def rigid_body_basis(coordinates: NDArray[np.float64]) -> NDArray[np.float64]:
    """Orthonormal (6, N, 3): x, y, z translations then rotations about x, y, z (centroid)."""
    n = coordinates.shape[0]
    r = coordinates - coordinates.mean(axis=0)
    basis = np.zeros((6, n, 3))
    for a in range(3):
        basis[a, :, a] = 1.0
        axis = np.zeros(3)
        axis[a] = 1.0
        basis[3 + a] = np.cross(axis, r)
    flat = basis.reshape(6, -1)
    # Gram-Schmidt in this order keeps translations first; rotations made orthogonal to them
    q = np.zeros_like(flat)
    k = 0
    for v in flat:
        w = v - q[:k].T @ (q[:k] @ v)
        norm = float(np.linalg.norm(w))
        if norm > 1e-8 * max(1.0, float(np.linalg.norm(v))):
            q[k] = w / norm
            k += 1
    return q[:k].reshape(k, n, 3)


def rtb_projection(coordinates: NDArray[np.float64], blocks: NDArray[np.int64]) -> sp.csr_matrix:
    """Sparse P (3N, <=6B): orthonormal rigid-body motions of every block (columns).

    Blocks of one node contribute 3 translations, of two collinear nodes 5 motions (the
    rank-revealing SVD drops the null rotation).
    """
    n = coordinates.shape[0]
    if blocks.shape != (n,):
        raise InputError(f"blocks must give one block id per node ({n}), got {blocks.shape}")
    order = np.argsort(blocks, kind="stable")
    sorted_blocks = blocks[order]
    starts = np.flatnonzero(np.r_[True, sorted_blocks[1:] != sorted_blocks[:-1]])
    ends = np.r_[starts[1:], n]
    rows: list[NDArray[np.int64]] = []
    cols: list[NDArray[np.int64]] = []
    vals: list[NDArray[np.float64]] = []
    col = 0
    eye = np.eye(3)
    for s, e in zip(starts, ends):
        nodes = order[s:e]
        r = coordinates[nodes] - coordinates[nodes].mean(axis=0)
        m = len(nodes)
        local = np.empty((m, 3, 6))
        local[:, :, :3] = eye[None]
        # rotation about axis a: a x r
        local[:, :, 3] = np.stack([np.zeros(m), -r[:, 2], r[:, 1]], axis=1)
        local[:, :, 4] = np.stack([r[:, 2], np.zeros(m), -r[:, 0]], axis=1)
        local[:, :, 5] = np.stack([-r[:, 1], r[:, 0], np.zeros(m)], axis=1)
        u, s_vals, _ = np.linalg.svd(local.reshape(3 * m, 6), full_matrices=False)
        rank = int(np.sum(s_vals > 1e-6 * s_vals[0]))
        u = u[:, :rank]
        dof = (3 * nodes[:, None] + np.arange(3)).reshape(-1)
        rows.append(np.repeat(dof, rank))
        cols.append(np.tile(np.arange(col, col + rank), 3 * m))
        vals.append(u.reshape(-1))
        col += rank
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(3 * n, col)
    )


def _lowest_eigenpairs(
    matrix: sp.spmatrix,
    k: int,
    rigid: NDArray[np.float64],
    *,
    dense: bool,
    tol: float = 1e-10,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Lowest ``k`` eigenpairs of a symmetric positive semi-definite matrix whose null space
    contains the orthonormal columns of ``rigid`` (size, 6): those come first (eigenvalue =
    Rayleigh quotient, ~0), then the lowest ``k - 6`` of the complement.

    The sparse solver works on the complement explicitly (``Q (K - s)^-1 Q``, Q = 1 - R R^T):
    a six-fold zero eigenvalue is where Lanczos iterations can silently miss a copy.
    """
    size = matrix.shape[0]
    zero = np.einsum("ij,ij->j", rigid, matrix @ rigid)
    if dense or size <= 600:
        values, vectors = scipy.linalg.eigh(
            matrix.toarray(), subset_by_index=[0, k - 1], driver="evr"
        )
        flexible = vectors - rigid @ (rigid.T @ vectors)
        keep = np.argsort(-np.linalg.norm(flexible, axis=0))[: k - 6]
        keep = np.sort(keep)
        return np.r_[zero, values[keep]], np.c_[rigid, vectors[:, keep]]
    scale = float(np.abs(matrix.diagonal()).mean())
    shift = -1e-4 * scale  # K - shift*I is positive definite: an exact, stable factorisation
    lu = splu(
        sp.csc_matrix(matrix - shift * sp.identity(size, format="csc")),
        permc_spec="MMD_AT_PLUS_A",
        diag_pivot_thresh=0.0,
        options={"SymmetricMode": True},
    )

    def project(v: NDArray[np.float64]) -> NDArray[np.float64]:
        return v - rigid @ (rigid.T @ v)

    def apply(v: NDArray[np.float64]) -> NDArray[np.float64]:
        return project(lu.solve(project(np.asarray(v, dtype=np.float64).ravel())))

    op = LinearOperator((size, size), matvec=apply, dtype=np.float64)
    rng = np.random.default_rng(0)  # deterministic start vector
    mu, vectors = eigsh(
        op,
        k=k - 6,
        which="LA",
        v0=project(rng.normal(size=size)),
        tol=tol,
        ncv=min(size - 6, max(2 * (k - 6) + 1, 40)),
    )
    values = shift + 1.0 / mu
    order = np.argsort(values)
    return np.r_[zero, values[order]], np.c_[rigid, vectors[:, order]]


def compute_normal_modes(
    coordinates: ArrayLike,
    *,
    n_modes: int = 20,
    cutoff_angstrom: float | Literal["auto"] | None = None,
    cutoff_percentile: float = 95.0,
    cutoff_floor_angstrom: float = 0.0,
    method: Method = "auto",
    blocks: NDArray[np.int64] | None = None,
    masses: NDArray[np.float64] | None = None,
    settings: dict[str, Any] | None = None,
) -> NormalModes:
    """The lowest ``n_modes`` (including the six rigid-body ones) of the ANM of ``coordinates``.

    Parameters
    ----------
    coordinates : array (N, 3)
        Node positions, Å.
    n_modes : int
        Number of modes, rigid-body ones included (default 20).
    cutoff_angstrom : float or "auto", optional
        Spring cutoff, Å. Default: relative, the ``cutoff_percentile`` of the distances from
        each node to its 3 nearest neighbours. ``"auto"`` (for pseudoatoms of a map, whose
        density varies): the relative cutoff, raised to the smallest that connects every node
        and then by 25 % steps (at most 8) until the network is rigid (six zero modes).
    cutoff_floor_angstrom : float
        With ``"auto"``: never below this (e.g. 15 Å for one node per residue).
    method : {"auto", "dense", "sparse", "rtb"}
        Solver (module docstring). ``rtb`` needs ``blocks``.
    blocks : array (N,) int, optional
        Block id of each node, for RTB (`CoarseGrained.blocks`).
    masses : array (N,), optional
        Node masses: the modes of the mass-weighted Hessian ``M^-1/2 H M^-1/2``, returned in
        Cartesian space and renormalised to unit norm.
    settings : dict, optional
        Extra provenance (model path, chains...) stored with the result.

    Raises
    ------
    InputError
        Fewer than 3 nodes, too many modes asked, a disconnected network, bad options.
    """
    if isinstance(cutoff_angstrom, str):
        if cutoff_angstrom != "auto":
            raise InputError(f"cutoff must be a number of Å or 'auto', got {cutoff_angstrom!r}")
        xyz = np.asarray(coordinates, dtype=np.float64)
        if xyz.ndim != 2 or xyz.shape[0] < 3:
            raise InputError(f"an elastic network needs (N >= 3, 3) coordinates, got {xyz.shape}")
        start = max(relative_cutoff(xyz, percentile=cutoff_percentile), cutoff_floor_angstrom)
        cutoff = connecting_cutoff(xyz, start)
        for attempt in range(9):
            try:
                return compute_normal_modes(
                    xyz, n_modes=n_modes, cutoff_angstrom=cutoff, method=method, blocks=blocks,
                    masses=masses, settings={"cutoff_mode": "auto", **(settings or {})},
                )  # fmt: skip
            except FloppyNetworkError:
                if attempt == 8:
                    raise
                cutoff *= 1.25
    xyz = np.asarray(coordinates, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(f"coordinates must have shape (N, 3), got {xyz.shape}")
    n = xyz.shape[0]
    if n < 3:
        raise InputError(f"an elastic network needs at least 3 nodes, got {n}")
    if not np.all(np.isfinite(xyz)):
        raise InputError("node coordinates contain NaN or infinity")
    if method == "auto":
        method = "dense" if n <= DENSE_MAX_NODES else "sparse"
    if method not in ("dense", "sparse", "rtb"):
        raise InputError(f"method must be auto, dense, sparse or rtb, got {method!r}")
    if method == "rtb" and blocks is None:
        raise InputError("method 'rtb' needs a block id per node (--rtb-block)")
    cutoff = (
        relative_cutoff(xyz, percentile=cutoff_percentile)
        if cutoff_angstrom is None
        else (float(cutoff_angstrom))
    )
    t0 = time.perf_counter()
    pairs = contact_pairs(xyz, cutoff)
    if len(pairs) == 0:
        raise InputError(
            f"no two nodes are closer than the cutoff {cutoff:.2f} Å; use a larger --cutoff"
        )
    check_connected(n, pairs, cutoff)
    hessian = anm_hessian(xyz, pairs)
    if masses is not None:
        masses = np.asarray(masses, dtype=np.float64)
        if masses.shape != (n,) or np.any(masses <= 0):
            raise InputError("masses must be positive, one per node")
        inv_sqrt = sp.diags(np.repeat(1.0 / np.sqrt(masses), 3))
        hessian = inv_sqrt @ hessian @ inv_sqrt
    projection = rtb_projection(xyz, np.asarray(blocks)) if method == "rtb" else None
    size = 3 * n if projection is None else projection.shape[1]
    if n_modes < 7:
        raise InputError(f"--n-modes must be at least 7 (6 rigid-body + 1), got {n_modes}")
    if n_modes > size:
        what = f"{n} nodes" if projection is None else f"{projection.shape[1]} RTB degrees"
        raise InputError(
            f"{n_modes} modes asked but the network has only {size} ({what}); ask fewer modes"
        )
    matrix = hessian if projection is None else (projection.T @ hessian @ projection).tocsr()
    rigid = rigid_body_basis(xyz)
    if len(rigid) < 6:
        raise InputError(
            "all nodes lie on one line: no elastic network can be built; check the model"
        )
    rigid_flat = rigid.reshape(6, -1).T  # (3N, 6), orthonormal
    if masses is not None:  # the null space of M^-1/2 H M^-1/2 is M^1/2 R
        rigid_flat = np.linalg.qr(np.repeat(np.sqrt(masses), 3)[:, None] * rigid_flat)[0]
    if projection is not None:  # rigid motions of the whole are rigid motions of every block
        rigid_flat = np.linalg.qr(projection.T @ rigid_flat)[0]
    values, vecs = _lowest_eigenpairs(matrix, n_modes, rigid_flat, dense=method == "dense")
    if projection is not None:
        vecs = projection @ vecs
    if masses is not None:
        vecs = vecs / np.repeat(np.sqrt(masses), 3)[:, None]
    vecs = vecs / np.linalg.norm(vecs, axis=0, keepdims=True)
    vectors = np.ascontiguousarray(vecs.T).reshape(n_modes, n, 3)
    stiffness = float(np.abs(hessian.diagonal()).mean())
    n_zero = 6 + int(np.sum(values[6:] < 1e-9 * stiffness))
    if n_zero > 6:
        raise FloppyNetworkError(
            f"the elastic network has {n_zero} zero-energy modes where a rigid network has 6: "
            f"the cutoff {cutoff:.2f} Å leaves parts free to move without stretching a spring; "
            "use a larger --cutoff (15 Å is usual for one node per residue)"
        )
    vectors[:6] = rigid  # a canonical basis of the rigid-body subspace
    vectors[6:] = fix_signs(vectors[6:])
    elapsed = time.perf_counter() - t0
    info: dict[str, Any] = {
        "cutoff_angstrom": cutoff,
        "cutoff_percentile": None if cutoff_angstrom is not None else cutoff_percentile,
        "method": method,
        "n_springs": len(pairs),
        "n_nodes": n,
        "mass_weighted": masses is not None,
        "seconds": round(elapsed, 3),
    }
    if projection is not None and blocks is not None:
        info["n_blocks"] = len(np.unique(blocks))
    info.update(settings or {})
    return NormalModes(
        coordinates=xyz,
        eigenvalues=np.asarray(values, dtype=np.float64),
        vectors=vectors,
        mode_numbers=np.arange(1, n_modes + 1, dtype=np.int64),
        collectivity=collectivity(vectors, masses),
        settings=info,
    )
