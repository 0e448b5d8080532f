"""initial_pose.py: the ROS-free rules for seeding a 2-D localiser and capping the inference rate."""
import math

import numpy as np
import pytest

from ros2_posenet.geometry import matrix_to_rpy, rpy_to_matrix
from ros2_posenet.initial_pose import InitialPoseGate, RateLimiter, planar_initial_pose


def test_planar_initial_pose_keeps_x_y_yaw_and_their_covariance():
    T = np.eye(4)
    T[:3, :3] = rpy_to_matrix(0.1, -0.05, 0.7)
    T[:3, 3] = (1.5, -2.0, 0.4)
    cov = np.arange(36, dtype=float).reshape(6, 6)
    cov = cov @ cov.T + np.eye(6)
    T2, cov2 = planar_initial_pose(T, cov)
    np.testing.assert_allclose(T2[:3, 3], (1.5, -2.0, 0.0))
    roll, pitch, yaw = matrix_to_rpy(T2[:3, :3])
    assert abs(roll) < 1e-12 and abs(pitch) < 1e-12 and yaw == pytest.approx(matrix_to_rpy(T[:3, :3])[2])
    for i in range(6):
        for j in range(6):
            expected = cov[i, j] if i in (0, 1, 5) and j in (0, 1, 5) else 0.0
            assert cov2[i, j] == expected


def test_initial_pose_gate_uses_the_worst_horizontal_direction_and_yaw():
    gate = InitialPoseGate(max_position_std=0.5, max_yaw_std=math.radians(10))
    cov = np.diag([0.04, 0.04, 9.0, 9.0, 9.0, math.radians(5) ** 2])  # z, roll, pitch do not matter to AMCL
    assert gate.rejection(cov) is None
    correlated = cov.copy()
    correlated[0, 0] = correlated[1, 1] = 0.15
    correlated[0, 1] = correlated[1, 0] = 0.14  # each axis 0.39 m, but 0.54 m along the diagonal
    assert "position std 0.539 m" in gate.rejection(correlated)
    wide_yaw = np.diag([0.04, 0.04, 0, 0, 0, math.radians(20) ** 2])
    assert "yaw std 20.0°" in gate.rejection(wide_yaw)
    assert gate.rejection(np.full((6, 6), np.nan)) == "covariance is not finite"


def test_rate_limiter_caps_a_jittery_30hz_stream_at_10hz():
    rng = np.random.default_rng(0)
    arrivals = np.arange(300) / 30.0 + rng.uniform(-0.004, 0.004, 300)  # 10 s of a 30 Hz camera
    limiter = RateLimiter(10.0)
    admitted = [t for t in arrivals if limiter.admit(float(t))]
    assert 98 <= len(admitted) <= 101  # 10 Hz, not the 7.5 Hz of "0.1 s since the last one"
    assert min(np.diff(admitted)) > 0.06
    assert all(RateLimiter(0.0).admit(float(t)) for t in arrivals)
    gap = RateLimiter(2.0)
    assert gap.admit(0.0) and not gap.admit(0.3) and gap.admit(5.0) and not gap.admit(5.2)  # no burst after a pause
