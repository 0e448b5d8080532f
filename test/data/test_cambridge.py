"""Cambridge Landmarks loader: pose convention, NVM points/intrinsics, splits, malformed files."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import transforms3d.quaternions as t3q

from ros2_posenet.data import CambridgeLandmarks, DatasetError, build_dataset, read_nvm
from ros2_posenet.data.cambridge import cambridge_to_project_pose, image_key
from ros2_posenet.data.synthetic import scene_trajectories
from ros2_posenet.geometry import matrix_to_pose
from ros2_posenet.preprocess import PreprocessConfig

from helpers import TINY_SCENE, project_np, tiny_scene

CONFIG = TINY_SCENE
HEADER = "Visual Landmark Dataset V1\nImageFile, Camera Position [X Y Z W P Q R]\n\n"


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    return tiny_scene(tmp_path_factory, "cambridge")




def test_file_convention_world_to_camera_quaternion_and_centre():
    """Independent of the writer: a point straight ahead of a turned camera projects to the centre."""
    # Camera looking along world +x (optical z), image right = world -y, image down = world -z.
    R_cw = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: optical axes in world
    q_wc = t3q.mat2quat(R_cw.T)  # what Cambridge / VisualSFM files store
    centre = np.array([1.0, 2.0, 0.5])
    t, q = cambridge_to_project_pose(centre, q_wc)
    np.testing.assert_allclose(t3q.quat2mat(q), R_cw, atol=1e-12)
    K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])
    world = np.array([[4.0, 2.0, 0.5], [4.0, 1.0, 0.5], [4.0, 2.0, 0.0]])  # ahead; towards -y; below
    uv, depth = project_np(world, t, q, K)
    # File definition: X_cam = R_wc (X - C), u = f x/z + cx.
    cam = (world - centre) @ R_cw
    np.testing.assert_allclose(depth, cam[:, 2])
    np.testing.assert_allclose(uv, 500 * cam[:, :2] / cam[:, 2:] + [320, 240], atol=1e-9)
    np.testing.assert_allclose(uv[0], [320, 240], atol=1e-9)
    assert uv[1, 0] > 320 and uv[2, 1] > 240  # world -y is image right, world down is image down


@pytest.mark.parametrize("split", ["train", "test"])
def test_nvm_points_project_onto_their_measurements(scene_dir, split):
    ds = CambridgeLandmarks(scene_dir, split, max_points=0)
    nvm = read_nvm(scene_dir / "reconstruction.nvm")
    cameras = {image_key(c.name): i for i, c in enumerate(nvm.cameras)}
    checked = 0
    for i, record in enumerate(ds.samples):
        K = ds.intrinsics(i)
        w, h = ds.image_size(i)
        ids, offsets = nvm.observations(cameras[image_key(record.name)])
        np.testing.assert_array_equal(np.sort(ids), ds.visible_point_ids(i))
        uv, depth = project_np(nvm.points[ids], record.position, record.rotation, K)
        measured = offsets + [(w - 1) / 2, (h - 1) / 2]
        assert np.all(depth > 0)
        assert np.abs(uv - measured).max() < 1.0
        checked += len(ids)
    assert checked > 100


def test_loader_poses_are_the_renderer_poses(scene_dir):
    trajectories = scene_trajectories(CONFIG)
    ds = CambridgeLandmarks(scene_dir, "test", max_points=0)
    for record, T in zip(ds.samples, trajectories["seq-03"]["poses"]):
        t, q = matrix_to_pose(T)
        np.testing.assert_allclose(record.position, t, atol=1e-8)
        np.testing.assert_allclose(record.rotation, q, atol=1e-8)


def test_focal_is_scaled_when_images_are_smaller_than_the_reconstruction(scene_dir, tmp_path):
    """Images stored at half size: K halves, and the NVM measurements (full-size pixels) still match."""
    root = tmp_path / "half"
    root.mkdir()
    for name in ("dataset_train.txt", "dataset_test.txt", "reconstruction.nvm", "reconstruction_size.txt"):
        shutil.copy(scene_dir / name, root / name)
    for png in scene_dir.glob("seq-0[12]/*.color.png"):
        (root / png.parent.name).mkdir(exist_ok=True)
        img = cv2.imread(str(png))
        cv2.imwrite(str(root / png.parent.name / png.name), cv2.resize(img, (80, 60), interpolation=cv2.INTER_AREA))
    ds = CambridgeLandmarks(root, "train", max_points=0)
    full = CambridgeLandmarks(scene_dir, "train", max_points=0)
    K, K_full = ds.intrinsics(0), full.intrinsics(0)
    assert K[0, 0] == pytest.approx(K_full[0, 0] / 2) and K[0, 2] == pytest.approx(39.5)
    nvm = ds.reconstruction
    ids, offsets = nvm.observations(0)
    uv, _ = project_np(nvm.points[ids], ds.samples[0].position, ds.samples[0].rotation, K)
    full_px = offsets + [79.5, 59.5]
    assert np.abs(uv - ((full_px + 0.5) / 2 - 0.5)).max() < 0.5
    # An explicit reconstruction width overrides the file.
    explicit = CambridgeLandmarks(root, "train", max_points=0, reconstruction_width=320)
    assert explicit.intrinsics(0)[0, 0] == pytest.approx(K_full[0, 0] / 4)
    # Default: the published 1920x1080, whose aspect ratio these 4:3 images do not have.
    (root / "reconstruction_size.txt").unlink()
    with pytest.raises(DatasetError, match="reconstruction_size.txt"):
        CambridgeLandmarks(root, "train", max_points=0).intrinsics(0)
    (root / "reconstruction_size.txt").write_text("1920\n")  # width only: no aspect check
    assert CambridgeLandmarks(root, "train", max_points=0).intrinsics(0)[0, 0] == pytest.approx(K_full[0, 0] * 80 / 1920)


def test_rejects_images_cropped_to_another_aspect_ratio(scene_dir, tmp_path):
    root = tmp_path / "crop"
    root.mkdir()
    for name in ("dataset_test.txt", "reconstruction.nvm", "reconstruction_size.txt"):
        shutil.copy(scene_dir / name, root / name)
    (root / "seq-03").mkdir()
    for png in scene_dir.glob("seq-03/*.color.png"):
        cv2.imwrite(str(root / "seq-03" / png.name), cv2.imread(str(png))[:, 20:140])
    ds = CambridgeLandmarks(root, "test", max_points=0)
    with pytest.raises(DatasetError, match="aspect ratio"):
        ds.intrinsics(0)


def test_splits_and_items(scene_dir):
    train = build_dataset("cambridge", scene_dir, "train", PreprocessConfig(resize=128, crop=112), augment=True, max_points=40)
    test = build_dataset("cambridge", scene_dir, "test", PreprocessConfig(resize=128, crop=112), augment=False)
    assert len(train) == 16 and len(test) == 6
    assert {r.sequence for r in train.samples} == {"seq-01", "seq-02"}
    assert {r.sequence for r in test.samples} == {"seq-03"}
    assert train.scene_name == "scene"
    item = train[0]
    assert item["image"].shape == (3, 112, 112) and item["points"].shape[0] <= 40
    assert item["K"].dtype == torch.float32 and item["rotation"][0] >= 0
    # Fixed point subset without augmentation.
    assert torch.equal(test[1]["points"], test[1]["points"])
    assert train.load_image(0).shape == (120, 160, 3)


def _scene_with_list(scene_dir: Path, tmp_path: Path, body: str, header: str = HEADER, nvm: bool = True) -> Path:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "seq-01").symlink_to(scene_dir / "seq-01")
    if nvm:
        shutil.copy(scene_dir / "reconstruction.nvm", root)
    (root / "dataset_train.txt").write_text(header + body)
    return root


GOOD = "seq-01/frame-000000.color.png 1 2 3 1 0 0 0\n"


@pytest.mark.parametrize(
    "body, line, message",
    [
        ("seq-01/frame-000000.color.png 1 2 3 1 0 0\n", 4, "8 values"),
        ("seq-01/frame-000000.color.png 1 2 x 1 0 0 0\n", 4, "expected numbers"),
        (GOOD + "seq-01/frame-000099.color.png 1 2 3 1 0 0 0\n", 5, "image not found"),
        ("seq-01/frame-000000.color.png 1 2 3 0.9 0 0 0\n", 4, "norm"),
        ("seq-01/frame-000000.color.png 1 2 3 0 0 0 0\n", 4, "norm"),
        ("seq-01/frame-000000.color.png 1 2 nan 1 0 0 0\n", 4, "non-finite"),
    ],
)
def test_malformed_lines_name_file_and_line(scene_dir, tmp_path, body, line, message):
    root = _scene_with_list(scene_dir, tmp_path, body)
    with pytest.raises(DatasetError, match=message) as err:
        CambridgeLandmarks(root, "train")
    assert f"dataset_train.txt:{line}:" in str(err.value)
    assert err.value.line == line and isinstance(err.value, ValueError)


def test_nearly_unit_quaternion_is_normalised(scene_dir, tmp_path):
    root = _scene_with_list(scene_dir, tmp_path, "seq-01/frame-000000.color.png 1 2 3 0.0 0.7074 0.0 -0.7071\n")
    q = CambridgeLandmarks(root, "train").samples[0].rotation
    assert np.linalg.norm(q) == pytest.approx(1.0) and q[0] >= 0


def test_missing_header_missing_split_and_missing_nvm(scene_dir, tmp_path):
    root = _scene_with_list(scene_dir, tmp_path, GOOD * 3, header="")
    with pytest.raises(DatasetError, match="header"):
        CambridgeLandmarks(root, "train")
    with pytest.raises(DatasetError, match="dataset_test.txt"):
        CambridgeLandmarks(root, "test")
    (root / "dataset_train.txt").write_text(HEADER + GOOD)
    (root / "reconstruction.nvm").unlink()
    with pytest.raises(DatasetError, match="focal="):
        CambridgeLandmarks(root, "train")
    ds = CambridgeLandmarks(root, "train", focal=400.0, reconstruction_width=160)
    assert ds.intrinsics(0)[0, 0] == pytest.approx(400.0) and ds[0]["points"].shape == (0, 3)


def test_images_missing_from_the_nvm_warn_and_get_no_points(scene_dir, tmp_path):
    root = _scene_with_list(scene_dir, tmp_path, GOOD)
    nvm = root / "reconstruction.nvm"
    nvm.write_text(nvm.read_text().replace("seq-01/frame-000000.color.png", "seq-09/frame-000000.color.png", 1))
    with pytest.warns(UserWarning, match="not in the reconstruction"):
        ds = CambridgeLandmarks(root, "train", reconstruction_width=160)
    assert len(ds.visible_point_ids(0)) == 0
    assert ds.intrinsics(0)[0, 0] == pytest.approx(CONFIG.focal)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda lines: ["NVM_V2"] + lines[1:], "NVM_V3"),
        (lambda lines: lines[:3] + [" ".join(lines[3].split()[:6])] + lines[4:], "camera line"),
        (lambda lines: lines[:2] + ["many"] + lines[3:], "number of cameras"),
    ],
)
def test_malformed_nvm_names_file_and_line(scene_dir, tmp_path, edit, message):
    root = _scene_with_list(scene_dir, tmp_path, GOOD)
    nvm = root / "reconstruction.nvm"
    nvm.write_text("\n".join(edit(nvm.read_text().splitlines())))
    with pytest.raises(DatasetError, match=message) as err:
        CambridgeLandmarks(root, "train")
    assert "reconstruction.nvm:" in str(err.value) and err.value.line is not None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda tokens: tokens + ["5"], "point line must be"),
        (lambda tokens: tokens[:8] + ["abc"] + tokens[9:], "expected numbers"),
        (lambda tokens: tokens[:7] + ["9999"] + tokens[8:], "image index outside"),
    ],
)
def test_malformed_nvm_point_lines(scene_dir, tmp_path, edit, message):
    root = _scene_with_list(scene_dir, tmp_path, GOOD)
    nvm = root / "reconstruction.nvm"
    lines = nvm.read_text().splitlines()
    point_lines = [i for i, text in enumerate(lines) if len(text.split()) > 11]
    target = point_lines[len(point_lines) // 2]
    lines[target] = " ".join(edit(lines[target].split()))
    nvm.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=message) as err:
        read_nvm(nvm)
    assert err.value.line == target + 1


def test_unknown_kind_and_split():
    with pytest.raises(ValueError, match="kind"):
        build_dataset("kitti", ".", "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset("cambridge", ".", "val")
    assert math.isclose(CONFIG.focal, 80 / math.tan(math.radians(30)))
