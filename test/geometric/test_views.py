"""Photometric verification (geometric/views.py): keyframe views, their agreement with an image at a pose,
their place in the map file, and the refiner accepting a pose of few inliers only where the image looks right."""
import numpy as np
import pytest

from helpers import ROOM_K, room_map, room_pose
from ros2_posenet.geometric.map_builder import without_keyframes
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, pose_difference
from ros2_posenet.geometric.scene_map import MapError, SceneMap
from ros2_posenet.geometric.views import QueryView, map_view_size, point_view_depth, view_agreement, view_size

K = ROOM_K


@pytest.fixture(scope="module")
def room():
    return room_map()


def render(room, T):
    return room[0].render(T, K, 320, 240)[0]


def agreement(room, image, T, keyframe):
    scene_map = room[1]
    return view_agreement(QueryView.of(image, K), T, scene_map.view_grey[keyframe], scene_map.view_depth[keyframe],
                          scene_map.view_intrinsics(keyframe), scene_map.poses[keyframe])


def test_a_depth_map_keeps_a_small_view_of_each_keyframe_with_its_depth(room):
    scene_map = room[1]
    assert scene_map.has_views and scene_map.view_grey.shape == (len(scene_map), 60, 80) == scene_map.view_depth.shape
    assert view_size((320, 240)) == (80, 60)
    # A map's views stack into one array: the first sets the size, later keyframes of other sizes follow it.
    assert map_view_size(None, (320, 240)) == (80, 60)
    assert map_view_size(scene_map.view_grey[0], (640, 360)) == (80, 60) != view_size((640, 360))
    # The view's depth is the keyframe's: its pixels lifted with it land on the room's surfaces, which the
    # keyframe's own features (lifted from the full depth image) also lie on, at 1.5-8 m.
    depth = scene_map.view_depth.astype(float)
    assert (depth > 0).mean() > 0.95 and 0.3 < np.median(depth[depth > 0]) < 10
    # A view's K keeps pixel centres: the principal point of a 320x240 image at 159.5, 119.5 maps to 39.5, 29.5.
    Kv = scene_map.view_intrinsics(0)
    np.testing.assert_allclose(Kv[:2, 2], [39.5, 29.5])
    np.testing.assert_allclose(np.diag(Kv)[:2], [75.0, 75.0])


def test_a_view_of_map_points_knows_the_depth_around_each_point_and_the_nearer_one_wins():
    T = np.eye(4)
    T[:3, 3] = [1.0, 2.0, 3.0]  # depth is measured along the optical axis from the camera centre
    keypoints = np.array([[41.5, 21.5], [45.5, 21.5], [0.0, 0.0], [200.0, 200.0], [80.0, 40.0], [120.0, 80.0]])
    points = T[:3, 3] + np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 5.0], [0.0, 0.0, 4.0], [0.0, 0.0, -1.0],
                                  [0.0, 0.0, 1e6]])
    stored = point_view_depth(keypoints, points, T, (160, 120), (40, 30), radius=1)
    assert stored.shape == (30, 40) and stored.dtype == np.float16  # as the map keeps it
    depth = stored.astype(float)
    # Pixel (41.5, 21.5) of the image is the centre of pixel (10, 5) of the quarter-size view: its 3x3 patch is 2 m.
    np.testing.assert_allclose(depth[4:7, 9:12], 2.0, rtol=1e-3)
    # The 3 m point's patch (centre (11, 5)) overlaps it: where they overlap the nearer point stays.
    np.testing.assert_allclose(depth[4:7, 12], 3.0, rtol=1e-3)
    # A corner point keeps the part of its patch inside the view; a point off the view, behind the camera or
    # too far for the map's float16 depth (two nearly parallel rays) none.
    np.testing.assert_allclose(depth[:2, :2], 5.0, rtol=1e-3)
    assert np.count_nonzero(depth) == 9 + 3 + 4


def test_an_image_agrees_with_the_views_at_its_pose_and_not_elsewhere(room):
    scene_map = room[1]
    T_true = room_pose(-2.8, 0.6, 1.35, 10.0)
    image = render(room, T_true)
    keyframe = int(scene_map.nearest_keyframes(T_true, 1)[0])
    right = agreement(room, image, T_true, keyframe)
    assert right > 0.9
    # A few centimetres and a degree off still agree: verification must not need the exact pose.
    nudged = T_true.copy()
    nudged[:3, 3] += [0.03, -0.02, 0.01]
    assert agreement(room, image, nudged, keyframe) > 0.8
    # Turned 30 degrees, or half a metre lower, the pose says the image shows other texture.
    assert agreement(room, image, room_pose(-2.8, 0.6, 1.35, 40.0), keyframe) < 0.5
    assert agreement(room, image, room_pose(-2.8, 0.6, 0.8, 10.0), keyframe) < 0.5
    # A pose that looks away from everything the keyframe saw has nothing to compare: NaN, not a score.
    away = room_pose(-2.8, 0.6, 1.35, 190.0)
    assert np.isnan(agreement(room, image, away, keyframe))


def test_views_survive_the_map_file_and_leaving_keyframes_out(room, tmp_path):
    scene_map = room[1]
    loaded = SceneMap.load(scene_map.save(tmp_path / "room.npz"))
    np.testing.assert_array_equal(loaded.view_grey, scene_map.view_grey)
    np.testing.assert_array_equal(loaded.view_depth, scene_map.view_depth)
    reduced = without_keyframes(scene_map, [0, 3])
    np.testing.assert_array_equal(reduced.view_grey, np.delete(scene_map.view_grey, [0, 3], axis=0))
    np.testing.assert_array_equal(reduced.view_depth, np.delete(scene_map.view_depth, [0, 3], axis=0))
    # A map written before views existed (or a reconstruction map) has none, and says so.
    fields = {f: getattr(scene_map, f) for f in scene_map.__dataclass_fields__}
    plain = SceneMap(**{**fields, "view_grey": None, "view_depth": None})
    assert not SceneMap.load(plain.save(tmp_path / "plain.npz")).has_views
    # Views that do not fit the keyframes are refused with a message.
    with pytest.raises(MapError, match="views of shapes"):
        SceneMap(**{**fields, "view_grey": scene_map.view_grey[1:], "view_depth": scene_map.view_depth[1:]})
    with pytest.raises(MapError, match="come together"):
        SceneMap(**{**fields, "view_depth": None})
    with pytest.raises(MapError, match="finite"):
        SceneMap(**{**fields, "view_depth": np.full(scene_map.view_depth.shape, np.nan, np.float16)})


def test_a_pose_of_too_few_inliers_stands_only_where_the_image_looks_like_the_map(room):
    """With ``min_inliers`` out of reach every pose has too few inliers, and with no keyframes asked to confirm it,
    it stands on the photometric check alone."""
    scene_map = room[1]
    T_true = room_pose(-2.2, 0.3, 1.25, -15.0)
    image = render(room, T_true)
    prior_cov = np.diag([0.25] * 3 + [0.03] * 3)
    prior = T_true.copy()
    prior[:3, 3] += [0.2, -0.1, 0.0]
    strict = RefinementConfig(retrieval=False, min_inliers=5000, retrieval_min_inliers=5000, min_inlier_ratio=0.0,
                              neighbourhood_confirms=False)
    result = Refiner(scene_map, strict).refine(image, K, prior, prior_cov)
    assert result.status == "refined", result.reason
    assert "the image looks like the map there (keyframe" in result.reason and "NCC" in result.reason
    assert np.linalg.norm(pose_difference(result.T, T_true)[:3]) < 0.02
    # Without the check, or where the map's views show something else, the same pose falls back.
    off = Refiner(scene_map, strict.replace(photometric_min_ncc=0.0)).refine(image, K, prior, prior_cov)
    assert off.status == "fallback" and off.failure == "too_few_inliers"
    fields = {f: getattr(scene_map, f) for f in scene_map.__dataclass_fields__}
    noise = np.random.default_rng(0).integers(0, 256, scene_map.view_grey.shape, dtype=np.uint8)
    other = Refiner(SceneMap(**{**fields, "view_grey": noise}), strict).refine(image, K, prior, prior_cov)
    assert other.status == "fallback" and other.failure == "too_few_inliers"
    # A map without views cannot vouch either.
    plain = Refiner(SceneMap(**{**fields, "view_grey": None, "view_depth": None}), strict).refine(image, K, prior, prior_cov)
    assert plain.status == "fallback"

