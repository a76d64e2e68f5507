"""HEMNMA: batched elastic + rigid-body alignment of particle images (torch, CPU or GPU).

For every image, find the mode amplitudes ``q`` (M), the rotation ``A`` and the origin ``o``
(RELION's convention, ``conventions.py``) whose projection of the deformed reference best
matches it. Two stages, each batched over particles:

1. **Global rigid search** (amplitudes 0) at a coarse band (default ``|k| <= 1/10 Å``): a
   library of reference projections on an SO(3) grid (Fibonacci directions x in-plane steps,
   default 10°, ~15,000 references), rendered in Fourier space over the band only; the
   shifts on a grid of ``shift_step_px`` within ``±max_shift_px`` are phase ramps applied to
   the image, so the
   whole search is one matrix product per particle chunk. The ``n_candidates`` best
   orientations (at least ``nms_degrees`` apart) are kept.
2. **Joint local refinement** of (amplitudes, rotation, origin) from every candidate by Adam
   on the negative similarity, through the differentiable forward model: ``iterations[0]``
   steps at ``refine_resolution[0]`` on all candidates, then the best candidate only for
   ``iterations[1]`` steps at ``refine_resolution[1]``. The rotation is ``expm([d]x) A0``.

The template (`ReferenceModel.from_modes`) is by default one Gaussian (sigma 2 Å) per residue
at the centroid of its atoms, weighted by their number, moving with its network node: on
all-atom data this halves the angular error of Cα blobs (measured on the simulator's default
set: 1.15° vs 1.6° median). ``deephemnma align`` renders every atom in the last stage only
(``final_reference``, 25 steps): 0.98° median for 1.5x the cost of residues alone (all-atom
throughout: 0.6° at 5x).

Similarity (documented; the cost written is ``1 - NCC``): the normalised cross-correlation of
the template and the image over the Fourier band, ``NCC = sum w Re(T* X) / sqrt(sum w |T|^2
sum w |X|^2)``, with ``w`` the Hermitian multiplicities of the ``rfft2`` half-plane times a
frequency weight ``|k|^frequency_power`` (default 0: flat; the DC term is excluded, so the
NCC is insensitive to the image mean and scale). With ``ctf="full"`` (default) the template
is multiplied by the particle's CTF; with ``ctf="flip"`` (the reference implementation's
mode) the image is phase-flipped and the template is not CTF-modulated, which roughly
doubles the angular error (METHOD.md section 8).

Pseudo-symmetric references (``symmetry``, `SymmetryCopies`): when the complex is nearly
Cn/Dn-symmetric but its motion is not, a particle can settle on an equivalent pose ``A g`` of its
true pose ``A``, with amplitudes that describe another copy's motion. With a group given, each
particle's best candidate (after the screening steps) is expanded into its |G| equivalent poses
``A g``, each starting from the amplitudes mapped onto that copy (`SymmetryCopies.build`),
refined by the screening steps at the screening band; the one with the highest similarity goes
on through the full refinement. When that is not the candidate's own pose, both are refined in
full and the better final fit is kept (the coarse band can be misled: a particle's cost is never
worse than without the search). Cost: |G| more screening rows per particle and pass, and a
second full refinement for the particles moved.

Every step is per particle: the result of a particle does not depend on the batch it is in
(Adam is element-wise), so sharded runs reproduce single runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from ..conventions import euler_to_matrix
from ..errors import InputError
from ..nma.deform import deform, deform_nonlinear, mode_spins
from .ctf import CTFParams, ctf_2d
from .render import FourierBand, project_positions, render_fourier

__all__ = [
    "AlignmentConfig",
    "AlignmentResult",
    "ReferenceModel",
    "SearchLibrary",
    "SymmetryCopies",
    "align_batch",
    "elastic_grid",
    "mahalanobis_outliers",
    "rotation_grid",
]


@dataclass(frozen=True)
class AlignmentConfig:
    """Settings of `align_batch` (module docstring); every field is a CLI option."""

    search_step_degrees: float = 10.0
    search_resolution_angstrom: float = 10.0
    max_shift_px: float = 6.0
    shift_step_px: float = 2.0
    n_candidates: int = (
        3  # with the elastic search's 2: 4 gave the same results (SNR 0.1, 0.03, 8 Å)
    )
    nms_degrees: float = 15.0
    refine_resolution_angstrom: tuple[float, float] = (7.0, 4.0)
    iterations: tuple[int, int] = (40, 25)
    learning_rates: tuple[float, float, float] = (1.0, 0.01, 0.1)  # q (Å), d (rad), o (Å)
    # amplitude steps in Å of RMS displacement (size-independent), per band; None: use
    # learning_rates[0] in the amplitude unit q (Å·sqrt(N): the cap then shrinks with N)
    amplitude_lr_angstrom: tuple[float, float] | None = (0.25, 0.1)
    # a band is repeated (from where it ended, fresh Adam) for the particles whose amplitudes
    # were still travelling at the band's capacity, at most this many times
    max_rounds: int = 5
    # elastic search: starting poses from references deformed on a grid of amplitudes within
    # this RMS displacement (Å; 0: rigid search only), grid spacing, band, SO(3) step, kept
    elastic_range_angstrom: float = 8.0
    elastic_spacing_angstrom: float = 4.0
    elastic_resolution_angstrom: float = 15.0
    elastic_step_degrees: float = 20.0
    elastic_shift_step_px: float = 3.0
    elastic_candidates: int = 2
    elastic_max_blobs: int = 96  # consecutive residues merged: ~3 per blob for 300 residues
    # candidates screened by this many steps at the first band, then only the best of each
    # particle is refined in full (0: every candidate gets the full round)
    screen_iterations: int = 10
    # ... at this band (Å), with the template merged into at most search_max_blobs blobs (as
    # the rigid search's): picking the best candidate needs no more (4YVS: 3.8x cheaper)
    screen_resolution_angstrom: float = 10.0
    # population search: a second search of each batch with the reference deformed to the
    # centres (k-means) of the amplitudes its best-fitting half found, at the elastic
    # search's settings; a particle keeps the better of both passes (0: off)
    population_centres: int = 0
    search_max_blobs: int = 1500  # rigid library: ~2 residues per blob for big complexes
    amplitude_starts: tuple[float, ...] = (0.0,)
    ctf: Literal["full", "flip"] = "full"
    frequency_power: float = 0.0
    sigma_angstrom: float = 2.0
    fixed_poses: bool = False
    local_poses: bool = False
    search_chunk: int = 16

    def __post_init__(self) -> None:
        checks = (
            (self.search_step_degrees > 0, "search step must be > 0°"),
            (self.search_resolution_angstrom > 0, "search resolution must be > 0 Å"),
            (self.max_shift_px >= 0, "max shift must be >= 0 px"),
            (self.shift_step_px > 0, "shift step must be > 0 px"),
            (self.n_candidates >= 1, "need at least 1 candidate"),
            (all(r > 0 for r in self.refine_resolution_angstrom), "resolutions must be > 0"),
            (all(i >= 0 for i in self.iterations), "iterations must be >= 0"),
            (self.ctf in ("full", "flip"), "ctf must be 'full' or 'flip'"),
            (self.sigma_angstrom > 0, "sigma must be > 0 Å"),
            (not (self.fixed_poses and self.local_poses), "fixed and local poses exclude"),
            (self.max_rounds >= 1, "max rounds must be >= 1"),
            (self.elastic_range_angstrom >= 0, "elastic range must be >= 0 Å"),
            (self.elastic_spacing_angstrom > 0, "elastic spacing must be > 0 Å"),
            (self.elastic_resolution_angstrom > 0, "elastic search band must be > 0 Å"),
            (self.elastic_step_degrees > 0, "elastic search step must be > 0°"),
            (self.elastic_shift_step_px > 0, "elastic shift step must be > 0 px"),
            (self.elastic_candidates >= 0, "elastic candidates must be >= 0"),
            (self.population_centres >= 0, "population centres must be >= 0"),
            (self.screen_iterations >= 0, "screening steps must be >= 0"),
            (self.screen_resolution_angstrom > 0, "screening band must be > 0 Å"),
            (
                self.amplitude_lr_angstrom is None
                or all(v > 0 for v in self.amplitude_lr_angstrom),
                "amplitude steps must be > 0 Å",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise InputError(f"alignment settings: {message}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class ReferenceModel:
    """Nodes (N, 3) in Å relative to the rotation centre, modes (M, N, 3), 1-based numbers."""

    coordinates: torch.Tensor
    modes: torch.Tensor
    mode_numbers: Sequence[int]
    weights: torch.Tensor | None = None
    n_nodes: int = 0  # network nodes (the modes' unit); 0: one per coordinate
    # local rotations (M, N, 3) per unit amplitude: non-linear deformation (nma.deform)
    spins: torch.Tensor | None = None

    @property
    def deformation(self) -> str:
        return "linear" if self.spins is None else "nonlinear"

    def deformed(self, amplitudes: torch.Tensor) -> torch.Tensor:
        """Coordinates (B, N, 3) deformed by ``amplitudes`` (B, M), linearly or following the
        local rotations (``spins``), see `deephemnma_bridge.nma.deform`."""
        if self.spins is None:
            return deform(self.coordinates, self.modes, amplitudes)
        return deform_nonlinear(self.coordinates, self.modes, self.spins, amplitudes, self.weights)

    @property
    def amplitude_scale(self) -> float:
        """sqrt(N): an amplitude q displaces the nodes by q / sqrt(N) Å RMS (unit-norm modes
        over 3N coordinates), so q = scale * (RMS displacement in Å)."""
        return math.sqrt(self.n_nodes or self.coordinates.shape[0])

    @classmethod
    def from_modes(
        cls,
        coordinates: NDArray[np.floating],
        vectors: NDArray[np.floating],
        mode_numbers: Sequence[int],
        *,
        template: Literal["nodes", "residues", "atoms"] = "residues",
        deformation: Literal["linear", "nonlinear"] = "linear",
        atom_coordinates: NDArray[np.floating] | None = None,
        atom_node: NDArray[np.integer] | None = None,
        centre_angstrom: NDArray[np.floating] | None = None,
        device: torch.device | str = "cpu",
    ) -> ReferenceModel:
        """The rendered template, centred on ``centre_angstrom`` (default: node centroid).

        ``nodes``: one unit Gaussian per network node. ``residues`` (default): one Gaussian
        per node at the centroid of the atoms that move with it, weighted by their number,
        which matches an all-atom density far better than Cα blobs. ``atoms``: every atom,
        moving with its node (most faithful, cost proportional to the atom count).

        ``deformation``: ``linear`` (``r + sum q u``) or ``nonlinear`` (each point follows the
        local rotation of its node's neighbourhood, `deephemnma_bridge.nma.deform`).
        """
        xyz = np.asarray(coordinates, dtype=np.float64)
        vec = np.asarray(vectors, dtype=np.float64)
        n_nodes = len(xyz)
        if deformation not in ("linear", "nonlinear"):
            raise InputError(f"deformation must be linear or nonlinear, got {deformation!r}")
        spin = mode_spins(xyz, vec) if deformation == "nonlinear" and len(vec) else None
        nodes = xyz
        centre = xyz.mean(axis=0) if centre_angstrom is None else np.asarray(centre_angstrom)
        weights = None
        if template != "nodes":
            if atom_coordinates is None or atom_node is None:
                raise InputError(
                    f"template {template!r} needs the atoms of the model: the modes file has "
                    "none (write it with `deephemnma modes MODEL`), or use --template nodes"
                )
            atoms = np.asarray(atom_coordinates, dtype=np.float64)
            owner = np.asarray(atom_node, dtype=np.int64)
            keep = owner >= 0
            atoms, owner = atoms[keep], owner[keep]
            if template == "atoms":
                xyz, vec = atoms, vec[:, owner]
                if spin is not None:  # each atom turns with its node's neighbourhood
                    spin = spin[:, owner]
                    vec = vec + np.cross(spin, xyz - nodes[owner])
            else:
                count = np.bincount(owner, minlength=len(xyz)).astype(np.float64)
                sums = np.stack(
                    [np.bincount(owner, atoms[:, a], minlength=len(xyz)) for a in range(3)], 1
                )
                has = count > 0
                xyz = np.where(has[:, None], sums / np.maximum(count, 1)[:, None], xyz)
                weights = np.where(has, count, 1.0)
                weights = weights / weights.mean()
                if spin is not None:  # the residue blob (off its Cα) turns with it as well
                    vec = vec + np.cross(spin, xyz - nodes)
        elif template not in ("nodes", "residues", "atoms"):
            raise InputError(f"template must be nodes, residues or atoms, got {template!r}")
        return cls(
            torch.tensor(xyz - centre, dtype=torch.float32, device=device),
            torch.tensor(vec, dtype=torch.float32, device=device),
            [int(m) for m in mode_numbers],
            None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device),
            n_nodes,
            None if spin is None else torch.tensor(spin, dtype=torch.float32, device=device),
        )

    def coarsened(self, max_blobs: int) -> ReferenceModel:
        """At most ``max_blobs`` Gaussians: runs of consecutive nodes (chain order) merged into
        one weighted blob moving with their mean displacement, for coarse bands where a blob
        per residue is wasted work (big complexes). Same amplitude unit (``n_nodes``)."""
        n = self.coordinates.shape[0]
        if n <= max_blobs:
            return self
        group = torch.div(
            torch.arange(n, device=self.coordinates.device) * max_blobs, n, rounding_mode="floor"
        )
        w = self.weights if self.weights is not None else torch.ones(n, device=group.device)
        total = torch.zeros(max_blobs, device=w.device).index_add_(0, group, w)
        xyz = torch.zeros(max_blobs, 3, device=w.device).index_add_(
            0, group, self.coordinates * w[:, None]
        )
        modes = torch.zeros(self.modes.shape[0], max_blobs, 3, device=w.device).index_add_(
            1, group, self.modes * w[None, :, None]
        )
        spins = None
        if self.spins is not None:
            spins = torch.zeros_like(modes).index_add_(1, group, self.spins * w[None, :, None])
            spins = spins / total[None, :, None]
        return ReferenceModel(
            xyz / total[:, None],
            modes / total[None, :, None],
            self.mode_numbers,
            total / total.mean(),
            self.n_nodes or n,
            spins,
        )

    @property
    def radius_angstrom(self) -> float:
        return float(self.coordinates.norm(dim=1).max())


def _kabsch(
    x: NDArray[np.float64], y: NDArray[np.float64], w: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The rotation R and translation t minimising ``sum w |R x + t - y|^2``."""
    cx = np.average(x, axis=0, weights=w)
    cy = np.average(y, axis=0, weights=w)
    h = np.einsum("n,ni,nj->ij", w, x - cx, y - cy)
    u, _, vt = np.linalg.svd(h)
    flip = np.diag([1.0, 1.0, float(np.sign(np.linalg.det(vt.T @ u.T)) or 1.0)])
    r = vt.T @ flip @ u.T
    return r, cy - r @ cx


@dataclass(frozen=True, eq=False)
class SymmetryCopies:
    """The equivalent poses of a pseudo-symmetric reference, for `align_batch`'s ``symmetry``.

    ``rotations`` (|G|, 3, 3) and ``translations`` (|G|, 3) Å: the operators ``h(r) = R r + t``
    that superpose the reference on itself, one per element ``g`` of its group (`build`: ``R``
    starts at ``g`` and is refined on the nodes, as a pseudo-symmetric complex's copies are
    not exactly ``360/n`` apart), identity first. The copy of the pose ``A`` (origin ``o``) is
    the rotation ``A R`` with the origin ``o - (A t)[:2]``. ``amplitude_maps`` (|G|, M, M):
    the amplitudes ``q`` fitted at ``A`` mapped onto the copy: the deformation it needs to draw
    the same density."""

    rotations: torch.Tensor
    amplitude_maps: torch.Tensor
    translations: torch.Tensor

    @classmethod
    def build(
        cls, reference: ReferenceModel, group: NDArray[np.floating] | torch.Tensor
    ) -> SymmetryCopies:
        """The copies of ``reference`` under ``group`` (|G|, 3, 3, about the reference's rotation
        centre, e.g. `deephemnma_bridge.symmetry.point_group` in the frame of
        `find_symmetry_frame`; the identity is put first).

        Each ``g`` is refined into ``h(r) = R r + t`` by a few rounds of matching every node
        ``j`` to the node ``p(j)`` nearest ``h(x_j)`` and superposing (weighted Kabsch on the
        best-matched 80 %, so that parts without the symmetry do not pull). The pose ``A``
        with amplitudes ``q`` draws node ``p(j)`` at ``A (x_p(j) + U_p(j) q)``; the copy draws
        node ``j`` there when ``U_j q' = R^T U_p(j) q``, so ``q' = T q`` with ``T`` that
        relation's weighted least-squares solution over the nodes (exact for an exactly
        symmetric model and modes; a projection otherwise)."""
        from scipy.spatial import cKDTree

        g = torch.as_tensor(group, dtype=torch.float64).cpu().numpy()
        if g.ndim != 3 or g.shape[1:] != (3, 3) or not len(g):
            raise InputError(f"a symmetry group must be rotations (n, 3, 3), got {g.shape}")
        identity = np.all(np.abs(g - np.eye(3)).reshape(len(g), -1) < 1e-6, axis=1)
        first = int(np.argmax(identity)) if identity.any() else -1
        if first < 0:
            raise InputError("the symmetry group has no identity element")
        g = np.concatenate([np.eye(3)[None], np.delete(g, first, axis=0)])
        xyz = reference.coordinates.double().cpu().numpy()
        u = reference.modes.double().cpu().numpy()  # (M, N, 3)
        m = u.shape[0]
        w = (
            np.ones(len(xyz))
            if reference.weights is None
            else reference.weights.double().cpu().numpy()
        )
        blocks = u.transpose(1, 2, 0)  # (N, 3, M): U_j
        gram = np.einsum("n,nim,nik->mk", w, blocks, blocks)
        tree = cKDTree(xyz)
        maps, rotations, translations = [np.eye(m)], [np.eye(3)], [np.zeros(3)]
        for gi in g[1:]:
            r, t = gi, np.zeros(3)
            for _ in range(8):
                d, p = tree.query(xyz @ r.T + t)
                keep = d <= np.quantile(d, 0.8)
                r, t = _kabsch(xyz[keep], xyz[p[keep]], w[keep])
            _, p = tree.query(xyz @ r.T + t)
            moved = np.einsum("ji,njk->nik", r, blocks[p])  # R^T U_p(j)
            rhs = np.einsum("n,nim,nik->mk", w, blocks, moved)
            maps.append(np.linalg.lstsq(gram, rhs, rcond=None)[0] if m else np.zeros((0, 0)))
            rotations.append(r)
            translations.append(t)
        device = reference.coordinates.device
        return cls(
            torch.tensor(np.stack(rotations), dtype=torch.float32, device=device),
            torch.tensor(np.stack(maps), dtype=torch.float32, device=device),
            torch.tensor(np.stack(translations), dtype=torch.float32, device=device),
        )

    def __len__(self) -> int:
        return int(self.rotations.shape[0])


@dataclass
class AlignmentResult:
    """Per-particle results of one batch (numpy, float64)."""

    amplitudes: NDArray[np.float64]  # (B, M)
    rotations: NDArray[np.float64]  # (B, 3, 3)
    shifts_angstrom: NDArray[np.float64]  # (B, 2) RELION origins
    cost: NDArray[np.float64]  # (B,) 1 - NCC at the finest band
    converged: NDArray[np.bool_]  # (B,)
    extra: dict[str, NDArray[np.float64]] = field(default_factory=dict)


def fibonacci_directions(n: int) -> NDArray[np.float64]:
    """(n, 2) (rot, tilt) in degrees of ``n`` nearly uniform directions on the sphere."""
    k = np.arange(n) + 0.5
    tilt = np.degrees(np.arccos(1 - 2 * k / n))
    rot = np.degrees((np.pi * (1 + 5**0.5) * k) % (2 * np.pi))
    return np.stack([rot, tilt], axis=1)


def rotation_grid(step_degrees: float) -> NDArray[np.float64]:
    """RELION matrices (R, 3, 3) covering SO(3) at about ``step_degrees``."""
    step = math.radians(step_degrees)
    n_dir = max(4, math.ceil(4 * math.pi / (step * step)))
    n_psi = max(4, math.ceil(360.0 / step_degrees))
    dirs = fibonacci_directions(n_dir)
    psi = np.arange(n_psi) * 360.0 / n_psi
    eulers = np.concatenate(
        [np.column_stack([dirs, np.full(n_dir, p)]) for p in psi], axis=0
    )  # (R, 3)
    return euler_to_matrix(eulers)


def _skew_expm(d: torch.Tensor) -> torch.Tensor:
    """Rotation matrices expm([d]x) (B, 3, 3) of rotation vectors d (B, 3)."""
    zero = torch.zeros_like(d[:, 0])
    k = torch.stack(
        [
            torch.stack([zero, -d[:, 2], d[:, 1]], dim=1),
            torch.stack([d[:, 2], zero, -d[:, 0]], dim=1),
            torch.stack([-d[:, 1], d[:, 0], zero], dim=1),
        ],
        dim=1,
    )
    return torch.linalg.matrix_exp(k)


class _Band:
    """A Fourier band with the particle-independent pieces the similarity needs."""

    def __init__(
        self, box: int, pixel: float, resolution: float, power: float, device: torch.device
    ) -> None:
        self.band = FourierBand.create(
            box_size_px=box,
            pixel_size_angstrom=pixel,
            resolution_angstrom=resolution,
            device=device,
        )
        k2 = self.band.ky[:, None] ** 2 + self.band.kx[None, :] ** 2
        weight = self.band.weights.clone()
        weight[0, 0] = 0.0  # no DC term
        if power:
            weight = weight * torch.where(k2 > 0, k2, torch.ones_like(k2)) ** (power / 2)
        self.weight = weight  # (Ky, Kx)

    def ctf(self, params: CTFParams) -> torch.Tensor:
        full = ctf_2d(
            params,
            box_size_px=self.band.box_size_px,
            pixel_size_angstrom=self.band.pixel_size_angstrom,
        )
        return full[:, self.band.row_index, : self.band.n_cols]

    def similarity(
        self,
        x_re: torch.Tensor,
        x_im: torch.Tensor,
        ctf: torch.Tensor | None,
        reference: ReferenceModel,
        rot: torch.Tensor,
        org: torch.Tensor,
        q: torch.Tensor,
        sigma_angstrom: float,
    ) -> torch.Tensor:
        """NCC (B,) of the band's image coefficients ``x`` with the templates of ``reference``
        deformed by ``q`` at poses ``rot``, ``org``, times ``ctf`` (the band's part) if given."""
        coords = reference.deformed(q)  # (B, N, 3)
        pos = torch.einsum("bij,bnj->bni", rot[:, :2, :], coords) - org[:, None, :]
        t_re, t_im = render_fourier(
            pos, self.band, sigma_angstrom=sigma_angstrom, weights=reference.weights
        )
        if ctf is not None:
            t_re, t_im = t_re * ctf, t_im * ctf
        return _ncc(t_re, t_im, x_re, x_im, self.weight)


def _ncc(
    t_re: torch.Tensor, t_im: torch.Tensor, x_re: torch.Tensor, x_im: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    dot = (w * (t_re * x_re + t_im * x_im)).sum(dim=(-2, -1))
    tt = (w * (t_re * t_re + t_im * t_im)).sum(dim=(-2, -1))
    xx = (w * (x_re * x_re + x_im * x_im)).sum(dim=(-2, -1))
    return dot / torch.sqrt(tt * xx + 1e-30)


def elastic_grid(
    n_modes: int, range_angstrom: float, spacing_angstrom: float, max_points: int = 48
) -> tuple[NDArray[np.float64], float]:
    """Points of a cubic lattice of amplitudes (Å of RMS displacement per mode) inside the ball
    of radius ``range_angstrom``, origin excluded (the rigid search covers it); the spacing
    grows by 25 % steps until at most ``max_points`` remain. Returns (points (D, M), spacing).

    With orthonormal modes the RMS displacement of amplitudes p is ``|p|``, so the ball holds
    every deformation up to ``range_angstrom`` RMS, and any deformation inside it lies within
    ``spacing * sqrt(M) / 2`` of a point (or of the origin)."""
    if n_modes == 0 or range_angstrom <= 0:
        return np.zeros((0, n_modes)), spacing_angstrom
    spacing = spacing_angstrom
    while True:
        k = math.floor(range_angstrom / spacing + 1e-9)
        axis = np.arange(-k, k + 1) * spacing
        if len(axis) ** n_modes > 4_000_000:  # too many to enumerate: coarser first
            spacing *= 1.25
            continue
        pts = np.stack(np.meshgrid(*[axis] * n_modes, indexing="ij"), -1).reshape(-1, n_modes)
        norm = np.linalg.norm(pts, axis=1)
        pts = pts[(norm <= range_angstrom + 1e-9) & (norm > 0)]
        if len(pts) <= max_points:
            return pts, spacing
        spacing *= 1.25


@dataclass(frozen=True, eq=False)
class SearchLibrary:
    """What the global search needs that does not depend on the particles: the band, the
    reference's projections on the SO(3) grid (amplitudes 0) and the shift phase ramps.

    With ``elastic_range_angstrom > 0`` and modes, ``elastic`` holds a second, coarser library
    (``elastic_*`` settings) of the reference deformed on `elastic_grid`: a particle far from
    the reference's shape finds its starting pose (and amplitudes, ``starts``) there when the
    rigid projections match nothing.

    Build it once per run with `SearchLibrary.build` and pass it to every `align_batch` call
    (rendering ~15,000 references costs ~0.5 s on 2 CPU cores)."""

    band: _Band
    rotations: torch.Tensor  # (R, 3, 3)
    lib: torch.Tensor  # (R, 2K): weighted real and imaginary parts
    t_pow: torch.Tensor  # (R, K): weighted |T|^2
    origins: torch.Tensor  # (S, 2) Å
    ramp_c: torch.Tensor  # (S, Ky, Kx)
    ramp_s: torch.Tensor  # (S, Ky, Kx)
    starts: torch.Tensor | None = None  # (R, M) amplitudes of each reference (elastic)
    elastic: SearchLibrary | None = None
    grid_spacing_angstrom: float = 0.0

    @classmethod
    def build(
        cls,
        reference: ReferenceModel,
        config: AlignmentConfig,
        box: int,
        pixel: float,
        device: torch.device | str,
        *,
        elastic: bool = False,
        amplitudes: torch.Tensor | None = None,
    ) -> SearchLibrary:
        """The rigid library (``elastic=False``, with its elastic one attached when the settings
        ask for it) or the elastic library alone (``elastic=True``): the reference deformed on
        `elastic_grid`, or by the given ``amplitudes`` (D, M) (the population search)."""
        if elastic:
            step, resolution = config.elastic_step_degrees, config.elastic_resolution_angstrom
            shift_step = config.elastic_shift_step_px
            model = reference.coarsened(config.elastic_max_blobs)
            if amplitudes is None:
                grid, spacing = elastic_grid(
                    model.modes.shape[0],
                    config.elastic_range_angstrom,
                    config.elastic_spacing_angstrom,
                )
                amplitudes = torch.tensor(
                    grid * reference.amplitude_scale, dtype=torch.float32, device=device
                )
            else:
                amplitudes, spacing = amplitudes.to(device, torch.float32), 0.0
        else:
            step, resolution = config.search_step_degrees, config.search_resolution_angstrom
            shift_step, spacing = config.shift_step_px, 0.0
            model = reference.coarsened(config.search_max_blobs)
            amplitudes = torch.zeros(1, reference.modes.shape[0], device=device)
        sb = _Band(box, pixel, resolution, config.frequency_power, torch.device(device))
        band = sb.band
        grid_rot = torch.tensor(rotation_grid(step), dtype=torch.float32, device=device)
        n_rot = grid_rot.shape[0]
        lib_re, lib_im = [], []
        zero_shift = torch.zeros(1, 2, device=device)
        for q in amplitudes:  # each deformation, its projections in chunks to bound memory
            coords = model.deformed(q[None])[0]
            for start in range(0, n_rot, 512):
                rot = grid_rot[start : start + 512]
                pos = project_positions(coords[None], rot, zero_shift.expand(len(rot), 2))
                t_re, t_im = render_fourier(
                    pos, band, sigma_angstrom=config.sigma_angstrom, weights=model.weights
                )
                lib_re.append(t_re)
                lib_im.append(t_im)
        n_ref = n_rot * len(amplitudes)
        t_re = torch.cat(lib_re).reshape(n_ref, -1)
        t_im = torch.cat(lib_im).reshape(n_ref, -1)
        wf = sb.weight.reshape(-1)
        # shift grid (Å): origins o; template with origin o = T0 * exp(+2 pi i k.o), so the
        # score is Re sum w conj(T0) X exp(-2 pi i k.o)
        half = math.floor(config.max_shift_px / shift_step + 1e-9)
        steps = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
        steps = steps * shift_step * pixel
        ox, oy = torch.meshgrid(steps, steps, indexing="xy")
        origins = torch.stack([ox.reshape(-1), oy.reshape(-1)], dim=1)  # (S, 2)
        phase = (
            -2
            * math.pi
            * (
                origins[:, 0, None, None] * band.kx[None, None, :]
                + origins[:, 1, None, None] * band.ky[None, :, None]
            )
        )  # (S, Ky, Kx)
        extra = None
        if (
            not elastic
            and config.elastic_range_angstrom > 0
            and config.elastic_candidates > 0
            and reference.modes.shape[0] > 0
            and not (config.fixed_poses or config.local_poses)
        ):
            extra = cls.build(reference, config, box, pixel, device, elastic=True)
        elif elastic and not len(amplitudes):
            raise ValueError("an elastic library needs at least one deformation")
        return cls(
            band=sb,
            rotations=grid_rot.repeat(len(amplitudes), 1, 1),
            lib=torch.cat([t_re * wf, t_im * wf], dim=1),
            t_pow=(t_re * t_re + t_im * t_im) * wf,
            origins=origins,
            ramp_c=torch.cos(phase),
            ramp_s=torch.sin(phase),
            starts=amplitudes.repeat_interleave(n_rot, dim=0) if elastic else None,
            elastic=extra,
            grid_spacing_angstrom=spacing,
        )


def _global_search(
    spectra: torch.Tensor,
    ctf_full: torch.Tensor | None,
    library: SearchLibrary,
    config: AlignmentConfig,
    n_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Best ``n_candidates`` (rotations (B, C, 3, 3), origins (B, C, 2) Å, scores (B, C),
    starting amplitudes (B, C, M) of an elastic library, else None)."""
    device = spectra.device
    band = library.band.band
    b = spectra.shape[0]
    x_re, x_im = band.extract(spectra)  # (B, Ky, Kx)
    wf = library.band.weight.reshape(-1)
    if ctf_full is not None:  # correlate with C * X, normalise with |C T|
        c = ctf_full[:, band.row_index, : band.n_cols]
        x_re, x_im = x_re * c, x_im * c
        c2 = (c * c).reshape(b, -1)
    rotations, origins, lib, t_pow = (
        library.rotations,
        library.origins,
        library.lib,
        library.t_pow,
    )
    ramp_c, ramp_s = library.ramp_c, library.ramp_s
    best_rot = torch.empty(b, n_candidates, 3, 3, device=device)
    best_org = torch.empty(b, n_candidates, 2, device=device)
    best_score = torch.empty(b, n_candidates, device=device)
    starts = library.starts
    best_q = (
        None if starts is None else torch.empty(b, n_candidates, starts.shape[1], device=device)
    )
    cos_nms = math.cos(math.radians(config.nms_degrees))
    for start in range(0, b, config.search_chunk):
        xr = x_re[start : start + config.search_chunk, None]
        xi = x_im[start : start + config.search_chunk, None]
        sr = (xr * ramp_c - xi * ramp_s).reshape(xr.shape[0], len(origins), -1)
        si = (xr * ramp_s + xi * ramp_c).reshape(xr.shape[0], len(origins), -1)
        shifted = torch.cat([sr, si], dim=2)  # (P, S, 2K)
        dots = shifted @ lib.T  # (P, S, R)
        xx = (
            wf
            * (
                x_re[start : start + config.search_chunk] ** 2
                + x_im[start : start + config.search_chunk] ** 2
            ).reshape(xr.shape[0], -1)
        ).sum(1)
        if ctf_full is not None:
            tt = c2[start : start + config.search_chunk] @ t_pow.T  # (P, R)
        else:
            tt = t_pow.sum(1)[None].expand(xr.shape[0], -1)
        norm = torch.sqrt(tt * xx[:, None] + 1e-30)  # (P, R)
        score, which_shift = (dots / norm[:, None, :]).max(dim=1)  # (P, R)
        for p in range(score.shape[0]):
            order = torch.argsort(score[p], descending=True)[: 64 * n_candidates]
            picked: list[int] = []
            for r in order.tolist():
                if all(
                    float((rotations[r] * rotations[q]).sum() - 1) / 2 <= cos_nms for q in picked
                ):
                    picked.append(r)
                    if len(picked) == n_candidates:
                        break
            while len(picked) < n_candidates:
                picked.append(picked[-1])
            idx = torch.tensor(picked, device=device)
            best_rot[start + p] = rotations[idx]
            best_org[start + p] = origins[which_shift[p, idx]]
            best_score[start + p] = score[p, idx]
            if best_q is not None and starts is not None:
                best_q[start + p] = starts[idx]
    return best_rot, best_org, best_score, best_q


def _refine(
    spectra: torch.Tensor,
    ctf_full: torch.Tensor | None,
    reference: ReferenceModel,
    rot0: torch.Tensor,
    org0: torch.Tensor,
    q0: torch.Tensor,
    config: AlignmentConfig,
    resolution: float,
    iterations: int,
    box: int,
    pixel: float,
    *,
    rigid: bool,
    amp_lr: float,
    midpoint: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam on -NCC from (rot0, org0, q0) for every row; returns (q, A, o, ncc). A list given as
    ``midpoint`` receives (q, A, o) at the start of the second half of the steps."""
    device = spectra.device
    sb = _Band(box, pixel, resolution, config.frequency_power, device)
    x_re, x_im = sb.band.extract(spectra)
    c = None if ctf_full is None else ctf_full[:, sb.band.row_index, : sb.band.n_cols]
    n = rot0.shape[0]
    q = q0.clone().requires_grad_(True)
    d = torch.zeros(n, 3, device=device, requires_grad=not rigid)
    o = org0.clone().requires_grad_(not rigid)
    params = [{"params": [q], "lr": amp_lr}]
    if not rigid:
        params += [
            {"params": [d], "lr": config.learning_rates[1]},
            {"params": [o], "lr": config.learning_rates[2]},
        ]
    opt = torch.optim.Adam(params)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iterations, 1), eta_min=0.0)

    def similarity() -> torch.Tensor:
        rot = _skew_expm(d) @ rot0
        return sb.similarity(x_re, x_im, c, reference, rot, o, q, config.sigma_angstrom)

    half = iterations // 2
    mid = (q0.clone(), rot0.clone(), org0.clone())
    for step in range(iterations):
        if step == half:  # where the second half of the round starts (see _refine_until_settled)
            with torch.no_grad():
                mid = (q.detach().clone(), _skew_expm(d) @ rot0, o.detach().clone())
        opt.zero_grad(set_to_none=True)
        loss = -similarity().sum()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        ncc = similarity()
        rot = _skew_expm(d) @ rot0
    if midpoint is not None:
        midpoint[:] = mid
    return q.detach(), rot.detach(), o.detach(), ncc.detach()


def _amplitude_lr(config: AlignmentConfig, reference: ReferenceModel, band: int) -> float:
    """Adam's amplitude step at band ``band``, in the amplitude unit (Å·sqrt(N))."""
    if config.amplitude_lr_angstrom is None:
        return config.learning_rates[0]
    return config.amplitude_lr_angstrom[band] * reference.amplitude_scale


def _refine_until_settled(
    spectra: torch.Tensor,
    ctf_full: torch.Tensor | None,
    reference: ReferenceModel,
    rot0: torch.Tensor,
    org0: torch.Tensor,
    q0: torch.Tensor,
    config: AlignmentConfig,
    band: int,
    box: int,
    pixel: float,
    *,
    rigid: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_refine` at band ``band`` (0 or 1), repeated from where it ended for the rows whose
    amplitudes were still travelling at the band's capacity (a fresh Adam each round), at most
    ``config.max_rounds`` times. Returns (q, A, o, ncc, still_travelling (rows,) bool).

    With Adam a step moves a parameter by about its learning rate whatever the gradient, so the
    second half of a round of T cosine-decayed steps can move it at most ~``lr T (1/2 - 1/pi) /
    2``: a row whose amplitudes, rotation or shift moved more than half of that in the second
    half was still travelling when the steps ran out, and gets another round."""
    resolution = config.refine_resolution_angstrom[band]
    iterations = config.iterations[band]
    amp_lr = _amplitude_lr(config, reference, band)
    # sum of the cosine-decayed rates over the second half of a round, in units of lr
    half = iterations // 2
    steps = sum((1 + math.cos(math.pi * t / iterations)) / 2 for t in range(half, iterations))
    amp_cap = amp_lr * steps
    rot_cap = config.learning_rates[1] * steps  # rad
    shift_cap = config.learning_rates[2] * steps  # Å

    def travelled(
        q_a: torch.Tensor, q_b: torch.Tensor, r_a: torch.Tensor, r_b: torch.Tensor,
        o_a: torch.Tensor, o_b: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Rows that used over half of the round's reach in any parameter (with fixed poses
        the rotation and shift do not move, so only the amplitudes count)."""
        cos = ((r_a * r_b).sum(dim=(1, 2)) - 1) / 2
        angle = torch.arccos(cos.clamp(-1.0, 1.0))
        out = (angle > 0.5 * rot_cap) | ((o_a - o_b).abs().amax(dim=1) > 0.5 * shift_cap)
        if q_a.shape[1]:
            out |= (q_a - q_b).abs().amax(dim=1) > 0.5 * amp_cap
        return out

    mid: list[torch.Tensor] = [q0, rot0, org0]
    q, rot, org, ncc = _refine(
        spectra, ctf_full, reference, rot0, org0, q0, config, resolution, iterations, box,
        pixel, rigid=rigid, amp_lr=amp_lr, midpoint=mid,
    )  # fmt: skip
    travelling = travelled(q, mid[0], rot, mid[1], org, mid[2])
    for _ in range(config.max_rounds - 1):
        idx = torch.nonzero(travelling).flatten()
        if not len(idx) or not iterations:
            break
        mid = [q[idx], rot[idx], org[idx]]
        q2, rot2, org2, ncc2 = _refine(
            spectra[idx], None if ctf_full is None else ctf_full[idx], reference, rot[idx],
            org[idx], q[idx], config, resolution, iterations, box, pixel, rigid=rigid,
            amp_lr=amp_lr, midpoint=mid,
        )  # fmt: skip
        q[idx], rot[idx], org[idx], ncc[idx] = q2, rot2, org2, ncc2
        travelling[idx] = travelled(q2, mid[0], rot2, mid[1], org2, mid[2])
    return q, rot, org, ncc, travelling


def _population_centres(
    q: torch.Tensor, ncc: torch.Tensor, k: int, reference: ReferenceModel
) -> torch.Tensor:
    """Up to ``k`` amplitude centres (k-means, in Å of RMS displacement) of the rows whose
    similarity is in the better half: where the batch's well-fitted particles went."""
    from sklearn.cluster import KMeans

    ok = torch.isfinite(ncc) & torch.isfinite(q).all(dim=1)
    good = ok & (ncc >= ncc[ok].median()) if ok.any() else ok
    x = (q[good] / reference.amplitude_scale).double().cpu().numpy()
    k = min(k, len(np.unique(x.round(3), axis=0)))
    if k < 1:
        return q[:0]
    km = KMeans(n_clusters=k, n_init=4, random_state=0).fit(x)
    centres = torch.tensor(km.cluster_centers_, dtype=q.dtype, device=q.device)
    return centres * reference.amplitude_scale


def _similarity(
    spectra: torch.Tensor,
    ctf_full: torch.Tensor | None,
    reference: ReferenceModel,
    rot: torch.Tensor,
    org: torch.Tensor,
    q: torch.Tensor,
    config: AlignmentConfig,
    resolution: float,
    box: int,
    pixel: float,
    chunk: int = 2048,
) -> torch.Tensor:
    """NCC (rows,) of each row's pose and amplitudes at band ``resolution`` (no gradient)."""
    sb = _Band(box, pixel, resolution, config.frequency_power, spectra.device)
    out = torch.empty(rot.shape[0], device=spectra.device)
    with torch.no_grad():
        for start in range(0, rot.shape[0], chunk):
            sl = slice(start, start + chunk)
            x_re, x_im = sb.band.extract(spectra[sl])
            c = None if ctf_full is None else ctf_full[sl, sb.band.row_index, : sb.band.n_cols]
            out[sl] = sb.similarity(
                x_re, x_im, c, reference, rot[sl], org[sl], q[sl], config.sigma_angstrom
            )
    return out


def _symmetry_screen(
    spectra: torch.Tensor,
    ctf_for_template: torch.Tensor | None,
    reference: ReferenceModel,
    rot: torch.Tensor,
    org: torch.Tensor,
    q: torch.Tensor,
    config: AlignmentConfig,
    box: int,
    pixel_size_angstrom: float,
    symmetry: SymmetryCopies,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each particle's pose ``A`` and its equivalent poses ``A g``, each refined by the screening
    steps (``iterations[0]`` when there are none) at the screening band; returns the best one's
    (q, A, o) and which element of ``symmetry`` it is (B,) (0: the pose itself).

    A copy starts from the best fit, at the screening band and template, of: the amplitudes
    mapped onto it (`SymmetryCopies`), none, and the shapes of the elastic search's grid (the
    copy's own motion may be none of the mapped ones: modes that break the symmetry move one
    copy only; a coarser template misjudges them: 7PBL at 15 Å with 96 blobs). The pose itself
    keeps its amplitudes."""
    b, m = q.shape
    k = len(symmetry)
    g = symmetry.rotations.to(rot.device, rot.dtype)
    t = symmetry.translations.to(rot.device, rot.dtype)
    maps = symmetry.amplitude_maps.to(q.device, q.dtype)
    rot_k = (rot[:, None] @ g[None]).reshape(b * k, 3, 3)
    q_k = torch.einsum("gij,bj->bgi", maps, q).reshape(b * k, m)
    org_k = (org[:, None] - torch.einsum("bij,gj->bgi", rot[:, :2], t)).reshape(b * k, 2)
    spec_k = spectra.repeat_interleave(k, dim=0)
    ctf_k = None if ctf_for_template is None else ctf_for_template.repeat_interleave(k, dim=0)
    grid, _ = elastic_grid(m, config.elastic_range_angstrom, config.elastic_spacing_angstrom)
    shapes = torch.cat(
        [
            torch.zeros(1, m, device=q.device),
            torch.tensor(grid, dtype=q.dtype, device=q.device) * reference.amplitude_scale,
        ]
    )  # (D, M)
    copy_rows = torch.nonzero(torch.arange(b * k, device=q.device) % k > 0).flatten()
    coarse = reference.coarsened(config.search_max_blobs)
    if m and len(copy_rows):
        tried = torch.cat(
            [q_k[copy_rows, None], shapes[None].expand(len(copy_rows), -1, -1)], dim=1
        )  # (rows, 1 + D, M)
        d = tried.shape[1]
        score = _similarity(
            spec_k[copy_rows].repeat_interleave(d, dim=0),
            None if ctf_k is None else ctf_k[copy_rows].repeat_interleave(d, dim=0),
            coarse,
            rot_k[copy_rows].repeat_interleave(d, dim=0),
            org_k[copy_rows].repeat_interleave(d, dim=0),
            tried.reshape(-1, m), config, config.screen_resolution_angstrom, box,
            pixel_size_angstrom,
        ).reshape(-1, d)  # fmt: skip
        pick = torch.nan_to_num(score, nan=-math.inf).argmax(dim=1)
        q_k[copy_rows] = tried[torch.arange(len(copy_rows), device=q.device), pick]
    q_k, rot_k, org_k, ncc = _refine(
        spec_k, ctf_k, coarse, rot_k, org_k, q_k, config,
        config.screen_resolution_angstrom, config.screen_iterations or config.iterations[0],
        box, pixel_size_angstrom, rigid=False, amp_lr=_amplitude_lr(config, reference, 0),
    )  # fmt: skip
    score = torch.nan_to_num(ncc, nan=-math.inf).reshape(b, k)
    # ties (an exactly symmetric model): the pose itself
    which = (score - 1e-7 * torch.arange(k, device=score.device)).argmax(dim=1)
    best = which + torch.arange(b, device=which.device) * k
    return q_k[best], rot_k[best], org_k[best], which


def _with_copies(
    spectra: torch.Tensor,
    ctf_for_template: torch.Tensor | None,
    reference: ReferenceModel,
    rot: torch.Tensor,
    org: torch.Tensor,
    q: torch.Tensor,
    config: AlignmentConfig,
    box: int,
    pixel_size_angstrom: float,
    copies: SymmetryCopies,
    *,
    keep_unmoved: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each particle's best pose after `_symmetry_screen` (``keep_unmoved``: the given one where
    the screen chose the pose itself), then, for each particle moved to another copy, a second
    row with its own pose, to be refined alongside: (q, A, o, which element (B,), the particle
    of each row (B + moved,))."""
    q_s, rot_s, org_s, which = _symmetry_screen(
        spectra, ctf_for_template, reference, rot, org, q, config, box, pixel_size_angstrom,
        copies,
    )  # fmt: skip
    moved = which > 0
    own = torch.nonzero(moved).flatten()
    if keep_unmoved:
        q_s = torch.where(moved[:, None], q_s, q)
        rot_s = torch.where(moved[:, None, None], rot_s, rot)
        org_s = torch.where(moved[:, None], org_s, org)
    rows = torch.cat([torch.arange(len(q), device=q.device), own])
    return (
        torch.cat([q_s, q[own]]),
        torch.cat([rot_s, rot[own]]),
        torch.cat([org_s, org[own]]),
        which,
        rows,
    )


def _refine_candidates(
    spectra: torch.Tensor,
    ctf_for_template: torch.Tensor | None,
    reference: ReferenceModel,
    final_reference: ReferenceModel | None,
    rot_all: torch.Tensor,
    org_all: torch.Tensor,
    q_all: torch.Tensor,
    config: AlignmentConfig,
    box: int,
    pixel_size_angstrom: float,
    progress: Callable[[str], None] | None,
    symmetry: SymmetryCopies | None = None,
    chosen: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine every candidate (B, C, ...) at the first band, keep the best of each particle
    (with ``symmetry``: the best of its equivalent poses, `_symmetry_screen`), settle it, then
    refine it at the last band: (q, A, o, ncc, still moving). A list given as ``chosen``
    receives the element of ``symmetry`` each particle's pose was moved by (B,) (0: none)."""
    b = spectra.shape[0]
    device = spectra.device
    m = q_all.shape[-1]
    per = q_all.shape[1]
    rot_all, org_all, q_all = (
        rot_all.reshape(-1, 3, 3),
        org_all.reshape(-1, 2),
        q_all.reshape(-1, m),
    )
    spec_all = spectra.repeat_interleave(per, dim=0)
    ctf_all = None if ctf_for_template is None else ctf_for_template.repeat_interleave(per, 0)
    it2 = config.iterations[1]
    rigid = config.fixed_poses
    copies = None if rigid or symmetry is None or len(symmetry) < 2 else symmetry
    which = torch.zeros(b, dtype=torch.int64, device=device)
    # a particle moved to another copy keeps a second row, its candidate's own pose, refined
    # alongside (rows b...): the final similarity decides between them
    own = torch.zeros(0, dtype=torch.int64, device=device)
    spec_x, ctf_x = spectra, ctf_for_template
    with torch.enable_grad():
        screen = config.screen_iterations
        if per > 1 and 0 < screen < config.iterations[0]:
            # a short round for every candidate, then the full band for the best one only
            q, rot, org, ncc = _refine(
                spec_all, ctf_all, reference.coarsened(config.search_max_blobs), rot_all,
                org_all, q_all, config, config.screen_resolution_angstrom, screen, box,
                pixel_size_angstrom, rigid=rigid, amp_lr=_amplitude_lr(config, reference, 0),
            )  # fmt: skip
            best = ncc.reshape(b, per).argmax(dim=1) + torch.arange(b, device=device) * per
            q, rot, org = q[best], rot[best], org[best]
            if copies is not None:  # not refined at this band yet: every screened pose
                q, rot, org, which, rows_x = _with_copies(
                    spectra, ctf_for_template, reference, rot, org, q, config, box,
                    pixel_size_angstrom, copies, keep_unmoved=False,
                )  # fmt: skip
                own = rows_x[b:]
                spec_x = spectra[rows_x]
                ctf_x = None if ctf_for_template is None else ctf_for_template[rows_x]
            q, rot, org, ncc, moving1 = _refine_until_settled(
                spec_x, ctf_x, reference, rot, org, q, config, 0, box, pixel_size_angstrom,
                rigid=rigid,
            )  # fmt: skip
        else:
            # every candidate once; then more rounds at this band for the best one only
            one = dataclasses.replace(config, max_rounds=1)
            q, rot, org, ncc, moving1 = _refine_until_settled(
                spec_all, ctf_all, reference, rot_all, org_all, q_all, one, 0, box,
                pixel_size_angstrom, rigid=rigid,
            )  # fmt: skip
            best = ncc.reshape(b, per).argmax(dim=1) + torch.arange(b, device=device) * per
            q, rot, org, ncc, moving1 = q[best], rot[best], org[best], ncc[best], moving1[best]
            fresh = torch.zeros_like(moving1)
            if copies is not None:  # a particle moved to another copy gets the band afresh
                q, rot, org, which, rows_x = _with_copies(
                    spectra, ctf_for_template, reference, rot, org, q, config, box,
                    pixel_size_angstrom, copies, keep_unmoved=True,
                )  # fmt: skip
                own = rows_x[b:]
                moved = which > 0
                ncc, moving1 = ncc[rows_x], moving1[rows_x]
                fresh = torch.cat([moved, torch.zeros_like(moved[own])])
                spec_x = spectra[rows_x]
                ctf_x = None if ctf_for_template is None else ctf_for_template[rows_x]
            again = moving1 & ~fresh if config.max_rounds > 1 else torch.zeros_like(fresh)
            for rows, rounds in ((again, config.max_rounds - 1), (fresh, config.max_rounds)):
                if not rows.any():
                    continue
                idx = torch.nonzero(rows).flatten()
                more = dataclasses.replace(config, max_rounds=rounds)
                q_m, rot_m, org_m, ncc_m, moving_m = _refine_until_settled(
                    spec_x[idx], None if ctf_x is None else ctf_x[idx], reference, rot[idx],
                    org[idx], q[idx], more, 0, box, pixel_size_angstrom, rigid=rigid,
                )  # fmt: skip
                q[idx], rot[idx], org[idx], ncc[idx], moving1[idx] = (
                    q_m, rot_m, org_m, ncc_m, moving_m
                )  # fmt: skip
        if progress:
            progress("refine")
        q, rot, org, ncc, moving = _refine_until_settled(
            spec_x, ctf_x, reference if final_reference is None else final_reference, rot, org,
            q, config, 1, box, pixel_size_angstrom, rigid=rigid,
        )  # fmt: skip
        if not it2:
            moving = moving1
    if len(own):  # the candidate's own pose wins where it ends better (NaN in the copy loses)
        back = torch.isfinite(ncc[b:]) & ~(ncc[b:] <= ncc[own])
        rows = own[back]
        q[rows], rot[rows], org[rows] = q[b:][back], rot[b:][back], org[b:][back]
        ncc[rows], moving[rows] = ncc[b:][back], moving[b:][back]
        which[rows] = 0
        q, rot, org, ncc, moving = q[:b], rot[:b], org[:b], ncc[:b], moving[:b]
    if chosen is not None:
        chosen[:] = [which]
    return q, rot, org, ncc, moving


def align_batch(
    images: torch.Tensor,
    ctf: CTFParams,
    reference: ReferenceModel,
    config: AlignmentConfig,
    *,
    pixel_size_angstrom: float,
    rotations: torch.Tensor | None = None,
    shifts_angstrom: torch.Tensor | None = None,
    amplitudes: torch.Tensor | None = None,
    final_reference: ReferenceModel | None = None,
    library: SearchLibrary | None = None,
    progress: Callable[[str], None] | None = None,
    symmetry: SymmetryCopies | None = None,
) -> AlignmentResult:
    """Align a batch of preprocessed images (B, box, box) at ``pixel_size_angstrom``.

    ``rotations``/``shifts_angstrom`` (the host program's poses) are needed with
    ``config.fixed_poses`` (amplitudes only) or ``config.local_poses`` (start from them, no
    global search); with ``local_poses`` ``rotations`` may hold several candidates per particle
    (B, C, 3, 3) (e.g. a network's top-k), each refined, the best kept; ``amplitudes``
    (B, M), optional, start the refinement there (e.g. a network's prediction) instead of
    ``config.amplitude_starts``. ``final_reference``, if
    given, renders the template of the last refinement stage (e.g. every atom, while the search
    and the first stage use residue blobs). ``library``: the global-search library of
    ``reference`` at this box and pixel size (`SearchLibrary.build`); built here when None.
    ``symmetry`` (`SymmetryCopies` of ``reference``): a pseudo-symmetric reference; each
    particle's best candidate is expanded into its equivalent poses and the best of them kept
    (module docstring; not with ``fixed_poses``). ``extra["symmetry_element"]`` says which
    (0: the candidate's own pose).
    """
    device = images.device
    b, box, _ = images.shape
    if not torch.isfinite(images).all():
        raise InputError("images contain NaN or infinite values")
    spectra = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    ctf_full = ctf_2d(ctf, box_size_px=box, pixel_size_angstrom=pixel_size_angstrom)
    if config.ctf == "flip":
        spectra = spectra * torch.sign(ctf_full)
        ctf_for_template: torch.Tensor | None = None
    else:
        ctf_for_template = ctf_full
    m = reference.modes.shape[0]
    if config.fixed_poses or config.local_poses:
        if rotations is None or shifts_angstrom is None:
            raise InputError("the particles have no poses; run without --fixed/--local poses")
        rot_c = rotations.to(device, torch.float32)
        rot_c = rot_c[:, None] if rot_c.ndim == 3 else rot_c  # (B, C, 3, 3) candidates
        org_c = shifts_angstrom.to(device, torch.float32)
        org_c = org_c[:, None] if org_c.ndim == 2 else org_c
        org_c = org_c.expand(b, rot_c.shape[1], 2).contiguous()
    else:
        if library is None:
            library = SearchLibrary.build(reference, config, box, pixel_size_angstrom, device)
        elif (library.band.band.box_size_px, library.band.band.pixel_size_angstrom) != (
            box,
            pixel_size_angstrom,
        ):
            raise ValueError("the search library was built for another box or pixel size")
        rot_c, org_c, _, _ = _global_search(
            spectra, ctf_for_template, library, config, config.n_candidates
        )
        if progress:
            progress("search")
    n_c = rot_c.shape[1]
    starts = [float(a) for a in config.amplitude_starts] if m and amplitudes is None else [0.0]
    # candidates x amplitude starts (on the first mode)
    rot_all = rot_c.repeat_interleave(len(starts), dim=1)
    org_all = org_c.repeat_interleave(len(starts), dim=1)
    q_all = torch.zeros(b, n_c * len(starts), m, device=device)
    if m:
        q_all[..., 0] = torch.tensor(starts, device=device).repeat(n_c)
    if amplitudes is not None:
        q_all = q_all + amplitudes.to(device, torch.float32)[:, None, :]
    elastic = None if library is None or amplitudes is not None else library.elastic
    if elastic is not None:  # candidates of the deformed references, with their amplitudes
        rot_e, org_e, _, q_e = _global_search(
            spectra, ctf_for_template, elastic, config, config.elastic_candidates
        )
        assert q_e is not None
        rot_all = torch.cat([rot_all, rot_e], dim=1)
        org_all = torch.cat([org_all, org_e], dim=1)
        q_all = torch.cat([q_all, q_e], dim=1)
    if symmetry is not None and symmetry.amplitude_maps.shape[1] != m:
        raise ValueError("the symmetry copies were built for another reference (modes differ)")
    chosen: list[torch.Tensor] = []
    q, rot, org, ncc, moving = _refine_candidates(
        spectra, ctf_for_template, reference, final_reference, rot_all, org_all, q_all, config,
        box, pixel_size_angstrom, progress, symmetry, chosen,
    )  # fmt: skip
    which = chosen[0]
    if (
        config.population_centres > 0
        and m
        and library is not None
        and amplitudes is None
        and b >= 2 * config.population_centres
    ):  # second pass: references deformed to where this batch's particles went
        centres = _population_centres(q, ncc, config.population_centres, reference)
        pop = SearchLibrary.build(
            reference, config, box, pixel_size_angstrom, device, elastic=True, amplitudes=centres
        )
        rot_p, org_p, _, q_p = _global_search(
            spectra, ctf_for_template, pop, config, config.elastic_candidates
        )
        assert q_p is not None
        q2, rot2, org2, ncc2, moving2 = _refine_candidates(
            spectra, ctf_for_template, reference, final_reference, rot_p, org_p, q_p, config,
            box, pixel_size_angstrom, progress, symmetry, chosen,
        )  # fmt: skip
        which2 = chosen[0]
        better = torch.isfinite(ncc2) & ~(ncc2 <= ncc)  # NaN in pass 1 loses too
        q[better], rot[better], org[better] = q2[better], rot2[better], org2[better]
        ncc[better], moving[better], which[better] = ncc2[better], moving2[better], which2[better]
    ok = torch.isfinite(ncc) & torch.isfinite(q).all(dim=1) & torch.isfinite(rot).all(dim=(1, 2))
    cost = torch.where(ok, 1.0 - ncc, torch.full_like(ncc, float("nan")))
    return AlignmentResult(
        amplitudes=q.double().cpu().numpy(),
        rotations=rot.double().cpu().numpy(),
        shifts_angstrom=org.double().cpu().numpy(),
        cost=cost.double().cpu().numpy(),
        converged=ok.cpu().numpy(),
        extra={"at_limit": moving.cpu().numpy(), "symmetry_element": which.cpu().numpy()},
    )


def mahalanobis_outliers(
    amplitudes: NDArray[np.floating], threshold: float = 3.2
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Particles whose amplitudes lie far from the majority (the reference's rule).

    Mahalanobis distance ``sqrt((x - mean)^T C^-1 (x - mean))`` with the sample mean and
    covariance of the finite rows; distance > ``threshold`` (default 3.2) marks an outlier,
    and a row with NaN (a particle that failed) is an outlier with infinite distance.

    Returns
    -------
    outlier : bool array (n,)
    distance : array (n,)
    """
    x = np.asarray(amplitudes, dtype=np.float64)
    if threshold <= 0:
        raise InputError(f"the outlier threshold must be > 0, got {threshold}")
    finite = np.all(np.isfinite(x), axis=1)
    if x.ndim != 2 or finite.sum() < x.shape[1] + 2:
        raise InputError(
            f"outlier removal needs more particles ({int(finite.sum())}) than modes + 1 "
            f"({x.shape[1] + 1})"
        )
    mean = x[finite].mean(axis=0)
    cov = np.atleast_2d(np.cov(x[finite], rowvar=False))
    diff = x[finite] - mean
    distance = np.full(len(x), np.inf)
    distance[finite] = np.sqrt(np.einsum("ij,ij->i", diff @ np.linalg.pinv(cov), diff))
    return distance > threshold, distance
