"""Depth-free map points: triangulation of matches between images with known poses.

Synthetic, exact geometry: world points projected into a few posed cameras, with
pixel noise, wrong matches, far points (tiny triangulation angle) and corrupted
observations; the triangulated points must come back within tolerance and the bad
ones must be rejected.
"""
from __future__ import annotations

import numpy as np
import pytest

from ros2_posenet.config_base import ConfigError
from ros2_posenet.geometric.triangulation import (
    TriangulationConfig,
    TriangulationError,
    epipolar_distance_matrix,
    epipolar_guided_matches,
    fundamental_from_poses,
    select_pairs,
    symmetric_epipolar_distance,
    triangulate_map,
)

WIDTH, HEIGHT = 640, 480
K = np.array([[500.0, 0.0, 319.5], [0.0, 500.0, 239.5], [0.0, 0.0, 1.0]])


def look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world pose (optical frame, world z up) at ``centre`` looking at ``target``."""
    z = target - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    T = np.eye(4)
    T[:3, :3] = np.column_stack([x, np.cross(z, x), z])
    T[:3, 3] = centre
    return T


def arc_cameras(n: int = 5, radius: float = 4.0, spread_deg: float = 40.0) -> np.ndarray:
    """Cameras on an arc around the origin, all looking at it."""
    angles = np.radians(np.linspace(-spread_deg / 2, spread_deg / 2, n))
    return np.stack([look_at(np.array([radius * np.sin(a), -radius * np.cos(a), 0.3]), np.zeros(3)) for a in angles])


def project(points: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    Xc = (points - T[:3, 3]) @ T[:3, :3]
    uv = Xc @ K.T
    return uv[:, :2] / uv[:, 2:3], Xc[:, 2]


class Scene:
    """Per camera: keypoints in shuffled order and the id of the world point each shows."""

    def __init__(self, points: np.ndarray, poses: np.ndarray, noise_px: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.points, self.poses = points, poses
        self.keypoints, self.ids = [], []
        for T in poses:
            uv, depth = project(points, T)
            inside = (uv[:, 0] >= 0) & (uv[:, 0] < WIDTH) & (uv[:, 1] >= 0) & (uv[:, 1] < HEIGHT)
            visible = np.flatnonzero((depth > 0) & inside)
            order = rng.permutation(visible)
            self.ids.append(order)
            self.keypoints.append(uv[order] + rng.normal(0.0, noise_px, (len(order), 2)))

    def features(self):
        # Descriptors are not used by the exact matcher; triangulate_map only checks their count.
        return [(kp, np.zeros((len(kp), 8), np.float32)) for kp in self.keypoints]

    def matcher(self, wrong_fraction: float = 0.0, seed: int = 1):
        """Exact matcher by point id (found through the descriptors' identity), plus wrong pairs."""
        rng = np.random.default_rng(seed)
        by_desc = {id(desc): i for i, (_, desc) in enumerate(self._features)}

        def match(desc_a, desc_b):
            a, b = by_desc[id(desc_a)], by_desc[id(desc_b)]
            _, ia, ib = np.intersect1d(self.ids[a], self.ids[b], return_indices=True)
            pairs = np.column_stack([ia, ib])
            n_wrong = int(wrong_fraction * len(pairs))
            wrong = np.column_stack([rng.integers(0, len(self.ids[a]), n_wrong),
                                     rng.integers(0, len(self.ids[b]), n_wrong)])
            return np.concatenate([pairs, wrong])

        return match

    def run(self, config: TriangulationConfig, wrong_fraction: float = 0.0):
        self._features = self.features()
        return triangulate_map(self._features, np.repeat(K[None], len(self.poses), 0), self.poses, config,
                               matcher=self.matcher(wrong_fraction))

    def true_points_of(self, result) -> tuple[np.ndarray, np.ndarray]:
        """(triangulated points, the true world point of each), for every kept point, checking
        that all features assigned to one point show the same world point."""
        truth = np.full((len(result.points3d),), -1)
        for cam, index in enumerate(result.point_index):
            feats = np.flatnonzero(index >= 0)
            true_ids = self.ids[cam][feats]
            assigned = truth[index[feats]]
            assert np.all((assigned == -1) | (assigned == true_ids)), "a point mixes features of different world points"
            truth[index[feats]] = true_ids
        return result.points3d, self.points[truth]


def random_points(n: int, seed: int = 0, half_size: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-half_size, half_size, (n, 3))


def test_noiseless_points_are_recovered_exactly():
    scene = Scene(random_points(300), arc_cameras(), noise_px=0.0)
    result = scene.run(TriangulationConfig(min_points_per_keyframe=0))
    estimated, truth = scene.true_points_of(result)
    assert len(estimated) > 250
    np.testing.assert_allclose(estimated, truth, atol=1e-6)
    assert np.all(result.track_length >= 3)
    assert np.all(result.reproj_error_px < 1e-4)


def test_noisy_points_within_tolerance_and_per_point_records():
    scene = Scene(random_points(400, seed=2), arc_cameras(), noise_px=0.5, seed=3)
    config = TriangulationConfig(min_points_per_keyframe=0, max_reproj_px=2.0)
    result = scene.run(config)
    estimated, truth = scene.true_points_of(result)
    err = np.linalg.norm(estimated - truth, axis=1)
    # 0.5 px at f = 500, 4 m depth, ≥ 10° between rays: a few millimetres.
    assert len(estimated) > 300
    assert np.median(err) < 0.01 and np.max(err) < 0.05
    assert np.all(result.reproj_error_px <= config.max_reproj_px)
    assert np.all(result.angle_deg >= config.min_angle_deg)
    assert 0.2 < np.median(result.reproj_error_px) < 1.0  # the noise is seen, not hidden
    # Every kept feature reprojects close to its point.
    for cam, T in enumerate(scene.poses):
        feats, ids = result.keyframe_points(cam)
        uv, _ = project(result.points3d[ids], T)
        assert np.all(np.linalg.norm(uv - scene.keypoints[cam][feats], axis=1) <= config.max_reproj_px)
    info = result.point_info(np.arange(len(result.points3d)))
    assert set(info) == {"track_length", "angle_deg", "range_uncertainty", "reproj_error_px"}
    assert "DLT" in result.method


def test_wrong_matches_are_rejected_by_the_known_epipolar_geometry():
    scene = Scene(random_points(300, seed=4), arc_cameras(), noise_px=0.3, seed=5)
    result = scene.run(TriangulationConfig(min_points_per_keyframe=0), wrong_fraction=0.3)
    estimated, truth = scene.true_points_of(result)  # asserts no point mixes world points
    assert len(estimated) > 250
    assert np.max(np.linalg.norm(estimated - truth, axis=1)) < 0.05
    assert result.stats["verified_matches"] < result.stats["matches"]


def test_far_points_with_a_small_triangulation_angle_are_rejected():
    near = random_points(200, seed=6)
    far = random_points(100, seed=7, half_size=20.0) + np.array([0.0, 400.0, 0.0])  # ≈ 400 m away: rays < 1°
    points = np.concatenate([near, far])
    scene = Scene(points, arc_cameras(spread_deg=20.0), noise_px=0.0)
    config = TriangulationConfig(min_angle_deg=2.0, min_points_per_keyframe=0)
    result = scene.run(config)
    _, truth = scene.true_points_of(result)
    assert np.all(np.linalg.norm(truth, axis=1) < 5.0), "a far point was kept"
    assert result.stats["rejected_small_angle"] >= 50
    assert len(result.points3d) > 150
    # With no angle or uncertainty threshold the same far points are kept (the filters remove them).
    loose = scene.run(TriangulationConfig(min_angle_deg=0.0, max_range_uncertainty=0.0, min_points_per_keyframe=0))
    assert len(loose.points3d) > len(result.points3d) + 50


def test_observations_off_by_many_pixels_are_dropped():
    scene = Scene(random_points(300, seed=8), arc_cameras(), noise_px=0.2, seed=9)
    corrupted = np.arange(0, len(scene.keypoints[2]), 3)
    # An 8 px shift of a third of camera 2's keypoints; with the epipolar check loosened to
    # 10 px some of them enter tracks, and the multi-view reprojection test must drop them.
    scene.keypoints[2][corrupted] += np.array([0.0, 8.0])
    config = TriangulationConfig(min_points_per_keyframe=0, max_epipolar_px=10.0, max_reproj_px=2.0)
    result = scene.run(config)
    estimated, truth = scene.true_points_of(result)
    assert np.max(np.linalg.norm(estimated - truth, axis=1)) < 0.05
    assert np.all(result.point_index[2][corrupted] == -1), "a corrupted observation was kept"
    assert result.stats["dropped_outlier_observations"] > 0
    uncorrupted = np.setdiff1d(np.arange(len(scene.keypoints[2])), corrupted)
    assert np.mean(result.point_index[2][uncorrupted] >= 0) > 0.8


def test_two_view_points_only_where_a_keyframe_needs_them():
    # 100 points seen by all five cameras, and a patch of 100 that only cameras 3 and 4 see.
    common, patch = random_points(100, seed=10), random_points(100, seed=17, half_size=0.5)
    scene = Scene(np.concatenate([common, patch]), arc_cameras(n=5), noise_px=0.0)
    for cam in range(3):
        seen = scene.ids[cam] < 100
        scene.ids[cam], scene.keypoints[cam] = scene.ids[cam][seen], scene.keypoints[cam][seen]
    strict = scene.run(TriangulationConfig(min_track_length=3, min_points_per_keyframe=0))
    _, truth = scene.true_points_of(strict)
    assert np.all(strict.track_length >= 3) and len(strict.points3d) > 80
    assert not np.any(np.isin(truth, patch).all(axis=1)), "a 2-view point was kept"
    # Cameras 3 and 4 have fewer than 150 multi-view points: they keep their 2-view points too.
    # (cameras 10° apart: no limit on the two-view angle here, which has its own test)
    relaxed = scene.run(TriangulationConfig(min_track_length=3, min_points_per_keyframe=150, max_two_view_angle_deg=0.0))
    estimated, truth = scene.true_points_of(relaxed)
    two_view = relaxed.track_length == 2
    assert two_view.sum() > 80 and np.isin(truth[two_view], patch).all()
    np.testing.assert_allclose(estimated, truth, atol=1e-6)
    for cam in range(3):  # the others are unchanged
        assert np.sum(relaxed.point_index[cam] >= 0) == np.sum(strict.point_index[cam] >= 0)


def test_two_view_points_kept_by_default_unless_their_views_are_far_apart():
    # Five cameras 2° apart around the origin (rays of a point meet at ≈ 2° between neighbours, 8° between the
    # outer two): 100 points all see, a patch only cameras 0 and 1 see, another only cameras 0 and 4 see.
    common = random_points(100, seed=18)
    near_patch = random_points(60, seed=19, half_size=0.5) + np.array([0.6, 0.0, 0.0])
    far_patch = random_points(60, seed=20, half_size=0.5) - np.array([0.6, 0.0, 0.0])
    points = np.concatenate([common, near_patch, far_patch])
    scene = Scene(points, arc_cameras(n=5, spread_deg=8.0), noise_px=0.0)
    seen_by = {0: (0, 1, 2), 1: (0, 1), 2: (0,), 3: (0,), 4: (0, 2)}  # 0: common, 1: near patch, 2: far patch
    group = np.repeat([0, 1, 2], [100, 60, 60])
    for cam, groups in seen_by.items():
        keep = np.isin(group[scene.ids[cam]], groups)
        scene.ids[cam], scene.keypoints[cam] = scene.ids[cam][keep], scene.keypoints[cam][keep]
    # The defaults keep two-view points (no keyframe-count rescue needed), but not those whose two
    # views are far apart: there a feature that no view between them matched is usually a mismatch.
    result = scene.run(TriangulationConfig())
    estimated, truth = scene.true_points_of(result)
    kept_groups = group[[int(np.flatnonzero(np.all(points == t, axis=1))[0]) for t in truth]]
    assert np.sum(kept_groups == 1) == 60 and np.sum(kept_groups == 0) == 100
    assert np.sum(kept_groups == 2) == 0 and result.stats["rejected_wide_two_view"] == 60
    np.testing.assert_allclose(estimated, truth, atol=1e-6)
    unlimited = scene.run(TriangulationConfig(max_two_view_angle_deg=0.0))
    assert len(unlimited.points3d) == 220 and unlimited.stats["rejected_wide_two_view"] == 0


def test_pairs_skip_views_that_look_apart_or_share_a_centre():
    poses = arc_cameras(n=4, spread_deg=30.0)
    turned = look_at(poses[0, :3, 3] + [0.0, 0.0, 0.0], poses[0, :3, 3] + [0.0, -5.0, 0.0])  # looks away
    same_place = poses[1].copy()
    all_poses = np.concatenate([poses, turned[None], same_place[None]])
    pairs = select_pairs(all_poses, TriangulationConfig(pairs_per_image=10, max_pair_axis_angle_deg=60.0))
    assert (0, 1) in pairs and (0, 3) in pairs
    assert all(4 not in pair for pair in pairs), "a camera looking away was paired"
    assert (1, 5) not in pairs, "two cameras at one centre were paired"
    nearest = select_pairs(poses, TriangulationConfig(pairs_per_image=1))
    assert (0, 3) not in nearest and (0, 1) in nearest


def test_epipolar_distance_of_true_and_false_correspondences():
    poses = arc_cameras(n=2)
    points = random_points(50, seed=11)
    uv_a, _ = project(points, poses[0])
    uv_b, _ = project(points, poses[1])
    F = fundamental_from_poses(K, poses[0], K, poses[1])
    assert np.max(symmetric_epipolar_distance(F, uv_a, uv_b)) < 1e-6
    assert np.median(symmetric_epipolar_distance(F, uv_a, uv_b[::-1])) > 5.0


def test_bad_input_raises_clear_errors():
    poses = arc_cameras(n=3)
    feats = [(np.zeros((4, 2)), np.zeros((4, 8)))] * 3
    Ks = np.repeat(K[None], 3, 0)
    with pytest.raises(TriangulationError, match="at least 2"):
        triangulate_map(feats[:1], Ks[:1], poses[:1], matcher=lambda a, b: np.zeros((0, 2)))
    with pytest.raises(TriangulationError, match="expected intrinsics"):
        triangulate_map(feats, Ks[:2], poses, matcher=lambda a, b: np.zeros((0, 2)))
    bad = poses.copy()
    bad[1, :3, :3] *= 2.0
    with pytest.raises(TriangulationError, match="orthonormal"):
        triangulate_map(feats, Ks, bad, matcher=lambda a, b: np.zeros((0, 2)))
    nan = poses.copy()
    nan[0, 0, 3] = np.nan
    with pytest.raises(TriangulationError, match="finite"):
        triangulate_map(feats, Ks, nan, matcher=lambda a, b: np.zeros((0, 2)))
    with pytest.raises(TriangulationError, match="keypoints"):
        triangulate_map([(np.zeros((4, 3)), np.zeros((4, 8)))] * 3, Ks, poses, matcher=lambda a, b: np.zeros((0, 2)))
    with pytest.raises(ValueError, match="min_track_length"):
        TriangulationConfig(min_track_length=1)
    with pytest.raises(ValueError, match="max_reproj_px"):
        TriangulationConfig(max_reproj_px=float("nan"))
    with pytest.raises(ConfigError, match=r"triangulation config: unknown key 'min_angle' \(did you mean 'min_angle_deg'\?\)"):
        TriangulationConfig.from_dict({"min_angle": 2.0})
    # No matches at all is not an error: an empty map that says so in its stats.
    empty = triangulate_map(feats, Ks, poses, matcher=lambda a, b: np.zeros((0, 2)))
    assert len(empty.points3d) == 0 and empty.stats["points"] == 0


def test_default_matcher_matches_descriptors_of_the_same_world_point():
    """The real matcher (features.match_features: ratio + mutual) on SIFT-like uint8 descriptors."""
    from ros2_posenet.geometric.features import FeatureConfig

    rng = np.random.default_rng(12)
    scene = Scene(random_points(300, seed=13), arc_cameras(n=4), noise_px=0.3, seed=14)
    signatures = rng.integers(0, 200, (len(scene.points), 128))
    features = [
        (kp, np.clip(signatures[ids] + rng.integers(0, 8, (len(ids), 128)), 0, 255).astype(np.uint8))
        for kp, ids in zip(scene.keypoints, scene.ids)
    ]
    result = triangulate_map(features, np.repeat(K[None], 4, 0), scene.poses,
                             TriangulationConfig(min_points_per_keyframe=0), FeatureConfig(type="sift"))
    estimated, truth = scene.true_points_of(result)
    assert len(estimated) > 250
    assert np.max(np.linalg.norm(estimated - truth, axis=1)) < 0.05


def sift_like_features(scene: Scene, rng, twins: bool = True, undetected: dict | None = None):
    """SIFT-like descriptors; with ``twins`` every world point has a twin with the same look
    (repeated texture: points 2k and 2k+1 share a signature), so no match passes a ratio test
    over the whole image. ``undetected``: per camera, world points whose feature it does not detect."""
    look = (lambda ids: ids // 2) if twins else (lambda ids: ids)
    signatures = rng.integers(0, 200, (len(scene.points), 128))
    features = []
    for cam, (kp, ids) in enumerate(zip(scene.keypoints, scene.ids)):
        if undetected and cam in undetected:
            seen = ~np.isin(ids, undetected[cam])
            scene.keypoints[cam], scene.ids[cam] = kp[seen], ids[seen]
            kp, ids = kp[seen], ids[seen]
        desc = np.clip(signatures[look(ids)] + rng.integers(0, 8, (len(ids), 128)), 0, 255).astype(np.uint8)
        features.append((kp, desc))
    return features


def test_guided_matching_resolves_repeated_texture_along_the_epipolar_lines():
    """Twins look alike but lie apart in the image: matching among the features near each
    epipolar line (the default) finds them, matching over the whole image cannot."""
    from ros2_posenet.geometric.features import FeatureConfig

    scene = Scene(random_points(300, seed=20), arc_cameras(n=4), noise_px=0.3, seed=21)
    features = sift_like_features(scene, np.random.default_rng(22))
    Ks, sift = np.repeat(K[None], 4, 0), FeatureConfig(type="sift")
    plain = triangulate_map(features, Ks, scene.poses, TriangulationConfig(guided_matching=False), sift)
    guided = triangulate_map(features, Ks, scene.poses, TriangulationConfig(), sift)
    assert TriangulationConfig().guided_matching
    assert len(plain.points3d) < 30
    estimated, truth = scene.true_points_of(guided)  # asserts no point mixes twins
    assert len(estimated) > 250
    assert np.max(np.linalg.norm(estimated - truth, axis=1)) < 0.05


def test_guided_matching_leaves_a_feature_without_its_counterpart_unmatched():
    """A feature whose true match was not detected must not take the least bad (often the only)
    candidate near its epipolar line: two views could not expose such a point."""
    from ros2_posenet.geometric.features import FeatureConfig

    scene = Scene(random_points(300, seed=23), arc_cameras(n=2, spread_deg=20.0), noise_px=0.3, seed=24)
    # A third of the points is detected only in camera 0, a third only in camera 1.
    undetected = {0: np.arange(200, 300), 1: np.arange(100, 200)}
    (kp_a, desc_a), (kp_b, desc_b) = sift_like_features(scene, np.random.default_rng(25), False, undetected)
    F = fundamental_from_poses(K, scene.poses[0], K, scene.poses[1])
    matches = epipolar_guided_matches(desc_a, desc_b, kp_a, kp_b, F, FeatureConfig(type="sift"), 2.0)
    ids_a, ids_b = scene.ids[0][matches[:, 0]], scene.ids[1][matches[:, 1]]
    assert np.all(ids_a == ids_b), f"{np.sum(ids_a != ids_b)} wrong matches"
    shared = np.intersect1d(scene.ids[0], scene.ids[1])
    assert len(matches) > 0.8 * len(shared)


def test_epipolar_distance_matrix_agrees_with_the_pairwise_distance():
    rng = np.random.default_rng(26)
    poses = arc_cameras(n=2)
    F = fundamental_from_poses(K, poses[0], K, poses[1])
    x_a, x_b = rng.uniform(0, 480, (7, 2)), rng.uniform(0, 480, (5, 2))
    matrix = epipolar_distance_matrix(F, x_a, x_b)
    ia, ib = np.meshgrid(np.arange(7), np.arange(5), indexing="ij")
    np.testing.assert_allclose(matrix, symmetric_epipolar_distance(F, x_a[ia.ravel()], x_b[ib.ravel()]).reshape(7, 5),
                               rtol=1e-4, atol=1e-3)


def test_a_pair_without_parallax_is_not_used():
    # Camera 1 stands 1 cm beside camera 0 (rays meet at ≈ 0.15°): its matches carry no
    # depth and its epipolar check is nearly void, so the pair is skipped; the others are used.
    poses = arc_cameras(n=3)
    twin = poses[0].copy()
    twin[:3, 3] += 0.01 * twin[:3, 0]
    scene = Scene(random_points(200, seed=15), np.concatenate([poses, twin[None]]), noise_px=0.0)
    result = scene.run(TriangulationConfig(min_pair_angle_deg=1.0, min_points_per_keyframe=0))
    assert result.stats["pairs_low_parallax"] == 1
    assert (0, 3) in [tuple(p) for p in result.pairs]
    assert len(result.points3d) > 150
    loose = scene.run(TriangulationConfig(min_pair_angle_deg=0.0, min_points_per_keyframe=0))
    assert loose.stats["pairs_low_parallax"] == 0


def test_range_uncertainty_matches_stereo_theory_and_filters_points():
    # A parallel stereo pair, baseline b = 0.2 m, f = 500 px, points 4 m ahead near the axis:
    # disparity d = f b / Z, so 1 px on each image (√2 px on d) moves Z by Z² √2 / (f b): 5.7 %.
    left = np.eye(4)
    left[:3, :3] = look_at(np.zeros(3), np.array([0.0, 1.0, 0.0]))[:3, :3]
    right = left.copy()
    right[:3, 3] = 0.2 * left[:3, 0]
    rng = np.random.default_rng(16)
    points = np.column_stack([rng.uniform(-0.1, 0.3, 60), np.full(60, 4.0), rng.uniform(-0.2, 0.2, 60)])
    scene = Scene(points, np.stack([left, right]), noise_px=0.0)
    loose = TriangulationConfig(min_track_length=2, min_points_per_keyframe=0, min_angle_deg=0.0,
                                max_range_uncertainty=0.0)
    result = scene.run(loose)
    assert len(result.points3d) == 60
    np.testing.assert_allclose(result.range_uncertainty, 4.0 * np.sqrt(2) / (500 * 0.2), rtol=0.03)
    strict = scene.run(TriangulationConfig(min_track_length=2, min_points_per_keyframe=0, min_angle_deg=0.0,
                                           max_range_uncertainty=0.05))
    assert len(strict.points3d) == 0 and strict.stats["rejected_range_uncertainty"] == 60


def test_build_map_triangulates_a_rendered_scene_where_depth_says(tmp_path):
    """Real SIFT on rendered views, ``build-map --points triangulation`` (the depth is not
    used): the triangulated points agree with the renderer's depth at their keypoints."""
    from ros2_posenet.data import build_dataset
    from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene
    from ros2_posenet.geometric.scene_map import SceneMap, depth_lift
    from ros2_posenet.geometric.map_builder import read_depth_m
    from ros2_posenet.tools import build_map

    root = tmp_path / "scene"
    generate_scene(root, SyntheticSceneConfig(width=320, height=240, frames_train=24, frames_test=2,
                                              train_sequences=2, num_points=0))
    out = tmp_path / "map.npz"
    assert build_map.main(["--dataset", "7scenes", "--root", str(root), "--out", str(out), "--points",
                           "triangulation", "--min-distance", "0.1", "--calibrate", "0", "--quiet"]) == 0
    scene_map = SceneMap.load(out)
    assert scene_map.point_source == "triangulation"
    # A depth-free map starts from more, weaker features than a depth map (its default).
    assert scene_map.feature_config.max_features == 4000 and scene_map.feature_config.contrast_threshold == 0.005
    assert set(scene_map.point_info) >= {"track_length", "angle_deg", "range_uncertainty", "reproj_error_px"}
    dataset = build_dataset("7scenes", root, "train", max_points=0)
    index = {record.name: i for i, record in enumerate(dataset.samples)}
    relative = []
    for k, name in enumerate(scene_map.names):
        i = index[name]
        lift = depth_lift(read_depth_m(dataset, i), scene_map.intrinsics[k], scene_map.poses[k])
        truth, valid = lift(scene_map.keypoints[k], tuple(scene_map.image_sizes[k]))
        distance = np.linalg.norm(truth - scene_map.poses[k][:3, 3], axis=1)
        relative.append((np.linalg.norm(truth - scene_map.points3d[k], axis=1) / distance)[valid])
    relative = np.concatenate(relative)
    assert len(relative) > 500
    assert np.median(relative) < 0.01 and np.percentile(relative, 90) < 0.04
    check_views_of_a_triangulated_map(scene_map, root, dataset, index)


def check_views_of_a_triangulated_map(scene_map, root, dataset, index):
    """A triangulated map's keyframe views know the depth around their points only, where the renderer says; and
    a test frame of another pass agrees with them at its pose, not half a metre or 30° off it."""
    import cv2

    from ros2_posenet.data import build_dataset
    from ros2_posenet.geometric.map_builder import pose_matrix, read_depth_m
    from ros2_posenet.geometric.views import QueryView, view_agreement

    assert scene_map.has_views
    known = scene_map.view_depth > 0
    assert 0.2 < known.mean() < 0.9  # patches around the points, not the whole view
    h, w = scene_map.view_grey.shape[1:]
    relative = []
    for k, name in enumerate(scene_map.names):
        truth = cv2.resize(read_depth_m(dataset, index[name]), (w, h), interpolation=cv2.INTER_NEAREST)
        ok = known[k] & (truth > 0)
        relative.append(np.abs(scene_map.view_depth[k][ok].astype(float) - truth[ok]) / truth[ok])
    assert np.median(np.concatenate(relative)) < 0.03

    test = build_dataset("7scenes", root, "test", max_points=0)
    for i in range(len(test)):
        image, K, T = test.load_image(i), test.intrinsics(i), pose_matrix(test, i)
        query = QueryView.of(image, K)

        def agreement(pose):
            scores = [view_agreement(query, pose, scene_map.view_grey[k], scene_map.view_depth[k],
                                     scene_map.view_intrinsics(k), scene_map.poses[k])
                      for k in scene_map.nearest_keyframes(T, 3)]
            return np.nanmax(scores)

        moved, turned = T.copy(), T.copy()
        moved[:3, 3] += [0.0, 0.0, 0.5]
        turned[:3, :3] = T[:3, :3] @ cv2.Rodrigues(np.array([0.0, np.radians(30.0), 0.0]))[0]
        assert agreement(T) > 0.9
        assert agreement(moved) < 0.6 and agreement(turned) < 0.6


def test_build_map_takes_triangulation_settings_and_refuses_bad_ones(tmp_path, capsys):
    from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene
    from ros2_posenet.geometric.scene_map import SceneMap
    from ros2_posenet.tools import build_map

    root = tmp_path / "scene"
    generate_scene(root, SyntheticSceneConfig(width=320, height=240, frames_train=12, frames_test=1, num_points=0))
    out = tmp_path / "map.npz"
    common = ["--dataset", "7scenes", "--root", str(root), "--out", str(out), "--calibrate", "0", "--quiet"]
    assert build_map.main(common + ["--points", "triangulation", "--triangulation", "min_track_length=3",
                                    "min_points_per_keyframe=0"]) == 0
    scene_map = SceneMap.load(out)
    assert scene_map.metadata["triangulation"]["config"]["min_track_length"] == 3
    assert scene_map.num_points > 0 and np.concatenate(scene_map.point_info["track_length"]).min() >= 3
    out.unlink()
    assert build_map.main(common + ["--points", "triangulation", "--triangulation", "min_track=3"]) == 2
    assert "unknown key 'min_track'" in capsys.readouterr().err and not out.exists()
    assert build_map.main(common + ["--points", "depth", "--triangulation", "min_track_length=3"]) == 2
    assert "--triangulation applies to --points triangulation" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not KEY=VALUE
        build_map.main(common + ["--points", "triangulation", "--triangulation", "min_track_length"])


def test_map_features_default_per_point_source_and_given_settings_win():
    from ros2_posenet.geometric.features import FeatureConfig
    from ros2_posenet.geometric.map_builder import TRIANGULATION_FEATURES, map_feature_config

    assert map_feature_config("depth", max_features=None) == FeatureConfig(max_features=2000)
    assert map_feature_config("reconstruction", max_features=None) == FeatureConfig()
    triangulated = map_feature_config("triangulation", max_features=None, contrast_threshold=None)
    assert triangulated == FeatureConfig(**TRIANGULATION_FEATURES) and triangulated.max_features > FeatureConfig().max_features
    assert map_feature_config("triangulation", max_features=1500).max_features == 1500
    assert map_feature_config("depth", contrast_threshold=0.01).contrast_threshold == 0.01
    with pytest.raises(ValueError, match="max_features"):
        map_feature_config("triangulation", max_features=3)
