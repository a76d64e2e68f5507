"""Point groups Cn/Dn (RELION's axes), folding poses, angles modulo a group, and the model's own
symmetry axes; `align --symmetry` and `ground_truth_errors(symmetry=...)`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import modes_of_nodes, shared
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from deephemnma_bridge.cli import main
from deephemnma_bridge.conventions import angle_between_rotations_degrees, euler_to_matrix
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.symmetry import (
    angle_between_rotations_modulo,
    find_symmetry_frame,
    fold_poses,
    group_order,
    node_spacing,
    parse_symmetry,
    point_group,
    symmetry_deviation,
)

RNG = np.random.default_rng(7)


def _symmetric_cloud(symbol: str, n_motif: int = 40, seed: int = 1) -> np.ndarray:
    """A random chain-like motif off the axis, copied by every element of the group."""
    rng = np.random.default_rng(seed)
    motif = np.cumsum(rng.normal(size=(n_motif, 3)) * 2.0, axis=0)
    motif += np.array([14.0, 3.0, 6.0]) - motif.mean(axis=0)
    return np.concatenate([motif @ g.T for g in point_group(symbol)])


def _random_rotations(n: int) -> np.ndarray:
    return Rotation.random(n, random_state=RNG.integers(1 << 30)).as_matrix()


@pytest.mark.parametrize(
    ("symbol", "order"), [("C1", 1), ("C5", 5), ("c2", 2), ("D2", 4), ("D7", 14)]
)
def test_point_groups_are_closed_groups_of_proper_rotations(symbol: str, order: int) -> None:
    g = point_group(symbol)
    assert g.shape == (order, 3, 3) and group_order(symbol) == order
    np.testing.assert_allclose(g[0], np.eye(3), atol=1e-15)
    np.testing.assert_allclose(
        np.einsum("gji,gjk->gik", g, g), np.broadcast_to(np.eye(3), g.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-12)
    # closure: every product is an element, and all elements are distinct
    flat = g.reshape(order, 9)
    for a in g:
        for b in g:
            assert np.min(np.abs(flat - (a @ b).reshape(9)).max(axis=1)) < 1e-12
    assert len({tuple(np.round(x, 9)) for x in flat}) == order


def test_relion_axes_n_fold_along_z_dihedral_two_fold_along_x() -> None:
    z, x = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
    c5 = point_group("C5")
    np.testing.assert_allclose(c5 @ z, np.broadcast_to(z, (5, 3)), atol=1e-12)
    angles = np.sort(
        np.rad2deg(np.arccos(np.clip((np.trace(c5, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    )
    np.testing.assert_allclose(angles, [0, 72, 72, 144, 144], atol=1e-9)
    d3 = point_group("D3")
    flips = d3[3:]  # the 2-folds: z -> -z
    np.testing.assert_allclose(flips @ z, np.broadcast_to(-z, (3, 3)), atol=1e-12)
    assert any(np.allclose(f @ x, x) for f in flips)  # one of them about x
    # RELION: (rot + 360/n, tilt, psi) is the same view of a Cn-symmetric map
    a = euler_to_matrix([30.0, 50.0, -20.0])
    b = euler_to_matrix([30.0 + 72.0, 50.0, -20.0])
    assert angle_between_rotations_degrees(a, b) > 10
    assert angle_between_rotations_modulo(a, b, c5) < 1e-6


def test_parse_symmetry_rejects_other_groups() -> None:
    assert parse_symmetry(" d6 ") == ("D", 6)
    for bad in ("I1", "O", "T", "C0", "C", "H", "C5x"):
        with pytest.raises(InputError, match="Cn or Dn"):
            parse_symmetry(bad)


def test_equivalent_poses_give_the_same_image_of_a_symmetric_model() -> None:
    """The premise of folding: A X and A g X project onto the same 2-D point set."""
    x = _symmetric_cloud("C4")
    asym = np.cumsum(RNG.normal(size=(160, 3)) * 2.0, axis=0)
    for a in _random_rotations(3):
        for g in point_group("C4")[1:]:
            one, other = (x @ a.T)[:, :2], (x @ (a @ g).T)[:, :2]
            assert cKDTree(one).query(other)[0].max() < 1e-9
            # not so for a model without the symmetry
            d = cKDTree((asym @ a.T)[:, :2]).query((asym @ (a @ g).T)[:, :2])[0]
            assert d.max() > 1.0


@pytest.mark.parametrize("symbol", ["C5", "D4"])
def test_fold_poses_picks_one_representative_of_equivalent_poses(symbol: str) -> None:
    group = point_group(symbol)
    a = _random_rotations(200)
    folded, index = fold_poses(a, group)
    # the representative is one of the A g, and the one nearest the identity
    np.testing.assert_allclose(folded, np.einsum("nij,njk->nik", a, group[index]), atol=1e-12)
    eye = np.broadcast_to(np.eye(3), a.shape)
    to_identity = angle_between_rotations_degrees(folded, eye)
    for g in group:
        assert np.all(to_identity <= angle_between_rotations_degrees(a @ g, eye) + 1e-9)
    # equivalent poses fold to the same matrix; folding twice changes nothing
    moved = np.einsum("nij,njk->nik", a, group[RNG.integers(len(group), size=len(a))])
    np.testing.assert_allclose(fold_poses(moved, group)[0], folded, atol=1e-9)
    again, again_index = fold_poses(folded, group)
    np.testing.assert_allclose(again, folded, atol=1e-12)
    assert np.all(again_index == 0)
    # a pose already nearest the identity is left as it is
    small = Rotation.from_rotvec(RNG.normal(size=(20, 3)) * 0.05).as_matrix()
    assert np.all(fold_poses(small, group)[1] == 0)
    # to a given reference pose instead of the identity
    ref = _random_rotations(1)[0]
    near, _ = fold_poses(a, group, reference=ref)
    d_ref = angle_between_rotations_degrees(near, np.broadcast_to(ref, a.shape))
    for g in group:
        assert np.all(
            d_ref <= angle_between_rotations_degrees(a @ g, np.broadcast_to(ref, a.shape)) + 1e-9
        )


def test_angle_modulo_the_group_is_the_smallest_over_its_elements() -> None:
    group = point_group("D3")
    a, b = _random_rotations(50), _random_rotations(50)
    modulo = angle_between_rotations_modulo(a, b, group)
    each = np.stack([angle_between_rotations_degrees(a, b @ g) for g in group], axis=1)
    np.testing.assert_allclose(modulo, each.min(axis=1), atol=1e-6)
    assert np.all(modulo <= angle_between_rotations_degrees(a, b) + 1e-9)
    # trivial group: the plain angle; equivalent poses: 0
    np.testing.assert_allclose(
        angle_between_rotations_modulo(a, b, point_group("C1")),
        angle_between_rotations_degrees(a, b),
        atol=1e-6,
    )
    assert angle_between_rotations_modulo(a, a @ group[4], group).max() < 1e-5
    # the largest possible error modulo C5 is below that of the plain angle (72° errors vanish)
    assert angle_between_rotations_modulo(a, a @ point_group("C5")[1], group).min() > 1.0


@pytest.mark.parametrize("symbol", ["C5", "D3"])
def test_the_model_s_own_axes_are_found(symbol: str) -> None:
    x = _symmetric_cloud(symbol)
    assert symmetry_deviation(x, point_group(symbol)) < 1e-9
    q = _random_rotations(1)[0]
    turned = x @ q.T  # a PDB frame: the axes are no longer RELION's
    assert symmetry_deviation(turned, point_group(symbol)) > 0.5 * node_spacing(turned)
    frame, deviation = find_symmetry_frame(turned, symbol)
    assert deviation < 0.05 * node_spacing(turned)
    assert abs(frame[:, 2] @ (q @ [0.0, 0.0, 1.0])) > 0.9999  # the n-fold axis, either sense
    assert symmetry_deviation(turned, point_group(symbol, frame)) == pytest.approx(deviation)
    # in RELION's frame already: kept
    frame0, deviation0 = find_symmetry_frame(x, symbol)
    assert deviation0 < 1e-9 and abs(frame0[:, 2] @ [0.0, 0.0, 1.0]) > 0.9999


def test_pseudo_symmetric_pentamer_4yvs_and_asymmetric_adk() -> None:
    """4YVS (15 chains, near-C5) in its PDB frame: the C5 axis is found; AdK has none."""
    from deephemnma_bridge.adapters.structure import read_structure
    from deephemnma_bridge.coarse_grain import coarse_grain

    def nodes(path: str, chains: list[str] | None = None) -> np.ndarray:
        xyz = coarse_grain(
            read_structure(shared(path), chains=chains), nodes="ca"
        ).coordinates_angstrom
        return np.asarray(xyz) - np.mean(xyz, axis=0)

    pentamer = nodes("structures/4yvs.cif")
    spacing = node_spacing(pentamer)
    assert symmetry_deviation(pentamer, point_group("C5")) > spacing  # not about z
    frame, deviation = find_symmetry_frame(pentamer, "C5")
    assert deviation < 0.5 * spacing  # ~0.85 Å for ~3.8 Å between Cα
    flat_axis = np.linalg.eigh(pentamer.T @ pentamer)[1][:, 0]  # a ring: thinnest along it
    assert abs(frame[:, 2] @ flat_axis) > 0.999
    _, c2 = find_symmetry_frame(pentamer, "C2")
    assert c2 > spacing
    adk = nodes("structures/4ake.pdb", ["A"])
    assert find_symmetry_frame(adk, "C5")[1] > spacing


def test_align_symmetry_group_of_a_modes_file() -> None:
    from deephemnma_bridge.cli.align import _symmetry, symmetry_group

    x = _symmetric_cloud("C3", n_motif=30)
    group, info = symmetry_group(modes_of_nodes(x), "C3")
    assert info["relion_axes"] and info["order"] == 3
    np.testing.assert_allclose(group, point_group("C3"), atol=1e-12)
    q = Rotation.from_euler("zyz", [20, 70, 10], degrees=True).as_matrix()
    group, info = symmetry_group(modes_of_nodes(x @ q.T + [5.0, -3.0, 8.0]), "C3")
    assert not info["relion_axes"]
    assert abs(np.dot(info["n_fold_axis"], q @ [0.0, 0.0, 1.0])) > 0.9999
    np.testing.assert_allclose(group[1] @ q[:, 2], q[:, 2], atol=1e-6)  # turns about that axis
    assert symmetry_group(modes_of_nodes(x), "C1") == (None, {"symbol": "C1"})
    with pytest.raises(InputError, match="not D5-symmetric"):
        symmetry_group(modes_of_nodes(x), "D5")
    assert _symmetry("d2") == "D2"
    with pytest.raises(argparse.ArgumentTypeError):
        _symmetry("I2")


def test_ground_truth_errors_modulo_symmetry() -> None:
    from deephemnma_bridge.evaluation import ground_truth_errors
    from deephemnma_bridge.particles import ParticleTable

    n = 30
    truth = _random_rotations(n)
    c5 = point_group("C5")
    k = RNG.integers(1, 5, size=n)  # every estimate on another copy: errors of 72° or 144°
    estimated = np.einsum("nij,njk->nik", truth, c5[k])
    zeros = np.zeros(n)
    euler = Rotation.from_matrix(truth.transpose(0, 2, 1)).as_euler("ZYZ", degrees=True)
    table = ParticleTable(
        image_paths=np.array(["s.mrcs"] * n, dtype=object),
        image_indices=np.arange(n),
        rotation_matrices=estimated,
        shifts_angstrom=np.zeros((n, 2)),
        defocus_u_angstrom=zeros + 1e4,
        defocus_v_angstrom=zeros + 1e4,
        defocus_angle_degrees=zeros,
        voltage_kv=zeros + 300,
        spherical_aberration_mm=zeros + 2.7,
        amplitude_contrast=zeros + 0.1,
        phase_shift_degrees=zeros,
        bfactor_angstrom2=zeros,
        pixel_size_angstrom=zeros + 1.0,
        box_size_px=np.full(n, 64),
        optics_group=np.ones(n, dtype=np.int64),
        extra={
            "dhnTrueAngleRot": euler[:, 0],
            "dhnTrueAngleTilt": euler[:, 1],
            "dhnTrueAnglePsi": euler[:, 2],
            "dhnTrueOriginXAngst": zeros,
            "dhnTrueOriginYAngst": zeros,
        },
    )
    plain = ground_truth_errors(table)["all"]
    assert plain["angle_median"] > 70.0
    assert ground_truth_errors(table, symmetry="C5")["all"]["angle_p90"] < 1e-4
    assert ground_truth_errors(table, symmetry=c5)["all"]["angle_p90"] < 1e-4
    # a group that does not contain the errors: 72° stays 72°, 144° becomes 36° about z
    assert ground_truth_errors(table, symmetry="C2")["all"]["angle_median"] > 30.0
    # the group in the model's frame (here: the same rotated frame as the truth's copies)
    q = _random_rotations(1)[0]
    turned = table.with_poses(np.einsum("nij,njk->nik", truth, point_group("C5", q)[k]))
    assert ground_truth_errors(turned, symmetry="C5")["all"]["angle_median"] > 10.0
    assert ground_truth_errors(turned, symmetry=point_group("C5", q))["all"]["angle_p90"] < 1e-4


def test_align_argument_parsing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deephemnma_bridge.cli.align import add_args

    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args(["p.star", "--modes", "m.npz", "--out", "o"])
    assert args.use_modes == "auto" and args.symmetry == "C1"
    args = parser.parse_args(
        ["p.star", "--modes", "m.npz", "--out", "o", "--symmetry", "c5", "--use-modes", "7,9"]
    )
    assert args.use_modes == [7, 9] and args.symmetry == "C5"
    with pytest.raises(SystemExit) as exit_info:
        main(["align", "p.star", "--modes", "m.npz", "--out", str(tmp_path), "--symmetry", "I"])
    assert exit_info.value.code == 2
    assert "Cn or Dn" in capsys.readouterr().err
    json.dumps(vars(args), default=str)  # the settings stay JSON-serialisable
