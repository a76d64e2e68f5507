"""The forward model: projections of a deformed, rotated, shifted Gaussian-blob reference.

Torch, batched over particles, CPU or GPU, differentiable with respect to the amplitudes, the
rotation matrices and the shifts (so an aligner may parametrise ``A = A0 @ expm(skew(d))``).

Geometry, RELION's exactly (``conventions.py``, INTEROP.md section 2):

* node ``j`` of the deformed model is ``r_j(q) = c_j + sum_m q_m u_mj`` (Å; modes unit-norm over
  3N, amplitude q in Å-per-unit-vector as in ``nma``);
* the matrix ``A`` rotates the model (``r' = A r``) and the rotated model is projected along
  +z, so the node lands at ``p_j = (A r_j)[:2]`` (x, y in Å);
* the image is the projection translated by minus the origin ``o`` (Å): ``I(x) = P(x + o)``, so
  the node appears at ``p_j - o``;
* pixel ``(row, col)`` sits at ``x = (col - N//2) * pixel``, ``y = (row - N//2) * pixel``: pixel
  ``(N//2, N//2)`` is the rotation centre, x is the column (fast) axis, y the row axis.

Each node is a 3D isotropic Gaussian of standard deviation ``sigma_angstrom`` and mass ``w_j``
(default 1), so its projection is a 2D Gaussian of the same sigma and integral ``w_j``. In real
space a pixel holds the density sampled at its centre times the pixel area (an image of one node
sums to about ``w_j``). In Fourier space the coefficients equal ``torch.fft.rfft2`` of
``ifftshift`` of the real-space image (up to aliasing):
``F(k) = sum_j w_j exp(-2 pi^2 sigma^2 |k|^2) exp(-2 pi i k . (p_j - o))``, k in 1/Å.

Method (chosen by measurement, ``benchmarks/bench_simulate.py``, 2-core CPU, batch 64): both
variants are separable in x and y, so an image is one batched matrix product over the nodes,
``(B, rows, N) @ (B, N, cols)``. In real space the Gaussian profiles are evaluated only within
``truncate_sigmas`` (5) sigmas of each node and scattered into the tables, so the cost is the
matrix product (``N * box^2``): ~6,000-8,000 projections/s for 214 nodes, ~90-180 for 20,000
nodes at 128-64 px. In Fourier space real cos/sin tables cover the band only, so the cost
(``N * band^2``) does not depend on the box: ~33,000 projections/s for 214 nodes and ~340 for
20,000 nodes below 8 Å, but 2x slower than real space over the full band. Use the Fourier
variant for band-limited similarity (alignment), the real-space one for full-band images
(simulation). Nodes are processed in chunks to bound memory (``max_elements``).

Example
-------
>>> import torch
>>> coords = torch.zeros(1, 3)
>>> img = render_projections(coords, torch.zeros(0, 1, 3), torch.zeros(1, 0),
...     torch.eye(3)[None], torch.zeros(1, 2), box_size_px=32, pixel_size_angstrom=1.0,
...     sigma_angstrom=1.5)
>>> img.shape, int(img[0].argmax()) == 16 * 32 + 16
(torch.Size([1, 32, 32]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..nma.deform import deform as deform_coordinates

__all__ = [
    "FourierBand",
    "deform_coordinates",
    "project_positions",
    "render_fourier",
    "render_projections",
    "render_projections_fourier",
    "render_real",
]

# elements per chunk of the (B, nodes, side) profile tables (float32: 4 bytes each)
_DEFAULT_MAX_ELEMENTS = 1 << 22


def _check_geometry(box_size_px: int, pixel_size_angstrom: float, sigma_angstrom: float) -> None:
    if box_size_px < 2:
        raise InputError(f"box size must be >= 2 px, got {box_size_px}")
    if pixel_size_angstrom <= 0:
        raise InputError(f"pixel size must be > 0 Å, got {pixel_size_angstrom}")
    if sigma_angstrom <= 0:
        raise InputError(f"Gaussian sigma must be > 0 Å, got {sigma_angstrom}")


def project_positions(
    coordinates: torch.Tensor, rotations: torch.Tensor, shifts_angstrom: torch.Tensor
) -> torch.Tensor:
    """Image-plane positions ``(A r)[:2] - o`` of (deformed) nodes.

    Parameters
    ----------
    coordinates : tensor (B, N, 3) or (N, 3)
        Å, relative to the rotation centre.
    rotations : tensor (B, 3, 3)
        RELION matrices ``A``.
    shifts_angstrom : tensor (B, 2)
        RELION origins (x, y), Å.

    Returns
    -------
    tensor (B, N, 2)
        (x, y) in Å relative to pixel (N//2, N//2).
    """
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape (B, 3, 3), got {tuple(rotations.shape)}")
    b = rotations.shape[0]
    if shifts_angstrom.shape != (b, 2):
        raise ValueError(f"shifts must have shape ({b}, 2), got {tuple(shifts_angstrom.shape)}")
    # only the first two rows of A are needed: (B, N, 3) @ (B, 3, 2)
    xy = torch.matmul(coordinates, rotations[:, :2, :].transpose(1, 2))
    return xy - shifts_angstrom[:, None, :]


def _node_chunks(b: int, n: int, side: int, max_elements: int) -> int:
    return max(1, min(n, max_elements // max(1, b * side)))


def _profiles(
    centres_px: torch.Tensor, grid: torch.Tensor, s: float, half_width: int | None
) -> torch.Tensor:
    """Gaussian profiles exp(-(grid - c)^2 / 2s^2), (B, n, side); when ``half_width`` is set,
    evaluated only on the 2*half_width+1 pixels nearest each centre (zeros elsewhere)."""
    side = grid.shape[0]
    if half_width is None or 2 * half_width + 1 >= side:
        return torch.exp((grid - centres_px).square().mul(-0.5 / (s * s)))
    w = 2 * half_width + 1
    offsets = torch.arange(w, device=grid.device)
    base = torch.round(centres_px).long().clamp(-w, side) - half_width  # (B, n, 1)
    idx = base + offsets  # (B, n, w), in [-2w, side + w)
    values = torch.exp(
        (idx.to(centres_px.dtype) + grid[0] - centres_px).square().mul(-0.5 / (s * s))
    )
    out = centres_px.new_zeros(*centres_px.shape[:-1], side + 3 * w)
    out.scatter_(-1, idx + 2 * w, values)
    return out[..., 2 * w : 2 * w + side]


def render_real(
    positions_angstrom: torch.Tensor,
    *,
    box_size_px: int,
    pixel_size_angstrom: float,
    sigma_angstrom: float,
    weights: torch.Tensor | None = None,
    truncate_sigmas: float | None = 5.0,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Real-space image of 2D Gaussians at given image-plane positions.

    Parameters
    ----------
    positions_angstrom : tensor (B, N, 2)
        (x, y) in Å relative to pixel (N//2, N//2) (from `project_positions`).
    box_size_px, pixel_size_angstrom, sigma_angstrom
        Image side, pixel size and Gaussian standard deviation.
    weights : tensor (N,) or (B, N), optional
        Node masses (default 1).
    truncate_sigmas : float or None
        Evaluate each profile only within this many sigmas of its centre (relative error
        ``exp(-t^2/2)``, 4e-6 at 5); None: everywhere (exact, slower).
    max_elements : int
        Bound on the size of the per-chunk profile tables.

    Returns
    -------
    tensor (B, box, box)
        ``image[b, row, col]``; each node integrates to about its weight.
    """
    _check_geometry(box_size_px, pixel_size_angstrom, sigma_angstrom)
    b, n, _ = positions_angstrom.shape
    dtype, device = positions_angstrom.dtype, positions_angstrom.device
    s = sigma_angstrom / pixel_size_angstrom
    half = None if truncate_sigmas is None else math.ceil(truncate_sigmas * s)
    grid = torch.arange(box_size_px, device=device, dtype=dtype) - box_size_px // 2
    pos_px = positions_angstrom / pixel_size_angstrom + box_size_px // 2
    grid = grid + box_size_px // 2  # pixel indices; centres in pixel-index units
    norm = 1.0 / (2 * math.pi * s * s)
    image = torch.zeros(b, box_size_px, box_size_px, device=device, dtype=dtype)
    chunk = _node_chunks(b, n, box_size_px, max_elements)
    for start in range(0, n, chunk):
        p = pos_px[:, start : start + chunk]
        gx = _profiles(p[..., 0:1], grid, s, half)  # (B, n, cols)
        gy = _profiles(p[..., 1:2], grid, s, half)  # (B, n, rows)
        if weights is not None:
            w = weights[..., start : start + chunk]
            gx = gx * (w[None, :, None] if w.ndim == 1 else w[..., None])
        image = image + torch.bmm(gy.transpose(1, 2), gx)
    return image * norm


@dataclass(frozen=True)
class FourierBand:
    """The ``rfft2`` coefficients of a box with ``|k| <= k_max``, on a compact grid.

    The compact grid holds rows ``row_index`` (``fftfreq`` order: 0, 1, ..., j, -j, ..., -1)
    and columns 0..``n_cols``-1 of the ``rfft2`` half-plane; ``mask`` marks the coefficients
    inside the disc and ``weights`` are the Hermitian multiplicities (1 on the kx = 0 and
    Nyquist columns, 2 elsewhere) times the mask, so that
    ``sum(weights * (re1*re2 + im1*im2))`` is ``N^2`` times the real-space inner product of the
    band-limited images.

    Build it with `FourierBand.create`.
    """

    box_size_px: int
    pixel_size_angstrom: float
    k_max_per_angstrom: float
    row_index: torch.Tensor  # (Ky,) long
    ky: torch.Tensor  # (Ky,) 1/Å
    kx: torch.Tensor  # (Kx,) 1/Å
    mask: torch.Tensor  # (Ky, Kx) bool
    weights: torch.Tensor  # (Ky, Kx) float

    @property
    def n_cols(self) -> int:
        """Number of kx columns."""
        return int(self.kx.shape[0])

    @classmethod
    def create(
        cls,
        *,
        box_size_px: int,
        pixel_size_angstrom: float,
        resolution_angstrom: float | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FourierBand:
        """The band ``|k| <= 1/resolution_angstrom`` (None or below Nyquist: the whole box)."""
        _check_geometry(box_size_px, pixel_size_angstrom, 1.0)
        n = box_size_px
        nyquist = 0.5 / pixel_size_angstrom
        k_max = nyquist if resolution_angstrom is None else 1.0 / resolution_angstrom
        if resolution_angstrom is not None and resolution_angstrom <= 0:
            raise InputError(f"band resolution must be > 0 Å, got {resolution_angstrom}")
        k_max = min(k_max, nyquist)
        j = min(math.floor(k_max * n * pixel_size_angstrom + 1e-9), n // 2)
        rows = list(range(0, j + 1)) + list(range(-j, 0))
        rows = [m for m in rows if -(n // 2) <= m <= (n - 1) // 2]
        m = torch.tensor(rows, device=device, dtype=torch.long)
        row_index = torch.remainder(m, n)
        ky = m.to(dtype) / (n * pixel_size_angstrom)
        kx = torch.arange(j + 1, device=device, dtype=dtype) / (n * pixel_size_angstrom)
        mask = (ky[:, None] ** 2 + kx[None, :] ** 2) <= k_max**2 * (1 + 1e-6)
        mult = torch.full((j + 1,), 2.0, device=device, dtype=dtype)
        mult[0] = 1.0
        if n % 2 == 0 and j == n // 2:
            mult[-1] = 1.0
        weights = mask.to(dtype) * mult[None, :]
        return cls(n, pixel_size_angstrom, k_max, row_index, ky, kx, mask, weights)

    def extract(self, spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts (B, Ky, Kx) of a complex ``rfft2`` spectrum (B, N, N//2+1)
        on the band grid (outside the disc: zero)."""
        sub = spectrum[:, self.row_index, : self.n_cols]
        m = self.mask.to(sub.real.dtype)
        return sub.real * m, sub.imag * m

    def extract_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Band coefficients of real images (B, N, N) whose centre is pixel (N//2, N//2)."""
        centred = torch.fft.ifftshift(images, dim=(-2, -1))
        return self.extract(torch.fft.rfft2(centred))


def render_fourier(
    positions_angstrom: torch.Tensor,
    band: FourierBand,
    *,
    sigma_angstrom: float,
    weights: torch.Tensor | None = None,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier coefficients over a band of 2D Gaussians at image-plane positions.

    Parameters
    ----------
    positions_angstrom : tensor (B, N, 2)
        (x, y) in Å relative to the image centre.
    band : FourierBand
    sigma_angstrom : float
    weights : tensor (N,) or (B, N), optional
    max_elements : int
        Bound on the per-chunk table size.

    Returns
    -------
    re, im : tensors (B, Ky, Kx)
        Equal to ``band.extract_images(render_real(...))`` up to aliasing; zero outside the disc.
    """
    _check_geometry(band.box_size_px, band.pixel_size_angstrom, sigma_angstrom)
    b, n, _ = positions_angstrom.shape
    dtype = positions_angstrom.dtype
    ky = band.ky.to(dtype)
    kx = band.kx.to(dtype)
    env_x = torch.exp(-2 * math.pi**2 * sigma_angstrom**2 * kx * kx)
    env_y = torch.exp(-2 * math.pi**2 * sigma_angstrom**2 * ky * ky)
    ny, nx = ky.shape[0], kx.shape[0]
    acc = positions_angstrom.new_zeros(b, ny, 2 * nx)
    chunk = _node_chunks(b, n, ny + nx, max_elements)
    for start in range(0, n, chunk):
        p = positions_angstrom[:, start : start + chunk]
        ax = 2 * math.pi * p[..., 0:1] * kx  # (B, n, Kx)
        ay = 2 * math.pi * p[..., 1:2] * ky  # (B, n, Ky)
        cx, sx = torch.cos(ax) * env_x, torch.sin(ax) * env_x
        if weights is not None:
            w = weights[..., start : start + chunk]
            w3 = w[None, :, None] if w.ndim == 1 else w[..., None]
            cx, sx = cx * w3, sx * w3
        cy, sy = torch.cos(ay) * env_y, torch.sin(ay) * env_y
        left = torch.cat([cy, sy], dim=1).transpose(1, 2)  # (B, Ky, 2n)
        right = torch.cat(
            [torch.cat([cx, sx], dim=2), torch.cat([-sx, cx], dim=2)], dim=1
        )  # (B, 2n, 2Kx)
        acc = acc + torch.bmm(left, right)
    m = band.mask.to(dtype)
    # left @ right = [cy cx - sy sx, cy sx + sy cx] = [Re F, -Im F]
    return acc[..., :nx] * m, -acc[..., nx:] * m


def render_projections(
    coordinates: torch.Tensor,
    modes: torch.Tensor,
    amplitudes: torch.Tensor,
    rotations: torch.Tensor,
    shifts_angstrom: torch.Tensor,
    *,
    box_size_px: int,
    pixel_size_angstrom: float,
    sigma_angstrom: float,
    weights: torch.Tensor | None = None,
    truncate_sigmas: float | None = 5.0,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Real-space projections (B, box, box) of the deformed, rotated, shifted reference.

    Parameters
    ----------
    coordinates : tensor (N, 3)
        Reference nodes, Å, relative to the rotation centre.
    modes : tensor (M, N, 3)
    amplitudes : tensor (B, M)
        Å.
    rotations : tensor (B, 3, 3)
        RELION ``A``.
    shifts_angstrom : tensor (B, 2)
        RELION origins (x, y), Å.
    box_size_px, pixel_size_angstrom, sigma_angstrom, weights, truncate_sigmas, max_elements
        See `render_real`.

    Returns
    -------
    tensor (B, box, box)
    """
    pos = project_positions(
        deform_coordinates(coordinates, modes, amplitudes), rotations, shifts_angstrom
    )
    return render_real(
        pos,
        box_size_px=box_size_px,
        pixel_size_angstrom=pixel_size_angstrom,
        sigma_angstrom=sigma_angstrom,
        weights=weights,
        truncate_sigmas=truncate_sigmas,
        max_elements=max_elements,
    )


def render_projections_fourier(
    coordinates: torch.Tensor,
    modes: torch.Tensor,
    amplitudes: torch.Tensor,
    rotations: torch.Tensor,
    shifts_angstrom: torch.Tensor,
    band: FourierBand,
    *,
    sigma_angstrom: float,
    weights: torch.Tensor | None = None,
    max_elements: int = _DEFAULT_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Band-limited Fourier coefficients (re, im), each (B, Ky, Kx), of the projections.

    Same arguments as `render_projections` with a `FourierBand` instead of box and pixel size.
    """
    pos = project_positions(
        deform_coordinates(coordinates, modes, amplitudes), rotations, shifts_angstrom
    )
    return render_fourier(
        pos, band, sigma_angstrom=sigma_angstrom, weights=weights, max_elements=max_elements
    )
