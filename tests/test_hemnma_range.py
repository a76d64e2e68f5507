"""HEMNMA reaches large deformations: amplitudes in a size-independent unit with no silent
cap, the elastic (deformed-reference) global search, and particles left at a limit flagged."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deephemnma_bridge.adapters import ParticleImages, read_particles
from deephemnma_bridge.alignment.ctf import CTFParams
from deephemnma_bridge.alignment.hemnma import (
    AlignmentConfig,
    ReferenceModel,
    SearchLibrary,
    _global_search,
    elastic_grid,
)
from deephemnma_bridge.cli import main
from deephemnma_bridge.nma import NormalModes
from deephemnma_bridge.nma.deform import deform

FAST = ["--working-size", "64", "--search-step", "15", "--iterations", "30,15"]
MODES = [7, 8, 9]


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 AdK particles deformed up to 8 Å RMS (the old schedule stopped near 2.3 Å)."""
    out = tmp_path_factory.mktemp("wide") / "sim"
    argv = ["simulate", "--n", "16", "--box", "64", "--pixel-size", "1.3", "--seed", "11"]
    argv += ["--max-rms", "8", "--snr", "1", "--amplitudes", "uniform", "--out", str(out)]
    with pytest.warns(UserWarning):
        assert main([*argv, "--device", "cpu"]) == 0
    return out


def _wide_inputs(wide: Path) -> tuple[Any, ReferenceModel, torch.Tensor, torch.Tensor]:
    """The wide set's table, its node reference (modes 7-9), spectra and full CTFs."""
    from deephemnma_bridge.alignment.ctf import ctf_2d

    t = read_particles(wide / "particles.star")
    modes = NormalModes.load(wide / "modes.npz").select(MODES)
    ref = ReferenceModel.from_modes(modes.coordinates, modes.vectors, MODES, template="nodes")
    rows = np.arange(len(t))
    images = torch.tensor(ParticleImages(t).read(rows))
    spectra = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    c = ctf_2d(CTFParams.from_table(t, rows), box_size_px=64, pixel_size_angstrom=1.3)
    return t, ref, spectra, c


def _truth(table: object) -> np.ndarray:
    extra = table.extra  # type: ignore[attr-defined]
    return np.stack([np.asarray(extra[f"dhnTrueAmplitude{m}"], float) for m in MODES], 1)


def test_elastic_grid() -> None:
    pts, spacing = elastic_grid(3, 8.0, 4.0)
    assert spacing == 4.0 and len(pts) == 32  # lattice points of a radius-8 ball, origin out
    assert np.all(np.linalg.norm(pts, axis=1) <= 8 + 1e-9) and not np.any(np.all(pts == 0, 1))
    assert {tuple(p) for p in pts} >= {(8, 0, 0), (-4, 4, 4), (0, -8, 0)}
    many, wider = elastic_grid(6, 8.0, 4.0)
    assert len(many) <= 48 and wider > 4.0  # bounded cost: the spacing widens
    assert elastic_grid(0, 8.0, 4.0)[0].shape == (0, 0)
    assert elastic_grid(3, 0.0, 4.0)[0].shape == (0, 3)


def test_coarsened_reference_moves_like_its_nodes() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(50, 3)) * 10
    vec = rng.normal(size=(2, 50, 3))
    vec /= np.linalg.norm(vec.reshape(2, -1), axis=1)[:, None, None]
    ref = ReferenceModel.from_modes(xyz, vec, [7, 8], template="nodes")
    coarse = ref.coarsened(7)
    assert coarse.coordinates.shape == (7, 3) and coarse.amplitude_scale == ref.amplitude_scale
    assert coarse.weights is not None and abs(float(coarse.weights.mean()) - 1) < 1e-6
    q = torch.tensor([[30.0, -12.0]])
    moved = deform(ref.coordinates, ref.modes, q)[0]
    moved_c = deform(coarse.coordinates, coarse.modes, q)[0]
    group = (np.arange(50) * 7) // 50
    expected = np.stack([moved.numpy()[group == g].mean(0) for g in range(7)])
    np.testing.assert_allclose(moved_c.numpy(), expected, atol=1e-4)
    assert ref.coarsened(100) is ref


def test_amplitudes_up_to_8_angstrom_rms_are_recovered(wide: Path, tmp_path: Path) -> None:
    argv = ["align", str(wide / "particles.star"), "--modes", str(wide / "modes.npz")]
    argv += ["--use-modes", "7,8,9", *FAST, "--out", str(tmp_path / "a")]
    with warnings.catch_warnings():  # a particle or two may be flagged (tested below)
        warnings.simplefilter("ignore", UserWarning)
        assert main(argv) == 0
    t = read_particles(tmp_path / "a" / "particles.star")
    fit = np.stack([np.asarray(t.extra[f"dhnAmplitude{m}"], float) for m in MODES], 1)
    truth = _truth(t)
    n_nodes = NormalModes.load(wide / "modes.npz").n_nodes
    rms_truth = np.linalg.norm(truth, axis=1) / np.sqrt(n_nodes)
    rms_fit = np.asarray(t.extra["dhnRmsDisplacement"], float)
    assert rms_truth.max() > 6.0  # the data do reach far
    np.testing.assert_allclose(rms_fit, np.linalg.norm(fit, axis=1) / np.sqrt(n_nodes))
    for j in range(3):
        assert np.corrcoef(fit[:, j], truth[:, j])[0, 1] > 0.95
    far = rms_truth > 5
    assert np.median(np.abs(rms_fit[far] - rms_truth[far]) / rms_truth[far]) < 0.1
    assert np.asarray(t.extra["dhnAtLimit"]).astype(int).sum() <= 2


def test_particles_left_at_a_limit_are_flagged(wide: Path, tmp_path: Path) -> None:
    argv = ["align", str(wide / "particles.star"), "--modes", str(wide / "modes.npz")]
    argv += ["--use-modes", "7,8,9", *FAST, "--elastic-range", "0", "--max-rounds", "1"]
    argv += ["--amplitude-step", "0.02,0.02", "--out", str(tmp_path / "slow")]
    with pytest.warns(UserWarning, match="still moving"):
        assert main(argv) == 0
    t = read_particles(tmp_path / "slow" / "particles.star")
    assert np.asarray(t.extra["dhnAtLimit"]).astype(int).sum() >= 8


def test_the_elastic_search_starts_from_the_particles_shape(wide: Path) -> None:
    t, ref, spectra, c = _wide_inputs(wide)
    config = AlignmentConfig(elastic_spacing_angstrom=4.0, elastic_range_angstrom=8.0)
    library = SearchLibrary.build(ref, config, 64, 1.3, "cpu")
    assert library.elastic is not None and library.elastic.starts is not None
    _, _, _, q = _global_search(spectra, c, library.elastic, config, 1)
    assert q is not None
    start = q[:, 0].numpy() / ref.amplitude_scale  # Å RMS per mode
    truth = _truth(t) / ref.amplitude_scale
    big = np.abs(truth) > 3.0
    # where a mode is deformed by more than 3 Å, the search starts on the right side
    assert (np.sign(start[big]) == np.sign(truth[big])).mean() >= 0.75  # chance: 0.5
    assert np.median(np.abs(start - truth)) < 3.0  # within about a grid step


def test_cpu_threads_do_not_oversubscribe_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from deephemnma_bridge.cli.align import cpu_threads
    from deephemnma_bridge.errors import InputError

    assert cpu_threads(3) == (3, "as asked")
    with pytest.raises(InputError):
        cpu_threads(-1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
    threads, why = cpu_threads(0)
    assert threads == 1 and "busy" in why
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cpu_threads(0) == (torch.get_num_threads(), "torch's default")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cpu_threads(0)[0] == 1


def test_screening_at_a_coarse_band_keeps_the_right_candidate(wide: Path) -> None:
    """Each particle's true pose among two wrong ones: a few steps at the screening band (10 Å,
    the template merged into a few blobs) pick it; the settings are checked."""
    from deephemnma_bridge.alignment.hemnma import _refine_candidates
    from deephemnma_bridge.conventions import angle_between_rotations_degrees, euler_to_matrix
    from deephemnma_bridge.errors import InputError

    t, ref, spectra, c = _wide_inputs(wide)
    e = t.extra
    true = euler_to_matrix(np.stack([e[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1))
    origins = np.stack([e["dhnTrueOriginXAngst"], e["dhnTrueOriginYAngst"]], 1)
    wrong = [
        euler_to_matrix(np.array([[40.0, 50.0, 0.0]])),
        euler_to_matrix(np.array([[0, 90.0, 0]])),
    ]
    cands = np.stack([true, true @ wrong[0][0], true @ wrong[1][0]], 1)  # true is candidate 0
    order = np.random.default_rng(1).permuted(np.tile([0, 1, 2], (len(t), 1)), axis=1)
    cands = np.take_along_axis(cands, order[:, :, None, None], axis=1)
    config = AlignmentConfig(
        iterations=(12, 0), screen_iterations=4, screen_resolution_angstrom=10.0,
        search_max_blobs=40, max_rounds=1,
    )  # fmt: skip
    assert ref.coarsened(40).coordinates.shape[0] == 40 < ref.coordinates.shape[0]
    q0 = torch.tensor(_truth(t), dtype=torch.float32)[:, None].expand(-1, 3, -1).contiguous()
    _, rot, _, _, _ = _refine_candidates(
        spectra, c, ref, None, torch.tensor(cands, dtype=torch.float32),
        torch.tensor(origins, dtype=torch.float32)[:, None].expand(-1, 3, -1).contiguous(),
        q0, config, 64, 1.3, None,
    )  # fmt: skip
    angle = angle_between_rotations_degrees(rot.double().numpy(), true)
    assert np.mean(angle < 10) >= 0.9  # the wrong candidates are 40-90° away
    with pytest.raises(InputError, match="screening band"):
        AlignmentConfig(screen_resolution_angstrom=0.0)
