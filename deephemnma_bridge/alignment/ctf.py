"""The contrast transfer function in RELION's convention, in torch (batched, CPU or GPU).

The formula is RELION's ``CTF::initialise`` / ``CTF::getCTF`` (``src/ctf.h``, ``src/ctf.cpp``)
without the higher-order aberrations:

* electron wavelength (Å) ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` with ``V`` in
  volts (relativistic);
* ``K1 = pi lambda``, ``K2 = pi/2 Cs lambda^3`` (``Cs`` in Å), ``K3 = atan(Q0 / sqrt(1 - Q0^2))``,
  ``K4 = -B / 4``, ``K5`` = phase shift in radians;
* ``deltaf(k) = -(dU + dV)/2 - (dU - dV)/2 cos(2 (atan2(ky, kx) - angle))``: the astigmatism
  angle is measured from the x axis (image columns) to the U axis; positive defocus = underfocus;
* ``gamma = K1 deltaf s^2 + K2 s^4 - K5 - K3`` and ``CTF = -sin(gamma) exp(K4 s^2)`` with ``s``
  the spatial frequency in 1/Å.

So the CTF at zero frequency is ``sin(K3 + K5)`` (``Q0`` without phase plate, about 1 with a 90°
phase shift). Frequencies follow ``torch.fft.rfft2`` of an image whose centre is pixel
``(N//2, N//2)``: ``ky = fftfreq(N) / pixel_size`` along rows, ``kx = rfftfreq(N) / pixel_size``
along columns (the last axis), exactly RELION's ``getFftwImage`` layout. Because the CTF is real
and even, multiplying ``rfft2(image)`` by it filters the image whatever the origin.

Example
-------
>>> import torch
>>> p = CTFParams.create(defocus_u_angstrom=[5000.0], voltage_kv=200.0)
>>> ctf_2d(p, box_size_px=64, pixel_size_angstrom=1.0).shape
torch.Size([1, 64, 33])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from ..errors import InputError
from ..particles import ParticleTable

__all__ = [
    "CTF_PARAM_FIELDS",
    "CTFParams",
    "ctf_2d",
    "electron_wavelength_angstrom",
    "fourier_frequencies",
    "phase_flip",
    "wiener_filter",
]

CTF_PARAM_FIELDS = (
    "defocus_u_angstrom",
    "defocus_v_angstrom",
    "defocus_angle_degrees",
    "voltage_kv",
    "spherical_aberration_mm",
    "amplitude_contrast",
    "phase_shift_degrees",
    "bfactor_angstrom2",
)
_FIELDS = CTF_PARAM_FIELDS


def electron_wavelength_angstrom(voltage_kv: float | torch.Tensor) -> Any:
    """Relativistic electron wavelength in Å (RELION's formula), for a voltage in kV."""
    volts = voltage_kv * 1e3
    if isinstance(volts, torch.Tensor):
        return 12.2643247 / torch.sqrt(volts * (1.0 + volts * 0.978466e-6))
    return 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))


@dataclass(frozen=True, eq=False)
class CTFParams:
    """CTF parameters of B particles, each a float tensor (B,), RELION's units and signs.

    Attributes
    ----------
    defocus_u_angstrom, defocus_v_angstrom : tensor (B,)
        Defocus along U and V in Å, positive = underfocus.
    defocus_angle_degrees : tensor (B,)
        Angle from the image x axis to U, degrees.
    voltage_kv : tensor (B,)
    spherical_aberration_mm : tensor (B,)
    amplitude_contrast : tensor (B,)
        Q0 in [0, 1).
    phase_shift_degrees : tensor (B,)
    bfactor_angstrom2 : tensor (B,)
        Envelope ``exp(-B s^2 / 4)``.
    """

    defocus_u_angstrom: torch.Tensor
    defocus_v_angstrom: torch.Tensor
    defocus_angle_degrees: torch.Tensor
    voltage_kv: torch.Tensor
    spherical_aberration_mm: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift_degrees: torch.Tensor
    bfactor_angstrom2: torch.Tensor

    def __post_init__(self) -> None:
        n = self.defocus_u_angstrom.shape
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != n or value.ndim != 1:
                raise ValueError(f"CTFParams.{name} must be a 1-D tensor of shape {tuple(n)}")
        q0 = self.amplitude_contrast
        if bool(((q0 < 0) | (q0 >= 1)).any()):
            raise InputError("amplitude contrast (rlnAmplitudeContrast) must be in [0, 1)")
        if bool((self.voltage_kv <= 0).any()):
            raise InputError("voltage (rlnVoltage) must be > 0 kV")

    def __len__(self) -> int:
        return int(self.defocus_u_angstrom.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.defocus_u_angstrom.device

    @classmethod
    def create(
        cls,
        *,
        defocus_u_angstrom: ArrayLike,
        defocus_v_angstrom: ArrayLike | None = None,
        defocus_angle_degrees: ArrayLike = 0.0,
        voltage_kv: ArrayLike = 300.0,
        spherical_aberration_mm: ArrayLike = 2.7,
        amplitude_contrast: ArrayLike = 0.1,
        phase_shift_degrees: ArrayLike = 0.0,
        bfactor_angstrom2: ArrayLike = 0.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> CTFParams:
        """Parameters from arrays or scalars (broadcast to the length of ``defocus_u_angstrom``).

        ``defocus_v_angstrom`` defaults to ``defocus_u_angstrom`` (no astigmatism).
        """
        du = np.atleast_1d(np.asarray(defocus_u_angstrom, dtype=np.float64))
        values: dict[str, ArrayLike] = {
            "defocus_u_angstrom": du,
            "defocus_v_angstrom": du if defocus_v_angstrom is None else defocus_v_angstrom,
            "defocus_angle_degrees": defocus_angle_degrees,
            "voltage_kv": voltage_kv,
            "spherical_aberration_mm": spherical_aberration_mm,
            "amplitude_contrast": amplitude_contrast,
            "phase_shift_degrees": phase_shift_degrees,
            "bfactor_angstrom2": bfactor_angstrom2,
        }
        tensors = {
            k: torch.as_tensor(
                np.broadcast_to(np.asarray(v, dtype=np.float64), du.shape).copy(),
                dtype=dtype,
                device=device,
            )
            for k, v in values.items()
        }
        return cls(**tensors)

    @classmethod
    def from_table(
        cls,
        table: ParticleTable,
        rows: Sequence[int] | np.ndarray | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> CTFParams:
        """The CTF of the particles at ``rows`` (0-based positions; all when None) of a table."""
        idx = np.arange(len(table)) if rows is None else np.asarray(rows, dtype=np.intp)
        tensors = {
            k: torch.as_tensor(getattr(table, k)[idx], dtype=dtype, device=device) for k in _FIELDS
        }
        return cls(**tensors)

    def to(self, device: torch.device | str) -> CTFParams:
        """The same parameters on ``device``."""
        return CTFParams(**{k: getattr(self, k).to(device) for k in _FIELDS})

    def take(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> CTFParams:
        """Parameters of the particles at positions ``idx``."""
        index = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.device)
        return CTFParams(**{k: getattr(self, k)[index] for k in _FIELDS})

    def replace(self, **changes: torch.Tensor) -> CTFParams:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


def fourier_frequencies(
    box_size_px: int,
    pixel_size_angstrom: float,
    *,
    rfft: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial frequencies (1/Å) of the ``rfft2`` (or ``fft2``) grid of a square image.

    Returns
    -------
    ky : tensor (box, 1)
        Row frequencies, ``fftfreq`` order.
    kx : tensor (1, box//2+1) or (1, box)
        Column frequencies.
    """
    ky = torch.fft.fftfreq(box_size_px, d=pixel_size_angstrom, device=device, dtype=dtype)
    if rfft:
        kx = torch.fft.rfftfreq(box_size_px, d=pixel_size_angstrom, device=device, dtype=dtype)
    else:
        kx = ky.clone()
    return ky[:, None], kx[None, :]


def ctf_2d(
    params: CTFParams,
    *,
    box_size_px: int,
    pixel_size_angstrom: float,
    rfft: bool = True,
) -> torch.Tensor:
    """RELION's CTF on the Fourier grid of ``box_size_px`` images.

    Parameters
    ----------
    params : CTFParams
        B particles.
    box_size_px : int
        Image side N.
    pixel_size_angstrom : float
        Pixel size of the images.
    rfft : bool
        True: the ``rfft2`` half grid (B, N, N//2+1); False: the full ``fft2`` grid (B, N, N).

    Returns
    -------
    tensor (B, N, N//2+1) or (B, N, N)
        CTF values (dimensionless), dtype and device of ``params``.
    """
    if pixel_size_angstrom <= 0:
        raise InputError(f"pixel size must be > 0 Å, got {pixel_size_angstrom}")
    dtype = params.defocus_u_angstrom.dtype
    ky, kx = fourier_frequencies(
        box_size_px, pixel_size_angstrom, rfft=rfft, device=params.device, dtype=dtype
    )
    s2 = (kx * kx + ky * ky)[None]
    theta = torch.atan2(ky, kx)[None]

    def col(t: torch.Tensor) -> torch.Tensor:
        return t[:, None, None]

    lam = electron_wavelength_angstrom(params.voltage_kv)
    cs_angstrom = params.spherical_aberration_mm * 1e7
    k1 = math.pi * lam
    k2 = math.pi / 2 * cs_angstrom * lam**3
    q0 = params.amplitude_contrast
    k3 = torch.atan(q0 / torch.sqrt(1 - q0 * q0))
    k4 = -params.bfactor_angstrom2 / 4
    k5 = torch.deg2rad(params.phase_shift_degrees)
    average = -(params.defocus_u_angstrom + params.defocus_v_angstrom) * 0.5
    deviation = -(params.defocus_u_angstrom - params.defocus_v_angstrom) * 0.5
    azimuth = torch.deg2rad(params.defocus_angle_degrees)
    deltaf = col(average) + col(deviation) * torch.cos(2 * (theta - col(azimuth)))
    gamma = col(k1) * deltaf * s2 + col(k2) * s2 * s2 - col(k5) - col(k3)
    return -torch.sin(gamma) * torch.exp(col(k4) * s2)


def _filter(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    size = images.shape[-2:]
    spectrum = torch.fft.rfft2(images)
    return torch.fft.irfft2(spectrum * weights.to(images.dtype), s=size)


def _check_images(images: torch.Tensor, params: CTFParams) -> int:
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must have shape (B, N, N), got {tuple(images.shape)}")
    if images.shape[0] != len(params):
        raise ValueError(f"{images.shape[0]} images but CTF parameters for {len(params)}")
    return int(images.shape[-1])


def phase_flip(
    images: torch.Tensor, params: CTFParams, *, pixel_size_angstrom: float
) -> torch.Tensor:
    """Multiply the Fourier transform of each image by the sign of its CTF.

    Parameters
    ----------
    images : tensor (B, N, N)
        Real-space images.
    params : CTFParams
        B particles.
    pixel_size_angstrom : float

    Returns
    -------
    tensor (B, N, N)
        Phase-flipped images (same dtype as ``images``).
    """
    n = _check_images(images, params)
    ctf = ctf_2d(params, box_size_px=n, pixel_size_angstrom=pixel_size_angstrom)
    return _filter(images, torch.where(ctf < 0, -1.0, 1.0).to(ctf.dtype))


def wiener_filter(
    images: torch.Tensor,
    params: CTFParams,
    *,
    pixel_size_angstrom: float,
    snr: float = 1.0,
) -> torch.Tensor:
    """CTF correction by the Wiener filter ``CTF / (CTF^2 + 1/snr)``.

    Parameters
    ----------
    images : tensor (B, N, N)
    params : CTFParams
    pixel_size_angstrom : float
    snr : float
        Assumed (frequency-independent) signal-to-noise ratio, > 0; large values approach
        division by the CTF, small values approach multiplication by ``snr * CTF``.

    Returns
    -------
    tensor (B, N, N)
    """
    if snr <= 0:
        raise InputError(f"Wiener filter SNR must be > 0, got {snr}")
    n = _check_images(images, params)
    ctf = ctf_2d(params, box_size_px=n, pixel_size_angstrom=pixel_size_angstrom)
    return _filter(images, ctf / (ctf * ctf + 1.0 / snr))
