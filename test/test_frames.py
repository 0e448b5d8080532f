"""Frame conventions between the network's optical camera pose and a ROS robot (no rclpy)."""
import math

import numpy as np
import pytest

from ros2_posenet.frames import (
    CameraMount,
    PoseHistory,
    base_covariance,
    extrinsic_matrix,
    interpolate_pose,
    is_finite_pose,
    map_to_odom,
    transport_covariance,
)
from ros2_posenet.geometry import R_BODY_FROM_OPTICAL, matrix_to_rpy, pose_to_matrix, rpy_to_matrix


def pose(xyz, rpy) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = rpy_to_matrix(*rpy)
    T[:3, 3] = xyz
    return T


def random_pose(rng) -> np.ndarray:
    q = rng.normal(size=4)
    return pose_to_matrix(rng.normal(size=3), q / np.linalg.norm(q))


def test_level_camera_looking_along_map_x_has_identity_body_pose():
    # Optical axes of a level camera looking along map +x: z_opt = +x, x_opt = -y (right), y_opt = -z (down).
    T_map_optical = np.eye(4)
    T_map_optical[:3, :3] = np.column_stack(([0, -1, 0], [0, 0, -1], [1, 0, 0]))
    T_map_optical[:3, 3] = (1.0, 2.0, 0.5)
    T_map_camera = CameraMount().camera_pose(T_map_optical)
    np.testing.assert_allclose(T_map_camera[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(T_map_camera[:3, 3], (1.0, 2.0, 0.5))


def test_body_pose_keeps_viewing_direction_and_yaw():
    yaw = math.radians(30)
    T_map_optical = np.eye(4)
    T_map_optical[:3, :3] = rpy_to_matrix(0, 0, yaw) @ R_BODY_FROM_OPTICAL
    T_map_camera = CameraMount().camera_pose(T_map_optical)
    # The optical axis (z) and the body forward axis (x) point the same way in the map.
    np.testing.assert_allclose(T_map_camera[:3, 0], T_map_optical[:3, 2], atol=1e-12)
    roll, pitch, body_yaw = matrix_to_rpy(T_map_camera[:3, :3])
    assert abs(roll) < 1e-9 and abs(pitch) < 1e-9 and body_yaw == pytest.approx(yaw)


def test_identity_mount_makes_base_equal_camera_body():
    rng = np.random.default_rng(0)
    T_map_optical = random_pose(rng)
    mount = CameraMount()
    np.testing.assert_allclose(mount.base_pose(T_map_optical), mount.camera_pose(T_map_optical), atol=1e-12)


def test_base_pose_through_urdf_style_extrinsic():
    # Camera 0.2 m ahead of and 0.5 m above the base, pitched down 10°, on a robot at (3, 1) facing +y.
    mount = CameraMount.from_xyz_rpy([0.2, 0.0, 0.5, 0.0, math.radians(10), 0.0])
    T_map_base = pose((3.0, 1.0, 0.0), (0.0, 0.0, math.pi / 2))
    T_map_optical = T_map_base @ mount.T_base_optical
    np.testing.assert_allclose(mount.base_pose(T_map_optical), T_map_base, atol=1e-12)
    # The camera sits 0.2 m along the robot's heading (+y in the map), 0.5 m up.
    np.testing.assert_allclose(mount.camera_pose(T_map_optical)[:3, 3], (3.0, 1.2, 0.5), atol=1e-12)
    np.testing.assert_allclose(mount.T_base_camera, pose((0.2, 0, 0.5), (0, math.radians(10), 0)))


def test_extrinsic_matrix_rejects_bad_values():
    with pytest.raises(ValueError, match="6 finite numbers"):
        extrinsic_matrix([0, 0, 0])
    with pytest.raises(ValueError, match="6 finite numbers"):
        extrinsic_matrix([0, 0, 0, 0, float("nan"), 0])


def test_map_to_odom_composes_back_to_base_pose():
    rng = np.random.default_rng(1)
    T_map_base, T_odom_base = random_pose(rng), random_pose(rng)
    T_map_odom = map_to_odom(T_map_base, T_odom_base)
    np.testing.assert_allclose(T_map_odom @ T_odom_base, T_map_base, atol=1e-12)
    # Perfect odometry (odom == map) gives the identity correction.
    np.testing.assert_allclose(map_to_odom(T_map_base, T_map_base), np.eye(4), atol=1e-12)


def test_transport_covariance_adds_lever_arm_term():
    cov = np.diag([0.01, 0.01, 0.01, 0.0, 0.0, 0.04])  # only yaw is uncertain among rotations
    out = transport_covariance(cov, [1.0, 0.0, 0.0])  # frame 1 m ahead along map x
    # A yaw error δψ moves that frame by δψ along y: var_y grows by 1²·0.04; x and z do not.
    np.testing.assert_allclose(np.diag(out)[:3], [0.01, 0.05, 0.01])
    assert out[1, 5] == pytest.approx(0.04)  # y and yaw errors are correlated
    np.testing.assert_allclose(out, out.T)
    np.testing.assert_allclose(transport_covariance(cov, [0, 0, 0]), cov)


def test_base_covariance_matches_monte_carlo():
    rng = np.random.default_rng(2)
    mount = CameraMount.from_xyz_rpy([0.3, -0.1, 0.6, 0.1, 0.2, -0.3])
    T_map_optical = random_pose(rng)
    T_map_base = mount.base_pose(T_map_optical)
    cov = np.diag([0.02, 0.01, 0.03, 0.002, 0.001, 0.003])
    predicted = base_covariance(cov, T_map_optical, T_map_base)
    # Perturb the camera pose (rotation about the map axes, left-multiplied) and look at the base.
    samples = rng.multivariate_normal(np.zeros(6), cov, size=20000)
    errors = []
    for s in samples:
        T = T_map_optical.copy()
        angle = np.linalg.norm(s[3:])
        axis = s[3:] / angle
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        dR = np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K
        T[:3, :3] = dR @ T[:3, :3]
        T[:3, 3] += s[:3]
        errors.append(mount.base_pose(T)[:3, 3] - T_map_base[:3, 3])
    empirical = np.cov(np.array(errors).T)
    np.testing.assert_allclose(predicted[:3, :3], empirical, atol=3e-3)


def test_interpolate_pose_halfway():
    T0 = pose((0, 0, 0), (0, 0, 0))
    T1 = pose((2, 0, 0), (0, 0, math.radians(90)))
    mid = interpolate_pose(T0, T1, 0.5)
    np.testing.assert_allclose(mid, pose((1, 0, 0), (0, 0, math.radians(45))), atol=1e-12)
    np.testing.assert_allclose(interpolate_pose(T0, T1, 0.0), T0, atol=1e-12)
    np.testing.assert_allclose(interpolate_pose(T0, T1, 1.0), T1, atol=1e-12)


def test_pose_history_interpolates_and_respects_tolerance():
    history = PoseHistory(max_samples=3)
    assert history.lookup(0.0, 1.0) is None
    history.add(10.0, pose((0, 0, 0), (0, 0, 0)))
    history.add(10.2, pose((1, 0, 0), (0, 0, 0)))
    np.testing.assert_allclose(history.lookup(10.05, 0.1)[:3, 3], (0.25, 0, 0), atol=1e-12)
    np.testing.assert_allclose(history.lookup(10.25, 0.1)[:3, 3], (1, 0, 0))  # just past the newest
    assert history.lookup(10.5, 0.1) is None  # too far past the newest sample
    assert history.lookup(9.5, 0.1) is None
    history.add(10.1, pose((5, 0, 0), (0, 0, 0)))  # out-of-order sample goes into place
    np.testing.assert_allclose(history.lookup(10.1, 0.0)[:3, 3], (5, 0, 0))
    history.add(20.0, pose((9, 0, 0), (0, 0, 0)))  # max_samples drops the oldest
    assert len(history) == 3 and history.lookup(10.0, 0.0) is None
    # A gap much wider than the tolerance is not bridged by interpolation.
    assert history.lookup(15.0, 0.5) is None


def test_is_finite_pose():
    T = np.eye(4)
    assert is_finite_pose(T)
    T[0, 3] = np.inf
    assert not is_finite_pose(T)
