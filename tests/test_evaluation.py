"""Errors against the ground truth: the global frame separated from per-particle errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from deephemnma_bridge.conventions import angle_between_rotations_degrees
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.evaluation import frame_offset


def test_frame_offset_finds_a_global_turn_despite_outliers() -> None:
    rng = np.random.default_rng(3)
    n = 400
    true = Rotation.random(n, random_state=rng).as_matrix()
    g = Rotation.from_rotvec(np.radians(2.0) * np.array([0.6, -0.8, 0.0])).as_matrix()
    jitter = Rotation.from_rotvec(rng.normal(0, np.radians(0.5), (n, 3))).as_matrix()
    found = true @ g @ jitter
    wrong = rng.choice(n, 40, replace=False)  # 10 % on unrelated poses
    found[wrong] = Rotation.random(40, random_state=rng).as_matrix()

    angle, left = frame_offset(found, true)

    assert angle == pytest.approx(2.0, abs=0.1)
    as_found = angle_between_rotations_degrees(found, true)
    good = np.setdiff1d(np.arange(n), wrong)
    assert np.median(as_found[good]) > 1.8  # the turn dominates the raw errors...
    noise = angle_between_rotations_degrees(found[good], (true @ g)[good])
    np.testing.assert_allclose(left[good], noise, atol=0.15)  # ...and is gone from `left`
    assert np.median(left[good]) < 1.0


def test_frame_offset_of_exact_poses_is_zero() -> None:
    true = Rotation.random(20, random_state=1).as_matrix()
    angle, left = frame_offset(true, true)
    assert angle < 1e-5
    assert left.max() < 1e-4


def test_frame_offset_rejects_mismatched_arrays() -> None:
    true = Rotation.random(5, random_state=1).as_matrix()
    with pytest.raises(InputError, match=r"\(n, 3, 3\)"):
        frame_offset(true[:4], true)
    with pytest.raises(InputError, match="keep"):
        frame_offset(true, true, keep=0)
