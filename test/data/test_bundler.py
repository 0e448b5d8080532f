"""Bundler loader (Dubrovnik 6K format): conventions, distortion, splits, malformed files, training on it."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import transforms3d.euler as t3e

from ros2_posenet.data import BundlerScene, DatasetError, build_dataset, read_bundle
from ros2_posenet.data.bundler import bundler_to_project_pose, project_to_bundler_pose
from ros2_posenet.data.synthetic import BUNDLER_DISTORTION, FORMATS, SyntheticSceneConfig
from ros2_posenet.geometry import rotation_angle_deg_np

from helpers import TINY_SCENE, project_np, tiny_scene

CONFIG = dataclasses.replace(TINY_SCENE, formats=FORMATS)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    return tiny_scene(tmp_path_factory, "bundler", CONFIG)


# ----------------------------------------------------------------------------- conventions, by hand


def bundler_measurement(R, t, f, k1, k2, X):
    """Bundler's own projection (v0.4 manual): P = R X + t, p = -P/P_z, x = f r(p) p, origin at the centre, y up."""
    P = np.asarray(X) @ np.asarray(R).T + t
    p = -P[:, :2] / P[:, 2:]
    r2 = np.sum(p * p, axis=1, keepdims=True)
    return f * (1 + k1 * r2 + k2 * r2 * r2) * p, P


def write_hand_scene(root: Path, cameras, points, size=(64, 48), query: list[str] | None = None) -> list[str]:
    """A Bundler scene written by hand (not by the project's writer): noise images, list.txt, bundle.out.

    ``cameras``: (f, k1, k2, R, t); each point is seen by every registered camera, in front of it.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for c in range(len(cameras)):
        names.append(f"img/{c:04d}.png")
        cv2.imwrite(str(root / names[-1]), rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    (root / "list.txt").write_text("".join(f"{n} 0 {cam[0]:.3f}\n" if c % 2 else f"{n}\n" for c, (n, cam) in enumerate(zip(names, cameras))))
    lines = ["# Bundle file v0.3", f"{len(cameras)} {len(points)}"]
    for f, k1, k2, R, t in cameras:
        lines += [f"{f} {k1} {k2}", *(" ".join(f"{v:.17g}" for v in row) for row in R), " ".join(f"{v:.17g}" for v in t)]
    for j, X in enumerate(points):
        views = []
        for c, (f, k1, k2, R, t) in enumerate(cameras):
            if f != 0:
                xy, _ = bundler_measurement(R, t, f, k1, k2, X[None])
                views.append(f"{c} {j} {xy[0, 0]:.9f} {xy[0, 1]:.9f}")
        lines += [" ".join(f"{v:.17g}" for v in X), "10 20 30", " ".join([str(len(views))] + views)]
    (root / "bundle.out").write_text("\n".join(lines) + "\n")
    if query is not None:
        (root / "list.query.txt").write_text("".join(q + "\n" for q in query))
    return names


def turned_camera(yaw, pitch, roll, centre):
    """Bundler R, t of a camera at ``centre`` turned by Euler angles (a general rotation)."""
    R = t3e.euler2mat(yaw, pitch, roll, "szyx")
    return R, -R @ np.asarray(centre, float)


def test_identity_camera_looks_down_minus_z_with_y_up(tmp_path):
    """R = I, t = 0: a point at -z is straight ahead, +x is image right, +y is image up."""
    f = 50.0
    points = np.array([[0.0, 0.0, -10.0], [1.0, 0.0, -10.0], [0.0, 2.0, -10.0]])
    write_hand_scene(tmp_path, [(f, 0.0, 0.0, np.eye(3), np.zeros(3))], points)
    ds = BundlerScene(tmp_path, "train", max_points=0)
    record, K = ds.samples[0], ds.intrinsics(0)
    np.testing.assert_allclose(K, [[f, 0, 31.5], [0, f, 23.5], [0, 0, 1]])
    np.testing.assert_allclose(record.position, 0, atol=1e-12)
    uv, depth = project_np(points, record.position, record.rotation, K)
    np.testing.assert_allclose(depth, 10.0)
    np.testing.assert_allclose(uv, [[31.5, 23.5], [31.5 + 5.0, 23.5], [31.5, 23.5 - 10.0]], atol=1e-9)
    ids, measured = ds.undistorted_observations(0)  # view list: (0, 0), (5, 0), (0, 10) from the centre, y up
    np.testing.assert_allclose(measured[np.argsort(ids)], uv, atol=1e-6)
    assert ds.reconstruction.obs_xy[2, 1] == pytest.approx(10.0)  # stored y is up


def test_general_cameras_with_distortion_match_bundlers_projection(tmp_path):
    """Random turned cameras with k1, k2: loader pose + K projects where Bundler's formula measures, once undistorted."""
    rng = np.random.default_rng(3)
    cameras = []
    for c in range(3):
        R, t = turned_camera(*rng.uniform(-np.pi, np.pi, 3), rng.normal(0, 5, 3))
        cameras.append((rng.uniform(40, 70), -0.08 + 0.03 * c, 0.02, R, t))
    # Points in front of camera 0 (Bundler: negative camera z) at 5-20 m, seen by all three only where in front.
    R0, t0 = cameras[0][3], cameras[0][4]
    local = np.column_stack((rng.uniform(-2, 2, (40, 2)), -rng.uniform(5, 20, 40)))
    points = (local - t0) @ R0
    cameras = [cameras[0]] + [(f, k1, k2, R0 @ t3e.euler2mat(*rng.uniform(-0.2, 0.2, 3), "szyx"), t0 + rng.normal(0, 0.3, 3))
                              for f, k1, k2, _, _ in cameras[1:]]
    write_hand_scene(tmp_path, cameras, points, size=(96, 72))
    ds = BundlerScene(tmp_path, "train", max_points=0, test_fraction=0.5, test_block=1)
    ds_test = BundlerScene(tmp_path, "test", max_points=0, test_fraction=0.5, test_block=1)
    for d in (ds, ds_test):
        for i in range(len(d)):
            cam = d.camera(i)
            expected_xy, P = bundler_measurement(cam.R, cam.t, cam.focal, cam.k1, cam.k2, points)
            assert np.all(P[:, 2] < 0)  # in front = negative Bundler z
            record, K = d.samples[i], d.intrinsics(i)
            uv, depth = project_np(points, record.position, record.rotation, K)
            np.testing.assert_allclose(depth, -P[:, 2], rtol=1e-9)
            ids, measured = d.undistorted_observations(i)
            np.testing.assert_allclose(measured, uv[ids], atol=1e-5)
            # The pinhole pixel, distorted by Bundler's k1, k2 about the centre, is the stored measurement.
            n = (uv - K[:2, 2]) * [1, -1] / cam.focal
            r2 = np.sum(n * n, axis=1, keepdims=True)
            np.testing.assert_allclose(cam.focal * n * (1 + cam.k1 * r2 + cam.k2 * r2 ** 2), expected_xy, atol=1e-6)
    assert len(ds) + len(ds_test) == 3


def test_pose_conversion_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(5):
        R, t = turned_camera(*rng.uniform(-np.pi, np.pi, 3), rng.normal(0, 10, 3))
        position, q = bundler_to_project_pose(R, t)
        np.testing.assert_allclose(position, -R.T @ t, atol=1e-12)
        R2, t2 = project_to_bundler_pose(position, q)
        np.testing.assert_allclose(R2, R, atol=1e-12)
        np.testing.assert_allclose(t2, t, atol=1e-10)


def test_unregistered_cameras_are_skipped_with_a_count(tmp_path, caplog):
    zero = (0.0, 0.0, 0.0, np.zeros((3, 3)), np.zeros(3))
    good = (50.0, 0.0, 0.0, np.eye(3), np.zeros(3))
    names = write_hand_scene(tmp_path, [good, zero, good, zero, zero], np.array([[0.0, 0.0, -5.0]]),
                             query=["img/0002.png", "img/0003.png"])
    with caplog.at_level(logging.WARNING, logger="ros2_posenet.data.bundler"):
        train = BundlerScene(tmp_path, "train", max_points=0)
        test = BundlerScene(tmp_path, "test", max_points=0)
    assert [r.name for r in train.samples] == [names[0]] and train.unregistered == [names[1], names[4]]
    assert [r.name for r in test.samples] == [names[2]] and test.unregistered == [names[3]]
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 of 3 train images are unregistered" in m for m in messages)
    assert any("1 of 2 test images are unregistered" in m for m in messages)
    # The optional EXIF focal of list.txt is read but the bundle's focal is used.
    assert train.entries[1].focal == pytest.approx(0.0) and train.entries[0].focal is None
    assert train.intrinsics(0)[0, 0] == 50.0


def test_split_file_names_match_without_folder_or_extension(tmp_path):
    """A query list naming ``query/0002.jpg`` finds ``img/0002.png`` when the file name is unique."""
    good = (50.0, 0.0, 0.0, np.eye(3), np.zeros(3))
    names = write_hand_scene(tmp_path, [good] * 3, np.array([[0.0, 0.0, -5.0]]), query=["query/0002.jpg"])
    assert [r.name for r in BundlerScene(tmp_path, "test", max_points=0).samples] == [names[2]]
    (tmp_path / "img" / "sub").mkdir()
    shutil.copy(tmp_path / names[2], tmp_path / "img" / "sub" / "0002.png")
    (tmp_path / "list.txt").write_text((tmp_path / "list.txt").read_text().replace(names[1], "img/sub/0002.png"))
    with pytest.raises(DatasetError, match="'query/0002.jpg' is not in list.txt"):  # now ambiguous
        BundlerScene(tmp_path, "test")


# ----------------------------------------------------------------------------- the synthetic scene's reading


@pytest.mark.parametrize("split", ["train", "test"])
def test_round_trip_poses_match_the_7scenes_and_cambridge_readings(scene_dir, split):
    bundler = build_dataset("dubrovnik", scene_dir, split, max_points=0)
    assert isinstance(bundler, BundlerScene) and "list.query.txt" in bundler.split_description
    assert bundler.bundle_path == scene_dir / "bundle" / "bundle.out"
    for kind in ("7scenes", "cambridge"):
        other = build_dataset(kind, scene_dir, split, max_points=0)
        assert [Path(r.name).name for r in bundler.samples] == [Path(r.name).name for r in other.samples]
        assert [r.sequence for r in bundler.samples] == [f"bundler/{r.sequence}" for r in other.samples]
        for a, b in zip(bundler.samples, other.samples):
            assert np.linalg.norm(a.position - b.position) <= 1e-3
            assert rotation_angle_deg_np(a.rotation, b.rotation) <= 0.01
    assert len(bundler) == {"train": 16, "test": 6}[split]


@pytest.mark.parametrize("split", ["train", "test"])
def test_view_list_points_project_onto_their_undistorted_measurements(scene_dir, split):
    ds = BundlerScene(scene_dir, split, max_points=0)
    checked, raw_error = 0, 0.0
    for i, record in enumerate(ds.samples):
        cam = ds.camera(i)
        assert (cam.k1, cam.k2) == BUNDLER_DISTORTION
        ids, measured = ds.undistorted_observations(i)
        np.testing.assert_array_equal(np.unique(ids), ds.visible_point_ids(i))
        uv, depth = project_np(ds.points[ids], record.position, record.rotation, ds.intrinsics(i))
        assert np.all(depth > 0)
        assert np.abs(uv - measured).max() < 1.0
        # Taken as they are stored (distorted) the measurements are off by pixels towards the corners.
        stored_ids, xy = ds.measurements(i)
        np.testing.assert_array_equal(stored_ids, ids)
        raw_error = max(raw_error, np.abs(uv - (xy * [1, -1] + ds.intrinsics(i)[:2, 2])).max())
        checked += len(ids)
    assert checked > 100 and raw_error > 1.5


def _shift(a: np.ndarray, b: np.ndarray) -> float:
    """Length of the translation between two RGB patches (phase correlation, sub-pixel)."""
    a, b = (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64) for x in (a, b))
    (dx, dy), _ = cv2.phaseCorrelate(a, b, cv2.createHanningWindow(a.shape[::-1], cv2.CV_64F))
    return float(np.hypot(dx, dy))


def test_undistorted_images_line_up_with_the_pinhole_renders(scene_dir):
    """The loader's images are the renderer's pinhole views: corner patches align (< 0.5 px), the stored copies do not."""
    bundler = BundlerScene(scene_dir, "test", max_points=0)
    pinhole = build_dataset("7scenes", scene_dir, "test", max_points=0)
    size = 32
    undistorted_shifts, stored_shifts = [], []
    for i in range(len(bundler)):
        truth, loaded = pinhole.load_image(i), bundler.load_image(i)
        stored = cv2.cvtColor(cv2.imread(str(bundler.samples[i].image_path)), cv2.COLOR_BGR2RGB)
        h, w = truth.shape[:2]
        for y, x in [(2, 2), (2, w - size - 2), (h - size - 2, 2), (h - size - 2, w - size - 2)]:
            patch = np.s_[y : y + size, x : x + size]
            undistorted_shifts.append(_shift(truth[patch], loaded[patch]))
            stored_shifts.append(_shift(truth[patch], stored[patch]))
    assert max(undistorted_shifts) < 0.5
    assert np.mean(stored_shifts) > 3 * np.mean(undistorted_shifts)


def test_items_carry_view_list_points(scene_dir):
    from ros2_posenet.preprocess import PreprocessConfig

    ds = build_dataset("bundler", scene_dir, "train", PreprocessConfig(resize=64, crop=64), augment=True, max_points=20)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and 0 < item["points"].shape[0] <= 20
    ids = ds.visible_point_ids(0)
    assert all(any(np.allclose(p, ds.points[j], atol=1e-5) for j in ids) for p in item["points"].numpy())


def test_overwriting_a_scene_removes_its_bundler_files(tmp_path):
    from ros2_posenet.data.synthetic import generate_scene

    small = dict(width=32, height=24, frames_train=2, frames_test=1, train_sequences=1, num_points=50)
    generate_scene(tmp_path, SyntheticSceneConfig(**small, formats=("7scenes", "bundler")))
    assert (tmp_path / "bundle" / "bundle.out").is_file() and len(list((tmp_path / "bundler").rglob("*.png"))) == 3
    generate_scene(tmp_path, SyntheticSceneConfig(**small, formats=("7scenes",)), overwrite=True)
    assert not any((tmp_path / name).exists() for name in ("bundle", "bundler", "list.txt", "list.query.txt"))


# ----------------------------------------------------------------------------- splits


def _copy_scene(scene_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    root.mkdir()
    (root / "bundler").symlink_to(scene_dir / "bundler")
    shutil.copytree(scene_dir / "bundle", root / "bundle")
    for name in ("list.txt", "list.query.txt"):
        shutil.copy(scene_dir / name, root / name)
    return root


def test_deterministic_split_without_a_split_file(scene_dir, tmp_path):
    root = _copy_scene(scene_dir, tmp_path)
    (root / "list.query.txt").unlink()
    train = BundlerScene(root, "train", max_points=0)
    test = BundlerScene(root, "test", max_points=0, test_fraction=0.5, test_block=2)
    test_default = BundlerScene(root, "test", max_points=0)
    assert "no list.query.txt" in train.split_description
    names = {r.name for r in train.samples} | {r.name for r in test_default.samples}
    assert len(names) == 22 and not {r.name for r in train.samples} & {r.name for r in test_default.samples}
    # Every 10th image of each folder (no folder has 10 blocks of 10 frames); every 2nd block of 2 with 0.5, 2.
    assert [r.name.split("/", 1)[1] for r in test_default.samples] == [
        "seq-01/frame-000005.color.png", "seq-02/frame-000005.color.png", "seq-03/frame-000005.color.png"]
    assert [r.name.rsplit("-", 1)[1] for r in test.samples if r.sequence == "bundler/seq-01"] == [
        "000002.color.png", "000003.color.png", "000006.color.png", "000007.color.png"]
    again = BundlerScene(root, "train", max_points=0)
    assert [r.name for r in again.samples] == [r.name for r in train.samples]


def test_bad_split_options_and_missing_folder(scene_dir, tmp_path):
    with pytest.raises(ValueError, match="test_fraction"):
        BundlerScene(scene_dir, "test", test_fraction=0.0)
    with pytest.raises(ValueError, match="test_block"):
        BundlerScene(scene_dir, "test", test_block=0)
    with pytest.raises(DatasetError, match="scene folder not found"):
        BundlerScene(tmp_path / "nowhere", "train")


def test_explicit_file_names(scene_dir, tmp_path):
    root = _copy_scene(scene_dir, tmp_path)
    (root / "bundle" / "bundle.out").rename(root / "bundle" / "model.out")
    (root / "list.query.txt").rename(root / "queries.txt")
    with pytest.raises(DatasetError, match="no Bundler reconstruction found"):
        BundlerScene(root, "train")
    ds = BundlerScene(root, "test", bundle="bundle/model.out", split_file="queries.txt", max_points=0)
    assert len(ds) == 6 and "queries.txt" in ds.split_description
    with pytest.raises(DatasetError, match="image list not found"):
        BundlerScene(root, "test", bundle="bundle/model.out", split_file="missing.txt")


def test_dubrovnik_layout_is_found(scene_dir, tmp_path):
    """bundle/bundle.orig.out + bundle/list.orig.txt, query list at the root, as Dubrovnik 6K ships them."""
    root = _copy_scene(scene_dir, tmp_path)
    (root / "bundle" / "bundle.out").rename(root / "bundle" / "bundle.orig.out")
    (root / "list.txt").rename(root / "bundle" / "list.orig.txt")
    ds = build_dataset("dubrovnik6k", root, "test", max_points=0)
    assert ds.list_path == root / "bundle" / "list.orig.txt" and len(ds) == 6


# ----------------------------------------------------------------------------- malformed files


def _bundle_lines(root: Path) -> list[str]:
    return (root / "bundle" / "bundle.out").read_text().splitlines()


def _first_point_line(lines: list[str]) -> int:
    """0-based index of the first point's position line (after header, counts and 5 lines per camera)."""
    return 2 + 5 * int(lines[1].split()[0])


def _edit_view_list(lines, drop_last: int = 0, replace: tuple[int, str] | None = None):
    i = _first_point_line(lines) + 2 + 3 * 5  # view list of point 5
    while lines[i].split()[0] == "0":
        i += 3
    tokens = lines[i].split()
    if replace is not None:
        tokens[replace[0]] = replace[1]
    lines[i] = " ".join(tokens[: len(tokens) - drop_last])
    return lines, i + 1


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ls: (["# Bundle file v0.1"] + ls[1:], 1), "v0.3"),
        (lambda ls: (ls[:1] + ["22 600 1"] + ls[2:], 2), "num_cameras"),
        (lambda ls: (ls[:1] + [f"23 {ls[1].split()[1]}"] + ls[2:], _first_point_line(ls) + 3), "camera 22: row 2 of R"),
        (lambda ls: _edit_view_list(ls, drop_last=1), "view list must be"),
        (lambda ls: _edit_view_list(ls, replace=(3, "x")), "expected numbers"),
        (lambda ls: _edit_view_list(ls, replace=(1, "99")), "camera outside"),
        (lambda ls: (ls[:1] + [f"22 {int(ls[1].split()[1]) - 1}"] + ls[2:], len(ls) - 2), "unexpected content"),
        (lambda ls: (ls[:1] + [f"22 {int(ls[1].split()[1]) + 1}"] + ls[2:], None), "file ends"),
        (lambda ls: (ls[:3] + ["2 0 0"] + ls[4:], 4), "not a rotation"),
        (lambda ls: (ls[: _first_point_line(ls)] + [ls[_first_point_line(ls)] + " 7"] + ls[_first_point_line(ls) + 1 :],
                     _first_point_line(ls) + 1), "position: expected 3 values"),
    ],
)
def test_malformed_bundle_names_file_and_line(scene_dir, tmp_path, edit, message):
    root = _copy_scene(scene_dir, tmp_path)
    lines, line = edit(_bundle_lines(root))
    (root / "bundle" / "bundle.out").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message) as err:
        BundlerScene(root, "train")
    assert "bundle.out" in str(err.value)
    if line is not None:
        assert err.value.line == line and f"bundle.out:{line}:" in str(err.value)
    else:
        assert err.value.path.name == "bundle.out"


def test_truncated_file_and_wrong_camera_count(scene_dir, tmp_path):
    root = _copy_scene(scene_dir, tmp_path)
    lines = _bundle_lines(root)
    (root / "bundle" / "bundle.out").write_text("\n".join(lines[: len(lines) - 4]) + "\n")
    with pytest.raises(DatasetError, match="file ends before point"):
        read_bundle(root / "bundle" / "bundle.out")
    # Fewer cameras announced than written: camera 21's lines (from line 3 + 5·21) are read as point 0,
    # whose "view list" (R's second row, line 110) does not start with a count.
    (root / "bundle" / "bundle.out").write_text("\n".join(lines[:1] + [f"21 {lines[1].split()[1]}"] + lines[2:]) + "\n")
    with pytest.raises(DatasetError, match="point 0: view list must be") as err:
        read_bundle(root / "bundle" / "bundle.out")
    assert err.value.line == 110


@pytest.mark.parametrize(
    "edit, line, message",
    [
        (lambda ls: ls[:-1], None, "22 images listed but bundle.out has 23 cameras"),
        (lambda ls: ls[:3] + [ls[3] + " 7"] + ls[4:], 4, "1 or 3 values"),
        (lambda ls: ls[:3] + [ls[3].replace("000003", "000099")] + ls[4:], 4, "image not found"),
        (lambda ls: ls[:3] + [ls[3].split()[0] + " 0 abc"] + ls[4:], 4, "expected numbers"),
    ],
)
def test_malformed_list_names_file_and_line(scene_dir, tmp_path, edit, line, message):
    root = _copy_scene(scene_dir, tmp_path)
    lines = (root / "list.txt").read_text().splitlines()
    if "23 cameras" in message:  # one camera more in the bundle than lines in the list
        lines = lines + [lines[-1]]
        bundle = _bundle_lines(root)
        n_cam, n_pts = bundle[1].split()
        cam = bundle[2 + 5 * (int(n_cam) - 1) : 2 + 5 * int(n_cam)]
        bundle = bundle[:1] + [f"{int(n_cam) + 1} {n_pts}"] + bundle[2 : 2 + 5 * int(n_cam)] + cam + bundle[2 + 5 * int(n_cam) :]
        (root / "bundle" / "bundle.out").write_text("\n".join(bundle) + "\n")
    (root / "list.txt").write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(DatasetError, match=message) as err:
        BundlerScene(root, "train")
    assert "list.txt" in str(err.value) and err.value.line == line


def test_split_file_naming_an_unknown_image(scene_dir, tmp_path):
    root = _copy_scene(scene_dir, tmp_path)
    with (root / "list.query.txt").open("a") as f:
        f.write("bundler/seq-09/frame-000000.color.png\n")
    with pytest.raises(DatasetError, match="not in list.txt") as err:
        BundlerScene(root, "test")
    assert err.value.line == 7 and "list.query.txt:7:" in str(err.value)


def test_resized_images_are_rejected(scene_dir, tmp_path):
    root = _copy_scene(scene_dir, tmp_path)
    (root / "bundler").unlink()
    for png in scene_dir.glob("bundler/seq-03/*.png"):
        (root / "bundler" / "seq-03").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "bundler" / "seq-03" / png.name), cv2.resize(cv2.imread(str(png)), (80, 60)))
    ds = BundlerScene(root, "test", max_points=0)
    with pytest.raises(DatasetError, match="outside this 80x60 image"):
        ds.intrinsics(0)


# ----------------------------------------------------------------------------- training and evaluation


def test_train_and_evaluate_on_the_bundler_reading(tmp_path_factory, tmp_path, capsys):
    from ros2_posenet.checkpoint import load_checkpoint
    from ros2_posenet.evaluate import main as evaluate_main
    from ros2_posenet.train import load_config, run_training

    root = tiny_scene(tmp_path_factory, "bundler_train", SyntheticSceneConfig(
        width=64, height=48, frames_train=8, frames_test=4, train_sequences=1, test_sequences=1, num_points=300,
        formats=("bundler",),
    ))
    (root / "list.query.txt").rename(root / "queries.txt")  # a split file under another name: data.options
    cfg = load_config(None, [
        "data.kind=bundler", f"data.root={root}", "data.options.split_file=queries.txt", "data.max_points=16", "data.augment=false", "data.val=none",
        "model.backbone=resnet18", "model.hidden_dim=16", "model.dropout=0.1", "model.pretrained=false",
        "preprocess.resize=32", "preprocess.crop=32", "optim.batch_size=4", "optim.lr=1e-3",
        "stages.learned.epochs=1", "stages.reprojection.epochs=1",
        "train.workers=0", "train.progress=false", "train.test_at_end=false", f"train.out_dir={tmp_path / 'run'}",
    ])
    result = run_training(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fine_tune = [r for r in log if r["stage"] == "reprojection" and r["epoch"] > 0]
    assert fine_tune and all(r["points"] > 0 and np.isfinite(r["loss_reprojection"]) for r in fine_tune)  # view-list points
    assert load_checkpoint(result["checkpoint"])["train_config"]["data"]["kind"] == "bundler"
    out = tmp_path / "eval"
    args = ["--checkpoint", str(result["checkpoint"]), "--dataset", "bundler", "--root", str(root), "--out", str(out),
            "--data-option", "split_file=queries.txt"]
    assert evaluate_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert all(m["frames"] == 4 for m in results[0]["methods"].values())  # the split file's 4 test images
    assert evaluate_main([*args[:-2], "--data-option", "no_such_option=1"]) == 2


def test_dubrovnik_config_is_valid():
    from ros2_posenet.losses import build_loss
    from ros2_posenet.train import load_config

    cfg = load_config(str(Path(__file__).parents[2] / "config" / "train_dubrovnik.yaml"), [])
    assert cfg["data"]["kind"] == "bundler" and cfg["optim"]["clip_grad_norm"] == 5.0
    learned, reprojection = cfg["stages"]
    assert build_loss(learned["loss"]).sx.item() == pytest.approx(3.0)  # outdoor metres, not a room's 0
    assert reprojection["loss"]["type"] == "reprojection" and reprojection["freeze_batchnorm"] is True
