"""Forward model: RELION geometry, origin sign, Fourier vs real space, gradients, RELION data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from scipy.spatial.transform import Rotation

from deephemnma_bridge.alignment.ctf import CTFParams, ctf_2d, fourier_frequencies
from deephemnma_bridge.alignment.render import (
    FourierBand,
    deform_coordinates,
    project_positions,
    render_fourier,
    render_projections,
    render_projections_fourier,
    render_real,
)
from deephemnma_bridge.conventions import euler_to_matrix
from deephemnma_bridge.device import available_devices
from deephemnma_bridge.errors import InputError

DEVICES = available_devices()
SIMPLE = SHARED_DATA / "relion" / "simplecryoem"

# an asymmetric model: no rotation maps it onto itself
MODEL = np.array(
    [[0.0, 0.0, 0.0], [9.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 3.0], [-4.0, -7.0, 2.0]]
)
ANGLES = np.array([[0.0, 0.0, 0.0], [30.0, 50.0, 70.0], [-120.0, 100.0, 15.0], [200.0, 160, -45]])


def _direct(
    points: np.ndarray, angles: np.ndarray, origin: np.ndarray, n: int, pix: float, sigma: float
) -> np.ndarray:
    """Independent computation: scipy rotation (INTEROP section 0), 2D Gaussians evaluated
    pixel by pixel on a meshgrid, image = projection translated by minus the origin."""
    a = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().T
    rotated = points @ a.T
    yy, xx = np.meshgrid(
        (np.arange(n) - n // 2) * pix, (np.arange(n) - n // 2) * pix, indexing="ij"
    )
    img = np.zeros((n, n))
    for x, y, _z in rotated:
        cx, cy = x - origin[0], y - origin[1]
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return img * pix**2 / (2 * np.pi * sigma**2)


@pytest.mark.parametrize("device", DEVICES)
def test_render_matches_independent_computation(device: str) -> None:
    n, pix, sigma = 40, 1.2, 1.5
    origins = np.array([[0.0, 0.0], [2.5, -1.0], [-3.7, 4.1], [1.0, 1.0]])
    coords = torch.tensor(MODEL, device=device)
    out = (
        render_projections(
            coords,
            torch.zeros(0, 5, 3, device=device, dtype=torch.float64),
            torch.zeros(4, 0, device=device, dtype=torch.float64),
            torch.tensor(euler_to_matrix(ANGLES), device=device),
            torch.tensor(origins, device=device),
            box_size_px=n,
            pixel_size_angstrom=pix,
            sigma_angstrom=sigma,
            truncate_sigmas=None,
        )
        .cpu()
        .numpy()
    )
    truncated = (
        render_projections(
            coords,
            torch.zeros(0, 5, 3, device=device, dtype=torch.float64),
            torch.zeros(4, 0, device=device, dtype=torch.float64),
            torch.tensor(euler_to_matrix(ANGLES), device=device),
            torch.tensor(origins, device=device),
            box_size_px=n,
            pixel_size_angstrom=pix,
            sigma_angstrom=sigma,
            truncate_sigmas=5.0,
        )
        .cpu()
        .numpy()
    )
    np.testing.assert_allclose(truncated, out, atol=1e-5 * out.max())
    for i in range(4):
        np.testing.assert_allclose(
            out[i], _direct(MODEL, ANGLES[i], origins[i], n, pix, sigma), atol=1e-10
        )
    # the inverse rotation (A transposed: angles -psi, -tilt, -rot) does not match
    wrong = _direct(MODEL, -ANGLES[1, ::-1], origins[1], n, pix, sigma)
    assert np.abs(out[1] - wrong).max() > 1e-2


def test_origin_sign_and_centre() -> None:
    """A Gaussian at the rotation centre with rlnOriginXAngst = +3 Å appears at x = c - 3/psize."""
    n, pix = 32, 0.5
    img = render_real(
        torch.zeros(1, 1, 2, dtype=torch.float64) - torch.tensor([3.0, 0.0]),
        box_size_px=n,
        pixel_size_angstrom=pix,
        sigma_angstrom=0.5,
    )
    pos = project_positions(
        torch.zeros(1, 3, dtype=torch.float64),
        torch.eye(3, dtype=torch.float64)[None],
        torch.tensor([[3.0, -1.0]], dtype=torch.float64),
    )
    assert pos.tolist() == [[[-3.0, 1.0]]]
    row, col = divmod(int(img[0].argmax()), n)
    assert (row, col) == (n // 2, n // 2 - 6)
    img2 = render_real(pos, box_size_px=n, pixel_size_angstrom=pix, sigma_angstrom=0.5)
    assert divmod(int(img2[0].argmax()), n) == (n // 2 + 2, n // 2 - 6)
    # x is the column axis, y the row axis; a point at +x, seen at rot=90 (A = Rz(-90)), goes to -y
    a = torch.tensor(euler_to_matrix([90.0, 0.0, 0.0]))
    p = project_positions(
        torch.tensor([[4.0, 0.0, 0.0]], dtype=torch.float64),
        a[None],
        torch.zeros(1, 2, dtype=torch.float64),
    )
    torch.testing.assert_close(p[0, 0], torch.tensor([0.0, -4.0], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [32, 33])
def test_fourier_matches_real(device: str, n: int) -> None:
    gen = torch.Generator().manual_seed(1)
    pos = (torch.randn(3, 40, 2, generator=gen, dtype=torch.float64) * 2.5).to(device)
    w = torch.rand(40, generator=gen, dtype=torch.float64).to(device)
    kw = dict(box_size_px=n, pixel_size_angstrom=1.1, sigma_angstrom=2.0)
    img = render_real(pos, weights=w, **kw)  # type: ignore[arg-type]
    band = FourierBand.create(
        box_size_px=n,
        pixel_size_angstrom=1.1,
        resolution_angstrom=4.0,
        device=device,
        dtype=torch.float64,
    )
    re, im = render_fourier(pos, band, sigma_angstrom=2.0, weights=w, max_elements=300)
    re2, im2 = band.extract_images(img)
    scale = float(re.abs().max())
    torch.testing.assert_close(re, re2, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(im, im2, atol=1e-5 * scale, rtol=0)
    # Parseval over the band: weights give N^2 x the real-space inner product of band-limited images
    full = FourierBand.create(
        box_size_px=n, pixel_size_angstrom=1.1, device=device, dtype=torch.float64
    )
    fr, fi = full.extract_images(img)
    lhs = (full.weights * (fr * fr + fi * fi)).sum(dim=(1, 2))
    torch.testing.assert_close(lhs, n * n * (img * img).sum(dim=(1, 2)))


@pytest.mark.parametrize("device", DEVICES)
def test_chunking_and_batch_weights(device: str) -> None:
    gen = torch.Generator().manual_seed(2)
    pos = (torch.randn(2, 50, 2, generator=gen) * 6).to(device)
    w = torch.rand(2, 50, generator=gen).to(device)
    kw = dict(box_size_px=24, pixel_size_angstrom=1.0, sigma_angstrom=1.5)
    a = render_real(pos, weights=w, **kw)  # type: ignore[arg-type]
    b = render_real(pos, weights=w, max_elements=100, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    single = render_real(pos[1:], weights=w[1], **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(a[1:], single, atol=1e-6, rtol=1e-5)


def test_deformation_moves_nodes() -> None:
    coords = torch.zeros(2, 3, dtype=torch.float64)
    mode = torch.zeros(1, 2, 3, dtype=torch.float64)
    mode[0, 1, 0] = 1.0  # node 1 along x
    moved = deform_coordinates(coords, mode, torch.tensor([[2.5]], dtype=torch.float64))
    assert moved[0].tolist() == [[0.0, 0.0, 0.0], [2.5, 0.0, 0.0]]
    with pytest.raises(ValueError, match="amplitudes"):
        deform_coordinates(coords, mode, torch.zeros(1, 2, dtype=torch.float64))


def test_gradients_amplitudes_rotation_shift() -> None:
    gen = torch.Generator().manual_seed(3)
    coords = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 4
    modes = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    modes = modes / modes.flatten(1).norm(dim=1)[:, None, None]
    amps = torch.randn(2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    rot = torch.tensor(euler_to_matrix([[10, 40, 60], [100, 20, -30]]), requires_grad=True)
    shifts = torch.randn(2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    band = FourierBand.create(
        box_size_px=16, pixel_size_angstrom=1.5, resolution_angstrom=5.0, dtype=torch.float64
    )

    def real(a: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return render_projections(
            coords, modes, a, r, s, box_size_px=16, pixel_size_angstrom=1.5, sigma_angstrom=2.0
        )

    def fourier(a: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        re, im = render_projections_fourier(coords, modes, a, r, s, band, sigma_angstrom=2.0)
        return torch.stack([re, im])

    assert torch.autograd.gradcheck(real, (amps, rot, shifts))
    assert torch.autograd.gradcheck(fourier, (amps, rot, shifts))


def test_bad_geometry() -> None:
    with pytest.raises(InputError, match="pixel size"):
        render_real(
            torch.zeros(1, 1, 2), box_size_px=8, pixel_size_angstrom=0.0, sigma_angstrom=1.0
        )
    with pytest.raises(InputError, match="sigma"):
        render_real(
            torch.zeros(1, 1, 2), box_size_px=8, pixel_size_angstrom=1.0, sigma_angstrom=-1.0
        )


@pytest.mark.skipif(not SIMPLE.exists(), reason="shared RELION test data not present")
def test_against_relion_project_pointmass() -> None:
    """relion_project 3.1 CTF-modulated projections of a point mass at the STAR poses."""
    mrcfile = pytest.importorskip("mrcfile")
    starfile = pytest.importorskip("starfile")
    vol = mrcfile.open(SIMPLE / "pointmass.mrc").data
    stack = np.asarray(mrcfile.open(SIMPLE / "relion_proj_batch.mrcs").data, dtype=np.float64)
    star = starfile.read(SIMPLE / "relion_proj_batch.star")
    parts, optics = star["particles"], star["optics"]
    pix = float(optics["rlnImagePixelSize"][0])
    n = int(optics["rlnImageSize"][0])
    z, y, x = np.unravel_index(int(vol.argmax()), vol.shape)  # MRC order: z, y, x
    centre = n // 2
    point = torch.tensor(
        [[(x - centre) * pix, (y - centre) * pix, (z - centre) * pix]], dtype=torch.float64
    )
    assert float(point.abs().sum()) > 0  # the point is off-centre, so poses matter
    angles = parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    a = torch.tensor(euler_to_matrix(angles))
    origins = torch.tensor(parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    ctf = ctf_2d(
        CTFParams.create(
            defocus_u_angstrom=parts["rlnDefocusU"],
            defocus_v_angstrom=parts["rlnDefocusV"],
            defocus_angle_degrees=parts["rlnDefocusAngle"],
            phase_shift_degrees=parts["rlnPhaseShift"],
            bfactor_angstrom2=parts["rlnCtfBfactor"],
            voltage_kv=float(optics["rlnVoltage"][0]),
            spherical_aberration_mm=float(optics["rlnSphericalAberration"][0]),
            amplitude_contrast=float(optics["rlnAmplitudeContrast"][0]),
            dtype=torch.float64,
        ),
        box_size_px=n,
        pixel_size_angstrom=pix,
    )
    ky, kx = fourier_frequencies(n, pix, dtype=torch.float64)
    lowpass = ((kx * kx + ky * ky) <= 1 / 12.0**2).to(torch.float64)  # same band for both

    def corr(positions: torch.Tensor) -> np.ndarray:
        img = render_real(positions, box_size_px=n, pixel_size_angstrom=pix, sigma_angstrom=1.5)
        ours = torch.fft.irfft2(torch.fft.rfft2(img) * ctf * lowpass, s=(n, n)).numpy()
        ref = torch.fft.irfft2(torch.fft.rfft2(torch.tensor(stack)) * lowpass, s=(n, n)).numpy()
        return np.array([np.corrcoef(o.ravel(), r.ravel())[0, 1] for o, r in zip(ours, ref)])

    good = corr(project_positions(point, a, origins))
    assert good.min() > 0.95, good
    # negative controls: transposed matrices or the opposite origin sign do not match
    assert corr(project_positions(point, a.transpose(1, 2), origins)).min() < 0.5
    assert corr(project_positions(point, a, -origins)).mean() < 0.5
