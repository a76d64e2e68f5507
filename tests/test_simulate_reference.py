"""Simulator: another conformation rendered in the frame of a modes file (``--conformation``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared
from scipy.spatial.transform import Rotation

from deephemnma_bridge.alignment.ctf import CTFParams, ctf_2d
from deephemnma_bridge.alignment.render import render_projections
from deephemnma_bridge.conventions import euler_to_matrix
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.simulate import (
    SimulationConfig,
    SimulationModel,
    draw_truth,
    place_conformation,
    project_displacement,
    simulation_table,
    superpose,
)


def _orthonormal_modes(nodes: np.ndarray, m: int, seed: int = 1) -> np.ndarray:
    """m orthonormal vectors: the 6 rigid-body motions first, then random internal ones."""
    rng = np.random.default_rng(seed)
    c = nodes - nodes.mean(axis=0)
    rigid = [np.tile(np.eye(3)[k], len(c)) for k in range(3)]
    rigid += [np.cross(np.eye(3)[k], c).ravel() for k in range(3)]
    basis = np.stack([*rigid, *rng.normal(size=(m - 6, c.size))], axis=1)
    q, _ = np.linalg.qr(basis)
    return q.T.reshape(m, len(nodes), 3)


def test_superpose_recovers_a_rigid_motion() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)) * 10
    rot = Rotation.random(random_state=3).as_matrix()
    y = x @ rot.T + np.array([5.0, -2.0, 7.0])
    r, t = superpose(x, y)
    np.testing.assert_allclose(r, rot, atol=1e-10)
    np.testing.assert_allclose(x @ r.T + t, y, atol=1e-9)
    assert np.linalg.det(superpose(x, x[:, ::-1])[0]) == pytest.approx(1.0)  # never a mirror


def test_place_conformation_and_true_amplitudes() -> None:
    rng = np.random.default_rng(2)
    nodes = rng.normal(size=(50, 3)) * 8 + 30.0
    vec = _orthonormal_modes(nodes, 9)
    q_true = np.array([6.0, -4.0, 2.5])
    other = nodes + np.einsum("m,mnk->nk", q_true, vec[6:9])  # modes 7, 8, 9
    rot = Rotation.random(random_state=4).as_matrix()
    moved = other @ rot.T + np.array([-40.0, 12.0, 3.0])  # another frame
    atoms = np.repeat(moved, 2, axis=0) + rng.normal(size=(100, 3))
    owner = np.repeat(np.arange(50), 2)
    owner[0] = -1
    conf = place_conformation(nodes, moved, atoms, owner)
    assert conf.rmsd_as_given > 20 and conf.superposed
    # the superposition removes the frame; what is left is (close to) the deformation
    q, per_mode, carried = project_displacement(vec[6:9], conf.node_coordinates - nodes)
    np.testing.assert_allclose(q, q_true, atol=0.05)
    np.testing.assert_allclose(
        q, np.einsum("mnk,nk->m", vec[6:9], conf.node_coordinates - nodes), atol=1e-10
    )
    assert carried == pytest.approx(per_mode.sum()) and 0.99 < carried <= 1.0 + 1e-12
    assert len(conf.render_coordinates) == 99 and (conf.render_node >= 0).all()
    np.testing.assert_allclose(
        conf.render_coordinates, atoms[1:] @ conf.rotation.T + conf.translation
    )
    model = SimulationModel.from_arrays(
        nodes,
        vec,
        np.arange(1, 10),
        [7, 8, 9],
        atom_coordinates=conf.render_coordinates,
        atom_node=conf.render_node,
        conformation_nodes=conf.node_coordinates,
    )
    np.testing.assert_allclose(model.amplitude_offset, q)
    # rotated about the reference's node centroid, not the other model's
    np.testing.assert_allclose(model.centre_angstrom, nodes.mean(axis=0))
    np.testing.assert_allclose(model.render_coordinates, conf.render_coordinates - nodes.mean(0))
    cfg = SimulationConfig(n_particles=5, box_size_px=64, max_rms_displacement_angstrom=1.0)
    truth = draw_truth(cfg, model)
    table = simulation_table(cfg, model, truth, "p.mrcs")
    for i, m in enumerate((7, 8, 9)):
        np.testing.assert_allclose(
            table.extra[f"dhnTrueAmplitude{m}"], truth.amplitudes[:, i] + q[i]
        )
    as_is = place_conformation(nodes, other, other, np.arange(50), superpose_nodes=False)
    np.testing.assert_array_equal(as_is.node_coordinates, other)
    with pytest.raises(InputError, match="one to one"):
        place_conformation(nodes, moved[:-1], atoms, owner)


def _ncc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=(1, 2), keepdims=True)
    b = b - b.mean(axis=(1, 2), keepdims=True)
    return (a * b).sum(axis=(1, 2)) / np.sqrt((a * a).sum(axis=(1, 2)) * (b * b).sum(axis=(1, 2)))


def test_cli_closed_adk_in_the_open_modes_frame(tmp_path: Path) -> None:
    pytest.importorskip("gemmi")
    from deephemnma_bridge.adapters import read_particles
    from deephemnma_bridge.adapters.images import ParticleImages
    from deephemnma_bridge.adapters.structure import read_structure
    from deephemnma_bridge.cli import main
    from deephemnma_bridge.nma import NormalModes

    open_pdb, closed_pdb = shared("structures/4ake.pdb"), shared("structures/1ake.pdb")
    modes_path = tmp_path / "open.npz"
    assert main(["modes", str(open_pdb), "--chains", "A", "--out", str(modes_path)]) == 0
    box, pixel, n = 96, 1.0, 6
    out = tmp_path / "sim"
    use = "7,8,9,10,11,12"
    argv = ["simulate", "--modes", str(modes_path), "--use-modes", use, "--n", str(n)]
    argv += ["--box", str(box), "--pixel-size", str(pixel), "--snr", "20", "--seed", "4"]
    argv += ["--conformation", str(closed_pdb), "--conformation-chains", "A"]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    info = json.loads((out / "simulation.json").read_text())
    assert info["settings"]["max_rms_displacement_angstrom"] == 0.0  # default with --conformation
    conf = info["conformation"]

    # the recorded projection, computed directly: superpose 1AKE A on 4AKE A (Cα), project
    ref_modes = NormalModes.load(modes_path)
    ref_ca = ref_modes.coordinates
    closed = read_structure(closed_pdb, chains=["A"])
    ca = closed.coordinates_angstrom[closed.atom_names == "CA"]
    assert ca.shape == ref_ca.shape
    x, y = ca - ca.mean(0), ref_ca - ref_ca.mean(0)
    u, _, vt = np.linalg.svd(x.T @ y)
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
    fitted = x @ (vt.T @ d @ u.T).T + ref_ca.mean(0)
    disp = fitted - ref_ca
    rmsd = np.sqrt((disp**2).sum(1).mean())
    assert conf["node_rmsd_angstrom"] == pytest.approx(rmsd, abs=1e-6)
    assert rmsd == pytest.approx(7.131, abs=0.01)  # PROVENANCE.md's value for 1AKE A vs 4AKE A
    sel = [list(ref_modes.mode_numbers).index(m) for m in range(7, 13)]
    direct = np.einsum("mnk,nk->m", ref_modes.vectors[sel], disp)
    recorded = np.array([conf["projection"][str(m)] for m in range(7, 13)])
    np.testing.assert_allclose(recorded, direct, rtol=1e-6, atol=1e-6)
    assert conf["fraction_carried"] == pytest.approx((direct**2).sum() / (disp**2).sum())
    assert conf["fraction_carried"] > 0.8  # the motion is in the lowest modes
    assert conf["fraction_of_norm_carried"] == pytest.approx(np.sqrt(conf["fraction_carried"]))

    # ground truth: amplitudes = the projection (nothing drawn on top), poses about the centre
    table = read_particles(out / "particles.star")
    for k, m in enumerate(range(7, 13)):
        np.testing.assert_allclose(table.extra[f"dhnTrueAmplitude{m}"], direct[k], rtol=1e-4)
    centre = np.asarray(info["rotation_centre_angstrom"])
    np.testing.assert_allclose(centre, ref_ca.mean(0), atol=1e-9)
    saved = NormalModes.load(out / "modes.npz")  # what `align --modes` reads: centred
    np.testing.assert_allclose(saved.coordinates, ref_ca - centre, atol=1e-9)
    images = ParticleImages(table).read(np.arange(n))
    e = table.extra
    rot = torch.tensor(
        euler_to_matrix(np.stack([e["dhnTrueAngle" + a] for a in ("Rot", "Tilt", "Psi")], 1))
    )
    shifts = torch.tensor(np.stack([e["dhnTrueOriginXAngst"], e["dhnTrueOriginYAngst"]], 1))
    params = CTFParams.from_table(table, dtype=torch.float64)
    ctf = ctf_2d(params, box_size_px=box, pixel_size_angstrom=pixel)

    def project(points: np.ndarray) -> np.ndarray:
        proj = render_projections(
            torch.tensor(points),
            torch.zeros(0, len(points), 3, dtype=torch.float64),
            torch.zeros(n, 0, dtype=torch.float64),
            rot,
            shifts,
            box_size_px=box,
            pixel_size_angstrom=pixel,
            sigma_angstrom=1.0,
        )
        return torch.fft.irfft2(torch.fft.rfft2(proj) * ctf, s=(box, box)).numpy()

    closed_atoms = closed.coordinates_angstrom[closed.elements != "H"]
    closed_fit = (closed_atoms - ca.mean(0)) @ (vt.T @ d @ u.T).T + ref_ca.mean(0)
    assert ref_modes.atom_coordinates is not None
    c_closed = _ncc(images, project(closed_fit - centre))
    c_open = _ncc(images, project(ref_modes.atom_coordinates - centre))
    c_own_centre = _ncc(images, project(closed_fit - closed_fit.mean(0)))
    assert (c_closed > 0.9).all(), c_closed
    assert (c_closed > c_open + 0.1).all(), (c_closed, c_open)
    # rotated about the modes' centre: the closed model's own centroid gives a worse match
    assert (c_closed > c_own_centre).all(), (c_closed, c_own_centre)

    # mismatched networks: a clear error (1AKE has two chains, the modes one)
    bad = ["simulate", "--modes", str(modes_path), "--conformation", str(closed_pdb)]
    assert main([*bad, "--n", "2", "--out", str(tmp_path / "bad")]) == 2
