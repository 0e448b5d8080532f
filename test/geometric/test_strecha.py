"""Posed photographs without depth: the Strecha-format reader, and on the real fountain
photographs (when ``../shared/data/strecha-fountain-P11`` exists) a triangulated map that
relocalises held-out views from perturbed priors and refuses a prior 5 m off.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ros2_posenet.data import DatasetError, PosedImageSet, build_dataset, read_strecha_camera
from ros2_posenet.geometry import pose_to_matrix

STRECHA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "strecha-fountain-P11"

CAMERA_TEXT = """2759.48 0 1520.69
0 2764.16 1006.81
0 0 1
0 0 0
0.450927 -0.0945642 -0.887537
-0.892535 -0.0401974 -0.449183
0.00679989 0.994707 -0.102528
-7.28137 -7.57667 0.204446
3072 2048
"""


def write_set(root: Path, n: int = 2, size: tuple[int, int] = (64, 48)) -> Path:
    import cv2

    (root / "images").mkdir(parents=True)
    (root / "gt_dense_cameras").mkdir()
    for i in range(n):
        image = np.full((size[1], size[0], 3), 40 * i, np.uint8)
        image[:, : size[0] // 2, 0] = 255  # left half red in RGB
        cv2.imwrite(str(root / "images" / f"{i:04d}.png"), image[..., ::-1])
        text = CAMERA_TEXT.replace("3072 2048", f"{size[0]} {size[1]}").replace("-7.28137", str(-7.0 - i))
        (root / "gt_dense_cameras" / f"{i:04d}.png.camera").write_text(text)
    return root


def test_camera_file_is_read_as_camera_to_world(tmp_path):
    path = tmp_path / "c.camera"
    path.write_text(CAMERA_TEXT)
    K, pose, size = read_strecha_camera(path)
    assert size == (3072, 2048)
    np.testing.assert_allclose(K[0], [2759.48, 0, 1520.69])
    np.testing.assert_allclose(pose[:3, 3], [-7.28137, -7.57667, 0.204446])
    R = np.array([[0.450927, -0.0945642, -0.887537],
                  [-0.892535, -0.0401974, -0.449183],
                  [0.00679989, 0.994707, -0.102528]])
    np.testing.assert_allclose(pose[:3, :3], R, atol=1e-5)
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)  # exact rotation
    # A point 5 m along the camera's optical axis projects to the principal point.
    X = pose[:3, 3] + 5.0 * pose[:3, 2]
    x = K @ (pose[:3, :3].T @ (X - pose[:3, 3]))
    np.testing.assert_allclose(x[:2] / x[2], K[:2, 2], atol=1e-9)


@pytest.mark.parametrize(
    "edit, message, line",
    [
        (lambda t: t.replace("0 0 0\n", "0.1 0 0\n"), "distortion", 4),
        (lambda t: t.replace("0.450927", "0.9"), "not a rotation", 5),
        (lambda t: t.replace("3072 2048", "3072 -5"), "image size", 9),
        (lambda t: t.replace("2759.48", "abc"), "expected numbers", 1),
        (lambda t: t.replace("2759.48", "nan"), "non-finite", 1),
        (lambda t: t.replace("-7.28137 -7.57667 0.204446", "-7.28137 -7.57667"), "expected 3 numbers", 8),
        (lambda t: "\n".join(t.splitlines()[:8]), "expected 9", None),
    ],
)
def test_malformed_camera_files_name_file_and_line(tmp_path, edit, message, line):
    path = tmp_path / "bad.camera"
    path.write_text(edit(CAMERA_TEXT))
    with pytest.raises(DatasetError, match=message) as err:
        read_strecha_camera(path)
    assert err.value.path == path and err.value.line == line


def test_posed_image_set_loads_scaled_images_with_matching_intrinsics(tmp_path):
    images = PosedImageSet(write_set(tmp_path / "set", n=3))
    assert len(images) == 3 and images.names == ["0000.png", "0001.png", "0002.png"]
    assert images.poses().shape == (3, 4, 4) and images.poses()[1, 0, 3] == -8.0
    rgb, K = images.load(0)
    assert rgb.shape == (48, 64, 3) and rgb[0, 0, 0] == 255 and rgb[0, -1, 0] == 0  # RGB order
    half, K_half = images.load(0, 0.5)
    assert half.shape == (24, 32, 3)
    np.testing.assert_allclose(K_half, images.intrinsics_at(0.5)[0])
    np.testing.assert_allclose(K_half[0, 0], K[0, 0] / 2)
    np.testing.assert_allclose(K_half[0, 2], (K[0, 2] + 0.5) / 2 - 0.5)  # pixel-centre convention
    with pytest.raises(ValueError, match="scale"):
        images.load(0, 1.5)


def test_posed_image_set_is_a_pose_dataset_with_splits(tmp_path):
    root = write_set(tmp_path / "set", n=4)
    train = build_dataset("posed", root, "train", held_out=["0001.png"])
    test = build_dataset("strecha", root, "test", held_out=["0001.png"])
    assert train.names == ["0000.png", "0002.png", "0003.png"] and test.names == ["0001.png"]
    # The dataset's pose record and the camera file's matrix are the same pose.
    record = test.samples[0]
    np.testing.assert_allclose(pose_to_matrix(record.position, record.rotation), test.poses()[0], atol=1e-9)
    np.testing.assert_allclose(test.intrinsics(0), test.images[0].K)
    item = test[0]  # the training item contract: no depth, so no points
    assert item["points"].shape == (0, 3) and item["image"].shape[0] == 3
    # Without held_out, test.txt names the test split; without either, test is an error that says how.
    assert len(build_dataset("posed", root, "train")) == 4
    with pytest.raises(DatasetError, match="test.txt"):
        build_dataset("posed", root, "test")
    (root / "test.txt").write_text("0003.png\n0000.png\n")
    assert build_dataset("posed", root, "test").names == ["0000.png", "0003.png"]
    with pytest.raises(DatasetError, match="not in images"):
        build_dataset("posed", root, "test", held_out=["9999.png"])


def test_posed_image_set_errors(tmp_path):
    with pytest.raises(DatasetError, match="folder not found"):
        PosedImageSet(tmp_path / "nothing")
    root = write_set(tmp_path / "missing_camera")
    (root / "gt_dense_cameras" / "0001.png.camera").unlink()
    with pytest.raises(DatasetError, match="camera file not found"):
        PosedImageSet(root)
    root = write_set(tmp_path / "wrong_size")
    camera = root / "gt_dense_cameras" / "0000.png.camera"
    camera.write_text(camera.read_text().replace("64 48", "640 480"))
    with pytest.raises(DatasetError, match="camera file says"):
        PosedImageSet(root).load(0)


# ----------------------------------------------------------------------------- the real photographs

HELD_OUT = ["0002.jpg", "0005.jpg", "0008.jpg"]  # each between two map views


@pytest.fixture(scope="module")
def fountain():
    """(map images, held-out images, triangulated map at 1/4 scale) of the real fountain set."""
    if not STRECHA.is_dir():
        pytest.skip(f"real posed photographs not found at {STRECHA} (the Strecha fountain-P11 set in "
                    "../shared/data beside the project; see its README)")
    from ros2_posenet.geometric.features import FeatureConfig
    from ros2_posenet.geometric.map_builder import build_scene_map

    train = build_dataset("posed", STRECHA, "train", held_out=HELD_OUT)
    test = build_dataset("posed", STRECHA, "test", held_out=HELD_OUT)
    # 1/4 scale (768x512 detection) and 1500 features keep this test to seconds; K stays full-size.
    config = FeatureConfig(max_features=1500, max_image_size=768)
    scene_map = build_scene_map(train, np.arange(len(train)), config, "triangulation")
    return train, test, scene_map


def test_fountain_map_is_triangulated_and_records_how(fountain, tmp_path):
    train, _, scene_map = fountain
    assert scene_map.point_source == "triangulation" and len(scene_map) == 8
    assert "DLT" in scene_map.metadata["triangulation"]["method"]
    stats = scene_map.metadata["triangulation"]["stats"]
    assert stats["points"] >= 500 and stats["points_multi_view"] >= 0.5 * stats["points"]
    tracks = np.concatenate(scene_map.point_info["track_length"])
    reproj = np.concatenate(scene_map.point_info["reproj_error_px"])
    assert np.all(tracks >= 2) and np.median(tracks) >= 3
    assert np.all(reproj <= 2.0)
    # The points reproject into the *other* map views they were matched in: every keyframe
    # observation of a point is within 2 px of it (the triangulation's filter, checked here).
    for i in range(len(scene_map)):
        T, K = scene_map.poses[i], scene_map.intrinsics[i]
        Xc = (scene_map.points3d[i].astype(np.float64) - T[:3, 3]) @ T[:3, :3]
        assert np.all(Xc[:, 2] > 0)
        uv = Xc @ K.T
        assert np.max(np.linalg.norm(uv[:, :2] / uv[:, 2:] - scene_map.keypoints[i], axis=1)) < 2.5
    # Round trip through the map file keeps the per-point records.
    from ros2_posenet.geometric.scene_map import SceneMap

    loaded = SceneMap.load(scene_map.save(tmp_path / "fountain.npz"))
    np.testing.assert_array_equal(np.concatenate(loaded.point_info["track_length"]), tracks)


def test_fountain_held_out_views_are_relocalised_and_a_far_prior_falls_back(fountain):
    from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, perturb_pose, pose_difference

    _, test, scene_map = fountain
    refiner = Refiner(scene_map, RefinementConfig())
    rng = np.random.default_rng(0)
    for i in range(len(test)):
        rgb, K = test.load(i)
        T_true = test.poses()[i]
        result = refiner.refine(rgb, K, perturb_pose(T_true, 0.75, 10.0, rng), None)
        delta = pose_difference(result.T, T_true)
        assert result.status == "refined", f"{test.names[i]}: {result.reason}"
        assert np.linalg.norm(delta[:3]) < 0.05, f"{test.names[i]}: {np.linalg.norm(delta[:3]):.3f} m"
        assert np.degrees(np.linalg.norm(delta[3:])) < 0.5
        assert result.inliers >= 100
    far_prior = perturb_pose(T_true, 5.0, 10.0, rng)
    # The prior's own keyframes: the gate refuses a 5 m correction, falls back and says so.
    gate_only = RefinementConfig(neighbourhood_confirms=False, retrieval_confirms=False)
    gated = Refiner(scene_map, gate_only).refine(rgb, K, far_prior, None)
    assert gated.status == "fallback" and "disagrees with the prior by 5.00 m" in gated.reason
    np.testing.assert_array_equal(gated.T, far_prior)
    # By default, keyframes that did not make the pose (around it, or found by appearance) may confirm it:
    # then it is right, and says the prior was 5 m off.
    far = refiner.refine(rgb, K, far_prior, None)
    if far.status == "refined":
        assert far.source in ("neighbourhood", "retrieval") and "5.00 m" in far.reason
        assert np.linalg.norm(pose_difference(far.T, T_true)[:3]) < 0.05
    else:
        assert "disagrees with the prior by 5.00 m" in far.reason
