"""Synthetic particle images with ground truth (the paper's benchmark, METHOD.md section 6).

Core only (arrays in, arrays out); ``deephemnma simulate`` (``cli/simulate.py``) reads the model
and writes the files. Every value is a `SimulationConfig` field:

* **Amplitudes** of the selected modes, per particle, with ``t ~ U(0, 1)``:
  ``"helix"``: ``q(t) = s * h(t)`` with ``h = (cos 2 pi T t, sin 2 pi T t, 2t - 1,
  sin(pi 3 t), sin(pi 4 t), ...)`` truncated to the number of modes M (M = 1: ``2t - 1``) and
  ``T = helix_turns``; ``"uniform"``: ``q ~ s * U(-1, 1)^M``; ``"clusters"``: ``n_clusters``
  centres ``~ U(-1, 1)^M``, points = centre + ``0.15 N(0, 1)``, times ``s``. The scale ``s``
  makes the largest RMS node displacement (over a fine ``t`` grid for the helix, over the drawn
  samples otherwise) equal ``max_rms_displacement_angstrom``.
* **Orientations** uniform over SO(3) (``scipy Rotation.random``), **shifts** (RELION origins)
  uniform in ``±shift_range_px`` pixels, **defocus** ``defocus_angstrom`` plus
  ``U(-spread, spread)`` (no astigmatism).
* **Another conformation** (optional, `place_conformation`): the atoms rendered may belong to
  another model of the same molecule (e.g. closed 1AKE rendered in the frame of open 4AKE's
  modes), its network nodes matched one to one with the modes' nodes. By default it is first
  superposed on the modes' nodes (Kabsch, least squares over the matched nodes); it is rotated
  about the SAME centre as the reference (the centroid of the modes' nodes), so the written poses
  are those of the modes' frame. Its true amplitudes are the least-squares amplitudes of its node
  displacement ``d = other - reference`` in the selected modes (``q = U^+ d``: the dot products
  ``q_m = sum_i u_mi . d_i`` for orthonormal modes), added to the drawn ones in the written
  ground truth; `project_displacement` also gives the fraction ``|U q|^2 / |d|^2`` they carry.
* **Image**: the deformed model (atoms moving with their residue's node, or the nodes) projected
  by the forward model of `alignment.render` (RELION conventions), CTF-modulated with noise
  before and after the CTF (``noise_before_ctf_fraction`` of the noise variance, as seen in the
  final image, comes from before the CTF).
* **SNR** (pinned): for every particle, variance of the noiseless CTF-modulated image over the
  whole box divided by the variance of the added noise (both parts, as they appear in the
  image). ``protocol="direct"`` defines it at the output size. ``protocol="paper"`` renders at
  twice the box and half the pixel (256 px, 0.325 Å by default), defines the SNR there, then
  phase-flips and Fourier-crops to the output box: the written images are phase-flipped.
  `SimulationStats` measures the whole-box SNR and the SNR inside the bands below 10 Å and 7 Å
  on the written images.

Random streams are fixed by ``seed``: the parameters use ``numpy.random.default_rng(seed)``,
the noise of chunk ``c`` a torch CPU generator seeded with ``seed * 1_000_003 + c + 1``, so the
output does not depend on the device or on how the caller consumes chunks.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from .alignment.ctf import CTFParams, ctf_2d, fourier_frequencies, phase_flip
from .alignment.render import render_projections
from .conventions import matrix_to_euler
from .errors import InputError
from .particles import ParticleTable
from .preprocess import fourier_crop

__all__ = [
    "Conformation",
    "SimulatedChunk",
    "SimulationConfig",
    "SimulationModel",
    "SimulationStats",
    "SimulationTruth",
    "check_simulation",
    "draw_truth",
    "place_conformation",
    "project_displacement",
    "simulate_images",
    "simulation_table",
    "superpose",
]

BANDS_ANGSTROM = (10.0, 7.0)


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of a simulation (see the module docstring for the formulas)."""

    n_particles: int
    box_size_px: int = 128
    pixel_size_angstrom: float = 0.65
    snr: float = 0.1
    noise_before_ctf_fraction: float = 0.5
    amplitudes: Literal["helix", "uniform", "clusters"] = "helix"
    max_rms_displacement_angstrom: float = 3.0
    helix_turns: float = 2.0
    n_clusters: int = 4
    shift_range_px: float = 5.0
    voltage_kv: float = 200.0
    spherical_aberration_mm: float = 2.0
    amplitude_contrast: float = 0.1
    defocus_angstrom: float = 5000.0
    defocus_spread_angstrom: float = 0.0
    protocol: Literal["direct", "paper"] = "direct"
    sigma_angstrom: float = 1.0
    seed: int = 0
    chunk_size: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(
                    f"simulation setting {f.name} must be a finite number, got {value}"
                )
        if self.n_particles < 1:
            raise InputError(f"--n must be >= 1, got {self.n_particles}")
        if self.snr <= 0 or not math.isfinite(self.snr):
            raise InputError(f"--snr must be a positive number, got {self.snr}")
        if self.pixel_size_angstrom <= 0:
            raise InputError(f"--pixel-size must be > 0 Å, got {self.pixel_size_angstrom}")
        if self.box_size_px < 16:
            raise InputError(f"--box must be >= 16 px, got {self.box_size_px}")
        if not 0 <= self.noise_before_ctf_fraction <= 1:
            raise InputError("noise_before_ctf_fraction must be in [0, 1]")
        if self.amplitudes not in ("helix", "uniform", "clusters"):
            raise InputError(
                f"--amplitudes must be helix, uniform or clusters, got {self.amplitudes!r}"
            )
        if self.protocol not in ("direct", "paper"):
            raise InputError(f"--protocol must be direct or paper, got {self.protocol!r}")
        if self.max_rms_displacement_angstrom < 0 or self.sigma_angstrom <= 0:
            raise InputError("amplitude scale must be >= 0 and Gaussian sigma > 0 Å")
        if self.defocus_angstrom - self.defocus_spread_angstrom <= 0:
            raise InputError("defocus minus its spread must stay > 0 Å (underfocus)")

    @property
    def render_box_px(self) -> int:
        """Side of the images as rendered (twice the box for the paper protocol)."""
        return self.box_size_px * (2 if self.protocol == "paper" else 1)

    @property
    def render_pixel_angstrom(self) -> float:
        """Pixel size as rendered."""
        return self.pixel_size_angstrom / (2 if self.protocol == "paper" else 1)


@dataclass(frozen=True, eq=False)
class SimulationModel:
    """What is rendered, centred on the centroid of the nodes (the rotation centre).

    Attributes
    ----------
    node_coordinates : array (N, 3)
        Network nodes, Å, centred.
    modes : array (M, N, 3)
        The selected mode vectors.
    mode_numbers : array (M,)
        Their 1-based numbers.
    render_coordinates : array (K, 3)
        Points rendered (atoms or the nodes themselves), Å, same centring.
    render_node : array (K,)
        Node each rendered point moves with.
    centre_angstrom : array (3,)
        What was subtracted from the input coordinates.
    amplitude_offset : array (M,)
        Amplitudes of the rendered points themselves in the selected modes: zero for the
        reference, the projection of its node displacement for another conformation
        (`place_conformation`); added to the drawn amplitudes in the written ground truth.
    """

    node_coordinates: NDArray[np.float64]
    modes: NDArray[np.float64]
    mode_numbers: NDArray[np.int64]
    render_coordinates: NDArray[np.float64]
    render_node: NDArray[np.int64]
    centre_angstrom: NDArray[np.float64]
    amplitude_offset: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        m = self.modes.shape[0]
        offset = np.asarray(self.amplitude_offset, dtype=np.float64)
        if offset.size == 0:
            offset = np.zeros(m)
        if offset.shape != (m,):
            raise InputError(f"amplitude_offset needs one value per mode ({m}), got {offset.shape}")
        object.__setattr__(self, "amplitude_offset", offset)

    @classmethod
    def from_arrays(
        cls,
        node_coordinates: NDArray[np.floating],
        vectors: NDArray[np.floating],
        mode_numbers: Sequence[int] | NDArray[np.integer],
        use_modes: Sequence[int],
        *,
        atom_coordinates: NDArray[np.floating] | None = None,
        atom_node: NDArray[np.integer] | None = None,
        conformation_nodes: NDArray[np.floating] | None = None,
    ) -> SimulationModel:
        """Select ``use_modes`` (1-based numbers) and centre; atoms with node -1 are dropped.

        Without atoms, the nodes are rendered (``--render nodes``). ``conformation_nodes``
        (N, 3), same frame and node order as ``node_coordinates``: the rendered points belong to
        another conformation whose nodes are these (`place_conformation`); the model is still
        centred on the centroid of ``node_coordinates`` and ``amplitude_offset`` is the
        projection of ``conformation_nodes - node_coordinates`` on the selected modes.
        """
        nodes = np.asarray(node_coordinates, dtype=np.float64)
        vec = np.asarray(vectors, dtype=np.float64)
        numbers = [int(m) for m in np.asarray(mode_numbers).tolist()]
        missing = [m for m in use_modes if m not in numbers]
        if missing:
            raise InputError(
                f"mode numbers {missing} are not in the modes file (it has "
                f"{numbers[0]}..{numbers[-1]}); choose --use-modes among those"
            )
        rigid = [m for m in use_modes if m <= 6]
        if rigid:
            warnings.warn(f"modes {rigid} are rigid-body modes (1-6)", UserWarning, stacklevel=2)
        sel = np.array([numbers.index(m) for m in use_modes], dtype=np.intp)
        centre = nodes.mean(axis=0)
        if atom_coordinates is None:
            points, owner = nodes, np.arange(len(nodes))
        else:
            if atom_node is None:
                raise InputError("atom coordinates need the atom -> node mapping (atom_node)")
            owner = np.asarray(atom_node, dtype=np.int64)
            keep = owner >= 0
            points, owner = np.asarray(atom_coordinates, dtype=np.float64)[keep], owner[keep]
            if owner.size == 0:
                raise InputError("no atom belongs to a network node; use --render nodes")
        offset = np.zeros(len(sel))
        if conformation_nodes is not None:
            other = np.asarray(conformation_nodes, dtype=np.float64)
            if other.shape != nodes.shape:
                raise InputError(
                    f"the other conformation has {other.shape[0]} nodes, the modes' network "
                    f"{nodes.shape[0]}: they must match one to one"
                )
            offset = project_displacement(vec[sel], other - nodes)[0]
        return cls(
            nodes - centre,
            vec[sel],
            np.asarray(use_modes, dtype=np.int64),
            points - centre,
            owner,
            centre,
            offset,
        )

    def rms_displacement(self, amplitudes: NDArray[np.float64]) -> NDArray[np.float64]:
        """RMS node displacement (Å) for amplitudes (..., M)."""
        disp = np.einsum("...m,mnk->...nk", amplitudes, self.modes)
        return np.sqrt((disp**2).sum(-1).mean(-1))


def project_displacement(
    vectors: NDArray[np.floating], displacement: NDArray[np.floating]
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """Amplitudes of a node displacement (N, 3) in modes (M, N, 3), in the modes' unit.

    Returns ``(q, per_mode, carried)``: ``q`` (M,) the least-squares amplitudes (``U^+ d``:
    the dot products ``sum_i u_mi . d_i`` when the vectors are orthonormal, as ANM modes are),
    so ``q_m`` displaces node i by ``q_m u_mi`` Å; ``per_mode`` (M,) ``q_m^2 |u_m|^2 / |d|^2``;
    ``carried`` the fraction ``|U q|^2 / |d|^2`` of the squared displacement they represent.
    """
    u = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1).T  # (3N, M)
    d = np.asarray(displacement, dtype=np.float64).ravel()
    if u.shape[0] != d.size:
        raise InputError(f"displacement of {d.size // 3} nodes for modes of {u.shape[0] // 3}")
    q: NDArray[np.float64] = np.asarray(np.linalg.lstsq(u, d, rcond=None)[0], dtype=np.float64)
    total = float(d @ d)
    if total == 0:
        return q, np.zeros(len(q)), 0.0
    per_mode = q**2 * (u**2).sum(axis=0) / total
    return q, per_mode, float(np.sum((u @ q) ** 2) / total)


def superpose(
    mobile: NDArray[np.floating], target: NDArray[np.floating]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Rotation R (3, 3) and translation t (3,) minimising ``sum |R x + t - y|^2`` (Kabsch)."""
    x = np.asarray(mobile, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[1] != 3 or len(x) < 3:
        raise InputError(
            f"superposition needs two (N >= 3, 3) point sets, got {x.shape}, {y.shape}"
        )
    cx, cy = x.mean(axis=0), y.mean(axis=0)
    h = (x - cx).T @ (y - cy)
    u, _, vt = np.linalg.svd(h)
    sign = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, sign]) @ u.T
    return rot, cy - rot @ cx


@dataclass(frozen=True, eq=False)
class Conformation:
    """Another conformation placed in the frame of the modes' nodes (`place_conformation`).

    Attributes
    ----------
    node_coordinates : array (N, 3)
        Its nodes, matched one to one (same order) with the modes' nodes, in their frame.
    render_coordinates : array (K, 3)
        Its points to render (atoms or nodes), same transform.
    render_node : array (K,)
        Node (of the modes' network) each point moves with.
    rotation, translation : arrays (3, 3), (3,)
        Transform applied to the input coordinates (identity when not superposed).
    rmsd_as_given, rmsd_angstrom : float
        Node RMSD to the modes' nodes before and after the transform.
    superposed : bool
    """

    node_coordinates: NDArray[np.float64]
    render_coordinates: NDArray[np.float64]
    render_node: NDArray[np.int64]
    rotation: NDArray[np.float64]
    translation: NDArray[np.float64]
    rmsd_as_given: float
    rmsd_angstrom: float
    superposed: bool


def place_conformation(
    reference_nodes: NDArray[np.floating],
    other_nodes: NDArray[np.floating],
    other_points: NDArray[np.floating],
    other_point_node: NDArray[np.integer],
    *,
    superpose_nodes: bool = True,
) -> Conformation:
    """Put another conformation in the reference's frame.

    ``other_nodes`` (N, 3) are matched in order with ``reference_nodes`` (N, 3);
    ``other_points`` (K, 3) move with node ``other_point_node`` (K,) (-1: none, dropped). With
    ``superpose_nodes`` the other model is moved rigidly onto the reference nodes (Kabsch),
    otherwise it is taken as given (already superposed).
    """
    ref = np.asarray(reference_nodes, dtype=np.float64)
    other = np.asarray(other_nodes, dtype=np.float64)
    if other.shape != ref.shape:
        raise InputError(
            f"the other conformation has {len(other)} network nodes and the modes' network "
            f"{len(ref)}: they must match one to one (select the same chains and residues)"
        )
    owner = np.asarray(other_point_node, dtype=np.int64)
    points = np.asarray(other_points, dtype=np.float64)
    if points.shape != (len(owner), 3):
        raise InputError("each rendered point of the other conformation needs its node")
    keep = owner >= 0
    points, owner = points[keep], owner[keep]
    if owner.size == 0 or owner.max() >= len(ref):
        raise InputError("the other conformation's points must move with its matched nodes")

    def rms(a: NDArray[np.float64]) -> float:
        return float(np.sqrt(((a - ref) ** 2).sum(axis=1).mean()))

    rot, shift = superpose(other, ref) if superpose_nodes else (np.eye(3), np.zeros(3))
    moved = other @ rot.T + shift
    return Conformation(
        moved,
        points @ rot.T + shift,
        owner,
        rot,
        shift,
        rms(other),
        rms(moved),
        superpose_nodes,
    )


@dataclass(frozen=True, eq=False)
class SimulationTruth:
    """Ground truth of n particles (RELION conventions)."""

    amplitudes: NDArray[np.float64]  # (n, M), drawn (model.amplitude_offset not included)
    trajectory_t: NDArray[np.float64]  # (n,), NaN unless helix
    cluster: NDArray[np.int64]  # (n,), -1 unless clusters
    rotation_matrices: NDArray[np.float64]  # (n, 3, 3)
    shifts_angstrom: NDArray[np.float64]  # (n, 2) RELION origins
    defocus_angstrom: NDArray[np.float64]  # (n,)
    amplitude_scale: float


def _helix(t: NDArray[np.float64], m: int, turns: float) -> NDArray[np.float64]:
    if m == 1:
        return (2 * t - 1)[:, None]
    cols = [np.cos(2 * np.pi * turns * t), np.sin(2 * np.pi * turns * t)]
    if m >= 3:
        cols.append(2 * t - 1)
    cols += [np.sin(np.pi * (j + 1) * t) for j in range(3, m)]
    return np.stack(cols, axis=1)


def draw_truth(config: SimulationConfig, model: SimulationModel) -> SimulationTruth:
    """Draw amplitudes, poses, shifts and defocus for ``config.n_particles`` particles."""
    rng = np.random.default_rng(config.seed)
    n, m = config.n_particles, model.modes.shape[0]
    t = np.full(n, np.nan)
    cluster = np.full(n, -1, dtype=np.int64)
    if config.amplitudes == "helix":
        t = rng.uniform(0.0, 1.0, n)
        unit = _helix(t, m, config.helix_turns)
        ref = model.rms_displacement(_helix(np.linspace(0, 1, 1001), m, config.helix_turns)).max()
    elif config.amplitudes == "uniform":
        unit = rng.uniform(-1.0, 1.0, (n, m))
        ref = model.rms_displacement(unit).max()
    else:
        centres = rng.uniform(-1.0, 1.0, (config.n_clusters, m))
        cluster = rng.integers(0, config.n_clusters, n)
        unit = centres[cluster] + 0.15 * rng.standard_normal((n, m))
        ref = model.rms_displacement(unit).max()
    scale = config.max_rms_displacement_angstrom / ref if ref > 0 else 0.0
    rot = Rotation.random(n, random_state=rng).as_matrix()
    shifts = rng.uniform(-1.0, 1.0, (n, 2)) * config.shift_range_px * config.pixel_size_angstrom
    defocus = config.defocus_angstrom + rng.uniform(-1.0, 1.0, n) * config.defocus_spread_angstrom
    return SimulationTruth(unit * scale, t, cluster, rot, shifts, defocus, float(scale))


def check_simulation(
    config: SimulationConfig, model: SimulationModel, truth: SimulationTruth
) -> None:
    """Error when the box cannot hold the molecule, warn when shifted particles may be cut by the
    box edge or when atoms collide at the largest amplitudes."""
    moved = np.abs(np.einsum("bm,mnk->bnk", truth.amplitudes, model.modes)).max()
    rest = float(np.linalg.norm(model.render_coordinates, axis=1).max())
    radius = rest + float(moved)
    shift = config.shift_range_px * config.pixel_size_angstrom * math.sqrt(2)
    half = config.box_size_px * config.pixel_size_angstrom / 2
    if rest > half:
        need = math.ceil(
            2 * (radius + shift + 2 * config.sigma_angstrom) / config.pixel_size_angstrom
        )
        raise InputError(
            f"the box of {config.box_size_px} px ({2 * half:.1f} Å) is too small for the "
            f"molecule (radius {rest:.1f} Å); use --box {need} or more, or a larger --pixel-size"
        )
    if radius + shift + 2 * config.sigma_angstrom > half:
        warnings.warn(
            f"parts of the molecule (radius {radius:.1f} Å incl. deformation) may leave the "
            f"{2 * half:.1f} Å box when shifted by up to {shift:.1f} Å",
            UserWarning,
            stacklevel=2,
        )
    if len(model.render_coordinates) < 2:
        return
    ref_tree = cKDTree(model.render_coordinates)
    d0, _ = ref_tree.query(model.render_coordinates, k=2)
    floor = min(1.0, 0.5 * float(np.median(d0[:, 1])))
    rms = model.rms_displacement(truth.amplitudes)
    for i in np.argsort(rms)[-3:]:
        disp = np.einsum("m,mnk->nk", truth.amplitudes[i], model.modes)[model.render_node]
        tree = cKDTree(model.render_coordinates + disp)
        pairs = tree.query_pairs(floor, output_type="ndarray")
        ref, owner = model.render_coordinates, model.render_node
        before = np.linalg.norm(ref[pairs[:, 0]] - ref[pairs[:, 1]], axis=1)
        new_contacts = (before >= 1.5 * floor) & (owner[pairs[:, 0]] != owner[pairs[:, 1]])
        pairs = pairs[new_contacts]
        if len(pairs):
            warnings.warn(
                f"{len(pairs)} pairs of atoms come closer than {floor:.2f} Å at the largest "
                f"amplitudes (RMS {rms[i]:.1f} Å): lower the amplitude scale",
                UserWarning,
                stacklevel=2,
            )
            return


@dataclass
class SimulatedChunk:
    """Images ``start .. start + k - 1`` (float32, (k, box, box)); ``clean``: noiseless, same
    processing (only when asked); power sums for `SimulationStats`."""

    start: int
    images: NDArray[np.float32]
    clean: NDArray[np.float32] | None
    signal_power: dict[str, float]
    noise_power: dict[str, float]


def _hermitian_weights(n: int, device: torch.device) -> torch.Tensor:
    """Multiplicity of each ``rfft`` column in the full spectrum (1, n//2+1)."""
    w = torch.full((n // 2 + 1,), 2.0, device=device)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w[None, :]


def _band_powers(
    clean: torch.Tensor, noise: torch.Tensor, pixel: float
) -> tuple[dict[str, float], dict[str, float]]:
    n = int(clean.shape[-1])
    ky, kx = fourier_frequencies(n, pixel, device=clean.device, dtype=clean.dtype)
    k2 = kx * kx + ky * ky
    mult = _hermitian_weights(n, clean.device)
    fs = torch.fft.rfft2(clean).abs().square() * mult
    fn = torch.fft.rfft2(noise).abs().square() * mult
    sig: dict[str, float] = {"whole": float(clean.var(dim=(1, 2), correction=0).sum())}
    noi: dict[str, float] = {"whole": float(noise.var(dim=(1, 2), correction=0).sum())}
    for res in BANDS_ANGSTROM:
        band = ((k2 > 0) & (k2 <= 1 / res**2)).expand_as(fs[0])
        sig[f"{res:g}A"] = float(fs[:, band].sum())
        noi[f"{res:g}A"] = float(fn[:, band].sum())
    return sig, noi


def simulate_images(
    config: SimulationConfig,
    model: SimulationModel,
    truth: SimulationTruth,
    *,
    device: torch.device | str = "cpu",
    keep_clean: bool = False,
) -> Iterator[SimulatedChunk]:
    """Render the particles chunk by chunk (``config.chunk_size``), in order."""
    dev = torch.device(device)
    nr, pr = config.render_box_px, config.render_pixel_angstrom
    coords = torch.as_tensor(model.render_coordinates, dtype=torch.float32, device=dev)
    modes = torch.as_tensor(model.modes[:, model.render_node], dtype=torch.float32, device=dev)
    f = config.noise_before_ctf_fraction
    for c, start in enumerate(range(0, config.n_particles, config.chunk_size)):
        rows = np.arange(start, min(start + config.chunk_size, config.n_particles))
        k = len(rows)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + c + 1)
        white = torch.randn(2, k, nr, nr, generator=gen).to(dev)

        def t(a: NDArray[np.float64]) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float32, device=dev)

        with torch.no_grad():
            proj = render_projections(
                coords,
                modes,
                t(truth.amplitudes[rows]),
                t(truth.rotation_matrices[rows]),
                t(truth.shifts_angstrom[rows]),
                box_size_px=nr,
                pixel_size_angstrom=pr,
                sigma_angstrom=config.sigma_angstrom,
            )
            ctf_params = CTFParams.create(
                defocus_u_angstrom=truth.defocus_angstrom[rows],
                voltage_kv=config.voltage_kv,
                spherical_aberration_mm=config.spherical_aberration_mm,
                amplitude_contrast=config.amplitude_contrast,
                device=dev,
            )
            ctf = ctf_2d(ctf_params, box_size_px=nr, pixel_size_angstrom=pr)
            clean = torch.fft.irfft2(torch.fft.rfft2(proj) * ctf, s=(nr, nr))
            noise_var = clean.var(dim=(1, 2), correction=0) / config.snr  # (k,)
            # variance gain of white noise through the CTF = mean of CTF^2 over the full grid
            gain = (ctf.square() * _hermitian_weights(nr, dev)).sum(dim=(1, 2)) / (nr * nr)
            s1 = torch.sqrt(f * noise_var / gain)[:, None, None]
            s2 = torch.sqrt((1 - f) * noise_var)[:, None, None]
            before = torch.fft.irfft2(torch.fft.rfft2(white[0] * s1) * ctf, s=(nr, nr))
            noise = before + white[1] * s2
            if config.protocol == "paper":
                pix = config.render_pixel_angstrom
                clean = fourier_crop(
                    phase_flip(clean, ctf_params, pixel_size_angstrom=pix), config.box_size_px
                )
                noise = fourier_crop(
                    phase_flip(noise, ctf_params, pixel_size_angstrom=pix), config.box_size_px
                )
            sig, noi = _band_powers(clean, noise, config.pixel_size_angstrom)
            images = (clean + noise).cpu().numpy().astype(np.float32)
        yield SimulatedChunk(
            start, images, clean.cpu().numpy().astype(np.float32) if keep_clean else None, sig, noi
        )


@dataclass
class SimulationStats:
    """Accumulates the measured SNR over chunks: whole box and bands below 10 Å and 7 Å."""

    signal: dict[str, float] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)

    def add(self, chunk: SimulatedChunk) -> None:
        """Add the power sums of one chunk."""
        for key, v in chunk.signal_power.items():
            self.signal[key] = self.signal.get(key, 0.0) + v
            self.noise[key] = self.noise.get(key, 0.0) + chunk.noise_power[key]

    def summary(self) -> dict[str, float]:
        """``{"snr_whole": ..., "snr_10A": ..., "snr_7A": ...}`` (ratios of summed powers)."""
        return {f"snr_{k}": self.signal[k] / self.noise[k] for k in self.signal}


def simulation_table(
    config: SimulationConfig, model: SimulationModel, truth: SimulationTruth, stack_path: str
) -> ParticleTable:
    """The particle table (no poses, zero origins) with the ground truth in ``extra``.

    The true amplitudes written are the drawn ones plus ``model.amplitude_offset`` (the other
    conformation's own amplitudes in the modes, zero for the reference)."""
    n = config.n_particles
    table = ParticleTable.empty_like_stack(
        stack_path,
        n=n,
        pixel_size_angstrom=config.pixel_size_angstrom,
        box_size_px=config.box_size_px,
        voltage_kv=config.voltage_kv,
        spherical_aberration_mm=config.spherical_aberration_mm,
        amplitude_contrast=config.amplitude_contrast,
    )
    table = table.replace(
        defocus_u_angstrom=truth.defocus_angstrom, defocus_v_angstrom=truth.defocus_angstrom
    )
    angles = matrix_to_euler(truth.rotation_matrices)
    true_amplitudes = truth.amplitudes + model.amplitude_offset
    extra: dict[str, NDArray[np.float64]] = {
        f"dhnTrueAmplitude{m}": true_amplitudes[:, i] for i, m in enumerate(model.mode_numbers)
    }
    extra.update(
        dhnTrueAngleRot=angles[:, 0],
        dhnTrueAngleTilt=angles[:, 1],
        dhnTrueAnglePsi=angles[:, 2],
        dhnTrueOriginXAngst=truth.shifts_angstrom[:, 0],
        dhnTrueOriginYAngst=truth.shifts_angstrom[:, 1],
    )
    return table.with_extra(**extra)
