"""Synthetic scene generator: determinism, trajectories, rendering, files, CLI."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from ros2_posenet.data.synthetic import (
    SyntheticScene,
    SyntheticSceneConfig,
    generate_scene,
    main,
    scene_trajectories,
)
from ros2_posenet.geometry import matrix_to_pose, rotation_angle_deg_np

TINY = dict(width=96, height=72, frames_train=12, frames_test=6, train_sequences=2, num_points=300)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "scene"
    generate_scene(root, SyntheticSceneConfig(**TINY))
    return root


def test_same_seed_same_files_different_seed_different_images(scene_dir, tmp_path):
    generate_scene(tmp_path / "again", SyntheticSceneConfig(**TINY))
    first, again = _tree_digest(scene_dir), _tree_digest(tmp_path / "again")
    first.pop("scene.yaml"), again.pop("scene.yaml")  # holds the root path and timing
    assert first == again
    generate_scene(tmp_path / "other", SyntheticSceneConfig(**TINY, seed=1))
    other = _tree_digest(tmp_path / "other")
    image = "seq-01/frame-000000.color.png"
    assert other[image] != first[image]


def test_layout_matches_both_formats_and_scene_yaml(scene_dir):
    names = {p.name for p in scene_dir.iterdir()}
    assert {"TrainSplit.txt", "TestSplit.txt", "intrinsics.txt", "dataset_train.txt", "dataset_test.txt",
            "reconstruction.nvm", "reconstruction_size.txt", "scene.yaml", "seq-01", "seq-02", "seq-03"} <= names
    assert (scene_dir / "TrainSplit.txt").read_text().split() == ["sequence1", "sequence2"]
    assert (scene_dir / "TestSplit.txt").read_text().split() == ["sequence3"]
    frames = sorted((scene_dir / "seq-01").glob("*.color.png"))
    assert len(frames) == 6 and frames[0].name == "frame-000000.color.png"
    assert (scene_dir / "seq-01/frame-000000.depth.png").is_file()
    info = yaml.safe_load((scene_dir / "scene.yaml").read_text())
    assert info["frames"] == {"train": 12, "test": 6}
    assert info["seed"] == 0 and (info["width"], info["height"]) == (96, 72)
    K = SyntheticSceneConfig(**TINY).K
    assert info["intrinsics"]["fx"] == pytest.approx(K[0, 0]) and info["intrinsics"]["cx"] == pytest.approx(47.5)
    assert info["mean_visible_points"] > 20


def test_only_requested_formats_are_written(tmp_path):
    generate_scene(tmp_path / "c", SyntheticSceneConfig(**TINY, formats=("cambridge",)))
    assert (tmp_path / "c/dataset_train.txt").is_file()
    assert not (tmp_path / "c/TrainSplit.txt").exists()
    assert not list((tmp_path / "c/seq-01").glob("*.depth.png"))


def test_test_poses_are_held_out_and_robot_like():
    config = SyntheticSceneConfig(frames_train=200, frames_test=60, train_sequences=2)
    sequences = scene_trajectories(config)
    train = np.concatenate([s["poses"] for s in sequences.values() if s["split"] == "train"])
    test = np.concatenate([s["poses"] for s in sequences.values() if s["split"] == "test"])
    assert len(train) == 200 and len(test) == 60
    for T in test:
        dist = np.linalg.norm(train[:, :3, 3] - T[:3, 3], axis=1)
        near = train[dist < 0.05]
        angles = [rotation_angle_deg_np(matrix_to_pose(T)[1], matrix_to_pose(N)[1]) for N in near]
        assert all(a > 1.0 for a in angles), "a test pose repeats a training pose"
    # Same area: every test position within 1 m of some training position.
    nearest = np.min(np.linalg.norm(test[:, None, :3, 3] - train[None, :, :3, 3], axis=2), axis=1)
    assert nearest.max() < 1.0
    everything = np.concatenate([train, test])
    assert np.all((everything[:, 2, 3] >= 0.99) & (everything[:, 2, 3] <= 1.61))
    # Optical y axis (image down) points roughly down in the z-up world: |pitch|, |roll| small.
    down = -everything[:, 2, 1]
    assert np.all(down > np.cos(np.radians(12)))
    # Loops and turns: headings cover all directions.
    optical_z = everything[:, :2, 2]
    yaw = np.degrees(np.arctan2(optical_z[:, 1], optical_z[:, 0]))
    assert np.histogram(yaw, bins=8, range=(-180, 180))[0].min() > 0


def test_render_depth_is_exact_optical_depth():
    scene = SyntheticScene(SyntheticSceneConfig(**TINY))
    lz = scene.config.room_size[2]
    T = np.eye(4)  # identity rotation: optical z is world +z, i.e. looking straight up
    x = 0.5 * (scene.layout.path_inner[0] + scene.layout.path_outer[0])
    T[:3, 3] = (x, 0.0, lz - 0.3)  # above every box (they are at most lz - 0.3 high)
    rgb, depth = scene.render(T)
    assert rgb.shape == (72, 96, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(depth, 0.3, atol=1e-5)  # a plane parallel to the image plane
    assert rgb.std() > 10  # textured, not flat


def test_points_seen_by_a_camera_match_its_depth_buffer():
    scene = SyntheticScene(SyntheticSceneConfig(**TINY))
    T = scene_trajectories(scene.config, scene.layout)["seq-01"]["poses"][2]
    _, depth = scene.render(T)
    ids, uv = scene.visible_points(T, depth)
    assert len(ids) > 10
    cam = (scene.points[ids] - T[:3, 3]) @ T[:3, :3]
    px = np.round(uv).astype(int)
    np.testing.assert_allclose(depth[px[:, 1], px[:, 0]], cam[:, 2], rtol=0.02, atol=0.03)


def test_refuses_to_overwrite_unless_asked(scene_dir, tmp_path):
    target = tmp_path / "s"
    generate_scene(target, SyntheticSceneConfig(**TINY))
    with pytest.raises(FileExistsError):
        generate_scene(target, SyntheticSceneConfig(**TINY))
    summary = generate_scene(target, SyntheticSceneConfig(**{**TINY, "frames_train": 4, "frames_test": 2}), overwrite=True)
    assert summary["frames"] == {"train": 4, "test": 2}
    assert len(list(target.rglob("*.color.png"))) == 6  # no stale frames left behind


@pytest.mark.parametrize("bad", [dict(width=8), dict(frames_train=1, train_sequences=2), dict(room_size=(4, 9, 3)),
                                 dict(formats=("kitti",)), dict(fov_deg=179)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SyntheticSceneConfig(**bad)


def test_cli_writes_scene_and_reports_user_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--frames-train", "4", "--train-sequences", "2", "--frames-test", "2", "--width", "64", "--height", "48",
            "--points", "100", "--seed", "3", "--quiet"]
    assert main(argv) == 0
    assert "4 train + 2 test frames" in capsys.readouterr().out
    assert yaml.safe_load((out / "scene.yaml").read_text())["seed"] == 3
    assert main(argv) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--width", "4", "--quiet"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "y"), "--formats", "kitti"])
    assert exit_info.value.code == 2
