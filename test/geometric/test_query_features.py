"""Query features detected on a reduced image (RefinementConfig.query_max_image_size): scaled back, still accurate."""
import numpy as np
import pytest

from helpers import ROOM_K, room_map, room_pose
from ros2_posenet.geometric.features import FeatureConfig, detect_features, query_feature_config
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, perturb_pose, pose_difference


def test_the_smaller_cap_of_map_and_query_wins():
    assert query_feature_config(FeatureConfig(), 0) == FeatureConfig()
    assert query_feature_config(FeatureConfig(max_features=700), 480) == FeatureConfig(max_features=700, max_image_size=480)
    assert query_feature_config(FeatureConfig(max_image_size=320), 480).max_image_size == 320
    with pytest.raises(ValueError, match="max_image_size"):
        query_feature_config(FeatureConfig(), 16)


def test_a_query_detected_at_half_size_refines_a_full_size_image_against_a_full_size_map():
    scene, scene_map = room_map()
    K = ROOM_K * [[2], [2], [1]] + [[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]]  # the same camera at 640x480 (pixel centres)
    T = room_pose(-2.6, 0.5, 1.3, 8.0)
    rgb = scene.render(T, K, 640, 480)[0]
    halved = query_feature_config(scene_map.feature_config, 320)
    assert len(detect_features(rgb, halved)[0]) < len(detect_features(rgb, scene_map.feature_config)[0])
    prior = perturb_pose(T, 0.3, 5.0, np.random.default_rng(2))
    result = Refiner(scene_map, RefinementConfig(retrieval=False, query_max_image_size=320)).refine(rgb, K, prior, None)
    assert result.refined, result.reason
    delta = pose_difference(result.T, T)
    assert np.linalg.norm(delta[:3]) < 0.02 and np.degrees(np.linalg.norm(delta[3:])) < 0.3
