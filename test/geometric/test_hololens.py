"""The geometric stage on real RGB-D images: hololens-office frames refined from perturbed priors.

Skips without ``../shared/data/hololens-office`` (not on CI machines). A depth map of the training
frames around one block of 15 consecutive test frames, refined in order as a camera delivers them
(the focal check learns the real frames' scatter from the stream), priors = truth moved 0.3 m and turned 10°.
"""
from pathlib import Path

import numpy as np
import pytest

from ros2_posenet.geometric.features import FeatureConfig
from ros2_posenet.geometric.map_builder import build_scene_map, open_dataset, pose_matrix
from ros2_posenet.geometric.refiner import FAILURES, RefinementConfig, Refiner, perturb_pose, pose_difference
from ros2_posenet.geometric.scene_map import select_keyframes

HOLOLENS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hololens-office"
pytestmark = pytest.mark.skipif(not HOLOLENS.is_dir(), reason=f"real data not found: {HOLOLENS}")


def errors(T, T_true):
    delta = pose_difference(T, T_true)
    return float(np.linalg.norm(delta[:3])), float(np.degrees(np.linalg.norm(delta[3:])))


def test_real_frames_are_refined_from_perturbed_priors_and_never_made_worse():
    train, test = open_dataset("7scenes", HOLOLENS, "train"), open_dataset("7scenes", HOLOLENS, "test")
    queries = list(range(30, 45))
    truths = [pose_matrix(test, i) for i in queries]
    train_poses = np.stack([pose_matrix(train, i) for i in range(len(train))])
    distance = np.linalg.norm(train_poses[:, None, :3, 3] - np.stack(truths)[None, :, :3, 3], axis=2).min(1)
    near = np.flatnonzero(distance < 1.5)  # the map of the places queried, not of the whole walk (speed)
    keyframes = near[select_keyframes(train_poses[near], 0.25, 15.0)]
    scene_map = build_scene_map(train, keyframes, FeatureConfig(), "depth")
    refiner = Refiner(scene_map, RefinementConfig())
    rng = np.random.default_rng(0)
    prior_cov = np.diag([0.3**2] * 3 + [np.radians(10.0) ** 2] * 3)
    refined = 0
    for i, T_true in zip(queries, truths):
        prior = perturb_pose(T_true, 0.3, 10.0, rng)
        result = refiner.refine(test.load_image(i), test.intrinsics(i), prior, prior_cov)
        if not result.refined:
            assert result.failure in FAILURES and result.reason
            np.testing.assert_array_equal(result.T, prior)
            continue
        refined += 1
        metres, degrees = errors(result.T, T_true)
        assert metres < 0.1 and degrees < 2.0, (i, metres, degrees, result.reason)
        assert metres < 0.3 and degrees < 10.0  # never worse than its prior
    assert refined >= 5, f"{refined} of {len(queries)} refined"
