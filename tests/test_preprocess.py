"""Preprocessing: Fourier cropping, phase flip, normalisation, mask, config round trip."""

from __future__ import annotations

import json

import pytest
import torch

from deephemnma_bridge.alignment.ctf import CTFParams, ctf_2d, phase_flip
from deephemnma_bridge.alignment.render import render_real
from deephemnma_bridge.device import available_devices
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.preprocess import (
    PreprocessConfig,
    circular_mask,
    fourier_crop,
    output_pixel_size,
    preprocess_images,
)

DEVICES = available_devices()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n_in", "n_out"), [(64, 32), (65, 33), (64, 40), (50, 25)])
def test_fourier_crop_equals_rendering_at_the_coarser_pixel(
    device: str, n_in: int, n_out: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    pos = (torch.randn(2, 12, 2, generator=gen, dtype=torch.float64) * 6).to(device)
    fine = render_real(pos, box_size_px=n_in, pixel_size_angstrom=1.0, sigma_angstrom=3.0)
    coarse_pix = n_in / n_out
    coarse = render_real(pos, box_size_px=n_out, pixel_size_angstrom=coarse_pix, sigma_angstrom=3.0)
    cropped = fourier_crop(fine, n_out)
    # fourier_crop keeps the mean pixel value; render_real integrates over the (larger) pixel
    torch.testing.assert_close(
        cropped * coarse_pix**2, coarse, atol=2e-4 * float(coarse.max()), rtol=0
    )


def test_fourier_crop_centre_and_antialiasing() -> None:
    n_in, n = 64, 32
    img = torch.zeros(1, n_in, n_in, dtype=torch.float64)
    img[0, n_in // 2, n_in // 2] = 1.0
    out = fourier_crop(img, n)
    assert divmod(int(out[0].argmax()), n) == (n // 2, n // 2)
    assert float(out.mean()) == pytest.approx(float(img.mean()))
    # a cosine above the new Nyquist (20 periods per box > 16) disappears completely
    x = torch.arange(n_in, dtype=torch.float64)
    wave = torch.cos(2 * torch.pi * x * 20 / n_in)[None, None, :].expand(1, n_in, n_in)
    assert float(fourier_crop(wave, n).abs().max()) < 1e-12
    # one below it (period 8 px) survives with its amplitude
    slow = torch.cos(2 * torch.pi * (x - n_in // 2) / 8.0)[None, None, :].expand(1, n_in, n_in)
    assert float(fourier_crop(slow, n).abs().max()) == pytest.approx(1.0)
    with pytest.raises(InputError, match="larger"):
        fourier_crop(img, 80)


def test_output_pixel_size_and_config_round_trip() -> None:
    cfg = PreprocessConfig(output_size_px=128, normalise="whole", lowpass_angstrom=8.0)
    assert output_pixel_size(0.325, 256, cfg) == pytest.approx(0.65)
    assert output_pixel_size(1.0, 64, PreprocessConfig()) == 1.0
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InputError, match="unknown"):
        PreprocessConfig.from_dict({"bogus": 1})
    with pytest.raises(InputError, match="normalise"):
        PreprocessConfig(normalise="inside")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="mask_radius_fraction"):
        PreprocessConfig(mask_radius_fraction=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n_in", "n_out"), [(64, 32), (65, 33), (64, 64)])
@pytest.mark.parametrize("lowpass", [None, 6.0])
def test_phase_flip_then_crop(device: str, n_in: int, n_out: int, lowpass: float | None) -> None:
    """The one-pass preprocessing equals the steps one after the other: phase flip at the
    input size, Fourier crop, low-pass at the output pixel size."""
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(3, n_in, n_in, generator=gen, dtype=torch.float64).to(device)
    ctf = CTFParams.create(defocus_u_angstrom=[8000.0, 12000.0, 20000.0], device=device)
    cfg = PreprocessConfig(
        output_size_px=n_out, phase_flip=True, normalise="none", lowpass_angstrom=lowpass
    )
    out = preprocess_images(img, pixel_size_angstrom=1.0, config=cfg, ctf=ctf)
    expected = fourier_crop(phase_flip(img, ctf, pixel_size_angstrom=1.0), n_out)
    if lowpass is not None:
        pix = n_in / n_out
        k = torch.sqrt(
            torch.fft.fftfreq(n_out, d=pix, dtype=torch.float64)[:, None] ** 2
            + torch.fft.rfftfreq(n_out, d=pix, dtype=torch.float64)[None, :] ** 2
        ).to(device)
        edge = 0.5 * (1 + torch.cos(torch.pi * ((k - 1 / lowpass) * n_out * pix).clamp(0, 1)))
        expected = torch.fft.irfft2(torch.fft.rfft2(expected) * edge, s=(n_out, n_out))
    torch.testing.assert_close(out, expected)
    if (n_in, n_out, lowpass) != (64, 32, None):
        return
    # a CTF-modulated image, once flipped, correlates positively with the |CTF|-filtered one
    c = ctf_2d(ctf, box_size_px=64, pixel_size_angstrom=1.0)
    modulated = torch.fft.irfft2(torch.fft.rfft2(img) * c, s=(64, 64))
    flipped = preprocess_images(
        modulated, pixel_size_angstrom=1.0, config=PreprocessConfig(normalise="none"), ctf=ctf
    )
    target = torch.fft.irfft2(torch.fft.rfft2(img) * c.abs(), s=(64, 64))
    torch.testing.assert_close(flipped, target, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="CTF"):
        preprocess_images(img, pixel_size_angstrom=1.0, config=cfg)


@pytest.mark.parametrize("device", DEVICES)
def test_normalisation_and_mask(device: str) -> None:
    gen = torch.Generator().manual_seed(2)
    img = (torch.randn(2, 40, 40, generator=gen) * 3 + 7).to(device)
    img[:, 15:25, 15:25] += 50  # a bright particle in the middle
    bg = PreprocessConfig(phase_flip=False, normalise="background", mask_radius_fraction=0.8)
    out = preprocess_images(img, pixel_size_angstrom=1.0, config=bg)
    outside = circular_mask(40, radius_px=16.0, device=device) == 0
    vals = out[:, outside]
    torch.testing.assert_close(vals.mean(dim=1), torch.zeros(2, device=device), atol=1e-5, rtol=0)
    torch.testing.assert_close(vals.std(dim=1), torch.ones(2, device=device))
    assert float(out[:, 20, 20].min()) > 10  # the particle is far above the background
    whole = preprocess_images(
        img, pixel_size_angstrom=1.0, config=PreprocessConfig(phase_flip=False, normalise="whole")
    )
    torch.testing.assert_close(whole.flatten(1).std(dim=1), torch.ones(2, device=device))
    masked = preprocess_images(
        img,
        pixel_size_angstrom=1.0,
        config=PreprocessConfig(
            phase_flip=False, soft_mask=True, mask_radius_fraction=0.5, mask_edge_px=4
        ),
    )
    assert float(masked[:, 0, 0].abs().max()) == 0.0
    m = circular_mask(40, radius_px=10.0, edge_px=4.0)
    assert float(m[20, 20]) == 1.0 and float(m[20, 35]) == 0.0
    assert float(m[20, 32]) == pytest.approx(0.5)


def test_lowpass_removes_high_frequencies() -> None:
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(1, 64, 64, generator=gen, dtype=torch.float64)
    cfg = PreprocessConfig(phase_flip=False, normalise="none", lowpass_angstrom=8.0)
    out = preprocess_images(img, pixel_size_angstrom=1.0, config=cfg)
    spec = torch.fft.rfft2(out)[0].abs()
    ky = torch.fft.fftfreq(64, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(64, dtype=torch.float64)[None, :]
    k = torch.sqrt(kx**2 + ky**2)
    assert float(spec[k > 1 / 8.0 + 1 / 64].max()) < 1e-9
    low = k < 1 / 8.0 - 1 / 64
    torch.testing.assert_close(spec[low], torch.fft.rfft2(img)[0].abs()[low])


def test_each_torchrun_rank_gets_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun, an unindexed CUDA device is the rank's GPU (cuda:LOCAL_RANK), not GPU 0
    for every rank; an explicit index and the CPU are kept."""
    from deephemnma_bridge.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("auto") == torch.device("cuda")
