"""deephemnma align (HEMNMA) on simulated ground truth and on a real RELION file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
from conftest import shared, torchrun

from deephemnma_bridge.adapters import read_particles, write_particles
from deephemnma_bridge.alignment.ctf import CTFParams
from deephemnma_bridge.alignment.hemnma import (
    AlignmentConfig,
    ReferenceModel,
    align_batch,
    mahalanobis_outliers,
    rotation_grid,
)
from deephemnma_bridge.cli import main
from deephemnma_bridge.conventions import angle_between_rotations_degrees, euler_to_matrix
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.nma import NormalModes

FAST = ["--working-size", "64", "--search-step", "20", "--iterations", "15,20", "--candidates", "2"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 all-atom AdK particles, 64 px at 1.3 Å, SNR 0.1, CTF, modes 7-9 (ground truth)."""
    out = tmp_path_factory.mktemp("sim") / "sim"
    argv = ["simulate", "--n", "24", "--box", "64", "--pixel-size", "1.3", "--seed", "2"]
    with pytest.warns(UserWarning, match="may leave the 83.2 Å box"):
        assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    return out


def _errors(aligned: Path) -> tuple[np.ndarray, np.ndarray, list[float]]:
    t = read_particles(aligned)
    truth = euler_to_matrix(
        np.stack([t.extra[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1).astype(float)
    )
    angles = angle_between_rotations_degrees(t.rotation_matrices, truth)
    origin = np.stack([t.extra["dhnTrueOriginXAngst"], t.extra["dhnTrueOriginYAngst"]], 1)
    shift_px = np.linalg.norm(t.shifts_angstrom - origin.astype(float), axis=1) / 1.3
    r = [
        float(
            np.corrcoef(
                t.extra[f"dhnAmplitude{m}"].astype(float),
                t.extra[f"dhnTrueAmplitude{m}"].astype(float),
            )[0, 1]
        )
        for m in (7, 8, 9)
    ]
    return angles, shift_px, r


def test_align_recovers_the_ground_truth(sim: Path, tmp_path: Path) -> None:
    out = tmp_path / "aligned"
    argv = ["align", str(sim / "particles.star"), "--modes", str(sim / "modes.npz")]
    assert main([*argv, "--out", str(out), "--working-size", "64", "--device", "cpu"]) == 0
    angles, shift_px, r = _errors(out / "particles.star")
    # measured here: median 1.8°, p90 3.5°, shift 0.24 px, r 0.96-0.98 (64 px, 1.3 Å/px)
    assert np.median(angles) < 4.0 and np.percentile(angles, 90) < 10.0
    assert np.median(shift_px) < 0.8
    assert min(r) > 0.85
    star = starfile.read(out / "particles.star", always_dict=True)["particles"]
    for column in ("rlnAngleRot", "rlnOriginXAngst", "dhnAmplitude7", "dhnAmplitude9", "dhnCost"):
        assert column in star.columns
    assert "dhnTrueAmplitude7" in star.columns  # every input column kept
    cs = read_particles(out / "particles.cs")
    np.testing.assert_allclose(
        cs.rotation_matrices, read_particles(out / "particles.star").rotation_matrices, atol=1e-5
    )
    assert not (tmp_path / "aligned.partial").exists()


def test_ctf_in_the_template_beats_phase_flipping(sim: Path) -> None:
    t = read_particles(sim / "particles.star")
    modes = NormalModes.load(sim / "modes.npz")
    sel = modes.select([7, 8, 9])
    ref = ReferenceModel.from_modes(
        sel.coordinates,
        sel.vectors,
        [7, 8, 9],
        atom_coordinates=modes.atom_coordinates,
        atom_node=modes.atom_node,
    )
    from deephemnma_bridge.adapters import ParticleImages

    rows = np.arange(12)
    images = torch.tensor(ParticleImages(t).read(rows))
    truth = euler_to_matrix(
        np.stack([t.extra[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1).astype(float)
    )[rows]
    medians = {}
    for mode in ("full", "flip"):
        res = align_batch(
            images,
            CTFParams.from_table(t, rows),
            ref,
            AlignmentConfig(ctf=mode, iterations=(20, 30)),  # type: ignore[arg-type]
            pixel_size_angstrom=1.3,
        )
        medians[mode] = float(np.median(angle_between_rotations_degrees(res.rotations, truth)))
        assert res.converged.all() and np.all(res.cost < 1)
    assert medians["full"] < medians["flip"]


def test_fixed_and_local_poses_from_the_file(sim: Path, tmp_path: Path) -> None:
    t = read_particles(sim / "particles.star")
    truth = euler_to_matrix(
        np.stack([t.extra[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1).astype(float)
    )
    origin = np.stack([t.extra["dhnTrueOriginXAngst"], t.extra["dhnTrueOriginYAngst"]], 1)
    write_particles(t.with_poses(truth, origin.astype(float)), tmp_path / "posed.star")
    (tmp_path / "particles.mrcs").symlink_to(sim / "particles.mrcs")
    base = ["align", str(tmp_path / "posed.star"), "--modes", str(sim / "modes.npz"), *FAST]
    assert main([*base, "--poses", "fixed", "--out", str(tmp_path / "fixed")]) == 0
    fixed = read_particles(tmp_path / "fixed" / "particles.star")
    np.testing.assert_allclose(fixed.rotation_matrices, truth, atol=1e-5)
    np.testing.assert_allclose(fixed.shifts_angstrom, origin.astype(float), atol=1e-4)
    r = np.corrcoef(
        fixed.extra["dhnAmplitude7"].astype(float), t.extra["dhnTrueAmplitude7"].astype(float)
    )[0, 1]
    assert r > 0.85
    assert main([*base, "--poses", "local", "--out", str(tmp_path / "local")]) == 0
    angles, _, _ = _errors(tmp_path / "local" / "particles.star")
    assert np.median(angles) < 4.0
    assert (
        main(
            [
                "align",
                str(sim / "particles.star"),
                "--modes",
                str(sim / "modes.npz"),
                "--poses",
                "fixed",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


def test_interrupted_run_resumes_to_the_same_result(
    sim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        "align",
        str(sim / "particles.star"),
        "--modes",
        str(sim / "modes.npz"),
        *FAST,
        "--batch-size",
        "8",
        "--checkpoint-every",
        "8",
    ]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    import deephemnma_bridge.alignment.hemnma as hemnma

    real = hemnma.align_batch
    calls = {"n": 0}

    def dies_on_second_batch(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hemnma, "align_batch", dies_on_second_batch)
    assert main([*argv, "--out", str(tmp_path / "resumed")]) == 130
    assert not (tmp_path / "resumed").exists()
    state = np.load(tmp_path / "resumed.partial" / "rank0_of_1.npz")
    assert state["done"].sum() == 8
    monkeypatch.setattr(hemnma, "align_batch", real)
    assert main([*argv, "--out", str(tmp_path / "resumed")]) == 0
    a = read_particles(tmp_path / "whole" / "particles.star")
    b = read_particles(tmp_path / "resumed" / "particles.star")
    np.testing.assert_allclose(b.rotation_matrices, a.rotation_matrices, atol=1e-6)
    np.testing.assert_allclose(
        b.extra["dhnAmplitude8"].astype(float), a.extra["dhnAmplitude8"].astype(float), atol=1e-4
    )
    # other settings on top of a partial run: refused
    (tmp_path / "other.partial").mkdir()
    (tmp_path / "other.partial" / "settings.json").write_text('{"x": 1}')
    assert main([*argv, "--out", str(tmp_path / "other")]) == 2


def test_lanes_give_the_results_of_one_thread(
    sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--threads 2 on the CPU: two lanes of one thread, each fitting whole batches; every
    particle gets the result of a 1-thread run, bit for bit."""
    argv = ["align", str(sim / "particles.star"), "--modes", str(sim / "modes.npz"), *FAST]
    argv += ["--batch-size", "5", "--device", "cpu"]
    threads = torch.get_num_threads()
    assert main([*argv, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    assert "lanes" not in capsys.readouterr().err
    assert main([*argv, "--threads", "2", "--out", str(tmp_path / "two")]) == 0
    assert "2 CPU thread(s) in 2 lanes of one thread" in capsys.readouterr().err
    torch.set_num_threads(threads)  # align sets the process's threads
    a = read_particles(tmp_path / "one" / "particles.star")
    b = read_particles(tmp_path / "two" / "particles.star")
    np.testing.assert_array_equal(b.rotation_matrices, a.rotation_matrices)
    np.testing.assert_array_equal(b.shifts_angstrom, a.shifts_angstrom)
    for column in ("dhnAmplitude7", "dhnAmplitude9", "dhnCost"):
        np.testing.assert_array_equal(b.extra[column].astype(float), a.extra[column].astype(float))


def test_two_process_torchrun_matches_one_process(sim: Path, tmp_path: Path) -> None:
    argv = [
        "align",
        str(sim / "particles.star"),
        "--modes",
        str(sim / "modes.npz"),
        *FAST,
        "--device",
        "cpu",
    ]
    assert main([*argv, "--out", str(tmp_path / "single")]) == 0
    torchrun([*argv, "--out", str(tmp_path / "sharded")], tmp_path)
    a = read_particles(tmp_path / "single" / "particles.star")
    b = read_particles(tmp_path / "sharded" / "particles.star")
    np.testing.assert_array_equal(b.image_indices, a.image_indices)
    # every particle's result is its own (Adam is element-wise), but a particle whose travel
    # sits on the border of another refinement round may take it in one run and not in the
    # other (last-bit differences of the two BLAS set-ups): all but one agree to 1e-4, and
    # that one to a fraction of a degree
    rot_diff = np.abs(b.rotation_matrices - a.rotation_matrices).max(axis=(1, 2))
    shift_diff = np.abs(b.shifts_angstrom - a.shifts_angstrom).max(axis=1)
    amp_diff = np.max(
        [
            np.abs(
                b.extra[f"dhnAmplitude{m}"].astype(float)
                - a.extra[f"dhnAmplitude{m}"].astype(float)
            )
            for m in (7, 8, 9)
        ],
        axis=0,
    )
    same = (rot_diff < 1e-4) & (shift_diff < 1e-3) & (amp_diff < 1e-3)
    assert same.sum() >= len(same) - 1, (rot_diff, shift_diff, amp_diff)
    assert rot_diff.max() < 0.01 and shift_diff.max() < 0.1 and amp_diff.max() < 0.5


def test_real_relion_file_with_a_model_reference(tmp_path: Path) -> None:
    """relion_project's stack (a point mass, 64 px at 3.54 Å) against the bundled AdK."""
    assert main(["modes", "--out", str(tmp_path / "adk.npz"), "--n-modes", "12"]) == 0
    src = str(shared("relion/simplecryoem/relion_proj_batch.star"))
    base = ["align", src, "--modes", str(tmp_path / "adk.npz"), *FAST]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--poses", "fixed", "--out", str(tmp_path / "b")]) == 0
    original = read_particles(src)
    fixed = read_particles(tmp_path / "b" / "particles.star")
    np.testing.assert_allclose(fixed.rotation_matrices, original.rotation_matrices, atol=1e-5)
    raw = starfile.read(tmp_path / "b" / "particles.star", always_dict=True)["particles"]
    assert len(raw) == 24 and np.isfinite(raw["dhnCost"]).all()


def test_align_bad_input(sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    star, modes = str(sim / "particles.star"), str(sim / "modes.npz")
    assert (
        main(["align", star, "--modes", modes, "--use-modes", "7,42", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "mode(s) [42] not available" in capsys.readouterr().err
    assert (
        main(["align", star, "--modes", modes, "--use-modes", "3", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "rigid-body" in capsys.readouterr().err
    # modes of another, bigger structure: does not fit the 83 Å box
    assert (
        main(
            [
                "modes",
                str(shared("structures/4yvs.cif")),
                "--out",
                str(tmp_path / "big.npz"),
                "--n-modes",
                "10",
            ]
        )
        == 0
    )
    assert (
        main(["align", star, "--modes", str(tmp_path / "big.npz"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "another structure" in capsys.readouterr().err
    # a map-derived reference whose box differs from the particles'
    assert (
        main(["modes", str(shared("maps/EMD-3197.map")), "--out", str(tmp_path / "map.npz")]) == 0
    )
    assert (
        main(["align", star, "--modes", str(tmp_path / "map.npz"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "reference map's is 228.0 Å" in capsys.readouterr().err
    # NaN pixels: named particle
    import mrcfile

    bad = tmp_path / "nan"
    bad.mkdir()
    data = mrcfile.read(sim / "particles.mrcs").copy()
    data[5, 3, 3] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"), mrcfile.new(bad / "particles.mrcs") as mrc:
        mrc.set_data(data)
    (bad / "particles.star").write_bytes((sim / "particles.star").read_bytes())
    assert (
        main(
            [
                "align",
                str(bad / "particles.star"),
                "--modes",
                modes,
                *FAST,
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "row 6: image 6@particles.mrcs contains NaN" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert (
        main(["align", str(tmp_path / "none.star"), "--modes", modes, "--out", str(tmp_path / "o")])
        == 2
    )


def test_outliers_and_rotation_grid() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * [1.0, 2.0, 0.5]
    x[:5] = [[8.0, 0, 0], [0, 16, 0], [0, 0, 4], [6, 12, 0], [np.nan, 0, 0]]
    outlier, distance = mahalanobis_outliers(x, 3.2)
    assert outlier[:5].all() and np.isinf(distance[4])
    assert outlier[5:].mean() < 0.02  # chi(3) tail beyond 3.2: ~1 %
    with pytest.raises(InputError, match="more particles"):
        mahalanobis_outliers(x[:3])
    grid = rotation_grid(30.0)
    # every random rotation is within ~the step of the grid
    from scipy.spatial.transform import Rotation

    probe = Rotation.random(200, random_state=1).as_matrix()
    nearest = angle_between_rotations_degrees(probe[:, None], grid[None]).min(axis=1)
    assert nearest.max() < 30.0


def test_a_particle_that_fails_gets_a_flagged_cost_not_a_crash(sim: Path) -> None:
    t = read_particles(sim / "particles.star")
    modes = NormalModes.load(sim / "modes.npz").select([7, 8, 9])
    ref = ReferenceModel.from_modes(modes.coordinates, modes.vectors, [7, 8, 9], template="nodes")
    from deephemnma_bridge.adapters import ParticleImages

    rows = np.arange(4)
    ctf = CTFParams.from_table(t, rows)
    broken = ctf.defocus_u_angstrom.clone()
    broken[2] = float("nan")  # a corrupt CTF makes this particle's template NaN
    config = AlignmentConfig(search_step_degrees=30, iterations=(5, 5), n_candidates=1)
    res = align_batch(
        torch.tensor(ParticleImages(t).read(rows)),
        ctf.replace(defocus_u_angstrom=broken),
        ref,
        config,
        pixel_size_angstrom=1.3,
    )
    assert res.converged.tolist() == [True, True, False, True]
    assert np.isnan(res.cost[2]) and np.isfinite(res.cost[[0, 1, 3]]).all()


def test_ground_truth_errors_by_source(sim: Path) -> None:
    from deephemnma_bridge.evaluation import ground_truth_errors

    t = read_particles(sim / "particles.star")
    truth = euler_to_matrix(
        np.stack([t.extra[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1).astype(float)
    )
    origin = np.stack([t.extra["dhnTrueOriginXAngst"], t.extra["dhnTrueOriginYAngst"]], 1)
    amps = {f"dhnAmplitude{m}": t.extra[f"dhnTrueAmplitude{m}"].astype(float) for m in (7, 8, 9)}
    source = np.where(np.arange(len(t)) < 10, "hemnma", "network").astype(object)
    perfect = t.with_poses(truth, origin.astype(float)).with_extra(**amps, dhnSource=source)
    scores = ground_truth_errors(perfect, by_source=True)
    assert set(scores) == {"hemnma", "network"} and scores["hemnma"]["n"] == 10
    assert scores["network"]["angle_median"] < 1e-4 and scores["network"]["shift_px"] < 1e-6
    assert scores["hemnma"]["r7"] == pytest.approx(1.0) and scores["hemnma"]["mae9"] == 0.0
    turned = perfect.with_poses(np.einsum("ij,njk->nik", euler_to_matrix([0, 0, 10.0]), truth))
    assert ground_truth_errors(turned)["all"]["angle_median"] == pytest.approx(10.0)
    with pytest.raises(InputError, match="no ground truth"):
        ground_truth_errors(read_particles(shared("relion/simplecryoem/relion_proj_batch.star")))


def test_a_prebuilt_search_library_gives_the_same_result(sim: Path) -> None:
    from deephemnma_bridge.adapters import ParticleImages
    from deephemnma_bridge.alignment.hemnma import SearchLibrary

    t = read_particles(sim / "particles.star")
    modes = NormalModes.load(sim / "modes.npz").select([7, 8, 9])
    ref = ReferenceModel.from_modes(modes.coordinates, modes.vectors, [7, 8, 9], template="nodes")
    rows = np.arange(4)
    images = torch.tensor(ParticleImages(t).read(rows))
    ctf = CTFParams.from_table(t, rows)
    config = AlignmentConfig(search_step_degrees=30, iterations=(5, 5), n_candidates=2)
    fresh = align_batch(images, ctf, ref, config, pixel_size_angstrom=1.3)
    library = SearchLibrary.build(ref, config, 64, 1.3, "cpu")
    reused = align_batch(images, ctf, ref, config, pixel_size_angstrom=1.3, library=library)
    np.testing.assert_array_equal(reused.rotations, fresh.rotations)
    np.testing.assert_array_equal(reused.amplitudes, fresh.amplitudes)
    with pytest.raises(ValueError, match="another box or pixel size"):
        align_batch(images, ctf, ref, config, pixel_size_angstrom=1.0, library=library)
