"""A Kinect-style rig (7-Scenes' official layout): the camera model the loader reads it with.

The synthetic generator renders a Kinect v1 as 7-Scenes recorded it (``rig="kinect"``): colour
images from the colour camera, depth from the depth sensor 2.6 cm beside it with its own
intrinsics, pose files of the depth sensor, no ``intrinsics.txt``. The renderer's colour
poses are the truth the ``rgb`` and ``pgt`` readings must give back.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import transforms3d.quaternions as t3q

from helpers import project_np
from ros2_posenet.data import DatasetError, SevenScenes, build_dataset
from ros2_posenet.data.seven_scenes import DEPTH_INVALID, KINECT_DEPTH_TO_COLOUR
from ros2_posenet.data.synthetic import SyntheticScene, SyntheticSceneConfig, generate_scene, scene_trajectories
from ros2_posenet.geometric.features import FeatureConfig
from ros2_posenet.geometric.map_builder import build_scene_map, pose_matrix, read_depth_m
from ros2_posenet.geometric.refiner import Refiner, perturb_pose, pose_difference
from ros2_posenet.geometry import invert_matrix

# 4 m: the far half of the room is beyond the sensor's range and written 65535, as a Kinect does.
SMALL_RIG = SyntheticSceneConfig(width=160, height=120, frames_train=8, frames_test=4, train_sequences=1, num_points=0,
                                 formats=("7scenes",), rig="kinect", depth_range_m=4.0)
MAP_RIG = SyntheticSceneConfig(width=320, height=240, frames_train=48, frames_test=8, train_sequences=1, num_points=0,
                               formats=("7scenes",), rig="kinect")


def true_colour_poses(config: SyntheticSceneConfig) -> dict[str, np.ndarray]:
    """``{"seq-01/frame-000000": T_world_colour}`` as rendered."""
    return {f"{folder}/frame-{i:06d}": T for folder, seq in scene_trajectories(config).items()
            for i, T in enumerate(seq["poses"])}


def frame_of(dataset, index: int) -> str:
    return dataset.samples[index].name.rsplit(".color.", 1)[0]


@pytest.fixture(scope="module")
def small_rig(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kinect_small") / "scene"
    generate_scene(root, SMALL_RIG)
    return root


def test_generator_writes_the_official_layout(small_rig):
    assert not (small_rig / "intrinsics.txt").exists()
    truth = true_colour_poses(SMALL_RIG)
    written = np.loadtxt(small_rig / "seq-01" / "frame-000003.pose.txt")
    np.testing.assert_allclose(written, truth["seq-01/frame-000003"] @ KINECT_DEPTH_TO_COLOUR, atol=1e-8)
    offset = np.linalg.norm(written[:3, 3] - truth["seq-01/frame-000003"][:3, 3])
    assert offset == pytest.approx(0.0256, abs=5e-4)  # the depth sensor beside the colour camera


@pytest.mark.parametrize("split", ["train", "test"])
def test_rgb_reading_gives_back_the_colour_cameras_poses(small_rig, split):
    truth = true_colour_poses(SMALL_RIG)
    rgb = SevenScenes(small_rig, split, max_points=0)  # camera: rgb is the default
    depth = SevenScenes(small_rig, split, max_points=0, camera="depth")
    for i in range(len(rgb)):
        np.testing.assert_allclose(pose_matrix(rgb, i), truth[frame_of(rgb, i)], atol=1e-7)
        np.testing.assert_allclose(pose_matrix(depth, i), truth[frame_of(depth, i)] @ KINECT_DEPTH_TO_COLOUR, atol=1e-7)
    np.testing.assert_allclose(rgb.intrinsics(0)[0], [525 / 4, 0, 320.5 / 4 - 0.5])


def surface_errors(points: np.ndarray, T_colour: np.ndarray, K: np.ndarray, scene: SyntheticScene) -> np.ndarray:
    """|depth of each point − depth the colour camera renders at its pixel| (metres)."""
    uv, z = project_np(points, T_colour[:3, 3], t3q.mat2quat(T_colour[:3, :3]), K)
    px = np.round(uv).astype(int)
    inside = (px[:, 0] >= 0) & (px[:, 0] < K[0, 2] * 2 + 1) & (px[:, 1] >= 0) & (px[:, 1] < K[1, 2] * 2 + 1)
    assert inside.mean() > 0.99
    _, rendered = scene.render(T_colour, K, SMALL_RIG.width, SMALL_RIG.height)
    return np.abs(rendered[px[inside, 1], px[inside, 0]] - z[inside])


def test_registered_depth_points_lie_where_the_colour_camera_sees_them(small_rig):
    """Reprojection-loss points of the ``rgb`` reading are on the surfaces at their colour pixels.

    Mutation caught: lifting the raw depth image with the colour intrinsics (no registration):
    the 525/585 focal mismatch moves points by ~10 % of their depth.
    """
    scene, truth = SyntheticScene(SMALL_RIG), true_colour_poses(SMALL_RIG)
    ds = SevenScenes(small_rig, "train", max_points=400)
    errors = np.concatenate([surface_errors(ds.visible_points(i, np.random.default_rng(i)), truth[frame_of(ds, i)],
                                            ds.intrinsics(i), scene) for i in range(len(ds))])
    assert len(errors) == 400 * len(ds)
    # Registration rounds to the nearest colour pixel: half a pixel (1 cm at 160x120) on slanted surfaces;
    # measured 6 mm / 2.4 cm here, 1.4 mm / 6 mm at 640x480, 23 cm / 43 cm without registration.
    assert np.median(errors) < 0.012 and np.percentile(errors, 90) < 0.04


def test_depth_images_are_registered_into_the_colour_image(small_rig):
    """``depth_metres`` (what depth maps are built from) equals the depth the colour camera renders.

    Mutation caught: returning the depth sensor's image as is (off by the 585/525 focal ratio and 2.6 cm).
    """
    scene, truth = SyntheticScene(SMALL_RIG), true_colour_poses(SMALL_RIG)
    ds, errors = SevenScenes(small_rig, "train", max_points=0), []
    for i in range(len(ds)):
        registered = ds.depth_metres(i)
        _, rendered = scene.render(truth[frame_of(ds, i)], ds.intrinsics(i), SMALL_RIG.width, SMALL_RIG.height)
        valid = registered > 0
        assert valid.sum() > 500  # much of the room is beyond the sensor's range
        errors.append(np.abs(registered[valid] - rendered[valid]))
    errors = np.concatenate(errors)
    # Measured 4.5 mm / 19 mm (rounding to colour pixels, as above); 96 mm / 373 mm unregistered.
    assert np.median(errors) < 0.012 and np.percentile(errors, 90) < 0.05


def test_invalid_depth_65535_never_becomes_a_point(small_rig):
    """Kinect writes 65535 where it measures nothing; it must not become a 65.5 m point.

    Mutation caught: dropping ``DEPTH_INVALID`` from ``depth_in_metres`` (65.535 m points
    enter the reprojection loss and the map).
    """
    raw = cv2.imread(str(small_rig / "seq-01" / "frame-000002.depth.png"), cv2.IMREAD_UNCHANGED)
    assert (raw == DEPTH_INVALID).mean() > 0.05  # the mask has work to do
    for camera in ("rgb", "depth"):
        ds = SevenScenes(small_rig, "train", max_points=10_000, camera=camera)
        for i in range(len(ds)):
            assert read_depth_m(ds, i).max() <= SMALL_RIG.depth_range_m + 0.05  # the colour camera sits 2.6 cm away
            points = ds.visible_points(i, np.random.default_rng(0))
            distance = np.linalg.norm(points - ds.samples[i].position, axis=1)
            assert len(points) > 100 and distance.max() < 1.5 * SMALL_RIG.depth_range_m


def write_pgt(path: Path, poses: dict[str, np.ndarray], focal: float) -> None:
    """A pose file in Brachmann et al.'s format (world-to-camera, COLMAP convention)."""
    lines = []
    for frame, T in poses.items():
        T_cw = invert_matrix(T)
        q, t = t3q.mat2quat(T_cw[:3, :3]), T_cw[:3, 3]
        lines.append(f"{frame}.color.png " + " ".join(f"{v:.9f}" for v in (*q, *t)) + f" {focal}")
    path.write_text("\n".join(lines) + "\n")


def test_pseudo_ground_truth_poses_and_focal(small_rig, tmp_path):
    truth = true_colour_poses(SMALL_RIG)
    for split in ("train", "test"):
        ds = SevenScenes(small_rig, split, max_points=0)
        write_pgt(tmp_path / f"scene_{split}.txt", {frame_of(ds, i): truth[frame_of(ds, i)] for i in range(len(ds))}, 526.22)
    pgt = build_dataset("7scenes", small_rig, "test", max_points=50, camera="pgt", pose_file=tmp_path / "scene_{split}.txt")
    assert len(pgt) == SMALL_RIG.frames_test
    for i in range(len(pgt)):
        np.testing.assert_allclose(pose_matrix(pgt, i), truth[frame_of(pgt, i)], atol=1e-6)
    np.testing.assert_allclose(pgt.intrinsics(0)[:2, :2], np.diag([526.22 / 4] * 2))
    assert pgt.visible_points(0, np.random.default_rng(0)).shape == (50, 3)


def test_pseudo_ground_truth_errors(small_rig, tmp_path):
    with pytest.raises(ValueError, match="pose_file"):
        SevenScenes(small_rig, "test", camera="pgt")
    with pytest.raises(ValueError, match="pose_file"):
        SevenScenes(small_rig, "test", pose_file="x.txt")
    with pytest.raises(ValueError, match="camera must be one of"):
        SevenScenes(small_rig, "test", camera="ir")
    (tmp_path / "short.txt").write_text("seq-02/frame-000000.color.png 1 0 0 0 0 0 0 525\n")
    with pytest.raises(DatasetError, match="no pseudo ground truth pose for seq-02/frame-000001"):
        SevenScenes(small_rig, "test", camera="pgt", pose_file=tmp_path / "short.txt")
    (tmp_path / "bad.txt").write_text("seq-02/frame-000000.color.png 1 0 0 0 0 0 0\n")
    with pytest.raises(DatasetError, match="9 fields") as err:
        SevenScenes(small_rig, "test", camera="pgt", pose_file=tmp_path / "bad.txt")
    assert err.value.line == 1


def test_depth_camera_is_refused_where_depth_is_registered(small_rig, tmp_path):
    root = tmp_path / "registered"
    shutil.copytree(small_rig, root)
    (root / "intrinsics.txt").write_text("131.25 131.25 79.625 59.625 160 120\n")
    with pytest.raises(DatasetError, match="camera 'depth' applies only"):
        SevenScenes(root, "test", camera="depth")


def refine_errors(dataset, scene_map, truth) -> np.ndarray:
    """(n, 3) refined flag, metres, degrees of the test frames refined from priors 0.3 m / 10° off."""
    refiner, rng, rows = Refiner(scene_map), np.random.default_rng(0), []
    test = SevenScenes(dataset.root, "test", max_points=0, camera=dataset.camera)
    for i in range(len(test)):
        T_true = truth[frame_of(test, i)]
        result = refiner.refine(test.load_image(i), test.intrinsics(i), perturb_pose(T_true, 0.3, 10.0, rng))
        d = pose_difference(result.T, T_true)
        rows.append((result.refined, np.linalg.norm(d[:3]), np.degrees(np.linalg.norm(d[3:]))))
    return np.array(rows)


def registered_copy(root: Path, dest: Path, config: SyntheticSceneConfig) -> Path:
    """The same frames as a registered scene: depth rendered from the colour camera, colour poses, intrinsics.txt."""
    shutil.copytree(root, dest)
    scene, K = SyntheticScene(config), config.K
    (dest / "intrinsics.txt").write_text(f"{K[0, 0]} {K[1, 1]} {K[0, 2]} {K[1, 2]} {config.width} {config.height}\n")
    for frame, T in true_colour_poses(config).items():
        depth = scene.cast(T, K, config.width, config.height)[0]
        cv2.imwrite(str(dest / f"{frame}.depth.png"), np.clip(np.round(depth * 1000), 1, DEPTH_INVALID - 1).astype(np.uint16))
        (dest / f"{frame}.pose.txt").write_text("".join(" ".join(f"{v:.9f}" for v in row) + "\n" for row in T))
    return dest


def test_maps_from_the_rgb_reading_are_as_accurate_as_from_registered_depth(tmp_path):
    """Depth map of the Kinect rig read as ``rgb`` refines like one from truly registered depth.

    The official convention (``camera: depth``) pairs colour images with the depth camera's
    intrinsics and poses: its map refines fewer frames and worse (measured, not assumed).
    """
    root = tmp_path / "kinect"
    generate_scene(root, MAP_RIG)
    truth = true_colour_poses(MAP_RIG)
    features = FeatureConfig(max_features=800)
    results = {}
    for name, dataset in (("rgb", SevenScenes(root, "train", max_points=0)),
                          ("depth", SevenScenes(root, "train", max_points=0, camera="depth")),
                          ("registered", SevenScenes(registered_copy(root, tmp_path / "reg", MAP_RIG), "train", max_points=0))):
        scene_map = build_scene_map(dataset, np.arange(len(dataset)), features, "depth")
        results[name] = refine_errors(dataset, scene_map, truth)
    rgb, registered, depth = results["rgb"], results["registered"], results["depth"]
    assert rgb[:, 0].all() and registered[:, 0].all()
    assert np.median(rgb[:, 1]) < 1.5 * np.median(registered[:, 1]) + 0.005
    assert np.median(rgb[:, 2]) < 1.5 * np.median(registered[:, 2]) + 0.05
    assert np.median(rgb[:, 1]) < 0.03 and np.median(rgb[:, 2]) < 0.3
    assert np.median(depth[:, 2]) > 2 * np.median(rgb[:, 2])
