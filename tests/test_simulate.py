"""Simulator: ground truth, determinism, pinned SNR, checks, and the CLI round trip."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deephemnma_bridge.alignment.ctf import CTFParams, ctf_2d
from deephemnma_bridge.alignment.render import render_projections
from deephemnma_bridge.conventions import euler_to_matrix
from deephemnma_bridge.device import available_devices
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.simulate import (
    SimulationConfig,
    SimulationModel,
    SimulationStats,
    check_simulation,
    draw_truth,
    simulate_images,
    simulation_table,
)


def _toy_model(render: str = "atoms", n_nodes: int = 40) -> SimulationModel:
    """Nodes in a 9 Å blob, 9 smooth (linear-field) orthonormal modes, 4 atoms per node."""
    rng = np.random.default_rng(5)
    nodes = rng.normal(size=(n_nodes, 3)) * 4 + 20.0  # off-origin: the model gets centred
    fields = [rng.normal(size=(3, 3)) @ (nodes - 20).T for _ in range(9)]
    flat = np.stack([f.T.ravel() for f in fields], axis=1)
    q, _ = np.linalg.qr(flat)
    vectors = q.T.reshape(9, n_nodes, 3)
    kw: dict[str, Any] = {}
    if render == "atoms":
        kw = dict(
            atom_coordinates=np.repeat(nodes, 4, axis=0) + rng.normal(size=(4 * n_nodes, 3)),
            atom_node=np.repeat(np.arange(n_nodes), 4),
        )
    return SimulationModel.from_arrays(nodes, vectors, np.arange(1, 10), [7, 8, 9], **kw)


def _config(**kw: object) -> SimulationConfig:
    base: dict[str, object] = dict(
        n_particles=24,
        box_size_px=48,
        pixel_size_angstrom=1.0,
        max_rms_displacement_angstrom=1.0,
        chunk_size=10,
    )
    base.update(kw)
    return SimulationConfig(**base)  # type: ignore[arg-type]


def test_truth_distribution_and_helix_formula() -> None:
    model = _toy_model()
    assert np.allclose(model.node_coordinates.mean(axis=0), 0)
    cfg = _config(n_particles=500, max_rms_displacement_angstrom=2.0)
    truth = draw_truth(cfg, model)
    t = truth.trajectory_t
    expected = np.stack([np.cos(4 * np.pi * t), np.sin(4 * np.pi * t), 2 * t - 1], axis=1)
    np.testing.assert_allclose(truth.amplitudes, truth.amplitude_scale * expected)
    assert model.rms_displacement(truth.amplitudes).max() <= 2.0 + 1e-9
    assert model.rms_displacement(truth.amplitudes).max() > 1.9
    r = truth.rotation_matrices
    np.testing.assert_allclose(
        r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-12
    )
    assert np.abs(truth.shifts_angstrom).max() <= 5.0
    # uniform over SO(3): the viewing direction's z component (cos tilt) is uniform in [-1, 1]
    assert abs(float(np.mean(r[:, 2, 2]))) < 0.1
    for kind in ("uniform", "clusters"):
        other = draw_truth(_config(n_particles=200, amplitudes=kind), model)
        assert model.rms_displacement(other.amplitudes).max() == pytest.approx(1.0)
    assert (draw_truth(_config(amplitudes="clusters"), model).cluster >= 0).all()


@pytest.mark.parametrize("device", available_devices())
def test_images_match_the_written_ground_truth(device: str) -> None:
    model = _toy_model("nodes")
    cfg = _config(sigma_angstrom=2.0)
    truth = draw_truth(cfg, model)
    table = simulation_table(cfg, model, truth, "particles.mrcs")
    assert table.rotation_matrices is None and not table.shifts_angstrom.any()
    clean = np.concatenate(
        [c.clean for c in simulate_images(cfg, model, truth, device=device, keep_clean=True)]
    )
    # rebuild the noiseless images from the table's ground-truth columns only
    e = table.extra
    angles = np.stack([e["dhnTrueAngleRot"], e["dhnTrueAngleTilt"], e["dhnTrueAnglePsi"]], 1)
    amps = np.stack([e[f"dhnTrueAmplitude{m}"] for m in (7, 8, 9)], 1)
    origins = np.stack([e["dhnTrueOriginXAngst"], e["dhnTrueOriginYAngst"]], 1)
    proj = render_projections(
        torch.tensor(model.node_coordinates),
        torch.tensor(model.modes),
        torch.tensor(amps),
        torch.tensor(euler_to_matrix(angles)),
        torch.tensor(origins),
        box_size_px=48,
        pixel_size_angstrom=1.0,
        sigma_angstrom=2.0,
    )
    ctf = ctf_2d(
        CTFParams.from_table(table, dtype=torch.float64), box_size_px=48, pixel_size_angstrom=1.0
    )
    expected = torch.fft.irfft2(torch.fft.rfft2(proj) * ctf, s=(48, 48)).numpy()
    np.testing.assert_allclose(clean, expected, atol=2e-4 * np.abs(expected).max())


def test_deterministic_for_a_seed() -> None:
    model = _toy_model()
    cfg = _config()

    def run(c: SimulationConfig) -> np.ndarray:
        return np.concatenate([ch.images for ch in simulate_images(c, model, draw_truth(c, model))])

    a, b = run(cfg), run(cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(_config(seed=1)))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_measured_snr_matches_request(fraction: float) -> None:
    model = _toy_model()
    cfg = _config(n_particles=20, box_size_px=64, snr=0.05, noise_before_ctf_fraction=fraction)
    truth = draw_truth(cfg, model)
    stats = SimulationStats()
    per_particle = []
    for ch in simulate_images(cfg, model, truth, keep_clean=True):
        stats.add(ch)
        assert ch.clean is not None
        noise = ch.images.astype(np.float64) - ch.clean
        per_particle += list(ch.clean.var(axis=(1, 2)) / noise.var(axis=(1, 2)))
    np.testing.assert_allclose(per_particle, 0.05, rtol=0.08)
    summary = stats.summary()
    assert summary["snr_whole"] == pytest.approx(0.05, rel=0.03)
    # at 1 Å/px most of the signal lies below 7 Å and most of the noise above it
    assert summary["snr_10A"] > summary["snr_7A"] > 3 * summary["snr_whole"]


def test_paper_protocol_output() -> None:
    model = _toy_model()
    cfg = _config(n_particles=6, protocol="paper", box_size_px=32, pixel_size_angstrom=2.0)
    assert (cfg.render_box_px, cfg.render_pixel_angstrom) == (64, 1.0)
    stats = SimulationStats()
    chunks = list(simulate_images(cfg, model, draw_truth(cfg, model)))
    for ch in chunks:
        stats.add(ch)
    assert chunks[0].images.shape == (6, 32, 32)
    # cropping removes the noise above the output Nyquist: the output SNR exceeds the request
    assert stats.summary()["snr_whole"] > 1.5 * cfg.snr


def test_bad_input() -> None:
    with pytest.raises(InputError, match="snr"):
        _config(snr=0.0)
    with pytest.raises(InputError, match="pixel-size"):
        _config(pixel_size_angstrom=-1.0)
    nodes = np.zeros((3, 3))
    with pytest.raises(InputError, match=r"mode numbers \[12\]"):
        SimulationModel.from_arrays(nodes, np.zeros((3, 3, 3)), [7, 8, 9], [7, 12])
    with pytest.warns(UserWarning, match="rigid"):
        SimulationModel.from_arrays(nodes, np.zeros((3, 3, 3)), [1, 2, 3], [1])
    model = _toy_model()
    small = _config(box_size_px=16)
    with pytest.raises(InputError, match="too small"):
        check_simulation(small, model, draw_truth(small, model))
    # two nodes 4 Å apart and a mode that moves them towards each other: they meet at 2 Å RMS
    pair = np.array([[-2.0, 0, 0], [2.0, 0, 0]])
    squeeze = np.array([[[1.0, 0, 0], [-1.0, 0, 0]]]) / np.sqrt(2)
    colliding = SimulationModel.from_arrays(pair, squeeze, [7], [7])
    cfg = _config(n_particles=200, max_rms_displacement_angstrom=2.0)
    with pytest.warns(UserWarning, match="closer than"):
        check_simulation(cfg, colliding, draw_truth(cfg, colliding))
    gentle = _config(n_particles=200, max_rms_displacement_angstrom=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_simulation(gentle, colliding, draw_truth(gentle, colliding))
    ok = _config(box_size_px=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_simulation(ok, model, draw_truth(ok, model))


_HAVE_PIPELINE = all(
    importlib.util.find_spec(m) is not None
    for m in (
        "deephemnma_bridge.coarse_grain",
        "deephemnma_bridge.adapters.images",
        "deephemnma_bridge.adapters.structure",
    )
)


@pytest.mark.skipif(not _HAVE_PIPELINE, reason="needs the structure/NMA/adapters modules")
def test_cli_writes_files_read_back_with_ground_truth(tmp_path: Path) -> None:
    from deephemnma_bridge.adapters import read_particles
    from deephemnma_bridge.adapters.images import ParticleImages
    from deephemnma_bridge.cli import main

    out = tmp_path / "sim"
    argv = [
        "simulate",
        "--n",
        "12",
        "--box",
        "120",
        "--pixel-size",
        "1.0",
        "--seed",
        "3",
        "--chunk-size",
        "5",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    for name in (
        "particles.mrcs",
        "particles.star",
        "particles.cs",
        "modes.npz",
        "simulation.json",
    ):
        assert (out / name).exists(), name
    info = json.loads((out / "simulation.json").read_text())
    assert info["measured"]["snr_whole"] == pytest.approx(0.1, rel=0.05)
    star = read_particles(out / "particles.star")
    cs = read_particles(out / "particles.cs")
    assert star.rotation_matrices is None and len(star) == 12
    for key in (
        "dhnTrueAmplitude7",
        "dhnTrueAmplitude9",
        "dhnTrueAngleRot",
        "dhnTrueAngleTilt",
        "dhnTrueAnglePsi",
        "dhnTrueOriginXAngst",
        "dhnTrueOriginYAngst",
    ):
        np.testing.assert_allclose(star.extra[key], cs.extra[key], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(star.defocus_u_angstrom, 5000.0)
    images = ParticleImages(star).read(np.arange(12))
    assert images.shape == (12, 120, 120)
    # same seed, same images
    out2 = tmp_path / "sim2"
    assert main([*argv[:-4], "--out", str(out2), "--device", "cpu"]) == 0
    again = ParticleImages(read_particles(out2 / "particles.star")).read(np.arange(12))
    np.testing.assert_array_equal(images, again)
    # bad input: a clear one-line error, exit code 2
    assert main(["simulate", "--snr", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["simulate", "--use-modes", "7,999", "--out", str(tmp_path / "y")]) == 2
