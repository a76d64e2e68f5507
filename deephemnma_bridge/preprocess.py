"""Image preprocessing shared by HEMNMA alignment, training and inference (one function).

`preprocess_images` applies, in this order:

1. phase flip with the CTF at the **input** size and pixel size (``config.phase_flip``; needs
   the particles' `CTFParams`);
2. Fourier cropping to ``config.output_size_px`` (an ideal low-pass below the new Nyquist
   frequency, so no aliasing; the centre pixel ``(N//2, N//2)`` maps to ``(n//2, n//2)`` and the
   mean pixel value is kept), giving pixels of `output_pixel_size`;
3. optional low-pass at ``config.lowpass_angstrom`` (raised-cosine edge one Fourier pixel wide);
4. normalisation: ``"background"`` = zero mean and unit variance of the pixels **outside** the
   circle of radius ``mask_radius_fraction * n/2`` around the centre (RELION's convention for
   particle images), ``"whole"`` = over the whole image, ``"none"``;
5. optional circular soft mask: 1 inside that circle, raised-cosine fall-off to 0 over
   ``mask_edge_px`` pixels outside it.

The config is stored in checkpoints (`PreprocessConfig.to_dict` / `from_dict`) so inference
repeats exactly the preprocessing the network was trained on.

Example
-------
>>> import torch
>>> cfg = PreprocessConfig(output_size_px=32, phase_flip=False)
>>> preprocess_images(torch.randn(2, 64, 64), pixel_size_angstrom=1.0, config=cfg).shape
torch.Size([2, 32, 32])
>>> output_pixel_size(1.0, 64, cfg)
2.0
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .alignment.ctf import CTFParams, ctf_2d, fourier_frequencies
from .errors import InputError

__all__ = [
    "PreprocessConfig",
    "circular_mask",
    "fourier_crop",
    "inplane_views",
    "output_pixel_size",
    "preprocess_images",
    "quarter_turn",
    "rotate_images",
]

Normalise = Literal["background", "whole", "none"]


@dataclass(frozen=True)
class PreprocessConfig:
    """How particle images are preprocessed (see the module docstring for the order).

    Attributes
    ----------
    output_size_px : int or None
        Fourier-crop target side; None keeps the input size.
    phase_flip : bool
        Phase-flip with the CTF before cropping (default True).
    normalise : {"background", "whole", "none"}
        Zero mean / unit variance outside the mask circle, over the whole image, or not at all.
    mask_radius_fraction : float
        Radius of the circle as a fraction of half the output box (0 < f <= 1).
    soft_mask : bool
        Multiply by a circular mask with a raised-cosine edge.
    mask_edge_px : float
        Width of that edge, output pixels.
    lowpass_angstrom : float or None
        Extra low-pass resolution (Å); None: none.
    """

    output_size_px: int | None = None
    phase_flip: bool = True
    normalise: Normalise = "background"
    mask_radius_fraction: float = 0.9
    soft_mask: bool = False
    mask_edge_px: float = 4.0
    lowpass_angstrom: float | None = None

    def __post_init__(self) -> None:
        if self.output_size_px is not None and self.output_size_px < 4:
            raise InputError(
                f"preprocessing output size must be >= 4 px, got {self.output_size_px}"
            )
        if self.normalise not in ("background", "whole", "none"):
            raise InputError(
                f"normalise must be 'background', 'whole' or 'none', got {self.normalise!r}"
            )
        if not 0 < self.mask_radius_fraction <= 1:
            raise InputError(
                f"mask_radius_fraction must be in (0, 1], got {self.mask_radius_fraction}"
            )
        if self.mask_edge_px < 0:
            raise InputError(f"mask_edge_px must be >= 0, got {self.mask_edge_px}")
        if self.lowpass_angstrom is not None and self.lowpass_angstrom <= 0:
            raise InputError(f"lowpass_angstrom must be > 0, got {self.lowpass_angstrom}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able) for checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PreprocessConfig:
        """Inverse of `to_dict`; unknown keys are an error (a newer checkpoint format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise InputError(f"unknown preprocessing settings {sorted(unknown)} in checkpoint")
        return cls(**dict(values))


def output_pixel_size(
    pixel_size_angstrom: float, input_size_px: int, config: PreprocessConfig
) -> float:
    """Pixel size (Å) of the preprocessed images."""
    out = input_size_px if config.output_size_px is None else config.output_size_px
    return pixel_size_angstrom * input_size_px / out


def fourier_crop(images: torch.Tensor, output_size_px: int) -> torch.Tensor:
    """Fourier-crop (B, N, N) images to (B, n, n), n <= N, keeping the mean pixel value.

    The centre pixel (N//2, N//2) goes to (n//2, n//2). Frequencies at or above the new
    Nyquist are dropped (ideal antialiasing filter).
    """
    n_in = int(images.shape[-1])
    n = int(output_size_px)
    if n > n_in:
        raise InputError(f"cannot Fourier-crop {n_in} px images to a larger size {n} px")
    if n == n_in:
        return images
    return _crop_filtered(
        images, n, _spectrum_weights(n_in, n, None, None, images.device, images.dtype)
    )


def _crop_filtered(images: torch.Tensor, n: int, weights: torch.Tensor) -> torch.Tensor:
    """Real ``images`` (..., n_in, n_in) Fourier-cropped to ``n`` px, their cropped ``rfft2``
    multiplied by ``weights`` (..., n, n//2+1) (`_spectrum_weights`, perhaps signed by a
    CTF), centre kept at (n//2, n//2) (`_centre_phase`)."""
    n_in = images.shape[-1]
    spec = _crop_spectrum(torch.fft.rfft2(images), n_in, n) * weights
    phase = _centre_phase(n_in, n, images.device, spec.dtype)
    if phase is not None:
        spec = spec * phase
    return torch.fft.irfft2(spec, s=(n, n))


def _crop_spectrum(spec: torch.Tensor, n_in: int, n: int) -> torch.Tensor:
    """The ``rfft2`` half-plane of an ``n_in`` image cropped to that of an ``n`` image (the
    new Nyquist row and column of an even ``n`` are zeroed by `_spectrum_weights`)."""
    if n == n_in:
        return spec
    top = spec[..., : (n + 1) // 2, : n // 2 + 1]
    bottom = spec[..., n_in - n // 2 :, : n // 2 + 1]
    return torch.cat([top, bottom], dim=-2)


@functools.lru_cache(maxsize=32)
def _spectrum_weights(
    n_in: int,
    n: int,
    pixel_size_angstrom: float | None,
    lowpass_angstrom: float | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The real weights (n, n//2+1) of the cropped ``rfft2`` grid that do not depend on the
    particle: the mean-keeping scale (n/n_in)^2, zero on the new Nyquist row and column of an
    even ``n < n_in`` (they would alias +k and -k) and the low-pass at ``lowpass_angstrom``
    (pixels of ``pixel_size_angstrom``, the output's), if any."""
    w = torch.full((n, n // 2 + 1), n * n / (n_in * n_in), device=device, dtype=dtype)
    if n < n_in and n % 2 == 0:
        w[n // 2, :] = 0
        w[:, n // 2] = 0
    if lowpass_angstrom is not None:
        assert pixel_size_angstrom is not None
        w = w * _lowpass_weights(n, pixel_size_angstrom, lowpass_angstrom, device, dtype)
    return w


@functools.lru_cache(maxsize=32)
def _centre_phase(
    n_in: int, n: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """The phase (n, n//2+1) that moves the centre pixel (n_in//2, n_in//2) of an ``n_in``
    image to (n//2, n//2) of the cropped one, on its ``rfft2`` grid; None when it is 1 (both
    sizes even, or the same size): the transforms need no ``ifftshift`` / ``fftshift``.

    Shifting the input by -n_in//2 (``ifftshift``) multiplies frequency k (cycles per box,
    signed) by exp(2 pi i k (n_in//2) / n_in), shifting the output by +n//2 (``fftshift``)
    by exp(-2 pi i k (n//2) / n): together exp(2 pi i k a), a = (n_in//2)/n_in - (n//2)/n,
    on both axes."""
    a = (n_in // 2) / n_in - (n // 2) / n
    if a == 0:
        return None
    ky = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * a * (ky + kx)
    return torch.polar(torch.ones_like(angle), angle).to(device=device, dtype=dtype)


def circular_mask(
    size_px: int,
    *,
    radius_px: float,
    edge_px: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(size, size) mask around pixel (size//2, size//2): 1 within ``radius_px``, a raised cosine
    down to 0 at ``radius_px + edge_px`` (hard edge when 0)."""
    c = torch.arange(size_px, device=device, dtype=dtype) - size_px // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    if edge_px <= 0:
        return (r <= radius_px).to(dtype)
    t = ((r - radius_px) / edge_px).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def _lowpass_weights(
    n: int, pixel_size_angstrom: float, resolution: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Raised-cosine low-pass on the ``rfft2`` grid, one Fourier pixel wide."""
    ky, kx = fourier_frequencies(n, pixel_size_angstrom, device=device, dtype=dtype)
    k = torch.sqrt(kx * kx + ky * ky)
    t = ((k - 1.0 / resolution) * (n * pixel_size_angstrom)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def preprocess_images(
    images: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    config: PreprocessConfig,
    ctf: CTFParams | None = None,
) -> torch.Tensor:
    """Preprocess particle images for alignment, training or inference.

    Parameters
    ----------
    images : tensor (B, H, W), H == W
        Raw particle images (any float dtype; computed in float32 at least).
    pixel_size_angstrom : float
        Pixel size of ``images``.
    config : PreprocessConfig
    ctf : CTFParams, optional
        CTF of the B particles; required when ``config.phase_flip``.

    Returns
    -------
    tensor (B, out, out)
        ``out = config.output_size_px`` (or H), pixel size `output_pixel_size`.
    """
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise InputError(f"images must have shape (B, N, N), got {tuple(images.shape)}")
    if pixel_size_angstrom <= 0:
        raise InputError(f"pixel size must be > 0 Å, got {pixel_size_angstrom}")
    x = images if images.is_floating_point() and images.dtype != torch.float16 else images.float()
    n_in = int(x.shape[-1])
    if config.phase_flip and ctf is None:
        raise InputError(
            "phase flipping needs the particles' CTF parameters; pass ctf= or "
            "set phase_flip=False (for images that are already phase-flipped)"
        )
    n = n_in if config.output_size_px is None else config.output_size_px
    if n > n_in:
        raise InputError(f"cannot Fourier-crop {n_in} px images to a larger size {n} px")
    pix = output_pixel_size(pixel_size_angstrom, n_in, config)
    if config.phase_flip or n != n_in or config.lowpass_angstrom is not None:
        # steps 1-3 in one pass through Fourier space: the phase flip and the low-pass are
        # evaluated on the cropped grid, whose frequencies are the input's (k = i / (n pix));
        # the centring is a phase there (`_centre_phase`), mostly none
        weights = _spectrum_weights(n_in, n, pix, config.lowpass_angstrom, x.device, x.dtype)
        if ctf is not None and config.phase_flip:
            here = ctf if ctf.device == x.device else ctf.to(x.device)  # (no re-validation)
            sign = ctf_2d(here, box_size_px=n, pixel_size_angstrom=pix)
            weights = torch.where(sign < 0, -weights, weights)  # (B, n, n//2+1)
        x = _crop_filtered(x, n, weights)
    radius = config.mask_radius_fraction * n / 2
    if config.normalise != "none":
        flat = x.reshape(x.shape[0], -1)
        if config.normalise == "background":
            outside = _background_pixels(n, radius, x.device, x.dtype)
            if len(outside) < 2:
                raise InputError(
                    "no background pixels outside the mask circle; lower "
                    "mask_radius_fraction or use normalise='whole'"
                )
            values = flat.index_select(1, outside)  # as x[:, mask == 0], in the same order
        else:
            values = flat
        mean = values.mean(dim=1)
        std = values.std(dim=1).clamp_min(torch.finfo(x.dtype).tiny ** 0.5)
        x = (x - mean[:, None, None]) / std[:, None, None]
    if config.soft_mask:
        x = x * _soft_mask(n, radius, config.mask_edge_px, x.device, x.dtype)
    return x


@functools.lru_cache(maxsize=32)
def _background_pixels(
    n: int, radius_px: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Flat positions (row-major) of the pixels of an ``n`` image outside the circle of
    `circular_mask` with a hard edge at ``radius_px`` (computed in ``dtype``, the images'),
    built once per setting: the background that ``normalise="background"`` reads (building
    it and `_soft_mask` for every batch took 0.36 ms of CPU per batch of 128, 1 thread)."""
    inside = circular_mask(n, radius_px=radius_px, device=device, dtype=dtype)
    return torch.nonzero(inside.flatten() == 0).flatten()


@functools.lru_cache(maxsize=32)
def _soft_mask(
    n: int, radius_px: float, edge_px: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """`circular_mask` with a raised-cosine edge, built once per setting (read-only)."""
    return circular_mask(n, radius_px=radius_px, edge_px=edge_px, device=device, dtype=dtype)


def quarter_turn(images: torch.Tensor, k: int) -> torch.Tensor:
    """Images (..., N, N) turned by ``k`` quarter-turns about the centre pixel ``N // 2`` (where
    RELION puts the particle's centre): exact, no interpolation. ``torch.rot90`` turns about
    ``(N - 1) / 2``, a pixel away for even N; the roll puts the centre back (the wrapped row or
    column is the box's edge)."""
    n = int(images.shape[-1])
    if int(images.shape[-2]) != n:
        raise ValueError(f"square images needed, got {tuple(images.shape[-2:])}")
    k %= 4
    if k == 0:
        return images
    c = n // 2
    # where the centre pixel lands after torch.rot90 (counter-clockwise, dims -2, -1)
    row, col = [(c, c), (n - 1 - c, c), (n - 1 - c, n - 1 - c), (c, n - 1 - c)][k]
    turned = torch.rot90(images, k, dims=(-2, -1))
    return torch.roll(turned, shifts=(c - row, c - col), dims=(-2, -1))


def rotate_images(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Images (B, N, N) rotated by ``angles`` (B,) radians about pixel (N//2, N//2): bicubic
    interpolation, zeros outside the box (multiples of 90° are pixel permutations inside the
    circle of radius N/2; `quarter_turn` is exact everywhere)."""
    n = int(images.shape[-1])
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    phi = angles.to(device=images.device, dtype=work)
    cos, sin = torch.cos(phi), torch.sin(phi)
    # affine_grid maps output to input coordinates (x = column, y = row, normalised to
    # [-1, 1] with align_corners=False): input = R(-phi) (output - c) + c, c = pixel N//2
    centre = torch.full((2,), (2 * (n // 2) + 1) / n - 1, dtype=work, device=images.device)
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    theta = torch.cat([inverse, (centre - inverse @ centre)[..., None]], dim=-1)
    grid = torch.nn.functional.affine_grid(theta, [len(images), 1, n, n], align_corners=False)
    return torch.nn.functional.grid_sample(
        images[:, None].to(work), grid, mode="bicubic", padding_mode="zeros", align_corners=False
    )[:, 0].to(images.dtype)


def inplane_views(images: torch.Tensor, n_views: int) -> torch.Tensor:
    """``n_views`` copies of images (B, N, N) turned by 360° k / n_views (k = 0..n-1) about the
    centre pixel, stacked view by view (n_views * B, N, N): quarter-turns exact
    (`quarter_turn`), other angles interpolated (`rotate_images`)."""
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    views = []
    for k in range(n_views):
        if (4 * k) % n_views == 0:
            views.append(quarter_turn(images, 4 * k // n_views))
        else:
            angle = torch.full((len(images),), 2 * math.pi * k / n_views, dtype=torch.float64)
            views.append(rotate_images(images, angle))
    return torch.cat(views)
