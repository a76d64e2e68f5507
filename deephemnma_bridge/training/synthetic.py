"""Unlimited training images from the forward model: fresh every batch, nothing to over-fit.

The reference, its modes, the particles' CTFs and their noise level are known, so the network
can learn from images rendered on the fly instead of a few thousand HEMNMA-labelled particles:

* **amplitudes** drawn from what HEMNMA found on the labelled subset (a labelled row plus a
  Gaussian jitter of ``jitter`` times each mode's standard deviation), or, without labels,
  uniformly within ``amplitude_range_angstrom`` of RMS displacement;
* **orientations** uniform over SO(3) (normalised 4-D Gaussians); **shifts** drawn from the
  labelled particles' origins (or uniform within ``max_shift_angstrom``);
* **CTF** parameters of random rows of the dataset itself;
* the image rendered directly at the network's working size (pixel ``box * pixel / size``), in
  Fourier space (`alignment.render.render_fourier`: exact coefficients, no aliasing), multiplied
  by the CTF, and white Gaussian noise added at the **SNR** measured on the real particles
  against their HEMNMA-fitted projections (`estimate_snr`, same size, same renderer).

The images then go through the same preprocessing as the real particles (phase flip, low-pass,
normalisation, mask), so the network sees one kind of input. Random streams come from a torch
``Generator`` per batch (``seed``, epoch, batch), so an interrupted training resumes with the
same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from ..alignment.ctf import ctf_2d
from ..alignment.hemnma import ReferenceModel
from ..alignment.render import FourierBand, render_fourier
from ..errors import InputError
from ..preprocess import fourier_crop
from .data import ctf_from_rows
from .so3 import quaternion_to_matrix_t

__all__ = ["SyntheticBatches", "estimate_snr", "render_working"]


def render_working(
    reference: ReferenceModel,
    amplitudes: torch.Tensor,
    rotations: torch.Tensor,
    shifts_angstrom: torch.Tensor,
    ctf: torch.Tensor,
    *,
    size_px: int,
    pixel_size_angstrom: float,
    sigma_angstrom: float = 2.0,
) -> torch.Tensor:
    """CTF-modulated projections (B, size, size) of the deformed, rotated, shifted reference,
    rendered at ``size_px`` x ``pixel_size_angstrom`` from exact Fourier coefficients (the band
    up to Nyquist). ``ctf`` (B, 8) rows of `data.CTF_FIELDS`."""
    dev = reference.coordinates.device
    band = FourierBand.create(
        box_size_px=size_px, pixel_size_angstrom=pixel_size_angstrom, device=dev
    )
    coords = reference.deformed(amplitudes.to(dev, torch.float32))
    rot = rotations.to(dev, torch.float32)
    pos = torch.einsum("bij,bnj->bni", rot[:, :2, :], coords) - shifts_angstrom.to(dev)[:, None]
    re, im = render_fourier(pos, band, sigma_angstrom=sigma_angstrom, weights=reference.weights)
    spec = torch.zeros(len(pos), size_px, size_px // 2 + 1, dtype=torch.complex64, device=dev)
    spec[:, band.row_index, : band.n_cols] = torch.complex(re, im)
    params = ctf_from_rows(ctf, dev)
    c = ctf_2d(params, box_size_px=size_px, pixel_size_angstrom=pixel_size_angstrom)
    image = torch.fft.irfft2(spec * c, s=(size_px, size_px))
    return torch.fft.fftshift(image, dim=(-2, -1))


def estimate_snr(
    images: torch.Tensor,
    ctf: torch.Tensor,
    reference: ReferenceModel,
    amplitudes: torch.Tensor,
    rotations: torch.Tensor,
    shifts_angstrom: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    size_px: int,
    sigma_angstrom: float = 2.0,
) -> tuple[float, NDArray[np.float64]]:
    """The particles' SNR at ``size_px``: raw images (B, N, N) Fourier-cropped to the working
    size against their fitted projections ``x`` (`render_working`), per particle
    ``var(a x) / var(y - a x)`` with the least-squares scale ``a``. Returns (median, all)."""
    n = int(images.shape[-1])
    work_pixel = pixel_size_angstrom * n / size_px
    y = fourier_crop(images.float(), size_px)
    x = render_working(
        reference, amplitudes, rotations, shifts_angstrom, ctf, size_px=size_px,
        pixel_size_angstrom=work_pixel, sigma_angstrom=sigma_angstrom,
    ).to(y.device)  # fmt: skip
    y = y - y.mean(dim=(-2, -1), keepdim=True)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    a = (x * y).sum(dim=(-2, -1)) / (x * x).sum(dim=(-2, -1)).clamp_min(1e-30)
    signal = (a[:, None, None] * x).var(dim=(-2, -1))
    noise = (y - a[:, None, None] * x).var(dim=(-2, -1)).clamp_min(1e-30)
    snr = (signal / noise).double().cpu().numpy()
    ok = np.isfinite(snr) & (a.cpu().numpy() > 0)
    if not ok.any():
        raise InputError(
            "could not measure the particles' SNR: no particle correlates positively with its "
            "fitted projection (wrong modes file, or labels from another dataset?)"
        )
    return float(np.median(snr[ok])), snr


@dataclass
class SyntheticBatches:
    """Batches of fresh synthetic particles (module docstring).

    ``batch(b, generator)`` -> (images (b, size, size) at ``pixel_size_angstrom``, amplitudes
    (b, M) Å, rotations (b, 3, 3), shifts (b, 2) Å, CTF rows (b, 8)).
    """

    reference: ReferenceModel
    ctf_rows: NDArray[np.float64]  # (n, 8) the dataset's CTFs
    snr: float
    size_px: int
    pixel_size_angstrom: float  # of the working size
    amplitude_rows: NDArray[np.float64] | None = None  # (k, M) labelled amplitudes, Å
    shift_rows: NDArray[np.float64] | None = None  # (k, 2) labelled origins, Å
    amplitude_range_angstrom: float = 3.0  # RMS, without labels
    max_shift_angstrom: float = 0.0  # without labels
    jitter: float = 0.25
    sigma_angstrom: float = 2.0

    def __post_init__(self) -> None:
        if not (self.snr > 0 and math.isfinite(self.snr)):
            raise InputError(f"synthetic training needs a positive SNR, got {self.snr}")
        if len(self.ctf_rows) == 0:
            raise InputError("synthetic training needs the dataset's CTF rows")
        m = self.reference.modes.shape[0]
        if self.amplitude_rows is not None and self.amplitude_rows.shape[1:] != (m,):
            raise InputError(
                f"labelled amplitudes have {self.amplitude_rows.shape[1:]} modes, the reference {m}"
            )

    def batch(
        self, b: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.reference.modes.shape[0]
        g = generator
        if self.amplitude_rows is not None and len(self.amplitude_rows):
            pool = torch.as_tensor(self.amplitude_rows, dtype=torch.float32)
            rows = torch.randint(len(pool), (b,), generator=g)
            std = pool.std(dim=0) if len(pool) > 1 else torch.zeros(m)
            amps = pool[rows] + self.jitter * std * torch.randn(b, m, generator=g)
        else:
            scale = self.reference.amplitude_scale * self.amplitude_range_angstrom
            amps = (torch.rand(b, m, generator=g) * 2 - 1) * scale / math.sqrt(max(m, 1))
        quat = torch.randn(b, 4, generator=g, dtype=torch.float64)
        rotations = quaternion_to_matrix_t(quat).float()
        if self.shift_rows is not None and len(self.shift_rows):
            pool_s = torch.as_tensor(self.shift_rows, dtype=torch.float32)
            shifts = pool_s[torch.randint(len(pool_s), (b,), generator=g)]
        else:
            shifts = (torch.rand(b, 2, generator=g) * 2 - 1) * self.max_shift_angstrom
        ctf = torch.as_tensor(self.ctf_rows, dtype=torch.float32)
        ctf = ctf[torch.randint(len(ctf), (b,), generator=g)]
        with torch.no_grad():
            clean = render_working(
                self.reference, amps, rotations, shifts, ctf, size_px=self.size_px,
                pixel_size_angstrom=self.pixel_size_angstrom, sigma_angstrom=self.sigma_angstrom,
            ).cpu()  # fmt: skip
            sd = torch.sqrt(clean.var(dim=(-2, -1)) / self.snr)
            noise = torch.randn(clean.shape, generator=g) * sd[:, None, None]
        return clean + noise, amps, rotations, shifts, ctf
