"""Large motions: the non-linear deformation (each node follows the local rotation of its
neighbourhood) and the population search (references deformed to where a batch went)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deephemnma_bridge.adapters import read_particles
from deephemnma_bridge.alignment.ctf import CTFParams
from deephemnma_bridge.alignment.hemnma import AlignmentConfig, ReferenceModel, align_batch
from deephemnma_bridge.cli import main
from deephemnma_bridge.evaluation import ground_truth_errors
from deephemnma_bridge.nma.deform import deform, deform_nonlinear, linear_equivalent, mode_spins
from deephemnma_bridge.simulate import superpose

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures"


def _hinge(n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two domains side by side; the mode turns domain B about the z axis through the hinge
    point (0, 0, 0): returns (coordinates, unit mode (1, N, 3), domain B mask, unit spin)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(n, 3)) * 3 + [-8.0, 0, 0]
    b = rng.normal(size=(n, 3)) * 3 + [8.0, 0, 0]
    xyz = np.concatenate([a, b])
    in_b = np.arange(2 * n) >= n
    axis = np.array([0.0, 0.0, 1.0])
    u = np.where(in_b[:, None], np.cross(axis, xyz), 0.0)
    norm = np.linalg.norm(u)
    return xyz, (u / norm)[None], in_b, axis / norm


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_mode_spins_are_the_local_angular_velocity() -> None:
    xyz, mode, in_b, spin = _hinge()
    spins = mode_spins(xyz, mode, radius_angstrom=6.0)
    assert spins.shape == mode.shape
    far_b = in_b & (xyz[:, 0] > 10)  # neighbourhoods inside domain B
    far_a = ~in_b & (xyz[:, 0] < -10)
    np.testing.assert_allclose(spins[0, far_b], np.broadcast_to(spin, (far_b.sum(), 3)), atol=1e-9)
    np.testing.assert_allclose(spins[0, far_a], 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="radius"):
        mode_spins(xyz, mode, radius_angstrom=0)


def test_a_hinge_closes_on_its_arc_where_the_linear_model_stretches() -> None:
    xyz, mode, in_b, spin = _hinge()
    spins = mode_spins(xyz, mode, radius_angstrom=6.0)
    angle = np.radians(40.0)
    q = angle / np.linalg.norm(spin)  # amplitude that turns domain B by 40°
    exact = np.where(in_b[:, None], xyz @ _rot_z(angle).T, xyz)
    tt = [torch.tensor(v, dtype=torch.float64) for v in (xyz, mode, spins)]
    amp = torch.tensor([[q]], dtype=torch.float64)
    nonlinear = deform_nonlinear(*tt, amp)[0].numpy()
    linear = deform(tt[0], tt[1], amp)[0].numpy()

    def rmsd_after_superposition(x: np.ndarray) -> float:
        rot, shift = superpose(x, exact)
        return float(np.sqrt((((x @ rot.T + shift) - exact) ** 2).sum(1).mean()))

    # the closed structure itself, up to a rigid motion (the frame is the reference's)
    far = (xyz[:, 0] > 10) | (xyz[:, 0] < -10)  # away from the hinge, where spins are exact
    rot, shift = superpose(nonlinear[far], exact[far])
    assert np.sqrt((((nonlinear[far] @ rot.T + shift) - exact[far]) ** 2).sum(1).mean()) < 1e-6
    assert rmsd_after_superposition(linear) > 1.0  # tangents: domain B stretched by ~2 Å
    db = np.linalg.norm(xyz[in_b][:, None] - xyz[in_b][None], axis=-1)
    lin_b = np.linalg.norm(linear[in_b][:, None] - linear[in_b][None], axis=-1)
    assert np.abs(lin_b - db).max() > 1.0
    # no net rigid-body motion: superposing the result on the reference changes nothing
    rot0, shift0 = superpose(nonlinear, xyz)
    np.testing.assert_allclose(rot0, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(shift0, 0.0, atol=1e-9)


def test_linear_equivalent_is_the_projection_of_the_arc() -> None:
    """A 40° hinge closure: the non-linear amplitude q turns domain B on its arc; the linear
    amplitude that the motion amounts to is the projection of that arc's displacement (in the
    reference's frame) on the mode, shorter than q (a chord, not the tangent), and small
    amplitudes are their own equivalent."""
    xyz, mode, in_b, spin = _hinge()
    angle = np.radians(40.0)
    q = angle / np.linalg.norm(spin)
    exact = np.where(in_b[:, None], xyz @ _rot_z(angle).T, xyz)
    rot, shift = superpose(exact, xyz)  # deform_nonlinear's frame: superposed on the reference
    expected = float(mode[0].ravel() @ ((exact @ rot.T + shift) - xyz).ravel())
    # mode_spins' default 10 Å neighbourhoods straddle the hinge near it: a few % there
    got = linear_equivalent(xyz, mode, np.array([[q]]))
    assert got.shape == (1, 1)
    assert got[0, 0] == pytest.approx(expected, rel=0.03)
    assert got[0, 0] < 0.97 * q
    # an elastic network's flexible modes carry no rigid motion: small amplitudes are their own
    # equivalent (the hinge mode above is not: its net turn is superposed away)
    from deephemnma_bridge.api import compute_modes

    ak = compute_modes(n_modes=9, log=None).select([7, 8, 9])
    q_small = np.array([[0.05, -0.03, 0.02]]) * np.sqrt(len(ak.coordinates))  # ~0.06 Å RMS
    small = linear_equivalent(ak.coordinates, ak.vectors, q_small)
    np.testing.assert_allclose(small, q_small, rtol=0.02, atol=1e-3)


def test_small_amplitudes_give_the_linear_model_back() -> None:
    xyz, mode, _, _ = _hinge()
    mode = mode - mode.mean(axis=1, keepdims=True)  # no net translation
    spins = mode_spins(xyz, mode, radius_angstrom=6.0)
    tt = [torch.tensor(v, dtype=torch.float64) for v in (xyz, mode, spins)]
    for q in (1e-3, 0.1):
        amp = torch.tensor([[q]], dtype=torch.float64)
        lin = deform(tt[0], tt[1], amp)[0]
        nl = deform_nonlinear(*tt, amp)[0]
        # up to the Kabsch frame, which removes the mode's own net rotation (first order)
        rot, shift = superpose(nl.numpy(), lin.numpy())
        moved = nl.numpy() @ rot.T + shift
        disp = float((lin - tt[0]).norm())
        assert np.linalg.norm(moved - lin.numpy()) < 0.05 * disp
    zero = deform_nonlinear(*tt, torch.zeros(2, 1, dtype=torch.float64))
    np.testing.assert_allclose(zero.numpy(), np.broadcast_to(xyz, (2, *xyz.shape)), atol=1e-9)
    amp = torch.tensor([[5.0]], dtype=torch.float64, requires_grad=True)
    deform_nonlinear(*tt, amp).sum().backward()
    assert amp.grad is not None and torch.isfinite(amp.grad).all()


def test_nonlinear_reference_model_and_its_coarse_copy() -> None:
    xyz, mode, _, _ = _hinge(30)
    linear = ReferenceModel.from_modes(xyz, mode, [7], template="nodes")
    ref = ReferenceModel.from_modes(xyz, mode, [7], template="nodes", deformation="nonlinear")
    assert linear.deformation == "linear" and ref.deformation == "nonlinear"
    assert ref.spins is not None and ref.spins.shape == ref.modes.shape
    coarse = ref.coarsened(6)
    assert coarse.spins is not None and coarse.spins.shape == (1, 6, 3)
    q = torch.tensor([[10.0]])
    assert ref.deformed(q).shape == (1, 60, 3) and coarse.deformed(q).shape == (1, 6, 3)
    assert float((ref.deformed(q) - linear.deformed(q)).abs().max()) > 0.1
    with pytest.raises(Exception, match="deformation"):
        ReferenceModel.from_modes(xyz, mode, [7], template="nodes", deformation="bent")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def closed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Closed adenylate kinase (1AKE A) rendered in the frame of the open form's modes."""
    if not (DATA / "1ake.pdb").exists():
        pytest.skip(f"{DATA} is not beside the checkout")
    work = tmp_path_factory.mktemp("closed")
    assert (
        main(["modes", str(DATA / "4ake.pdb"), "--chains", "A", "--out", str(work / "o.npz")]) == 0
    )
    argv = ["simulate", "--n", "12", "--box", "64", "--pixel-size", "1.3", "--seed", "5"]
    argv += ["--modes", str(work / "o.npz"), "--use-modes", "7,8,9,10,11,12", "--snr", "1"]
    argv += ["--conformation", str(DATA / "1ake.pdb"), "--conformation-chains", "A"]
    argv += ["--max-rms", "0", "--out", str(work / "sim"), "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(argv) == 0
    return work / "sim"


def test_population_search_keeps_the_better_pass(closed: Path) -> None:
    """Pass 1 is the same with or without the population search, and each particle keeps the
    better of both passes: its cost can only go down."""
    from deephemnma_bridge.adapters import ParticleImages
    from deephemnma_bridge.nma import NormalModes

    table = read_particles(closed / "particles.star")
    images = torch.tensor(ParticleImages(table).read(np.arange(8)))
    modes = NormalModes.load(closed / "modes.npz").select([7, 8, 9, 10, 11, 12])
    ref = ReferenceModel.from_modes(
        modes.coordinates, modes.vectors, [7, 8, 9, 10, 11, 12], template="nodes",
        deformation="nonlinear",
    )  # fmt: skip
    ctf = CTFParams.from_table(table, np.arange(8))
    fast = dict(search_step_degrees=20.0, iterations=(15, 8), max_rounds=1)
    pixel = float(table.pixel_size_angstrom[0])
    one = align_batch(images, ctf, ref, AlignmentConfig(**fast), pixel_size_angstrom=pixel)
    two = align_batch(
        images, ctf, ref, AlignmentConfig(**fast, population_centres=2), pixel_size_angstrom=pixel
    )
    assert np.all(two.cost <= one.cost + 1e-7)
    assert np.any(two.cost < one.cost - 1e-4)  # the second pass found better fits for some


def test_align_nonlinear_with_population_search_finds_the_closed_form(
    closed: Path, tmp_path: Path
) -> None:
    argv = ["align", str(closed / "particles.star"), "--modes", str(closed / "modes.npz")]
    argv += ["--use-modes", "7,8,9,10,11,12", "--working-size", "64", "--search-step", "15"]
    argv += ["--deformation", "nonlinear", "--population-search", "2", "--out", str(tmp_path / "a")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main([*argv, "--device", "cpu"]) == 0
    settings = json.loads((tmp_path / "a" / "alignment.json").read_text())["settings"]
    assert settings["deformation"] == "nonlinear" and settings["population_centres"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        errors = ground_truth_errors(read_particles(tmp_path / "a" / "particles.star"))["all"]
    # linear, no second search, same data: median 14.9°, p90 99.8° (lost poses); this: 8.6°, 10.7°
    assert errors["angle_median"] < 12.0 and errors["angle_p90"] < 30.0


def test_train_records_the_deformation_of_its_labels(tmp_path: Path) -> None:
    from deephemnma_bridge.cli.train import _deformation_of

    aligned = tmp_path / "particles.star"
    assert _deformation_of(aligned) == "linear"  # no alignment.json: plain amplitudes
    (tmp_path / "alignment.json").write_text(json.dumps({"settings": {"deformation": "nonlinear"}}))
    assert _deformation_of(aligned) == "nonlinear"
    (tmp_path / "alignment.json").write_text("{not json")
    assert _deformation_of(aligned) == "linear"
