"""Flexible fitting of an atomic model into a density map along its normal modes.

HEMNMA explains each particle by the reference deformed along a few modes; when a population
sits far from the reference (adenylate kinase closing: the open form's modes leave 1.86 Å Cα
RMSD to the closed form at best, and the closed particles' poses then err by 3.5-6°), the
reference itself must move. A map of that population (a group that ``analyze`` wrote,
reconstructed by the host) shows where it goes; `fit_to_map` deforms the reference into it, as
NMFF (Tama et al. 2004) and iMODfit (Lopéz-Blanco & Chacón 2013) do:

* the model's density is compared with the map **in Fourier space, within a resolution band**:
  the map's coefficients up to ``1 / resolution`` against the model's, each point a Gaussian of
  width ``0.225 x resolution`` (Chimera's ``molmap``), exact (no grid, no aliasing); the score is
  their normalised cross-correlation (the real-space correlation of both maps low-passed to the
  band, the mean excluded), differentiable in the coordinates;
* the model moves along its flexible modes (amplitudes in Å of RMS displacement, linearly or
  following the local rotations, `nma.deform`), plus a rigid rotation about its centroid and a
  translation; a weak elastic penalty ``stiffness x sum_k (lambda_k / lambda_1) d_k^2`` (d in Å
  RMS) keeps the stiff modes from fitting noise; L-BFGS maximises the score;
* coarse to fine (the first cycle at twice, 1.4 times and once the resolution), and the modes
  are **recomputed on the deformed model** after each cycle (``cycles``), so that a hinge can
  close further than one set of modes, computed on the open form, reaches.
* finally (``local_restraint``), a **local refinement**: every node moves freely, with the
  atoms that follow it, held by springs between nodes closer than 10 Å to the distances of the
  mode fit (``local_restraint x`` the mean squared change of their lengths, Å²) and, ten times
  firmer, by its chain bonds at their starting length. The modes leave the domains' inner
  rearrangements out (closed adenylate kinase fitted from the open form into a map of 600
  particles that RELION made: 1.34 Å Cα RMSD to 1AKE after the modes, 0.94 Å after this stage,
  and the second round's poses 2.47° -> 2.22° median error, `bench_relion_project.py`).

Frames: with ``centre="map"`` the model's node centroid sits on the map's rotation centre
(voxel ``n // 2`` of each axis), as in a map reconstructed from particles that were aligned
against this model; ``"model"`` uses the model's coordinates and the map's origin as they are
(a model already placed in the map). The fitted coordinates are returned in the model's frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray

from .alignment.hemnma import ReferenceModel
from .errors import InputError
from .nma import NormalModes, compute_normal_modes
from .structure import DensityMap

__all__ = ["FitStage", "MapBand", "MapFit", "fit_to_map", "render_map"]

#: Gaussian width of a point per Å of resolution (Chimera's molmap: 1 / (pi sqrt 2)).
SIGMA_PER_RESOLUTION = 1.0 / (math.pi * math.sqrt(2.0))
#: Above this many atoms the density is rendered from residue blobs (as `align` does).
MAX_RENDERED_ATOMS = 10_000
#: The local refinement's springs join nodes closer than this (Å): neighbours along the chain
#: and across contacts, which keep secondary structure and packing while domains rearrange.
LOCAL_SPRING_CUTOFF_ANGSTROM = 10.0
#: L-BFGS iterations of the local refinement.
LOCAL_ITERATIONS = 200
#: The local refinement holds consecutive nodes closer than this (Å, in the starting model:
#: bonded Cα, 3.8 Å) to their starting distance, this many times more firmly than the other
#: springs: the mode fit's large non-linear moves stretch some of them by up to 2.5 Å.
BOND_MAX_ANGSTROM, BOND_WEIGHT = 4.5, 10.0


@dataclass(frozen=True)
class MapBand:
    """A map's Fourier coefficients within ``1 / resolution``, phases referred to ``shift``.

    ``k`` (K, 3) spatial frequencies (1/Å, x y z), ``values`` (K,) complex, ``weight`` (K,) the
    Hermitian multiplicity (2 for the half-space coefficients that stand for their conjugate).
    A point at ``y`` in the model's frame sits at ``y + shift`` in the map.
    """

    k: NDArray[np.float64]
    values: NDArray[np.complex128]
    weight: NDArray[np.float64]
    resolution_angstrom: float

    @classmethod
    def create(
        cls, density: DensityMap, resolution_angstrom: float, shift_angstrom: NDArray[np.float64]
    ) -> MapBand:
        data = np.asarray(density.data, dtype=np.float64)
        if data.ndim != 3 or min(data.shape) < 4:
            raise InputError(f"{density.name or 'map'}: a 3D map is needed, got {data.shape}")
        nx = data.shape[2]
        vx, vy, vz = (float(v) for v in density.voxel_size_angstrom)
        nyquist = 2 * max(vx, vy, vz)
        if resolution_angstrom < nyquist:
            raise InputError(
                f"resolution {resolution_angstrom:g} Å is finer than the map's Nyquist limit "
                f"({nyquist:g} Å); fit at {nyquist:g} Å or coarser"
            )
        spectrum = np.fft.rfftn(data)
        kx, ky, kz = _frequencies(data.shape, (vx, vy, vz))
        k2 = kx**2 + ky**2 + kz**2
        inside = (k2 <= 1.0 / resolution_angstrom**2) & (k2 > 0)
        k = np.stack([kx[inside], ky[inside], kz[inside]], axis=1)
        # voxel (0, 0, 0) sits at the origin: the coefficients refer to it; move them to `shift`
        origin = np.asarray(density.origin_angstrom, dtype=np.float64)
        phase = np.exp(2j * np.pi * (k @ (np.asarray(shift_angstrom, dtype=np.float64) - origin)))
        values = spectrum[inside] * phase
        ix = np.broadcast_to(np.arange(kx.shape[-1]), kx.shape)[inside]
        edge = (ix == 0) | ((nx % 2 == 0) & (ix == nx // 2))
        weight = np.where(edge, 1.0, 2.0)
        if np.sum(weight * np.abs(values) ** 2) <= 0:
            raise InputError(
                f"{density.name or 'map'}: no density within {resolution_angstrom:g} Å "
                "(an empty or constant map?)"
            )
        return cls(k, values, weight, float(resolution_angstrom))


def _frequencies(
    shape: tuple[int, ...], voxel_angstrom: tuple[float, float, float]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Spatial frequencies (1/Å) kx, ky, kz of every coefficient of ``np.fft.rfftn`` of a map
    of ``shape`` (nz, ny, nx) with voxel sizes (x, y, z), each of rfftn's shape."""
    nz, ny, nx = shape
    vx, vy, vz = voxel_angstrom
    fz, fy, fx = np.fft.fftfreq(nz, d=vz), np.fft.fftfreq(ny, d=vy), np.fft.rfftfreq(nx, d=vx)
    kz, ky, kx = np.meshgrid(fz, fy, fx, indexing="ij")
    return kx, ky, kz


def _band_density(
    points: torch.Tensor, k: torch.Tensor, sigma: float, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts (K,) of sum_p w_p exp(-2 pi^2 sigma^2 k^2) exp(-2 pi i k.y_p),
    in chunks of frequencies (recomputed in the backward pass) so that memory stays bounded."""
    from torch.utils.checkpoint import checkpoint

    envelope = torch.exp(-2 * math.pi**2 * sigma**2 * (k * k).sum(1))
    w = torch.ones(len(points), dtype=points.dtype) if weights is None else weights

    def chunk(kk: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        phase = (2 * math.pi) * (pts @ kk.T)  # (P, k)
        return torch.stack([w @ torch.cos(phase), -(w @ torch.sin(phase))])

    size = max(1, 4_000_000 // max(len(points), 1))
    parts = []
    for start in range(0, len(k), size):
        kk = k[start : start + size]
        if points.requires_grad:
            parts.append(checkpoint(chunk, kk, points, use_reentrant=False))
        else:
            parts.append(chunk(kk, points))
    both = torch.cat(parts, dim=1) * envelope
    return both[0], both[1]


def render_map(
    coordinates: NDArray[np.floating],
    *,
    shape: tuple[int, int, int],
    voxel_size_angstrom: float,
    resolution_angstrom: float,
    weights: NDArray[np.floating] | None = None,
    centre: Literal["map", "model"] = "map",
) -> DensityMap:
    """The density (nz, ny, nx) of points at ``coordinates`` band-limited to ``1 / resolution``
    (Gaussians of width 0.225 x resolution, exact Fourier coefficients): with ``centre="map"``
    the points' centroid on voxel ``n // 2`` (origin 0), else coordinates as absolute Å."""
    xyz = np.asarray(coordinates, dtype=np.float64)
    nz, ny, nx = shape
    v = float(voxel_size_angstrom)
    kx, ky, kz = _frequencies(shape, (v, v, v))
    k2 = kx**2 + ky**2 + kz**2
    inside = k2 <= 1.0 / resolution_angstrom**2
    k = np.stack([kx[inside], ky[inside], kz[inside]], axis=1)
    if centre == "map":
        xyz = xyz - xyz.mean(axis=0) + np.array([nx // 2, ny // 2, nz // 2]) * v
    pts = torch.as_tensor(xyz)
    w = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
    sigma = SIGMA_PER_RESOLUTION * resolution_angstrom
    re, im = _band_density(pts, torch.as_tensor(k), sigma, w)
    spectrum = np.zeros(kx.shape, dtype=np.complex128)
    spectrum[inside] = re.numpy() + 1j * im.numpy()
    data = np.fft.irfftn(spectrum, s=shape, axes=(0, 1, 2)) / v**3
    return DensityMap(
        data=data.astype(np.float32),
        voxel_size_angstrom=np.full(3, v),
        origin_angstrom=np.zeros(3),
        name="rendered",
    )


@dataclass(frozen=True)
class FitStage:
    """One optimisation: cycle (1-based), resolution, correlation before and after, the
    model's node RMSD from the start of the fit (Å), seconds, and what moved: ``"modes"`` (with
    the rigid body) or ``"local"`` (every node, restrained by springs)."""

    cycle: int
    resolution_angstrom: float
    correlation_before: float
    correlation: float
    rmsd_from_start_angstrom: float
    seconds: float
    moves: str = "modes"


@dataclass(frozen=True)
class MapFit:
    """The fitted model: ``atom_coordinates`` (A, 3) and ``node_coordinates`` (N, 3) in the
    model's frame, the correlation at the final resolution before and after, every stage."""

    atom_coordinates: NDArray[np.float64]
    node_coordinates: NDArray[np.float64]
    correlation_start: float
    correlation: float
    stages: list[FitStage] = field(default_factory=list)

    @property
    def rmsd_from_start_angstrom(self) -> float:
        """Node RMSD between the start and the fitted model, Å."""
        return self.stages[-1].rmsd_from_start_angstrom if self.stages else 0.0


def _rotation(omega_degrees: torch.Tensor) -> torch.Tensor:
    w = omega_degrees * (math.pi / 180.0)
    zero = torch.zeros((), dtype=w.dtype)
    skew = torch.stack(
        [
            torch.stack([zero, -w[2], w[1]]),
            torch.stack([w[2], zero, -w[0]]),
            torch.stack([-w[1], w[0], zero]),
        ]
    )
    return torch.linalg.matrix_exp(skew)


def _ncc(
    re: torch.Tensor, im: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Normalised cross-correlation of two band-limited maps from their coefficients."""
    tre, tim = target.real, target.imag
    cross = (weight * (re * tre + im * tim)).sum()
    norm = torch.sqrt(
        (weight * (re * re + im * im)).sum() * (weight * (tre * tre + tim * tim)).sum()
    )
    return cross / norm.clamp_min(1e-30)


def fit_to_map(
    density: DensityMap,
    modes: NormalModes,
    *,
    atom_coordinates: NDArray[np.floating] | None = None,
    atom_node: NDArray[np.integer] | None = None,
    mode_numbers: Sequence[int] | None = None,
    resolution_angstrom: float = 8.0,
    cycles: int = 3,
    iterations: int = 40,
    deformation: Literal["linear", "nonlinear"] = "nonlinear",
    centre: Literal["map", "model"] = "map",
    stiffness: float = 1e-4,
    local_restraint: float | None = 0.03,
    log: Callable[[str], None] | None = None,
) -> MapFit:
    """Deform the model of ``modes`` into ``density`` (module docstring).

    Parameters
    ----------
    density : DensityMap
        The target map.
    modes : NormalModes
        Modes of the model to fit; recomputed on the deformed model after each cycle with the
        same cutoff and number of modes (not for RTB modes, which are kept).
    atom_coordinates, atom_node : arrays (A, 3), (A,), optional
        The atoms that move with the nodes (default: ``modes``' own, else the nodes); an atom
        with ``atom_node`` -1 follows the rigid-body part only. Rendered when at most 10,000,
        else as one blob per node (weighted by its atoms).
    mode_numbers : sequence of int, optional
        Modes to move along (default: every flexible mode of ``modes``).
    resolution_angstrom : float, default 8
        The fit's band; the first cycle starts at twice this.
    cycles : int, default 3
        Fits, each followed by new modes of the deformed model.
    iterations : int, default 40
        L-BFGS iterations per stage.
    deformation : {"linear", "nonlinear"}, default "nonlinear"
    centre : {"map", "model"}, default "map"
        Where the model sits in the map (module docstring).
    stiffness : float, default 1e-4
        Elastic penalty per Å² of RMS displacement along the softest mode.
    local_restraint : float or None, default 0.03
        Weight (per Å²) of the springs that hold the final local refinement (module
        docstring); None skips that stage. Larger keeps the mode fit's local geometry closer.
    log : callable, optional
        One line per stage.
    """
    if cycles < 1 or iterations < 1:
        raise InputError(f"--cycles and --iterations must be >= 1, got {cycles}, {iterations}")
    if stiffness < 0:
        raise InputError(f"--stiffness must be >= 0, got {stiffness}")
    if local_restraint is not None and not local_restraint > 0:
        raise InputError(
            f"--local-restraint must be > 0, got {local_restraint} (--no-local skips the stage)"
        )
    if centre not in ("map", "model"):
        raise InputError(f"--centre must be map or model, got {centre!r}")
    flexible = [int(m) for m in modes.mode_numbers if m > 6]
    wanted = list(flexible if mode_numbers is None else [int(m) for m in mode_numbers])
    if not wanted or any(m <= 6 for m in wanted):
        raise InputError(f"fit along flexible modes (numbers > 6), got {wanted or 'none'}")
    modes.select(wanted)  # raises when one is missing
    nodes = np.asarray(modes.coordinates, dtype=np.float64)
    if atom_coordinates is None:
        if modes.atom_coordinates is not None and modes.atom_node is not None:
            atom_coordinates, atom_node = modes.atom_coordinates, modes.atom_node
        else:
            atom_coordinates, atom_node = nodes, np.arange(len(nodes))
    atoms = np.asarray(atom_coordinates, dtype=np.float64).copy()
    owner = np.asarray(atom_node, dtype=np.int64)
    if owner.shape != (len(atoms),) or owner.max(initial=-1) >= len(nodes):
        raise InputError("atom_node must give each atom's node (0..N-1, or -1)")
    moving = owner >= 0
    c0 = nodes.mean(axis=0)
    nz, ny, nx = density.data.shape
    map_centre = np.asarray(density.origin_angstrom, dtype=np.float64) + np.array(
        [nx // 2, ny // 2, nz // 2]
    ) * np.asarray(density.voxel_size_angstrom, dtype=np.float64)
    shift = map_centre - c0 if centre == "map" else np.zeros(3)
    template: Literal["atoms", "residues"] = (
        "atoms" if moving.sum() <= MAX_RENDERED_ATOMS else "residues"
    )
    start_nodes = nodes.copy()
    bands: dict[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def band(res: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if res not in bands:
            b = MapBand.create(density, res, shift)
            bands[res] = (
                torch.as_tensor(b.k),
                torch.as_tensor(b.values),
                torch.as_tensor(b.weight),
            )
        return bands[res]

    def score(points: np.ndarray, weights: np.ndarray | None, res: float) -> float:
        k, target, w = band(res)
        sigma = SIGMA_PER_RESOLUTION * res
        wt = None if weights is None else torch.as_tensor(weights)
        with torch.no_grad():
            re, im = _band_density(torch.as_tensor(points), k, sigma, wt)
            return float(_ncc(re, im, target, w))

    def template_score(current_atoms: np.ndarray, current_nodes: np.ndarray) -> float:
        """The correlation at ``resolution_angstrom`` of the points the fit renders."""
        ref = _rendered(current_atoms, current_nodes, owner, template)
        w = None if ref.weights is None else ref.weights.double().numpy()
        return score(ref.coordinates.double().numpy(), w, resolution_angstrom)

    correlation_start = template_score(atoms, nodes)
    stages: list[FitStage] = []
    current = modes
    for cycle in range(1, cycles + 1):
        if cycle > 1:
            current = _recompute(current, nodes, log)
        sel = current.select(wanted)
        centroid = nodes.mean(axis=0)
        kw = {"deformation": deformation, "centre_angstrom": centroid, "device": "cpu"}
        ref = ReferenceModel.from_modes(
            nodes, sel.vectors, wanted, template=template,
            atom_coordinates=atoms[moving], atom_node=owner[moving], **kw,
        )  # fmt: skip
        ref_atoms = ReferenceModel.from_modes(
            nodes, sel.vectors, wanted, template="atoms",
            atom_coordinates=atoms[moving], atom_node=owner[moving], **kw,
        )  # fmt: skip
        ref_nodes = ReferenceModel.from_modes(nodes, sel.vectors, wanted, template="nodes", **kw)
        ref = _double(ref)
        eig = np.asarray(sel.eigenvalues, dtype=np.float64)
        relative = torch.as_tensor(eig / max(float(eig.min()), 1e-12))
        scale = ref.amplitude_scale
        d = torch.zeros(len(wanted), dtype=torch.float64, requires_grad=True)
        omega = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        trans = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        weights = ref.weights
        ladder = (
            [2.0 * resolution_angstrom, math.sqrt(2.0) * resolution_angstrom, resolution_angstrom]
            if cycle == 1
            else [resolution_angstrom]
        )
        for res in ladder:
            t0 = time.perf_counter()
            k, target, w = band(res)
            sigma = SIGMA_PER_RESOLUTION * res

            before = _optimise(
                ref, (d, omega, trans), centroid, (k, target, w), sigma, weights,
                relative * stiffness, 0,
            )  # fmt: skip
            after = _optimise(
                ref, (d, omega, trans), centroid, (k, target, w), sigma, weights,
                relative * stiffness, iterations,
            )  # fmt: skip
            with torch.no_grad():
                q = (d * scale)[None].float()
                rot = _rotation(omega.detach()).numpy()
                moved_nodes = ref_nodes.deformed(q)[0].double().numpy() @ rot.T
                moved_nodes += trans.detach().numpy() + centroid
            rmsd = float(np.sqrt(((moved_nodes - start_nodes) ** 2).sum(1).mean()))
            stages.append(FitStage(cycle, res, before, after, rmsd, time.perf_counter() - t0))
            if log is not None:
                log(
                    f"  cycle {cycle}, {res:5.1f} Å: correlation {before:.4f} -> {after:.4f}, "
                    f"{rmsd:.2f} Å node RMSD from the start, "
                    f"{time.perf_counter() - t0:.1f} s"
                )
        with torch.no_grad():
            q = (d * scale)[None].float()
            rot = _rotation(omega.detach()).numpy()
            tr = trans.detach().numpy() + centroid
            new_atoms = atoms.copy()
            new_atoms[moving] = ref_atoms.deformed(q)[0].double().numpy() @ rot.T + tr
            new_atoms[~moving] = (atoms[~moving] - centroid) @ rot.T + tr
            nodes = ref_nodes.deformed(q)[0].double().numpy() @ rot.T + tr
            atoms = new_atoms
    if local_restraint is not None:
        t0 = time.perf_counter()
        k, target, w = band(resolution_angstrom)
        before = template_score(atoms, nodes)
        atoms, nodes, after = _local_refinement(
            atoms, nodes, start_nodes, owner, template, (k, target, w),
            SIGMA_PER_RESOLUTION * resolution_angstrom, local_restraint,
        )  # fmt: skip
        rmsd = float(np.sqrt(((nodes - start_nodes) ** 2).sum(1).mean()))
        stages.append(
            FitStage(cycles, resolution_angstrom, before, after, rmsd, time.perf_counter() - t0,
                     "local")
        )  # fmt: skip
        if log is not None:
            log(
                f"  local, {resolution_angstrom:5.1f} Å: correlation {before:.4f} -> {after:.4f}, "
                f"{rmsd:.2f} Å node RMSD from the start, {time.perf_counter() - t0:.1f} s"
            )
    return MapFit(
        atom_coordinates=atoms,
        node_coordinates=nodes,
        correlation_start=correlation_start,
        correlation=template_score(atoms, nodes),
        stages=stages,
    )


def _rendered(
    atoms: NDArray[np.float64],
    nodes: NDArray[np.float64],
    owner: NDArray[np.int64],
    template: Literal["atoms", "residues"],
) -> ReferenceModel:
    """The points the fit renders, in the model's frame (`ReferenceModel.from_modes`'
    template without modes: the atoms of a node, or one weighted blob per node)."""
    moving = owner >= 0
    return ReferenceModel.from_modes(
        nodes, np.zeros((0, len(nodes), 3)), [], template=template,
        atom_coordinates=atoms[moving], atom_node=owner[moving], centre_angstrom=np.zeros(3),
    )  # fmt: skip


def _local_refinement(
    atoms: NDArray[np.float64],
    nodes: NDArray[np.float64],
    start_nodes: NDArray[np.float64],
    owner: NDArray[np.int64],
    template: Literal["atoms", "residues"],
    band: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sigma: float,
    restraint: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """Every node displaced freely (its atoms with it; atoms of no node stay), maximising the
    band's correlation minus ``restraint x`` the mean squared change (Å²) of the lengths of the
    springs between nodes closer than `LOCAL_SPRING_CUTOFF_ANGSTROM`, and ``BOND_WEIGHT x`` as
    much for the change of consecutive nodes' distances from their value in ``start_nodes``
    (the model before the fit: bonds the mode fit stretched are restored); (atoms, nodes, the
    correlation reached)."""
    from .nma.network import contact_pairs

    k, target, w = band
    moving = owner >= 0
    nodes_t = torch.as_tensor(nodes, dtype=torch.float64)
    pairs = torch.as_tensor(contact_pairs(nodes, LOCAL_SPRING_CUTOFF_ANGSTROM))
    i, j = pairs[:, 0], pairs[:, 1]
    rest = (nodes_t[i] - nodes_t[j]).norm(dim=1)
    start = torch.as_tensor(start_nodes, dtype=torch.float64)
    gap = (start[1:] - start[:-1]).norm(dim=1)
    bonded = torch.nonzero(gap < BOND_MAX_ANGSTROM).flatten()  # (chain breaks left out)
    bond_length = gap[bonded]
    # the points rendered, as the mode fit renders them, and the node each one follows
    ref = _rendered(atoms, nodes, owner, template)
    points = ref.coordinates.double()
    follows = torch.as_tensor(owner[moving] if template == "atoms" else np.arange(len(nodes)))
    weights = None if ref.weights is None else ref.weights.double()
    shift = torch.zeros_like(nodes_t, requires_grad=True)

    def correlation() -> torch.Tensor:
        re, im = _band_density(points + shift[follows], k, sigma, weights)
        return _ncc(re, im, target, w)

    opt = torch.optim.LBFGS(
        [shift], lr=1.0, max_iter=LOCAL_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        moved = nodes_t + shift
        strain = (((moved[i] - moved[j]).norm(dim=1) - rest) ** 2).mean() if len(i) else 0.0
        if len(bonded):
            bonds = (moved[bonded + 1] - moved[bonded]).norm(dim=1)
            strain = strain + BOND_WEIGHT * ((bonds - bond_length) ** 2).mean()
        loss = -correlation() + restraint * strain
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        reached = float(correlation())
        d = shift.detach().numpy()
    new_atoms = atoms.copy()
    new_atoms[moving] += d[owner[moving]]
    return new_atoms, nodes + d, reached


def _optimise(
    ref: ReferenceModel,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    centroid: NDArray[np.float64],
    band: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sigma: float,
    weights: torch.Tensor | None,
    penalty: torch.Tensor,
    iterations: int,
) -> float:
    """L-BFGS on (amplitudes in Å RMS, rotation in degrees, translation in Å) for
    ``iterations`` (0: none); returns the correlation reached (the penalty left out)."""
    d, omega, trans = params
    k, target, w = band
    scale, centre = ref.amplitude_scale, torch.as_tensor(centroid)

    def correlation() -> torch.Tensor:
        x = ref.deformed((d * scale)[None])[0] @ _rotation(omega).T + trans + centre
        re, im = _band_density(x, k, sigma, weights)
        return _ncc(re, im, target, w)

    if iterations:
        opt = torch.optim.LBFGS(
            [d, omega, trans], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = -correlation() + (penalty * d * d).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return float(correlation())


def _double(ref: ReferenceModel) -> ReferenceModel:
    """The reference in float64 (the fit's gradients are small)."""
    from dataclasses import replace

    return replace(
        ref,
        coordinates=ref.coordinates.double(),
        modes=ref.modes.double(),
        weights=None if ref.weights is None else ref.weights.double(),
        spins=None if ref.spins is None else ref.spins.double(),
    )


def _recompute(
    modes: NormalModes, nodes: NDArray[np.float64], log: Callable[[str], None] | None
) -> NormalModes:
    """Modes of the deformed nodes with the original's settings (RTB modes are kept)."""
    s = modes.settings
    if s.get("method") == "rtb":
        if log is not None:
            log("  RTB modes are not recomputed on the deformed model (the blocks are not stored)")
        return modes
    return compute_normal_modes(
        nodes,
        n_modes=len(modes.mode_numbers),
        cutoff_angstrom=float(s["cutoff_angstrom"]) if "cutoff_angstrom" in s else None,
        method="auto",
        settings={k: v for k, v in s.items() if k in ("model", "nodes", "chains")},
    )
