"""The symmetry search of HEMNMA: a pseudo-symmetric complex whose motion breaks the symmetry
(one subunit moves), a particle started on an equivalent pose ``A g`` of its true pose, and the
search that tries the equivalent poses (`SymmetryCopies`) finds the true one and its amplitudes;
pseudo-symmetric models (7PBL, near-C6) accepted by ``--symmetry``."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import modes_of_nodes, shared
from scipy.spatial import cKDTree

from deephemnma_bridge.alignment.ctf import CTFParams, ctf_2d
from deephemnma_bridge.alignment.hemnma import (
    AlignmentConfig,
    ReferenceModel,
    SymmetryCopies,
    align_batch,
)
from deephemnma_bridge.alignment.render import project_positions, render_real
from deephemnma_bridge.conventions import angle_between_rotations_degrees, euler_to_matrix
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.nma import NormalModes
from deephemnma_bridge.symmetry import (
    half_step_deviation,
    node_spacing,
    point_group,
    symmetry_deviation,
)

BOX, PIXEL = 48, 1.5
N_MOTIF = 12


def _ring(symbol: str = "C4", seed: int = 3) -> np.ndarray:
    """A chain-like motif of N_MOTIF nodes off the axis, copied by every element of the group:
    subunit k is nodes k*N_MOTIF... (the group's element k)."""
    rng = np.random.default_rng(seed)
    motif = np.cumsum(rng.normal(size=(N_MOTIF, 3)) * 2.5, axis=0)
    motif += np.array([13.0, 2.0, 4.0]) - motif.mean(axis=0)
    return np.concatenate([motif @ g.T for g in point_group(symbol)])


def _subunit_modes(n_subunits: int, moved: list[tuple[int, list[float]]]) -> np.ndarray:
    """Unit-norm modes (M, N, 3): mode i translates subunit ``moved[i][0]`` along ``[1]``."""
    n = n_subunits * N_MOTIF
    modes = np.zeros((len(moved), n, 3))
    for i, (k, direction) in enumerate(moved):
        d = np.asarray(direction, dtype=np.float64)
        modes[i, k * N_MOTIF : (k + 1) * N_MOTIF] = d / np.linalg.norm(d) / np.sqrt(N_MOTIF)
    return modes


def _particles(
    reference: ReferenceModel, rotations: np.ndarray, amplitudes: np.ndarray
) -> tuple[torch.Tensor, CTFParams]:
    """Noise-free CTF-modulated images (B, BOX, BOX) of the deformed reference at these poses."""
    b = len(rotations)
    q = torch.tensor(amplitudes, dtype=torch.float32)
    coords = reference.deformed(q)
    pos = project_positions(coords, torch.tensor(rotations, dtype=torch.float32), torch.zeros(b, 2))
    clean = render_real(pos, box_size_px=BOX, pixel_size_angstrom=PIXEL, sigma_angstrom=2.0)
    ctf = CTFParams.create(defocus_u_angstrom=np.full(b, 9000.0))
    full = ctf_2d(ctf, box_size_px=BOX, pixel_size_angstrom=PIXEL)
    spectrum = torch.fft.rfft2(torch.fft.ifftshift(clean, dim=(-2, -1))) * full
    images = torch.fft.fftshift(torch.fft.irfft2(spectrum, s=(BOX, BOX)), dim=(-2, -1))
    return images, ctf


def test_copies_map_the_amplitudes_onto_each_equivalent_pose() -> None:
    """Exactly C4-symmetric nodes and one mode per subunit (the same motion in each): the copy
    ``A g`` with the mapped amplitudes draws exactly the density of ``A`` with the original
    ones, and the maps permute the modes; the identity comes first whatever the group's order."""
    x = _ring("C4")
    radial = [(k, list(point_group("C4")[k] @ [1.0, 0.0, 0.3])) for k in range(4)]
    modes = _subunit_modes(4, radial)
    ref = ReferenceModel.from_modes(x, modes, [7, 8, 9, 10], template="nodes")
    group = point_group("C4")
    shuffled = group[[2, 0, 3, 1]]  # identity second
    copies = SymmetryCopies.build(ref, shuffled)
    assert len(copies) == 4
    g = copies.rotations.double().numpy()
    np.testing.assert_allclose(g[0], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(g[1:], shuffled[[0, 2, 3]], atol=1e-6)
    maps = copies.amplitude_maps.double().numpy()
    np.testing.assert_allclose(maps[0], np.eye(4), atol=1e-6)
    q = np.array([[9.0, -4.0, 2.5, 6.0]])
    drawn = ref.deformed(torch.tensor(q, dtype=torch.float32))[0].double().numpy()
    for k in range(1, 4):
        perm = np.abs(maps[k]).round(4)
        assert np.array_equal(np.sort(perm, axis=1)[:, :3], np.zeros((4, 3)))  # one 1 per row
        np.testing.assert_allclose(perm.sum(axis=0), 1.0, atol=1e-4)
        mapped = torch.tensor(q @ maps[k].T, dtype=torch.float32)
        copy = ref.deformed(mapped)[0].double().numpy() @ g[k].T  # node j at g (x_j + U_j q')
        gap, _ = cKDTree(drawn).query(copy)
        assert gap.max() < 1e-4
        # the unmapped amplitudes on the copy draw another copy's motion
        wrong = ref.deformed(torch.tensor(q, dtype=torch.float32))[0].double().numpy() @ g[k].T
        assert cKDTree(drawn).query(wrong)[0].max() > 1.0
    with pytest.raises(InputError, match="identity"):
        SymmetryCopies.build(ref, group[1:])
    with pytest.raises(InputError, match="rotations"):
        SymmetryCopies.build(ref, np.eye(3))


def test_copies_are_refined_onto_the_model_s_own_operators() -> None:
    """A C4 ring whose axis is tilted by 4° and moved by ~2 Å off the rotation centre, given the
    ideal group about z: each copy becomes the operator that superposes the ring on itself,
    ``R = Q g Q^T`` and ``t = c - R c``, and the copy of a pose draws the same image."""
    from scipy.spatial.transform import Rotation

    tilt = Rotation.from_rotvec(np.deg2rad(4.0) * np.array([0.6, 0.8, 0.0])).as_matrix()
    centre = np.array([1.5, -1.0, 0.5])
    x = _ring("C4") @ tilt.T + centre
    modes = _subunit_modes(4, [(0, [1.0, 0.0, 0.3])])
    ref = ReferenceModel.from_modes(x, modes, [7], template="nodes", centre_angstrom=np.zeros(3))
    group = point_group("C4")
    copies = SymmetryCopies.build(ref, group)
    r = copies.rotations.double().numpy()
    t = copies.translations.double().numpy()
    for k in range(4):
        expected = tilt @ group[k] @ tilt.T
        np.testing.assert_allclose(r[k], expected, atol=1e-5)
        np.testing.assert_allclose(t[k], centre - expected @ centre, atol=1e-4)
    # the copy of a pose (rotation A R, origin o - (A t)[:2]) projects the nodes to the same set
    a = euler_to_matrix(np.array([[20.0, 70.0, 150.0]]))[0]
    o = np.array([2.0, -3.0])
    seen = (x @ a.T)[:, :2] - o
    for k in range(1, 4):
        copy = (x @ (a @ r[k]).T)[:, :2] - (o - (a @ t[k])[:2])
        assert cKDTree(seen).query(copy)[0].max() < 1e-3


@pytest.fixture(scope="module")
def broken() -> tuple[ReferenceModel, np.ndarray, np.ndarray, np.ndarray]:
    """A C4 ring whose motion breaks the symmetry (subunit 0 moves out, subunit 1 moves up),
    two particles at these amplitudes (about 5 Å of subunit motion) and their true poses."""
    x = _ring("C4")
    modes = _subunit_modes(4, [(0, [1.0, 0.0, 0.3]), (1, [0.0, 0.0, 1.0])])
    ref = ReferenceModel.from_modes(x, modes, [7, 8], template="nodes")
    truth = euler_to_matrix(np.array([[30.0, 60.0, -40.0], [200.0, 110.0, 75.0]]))
    q = np.array([[17.0, -10.0], [-12.0, 15.0]])
    images, _ = _particles(ref, truth, q)
    return ref, truth, q, images.numpy()


def _align_from_copies(
    ref: ReferenceModel,
    images: np.ndarray,
    starts: np.ndarray,
    symmetry: SymmetryCopies | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local refinement from ``starts`` (B, C, 3, 3): (rotations, amplitudes, cost, element)."""
    b = len(images)
    config = AlignmentConfig(
        local_poses=True, iterations=(40, 15), screen_iterations=30, max_rounds=3,
        refine_resolution_angstrom=(7.0, 5.0),
    )  # fmt: skip
    result = align_batch(
        torch.tensor(images),
        CTFParams.create(defocus_u_angstrom=np.full(b, 9000.0)),
        ref,
        config,
        pixel_size_angstrom=PIXEL,
        rotations=torch.tensor(starts, dtype=torch.float32),
        shifts_angstrom=torch.zeros(b, 2),
        symmetry=symmetry,
    )
    return result.rotations, result.amplitudes, result.cost, result.extra["symmetry_element"]


@pytest.mark.parametrize("n_starts", [1, 2])
def test_a_particle_started_on_a_copy_is_moved_to_its_true_pose(
    broken: tuple[ReferenceModel, np.ndarray, np.ndarray, np.ndarray], n_starts: int
) -> None:
    """Started on equivalent poses (one candidate: the band-0 path; two: the screening path),
    the refinement alone stays there (90° or 180° off, amplitudes of another copy's motion);
    with the C4 copies it reaches the true pose and amplitudes, at a lower cost."""
    ref, truth, q_true, images = broken
    group = point_group("C4")
    picks = [[1, 2], [3, 2]][:n_starts]  # element applied to each particle's start
    starts = np.stack(
        [np.stack([truth[p] @ group[k[p]] for p in range(len(truth))]) for k in picks], axis=1
    )
    rot0, q0, cost0, element0 = _align_from_copies(ref, images, starts, None)
    off = angle_between_rotations_degrees(rot0, truth)
    assert np.all(off > 80.0) and np.all(element0 == 0)
    assert np.abs(q0 - q_true).max() > 5.0
    copies = SymmetryCopies.build(ref, group)
    rot1, q1, cost1, element1 = _align_from_copies(ref, images, starts, copies)
    assert np.all(angle_between_rotations_degrees(rot1, truth) < 2.0)
    np.testing.assert_allclose(q1, q_true, atol=2.0)  # ~0.6 Å of the ~5 Å subunit motions
    assert np.all(cost1 < 0.2 * cost0)
    assert np.all(element1 > 0)


def test_poses_already_right_stay_and_fixed_poses_ignore_the_copies(
    broken: tuple[ReferenceModel, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """From the true poses the search keeps them (element 0), and the result is the one
    without the copies; with fixed poses there is no search of poses at all, so the copies
    change nothing either."""
    ref, truth, _, images = broken
    copies = SymmetryCopies.build(ref, point_group("C4"))
    rot, q, cost, element = _align_from_copies(ref, images, truth[:, None], copies)
    assert np.all(element == 0)
    assert np.all(angle_between_rotations_degrees(rot, truth) < 2.0)
    rot0, q0, cost0, _ = _align_from_copies(ref, images, truth[:, None], None)
    np.testing.assert_array_equal(rot, rot0)
    np.testing.assert_array_equal(q, q0)
    np.testing.assert_array_equal(cost, cost0)
    b = len(images)
    kwargs = dict(
        pixel_size_angstrom=PIXEL,
        rotations=torch.tensor(truth, dtype=torch.float32),
        shifts_angstrom=torch.zeros(b, 2),
    )
    config = AlignmentConfig(fixed_poses=True, iterations=(10, 5), max_rounds=1)
    ctf = CTFParams.create(defocus_u_angstrom=np.full(b, 9000.0))
    plain = align_batch(torch.tensor(images), ctf, ref, config, **kwargs)  # type: ignore[arg-type]
    with_copies = align_batch(
        torch.tensor(images),
        ctf,
        ref,
        config,
        symmetry=copies,
        **kwargs,  # type: ignore[arg-type]
    )
    np.testing.assert_array_equal(plain.amplitudes, with_copies.amplitudes)
    other = ReferenceModel.from_modes(
        ref.coordinates.numpy(), ref.modes[:1].numpy(), [7], template="nodes"
    )
    with pytest.raises(ValueError, match="another reference"):
        align_batch(torch.tensor(images), ctf, other, config, symmetry=copies, **kwargs)  # type: ignore[arg-type]


def test_pseudo_symmetric_rings_are_accepted_asymmetric_models_are_not() -> None:
    """Six copies of a subunit, each moved by ~1.5 Å and turned a little (subunits in different
    states): not invariant node by node, but far closer to C6 than to C6 turned by 30°."""
    from deephemnma_bridge.cli.align import symmetry_group

    rng = np.random.default_rng(5)
    exact = _ring("C6", seed=8)
    pseudo = exact.copy()
    for k in range(6):
        sub = slice(k * N_MOTIF, (k + 1) * N_MOTIF)
        pseudo[sub] += rng.normal(size=3) * 1.5 + rng.normal(size=(N_MOTIF, 3)) * 0.8
    assert symmetry_deviation(pseudo, point_group("C6")) > 0.75 * node_spacing(pseudo)
    assert symmetry_deviation(pseudo, point_group("C6")) < 0.8 * half_step_deviation(pseudo, "C6")
    group, info = symmetry_group(modes_of_nodes(pseudo), "C6")
    assert info["pseudo"] and info["half_step_deviation_angstrom"] > info["deviation_angstrom"]
    assert group.shape == (6, 3, 3)
    _, exact_info = symmetry_group(modes_of_nodes(exact), "C6")
    assert not exact_info["pseudo"] and exact_info["half_step_deviation_angstrom"] is None
    blob = np.random.default_rng(2).normal(size=(72, 3)) * 12.0  # no symmetry
    with pytest.raises(InputError, match="nor pseudo-symmetric"):
        symmetry_group(modes_of_nodes(blob), "C6")


def test_7pbl_is_pseudo_c6_not_c3_or_d3() -> None:
    """RuvB's AAA+ ring (7PBL, six chains in different states, with RuvA and DNA): C6 (and its
    subgroup C2) are accepted as pseudo-symmetry, C3 and D3 are not (the half-step turn of C3
    is C6's other half: it fits as well)."""
    from deephemnma_bridge.adapters.structure import read_structure
    from deephemnma_bridge.cli.align import symmetry_group
    from deephemnma_bridge.coarse_grain import coarse_grain

    model = coarse_grain(read_structure(shared("structures/7pbl.pdb")), nodes="ca")
    modes = modes_of_nodes(np.asarray(model.coordinates_angstrom))
    group, info = symmetry_group(modes, "C6")
    assert info["pseudo"] and info["relion_axes"] and len(group) == 6
    assert symmetry_group(modes, "C2")[1]["pseudo"]
    for symbol in ("C3", "D3", "C5"):
        with pytest.raises(InputError, match="nor pseudo-symmetric"):
            symmetry_group(modes, symbol)


def test_symmetry_search_option() -> None:
    from deephemnma_bridge.cli.align import add_args

    parser = argparse.ArgumentParser()
    add_args(parser)
    base = ["p.star", "--modes", "m.npz", "--out", "o", "--symmetry", "C6"]
    assert not parser.parse_args(base).symmetry_search
    assert parser.parse_args([*base, "--symmetry-search"]).symmetry_search


def test_align_symmetry_moves_particles_started_on_copies(tmp_path: Path) -> None:
    """``deephemnma align --poses local --symmetry C4`` on a C4 ring whose motion breaks the
    symmetry, every particle started on an equivalent pose (90°, 180° or 270° off): the search
    brings most of them to their true pose (written folded, with the element applied) with the
    amplitudes of the truth; without --symmetry none moves."""
    from deephemnma_bridge.adapters import read_particles, write_particles
    from deephemnma_bridge.cli import main

    modes = _subunit_modes(4, [(0, [1.0, 0.0, 0.3]), (1, [0.0, 0.0, 1.0])])
    NormalModes(
        coordinates=_ring("C4"),
        eigenvalues=np.array([1.0, 1.2]),
        vectors=modes,
        mode_numbers=np.array([7, 8]),
        collectivity=np.array([0.25, 0.25]),
    ).save(tmp_path / "ring.npz")
    sim = tmp_path / "sim"
    argv = ["simulate", "--modes", str(tmp_path / "ring.npz"), "--use-modes", "7,8"]
    argv += ["--render", "nodes", "--n", "12", "--box", "48", "--pixel-size", "1.5", "--snr", "1"]
    argv += ["--max-rms", "3", "--seed", "4", "--out", str(sim), "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # amplitudes beyond the modes' validity
        assert main(argv) == 0
    table = read_particles(sim / "particles.star")
    e = table.extra
    truth = euler_to_matrix(np.stack([e[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1))
    group = point_group("C4")
    start = np.einsum("nij,njk->nik", truth, group[1 + np.arange(len(table)) % 3])
    origins = np.stack([e["dhnTrueOriginXAngst"], e["dhnTrueOriginYAngst"]], 1)
    stack = np.full(len(table), str((sim / "particles.mrcs").resolve()), dtype=object)
    write_particles(
        table.with_poses(start, origins).replace(image_paths=stack, source=None),
        tmp_path / "started.star",
    )
    q_true = np.stack([e[f"dhnTrueAmplitude{m}"] for m in (7, 8)], 1)
    argv = ["align", str(tmp_path / "started.star"), "--modes", str(sim / "modes.npz")]
    argv += ["--use-modes", "7,8", "--poses", "local", "--iterations", "30,15"]
    argv += ["--screen-steps", "20", "--max-rounds", "2", "--threads", "1", "--device", "cpu"]
    found, costs = {}, {}
    for name, extra in (("plain", []), ("c4", ["--symmetry", "C4", "--symmetry-search"])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # particles at the rounds' limit
            assert main([*argv, *extra, "--out", str(tmp_path / name)]) == 0
        out = read_particles(tmp_path / name / "particles.star")
        info = json.loads((tmp_path / name / "alignment.json").read_text())["symmetry"]
        rot = out.rotation_matrices
        assert rot is not None
        if extra:  # unfold: the pose found is (A g) g^T
            g = np.asarray(info["group"])[np.asarray(out.extra["dhnSymmetryElement"], int)]
            rot = np.einsum("nij,nkj->nik", rot, g)
        q = np.stack([out.extra[f"dhnAmplitude{m}"] for m in (7, 8)], 1)
        found[name] = (angle_between_rotations_degrees(rot, truth), np.abs(q - q_true).max(1))
        costs[name] = np.asarray(out.extra["dhnCost"], dtype=float)
        assert info["search"] == bool(extra)
    angle, _ = found["plain"]
    assert np.all(angle > 80.0)
    angle, q_error = found["c4"]
    right = angle < 5.0
    assert right.sum() >= 9  # measured: 10 of 12
    assert np.all(q_error[right] < 5.0)  # amplitudes up to ~21 (3 Å RMS)
    info = json.loads((tmp_path / "c4" / "alignment.json").read_text())["symmetry"]
    assert info["n_moved_by_search"] >= right.sum()
    # the candidate's own pose is refined alongside a copy: the search never ends worse
    assert np.all(costs["c4"] <= costs["plain"] + 1e-5)
    assert np.sum(costs["c4"] < costs["plain"] - 1e-3) >= right.sum()


def test_symmetry_search_without_a_group_is_refused(tmp_path: Path) -> None:
    """``--symmetry-search`` alone (C1) names the missing option and writes nothing."""
    from deephemnma_bridge.api import align
    from deephemnma_bridge.cli import main

    modes = _subunit_modes(4, [(0, [1.0, 0.0, 0.3])])
    NormalModes(
        coordinates=_ring("C4"),
        eigenvalues=np.array([1.0]),
        vectors=modes,
        mode_numbers=np.array([7]),
        collectivity=np.array([0.25]),
    ).save(tmp_path / "ring.npz")
    sim = tmp_path / "sim"
    argv = ["simulate", "--modes", str(tmp_path / "ring.npz"), "--use-modes", "7"]
    argv += ["--render", "nodes", "--n", "2", "--box", "32", "--pixel-size", "2", "--seed", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main([*argv, "--out", str(sim), "--device", "cpu"]) == 0
    argv = ["align", str(sim / "particles.star"), "--modes", str(sim / "modes.npz")]
    argv += ["--use-modes", "7", "--symmetry-search", "--out", str(tmp_path / "out")]
    with pytest.raises(InputError, match="--symmetry-search .* --symmetry is C1"):
        align(
            sim / "particles.star",
            sim / "modes.npz",
            out=tmp_path / "out",
            use_modes=[7],
            symmetry_search=True,
        )
    assert main([*argv, "--device", "cpu"]) != 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
