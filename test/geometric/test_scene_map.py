"""Scene map: keyframe selection, lifting keypoints to 3D, agreement filter, file round trip and errors, build-map."""
import dataclasses
import json
import zipfile

import numpy as np
import pytest

from helpers import tiny_scene
from ros2_posenet.geometric.features import FeatureConfig
from ros2_posenet.geometric.scene_map import (
    FORMAT, MapError, SceneMap, SceneMapBuilder, depth_lift, filter_by_agreement, observation_lift, select_keyframes,
)
from ros2_posenet.tools import build_map

K = np.array([[200.0, 0, 79.5], [0, 200.0, 59.5], [0, 0, 1]])


def pose(x=0.0, y=0.0, z=0.0, yaw_deg=0.0):
    """Camera-to-world pose looking along world +x rotated by yaw about world z (z up)."""
    c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    T = np.eye(4)
    T[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    T[:3, 3] = [x, y, z]
    return T


def random_map(rng, keyframes=3, features=40, info=True) -> SceneMap:
    builder = SceneMapBuilder(FeatureConfig(), "depth", map_frame="room")
    for i in range(keyframes):
        n = features + i  # different sizes per keyframe
        builder.add_keyframe(
            f"seq-01/frame-{i:06d}.color.png", K, pose(x=0.5 * i, yaw_deg=10 * i), (160, 120),
            rng.uniform(0, 150, (n, 2)), rng.integers(0, 256, (n, 128)), rng.normal(size=(n, 3)),
            point_info={"track_length": rng.integers(1, 5, n)} if info else None,
            global_descriptor=rng.normal(size=768),
        )
    return builder.build({"dataset": "7scenes", "calibration": {"covariance_scale": 0.7}})


def test_select_keyframes_by_spacing():
    line = np.stack([pose(x=0.1 * i) for i in range(10)])  # 0.1 m apart, same direction
    np.testing.assert_array_equal(select_keyframes(line, 0.25, 15), [0, 3, 6, 9])
    turning = np.stack([pose(yaw_deg=20 * i) for i in range(5)])  # standing still, turning 20° at a time
    np.testing.assert_array_equal(select_keyframes(turning, 0.25, 15), np.arange(5))
    loop = np.concatenate([line, line[::-1]])  # driving back over the same place adds nothing
    np.testing.assert_array_equal(select_keyframes(loop, 0.25, 15), [0, 3, 6, 9])


def test_depth_lift_back_projects_and_drops_depth_edges():
    T = pose(x=1.0, y=2.0, z=0.5, yaw_deg=30)
    depth = np.full((120, 160), 2.0, np.float32)
    depth[:, 100:] = 4.0  # a step: the background starts at column 100
    depth[:10, :10] = 0.0  # invalid
    keypoints = np.array([[40.3, 60.7], [130.0, 30.0], [99.6, 50.0], [3.0, 3.0]])
    points, valid = depth_lift(depth, K, T)(keypoints, (160, 120))
    np.testing.assert_array_equal(valid, [True, True, False, False])  # on the edge; no depth
    cam = (points[:2] - T[:3, 3]) @ T[:3, :3]  # back into the camera frame
    np.testing.assert_allclose(cam[:, 2], [2.0, 4.0], atol=1e-6)
    np.testing.assert_allclose(cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2], keypoints[:2], atol=1e-6)
    # A half-size depth image is looked up at the scaled keypoint.
    half, valid_half = depth_lift(depth[::2, ::2], K, T)(keypoints[:2], (160, 120))
    np.testing.assert_allclose(half, points[:2], atol=1e-6)


def test_observation_lift_takes_the_nearest_measurement_within_radius():
    obs_xy = np.array([[10.0, 10.0], [50.0, 50.0]])
    obs_xyz = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    points, valid = observation_lift(obs_xy, obs_xyz, radius_px=2.0)(np.array([[11.0, 10.5], [50.0, 53.0]]), (160, 120))
    np.testing.assert_array_equal(valid, [True, False])
    np.testing.assert_allclose(points[0], [1.0, 2.0, 3.0])


def test_map_file_round_trip(tmp_path):
    scene_map = random_map(np.random.default_rng(0))
    path = scene_map.save(tmp_path / "maps" / "scene.npz")
    loaded = SceneMap.load(path)
    assert loaded.names == scene_map.names and loaded.map_frame == "room" and loaded.point_source == "depth"
    assert loaded.feature_config == scene_map.feature_config and loaded.metadata == scene_map.metadata
    for name in ("poses", "intrinsics", "image_sizes", "global_descriptors"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(scene_map, name))
    for name in ("keypoints", "descriptors", "points3d"):
        for a, b in zip(getattr(loaded, name), getattr(scene_map, name)):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.point_info["track_length"], scene_map.point_info["track_length"]):
        np.testing.assert_array_equal(a, b)
    assert loaded.num_points == 40 + 41 + 42
    assert not list(tmp_path.glob("maps/*.tmp*"))  # written atomically
    with pytest.raises(ValueError, match=".npz"):
        scene_map.save(tmp_path / "scene.map")


def _rewrite(path, out, change):
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(out, **arrays)
    return out


def test_missing_corrupt_and_incompatible_maps_say_what_to_do(tmp_path):
    path = random_map(np.random.default_rng(1)).save(tmp_path / "good.npz")
    with pytest.raises(MapError, match="not found.*build-map"):
        SceneMap.load(tmp_path / "absent.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(MapError, match="not a readable map file.*build-map"):
        SceneMap.load(tmp_path / "garbage.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MapError, match="build-map"):
        SceneMap.load(truncated)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(MapError, match="not a ros2_posenet scene map"):
        SceneMap.load(other)

    def newer(arrays):
        header = json.loads(str(arrays["header"]))
        arrays["header"] = np.array(json.dumps({**header, "version": 99}))

    with pytest.raises(MapError, match="version 99.*update ros2_posenet or rebuild"):
        SceneMap.load(_rewrite(path, tmp_path / "newer.npz", newer))
    with pytest.raises(MapError, match="rows, the offsets say"):
        SceneMap.load(_rewrite(path, tmp_path / "short.npz", lambda a: a.update(points3d=a["points3d"][:-5])))

    def nan_point(arrays):
        arrays["points3d"][3] = np.nan

    with pytest.raises(MapError, match="non-finite"):
        SceneMap.load(_rewrite(path, tmp_path / "nan.npz", nan_point))
    with zipfile.ZipFile(path) as z:
        assert "header.npy" in z.namelist()  # plain arrays: nothing is unpickled
    with np.load(path, allow_pickle=False) as data:
        assert json.loads(str(data["header"]))["format"] == FORMAT


def test_agreement_filter_keeps_points_other_keyframes_confirm():
    rng = np.random.default_rng(2)
    n = 60
    descriptors = rng.integers(0, 256, (n, 128)).astype(np.uint8)
    points = rng.uniform(-1, 1, (n, 3)) + [3.0, 0, 1]
    moved = points.copy()
    moved[n // 2:] += 0.3  # the second keyframe puts half of the points elsewhere (a misregistered depth edge)
    moved[: n // 2] += 0.005  # and the rest a few millimetres off
    builder = SceneMapBuilder(FeatureConfig(), "depth")
    for T, pts in ((pose(), points), (pose(x=0.2), moved)):
        builder.add_keyframe("kf", K, T, (160, 120), rng.uniform(0, 150, (n, 2)), descriptors, pts)
    filtered = filter_by_agreement(builder.build(), neighbours=1, min_views=2, tolerance_m=0.02)
    assert [len(p) for p in filtered.points3d] == [n // 2, n // 2]
    np.testing.assert_allclose(filtered.points3d[0], points[: n // 2] + 0.0025, atol=1e-5)  # averaged over both views
    np.testing.assert_array_equal(filtered.point_info["track_length"][0], 2)
    assert filtered.metadata["agreement_filter"]["points_before"] == 2 * n


def test_inconsistent_map_is_rejected():
    rng = np.random.default_rng(3)
    with pytest.raises(MapError, match="descriptors has shape"):
        SceneMap(names=["a"], poses=pose()[None], intrinsics=K[None], image_sizes=[[160, 120]],
                 keypoints=[np.zeros((3, 2))], descriptors=[np.zeros((3, 32), np.uint8)], points3d=[np.zeros((3, 3))],
                 point_source="depth", feature_config=FeatureConfig())
    with pytest.raises(MapError, match="point_source"):
        dataclasses.replace(random_map(rng), point_source="lidar")
    with pytest.raises(MapError, match="no keyframes"):
        SceneMapBuilder().build()


def test_nearest_keyframes_by_position_and_direction():
    scene_map = random_map(np.random.default_rng(4), keyframes=3)  # x = 0, 0.5, 1.0; yaw 0, 10, 20
    np.testing.assert_array_equal(scene_map.nearest_keyframes(pose(x=0.9, yaw_deg=20), 2), [2, 1])
    np.testing.assert_array_equal(scene_map.nearest_keyframes(pose(x=1.0, yaw_deg=180), 2, max_angle_deg=60), [])


def test_build_map_cli_on_a_tiny_scene(tmp_path_factory, tmp_path, capsys):
    root = tiny_scene(tmp_path_factory, "map_scene")
    out = tmp_path / "tiny.npz"
    assert build_map.main(["--dataset", "7scenes", "--root", str(root), "--out", str(out), "--quiet",
                           "--min-distance", "0.1", "--calibrate", "3"]) == 0
    printed = capsys.readouterr().out
    assert "keyframes" in printed and "MB" in printed
    scene_map = SceneMap.load(out)
    assert scene_map.point_source == "depth" and len(scene_map) >= 4 and scene_map.num_points > 100
    assert scene_map.metadata["calibration"]["frames"] <= 3 and "build_seconds" in scene_map.metadata
    # Every stored point reprojects onto its keypoint in its keyframe (depth points are exact here).
    for i in range(len(scene_map)):
        T, Kf = scene_map.poses[i], scene_map.intrinsics[i]
        cam = (scene_map.points3d[i] - T[:3, 3]) @ T[:3, :3]
        uv = cam[:, :2] / cam[:, 2:] @ Kf[:2, :2].T + Kf[:2, 2]
        assert np.median(np.linalg.norm(uv - scene_map.keypoints[i], axis=1)) < 0.05

    assert build_map.main(["--dataset", "7scenes", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "build-map: error" in capsys.readouterr().err
    assert build_map.main(["--dataset", "7scenes", "--root", str(root), "--out", str(tmp_path / "x.map")]) == 2
