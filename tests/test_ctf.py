"""CTF in RELION's convention: hand values, zeros, astigmatism direction, phase shift, filters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deephemnma_bridge.alignment.ctf import (
    CTFParams,
    ctf_2d,
    electron_wavelength_angstrom,
    phase_flip,
    wiener_filter,
)
from deephemnma_bridge.device import available_devices
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.particles import ParticleTable


def _hand_ctf(
    kx: float,
    ky: float,
    *,
    du: float,
    dv: float,
    ang: float,
    kv: float,
    cs: float,
    q0: float,
    ps: float = 0.0,
    b: float = 0.0,
) -> float:
    """RELION's formula written out independently, with the bilinear astigmatism form of
    RELION 3.1+ (``A = Q^T D Q``), double precision."""
    lam = 12.2643247 / math.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))
    c, s = math.cos(math.radians(ang)), math.sin(math.radians(ang))
    q = np.array([[c, s], [-s, c]])
    a = q.T @ np.diag([-du, -dv]) @ q
    k = np.array([kx, ky])
    u2 = kx * kx + ky * ky
    gamma = (
        math.pi * lam * float(k @ a @ k)
        + math.pi / 2 * cs * 1e7 * lam**3 * u2 * u2
        - math.radians(ps)
        - math.atan(q0 / math.sqrt(1 - q0 * q0))
    )
    return -math.sin(gamma) * math.exp(-b / 4 * u2)


def test_wavelength_300kv_and_200kv() -> None:
    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_angstrom(200.0) == pytest.approx(0.025079, abs=2e-6)


@pytest.mark.parametrize("device", available_devices())
def test_matches_hand_computation(device: str) -> None:
    kw = dict(du=21000.0, dv=19000.0, ang=35.0, kv=300.0, cs=2.7, q0=0.07, ps=20.0, b=50.0)
    p = CTFParams.create(
        defocus_u_angstrom=[kw["du"]],
        defocus_v_angstrom=[kw["dv"]],
        defocus_angle_degrees=kw["ang"],
        voltage_kv=kw["kv"],
        spherical_aberration_mm=kw["cs"],
        amplitude_contrast=kw["q0"],
        phase_shift_degrees=kw["ps"],
        bfactor_angstrom2=kw["b"],
        device=device,
        dtype=torch.float64,
    )
    n, pix = 48, 1.3
    ctf = ctf_2d(p, box_size_px=n, pixel_size_angstrom=pix).cpu().numpy()[0]
    assert ctf.shape == (n, n // 2 + 1)
    for row, col in [(0, 0), (0, 5), (3, 0), (5, 7), (n - 4, 9), (n // 2, n // 2), (17, 3)]:
        ky = (row if row < n // 2 else row - n) / (n * pix)
        if n % 2 == 0 and row == n // 2:
            ky = -0.5 / pix
        kx = col / (n * pix)
        assert ctf[row, col] == pytest.approx(_hand_ctf(kx, ky, **kw), abs=1e-9)
    # the full grid agrees with the half grid (except the Nyquist column: kx = -1/2 vs +1/2)
    full = ctf_2d(p, box_size_px=n, pixel_size_angstrom=pix, rfft=False).cpu().numpy()[0]
    np.testing.assert_allclose(full[:, : n // 2], ctf[:, : n // 2], atol=1e-12)


def test_zero_frequency_is_amplitude_contrast() -> None:
    p = CTFParams.create(defocus_u_angstrom=[5000.0], amplitude_contrast=0.1, dtype=torch.float64)
    assert float(ctf_2d(p, box_size_px=16, pixel_size_angstrom=1.0)[0, 0, 0]) == pytest.approx(0.1)


def test_phase_shift_90_makes_low_frequencies_like_relion() -> None:
    """With a 90° phase plate RELION's CTF starts near 1 (sin(pi/2 + K3) = sqrt(1 - Q0^2))."""
    p = CTFParams.create(
        defocus_u_angstrom=[5000.0, 5000.0],
        phase_shift_degrees=[0.0, 90.0],
        amplitude_contrast=0.1,
        dtype=torch.float64,
    )
    ctf = ctf_2d(p, box_size_px=64, pixel_size_angstrom=1.0)
    assert float(ctf[1, 0, 0]) == pytest.approx(math.sqrt(1 - 0.01))
    # at the lowest frequencies the phase-plate CTF is high and decreasing, the other rising
    assert float(ctf[1, 0, 1]) > 0.9 and float(ctf[0, 0, 1]) < 0.5
    assert float(ctf[1, 0, 1]) < float(ctf[1, 0, 0])


def test_zeros_at_analytic_radii() -> None:
    du, kv, cs, q0 = 8000.0, 200.0, 2.0, 0.1
    n, pix = 512, 0.5
    p = CTFParams.create(
        defocus_u_angstrom=[du],
        voltage_kv=kv,
        spherical_aberration_mm=cs,
        amplitude_contrast=q0,
        dtype=torch.float64,
    )
    line = ctf_2d(p, box_size_px=n, pixel_size_angstrom=pix)[0, 0].numpy()  # along kx
    k = np.arange(line.size) / (n * pix)
    lam = electron_wavelength_angstrom(kv)
    k3 = math.atan(q0 / math.sqrt(1 - q0**2))
    # gamma = -pi lam du s^2 + pi/2 Cs lam^3 s^4 - K3 = -m pi  (m = 1, 2, ...)
    a, bq = math.pi / 2 * cs * 1e7 * lam**3, -math.pi * lam * du
    zeros = []
    for m in range(1, 6):
        c = m * math.pi - k3
        s2 = (-bq - math.sqrt(bq * bq - 4 * a * c)) / (2 * a)
        zeros.append(math.sqrt(s2))
    sign_changes = np.flatnonzero(np.diff(np.sign(line)) != 0)
    for z in zeros:
        i = int(np.searchsorted(k, z)) - 1  # k[i] <= z < k[i+1]
        assert i in sign_changes
    assert len([s for s in sign_changes if k[s] < zeros[-1]]) == len(zeros)


def test_astigmatism_angle_measured_from_x() -> None:
    du, dv = 12000.0, 6000.0
    n, pix = 64, 1.0

    def ctf(u: float, v: float, ang: float) -> np.ndarray:
        p = CTFParams.create(
            defocus_u_angstrom=[u],
            defocus_v_angstrom=[v],
            defocus_angle_degrees=ang,
            dtype=torch.float64,
        )
        return ctf_2d(p, box_size_px=n, pixel_size_angstrom=pix, rfft=False)[0].numpy()

    along_x = ctf(du, dv, 0.0)
    np.testing.assert_allclose(along_x[0, :], ctf(du, du, 0.0)[0, :], atol=1e-12)  # kx axis: U
    np.testing.assert_allclose(along_x[:, 0], ctf(dv, dv, 0.0)[:, 0], atol=1e-12)  # ky axis: V
    at90 = ctf(du, dv, 90.0)
    np.testing.assert_allclose(at90[:, 0], ctf(du, du, 0.0)[:, 0], atol=1e-12)
    # +45°: U along the (kx, ky) = (+, +) diagonal, i.e. rows and columns both increasing
    diag = np.arange(1, 20)
    at45 = ctf(du, dv, 45.0)
    np.testing.assert_allclose(at45[diag, diag], ctf(du, du, 0.0)[diag, diag], atol=1e-12)
    np.testing.assert_allclose(at45[-diag, diag], ctf(dv, dv, 0.0)[-diag, diag], atol=1e-12)


def test_from_table_take_to() -> None:
    t = ParticleTable.empty_like_stack("s.mrcs", n=3, pixel_size_angstrom=1.0, box_size_px=8)
    t = t.replace(
        defocus_u_angstrom=np.array([1.0, 2.0, 3.0]) * 1e4,
        defocus_v_angstrom=np.array([1.0, 2.0, 3.0]) * 1e4,
    )
    p = CTFParams.from_table(t, rows=[2, 0])
    assert p.defocus_u_angstrom.tolist() == [30000.0, 10000.0]
    assert p.take([1]).defocus_u_angstrom.tolist() == [10000.0]
    assert len(CTFParams.from_table(t).to("cpu")) == 3
    assert float(p.voltage_kv[0]) == 300.0


def test_bad_parameters() -> None:
    with pytest.raises(InputError, match="amplitude contrast"):
        CTFParams.create(defocus_u_angstrom=[1.0], amplitude_contrast=1.0)
    p = CTFParams.create(defocus_u_angstrom=[1.0])
    with pytest.raises(InputError, match="pixel size"):
        ctf_2d(p, box_size_px=8, pixel_size_angstrom=0.0)
    with pytest.raises(InputError, match="SNR"):
        wiener_filter(torch.zeros(1, 8, 8), p, pixel_size_angstrom=1.0, snr=0.0)


@pytest.mark.parametrize("device", available_devices())
def test_phase_flip_and_wiener(device: str) -> None:
    torch.manual_seed(0)
    p = CTFParams.create(defocus_u_angstrom=[15000.0, 20000.0], device=device, dtype=torch.float64)
    img = torch.randn(2, 32, 32, dtype=torch.float64, device=device)
    ctf = ctf_2d(p, box_size_px=32, pixel_size_angstrom=2.0)
    modulated = torch.fft.irfft2(torch.fft.rfft2(img) * ctf, s=(32, 32))
    flipped = phase_flip(modulated, p, pixel_size_angstrom=2.0)
    # phase flipping = multiplying by |CTF|
    expected = torch.fft.irfft2(torch.fft.rfft2(img) * ctf.abs(), s=(32, 32))
    torch.testing.assert_close(flipped, expected)
    # flipping twice gives back the input
    torch.testing.assert_close(phase_flip(flipped, p, pixel_size_angstrom=2.0), modulated)
    # a Wiener filter with a huge SNR undoes the CTF where it is not tiny
    restored = wiener_filter(modulated, p, pixel_size_angstrom=2.0, snr=1e8)
    spec_r, spec_i = torch.fft.rfft2(restored), torch.fft.rfft2(img)
    good = ctf.abs() > 0.2
    torch.testing.assert_close(spec_r[good], spec_i[good], atol=1e-5, rtol=1e-5)
