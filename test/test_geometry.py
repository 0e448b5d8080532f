"""Pose conventions and batched geometry, checked against transforms3d and hand-built cameras."""
import math

import numpy as np
import pytest
import torch
import transforms3d.euler as t3e
import transforms3d.quaternions as t3q

from ros2_posenet import geometry as g


def random_quats(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return g.quat_canonical(g.quat_normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64)))


def test_quat_to_matrix_matches_transforms3d():
    q = random_quats(50)
    R = g.quat_to_matrix(q)
    for qi, Ri in zip(q.numpy(), R.numpy()):
        np.testing.assert_allclose(Ri, t3q.quat2mat(qi), atol=1e-12)


def test_matrix_quat_round_trip_including_large_angles():
    q = random_quats(500, seed=1)
    # Add rotations near 180 degrees, where the trace-based formula is ill-conditioned.
    half_turns = torch.tensor([[0.0, 1, 0, 0], [0.0, 0, 1, 0], [0.0, 0, 0, 1], [1e-4, 0.7, 0.7, 0.0]], dtype=torch.float64)
    q = torch.cat([q, g.quat_canonical(g.quat_normalize(half_turns))])
    q_back = g.matrix_to_quat(g.quat_to_matrix(q))
    # Compare as rotations (w = 0 quaternions have two valid signs).
    assert g.rotation_error_deg(q_back, q).max() < 1e-5
    assert (q_back[:, 0] >= 0).all()


def test_canonical_hemisphere_and_sign_invariant_error():
    q = random_quats(20)
    assert (g.quat_canonical(-q)[:, 0] >= 0).all()
    torch.testing.assert_close(g.quat_canonical(-q), q)
    assert g.rotation_error_deg(q, -q).max() < 1e-6


def test_quat_mean_of_rotations_about_one_axis_is_the_middle_rotation_whatever_their_signs():
    def about_z(deg):
        a = math.radians(deg) / 2
        return torch.tensor([math.cos(a), 0.0, 0.0, math.sin(a)], dtype=torch.float64)
    pair = torch.stack([about_z(10.0), -about_z(50.0)])[:, None]  # (M=2, B=1, 4); -q is the same rotation
    mean = g.quat_mean(pair)
    assert mean.shape == (1, 4) and mean[0, 0] >= 0
    assert g.rotation_error_deg(mean, about_z(30.0)[None]).item() == pytest.approx(0.0, abs=1e-6)
    q = random_quats(7)
    torch.testing.assert_close(g.quat_mean(torch.stack([q, -q, q])), q)


def test_rotation_error_is_geodesic_angle():
    q1 = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
    angle = math.radians(37.0)
    q2 = torch.tensor([[math.cos(angle / 2), 0, 0, math.sin(angle / 2)]], dtype=torch.float64)
    assert g.rotation_error_deg(q1, q2).item() == pytest.approx(37.0, abs=1e-9)
    # Identical inputs never produce NaN even with rounding pushing |dot| above 1.
    q = g.quat_normalize(torch.tensor([[0.3, 0.3, 0.3, 0.8]], dtype=torch.float32))
    assert torch.isfinite(g.rotation_error_deg(q, q)).all()


def test_compose_with_inverse_is_identity_and_matches_matrices():
    q = random_quats(10, seed=3)
    t = torch.randn(10, 3, dtype=torch.float64)
    t_inv, q_inv = g.pose_inverse(t, q)
    t_id, q_id = g.pose_compose(t, q, t_inv, q_inv)
    torch.testing.assert_close(t_id, torch.zeros_like(t_id), atol=1e-12, rtol=0)
    assert g.rotation_error_deg(q_id, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)).max() < 1e-5
    t2, q2 = t.flip(0), q.flip(0)
    t_c, q_c = g.pose_compose(t, q, t2, q2)
    for i in range(10):
        T = g.pose_to_matrix(t[i].numpy(), q[i].numpy()) @ g.pose_to_matrix(t2[i].numpy(), q2[i].numpy())
        t_ref, q_ref = g.matrix_to_pose(T)
        np.testing.assert_allclose(t_c[i].numpy(), t_ref, atol=1e-12)
        assert g.rotation_angle_deg_np(q_c[i].numpy(), q_ref) < 1e-5


def test_projection_of_known_camera():
    # Camera at (1, 2, 3) looking along world +x (optical z), optical x = world -y, optical y = world -z.
    R = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    t_cam, q_cam = np.array([1.0, 2.0, 3.0]), t3q.mat2quat(R)
    K = torch.tensor([[[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]]])
    # A point 4 m ahead, 1 m to the camera's left (world +y) and 0.5 m up (world +z).
    point = torch.tensor([[[5.0, 3.0, 3.5]]])
    uv, depth = g.project_points(point, torch.tensor(t_cam[None]).float(), torch.tensor(q_cam[None]).float(), K)
    assert depth.item() == pytest.approx(4.0)
    assert uv[0, 0, 0].item() == pytest.approx(320 - 500 * 1.0 / 4.0)  # left -> smaller u
    assert uv[0, 0, 1].item() == pytest.approx(240 - 500 * 0.5 / 4.0)  # up -> smaller v


def test_projection_matches_opencv():
    import cv2

    q, t = random_quats(1, seed=7), torch.tensor([[0.5, -0.2, 1.0]], dtype=torch.float64)
    pts_cam = torch.randn(1, 30, 3, dtype=torch.float64) + torch.tensor([0.0, 0.0, 6.0])  # in front
    pts = pts_cam @ g.quat_to_matrix(q).transpose(-1, -2) + t
    K = torch.tensor([[[400.0, 0, 160], [0, 410.0, 120], [0, 0, 1]]], dtype=torch.float64)
    uv, _ = g.project_points(pts, t, q, K)
    T_wc = g.pose_to_matrix(t[0].numpy(), q[0].numpy())
    T_cw = g.invert_matrix(T_wc)
    rvec, _ = cv2.Rodrigues(T_cw[:3, :3])
    ref, _ = cv2.projectPoints(pts[0].numpy(), rvec, T_cw[:3, 3], K[0].numpy(), None)
    np.testing.assert_allclose(uv[0].numpy(), ref[:, 0], atol=1e-8)


def test_ros_quaternion_order_round_trip():
    q_wxyz = np.array([0.9, 0.1, -0.3, 0.2])
    q_xyzw = g.wxyz_to_xyzw(q_wxyz)
    np.testing.assert_array_equal(q_xyzw, [0.1, -0.3, 0.2, 0.9])
    np.testing.assert_array_equal(g.xyzw_to_wxyz(q_xyzw), q_wxyz)


def test_matrix_quaternion_ros_order_round_trip():
    R = t3e.euler2mat(0.1, -0.4, 2.5, axes="sxyz")
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, [1, 2, 3]
    t, q = g.matrix_to_pose(T)
    q_ros = g.wxyz_to_xyzw(q)
    T2 = g.pose_to_matrix(t, g.xyzw_to_wxyz(q_ros))
    np.testing.assert_allclose(T2, T, atol=1e-12)
    assert g.matrix_to_rpy(R) == pytest.approx((0.1, -0.4, 2.5))


def test_optical_body_conversion():
    # An optical camera looking along world +x with image-down = world -z is a body frame aligned with the world.
    T_opt = np.eye(4)
    T_opt[:3, :3] = g.R_BODY_FROM_OPTICAL
    np.testing.assert_allclose(g.optical_pose_to_body(T_opt)[:3, :3], np.eye(3), atol=1e-12)
    T = g.pose_to_matrix([1, 2, 3], random_quats(1, seed=9)[0].numpy())
    np.testing.assert_allclose(g.body_pose_to_optical(g.optical_pose_to_body(T)), T, atol=1e-12)


def test_bad_quaternion_is_rejected():
    with pytest.raises(ValueError):
        g.canonical_quat_np([0, 0, 0, 0])
    with pytest.raises(ValueError):
        g.canonical_quat_np([np.nan, 0, 0, 1])
