"""Rotated-view augmentation: the warped image is what the turned camera sees, and its label is exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transforms3d.euler as t3e
from helpers import project_np

from ros2_posenet.data import Augmentation, build_dataset
from ros2_posenet.data.augment import FILL_RGB, random_rotation, rotate_view
from ros2_posenet.data.synthetic import SyntheticScene, SyntheticSceneConfig
from ros2_posenet.geometry import matrix_to_pose, pose_to_matrix, rotation_angle_deg_np
from ros2_posenet.preprocess import PreprocessConfig

SCENE = SyntheticSceneConfig(width=160, height=120, num_points=200)


@pytest.fixture(scope="module")
def scene():
    return SyntheticScene(SCENE)


def looking_at_wall() -> np.ndarray:
    """Camera-to-world pose in the room, optical axis roughly along +x (a wall 4-5 m away)."""
    R_body = t3e.euler2mat(0.0, 0.05, 0.1, "sxyz")  # yaw 0.1 rad, pitch 0.05 rad
    optical_in_body = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)  # REP-103 optical
    T = np.eye(4)
    T[:3, :3] = R_body @ optical_in_body
    T[:3, 3] = (1.0, 0.5, 1.4)
    return T


def test_rotated_view_matches_a_render_from_the_rotated_pose(scene):
    T = looking_at_wall()
    t, q = matrix_to_pose(T)
    image, _ = scene.render(T)
    R_delta = t3e.euler2mat(np.deg2rad(3.0), np.deg2rad(-6.0), np.deg2rad(4.0), "sxyz")
    warped, q_new = rotate_view(image, SCENE.K, q, R_delta)

    rendered, _ = scene.render(pose_to_matrix(t, q_new))
    inside = np.all(warped != np.array(FILL_RGB, dtype=np.uint8), axis=2)
    inside[:3], inside[-3:], inside[:, :3], inside[:, -3:] = False, False, False, False
    assert inside.mean() > 0.6
    err = np.abs(warped.astype(float) - rendered.astype(float)).mean(axis=2)[inside]
    unwarped = np.abs(image.astype(float) - rendered.astype(float)).mean(axis=2)[inside]
    # Interpolation blurs texture edges a little; without the warp the images disagree far more.
    assert np.median(err) < 6.0 and err.mean() < 0.35 * unwarped.mean()
    assert rotation_angle_deg_np(q, q_new) == pytest.approx(np.rad2deg(np.arccos((np.trace(R_delta) - 1) / 2)), abs=1e-6)


def test_rotated_label_moves_scene_points_like_the_homography(scene):
    T = looking_at_wall()
    t, q = matrix_to_pose(T)
    K = SCENE.K
    R_delta = random_rotation(8.0, np.random.default_rng(3))
    _, q_new = rotate_view(np.zeros((SCENE.height, SCENE.width, 3), np.uint8), K, q, R_delta)
    uv, depth = project_np(scene.points, t, q, K)
    uv_new, _ = project_np(scene.points, t, q_new, K)
    front = depth > 0.5
    H = K @ R_delta.T @ np.linalg.inv(K)
    mapped = np.c_[uv[front], np.ones(front.sum())] @ H.T
    np.testing.assert_allclose(mapped[:, :2] / mapped[:, 2:], uv_new[front], atol=1e-6)


def test_random_rotation_angles_stay_within_the_bound():
    rng = np.random.default_rng(0)
    angles = [np.rad2deg(np.arccos(np.clip((np.trace(random_rotation(5.0, rng)) - 1) / 2, -1, 1))) for _ in range(200)]
    assert max(angles) <= 5.0 + 1e-9 and np.mean(angles) > 2.0


def test_dataset_items_with_rotation_keep_position_and_change_rotation(tmp_path_factory):
    from helpers import tiny_scene

    root = tiny_scene(tmp_path_factory, "augment")
    small = PreprocessConfig(resize=64, crop=64)
    plain = build_dataset("7scenes", root, "train", small, augment=False, max_points=8)
    rotated = build_dataset("7scenes", root, "train", small, augment=Augmentation(random_crop=False, rotation_deg=6.0), max_points=8)
    torch.manual_seed(0)
    a, b = plain[3], rotated[3]
    assert torch.equal(a["position"], b["position"]) and torch.equal(a["K"], b["K"])
    angle = rotation_angle_deg_np(a["rotation"].double().numpy(), b["rotation"].double().numpy())
    assert 0.0 < angle <= 6.0 + 1e-3
    assert not torch.equal(a["image"], b["image"])


def test_augmentation_rejects_bad_settings():
    with pytest.raises(ValueError, match="rotation_deg"):
        Augmentation(rotation_deg=45.0)
    with pytest.raises(ValueError, match="color_jitter"):
        Augmentation(color_jitter=-0.1)
    with pytest.raises(TypeError, match="augment"):
        build_dataset("7scenes", "nowhere", "train", augment="yes")
