"""Pose conventions: RELION Euler, matrix, cryoSPARC rotvec, quaternion (INTEROP.md 0 and 2)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from deephemnma_bridge import conventions as cv


def _random_eulers(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rot = rng.uniform(-180, 180, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    psi = rng.uniform(-180, 180, n)
    return np.stack([rot, tilt, psi], axis=1)


def test_matrix_matches_relion_formula() -> None:
    # INTEROP.md 2.1: RELION's Euler_angles2matrix written out
    a, b, g = np.deg2rad([30.0, 50.0, -70.0])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    expected = np.array(
        [
            [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
            [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
            [sb * ca, sb * sa, cb],
        ]
    )
    np.testing.assert_allclose(cv.euler_to_matrix([30.0, 50.0, -70.0]), expected, atol=1e-15)


def test_pyem_reference_vectors() -> None:
    # pyem TestConvert: e3 (radians) and aa3 describe the same RELION matrix r3
    e3 = np.rad2deg([0.78443, 2.22963, -1.68833])
    aa3 = np.array([-2.14933, 0.74683, -0.48737])
    np.testing.assert_allclose(cv.euler_to_matrix(e3), cv.rotvec_to_matrix(aa3), atol=2e-5)


def test_scipy_equivalence_and_round_trip() -> None:
    e = _random_eulers(2000)
    a = cv.euler_to_matrix(e)
    scipy_a = Rotation.from_euler("ZYZ", e, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(a, scipy_a, atol=1e-12)
    back = cv.matrix_to_euler(a)
    np.testing.assert_allclose(back, e, atol=1e-9)
    assert back[:, 1].min() >= 0 and back[:, 1].max() <= 180
    np.testing.assert_allclose(cv.euler_to_matrix(back), a, atol=1e-12)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_gimbal_lock_like_relion(tilt: float) -> None:
    a = cv.euler_to_matrix([40.0, tilt, 25.0])
    rot, t, psi = cv.matrix_to_euler(a)
    assert rot == 0.0 and t == tilt  # RELION puts the whole in-plane angle in psi
    np.testing.assert_allclose(cv.euler_to_matrix([rot, t, psi]), a, atol=1e-12)


def test_rotvec_is_transpose_of_rodrigues() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(100, 3))
    a = cv.rotvec_to_matrix(v)
    np.testing.assert_allclose(a, Rotation.from_rotvec(v).as_matrix().transpose(0, 2, 1))
    np.testing.assert_allclose(cv.rotvec_to_matrix(cv.matrix_to_rotvec(a)), a, atol=1e-12)
    # cryoSPARC pose -> RELION angles in one step (INTEROP.md 3.4)
    e = Rotation.from_rotvec(v).as_euler("ZYZ", degrees=True)
    np.testing.assert_allclose(cv.euler_to_matrix(e), a, atol=1e-12)


def test_quaternion_sign_rule_and_round_trip() -> None:
    a = cv.euler_to_matrix(_random_eulers(500, seed=2))
    q = cv.matrix_to_quaternion(a)
    assert np.all(q[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0)
    np.testing.assert_allclose(cv.quaternion_to_matrix(q), a, atol=1e-12)
    np.testing.assert_allclose(cv.quaternion_to_matrix(-q), a, atol=1e-12)
    np.testing.assert_allclose(cv.canonical_quaternion(-q), q)
    # w == 0: first nonzero of x, y, z positive (180° rotations)
    half_turns = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -0.6, 0.8], [0.0, 0.0, 0.0, -2.0]])
    c = cv.canonical_quaternion(half_turns)
    np.testing.assert_allclose(c, [[0, 1, 0, 0], [0, 0, 0.6, -0.8], [0, 0, 0, 1]])
    with pytest.raises(ValueError):
        cv.canonical_quaternion([0.0, 0.0, 0.0, 0.0])


def test_quaternion_is_that_of_the_matrix() -> None:
    a = cv.euler_to_matrix([10.0, 20.0, 30.0])
    w, x, y, z = cv.matrix_to_quaternion(a)
    r = np.array([0.3, -1.2, 2.0])
    # q r q* with q = (w, v): r' = r + 2w (v x r) + 2 v x (v x r)
    v = np.array([x, y, z])
    rotated = r + 2 * w * np.cross(v, r) + 2 * np.cross(v, np.cross(v, r))
    np.testing.assert_allclose(rotated, a @ r, atol=1e-12)


def test_angle_between_rotations() -> None:
    a = cv.euler_to_matrix([0.0, 0.0, 0.0])
    b = cv.euler_to_matrix([0.0, 0.0, 7.5])
    np.testing.assert_allclose(cv.angle_between_rotations_degrees(a, b), 7.5)


@pytest.mark.parametrize(
    ("name", "index0", "path"),
    [
        ("1@stack.mrcs", 0, "stack.mrcs"),
        ("000012@Extract/job7/a.mrcs", 11, "Extract/job7/a.mrcs"),
        ("00000003@b.mrcs", 2, "b.mrcs"),
        ("0000001@000000.mrcs", 0, "000000.mrcs"),
    ],
)
def test_image_names(name: str, index0: int, path: str) -> None:
    assert cv.parse_image_name(name) == (index0, path)
    assert cv.parse_image_name(cv.format_image_name(index0, path)) == (index0, path)


@pytest.mark.parametrize("bad", ["stack.mrcs", "0@a.mrcs", "x@a.mrcs"])
def test_bad_image_names(bad: str) -> None:
    with pytest.raises(ValueError, match="N@stack"):
        cv.parse_image_name(bad)


def test_normalise_stack_name() -> None:
    a = cv.normalise_stack_name(">J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs")
    b = cv.normalise_stack_name("Movies/18jam15b_0345_ali_DW.mrc")
    assert a == b == "18jam15b_0345_ali_DW"
