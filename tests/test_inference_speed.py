"""The faster inference path gives the results of the straightforward one: the grid head's
decoding from a neighbour table against the decoding over every bin (as it was written
first), its numpy row maxima against torch's, the one-pass preprocessing without
``ifftshift`` / ``fftshift`` against the shifted transforms, for even and odd sizes, the
normalisation and mask from tables built once against the masks built per batch, and
`decode`'s float64 copy of a part's columns against that of every output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deephemnma_bridge.alignment.ctf import CTFParams, ctf_2d
from deephemnma_bridge.conventions import canonical_quaternion, quaternion_to_matrix
from deephemnma_bridge.preprocess import (
    PreprocessConfig,
    circular_mask,
    fourier_crop,
    preprocess_images,
)
from deephemnma_bridge.training import so3
from deephemnma_bridge.training.so3 import OrientationGrid, quaternion_to_matrix_t
from deephemnma_bridge.training.targets import TargetSpec, decode


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


def test_numpy_row_maxima_equal_torch_argmax() -> None:
    """`so3._argmax_rows` (numpy on the CPU) gives torch's first maximum of each row: ties,
    NaN, infinities, float64 and a strided view included."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(64, 301, generator=gen)
    values[:8] = values[:8].round()  # many ties
    values[8, 5] = values[8, 200] = float("nan")
    values[9] = float("-inf")
    values[10, 7] = values[10, 9] = float("inf")
    values[11] = 0.0
    for v in (values, values.double(), values[:, ::2], values[:0]):
        assert torch.equal(so3._argmax_rows(v), v.argmax(dim=-1))
    assert so3._argmax_rows(values).dtype == torch.int64


@pytest.mark.parametrize("dense", [False, True])
def test_decoding_with_numpy_maxima_equals_the_torch_one(
    dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoding is the same, to the bit, with torch's argmax (as first written)."""
    grid = OrientationGrid.create(30.0)
    for logits in _logits(grid, 11):
        with monkeypatch.context() as patch:
            if dense:
                patch.setattr(so3, "NEIGHBOUR_TABLE_MAX", 0)
            out = grid.decode(logits, k=4)
            patch.setattr(so3, "_argmax_rows", lambda v: v.argmax(dim=-1))
            ref = grid.decode(logits, k=4)
        for key in ref:
            assert torch.equal(out[key], ref[key]), key


def _masked_normalisation(x: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """The normalisation and mask with the masks built per batch (as first written)."""
    n = int(x.shape[-1])
    radius = config.mask_radius_fraction * n / 2
    if config.normalise != "none":
        if config.normalise == "background":
            region = circular_mask(n, radius_px=radius, dtype=x.dtype) == 0
            values = x[:, region]
        else:
            values = x.reshape(x.shape[0], -1)
        mean = values.mean(dim=1)
        std = values.std(dim=1).clamp_min(torch.finfo(x.dtype).tiny ** 0.5)
        x = (x - mean[:, None, None]) / std[:, None, None]
    if config.soft_mask:
        x = x * circular_mask(n, radius_px=radius, edge_px=config.mask_edge_px, dtype=x.dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [32, 33])
def test_normalisation_from_tables_equals_the_masks_per_batch(dtype: torch.dtype, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    images = torch.randn(5, n, n, generator=gen, dtype=dtype) * 3 + 1
    for config in (
        PreprocessConfig(phase_flip=False),
        PreprocessConfig(phase_flip=False, soft_mask=True, mask_radius_fraction=0.85),
        PreprocessConfig(phase_flip=False, normalise="whole", soft_mask=True, mask_edge_px=2.4),
        PreprocessConfig(phase_flip=False, normalise="none", soft_mask=True),
        PreprocessConfig(phase_flip=False, mask_radius_fraction=1.0),  # pixels on the circle
    ):
        for _ in range(2):  # built, then from the cache
            out = preprocess_images(images, pixel_size_angstrom=1.0, config=config)
            assert torch.equal(out, _masked_normalisation(images, config)), config


@pytest.mark.parametrize("head", ["quaternion", "grid"])
def test_decode_equals_the_float64_copy_of_every_output(head: str) -> None:
    """`decode` converts a part's columns alone to float64: the values of the conversion of
    the whole output (as first written)."""
    spec = TargetSpec.create("all", n_modes=3, orientation_head=head, grid_step_degrees=30.0)
    spec = spec.fitted(
        np.array([[1.0, -2.0, 0.5], [3.0, 0.0, 1.5], [0.0, 1.0, -1.0]]),
        np.array([[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]]),
    )
    outputs = torch.randn(6, spec.n_outputs, generator=torch.Generator().manual_seed(4))
    got = decode(spec, outputs, top_k=2)
    y = outputs.double().numpy()
    sl = spec.slices
    amplitudes = y[:, sl["amplitudes"]] * np.asarray(spec.amplitude_std)
    np.testing.assert_array_equal(got["amplitudes"], amplitudes + spec.amplitude_mean)
    shifts = y[:, sl["shifts"]] * np.asarray(spec.shift_std) + np.asarray(spec.shift_mean)
    np.testing.assert_array_equal(got["shifts"], shifts)
    if head == "quaternion":
        v = y[:, sl["orientation"]]
        q = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        np.testing.assert_array_equal(
            got["rotations"], quaternion_to_matrix(canonical_quaternion(q))
        )
    else:
        assert spec.grid is not None
        ref = spec.grid.decode(outputs[:, sl["orientation"]], k=2)
        np.testing.assert_array_equal(got["candidates"], ref["candidates"].double().numpy())
        np.testing.assert_array_equal(got["confidence"], ref["confidence"].double().numpy())
