"""7-Scenes loader: poses, intrinsics, depth points, splits, malformed files."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from ros2_posenet.data import DatasetError, SevenScenes, build_dataset, collate_pose_batch, read_nvm
from ros2_posenet.data.cambridge import image_key
from ros2_posenet.data.synthetic import SyntheticScene
from ros2_posenet.geometry import pose_to_matrix
from ros2_posenet.preprocess import PreprocessConfig

from helpers import TINY_SCENE, project_np, tiny_scene

CONFIG = TINY_SCENE
HOLOLENS_OFFICE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hololens-office"


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    return tiny_scene(tmp_path_factory, "sevenscenes")


@pytest.mark.parametrize("split", ["train", "test"])
def test_scene_points_project_where_the_renderer_saw_them(scene_dir, split):
    """Loader pose + intrinsics.txt vs the renderer's observations (stored in the NVM)."""
    ds = SevenScenes(scene_dir, split, max_points=0)
    nvm = read_nvm(scene_dir / "reconstruction.nvm")
    cameras = {image_key(c.name): i for i, c in enumerate(nvm.cameras)}
    checked = 0
    for i, record in enumerate(ds.samples):
        ids, offsets = nvm.observations(cameras[image_key(record.name)])
        uv, depth = project_np(nvm.points[ids], record.position, record.rotation, ds.intrinsics(i))
        assert np.all(depth > 0)
        assert np.abs(uv - (offsets + [79.5, 59.5])).max() < 1.0
        checked += len(ids)
    assert checked > 100


def test_depth_points_lie_on_the_rendered_surfaces(scene_dir):
    """Points back-projected from the mm depth PNGs: their pixel's rendered depth equals theirs."""
    scene = SyntheticScene(CONFIG)
    ds = SevenScenes(scene_dir, "test", max_points=50)
    for i in range(len(ds)):
        record = ds.samples[i]
        points = ds.visible_points(i, np.random.default_rng(i))
        assert points.shape == (50, 3)
        K = ds.intrinsics(i)
        uv, depth = project_np(points, record.position, record.rotation, K)
        np.testing.assert_allclose(uv, np.round(uv), atol=0.02)  # pixel centres
        _, rendered = scene.render(pose_to_matrix(record.position, record.rotation), K, 160, 120)
        px = np.round(uv).astype(int)
        np.testing.assert_allclose(rendered[px[:, 1], px[:, 0]], depth, atol=1e-3)  # mm quantisation


def test_split_files_are_honoured(scene_dir, tmp_path):
    train, test = SevenScenes(scene_dir, "train"), SevenScenes(scene_dir, "test")
    assert train.sequences == ["seq-01", "seq-02"] and test.sequences == ["seq-03"]
    assert len(train) == 16 and len(test) == 6
    assert {r.sequence for r in test.samples} == {"seq-03"}
    root = _copy_scene(scene_dir, tmp_path)
    (root / "TrainSplit.txt").write_text("\nSequence2\n\n")
    only_two = SevenScenes(root, "train")
    assert only_two.sequences == ["seq-02"] and len(only_two) == 8
    assert all(r.image_path.parent.name == "seq-02" for r in only_two.samples)


@pytest.mark.parametrize("camera, focal", [("rgb", 525), ("depth", 585)])
def test_kinect_intrinsics_without_intrinsics_file(scene_dir, tmp_path, camera, focal):
    root = _copy_scene(scene_dir, tmp_path)
    (root / "intrinsics.txt").unlink()
    K = SevenScenes(root, "test", camera=camera).intrinsics(0)  # 160x120 images: Kinect's 640x480 values scaled by 1/4
    np.testing.assert_allclose(K, [[focal / 4, 0, 320.5 / 4 - 0.5], [0, focal / 4, 240.5 / 4 - 0.5], [0, 0, 1]])


def test_jpeg_colour_frames_are_read(scene_dir, tmp_path):
    """A scene re-encoded as ``frame-*.color.jpg`` loads the same frames, poses and pixels."""
    root = _copy_scene(scene_dir, tmp_path)
    for png in root.glob("seq-*/frame-*.color.png"):
        cv2.imwrite(str(png.with_name(png.name.replace(".png", ".jpg"))), cv2.imread(str(png)), [cv2.IMWRITE_JPEG_QUALITY, 95])
        png.unlink()
    png_ds, jpg_ds = SevenScenes(scene_dir, "train", max_points=10), SevenScenes(root, "train", max_points=10)
    assert [r.name.replace(".jpg", ".png") for r in jpg_ds.samples] == [r.name for r in png_ds.samples]
    assert all(r.image_path.suffix == ".jpg" for r in jpg_ds.samples)
    np.testing.assert_allclose(jpg_ds.positions(), png_ds.positions())
    np.testing.assert_allclose(jpg_ds.visible_points(3, np.random.default_rng(0)), png_ds.visible_points(3, np.random.default_rng(0)))
    difference = np.abs(jpg_ds.load_image(3).astype(int) - png_ds.load_image(3).astype(int))
    assert difference.mean() < 6  # JPEG loss only


def test_frame_stored_as_png_and_jpeg_is_rejected(scene_dir, tmp_path):
    root = _copy_scene(scene_dir, tmp_path)
    png = root / "seq-03" / "frame-000002.color.png"
    shutil.copy(png, png.with_name("frame-000002.color.jpg"))
    with pytest.raises(DatasetError, match="frame stored twice"):
        SevenScenes(root, "test")


def test_hololens_office_loads():
    """The real JPEG scene in ../shared/data: splits, image size, registered intrinsics, depth on surfaces."""
    if not HOLOLENS_OFFICE.is_dir():
        pytest.skip(f"real RGB-D scene not found at {HOLOLENS_OFFICE} (see ../shared/data/hololens-office/README.md)")
    train, test = SevenScenes(HOLOLENS_OFFICE, "train", max_points=200), SevenScenes(HOLOLENS_OFFICE, "test", max_points=200)
    assert (len(train), len(test)) == (283, 90)
    assert train.samples[0].image_path.name.endswith(".color.jpg") and test.image_size(0) == (540, 360)
    np.testing.assert_allclose(test.intrinsics(0)[0], [495.5677570093, 0, 269.5028971963])
    points = test.visible_points(0, np.random.default_rng(0))
    uv, depth = project_np(points, test.samples[0].position, test.samples[0].rotation, test.intrinsics(0))
    assert len(points) == 200 and np.all(depth > 0.1) and np.all(depth < 20)
    assert np.all((uv > -0.5) & (uv < [539.5, 359.5]))


def test_items_and_collate(scene_dir):
    small = PreprocessConfig(resize=112, crop=96)
    ds = build_dataset("7-scenes", scene_dir, "train", small, augment=True, max_points=30)
    batch = collate_pose_batch([ds[0], ds[5]])
    assert batch["image"].shape == (2, 3, 96, 96)
    assert batch["points"].shape == (2, 30, 3) and bool(batch["points_mask"].all())
    no_points = build_dataset("7scenes", scene_dir, "test", small, max_points=0)
    assert no_points[0]["points"].shape == (0, 3)


def _copy_scene(scene_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(scene_dir, root, ignore=shutil.ignore_patterns("*.nvm", "dataset_*"))
    return root


@pytest.mark.parametrize(
    "split_text, line, message",
    [("sequence1\nsequenceX\n", 2, "sequence1"), ("sequence1\nsequence7\n", 2, "not found"), ("\n\n", None, "no sequences")],
)
def test_bad_split_files(scene_dir, tmp_path, split_text, line, message):
    root = _copy_scene(scene_dir, tmp_path)
    (root / "TrainSplit.txt").write_text(split_text)
    with pytest.raises(DatasetError, match=message) as err:
        SevenScenes(root, "train")
    assert "TrainSplit.txt" in str(err.value) and err.value.line == line


def test_missing_split_file_and_folder(scene_dir, tmp_path):
    root = _copy_scene(scene_dir, tmp_path)
    (root / "TestSplit.txt").unlink()
    with pytest.raises(DatasetError, match="TestSplit.txt: split file not found"):
        SevenScenes(root, "test")
    with pytest.raises(DatasetError, match="scene folder not found"):
        SevenScenes(tmp_path / "nowhere", "train")


@pytest.mark.parametrize(
    "pose_text, line, message",
    [
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n", None, "4 rows"),
        ("1 0 0 0\n0 1 0\n0 0 1 0\n0 0 0 1\n", 2, "4 values"),
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n0 0 0 1\n", 5, "more than 4 rows"),
        ("2 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", None, "rotation"),
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n1 0 0 1\n", None, "last row"),
        ("1 0 0 0\n0 1 0 0\n0 0 1 zero\n0 0 0 1\n", 3, "expected numbers"),
    ],
)
def test_bad_pose_files(scene_dir, tmp_path, pose_text, line, message):
    root = _copy_scene(scene_dir, tmp_path)
    pose = root / "seq-03/frame-000002.pose.txt"
    pose.write_text(pose_text)
    with pytest.raises(DatasetError, match=message) as err:
        SevenScenes(root, "test")
    assert err.value.path == pose and err.value.line == line


def test_missing_depth_and_bad_intrinsics(scene_dir, tmp_path):
    root = _copy_scene(scene_dir, tmp_path)
    (root / "seq-03/frame-000001.depth.png").unlink()
    with pytest.raises(DatasetError, match="frame-000001.depth.png"):
        SevenScenes(root, "test")
    assert len(SevenScenes(root, "test", max_points=0)) == 6  # depth only needed for points
    (root / "intrinsics.txt").write_text("# fx fy cx cy width height\n100 100 80 60 160\n")
    with pytest.raises(DatasetError, match="intrinsics.txt:2: expected 6 values"):
        SevenScenes(root, "test", max_points=0)
