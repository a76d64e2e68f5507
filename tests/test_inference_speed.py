"""The faster inference path gives the results of the straightforward one: the grid head's
decoding from a neighbour table against the decoding over every bin (as it was written
first), and the one-pass preprocessing without ``ifftshift`` / ``fftshift`` against the
shifted transforms, for even and odd sizes."""

from __future__ import annotations

import math

import pytest
import torch

from deephemnma_bridge.alignment.ctf import CTFParams, ctf_2d
from deephemnma_bridge.preprocess import PreprocessConfig, fourier_crop, preprocess_images
from deephemnma_bridge.training import so3
from deephemnma_bridge.training.so3 import OrientationGrid, quaternion_to_matrix_t


def _dense_decode(
    grid: OrientationGrid, logits: torch.Tensor, k: int, separation_degrees: float | None
) -> dict[str, torch.Tensor]:
    """The decoding over every bin at each step, as first written (the reference)."""
    k = max(1, min(k, grid.size))
    p = torch.softmax(logits.float(), dim=-1)
    sep_degrees = 2 * grid.step_degrees if separation_degrees is None else separation_degrees
    sep = math.radians(sep_degrees)
    near = math.radians(1.5 * grid.step_degrees)
    free = torch.ones_like(p, dtype=torch.bool)
    claimed = torch.zeros_like(p, dtype=torch.bool)
    quats, masses = [], []
    for _ in range(k):
        idx = torch.where(free, p, torch.full_like(p, -1.0)).argmax(dim=-1)
        centre = grid.quaternions[idx]
        a = grid.angles(centre)
        w = p * ((a <= near) & ~claimed)
        sign = torch.sign(grid.quaternions @ centre.T).T
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        mean = (w * sign) @ grid.quaternions
        quats.append(mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        masses.append(w.sum(-1))
        free &= a > sep
        claimed |= a <= near
    cand = quaternion_to_matrix_t(torch.stack(quats, 1))
    mass = torch.stack(masses, 1)
    return {"rotations": cand[:, 0], "candidates": cand, "probabilities": mass}


def _logits(grid: OrientationGrid, seed: int) -> list[torch.Tensor]:
    """Flat, noisy and peaked scores (several peaks: candidates near one another)."""
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.randn(48, grid.size, generator=gen) * 3
    peaked = torch.randn(48, grid.size, generator=gen)
    for j in range(3):  # three peaks per particle, sharp, at random bins
        bins = torch.randint(grid.size, (48,), generator=gen)
        peaked[torch.arange(48), bins] += 12 - 3 * j
    return [torch.zeros(3, grid.size), noisy, peaked, noisy[:1]]


@pytest.mark.parametrize("step", [15.0, 30.0])
@pytest.mark.parametrize("separation", [None, 0.0, 50.0])
def test_table_decoding_equals_the_dense_one(
    step: float, separation: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = OrientationGrid.create(step)
    near = math.radians(1.5 * step)
    assert grid._tabled(near, math.radians(2 * step if separation is None else separation))
    dense = OrientationGrid.create(step)
    for n, logits in enumerate(_logits(grid, int(step))):
        for k in (1, 4, 7):
            out = grid.decode(logits, k=k, separation_degrees=separation)
            with monkeypatch.context() as patch:
                patch.setattr(so3, "NEIGHBOUR_TABLE_MAX", 0)  # no table: over every bin
                ref = dense.decode(logits, k=k, separation_degrees=separation)
            # the same bins chosen: the candidates agree to rounding, not to a bin
            torch.testing.assert_close(out["candidates"], ref["candidates"], atol=2e-5, rtol=0)
            torch.testing.assert_close(
                out["probabilities"], ref["probabilities"], atol=2e-6, rtol=1e-5
            )
            assert torch.equal(out["confidence"], out["probabilities"][:, 0]), (n, k)
            assert torch.equal(out["rotations"], out["candidates"][:, 0])
    assert grid._tables and not dense._tables  # each path ran
    # the whole grid within the separation: decoded densely at 15° (no table of G x G)
    assert grid._tabled(near, math.radians(400.0)) == (grid.size < 2000)
    out = grid.decode(_logits(grid, 1)[1], k=3, separation_degrees=400.0)
    ref = _dense_decode(grid, _logits(grid, 1)[1], 3, 400.0)
    torch.testing.assert_close(out["candidates"], ref["candidates"], atol=2e-5, rtol=0)


@pytest.mark.parametrize(("step", "separation"), [(15.0, None), (15.0, 37.0), (30.0, 50.0)])
def test_decoding_equals_the_float32_one(step: float, separation: float | None) -> None:
    """Against the decoding as first written (float32 angles over every bin): the same first
    orientation and confidence; the same k candidates where no two bins are at the
    separation (at two steps, float32 rounding put exact pairs on either side)."""
    grid = OrientationGrid.create(step)
    for logits in _logits(grid, 7):
        out = grid.decode(logits, k=4, separation_degrees=separation)
        ref = _dense_decode(grid, logits, 4, separation)
        first = slice(None) if separation is not None else slice(0, 1)
        torch.testing.assert_close(
            out["candidates"][:, first], ref["candidates"][:, first], atol=2e-5, rtol=0
        )
        torch.testing.assert_close(
            out["probabilities"][:, first], ref["probabilities"][:, first], atol=2e-6, rtol=1e-5
        )


def test_prepare_decode_builds_the_table_decode_uses() -> None:
    grid = OrientationGrid.create(30.0)
    grid.prepare_decode()
    assert len(grid._tables) == 1
    grid.decode(torch.randn(2, grid.size), k=2)
    assert len(grid._tables) == 1  # reused, not rebuilt
    grid.decode(torch.randn(2, grid.size), k=2, separation_degrees=45.0)
    assert len(grid._tables) == 2
    table = next(iter(grid._tables.values()))
    # every bin's first neighbour entry is a real one, and the bin itself is among them
    assert bool(table.near_valid[:, 0].all())
    own = (table.near_index == torch.arange(grid.size)[:, None]) & table.near_valid
    assert bool(own.any(1).all())
    # the pairs exactly two steps apart (in-plane angles 60° apart) are all within the
    # separation (not free), whichever side of it rounding puts them
    assert grid.exact is not None and grid.exact.dtype == torch.float64
    dot = so3._dots(grid.exact[:, None], grid.exact)
    sep = math.radians(60.0)
    exact = (2 * torch.arccos(dot.abs().clamp(max=1)) - sep).abs() < 1e-12
    assert int(exact.sum()) >= grid.size  # every bin has such pairs
    assert bool(so3._within(dot, sep)[exact].all())
    assert not bool(so3._within(dot, sep - 1e-6)[exact].any())
    sep_index = table.sep_index
    for i in range(0, grid.size, 37):  # the table holds them too
        pairs = set(torch.nonzero(exact[i]).flatten().tolist())
        assert pairs <= set(sep_index[i].tolist())


def _shifted_preprocess(
    images: torch.Tensor, pixel: float, config: PreprocessConfig, ctf: CTFParams | None
) -> torch.Tensor:
    """The Fourier part of the preprocessing with explicit ``ifftshift`` / ``fftshift`` (as
    first written), then the same normalisation and mask (the reference)."""
    n_in = int(images.shape[-1])
    n = config.output_size_px or n_in
    pix = pixel * n_in / n
    spec = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    if n != n_in:
        rows = torch.cat([torch.arange(0, (n + 1) // 2), torch.arange(n_in - n // 2, n_in)])
        spec = spec[..., rows, : n // 2 + 1].clone()
        if n % 2 == 0:
            spec[..., n // 2, :] = 0
            spec[..., :, n // 2] = 0
    if ctf is not None and config.phase_flip:
        sign = ctf_2d(ctf, box_size_px=n, pixel_size_angstrom=pix)
        spec = spec * torch.where(sign < 0, -1.0, 1.0).to(images.dtype)
    if config.lowpass_angstrom is not None:
        ky = torch.fft.fftfreq(n, d=pix, dtype=images.dtype)[:, None]
        kx = torch.fft.rfftfreq(n, d=pix, dtype=images.dtype)[None, :]
        t = ((torch.sqrt(kx * kx + ky * ky) - 1 / config.lowpass_angstrom) * n * pix).clamp(0, 1)
        spec = spec * 0.5 * (1 + torch.cos(math.pi * t))
    x = torch.fft.irfft2(spec, s=(n, n)) * (n * n / (n_in * n_in))
    x = torch.fft.fftshift(x, dim=(-2, -1))
    rest = PreprocessConfig(
        phase_flip=False,
        normalise=config.normalise,
        mask_radius_fraction=config.mask_radius_fraction,
        soft_mask=config.soft_mask,
        mask_edge_px=config.mask_edge_px,
    )
    return preprocess_images(x, pixel_size_angstrom=pix, config=rest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n_in", "n_out"), [(128, 32), (64, 64), (65, 33), (64, 33), (65, 32), (50, 25), (33, 33)]
)
def test_unshifted_preprocessing_equals_the_shifted_one(
    dtype: torch.dtype, n_in: int, n_out: int
) -> None:
    gen = torch.Generator().manual_seed(n_in * 100 + n_out)
    images = torch.randn(4, n_in, n_in, generator=gen, dtype=dtype) * 2 + 5
    images[:, n_in // 3 : n_in // 2, n_in // 4 : n_in // 2] += 20  # off-centre: shifts matter
    ctf = CTFParams.create(defocus_u_angstrom=[6000.0, 9000.0, 15000.0, 22000.0])
    tol = {"atol": 2e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    for config in (
        PreprocessConfig(output_size_px=n_out, normalise="none"),
        PreprocessConfig(
            output_size_px=n_out, lowpass_angstrom=4.0, soft_mask=True, mask_radius_fraction=0.85
        ),
        PreprocessConfig(output_size_px=n_out, phase_flip=False, normalise="whole"),
    ):
        out = preprocess_images(images, pixel_size_angstrom=1.0, config=config, ctf=ctf)
        ref = _shifted_preprocess(images, 1.0, config, ctf)
        assert out.dtype == dtype and out.shape == (4, n_out, n_out)
        torch.testing.assert_close(out, ref, **tol)
    if n_out < n_in:
        ref = _shifted_preprocess(
            images,
            1.0,
            PreprocessConfig(output_size_px=n_out, phase_flip=False, normalise="none"),
            None,
        )
        torch.testing.assert_close(fourier_crop(images, n_out), ref, **tol)
